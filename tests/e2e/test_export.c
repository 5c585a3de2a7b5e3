/*
 * End-to-end Export API source: `amp2dify export` against the fake
 * Amplitude (real-format zips), stored in the spool, delivered by `serve`
 * into the fake Dify.
 *
 *   backfill_three_days  72 hours (several parts, several gzip members,
 *       empty hours, a 12-hour block with no data: 404, two lines to refuse:
 *       logged and counted, the rest stored), a 504 first, ranges
 *       over 12 hours answered 400 "too large": every event reaches Dify
 *       exactly once; a second run resumes after its cursor and asks
 *       nothing; a --restart run stores nothing new (all duplicates)
 *   kill_resumes_at_the_hour  kill -9 in the middle of a backfill: the next
 *       run's first request is the hour after the cursor, and every event
 *       reaches Dify exactly once
 *   bad_keys_stop  401: exit 1 with a message naming the keys, one request
 *   serve_polls  sources.export.enabled in serve: the hours from
 *       sources.export.start to the last complete one are stored and
 *       delivered, the cursor file names the last, the metrics count them
 */
#include <check.h>
#include <curl/curl.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "../../base/alloc.h"
#include "../../base/buf.h"
#include "../fake_amplitude/fake_amplitude.h"
#include "../fake_dify/fake_dify.h"
#include "../check_run.h"
#include "harness.h"

#define AMP_KEY "amp-api-key"
#define AMP_SECRET "amp-secret-key"
/* 2026-11-01T00:00Z in hours since the epoch. */
#define NOV1 ((int64_t)1793491200 / 3600)

/* Every event to the one app; the query is the event's time, unique per
 * event here, so a duplicate delivery shows. */
static char *config(uint16_t amp_port, unsigned hours_per_request) {
    return amp_xasprintf(
        "{\n"
        "  \"listen\": {\"address\": \"127.0.0.1\", \"port\": @PORT@},\n"
        "  \"spool\": {\"path\": \"@DIR@/spool.db\"},\n"
        "  \"dify\": {\"base_url\": \"http://127.0.0.1:@DIFY_PORT@/v1\", \"workers\": 4,\n"
        "           \"retry\": {\"initial_ms\": 50, \"max_ms\": 200}},\n"
        "  \"sources\": {\"export\": {\"base_url\": \"http://127.0.0.1:%u\",\n"
        "      \"hours_per_request\": %u, \"min_request_interval_ms\": 0,\n"
        "      \"retry_initial_ms\": 50, \"max_attempts\": 4, \"batch_events\": 7}},\n"
        "  \"apps\": {\"support\": {\"api_key_env\": \"DIFY_API_KEY\", \"endpoint\": \"chat\"}},\n"
        "  \"routes\": [{\"name\": \"all\", \"app\": \"support\",\n"
        "              \"query\": \"{{event_time}} {{event_type}}\",\n"
        "              \"user\": \"{{device_id}}\"}]\n"
        "}\n",
        (unsigned)amp_port, hours_per_request);
}

/* Run `amp2dify export` (server stopped) and return its output (stderr
 * included); *status gets the exit status. Caller owns. */
static char *run_export(const h_server *s, const char *start, const char *end, const char *extra,
                        int *status) {
    char *cmd = amp_xasprintf("%s export -c %s/amp2dify.json --start %s --end %s %s 2>&1", h_bin(),
                              h_server_dir(s), start, end, extra ? extra : "");
    FILE *p = popen(cmd, "r");
    ck_assert_ptr_nonnull(p);
    amp_buf out;
    amp_buf_init(&out, 16 << 20);
    amp_buf_read(&out, p);
    int st = pclose(p);
    *status = WIFEXITED(st) ? WEXITSTATUS(st) : -1;
    free(cmd);
    char *text = amp_xstrdup(out.data ? out.data : "");
    amp_buf_free(&out);
    return text;
}

