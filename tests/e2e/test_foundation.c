/*
 * Acceptance tests of the foundation (SPEC "HTTP interface", "Authentication
 * schemes", "Body formats accepted", "Dify delivery", "Durability"): the
 * real build/amp2dify against the in-process fake Dify. Each test starts
 * its own fake and server, so tests are independent.
 */
#include <check.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>

#include "../../base/alloc.h"
#include "../fake_dify/fake_dify.h"
#include "harness.h"
#include "../check_run.h"

#define DELIVERY_TIMEOUT_MS 10000
/* How long "nothing else happens" is watched for. */
#define QUIET_MS 1000

/* The default config with a small body limit (for 413). */
static const char CONFIG_SMALL_BODY[] =
    "{\n"
    "  \"listen\": {\"address\": \"127.0.0.1\", \"port\": @PORT@,\n"
    "             \"path\": \"/webhooks/amplitude\", \"max_body_bytes\": 65536},\n"
    "  \"spool\": {\"path\": \"@DIR@/spool.db\"},\n"
    "  \"dify\": {\"base_url\": \"http://127.0.0.1:@DIFY_PORT@/v1\",\n"
    "           \"retry\": {\"initial_ms\": 50, \"max_ms\": 200}},\n"
    "  \"apps\": {\"support\": {\"api_key_env\": \"DIFY_API_KEY\", \"endpoint\": \"chat\"}},\n"
    "  \"routes\": [{\"name\": \"all\", \"app\": \"support\",\n"
    "              \"query\": \"{{event_type}} by {{user_id}}\", \"user\": \"{{user_id}}\"}]\n"
    "}\n";

typedef struct env {
    fake_dify *fake;
    h_server *srv;
} env;

static void up_with(env *e, const char *config) {
    e->fake = fake_dify_start(0, H_API_KEY);
    ck_assert_ptr_nonnull(e->fake);
    h_opts o = {.config_json = config, .dify_port = fake_dify_port(e->fake)};
    e->srv = h_server_start(&o);
    ck_assert_msg(e->srv != NULL, "amp2dify did not start (see its log above)");
}

static void up(env *e) {
    up_with(e, NULL);
}

/* Stop the server the way operators do (SIGTERM): it must exit 0 and its
 * log must hold no sanitizer report (sanitizer builds run these tests too). */
static void stop_clean(h_server *srv) {
    char *why = h_server_stop_clean(srv);
    ck_assert_msg(why == NULL, "%s", why);
}

static void down(env *e) {
    stop_clean(e->srv);
    fake_dify_stop(e->fake);
}

static const char *jstr(const json_t *o, const char *key) {
    return json_string_value(json_object_get(o, key));
}

static void assert_accepted(const h_resp *r, int accepted, int duplicates, int filtered) {
    ck_assert_msg(r->status == 202, "status %ld, body %s", r->status, r->body);
    json_t *want = json_pack("{s:i, s:i, s:i}", "accepted", accepted, "duplicates", duplicates,
                             "filtered", filtered);
    ck_assert_msg(r->json && json_equal(r->json, want), "body %s", r->body);
    json_decref(want);
}

static void assert_error(const h_resp *r, long status, const char *code) {
    ck_assert_msg(r->status == status, "status %ld (want %ld), body %s", r->status, status,
                  r->body);
    ck_assert_msg(r->json != NULL, "error body is not JSON: %s", r->body);
    ck_assert_msg(h_resp_error(r) && strcmp(h_resp_error(r), code) == 0,
                  "error %s (want %s), body %s", h_resp_error(r), code, r->body);
    ck_assert_msg(json_is_string(json_object_get(r->json, "detail")), "no detail: %s", r->body);
    const char *ct = h_resp_header(r, "Content-Type");
    ck_assert_msg(ct && strncmp(ct, "application/json", 16) == 0, "Content-Type %s", ct);
}

/* Nothing reached Dify, even after a while. */
static void assert_nothing_delivered(env *e) {
    h_sleep_ms(QUIET_MS);
    ck_assert_uint_eq(fake_dify_count(e->fake), 0);
}

/* ---- HTTP surface --------------------------------------------------------- */

