/*
 * The spool's disk answers EIO (README "Durability", back-pressure): the
 * real amp2dify with tests/faults/fail_io.c preloaded, so that its spool's
 * fdatasync or writes fail while a control file exists.
 *
 *   sync_failure   fdatasync of the log fails: requests get 503
 *                  `unavailable` with Retry-After, /readyz 503, the log
 *                  says why; once the disk is back readiness returns by
 *                  itself and new requests get 202
 *   write_failure  the same when the writes themselves fail
 *
 * In both, a 503 means nothing was kept: no refused event reaches Dify,
 * and each one, sent again after the recovery as its sender would, is
 * stored as new (after a failed sync the spool drops what it committed
 * since its last good sync, keys included) and delivered exactly once;
 * every event answered 202 reaches Dify exactly once.
 */
#include <check.h>
#include <libgen.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "../../base/alloc.h"
#include "../check_run.h"
#include "../fake_dify/fake_dify.h"
#include "harness.h"

#define N 4 /* events per phase */
#define RECOVERY_TIMEOUT_MS 8000
#define DELIVERY_TIMEOUT_MS 15000

/* The fault library next to the binary under test: $(BUILD)/tests/. */
static char *fail_io_lib(void) {
    char *copy = amp_xstrdup(h_bin());
    char *lib = amp_xasprintf("%s/tests/libfail_io.so", dirname(copy));
    free(copy);
    char *abs = realpath(lib, NULL);
    ck_assert_msg(abs != NULL, "%s not found (make builds it with the e2e tests)", lib);
    free(lib);
    return abs;
}

static h_resp *post_event(h_server *srv, const char *key) {
    char *ev = h_event("io_error_test", "user-io", key);
    char *body = amp_xasprintf("[%s]", ev);
    h_resp *r = h_post_signed(srv, body);
    free(body);
    free(ev);
    return r;
}

static void write_file(const char *path, const char *text) {
    FILE *f = fopen(path, "w");
    ck_assert_ptr_nonnull(f);
    fputs(text, f);
    ck_assert_int_eq(fclose(f), 0);
}

static long readyz(h_server *srv) {
    h_resp *r = h_get(srv, "/readyz");
    long status = r->status;
    h_resp_free(r);
    return status;
}

/* Successful deliveries per trace id (the event's insert_id); caller owns. */
static json_t *delivered_by_key(fake_dify *fake) {
    json_t *reqs = fake_dify_requests(fake), *seen = json_object(), *r;
    size_t i;
    json_array_foreach(reqs, i, r) {
        const char *id = json_string_value(json_object_get(r, "trace_id"));
        if (!id || !json_is_true(json_object_get(r, "delivered")))
            continue;
        json_t *n = json_object_get(seen, id);
        json_object_set_new(seen, id, json_integer(n ? json_integer_value(n) + 1 : 1));
    }
    json_decref(reqs);
    return seen;
}