/* The JSON log line whose msg is msg, from output; caller owns; NULL if none. */
static json_t *log_line(const char *output, const char *msg) {
    const char *p = output;
    while (p && *p) {
        const char *nl = strchr(p, '\n');
        size_t len = nl ? (size_t)(nl - p) : strlen(p);
        json_t *j = json_loadb(p, len, 0, NULL);
        if (j && json_is_string(json_object_get(j, "msg")) &&
            strcmp(json_string_value(json_object_get(j, "msg")), msg) == 0)
            return j;
        json_decref(j);
        p = nl ? nl + 1 : NULL;
    }
    return NULL;
}

static json_int_t field(const json_t *line, const char *name) {
    return json_integer_value(json_object_get(line, name));
}

/* Every query Dify received is distinct, and there are n of them. */
static void assert_once_each(fake_dify *d, size_t n) {
    json_t *reqs = fake_dify_requests(d);
    json_t *seen = json_object();
    size_t i, delivered = 0;
    json_t *r;
    json_array_foreach(reqs, i, r) {
        if (!json_is_true(json_object_get(r, "delivered")))
            continue;
        delivered++;
        const char *q = json_string_value(json_object_get(json_object_get(r, "body"), "query"));
        ck_assert_ptr_nonnull(q);
        ck_assert_msg(json_object_get(seen, q) == NULL, "'%s' delivered twice", q);
        json_object_set_new(seen, q, json_true());
    }
    ck_assert_uint_eq(delivered, n);
    json_decref(seen);
    json_decref(reqs);
}

static h_server *start_server(const char *cfg, fake_dify *d) {
    static const char *const env[] = {"AMPLITUDE_API_KEY=" AMP_KEY,
                                      "AMPLITUDE_SECRET_KEY=" AMP_SECRET, NULL};
    h_opts o = {.config_json = cfg, .dify_port = fake_dify_port(d), .env = env};
    h_server *s = h_server_start(&o);
    ck_assert_msg(s != NULL, "amp2dify did not start");
    return s;
}