START_TEST(health_and_routing) {
    env e;
    up(&e);
    h_resp *r = h_get(e.srv, "/healthz");
    ck_assert_int_eq(r->status, 200);
    h_resp_free(r);
    r = h_get(e.srv, "/readyz");
    ck_assert_int_eq(r->status, 200);
    h_resp_free(r);
    /* HEAD on a GET endpoint: the headers without the body. */
    r = h_request(e.srv, &(h_req){.method = "HEAD", .path = "/readyz"});
    ck_assert_int_eq(r->status, 200);
    ck_assert_uint_eq(r->len, 0);
    h_resp_free(r);

    r = h_get(e.srv, "/no/such/path");
    ck_assert_int_eq(r->status, 404);
    ck_assert_msg(r->json && json_is_string(json_object_get(r->json, "error")), "body %s", r->body);
    h_resp_free(r);

    /* Request ids: a printable one is echoed, else each answer gets its own
     * 32 hex digits. */
    char ids[2][64];
    for (int i = 0; i < 2; i++) {
        r = h_get(e.srv, "/healthz");
        const char *id = h_resp_header(r, "X-Request-Id");
        ck_assert_ptr_nonnull(id);
        ck_assert_msg(strlen(id) == 32 && strspn(id, "0123456789abcdef") == 32, "id %s", id);
        snprintf(ids[i], sizeof ids[i], "%s", id);
        h_resp_free(r);
    }
    ck_assert_str_ne(ids[0], ids[1]);
    r = h_request(e.srv, &(h_req){.path = "/healthz",
                                  .headers = (const char *const[]){"X-Request-Id: abc-1", NULL}});
    ck_assert_str_eq(h_resp_header(r, "X-Request-Id"), "abc-1");
    h_resp_free(r);

    r = h_get(e.srv, H_WEBHOOK);
    ck_assert_int_eq(r->status, 405);
    const char *allow = h_resp_header(r, "Allow");
    ck_assert_msg(allow && strstr(allow, "POST"), "Allow: %s", allow);
    ck_assert_msg(r->json && json_is_string(json_object_get(r->json, "error")), "body %s", r->body);
    h_resp_free(r);
    r = h_request(e.srv, &(h_req){.method = "DELETE", .path = "/healthz"});
    ck_assert_int_eq(r->status, 405);
    allow = h_resp_header(r, "Allow");
    ck_assert_msg(allow && strcmp(allow, "GET, HEAD") == 0, "Allow: %s", allow);
    h_resp_free(r);
    down(&e);
}
END_TEST

START_TEST(sigterm_exits_zero) {
    env e;
    up(&e);
    /* Idle, it must not need the whole grace period either. */
    int64_t t0 = h_mono_ms();
    int st = h_server_kill(e.srv, SIGTERM, 10000);
    ck_assert_msg(WIFEXITED(st) && WEXITSTATUS(st) == 0, "wait status %d", st);
    ck_assert_int_lt(h_mono_ms() - t0, 5000);
    down(&e);
}
END_TEST

/* SPEC: on SIGTERM "in-flight HTTP requests finish". A webhook whose headers
 * arrived before the signal and whose body arrives after it is stored and
 * answered 202; one begun after the signal gets 503 with Retry-After; the
 * server then exits 0, and the admitted event is delivered. The request
 * asks for 100-continue, so the server's "100 Continue" says it has begun
 * the request before the signal is sent (no timing guess, also under
 * valgrind). */
