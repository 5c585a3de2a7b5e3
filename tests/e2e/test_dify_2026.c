/*
 * End-to-end: Dify as it is in 2026 (Service API 1.14-1.16), the real
 * amp2dify ($AMP2DIFY_BIN) against the in-process fake Dify.
 *
 *   online_check        check-config --online names each mismatch with its
 *                       JSON path (endpoint for another mode, unknown input,
 *                       unmapped required variable, constant outside a
 *                       select's options) and exits 2; a fitting config is
 *                       ok; an unreachable Dify is an error there
 *   start_validation    dify.validate: warn logs and starts, strict refuses
 *                       to start, an unreachable Dify never blocks a start;
 *                       a SIGHUP under strict rejects a config that does
 *                       not fit
 *   resume_after_drop   a workflow stream dropped after its run id: the run
 *                       is followed through /workflow/{run}/events, posted
 *                       once; a run still going when the resume times out
 *                       is resumed by the retry, still posted once
 *   waiting_for_input   workflow_paused / human_input_required (stream and
 *                       blocking): state waiting_input in `dlq list
 *                       --waiting`, a metric, never retried nor dead
 *   outcomes_2026       conversation_completed starts a new conversation;
 *                       429 rate_limit_error pauses the app (probes 1 s
 *                       apart although retry.max_ms is 100); 429
 *                       too_many_requests, a non-JSON 429, 400 "Too many
 *                       requests", 500 retried; Retry-After in RFC 850
 *                       form honoured; X-Trace-Id derived for odd keys
 *   pinned_versions     workflow_id: POST /workflows/{id}/run, and the
 *                       chatflow body's "workflow_id"
 */
#include <check.h>
#include <curl/curl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "../../base/alloc.h"
#include "../../base/buf.h"
#include "../fake_dify/fake_dify.h"
#include "checked.h"
#include "harness.h"
#include "../check_run.h"

#define WF_VERSION "7c3e33d4-2a8b-4e5f-9b1a-d3c6e8f12345"

/* ---- helpers ---------------------------------------------------------------- */

static void post_event(const h_server *s, const char *type, const char *user, const char *id) {
    char *ev = h_event(type, user, id);
    h_resp *r = h_post_signed(s, ev);
    ck_assert_msg(r->status == 202, "webhook answered %ld: %s", r->status, r->body);
    h_resp_free(r);
    free(ev);
}

static const char *jstr(const json_t *o, const char *key) {
    return json_string_value(json_object_get(o, key));
}