START_TEST(backfill_three_days) {
    setenv("AMPLITUDE_API_KEY", AMP_KEY, 1);
    setenv("AMPLITUDE_SECRET_KEY", AMP_SECRET, 1);
    fake_amplitude *a = fake_amplitude_start(0, AMP_KEY, AMP_SECRET);
    ck_assert_ptr_nonnull(a);
    size_t total = 0;
    for (int64_t h = 0; h < 72; h++) {
        if (h % 5 == 4 || (h >= 36 && h < 48)) /* empty hours, and 12 in a row: 404 */
            continue;
        unsigned n = 5 + (unsigned)(h % 4) * 3;
        fake_amplitude_export_hour(a, NOV1 + h, n, 1 + (unsigned)(h % 3),
                                   1 + (unsigned)(h % 2) * 2);
        total += n;
    }
    fake_amplitude_export_bad_lines(a, NOV1 + 1); /* refused, the rest stored */
    fake_amplitude_export_max_hours(a, 12);
    fake_amplitude_export_push_status(a, 504);
    fake_dify *d = fake_dify_start(0, H_API_KEY);
    ck_assert_ptr_nonnull(d);
    char *cfg = config(fake_amplitude_port(a), 24);
    h_server *s = start_server(cfg, d);
    ck_assert_int_eq(h_server_kill(s, SIGTERM, 10000) >= 0, 1);

    int st;
    char *out = run_export(s, "2026-11-01T00", "2026-11-03T23", NULL, &st);
    ck_assert_msg(st == 0, "export failed (%d): %s", st, out);
    json_t *done = log_line(out, "export done");
    ck_assert_msg(done != NULL, "no summary: %s", out);
    ck_assert_int_eq(field(done, "hours"), 72);
    ck_assert_int_eq(field(done, "events"), (json_int_t)total + 2);
    ck_assert_int_eq(field(done, "accepted"), (json_int_t)total);
    ck_assert_int_eq(field(done, "duplicates"), 0);
    ck_assert_int_eq(field(done, "rejected"), 2);
    ck_assert_msg(strstr(out, "\"msg\":\"export event rejected\"") != NULL, "%s", out);
    json_decref(done);
    free(out);

    /* 504 then retried; 24 hours too large, split into 12s; the empty block 404. */
    json_t *reqs = fake_amplitude_export_requests(a);
    ck_assert_int_eq(json_integer_value(json_object_get(json_array_get(reqs, 0), "status")), 504);
    ck_assert_int_eq(json_integer_value(json_object_get(json_array_get(reqs, 1), "status")), 400);
    size_t i, n404 = 0, n200 = 0;
    json_t *r;
    json_array_foreach(reqs, i, r) {
        int code = (int)json_integer_value(json_object_get(r, "status"));
        n404 += code == 404;
        n200 += code == 200;
    }
    ck_assert_uint_eq(n404, 1);
    ck_assert_uint_eq(n200, 5);
    size_t asked = json_array_size(reqs);
    json_decref(reqs);

    ck_assert_int_eq(h_server_restart(s), 0);
    ck_assert_uint_eq(fake_dify_wait_delivered(d, total, 60000), total);
    h_sleep_ms(300);
    assert_once_each(d, total);
    ck_assert_int_eq(h_server_kill(s, SIGTERM, 10000) >= 0, 1);

    /* Again: the cursor says the range is done, nothing is asked. */
    out = run_export(s, "2026-11-01T00", "2026-11-03T23", NULL, &st);
    ck_assert_msg(st == 0, "second export failed (%d): %s", st, out);
    reqs = fake_amplitude_export_requests(a);
    ck_assert_uint_eq(json_array_size(reqs), asked);
    json_decref(reqs);
    free(out);

    /* --restart fetches it all again: every event a duplicate. */
    out = run_export(s, "2026-11-01T00", "2026-11-03T23", "--restart", &st);
    ck_assert_msg(st == 0, "restarted export failed (%d): %s", st, out);
    done = log_line(out, "export done");
    ck_assert_msg(done != NULL, "no summary: %s", out);
    ck_assert_int_eq(field(done, "accepted"), 0);
    ck_assert_int_eq(field(done, "duplicates"), (json_int_t)total);
    json_decref(done);
    free(out);
    ck_assert_int_eq(h_server_restart(s), 0);
    h_sleep_ms(500);
    assert_once_each(d, total);

    char *why = h_server_stop_clean(s);
    ck_assert_msg(why == NULL, "%s", why);
    free(cfg);
    fake_dify_stop(d);
    fake_amplitude_stop(a);
}
END_TEST

static int64_t read_cursor(const char *path) {
    FILE *f = fopen(path, "r");
    if (!f)
        return -1;
    char line[32] = "";
    int64_t h = -1;
    if (fgets(line, sizeof line, f)) {
        struct tm tm = {0};
        if (sscanf(line, "%4d%2d%2dT%2d", &tm.tm_year, &tm.tm_mon, &tm.tm_mday, &tm.tm_hour) == 4) {
            tm.tm_year -= 1900;
            tm.tm_mon -= 1;
            h = (int64_t)timegm(&tm) / 3600;
        }
    }
    fclose(f);
    return h;
}