START_TEST(sigterm_lets_requests_in_flight_finish) {
    env e;
    up(&e);
    char *body = h_event("signup", "user-1", "ins-in-flight");
    int64_t ts = time(NULL);
    char *sig = h_sign(body, strlen(body), ts, h_server_secret(e.srv));
    char *head = amp_xasprintf("POST " H_WEBHOOK " HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                               "Content-Type: application/json\r\nContent-Length: %zu\r\n"
                               "X-Amplitude-Timestamp: %lld\r\nX-Amplitude-Sig: %s\r\n"
                               "Expect: 100-continue\r\nConnection: close\r\n\r\n",
                               strlen(body), (long long)ts, sig);
    int fd = h_connect(h_server_port(e.srv), 10000);
    ck_assert_int_ge(fd, 0);
    ck_assert_int_eq(h_send_all(fd, head, strlen(head)), 0);
    char *cont = h_recv_head(fd);
    ck_assert_msg(strncmp(cont, "HTTP/1.1 100", 12) == 0, "before the body: %s", cont);
    free(cont);
    size_t half = strlen(body) / 2;
    ck_assert_int_eq(h_send_all(fd, body, half), 0);

    ck_assert_int_eq(kill(h_server_pid(e.srv), SIGTERM), 0);
    ck_assert(h_server_log_wait(e.srv, "shutting down", 5000));
    h_resp *r = h_get(e.srv, "/readyz");
    ck_assert_int_eq(r->status, 503);
    h_resp_free(r);
    char *late = h_event("signup", "user-2", "ins-late");
    r = h_post_signed(e.srv, late);
    assert_error(r, 503, "unavailable");
    ck_assert_ptr_nonnull(h_resp_header(r, "Retry-After"));
    h_resp_free(r);
    free(late);

    ck_assert_int_eq(h_send_all(fd, body + half, strlen(body) - half), 0);
    char *answer = h_recv_all(fd);
    close(fd);
    ck_assert_msg(strncmp(answer, "HTTP/1.1 202", 12) == 0, "answer: %s", answer);
    ck_assert_msg(strstr(answer, "{\"accepted\":1,\"duplicates\":0,\"filtered\":0}"), "answer: %s",
                  answer);
    free(answer);
    int st = h_server_wait_exit(e.srv, 10000);
    ck_assert_msg(WIFEXITED(st) && WEXITSTATUS(st) == 0, "wait status %d", st);
    char *why = h_server_sanitizer_report(e.srv);
    ck_assert_msg(why == NULL, "%s", why);

    /* Delivered before the exit or after the restart; the late one never. */
    ck_assert_int_eq(h_server_restart(e.srv), 0);
    ck_assert_uint_eq(fake_dify_wait_delivered(e.fake, 1, DELIVERY_TIMEOUT_MS), 1);
    h_sleep_ms(QUIET_MS);
    ck_assert_uint_eq(fake_dify_delivered(e.fake), 1);
    free(head);
    free(sig);
    free(body);
    down(&e);
}
END_TEST

/* ---- delivery ----------------------------------------------------------------- */

START_TEST(signed_event_reaches_dify) {
    env e;
    up(&e);
    char *ev = h_event("signup", "user-1", "ins-0001");
    h_resp *r = h_post_signed(e.srv, ev);
    assert_accepted(r, 1, 0, 0);
    h_resp_free(r);
    free(ev);
    /* The access line: its fields in this order, nothing else. */
    ck_assert(
        h_server_log_wait(e.srv, "\"level\":\"info\",\"msg\":\"request\",\"request_id\":\"", 5000));
    ck_assert(h_server_log_wait(e.srv,
                                "\",\"client\":\"127.0.0.1\",\"status\":202,\"accepted\":1,"
                                "\"duplicates\":0,\"filtered\":0,\"ms\":",
                                5000));

    ck_assert_uint_eq(fake_dify_wait_delivered(e.fake, 1, DELIVERY_TIMEOUT_MS), 1);
    json_t *reqs = fake_dify_requests(e.fake);
    ck_assert_uint_eq(json_array_size(reqs), 1);
    json_t *q = json_array_get(reqs, 0);
    ck_assert_str_eq(jstr(q, "method"), "POST");
    ck_assert_str_eq(jstr(q, "path"), "/v1/chat-messages");
    ck_assert_str_eq(jstr(q, "authorization"), "Bearer " H_API_KEY);
    ck_assert_str_eq(jstr(q, "trace_id"), "ins-0001");
    ck_assert_ptr_nonnull(jstr(q, "content_type"));
    ck_assert_int_eq(strncmp(jstr(q, "content_type"), "application/json", 16), 0);
    json_t *body = json_object_get(q, "body");
    ck_assert(json_is_object(json_object_get(body, "inputs")));
    ck_assert_str_eq(jstr(body, "query"), "signup by user-1");
    ck_assert_str_eq(jstr(body, "user"), "user-1");
    ck_assert_str_eq(jstr(body, "response_mode"), "blocking");
    json_decref(reqs);

    h_sleep_ms(QUIET_MS / 2);
    ck_assert_uint_eq(fake_dify_count(e.fake), 1);
    down(&e);
}
END_TEST