static void run(const char *what, const char *log_msg) {
    char tmp[] = "/tmp/amp2dify-io-XXXXXX";
    ck_assert_ptr_nonnull(mkdtemp(tmp));
    char *control = amp_xasprintf("%s/fail", tmp);
    char *lib = fail_io_lib();
    char *preload = amp_xasprintf("LD_PRELOAD=%s", lib);
    char *ctl_env = amp_xasprintf("AMP2DIFY_FAIL_IO_CONTROL=%s", control);
    /* ASan wants its runtime first among the preloaded libraries. */
    const char *asan = getenv("ASAN_OPTIONS");
    char *asan_env = amp_xasprintf("ASAN_OPTIONS=%s%sverify_asan_link_order=0", asan ? asan : "",
                                   asan && *asan ? ":" : "");
    const char *env[] = {preload, ctl_env, asan_env, NULL};

    fake_dify *fake = fake_dify_start(0, H_API_KEY);
    ck_assert_ptr_nonnull(fake);
    h_opts o = {.dify_port = fake_dify_port(fake), .env = env};
    h_server *srv = h_server_start(&o);
    ck_assert_msg(srv != NULL, "amp2dify did not start (see its log above)");

    char keys[3][N][32];
    for (int p = 0; p < 3; p++)
        for (int i = 0; i < N; i++)
            snprintf(keys[p][i], sizeof keys[p][i], "%s-%d-%d", what, p, i);

    /* Before: normal service. Dify answers the last of these events slowly,
     * so that its acknowledgement is committed while the disk fails. */
    for (int i = 0; i < N; i++) {
        if (i == N - 1) {
            ck_assert_uint_eq(fake_dify_wait_delivered(fake, N - 1, DELIVERY_TIMEOUT_MS), N - 1);
            fake_dify_push(fake, &(fake_dify_behaviour){.delay_ms = 1500});
        }
        h_resp *r = post_event(srv, keys[0][i]);
        ck_assert_msg(r->status == 202, "status %ld: %s", r->status, r->body);
        h_resp_free(r);
    }
    /* The slow answer has begun once the request took its behaviour. */
    for (int64_t t = h_mono_ms(); fake_dify_pending(fake) > 0 && h_mono_ms() - t < 10000;)
        h_sleep_ms(10);
    ck_assert_uint_eq(fake_dify_pending(fake), 0);

    /* The disk fails: 503 with Retry-After for every request, not ready. */
    write_file(control, what);
    for (int i = 0; i < N; i++) {
        h_resp *r = post_event(srv, keys[1][i]);
        ck_assert_msg(r->status == 503, "%s failing: status %ld: %s", what, r->status, r->body);
        ck_assert_str_eq(h_resp_error(r), "unavailable");
        ck_assert_ptr_nonnull(h_resp_header(r, "Retry-After"));
        ck_assert_ptr_nonnull(json_string_value(json_object_get(r->json, "detail")));
        h_resp_free(r);
    }
    /* Not ready for as long as the disk fails, the acknowledgement of the
     * slow delivery committed meanwhile included. */
    int64_t until = h_mono_ms() + 2500;
    int samples = 0;
    while (h_mono_ms() < until) {
        long st = readyz(srv);
        ck_assert_msg(st == 503, "/readyz %ld while the disk fails (sample %d)", st, samples);
        samples++;
        h_sleep_ms(100);
    }
    ck_assert_uint_eq(fake_dify_wait_delivered(fake, N, DELIVERY_TIMEOUT_MS), N);
    json_t *lines = h_server_log_lines(srv, log_msg);
    ck_assert_msg(json_array_size(lines) > 0, "no '%s' log line", log_msg);
    const char *why = json_string_value(json_object_get(json_array_get(lines, 0), "error"));
    ck_assert_msg(why && (strstr(why, "I/O") || strstr(why, "Input/output")),
                  "the log does not say why: %s", why ? why : "-");
    json_decref(lines);

    /* The disk is back: ready again without any request. */
    ck_assert_int_eq(unlink(control), 0);
    int64_t t0 = h_mono_ms();
    while (readyz(srv) != 200 && h_mono_ms() - t0 < RECOVERY_TIMEOUT_MS)
        h_sleep_ms(50);
    int64_t recovered_ms = h_mono_ms() - t0;
    ck_assert_msg(readyz(srv) == 200, "not ready %lld ms after the disk came back",
                  (long long)recovered_ms);
    if (strcmp(what, "sync") == 0) {
        /* What was committed but not synced was dropped, not kept. */
        lines = h_server_log_lines(srv, "spool recovered from a failed sync");
        ck_assert_uint_eq(json_array_size(lines), 1);
        json_int_t dropped =
            json_integer_value(json_object_get(json_array_get(lines, 0), "rows_dropped"));
        ck_assert_msg(dropped >= 1 && dropped <= N, "rows_dropped %lld", (long long)dropped);
        json_decref(lines);
    }

    /* New events are stored and delivered; none of the refused ones is. */
    for (int i = 0; i < N; i++) {
        h_resp *r = post_event(srv, keys[2][i]);
        ck_assert_msg(r->status == 202, "after recovery: status %ld: %s", r->status, r->body);
        ck_assert_int_eq(json_integer_value(json_object_get(r->json, "accepted")), 1);
        h_resp_free(r);
    }
    ck_assert_uint_ge(fake_dify_wait_delivered(fake, 2 * N, DELIVERY_TIMEOUT_MS), 2 * N);
    h_sleep_ms(1000);
    json_t *seen = delivered_by_key(fake);
    for (int i = 0; i < N; i++)
        ck_assert_msg(!json_object_get(seen, keys[1][i]), "%s was answered 503, yet delivered",
                      keys[1][i]);
    json_decref(seen);

    /* Sent again, each refused event is new to the spool. */
    for (int i = 0; i < N; i++) {
        h_resp *r = post_event(srv, keys[1][i]);
        ck_assert_msg(r->status == 202, "resent: status %ld: %s", r->status, r->body);
        ck_assert_msg(json_integer_value(json_object_get(r->json, "accepted")) == 1,
                      "resent %s: %s", keys[1][i], r->body);
        h_resp_free(r);
    }

    /* Every event reaches Dify exactly once. */
    ck_assert_uint_ge(fake_dify_wait_delivered(fake, 3 * N, DELIVERY_TIMEOUT_MS), 3 * N);
    h_sleep_ms(500);
    seen = delivered_by_key(fake);
    for (int p = 0; p < 3; p++)
        for (int k = 0; k < N; k++) {
            json_int_t n = json_integer_value(json_object_get(seen, keys[p][k]));
            ck_assert_msg(n == 1, "%s delivered %lld times", keys[p][k], (long long)n);
        }
    ck_assert_uint_eq(json_object_size(seen), 3 * N);
    json_decref(seen);

    printf("%s failure: %d refused with 503 (Retry-After), none delivered; readyz 200 again "
           "%lld ms after the disk came back; the refused events sent again were stored as new; "
           "all %d events delivered once\n",
           what, N, (long long)recovered_ms, 3 * N);
    fflush(stdout);

    char *unclean = h_server_stop_clean(srv);
    ck_assert_msg(unclean == NULL, "%s", unclean);
    fake_dify_stop(fake);
    rmdir(tmp);
    free(asan_env);
    free(ctl_env);
    free(preload);
    free(lib);
    free(control);
}

START_TEST(sync_failure) {
    run("sync", "spool sync failed");
}
END_TEST

START_TEST(write_failure) {
    run("write", "spool commit failed");
}
END_TEST

static Suite *suite(void) {
    Suite *s = suite_create("io_errors");
    TCase *tc = tcase_create("io_errors");
    tcase_set_timeout(tc, 90);
    tcase_add_test(tc, sync_failure);
    tcase_add_test(tc, write_failure);
    suite_add_tcase(s, tc);
    return s;
}

int main(void) {
    return amp_check_run(suite());
}