START_TEST(kill_resumes_at_the_hour) {
    setenv("AMPLITUDE_API_KEY", AMP_KEY, 1);
    setenv("AMPLITUDE_SECRET_KEY", AMP_SECRET, 1);
    fake_amplitude *a = fake_amplitude_start(0, AMP_KEY, AMP_SECRET);
    ck_assert_ptr_nonnull(a);
    for (int64_t h = 0; h < 24; h++)
        fake_amplitude_export_hour(a, NOV1 + h, 40, 2, 2);
    fake_amplitude_export_delay(a, 150);
    fake_dify *d = fake_dify_start(0, H_API_KEY);
    ck_assert_ptr_nonnull(d);
    char *cfg = config(fake_amplitude_port(a), 1);
    h_server *s = start_server(cfg, d);
    ck_assert_int_eq(h_server_kill(s, SIGTERM, 10000) >= 0, 1);

    char *conf = amp_xasprintf("%s/amp2dify.json", h_server_dir(s));
    char *cursor = amp_xasprintf("%s/spool.db.export-default-2026-11-01T00-2026-11-01T23.cursor",
                                 h_server_dir(s));
    char *logf = amp_xasprintf("%s/export1.log", h_server_dir(s));
    pid_t pid = fork();
    ck_assert_int_ge(pid, 0);
    if (pid == 0) {
        int fd = open(logf, O_WRONLY | O_CREAT | O_TRUNC, 0600);
        dup2(fd, 1);
        dup2(fd, 2);
        execl(h_bin(), h_bin(), "export", "-c", conf, "--start", "2026-11-01T00", "--end",
              "2026-11-01T23", (char *)NULL);
        _exit(127);
    }
    /* Kill it once a few hours are stored, in the middle of the next. */
    int64_t deadline = h_mono_ms() + 30000, c = -1;
    while (h_mono_ms() < deadline && (c = read_cursor(cursor)) < NOV1 + 4)
        h_sleep_ms(20);
    ck_assert_msg(c >= NOV1 + 4, "the cursor did not reach hour 4");
    h_sleep_ms(200);
    kill(pid, SIGKILL);
    int wst;
    waitpid(pid, &wst, 0);
    ck_assert(WIFSIGNALED(wst));
    int64_t at_kill = read_cursor(cursor);
    ck_assert_int_lt(at_kill, NOV1 + 23);
    json_t *earlier = fake_amplitude_export_requests(a);
    size_t before = json_array_size(earlier);
    json_decref(earlier);

    int st;
    char *out = run_export(s, "2026-11-01T00", "2026-11-01T23", NULL, &st);
    ck_assert_msg(st == 0, "resumed export failed (%d): %s", st, out);
    json_t *reqs = fake_amplitude_export_requests(a);
    json_t *first = json_array_get(reqs, before);
    ck_assert_ptr_nonnull(first);
    char want[16];
    time_t t = (time_t)((at_kill + 1) * 3600);
    struct tm tm;
    gmtime_r(&t, &tm);
    strftime(want, sizeof want, "%Y%m%dT%H", &tm);
    ck_assert_str_eq(json_string_value(json_object_get(first, "start")), want);
    json_decref(reqs);
    json_t *done = log_line(out, "export done");
    ck_assert_msg(done != NULL, "no summary: %s", out);
    ck_assert_int_eq(field(done, "hours"), NOV1 + 23 - at_kill);
    /* At most the hour under way at the kill was stored before. */
    ck_assert_int_le(field(done, "duplicates"), 40);
    json_decref(done);
    free(out);

    ck_assert_int_eq(h_server_restart(s), 0);
    ck_assert_uint_eq(fake_dify_wait_delivered(d, 24 * 40, 60000), 24 * 40);
    h_sleep_ms(300);
    assert_once_each(d, 24 * 40);
    char *why = h_server_stop_clean(s);
    ck_assert_msg(why == NULL, "%s", why);
    free(conf);
    free(cursor);
    free(logf);
    free(cfg);
    fake_dify_stop(d);
    fake_amplitude_stop(a);
}
END_TEST

START_TEST(bad_keys_stop) {
    setenv("AMPLITUDE_API_KEY", AMP_KEY, 1);
    setenv("AMPLITUDE_SECRET_KEY", "wrong-secret", 1);
    fake_amplitude *a = fake_amplitude_start(0, AMP_KEY, AMP_SECRET);
    ck_assert_ptr_nonnull(a);
    fake_amplitude_export_hour(a, NOV1, 5, 1, 1);
    fake_dify *d = fake_dify_start(0, H_API_KEY);
    char *cfg = config(fake_amplitude_port(a), 24);
    h_server *s = start_server(cfg, d);
    ck_assert_int_eq(h_server_kill(s, SIGTERM, 10000) >= 0, 1);
    int st;
    char *out = run_export(s, "2026-11-01T00", "2026-11-01T05", NULL, &st);
    ck_assert_int_eq(st, 1);
    ck_assert_msg(strstr(out, "AMPLITUDE_SECRET_KEY") != NULL, "%s", out);
    json_t *reqs = fake_amplitude_export_requests(a);
    ck_assert_uint_eq(json_array_size(reqs), 1);
    json_decref(reqs);
    free(out);
    h_server_stop(s);
    free(cfg);
    fake_dify_stop(d);
    fake_amplitude_stop(a);
}
END_TEST