START_TEST(array_of_three) {
    env e;
    up(&e);
    char *a = h_event("signup", "user-a", "ins-a");
    char *b = h_event("login", "user-b", "ins-b");
    char *c = h_event("purchase", "user-c", "ins-c");
    char *body = malloc(strlen(a) + strlen(b) + strlen(c) + 8);
    ck_assert_ptr_nonnull(body);
    snprintf(body, strlen(a) + strlen(b) + strlen(c) + 8, "[%s,%s,%s]", a, b, c);
    h_resp *r = h_post_signed(e.srv, body);
    assert_accepted(r, 3, 0, 0);
    h_resp_free(r);

    ck_assert_uint_eq(fake_dify_wait_delivered(e.fake, 3, DELIVERY_TIMEOUT_MS), 3);
    h_sleep_ms(QUIET_MS / 2);
    ck_assert_uint_eq(fake_dify_count(e.fake), 3);
    json_t *reqs = fake_dify_requests(e.fake);
    const char *want[][2] = {{"ins-a", "signup by user-a"},
                             {"ins-b", "login by user-b"},
                             {"ins-c", "purchase by user-c"}};
    for (int w = 0; w < 3; w++) {
        int seen = 0;
        for (size_t i = 0; i < json_array_size(reqs); i++) {
            json_t *q = json_array_get(reqs, i);
            if (jstr(q, "trace_id") && strcmp(jstr(q, "trace_id"), want[w][0]) == 0) {
                seen++;
                ck_assert_str_eq(jstr(json_object_get(q, "body"), "query"), want[w][1]);
            }
        }
        ck_assert_msg(seen == 1, "%s delivered %d times", want[w][0], seen);
    }
    json_decref(reqs);
    free(a);
    free(b);
    free(c);
    free(body);
    down(&e);
}
END_TEST

START_TEST(duplicate_insert_id_counted_once) {
    env e;
    up(&e);
    char *ev = h_event("signup", "user-1", "ins-dup");
    h_resp *r = h_post_signed(e.srv, ev);
    assert_accepted(r, 1, 0, 0);
    h_resp_free(r);
    r = h_post_signed(e.srv, ev);
    assert_accepted(r, 0, 1, 0);
    h_resp_free(r);
    free(ev);
    ck_assert_uint_eq(fake_dify_wait_delivered(e.fake, 1, DELIVERY_TIMEOUT_MS), 1);
    h_sleep_ms(QUIET_MS);
    ck_assert_uint_eq(fake_dify_count(e.fake), 1);
    down(&e);
}
END_TEST

/* ---- authentication ------------------------------------------------------------- */

START_TEST(bad_signatures_rejected) {
    env e;
    up(&e);
    char *ev = h_event("signup", "user-1", "ins-auth");
    int64_t now = (int64_t)time(NULL);

    h_resp *r = h_post_signed_at(e.srv, ev, now, "not-the-secret");
    assert_error(r, 401, "invalid_signature");
    h_resp_free(r);

    r = h_post(e.srv, H_WEBHOOK, ev, (const char *)NULL);
    assert_error(r, 401, "missing_signature");
    h_resp_free(r);
    ck_assert(h_server_log_wait(
        e.srv, "\"status\":401,\"error\":\"missing_signature\",\"termination\":0,\"ms\":", 5000));

    char ts_h[64];
    snprintf(ts_h, sizeof(ts_h), "X-Amplitude-Timestamp: %lld", (long long)now);
    r = h_post(e.srv, H_WEBHOOK, ev, ts_h, (const char *)NULL);
    assert_error(r, 401, "missing_signature");
    h_resp_free(r);

    r = h_post(e.srv, H_WEBHOOK, ev, ts_h, "X-Amplitude-Sig: sha256=zz", (const char *)NULL);
    assert_error(r, 401, "invalid_signature");
    h_resp_free(r);

    /* Right secret, but signed ten minutes ago. */
    r = h_post_signed_at(e.srv, ev, now - 600, H_SECRET);
    assert_error(r, 401, "stale_timestamp");
    h_resp_free(r);

    /* A valid signature over other bytes does not cover this body. */
    char *sig = h_sign("{}", 2, now, H_SECRET);
    char sig_h[128];
    snprintf(sig_h, sizeof(sig_h), "X-Amplitude-Sig: %s", sig);
    r = h_post(e.srv, H_WEBHOOK, ev, ts_h, sig_h, (const char *)NULL);
    assert_error(r, 401, "invalid_signature");
    h_resp_free(r);
    free(sig);

    assert_nothing_delivered(&e);
    free(ev);
    down(&e);
}
END_TEST