/* Run a shell command; its exit code, and its output in *out (caller owns). */
static int run(const char *cmd, char **out) {
    FILE *p = popen(cmd, "r");
    ck_assert_ptr_nonnull(p);
    amp_buf b;
    amp_buf_init(&b, 4 << 20);
    amp_buf_append(&b, "", 0);
    char chunk[4096];
    size_t n;
    while ((n = fread(chunk, 1, sizeof chunk, p)) > 0)
        amp_buf_append(&b, chunk, n);
    int st = pclose(p);
    *out = b.data;
    return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

/* `amp2dify dlq list --json [--waiting]` for the server's config. */
static json_t *dlq_list(const h_server *s, bool waiting) {
    char *cmd = amp_xasprintf("%s dlq list --json %s -c %s/amp2dify.json 2>&1", h_bin(),
                              waiting ? "--waiting" : "", h_server_dir(s));
    char *out;
    int rc = run(cmd, &out);
    ck_assert_msg(rc == 0, "dlq list failed (%d): %s", rc, out);
    json_t *j = json_array();
    for (char *line = out, *nl; line && *line; line = nl ? nl + 1 : NULL) {
        nl = strchr(line, '\n');
        size_t len = nl ? (size_t)(nl - line) : strlen(line);
        if (!len)
            continue;
        json_t *row = json_loadb(line, len, 0, NULL);
        ck_assert_msg(json_is_object(row), "dlq list printed '%.*s'", (int)len, line);
        json_array_append_new(j, row);
    }
    free(out);
    free(cmd);
    return j;
}

/* Recorded requests whose path starts with prefix (and, when needle is not
 * NULL, whose raw body contains it); caller owns. */
static json_t *records(fake_dify *f, const char *prefix, const char *needle) {
    json_t *all = fake_dify_requests(f), *out = json_array();
    size_t i;
    json_t *r;
    json_array_foreach(all, i, r) {
        const char *path = jstr(r, "path"), *raw = jstr(r, "raw_body");
        if (path && strncmp(path, prefix, strlen(prefix)) == 0 &&
            (!needle || (raw && strstr(raw, needle))))
            json_array_append(out, r);
    }
    json_decref(all);
    return out;
}

/* Poll (bounded) until the fake counted n deliveries. */
static void wait_delivered(fake_dify *f, size_t n, unsigned ms) {
    size_t got = fake_dify_wait_delivered(f, n, ms);
    ck_assert_msg(got >= n, "%zu of %zu delivered within %u ms", got, n, ms);
}

/* ---- check-config --online ------------------------------------------------- */

#define FORM                                                                                       \
    "[{\"text-input\": {\"label\": \"City\", \"variable\": \"city\", \"required\": true,"          \
    " \"max_length\": 48, \"default\": \"\"}},"                                                    \
    " {\"select\": {\"label\": \"Tier\", \"variable\": \"tier\", \"required\": false,"             \
    " \"options\": [\"bronze\", \"silver\"], \"default\": \"\"}},"                                 \
    " {\"paragraph\": {\"label\": \"Note\", \"variable\": \"note\", \"required\": false}}]"

/* One workflow app whose route fits nothing; one chat app that is fine. */
static const char bad_config[] =
    "{\"listen\": {\"address\": \"127.0.0.1\", \"port\": @PORT@},\n"
    " \"spool\": {\"path\": \"@DIR@/spool.db\"},\n"
    " \"dify\": {\"base_url\": \"http://127.0.0.1:@DIFY_PORT@/v1\", \"validate\": \"@VALIDATE@\","
    " \"retry\": {\"initial_ms\": 20, \"max_ms\": 100}},\n"
    " \"apps\": {\"flow\": {\"api_key_env\": \"DIFY_API_KEY\", \"endpoint\": \"workflow\"},\n"
    "          \"chat\": {\"api_key_env\": \"CHAT_KEY\", \"endpoint\": \"chat\"}},\n"
    " \"routes\": [\n"
    "  {\"name\": \"flow\", \"app\": \"flow\", \"map\": [\n"
    "     {\"source\": \"event_properties.plan\", \"target\": \"plan\"},\n"
    "     {\"value\": \"gold\", \"target\": \"tier\"}]},\n"
    "  {\"name\": \"chat\", \"app\": \"chat\", \"map\": [\n"
    "     {\"source\": \"event_properties.city\", \"target\": \"city\"},\n"
    "     {\"value\": \"silver\", \"target\": \"tier\"}]}]}\n";

static const char good_config[] =
    "{\"listen\": {\"address\": \"127.0.0.1\", \"port\": @PORT@},\n"
    " \"spool\": {\"path\": \"@DIR@/spool.db\"},\n"
    " \"dify\": {\"base_url\": \"http://127.0.0.1:@DIFY_PORT@/v1\", \"validate\": \"@VALIDATE@\","
    " \"retry\": {\"initial_ms\": 20, \"max_ms\": 100}},\n"
    " \"apps\": {\"flow\": {\"api_key_env\": \"DIFY_API_KEY\", \"endpoint\": \"chat\"},\n"
    "          \"chat\": {\"api_key_env\": \"CHAT_KEY\", \"endpoint\": \"chat\"}},\n"
    " \"routes\": [\n"
    "  {\"name\": \"flow\", \"app\": \"flow\", \"map\": [\n"
    "     {\"source\": \"event_properties.city\", \"target\": \"city\"},\n"
    "     {\"value\": \"bronze\", \"target\": \"tier\"}]},\n"
    "  {\"name\": \"chat\", \"app\": \"chat\", \"map\": [\n"
    "     {\"source\": \"event_properties.city\", \"target\": \"city\"}]}]}\n";

static char *fill(const char *tmpl, const char *from, const char *to) {
    amp_buf b;
    amp_buf_init(&b, 1 << 20);
    amp_buf_append(&b, "", 0);
    size_t n = strlen(from);
    for (const char *p = tmpl; *p;) {
        const char *q = strstr(p, from);
        if (!q) {
            amp_buf_append(&b, p, strlen(p));
            break;
        }
        amp_buf_append(&b, p, (size_t)(q - p));
        amp_buf_append(&b, to, strlen(to));
        p = q + n;
    }
    return b.data;
}

/* check-config --online on config (placeholders filled); exit code, output. */
static int check_online(const char *config, uint16_t dify_port, char **out) {
    char dir[] = "/tmp/amp2dify-online-XXXXXX";
    ck_assert_ptr_nonnull(mkdtemp(dir));
    char port[16];
    snprintf(port, sizeof port, "%u", dify_port);
    char *a = fill(config, "@DIFY_PORT@", port);
    char *b = fill(a, "@PORT@", "0");
    char *c = fill(b, "@DIR@", dir);
    char *text = fill(c, "@VALIDATE@", "warn");
    char *file = amp_xasprintf("%s/amp2dify.json", dir);
    FILE *fp = fopen(file, "w");
    ck_assert_ptr_nonnull(fp);
    fputs(text, fp);
    fclose(fp);
    char *cmd = amp_xasprintf("env AMP2DIFY_SECRETS=" H_SECRET " DIFY_API_KEY=" H_API_KEY
                              " CHAT_KEY=app-chat-key %s check-config --online -c %s 2>&1",
                              h_bin(), file);
    int rc = run(cmd, out);
    unlink(file);
    rmdir(dir);
    free(cmd);
    free(file);
    free(text);
    free(c);
    free(b);
    free(a);
    return rc;
}

static void setup_apps(fake_dify *f) {
    fake_dify_set_app(f, H_API_KEY, "chat", FORM);
    fake_dify_add_key(f, "app-chat-key");
    fake_dify_set_app(f, "app-chat-key", "advanced-chat", FORM);
}

START_TEST(online_check) {
    fake_dify *f = h_fake_start();
    setup_apps(f);
    char *out;
    int rc = check_online(bad_config, fake_dify_port(f), &out);
    ck_assert_msg(rc == 2, "exit %d: %s", rc, out);
    const char *want[] = {
        "apps.flow.endpoint: found 'workflow' for a Dify app of mode 'chat'; expected 'chat'",
        "routes[0].map[0].target: found 'plan', an input the app does not have; expected one of "
        "the app's variables: city, tier, note",
        "routes[0].map[1].value: found 'gold'; expected one of the options of 'tier': bronze, "
        "silver",
        "routes[0].map: found no mapping for the required variable 'city'; expected a mapping "
        "with target 'city'",
    };
    for (size_t i = 0; i < sizeof want / sizeof want[0]; i++)
        ck_assert_msg(strstr(out, want[i]), "missing '%s' in:\n%s", want[i], out);
    /* The chat route fits: nothing about routes[1]. */
    ck_assert_msg(!strstr(out, "routes[1]"), "routes[1] reported:\n%s", out);
    ck_assert_uint_ge(fake_dify_meta_count(f), 4); /* /info and /parameters of both apps */
    free(out);

    rc = check_online(good_config, fake_dify_port(f), &out);
    ck_assert_msg(rc == 0 && strstr(out, "checked against Dify"), "exit %d: %s", rc, out);
    free(out);

    /* A constant longer than the variable's max_length. */
    char *longer = fill(good_config, "\"value\": \"bronze\", \"target\": \"tier\"",
                        "\"value\": \"0123456789012345678901234567890123456789012345678\", "
                        "\"target\": \"city\"");
    char *nocity =
        fill(longer, "{\"source\": \"event_properties.city\", \"target\": \"city\"},", "");
    rc = check_online(nocity, fake_dify_port(f), &out);
    ck_assert_msg(rc == 2 && strstr(out, "routes[0].map[0].value: found 49 characters; expected "
                                         "at most 48 (max_length of 'city')"),
                  "exit %d: %s", rc, out);
    free(out);
    free(nocity);
    free(longer);

    /* Nobody there: --online cannot vouch for the config. */
    uint16_t nobody = h_free_port();
    rc = check_online(good_config, nobody, &out);
    ck_assert_msg(rc == 2 && strstr(out, "apps.flow: GET http://127.0.0.1:"), "exit %d: %s", rc,
                  out);
    free(out);
    fake_dify_stop(f);
}
END_TEST

/* ---- validation at start and on SIGHUP --------------------------------------- */

static h_server *start_validating(const char *config, const char *mode, uint16_t dify_port,
                                  bool wait) {
    char *text = fill(config, "@VALIDATE@", mode);
    const char *env[] = {"CHAT_KEY=app-chat-key", NULL};
    h_opts o = {.config_json = text, .dify_port = dify_port, .env = env, .no_wait = !wait};
    h_server *s = h_server_start(&o);
    free(text);
    ck_assert_msg(s != NULL, "amp2dify did not start");
    return s;
}

START_TEST(start_validation) {
    fake_dify *f = h_fake_start();
    setup_apps(f);

    /* warn: starts, and says what does not fit, with the paths. */
    h_server *s = start_validating(bad_config, "warn", fake_dify_port(f), true);
    json_t *lines = h_server_log_lines(s, "dify app does not fit the config");
    ck_assert_uint_eq(json_array_size(lines), 4);
    ck_assert_str_eq(jstr(json_array_get(lines, 0), "level"), "warn");
    char *log = h_server_log(s);
    ck_assert_ptr_nonnull(strstr(log, "routes[0].map[1].value: found 'gold'"));
    ck_assert_ptr_null(strstr(log, H_API_KEY)); /* never the key */
    free(log);
    json_decref(lines);
    h_server_stop_ok(s);

    /* strict: refuses to start (exit 2). */
    s = start_validating(bad_config, "strict", fake_dify_port(f), false);
    int st = h_server_wait_exit(s, 10000);
    ck_assert_msg(st >= 0 && WIFEXITED(st) && WEXITSTATUS(st) == 2, "wait status %d", st);
    ck_assert(h_server_log_wait(s, "not starting: dify.validate is strict", 1000));
    h_server_stop(s);

    /* strict, Dify unreachable: a warning, and it starts anyway. */
    s = start_validating(bad_config, "strict", h_free_port(), true);
    ck_assert(h_server_log_wait(s, "\"msg\":\"dify app not checked\"", 1000));
    h_server_stop_ok(s);

    /* strict and fitting: starts; a SIGHUP with a config that does not fit
     * is rejected and the running one stays. */
    s = start_validating(good_config, "strict", fake_dify_port(f), true);
    char *file = amp_xasprintf("%s/amp2dify.json", h_server_dir(s));
    char port[16];
    snprintf(port, sizeof port, "%u", h_server_port(s));
    char dport[16];
    snprintf(dport, sizeof dport, "%u", fake_dify_port(f));
    char *a = fill(bad_config, "@PORT@", port);
    char *b = fill(a, "@DIR@", h_server_dir(s));
    char *c = fill(b, "@DIFY_PORT@", dport);
    char *text = fill(c, "@VALIDATE@", "strict");
    FILE *fp = fopen(file, "w");
    ck_assert_ptr_nonnull(fp);
    fputs(text, fp);
    fclose(fp);
    kill(h_server_pid(s), SIGHUP);
    ck_assert(h_server_log_wait(s, "dify.validate is strict and an app does not fit", 5000));
    lines = h_server_log_lines(s, "config reloaded");
    ck_assert_uint_eq(json_array_size(lines), 0);
    json_decref(lines);
    free(text);
    free(c);
    free(b);
    free(a);
    free(file);
    h_server_stop_ok(s);
    fake_dify_stop(f);
}
END_TEST

/* ---- streams that drop ---------------------------------------------------- */

static const char flow_config[] =
    "{\"listen\": {\"address\": \"127.0.0.1\", \"port\": @PORT@},\n"
    " \"spool\": {\"path\": \"@DIR@/spool.db\"},\n"
    " \"dify\": {\"base_url\": \"http://127.0.0.1:@DIFY_PORT@/v1\", \"timeout_seconds\": 1,\n"
    "          \"workers\": 1, \"validate\": \"off\","
    " \"retry\": {\"initial_ms\": 20, \"max_ms\": 100}},\n"
    " \"apps\": {\"flow\": {\"api_key_env\": \"DIFY_API_KEY\", \"endpoint\": \"workflow\",\n"
    "                     \"response_mode\": \"streaming\"},\n"
    "          \"block\": {\"api_key_env\": \"DIFY_API_KEY\", \"endpoint\": \"workflow\"}},\n"
    " \"routes\": [\n"
    "  {\"name\": \"flow\", \"app\": \"flow\",\n"
    "   \"filter\": {\"field\": \"event_type\", \"op\": \"prefix\", \"value\": \"Flow\"},\n"
    "   \"map\": [{\"source\": \"insert_id\", \"target\": \"id\"}], \"user\": \"{{user_id}}\"},\n"
    "  {\"name\": \"block\", \"app\": \"block\",\n"
    "   \"filter\": {\"field\": \"event_type\", \"op\": \"prefix\", \"value\": \"Block\"},\n"
    "   \"map\": [{\"source\": \"insert_id\", \"target\": \"id\"}], \"user\": \"{{user_id}}\"}]}\n";

START_TEST(resume_after_drop) {
    fake_dify *f = h_fake_start();
    h_server *s = h_server_start_with(flow_config, f);

    /* Dropped after workflow_started and node_started: Dify goes on with
     * the run; the relay follows it instead of posting again. */
    fake_dify_push(f, &(fake_dify_behaviour){.stream_drop_after = 2});
    post_event(s, "Flow", "u-drop", "drop-1");
    wait_delivered(f, 1, 10000);
    json_t *posts = records(f, "/v1/workflows/run", "drop-1");
    json_t *resumes = records(f, "/v1/workflow/", NULL);
    ck_assert_uint_eq(json_array_size(posts), 1);
    ck_assert_uint_eq(json_array_size(resumes), 1);
    /* The resume names the run the stream showed (the fake checks the user
     * too: another user's resume is a 404). */
    const char *resp = jstr(json_array_get(posts, 0), "response");
    const char *path = jstr(json_array_get(resumes, 0), "path");
    char run[37];
    ck_assert_int_eq(sscanf(path, "/v1/workflow/%36[0-9a-f-]/events", run), 1);
    ck_assert_ptr_nonnull(strstr(resp, run));
    ck_assert_int_eq(json_integer_value(json_object_get(json_array_get(resumes, 0), "status")),
                     200);
    /* Followed within the same attempt: no retry was needed. */
    ck_assert(h_metric_wait(s, "amp2dify_deliveries_total{app=\"flow\",outcome=\"delivered\"}", 1,
                            5000) == 1);
    ck_assert(h_metric(s, "amp2dify_deliveries_total{app=\"flow\",outcome=\"retried\"}") <= 0);
    json_decref(posts);
    json_decref(resumes);

    /* A run that takes 2.5 s and a 1 s timeout: the resumes time out, the
     * retry carries the run id, and a later attempt resumes it. Posted once. */
    fake_dify_reset(f);
    fake_dify_push(f, &(fake_dify_behaviour){.stream_drop_after = 1, .run_ms = 2500});
    post_event(s, "Flow", "u-slow", "slow-1");
    wait_delivered(f, 1, 15000);
    posts = records(f, "/v1/workflows/run", NULL);
    resumes = records(f, "/v1/workflow/", NULL);
    ck_assert_uint_eq(json_array_size(posts), 1);
    ck_assert_uint_ge(json_array_size(resumes), 3);
    ck_assert(h_metric_wait(s, "amp2dify_deliveries_total{app=\"flow\",outcome=\"retried\"}", 1,
                            5000) >= 1);
    json_decref(posts);
    json_decref(resumes);

    /* The key revoked between the drop and the resume: the app pauses with
     * the job held, and the probe after the pause resumes the run it saw
     * rather than posting the event again. */
    fake_dify_reset(f);
    fake_dify_push(f, &(fake_dify_behaviour){.stream_drop_after = 2, .revoke_key = true});
    post_event(s, "Flow", "u-revoked", "revoked-1");
    ck_assert(h_server_log_wait(s, "\"msg\":\"dify app paused\"", 10000));
    fake_dify_add_key(f, H_API_KEY);
    wait_delivered(f, 1, 15000);
    posts = records(f, "/v1/workflows/run", "revoked-1");
    resumes = records(f, "/v1/workflow/", NULL);
    ck_assert_uint_eq(json_array_size(posts), 1);
    ck_assert_uint_ge(json_array_size(resumes), 2); /* the refused one, then the probe */
    json_decref(posts);
    json_decref(resumes);

    /* A drop before any event: no run id, so the event is posted again. */
    fake_dify_reset(f);
    fake_dify_push(f, &(fake_dify_behaviour){.drop = true});
    post_event(s, "Flow", "u-early", "early-1");
    wait_delivered(f, 1, 10000);
    posts = records(f, "/v1/workflows/run", NULL);
    ck_assert_uint_eq(json_array_size(posts), 2);
    json_decref(posts);
    json_t *dead = dlq_list(s, false);
    ck_assert_uint_eq(json_array_size(dead), 0);
    json_decref(dead);
    h_server_stop_ok(s);
    fake_dify_stop(f);
}
END_TEST

/* ---- paused for human input --------------------------------------------------- */

START_TEST(waiting_for_input) {
    fake_dify *f = h_fake_start();
    h_server *s = h_server_start_with(flow_config, f);
    fake_dify_push(f, &(fake_dify_behaviour){.human_input = true});
    post_event(s, "Flow", "u-wait", "wait-stream");
    fake_dify_push(f, &(fake_dify_behaviour){.human_input = true});
    post_event(s, "Block", "u-wait2", "wait-block");

    json_t *rows = NULL;
    int64_t end = h_mono_ms() + 10000;
    while (h_mono_ms() < end) {
        json_decref(rows);
        rows = dlq_list(s, true);
        if (json_array_size(rows) >= 2)
            break;
        h_sleep_ms(50);
    }
    ck_assert_uint_eq(json_array_size(rows), 2);
    size_t i;
    json_t *row;
    json_array_foreach(rows, i, row) {
        ck_assert_str_eq(jstr(row, "state"), "waiting_input");
        ck_assert_str_eq(jstr(row, "code"), "waiting_input");
        const char *run = jstr(json_object_get(row, "result"), "workflow_run_id");
        ck_assert_msg(run && strlen(run) == 36, "no run id in %s", json_dumps(row, 0));
        ck_assert_int_eq(json_integer_value(json_object_get(row, "attempts")), 1);
    }
    json_decref(rows);
    /* Not dead, not retried, not pending. */
    h_sleep_ms(300);
    json_t *dead = dlq_list(s, false);
    ck_assert_uint_eq(json_array_size(dead), 0);
    json_decref(dead);
    ck_assert_uint_eq(fake_dify_count(f), 2);
    ck_assert(h_metric(s, "amp2dify_deliveries_total{app=\"flow\",outcome=\"waiting_input\"}") ==
              1);
    ck_assert(h_metric(s, "amp2dify_deliveries_total{app=\"block\",outcome=\"waiting_input\"}") ==
              1);
    ck_assert(h_metric(s, "amp2dify_spool_pending") == 0);
    /* The table form says so too. */
    char *cmd =
        amp_xasprintf("%s dlq list --waiting -c %s/amp2dify.json 2>&1", h_bin(), h_server_dir(s));
    char *out;
    ck_assert_int_eq(run(cmd, &out), 0);
    ck_assert_msg(strstr(out, "WAITING_SINCE") && strstr(out, "waiting_input"), "%s", out);
    free(out);
    free(cmd);
    h_server_stop_ok(s);
    fake_dify_stop(f);
}
END_TEST

/* ---- the newer error answers --------------------------------------------------- */

static const char chat_config[] =
    "{\"listen\": {\"address\": \"127.0.0.1\", \"port\": @PORT@},\n"
    " \"spool\": {\"path\": \"@DIR@/spool.db\"},\n"
    " \"dify\": {\"base_url\": \"http://127.0.0.1:@DIFY_PORT@/v1\", \"timeout_seconds\": 2,\n"
    "          \"workers\": 1, \"validate\": \"off\","
    " \"retry\": {\"initial_ms\": 20, \"max_ms\": 100}},\n"
    " \"apps\": {\"chat\": {\"api_key_env\": \"DIFY_API_KEY\", \"endpoint\": \"chat\"}},\n"
    " \"routes\": [{\"name\": \"chat\", \"app\": \"chat\", \"conversation\": \"per_user\",\n"
    "              \"query\": \"{{insert_id}}\", \"user\": \"{{user_id}}\"}]}\n";

/* Arrival times (ms) of the requests for id, in order; their count. */
static size_t arrivals(fake_dify *f, const char *id, int64_t *at, size_t max) {
    json_t *recs = records(f, "/v1/chat-messages", id);
    size_t n = 0, i;
    json_t *r;
    json_array_foreach(recs, i, r) if (n < max) at[n++] =
        json_integer_value(json_object_get(r, "arrived_ms"));
    json_decref(recs);
    return n;
}

START_TEST(outcomes_2026) {
    fake_dify *f = h_fake_start();
    h_server *s = h_server_start_with(chat_config, f);

    /* conversation_completed: the stored conversation is dropped and the
     * event goes again as a new one. */
    post_event(s, "Chat", "u-conv", "conv-1");
    wait_delivered(f, 1, 10000);
    fake_dify_push(f,
                   &(fake_dify_behaviour){
                       .status = 400,
                       .code = "conversation_completed",
                       .message = "The conversation has ended. Please start a new conversation."});
    post_event(s, "Chat", "u-conv", "conv-2");
    wait_delivered(f, 2, 10000);
    json_t *recs = records(f, "/v1/chat-messages", "conv-2");
    ck_assert_uint_eq(json_array_size(recs), 2);
    ck_assert_ptr_nonnull(
        jstr(json_object_get(json_array_get(recs, 0), "body"), "conversation_id"));
    ck_assert_ptr_null(
        json_object_get(json_object_get(json_array_get(recs, 1), "body"), "conversation_id"));
    json_decref(recs);

    /* Retried: 429 too_many_requests, a 429 page from a cloud edge, the
     * 400 "Too many requests" concurrency limit, a 500. */
    fake_dify_push(f, &(fake_dify_behaviour){.status = 429, .code = "too_many_requests"});
    fake_dify_push(
        f, &(fake_dify_behaviour){.status = 429, .html_body = "<html>Too Many Requests</html>"});
    fake_dify_push(f, &(fake_dify_behaviour){
                          .status = 400,
                          .code = "invalid_param",
                          .message = "Too many requests. The current maximum concurrent requests "
                                     "allowed for app is 2."});
    fake_dify_push_status(f, 500);
    post_event(s, "Chat", "u-busy", "busy-1");
    wait_delivered(f, 3, 10000);
    int64_t at[16];
    ck_assert_uint_eq(arrivals(f, "busy-1", at, 16), 5);

    /* Retry-After as an RFC 850 date, 2 s ahead (whole seconds: at least
     * 1 s), against a 20..100 ms backoff. */
    char when[64];
    time_t t = time(NULL) + 2;
    struct tm tm;
    gmtime_r(&t, &tm);
    static const char *const days[] = {"Sunday",   "Monday", "Tuesday", "Wednesday",
                                       "Thursday", "Friday", "Saturday"};
    static const char *const mons[] = {"Jan", "Feb", "Mar", "Apr", "May", "Jun",
                                       "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"};
    snprintf(when, sizeof when, "%s, %02d-%s-%02d %02d:%02d:%02d GMT", days[tm.tm_wday], tm.tm_mday,
             mons[tm.tm_mon], tm.tm_year % 100, tm.tm_hour, tm.tm_min, tm.tm_sec);
    fake_dify_push(f, &(fake_dify_behaviour){.status = 503, .retry_after = when});
    post_event(s, "Chat", "u-ra", "ra-1");
    wait_delivered(f, 4, 10000);
    ck_assert_uint_eq(arrivals(f, "ra-1", at, 16), 2);
    ck_assert_msg(at[1] - at[0] >= 950, "Retry-After '%s' honoured after %lld ms", when,
                  (long long)(at[1] - at[0]));

    /* 429 rate_limit_error: the plan's quota is gone; the app pauses and
     * probes 1 s, then 2 s apart, though retry.max_ms is 100. */
    fake_dify_push_n(f,
                     &(fake_dify_behaviour){
                         .status = 429, .code = "rate_limit_error", .message = "Rate Limit Error"},
                     2);
    post_event(s, "Chat", "u-quota", "quota-1");
    ck_assert(h_server_log_wait(s, "\"msg\":\"dify app paused\"", 5000));
    ck_assert(h_metric_wait(s, "amp2dify_app_paused{app=\"chat\"}", 1, 5000) == 1);
    wait_delivered(f, 5, 15000);
    ck_assert_uint_eq(arrivals(f, "quota-1", at, 16), 3);
    ck_assert_msg(at[1] - at[0] >= 900 && at[2] - at[1] >= 1800, "probes after %lld and %lld ms",
                  (long long)(at[1] - at[0]), (long long)(at[2] - at[1]));
    json_t *dead = dlq_list(s, false);
    ck_assert_uint_eq(json_array_size(dead), 0); /* nothing spent on the pause */
    json_decref(dead);

    /* A dedupe key Dify's X-Trace-Id would refuse: its SHA-256 instead. */
    post_event(s, "Chat", "u-trace", "odd key: with spaces.and.dots");
    wait_delivered(f, 6, 10000);
    recs = records(f, "/v1/chat-messages", "odd key");
    const char *trace = jstr(json_array_get(recs, 0), "trace_id");
    ck_assert_msg(trace && strlen(trace) == 64 && strspn(trace, "0123456789abcdef") == 64,
                  "trace id '%s'", trace ? trace : "(none)");
    json_decref(recs);
    h_server_stop_ok(s);
    fake_dify_stop(f);
}
END_TEST

/* ---- pinned versions ---------------------------------------------------- */

static const char version_config[] =
    "{\"listen\": {\"address\": \"127.0.0.1\", \"port\": @PORT@},\n"
    " \"spool\": {\"path\": \"@DIR@/spool.db\"},\n"
    " \"dify\": {\"base_url\": \"http://127.0.0.1:@DIFY_PORT@/v1\", \"validate\": \"off\","
    " \"retry\": {\"initial_ms\": 20, \"max_ms\": 100}},\n"
    " \"apps\": {\"flow\": {\"api_key_env\": \"DIFY_API_KEY\", \"endpoint\": \"workflow\",\n"
    "                     \"workflow_id\": \"" WF_VERSION "\"},\n"
    "          \"chat\": {\"api_key_env\": \"DIFY_API_KEY\", \"endpoint\": \"chat\",\n"
    "                     \"workflow_id\": \"" WF_VERSION "\"}},\n"
    " \"routes\": [\n"
    "  {\"name\": \"flow\", \"app\": \"flow\",\n"
    "   \"filter\": {\"field\": \"event_type\", \"op\": \"equals\", \"value\": \"Flow\"}},\n"
    "  {\"name\": \"chat\", \"app\": \"chat\",\n"
    "   \"filter\": {\"field\": \"event_type\", \"op\": \"equals\", \"value\": \"Chat\"}}]}\n";

START_TEST(pinned_versions) {
    fake_dify *f = h_fake_start();
    fake_dify_add_workflow_version(f, WF_VERSION);
    h_server *s = h_server_start_with(version_config, f);
    post_event(s, "Flow", "u-v", "ver-flow");
    post_event(s, "Chat", "u-v", "ver-chat");
    wait_delivered(f, 2, 10000);
    json_t *flow = records(f, "/v1/workflows/" WF_VERSION "/run", NULL);
    ck_assert_uint_eq(json_array_size(flow), 1);
    ck_assert_ptr_nonnull(strstr(jstr(json_array_get(flow, 0), "response"), WF_VERSION));
    json_decref(flow);
    json_t *chat = records(f, "/v1/chat-messages", NULL);
    ck_assert_uint_eq(json_array_size(chat), 1);
    ck_assert_str_eq(jstr(json_object_get(json_array_get(chat, 0), "body"), "workflow_id"),
                     WF_VERSION);
    json_decref(chat);
    h_server_stop_ok(s);
    fake_dify_stop(f);
}
END_TEST

static Suite *dify_2026_suite(void) {
    Suite *s = suite_create("dify_2026");
    TCase *tc = tcase_create("dify_2026");
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, online_check);
    tcase_add_test(tc, start_validation);
    tcase_add_test(tc, resume_after_drop);
    tcase_add_test(tc, waiting_for_input);
    tcase_add_test(tc, outcomes_2026);
    tcase_add_test(tc, pinned_versions);
    suite_add_tcase(s, tc);
    return s;
}

int main(void) {
    if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK)
        return 1;
    int rc = amp_check_run(dify_2026_suite());
    curl_global_cleanup();
    return rc;
}