START_TEST(serve_polls) {
    fake_amplitude *a = fake_amplitude_start(0, AMP_KEY, AMP_SECRET);
    ck_assert_ptr_nonnull(a);
    int64_t now_h = (int64_t)time(NULL) / 3600;
    for (int64_t h = now_h - 3; h < now_h; h++)
        fake_amplitude_export_hour(a, h, 6, 2, 2);
    fake_amplitude_export_hour(a, now_h, 6, 1, 1); /* not complete yet: not asked */
    fake_dify *d = fake_dify_start(0, H_API_KEY);
    ck_assert_ptr_nonnull(d);
    char start[16];
    time_t t = (time_t)((now_h - 3) * 3600);
    struct tm tm;
    gmtime_r(&t, &tm);
    strftime(start, sizeof start, "%Y-%m-%dT%H", &tm);
    char *base = config(fake_amplitude_port(a), 24);
    char *at = strstr(base, "\"hours_per_request\"");
    ck_assert_ptr_nonnull(at);
    char *cfg = amp_xasprintf("%.*s\"enabled\": true, \"lag_hours\": 0, \"interval_seconds\": 1, "
                              "\"start\": \"%s\", %s",
                              (int)(at - base), base, start, at);
    h_server *s = start_server(cfg, d);
    ck_assert_uint_eq(fake_dify_wait_delivered(d, 18, 30000), 18);
    char *cursor = amp_xasprintf("%s/spool.db.export-default.cursor", h_server_dir(s));
    int64_t deadline = h_mono_ms() + 10000;
    while (h_mono_ms() < deadline && read_cursor(cursor) != now_h - 1)
        h_sleep_ms(50);
    ck_assert_int_eq(read_cursor(cursor), now_h - 1);
    /* The counters follow the cursor file by a moment. */
    h_resp *m = NULL;
    deadline = h_mono_ms() + 10000;
    do {
        h_resp_free(m);
        m = h_get(s, "/metrics");
        if (strstr(m->body, "amp2dify_export_hours_total 3\n") &&
            strstr(m->body, "amp2dify_export_events_total{outcome=\"accepted\"} 18\n"))
            break;
        h_sleep_ms(50);
    } while (h_mono_ms() < deadline);
    const char *fam = strstr(m->body, "amp2dify_export_");
    ck_assert_msg(strstr(m->body, "amp2dify_export_hours_total 3\n") != NULL, "%.1500s", fam);
    ck_assert_msg(strstr(m->body, "amp2dify_export_events_total{outcome=\"accepted\"} 18\n"),
                  "%.1500s", fam);
    h_resp_free(m);
    h_sleep_ms(1500); /* another poll or two: nothing new */
    ck_assert_uint_eq(fake_dify_delivered(d), 18);
    char *why = h_server_stop_clean(s);
    ck_assert_msg(why == NULL, "%s", why);
    free(cursor);
    free(cfg);
    free(base);
    fake_dify_stop(d);
    fake_amplitude_stop(a);
}
END_TEST

static Suite *export_suite(void) {
    Suite *s = suite_create("export");
    TCase *tc = tcase_create("export");
    tcase_set_timeout(tc, 150);
    tcase_add_test(tc, backfill_three_days);
    tcase_add_test(tc, kill_resumes_at_the_hour);
    tcase_add_test(tc, bad_keys_stop);
    tcase_add_test(tc, serve_polls);
    suite_add_tcase(s, tc);
    return s;
}

int main(void) {
    if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK)
        return 1;
    int rc = amp_check_run(export_suite());
    curl_global_cleanup();
    return rc;
}