/* ---- bad requests ----------------------------------------------------------------- */

START_TEST(invalid_bodies_rejected) {
    env e;
    up(&e);
    h_resp *r = h_post_signed(e.srv, "{\"event_type\": \"signup\",\n \"user_id\": ");
    assert_error(r, 400, "invalid_json");
    const char *detail = jstr(r->json, "detail");
    ck_assert_msg(strstr(detail, "line") && strstr(detail, "column"), "detail: %s", detail);
    h_resp_free(r);

    r = h_post_signed(e.srv, "{\"event_type\":\"signup\",\"insert_id\":\"x1\"}");
    assert_error(r, 400, "invalid_event");
    h_resp_free(r);

    /* All or nothing: one bad event rejects the valid one next to it. */
    char *good = h_event("signup", "user-1", "ins-good");
    char *both = malloc(strlen(good) + 64);
    ck_assert_ptr_nonnull(both);
    snprintf(both, strlen(good) + 64, "[%s,{\"event_type\":\"x\"}]", good);
    r = h_post_signed(e.srv, both);
    assert_error(r, 400, "invalid_event");
    h_resp_free(r);

    /* Signed correctly, but not JSON by its Content-Type. */
    int64_t now = (int64_t)time(NULL);
    char *sig = h_sign(good, strlen(good), now, H_SECRET);
    char sig_h[128], ts_h[64];
    snprintf(sig_h, sizeof(sig_h), "X-Amplitude-Sig: %s", sig);
    snprintf(ts_h, sizeof(ts_h), "X-Amplitude-Timestamp: %lld", (long long)now);
    r = h_post(e.srv, H_WEBHOOK, good, ts_h, sig_h, "Content-Type: text/plain", (const char *)NULL);
    assert_error(r, 415, "unsupported_media_type");
    h_resp_free(r);
    free(sig);

    assert_nothing_delivered(&e);
    free(good);
    free(both);
    down(&e);
}
END_TEST

/* listen.max_events_per_request: one event over the limit rejects the
 * request, at the limit it is accepted. */
START_TEST(too_many_events_rejected) {
    env e;
    up_with(&e, "{\"listen\": {\"address\": \"127.0.0.1\", \"port\": @PORT@,"
                " \"max_events_per_request\": 2},"
                " \"spool\": {\"path\": \"@DIR@/spool.db\"},"
                " \"dify\": {\"base_url\": \"http://127.0.0.1:@DIFY_PORT@/v1\"},"
                " \"apps\": {\"a\": {\"api_key_env\": \"DIFY_API_KEY\"}},"
                " \"routes\": [{\"name\": \"all\", \"app\": \"a\"}]}");
    char *a = h_event("signup", "u1", "max-1"), *b = h_event("signup", "u2", "max-2"),
         *c = h_event("signup", "u3", "max-3");
    char *three = amp_xasprintf("[%s,%s,%s]", a, b, c), *two = amp_xasprintf("[%s,%s]", a, b);
    h_resp *r = h_post_signed(e.srv, three);
    assert_error(r, 400, "invalid_event");
    ck_assert_msg(strstr(jstr(r->json, "detail"), "at most 2") != NULL, "detail: %s",
                  jstr(r->json, "detail"));
    h_resp_free(r);
    r = h_post_signed(e.srv, two);
    assert_accepted(r, 2, 0, 0);
    h_resp_free(r);
    ck_assert_uint_eq(fake_dify_wait_delivered(e.fake, 2, DELIVERY_TIMEOUT_MS), 2);
    h_sleep_ms(QUIET_MS / 2);
    ck_assert_uint_eq(fake_dify_count(e.fake), 2);
    free(a), free(b), free(c), free(three), free(two);
    down(&e);
}
END_TEST

/* A body over max_body_bytes, announced by Content-Length or streamed
 * chunked (so its size is only known while reading). */
START_TEST(body_too_large) {
    env e;
    up_with(&e, CONFIG_SMALL_BODY);
    size_t n = 200 * 1024;
    char *big = malloc(n + 1);
    ck_assert_ptr_nonnull(big);
    int off = snprintf(big, n + 1, "{\"event_type\":\"x\",\"user_id\":\"u\",\"pad\":\"");
    memset(big + off, 'a', n - (size_t)off - 2);
    memcpy(big + n - 2, "\"}", 3);
    int64_t now = (int64_t)time(NULL);
    char *sig = h_sign(big, n, now, H_SECRET);
    char sig_h[128], ts_h[64];
    snprintf(sig_h, sizeof(sig_h), "X-Amplitude-Sig: %s", sig);
    snprintf(ts_h, sizeof(ts_h), "X-Amplitude-Timestamp: %lld", (long long)now);

    for (int chunked = 0; chunked <= 1; chunked++) {
        const char *headers[] = {ts_h, sig_h, "Expect:", NULL};
        h_req req = {.method = "POST",
                     .path = H_WEBHOOK,
                     .body = big,
                     .body_len = n,
                     .headers = headers,
                     .chunked = chunked != 0};
        h_resp *r = h_request(e.srv, &req);
        ck_assert_msg(r->status == 413, "%s: status %ld (%s), body %s",
                      chunked ? "chunked" : "Content-Length", r->status, r->error ? r->error : "-",
                      r->body);
        assert_error(r, 413, "body_too_large");
        h_resp_free(r);
    }
    /* The server is still fine afterwards. */
    h_resp *r = h_get(e.srv, "/healthz");
    ck_assert_int_eq(r->status, 200);
    h_resp_free(r);

    assert_nothing_delivered(&e);
    free(sig);
    free(big);
    down(&e);
}
END_TEST

/* ---- Dify failures --------------------------------------------------------------- */

START_TEST(retries_until_success) {
    env e;
    up(&e);
    fake_dify_push_status(e.fake, 500);
    fake_dify_push_status(e.fake, 503);
    fake_dify_push_status(e.fake, 429);
    char *ev = h_event("signup", "user-1", "ins-retry");
    h_resp *r = h_post_signed(e.srv, ev);
    assert_accepted(r, 1, 0, 0);
    h_resp_free(r);
    free(ev);

    ck_assert_uint_eq(fake_dify_wait_delivered(e.fake, 1, DELIVERY_TIMEOUT_MS), 1);
    h_sleep_ms(QUIET_MS);
    ck_assert_uint_eq(fake_dify_delivered(e.fake), 1);
    ck_assert_uint_eq(fake_dify_count(e.fake), 4);
    json_t *reqs = fake_dify_requests(e.fake);
    static const int want[] = {500, 503, 429, 200};
    for (size_t i = 0; i < 4; i++) {
        json_t *q = json_array_get(reqs, i);
        ck_assert_int_eq(json_integer_value(json_object_get(q, "status")), want[i]);
        ck_assert_str_eq(jstr(q, "trace_id"), "ins-retry");
    }
    json_decref(reqs);
    down(&e);
}
END_TEST

START_TEST(permanent_error_not_retried) {
    env e;
    up(&e);
    fake_dify_behaviour b = {.status = 400, .code = "app_unavailable"};
    fake_dify_push(e.fake, &b);
    char *ev = h_event("signup", "user-1", "ins-perm");
    h_resp *r = h_post_signed(e.srv, ev);
    assert_accepted(r, 1, 0, 0);
    h_resp_free(r);
    free(ev);

    ck_assert_uint_eq(fake_dify_wait_count(e.fake, 1, DELIVERY_TIMEOUT_MS), 1);
    h_sleep_ms(QUIET_MS);
    ck_assert_uint_eq(fake_dify_count(e.fake), 1);
    ck_assert_uint_eq(fake_dify_delivered(e.fake), 0);
    down(&e);
}
END_TEST

/* Accepted while Dify is unreachable, then the server is killed without a
 * chance to clean up: the spool still has the event, and the restarted
 * server delivers it exactly once. */
START_TEST(survives_kill_while_dify_down) {
    h_opts o = {.dify_port = 0}; /* a port where nothing listens yet */
    h_server *srv = h_server_start(&o);
    ck_assert_msg(srv != NULL, "amp2dify did not start (see its log above)");
    char *ev = h_event("signup", "user-1", "ins-crash");
    h_resp *r = h_post_signed(srv, ev);
    assert_accepted(r, 1, 0, 0);
    h_resp_free(r);
    free(ev);

    h_sleep_ms(500); /* a few failed attempts against the closed port */
    int st = h_server_kill(srv, SIGKILL, 0);
    ck_assert_msg(WIFSIGNALED(st) && WTERMSIG(st) == SIGKILL, "wait status %d", st);

    fake_dify *fake = fake_dify_start(h_server_dify_port(srv), H_API_KEY);
    ck_assert_ptr_nonnull(fake);
    ck_assert_int_eq(h_server_restart(srv), 0);

    ck_assert_uint_eq(fake_dify_wait_delivered(fake, 1, DELIVERY_TIMEOUT_MS), 1);
    h_sleep_ms(QUIET_MS);
    ck_assert_uint_eq(fake_dify_count(fake), 1);
    json_t *reqs = fake_dify_requests(fake);
    ck_assert_str_eq(jstr(json_array_get(reqs, 0), "trace_id"), "ins-crash");
    json_decref(reqs);
    stop_clean(srv);
    fake_dify_stop(fake);
}
END_TEST

/* SIGTERM while Dify sits on a request: the server ends it after its share
 * of shutdown_timeout_seconds, exits 0 well within the timeout, and the
 * event is delivered once after the restart. */
START_TEST(sigterm_bounded_while_dify_is_slow) {
    env e;
    up_with(&e, "{\"listen\": {\"address\": \"127.0.0.1\", \"port\": @PORT@},"
                " \"shutdown_timeout_seconds\": 4,"
                " \"spool\": {\"path\": \"@DIR@/spool.db\"},"
                " \"dify\": {\"base_url\": \"http://127.0.0.1:@DIFY_PORT@/v1\","
                " \"timeout_seconds\": 600},"
                " \"apps\": {\"a\": {\"api_key_env\": \"DIFY_API_KEY\"}},"
                " \"routes\": [{\"name\": \"all\", \"app\": \"a\"}]}");
    fake_dify_behaviour slow = {.delay_ms = 60000};
    fake_dify_push(e.fake, &slow);
    char *ev = h_event("signup", "user-1", "ins-slow");
    h_resp *r = h_post_signed(e.srv, ev);
    assert_accepted(r, 1, 0, 0);
    h_resp_free(r);
    free(ev);
    /* The request reaches the fake, which sits on it. */
    ck_assert_uint_eq(fake_dify_wait_arrived(e.fake, 1, 10000), 1);

    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    int st = h_server_kill(e.srv, SIGTERM, 15000);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    long ms = (t1.tv_sec - t0.tv_sec) * 1000 + (t1.tv_nsec - t0.tv_nsec) / 1000000;
    ck_assert_msg(WIFEXITED(st) && WEXITSTATUS(st) == 0, "wait status %d", st);
    ck_assert_msg(ms < 4000, "exit took %ld ms (shutdown_timeout_seconds is 4)", ms);
    ck_assert(h_server_log_wait(e.srv, "dify request abandoned at shutdown", 1000));

    ck_assert_int_eq(h_server_restart(e.srv), 0);
    ck_assert_uint_eq(fake_dify_wait_delivered(e.fake, 1, DELIVERY_TIMEOUT_MS), 1);
    h_sleep_ms(QUIET_MS / 2);
    ck_assert_uint_eq(fake_dify_delivered(e.fake), 1);
    down(&e);
}
END_TEST

static Suite *suite(void) {
    Suite *s = suite_create("foundation");
    TCase *tc = tcase_create("foundation");
    /* Each test starts a server and waits for deliveries; sanitizer builds
     * are several times slower. */
    tcase_set_timeout(tc, 90);
    tcase_add_test(tc, health_and_routing);
    tcase_add_test(tc, sigterm_exits_zero);
    tcase_add_test(tc, sigterm_lets_requests_in_flight_finish);
    tcase_add_test(tc, signed_event_reaches_dify);
    tcase_add_test(tc, array_of_three);
    tcase_add_test(tc, duplicate_insert_id_counted_once);
    tcase_add_test(tc, bad_signatures_rejected);
    tcase_add_test(tc, invalid_bodies_rejected);
    tcase_add_test(tc, body_too_large);
    tcase_add_test(tc, too_many_events_rejected);
    tcase_add_test(tc, retries_until_success);
    tcase_add_test(tc, permanent_error_not_retried);
    tcase_add_test(tc, survives_kill_while_dify_down);
    tcase_add_test(tc, sigterm_bounded_while_dify_is_slow);
    suite_add_tcase(s, tc);
    return s;
}

int main(void) {
    return amp_check_run(suite());
}
