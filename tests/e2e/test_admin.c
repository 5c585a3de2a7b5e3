/*
 * End-to-end tests of the admin API (handlers/admin.c): the real amp2dify
 * ($AMP2DIFY_BIN) with admin.listen on a second port of 127.0.0.1, the fake
 * Dify behind it, plain HTTP requests to both listeners.
 *
 *   token_or_nothing      no, wrong, prefixed and re-cased tokens get 401
 *                         and nothing else on every endpoint and on unknown
 *                         paths; the 401s change nothing (a purge, a pause)
 *   where_is_my_event     by insert_id: delivered (attempts, status, the
 *                         answer cut to 500 characters, conversation id),
 *                         dead (status, code, message), unknown (404),
 *                         bad input (400 naming the parameter)
 *   dead_letters          list with the `dlq` filters (the same rows as
 *                         `amp2dify dlq list --json`), bad filters (400),
 *                         replay by id (then delivered), purge needing a
 *                         filter or all=true; the token read from a _FILE
 *   pause_resume_depth    a paused app sends nothing and its events wait
 *                         (queue depth per app), resume delivers them; 404
 *                         for an unknown app, 405 for a wrong method, 400
 *                         for a body
 *   pause_one_app_others_go_on  more events of a paused app than its memory
 *                         queue holds, beside a second app: that one's are
 *                         delivered, the paused app's wait, then all go out
 *   token_follows_reload  a SIGHUP after the token file changed: the new
 *                         token works at once, the old one gets 401
 *   start_needs_token     admin.listen without a token: exit 2 naming the
 *                         variable; without admin.listen no admin listener
 */
#include <check.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "../../base/alloc.h"
#include "../fake_dify/fake_dify.h"
#include "harness.h"
#include "../check_run.h"

#define TOKEN "admin-e2e-token-0123456789"
#define AUTH "Authorization: Bearer " TOKEN

typedef struct admin_srv {
    h_server *s;
    fake_dify *f;
    uint16_t port; /* admin.listen's */
    char *listen_env;
    char *token_env;
} admin_srv;

/* amp2dify with the admin API on a free port; the token from the
 * environment, or from a file when token_file; config NULL: the harness's
 * default; extra: one more environment entry or NULL. */
static void start_with(admin_srv *a, bool token_file, const char *config, const char *extra) {
    memset(a, 0, sizeof *a);
    a->f = fake_dify_start(0, H_API_KEY);
    ck_assert_ptr_nonnull(a->f);
    a->port = h_free_port();
    ck_assert_uint_gt(a->port, 0);
    a->listen_env = amp_xasprintf("AMP2DIFY_ADMIN_LISTEN=127.0.0.1:%u", a->port);
    if (token_file) {
        char path[] = "/tmp/amp2dify-admin-token-XXXXXX";
        int fd = mkstemp(path);
        ck_assert_int_ge(fd, 0);
        ck_assert_int_eq(write(fd, TOKEN "\n", strlen(TOKEN) + 1), (ssize_t)strlen(TOKEN) + 1);
        close(fd);
        a->token_env = amp_xasprintf("AMP2DIFY_ADMIN_TOKEN_FILE=%s", path);
    } else {
        a->token_env = amp_xasprintf("AMP2DIFY_ADMIN_TOKEN=%s", TOKEN);
    }
    const char *env[] = {a->listen_env, a->token_env, extra, NULL};
    h_opts o = {.config_json = config, .dify_port = fake_dify_port(a->f), .env = env};
    a->s = h_server_start(&o);
    ck_assert_msg(a->s != NULL, "amp2dify did not start");
    ck_assert(h_server_log_wait(a->s, "admin API listening", 5000));
}

static void start(admin_srv *a, bool token_file) {
    start_with(a, token_file, NULL, NULL);
}

static void stop(admin_srv *a) {
    char *why = h_server_stop_clean(a->s);
    ck_assert_msg(why == NULL, "%s", why);
    fake_dify_stop(a->f);
    const char *file = strchr(a->token_env, '=') + 1;
    if (strstr(a->token_env, "_FILE="))
        unlink(file);
    free(a->listen_env);
    free(a->token_env);
}

/* One admin request; auth is a whole header line or NULL for none. */
static h_resp *admin(const admin_srv *a, const char *method, const char *path, const char *auth) {
    const char *headers[] = {auth, NULL};
    h_req rq = {.method = method, .path = path, .headers = auth ? headers : NULL};
    return h_request_port(a->port, &rq);
}

static h_resp *admin_ok(const admin_srv *a, const char *method, const char *path, long status) {
    h_resp *r = admin(a, method, path, AUTH);
    ck_assert_msg(r->status == status, "%s %s: %ld %s (expected %ld)", method, path, r->status,
                  r->body, status);
    ck_assert_msg(r->json != NULL, "%s %s: not JSON: %s", method, path, r->body);
    return r;
}

/* A 400 whose detail names what was wrong. */
static void bad_input(const admin_srv *a, const char *method, const char *path,
                      const char *detail_has) {
    h_resp *r = admin_ok(a, method, path, 400);
    const char *detail = json_string_value(json_object_get(r->json, "detail"));
    ck_assert_msg(detail && strstr(detail, detail_has), "%s %s: detail %s lacks '%s'", method, path,
                  detail ? detail : "(none)", detail_has);
    ck_assert_ptr_nonnull(h_resp_error(r));
    h_resp_free(r);
}

static void post_event(const admin_srv *a, const char *type, const char *user, const char *id) {
    char *ev = h_event(type, user, id);
    h_resp *r = h_post_signed(a->s, ev);
    ck_assert_msg(r->status == 202, "webhook: %ld %s", r->status, r->body);
    h_resp_free(r);
    free(ev);
}

static json_int_t int_at(const json_t *o, const char *key) {
    const json_t *v = json_object_get(o, key);
    ck_assert_msg(json_is_integer(v), "%s is not an integer", key);
    return json_integer_value(v);
}

static const char *str_at(const json_t *o, const char *key) {
    const char *v = json_string_value(json_object_get(o, key));
    ck_assert_msg(v != NULL, "%s is not a string", key);
    return v;
}

/* GET /admin/dlq?query: the dead letters' array (caller owns). */
static json_t *dlq_list(const admin_srv *a, const char *query) {
    char path[256];
    snprintf(path, sizeof path, "/admin/dlq%s%s", *query ? "?" : "", query);
    h_resp *r = admin_ok(a, "GET", path, 200);
    json_t *rows = json_incref(json_object_get(r->json, "dead_letters"));
    ck_assert(json_is_array(rows));
    ck_assert_int_eq(int_at(r->json, "count"), (json_int_t)json_array_size(rows));
    h_resp_free(r);
    return rows;
}

/* Poll until the event's first job is in state, bounded; returns the
 * lookup's JSON (caller owns). */
static json_t *event_in_state(const admin_srv *a, const char *id, const char *state) {
    char path[160];
    snprintf(path, sizeof path, "/admin/events?insert_id=%s", id);
    int64_t end = h_mono_ms() + 10000;
    for (;;) {
        h_resp *r = admin(a, "GET", path, AUTH);
        if (r->status == 200) {
            json_t *job = json_array_get(json_object_get(r->json, "jobs"), 0);
            const char *st = json_string_value(json_object_get(job, "state"));
            if (st && strcmp(st, state) == 0) {
                json_t *out = json_incref(r->json);
                h_resp_free(r);
                return out;
            }
        }
        ck_assert_msg(h_mono_ms() < end, "event %s not %s: %ld %s", id, state, r->status, r->body);
        h_resp_free(r);
        h_sleep_ms(50);
    }
}

/* ---- tests ------------------------------------------------------------------- */

START_TEST(token_or_nothing) {
    admin_srv a;
    start(&a, false);
    /* One dead letter, so that a purge that got through would show. */
    fake_dify_push_status(a.f, 400);
    post_event(&a, "doomed", "u1", "auth-dead-1");
    json_decref(event_in_state(&a, "auth-dead-1", "dead"));

    const char *bad_auth[] = {
        NULL,
        "Authorization: Bearer wrong-token-wrong-token",
        "Authorization: Bearer " TOKEN "x",
        "Authorization: Bearer admin-e2e-token-012345678", /* a prefix */
        "Authorization: bearer " TOKEN,
        "Authorization: " TOKEN,
        "Authorization: Basic YWRtaW46YWRtaW4=",
        "X-Admin-Token: " TOKEN,
    };
    const struct {
        const char *method, *path;
    } calls[] = {
        {"GET", "/admin/events?insert_id=auth-dead-1"},
        {"GET", "/admin/dlq"},
        {"POST", "/admin/dlq/replay?all=true"},
        {"POST", "/admin/dlq/purge?all=true"},
        {"GET", "/admin/apps"},
        {"POST", "/admin/apps/support/pause"},
        {"POST", "/admin/apps/support/resume"},
        {"GET", "/admin/nothing-here"},
        {"DELETE", "/admin/dlq"},
        {"GET", "/"},
    };
    for (size_t i = 0; i < sizeof bad_auth / sizeof bad_auth[0]; i++)
        for (size_t j = 0; j < sizeof calls / sizeof calls[0]; j++) {
            h_resp *r = admin(&a, calls[j].method, calls[j].path, bad_auth[i]);
            ck_assert_msg(r->status == 401, "%s %s with %s: %ld %s", calls[j].method, calls[j].path,
                          bad_auth[i] ? bad_auth[i] : "no header", r->status, r->body);
            /* Nothing else: the error and its detail, no data. */
            ck_assert_ptr_nonnull(r->json);
            ck_assert_uint_eq(json_object_size(r->json), 2);
            ck_assert_str_eq(h_resp_error(r), "unauthorized");
            ck_assert_ptr_null(strstr(r->body, "auth-dead-1"));
            ck_assert_str_eq(h_resp_header(r, "WWW-Authenticate"), "Bearer");
            h_resp_free(r);
        }
    /* None of them acted: the dead letter is there, the app not paused. */
    json_t *rows = dlq_list(&a, "");
    ck_assert_uint_eq(json_array_size(rows), 1);
    json_decref(rows);
    h_resp *r = admin_ok(&a, "GET", "/admin/apps", 200);
    json_t *app = json_object_get(json_object_get(r->json, "apps"), "support");
    ck_assert(json_is_false(json_object_get(app, "paused")));
    h_resp_free(r);
    /* The webhook listener does not serve the admin API. */
    r = h_get(a.s, "/admin/apps");
    ck_assert_int_eq(r->status, 404);
    h_resp_free(r);
    /* Each admin request has an access line, without the token. */
    char *log = h_server_log(a.s);
    ck_assert_ptr_nonnull(strstr(log, "\"msg\":\"admin request\""));
    ck_assert_ptr_null(strstr(log, TOKEN));
    free(log);
    stop(&a);
}
END_TEST

START_TEST(where_is_my_event) {
    admin_srv a;
    start(&a, false);
    /* A 600-character answer: the lookup shows its first 500. */
    char answer[601];
    for (int i = 0; i < 600; i++)
        answer[i] = (char)('a' + i % 26);
    answer[600] = '\0';
    fake_dify_push(a.f, &(fake_dify_behaviour){.answer = answer});
    post_event(&a, "signup", "alice", "where-1");
    json_t *ev = event_in_state(&a, "where-1", "delivered");
    ck_assert_str_eq(str_at(ev, "insert_id"), "where-1");
    ck_assert(json_is_true(json_object_get(ev, "stored")));
    ck_assert_uint_eq(json_array_size(json_object_get(ev, "jobs")), 1);
    json_t *job = json_array_get(json_object_get(ev, "jobs"), 0);
    ck_assert_int_eq(int_at(job, "attempts"), 1);
    ck_assert_int_eq(int_at(job, "last_status"), 200);
    ck_assert_str_eq(str_at(job, "app"), "support");
    ck_assert_str_eq(str_at(job, "route"), "all");
    ck_assert_str_eq(str_at(job, "user"), "alice");
    const char *excerpt = str_at(job, "answer");
    ck_assert_uint_eq(strlen(excerpt), 500);
    ck_assert_int_eq(strncmp(excerpt, answer, 500), 0);
    /* The conversation id is the one Dify answered with. */
    json_t *reqs = fake_dify_requests(a.f);
    const char *resp = json_string_value(json_object_get(json_array_get(reqs, 0), "response"));
    ck_assert_ptr_nonnull(resp);
    const char *conv = str_at(job, "conversation_id");
    ck_assert_msg(strlen(conv) > 0 && strstr(resp, conv), "conversation %s not in %s", conv, resp);
    json_decref(reqs);
    json_decref(ev);

    /* Retried, then dead: status, code and message of the last answer. */
    fake_dify_push(a.f, &(fake_dify_behaviour){.status = 500});
    fake_dify_push(a.f, &(fake_dify_behaviour){.status = 400,
                                               .code = "invalid_param",
                                               .message = "query is required"});
    post_event(&a, "broken", "bob", "where-2");
    ev = event_in_state(&a, "where-2", "dead");
    job = json_array_get(json_object_get(ev, "jobs"), 0);
    ck_assert_int_eq(int_at(job, "attempts"), 2);
    ck_assert_int_eq(int_at(job, "last_status"), 400);
    ck_assert_str_eq(str_at(job, "last_code"), "invalid_param");
    ck_assert_str_eq(str_at(job, "last_message"), "query is required");
    ck_assert(json_is_null(json_object_get(job, "answer")));
    json_decref(ev);

    /* Unknown: 404 in the error shape. */
    h_resp *r = admin_ok(&a, "GET", "/admin/events?insert_id=never-sent", 404);
    ck_assert_str_eq(h_resp_error(r), "not_found");
    ck_assert_ptr_nonnull(strstr(str_at(r->json, "detail"), "never-sent"));
    h_resp_free(r);
    /* Bad input: 400 naming what is wrong. */
    bad_input(&a, "GET", "/admin/events", "insert_id");
    bad_input(&a, "GET", "/admin/events?insert_id=", "insert_id");
    bad_input(&a, "GET", "/admin/events?id=where-1", "'id'");
    r = admin_ok(&a, "POST", "/admin/events?insert_id=where-1", 405);
    ck_assert_str_eq(h_resp_header(r, "Allow"), "GET");
    h_resp_free(r);
    /* The server kept serving. */
    r = h_get(a.s, "/healthz");
    ck_assert_int_eq(r->status, 200);
    h_resp_free(r);
    stop(&a);
}
END_TEST

/* `amp2dify dlq list --json ARGS` beside the daemon: one JSON row a line. */
static json_t *cli_list(const admin_srv *a, const char *args) {
    char *cmd = amp_xasprintf("%s dlq list --json -c %s/amp2dify.json %s", h_bin(),
                              h_server_dir(a->s), args);
    FILE *p = popen(cmd, "r");
    ck_assert_ptr_nonnull(p);
    json_t *rows = json_array();
    char line[65536];
    while (fgets(line, sizeof line, p)) {
        json_t *row = json_loads(line, 0, NULL);
        ck_assert_msg(row != NULL, "not JSON: %s", line);
        json_array_append_new(rows, row);
    }
    ck_assert_int_eq(pclose(p), 0);
    free(cmd);
    return rows;
}

static void same_ids(const json_t *x, const json_t *y) {
    ck_assert_uint_eq(json_array_size(x), json_array_size(y));
    for (size_t i = 0; i < json_array_size(x); i++)
        ck_assert_int_eq(int_at(json_array_get(x, i), "id"), int_at(json_array_get(y, i), "id"));
}

START_TEST(dead_letters) {
    admin_srv a;
    start(&a, true);
    fake_dify_push(a.f, &(fake_dify_behaviour){.status = 400, .code = "invalid_param"});
    fake_dify_push(a.f, &(fake_dify_behaviour){.status = 404, .code = "not_found"});
    fake_dify_push(a.f, &(fake_dify_behaviour){.status = 400, .code = "invalid_param"});
    post_event(&a, "e", "u1", "dl-1");
    json_decref(event_in_state(&a, "dl-1", "dead"));
    post_event(&a, "e", "u2", "dl-2");
    json_decref(event_in_state(&a, "dl-2", "dead"));
    post_event(&a, "e", "u3", "dl-3");
    json_decref(event_in_state(&a, "dl-3", "dead"));

    json_t *all = dlq_list(&a, "");
    ck_assert_uint_eq(json_array_size(all), 3);
    json_t *cli = cli_list(&a, "");
    same_ids(all, cli);
    json_decref(cli);
    json_int_t first = int_at(json_array_get(all, 0), "id");
    ck_assert_str_eq(str_at(json_array_get(all, 0), "dedupe_key"), "dl-1");

    /* The `dlq` filters, read the same way: the same rows. */
    const struct {
        const char *query, *args;
        size_t n;
    } filters[] = {
        {"code=invalid_param", "--code invalid_param", 2},
        {"status=404", "--status 404", 1},
        {"status=400&app=support&route=all", "--status 400 --app support --route all", 2},
        {"app=other", "--app other", 0},
        {"since=0", "--since 0", 3},
        {"until=2000-01-01T00:00:00Z", "--until 2000-01-01T00:00:00Z", 0},
    };
    for (size_t i = 0; i < sizeof filters / sizeof filters[0]; i++) {
        json_t *api = dlq_list(&a, filters[i].query);
        ck_assert_msg(json_array_size(api) == filters[i].n, "%s: %zu rows", filters[i].query,
                      json_array_size(api));
        cli = cli_list(&a, filters[i].args);
        same_ids(api, cli);
        json_decref(cli);
        json_decref(api);
    }
    json_t *one = dlq_list(&a, "limit=1");
    ck_assert_uint_eq(json_array_size(one), 1);
    json_decref(one);

    bad_input(&a, "GET", "/admin/dlq?status=abc", "status: found 'abc'");
    bad_input(&a, "GET", "/admin/dlq?since=yesterday", "since: found 'yesterday'");
    bad_input(&a, "GET", "/admin/dlq?limit=0", "limit");
    bad_input(&a, "GET", "/admin/dlq?colour=red", "'colour'");
    bad_input(&a, "GET", "/admin/dlq?all=true", "'all'");
    bad_input(&a, "POST", "/admin/dlq/replay", "all=true");
    bad_input(&a, "POST", "/admin/dlq/purge", "all=true");
    bad_input(&a, "POST", "/admin/dlq/purge?all=true&code=x", "all=true takes no filters");
    bad_input(&a, "POST", "/admin/dlq/purge?all=maybe", "all: found 'maybe'");
    bad_input(&a, "POST", "/admin/dlq/replay?id=-3", "id: found '-3'");
    h_resp *r = admin_ok(&a, "GET", "/admin/dlq/replay", 405);
    ck_assert_str_eq(h_resp_header(r, "Allow"), "POST");
    h_resp_free(r);
    /* None of the refused calls changed anything. */
    json_t *still = dlq_list(&a, "");
    ck_assert_uint_eq(json_array_size(still), 3);
    json_decref(still);

    /* Replay the first by id: it is delivered this time. */
    char path[96];
    snprintf(path, sizeof path, "/admin/dlq/replay?id=%lld", (long long)first);
    r = admin_ok(&a, "POST", path, 200);
    ck_assert_int_eq(int_at(r->json, "replayed"), 1);
    h_resp_free(r);
    json_t *ev = event_in_state(&a, "dl-1", "delivered");
    ck_assert_int_eq(int_at(json_array_get(json_object_get(ev, "jobs"), 0), "last_status"), 200);
    json_decref(ev);
    /* Purge by filter, then the rest with all=true. */
    r = admin_ok(&a, "POST", "/admin/dlq/purge?status=404", 200);
    ck_assert_int_eq(int_at(r->json, "purged"), 1);
    h_resp_free(r);
    r = admin_ok(&a, "POST", "/admin/dlq/purge?all=true", 200);
    ck_assert_int_eq(int_at(r->json, "purged"), 1);
    h_resp_free(r);
    still = dlq_list(&a, "");
    ck_assert_uint_eq(json_array_size(still), 0);
    json_decref(still);
    json_decref(all);
    stop(&a);
}
END_TEST

static json_t *app_state(const admin_srv *a, const char *app) {
    h_resp *r = admin_ok(a, "GET", "/admin/apps", 200);
    json_t *st = json_incref(json_object_get(json_object_get(r->json, "apps"), app));
    ck_assert_msg(st != NULL, "no %s in %s", app, r->body);
    h_resp_free(r);
    return st;
}

/* An app's state once its pending count is want (an acknowledgement is
 * stored a moment after Dify has answered), or after 10 s, whatever it is. */
static json_t *app_state_pending(const admin_srv *a, const char *app, json_int_t want) {
    int64_t limit = h_mono_ms() + 10000;
    json_t *st = app_state(a, app);
    while (int_at(st, "pending") != want && h_mono_ms() < limit) {
        json_decref(st);
        h_sleep_ms(50);
        st = app_state(a, app);
    }
    return st;
}

START_TEST(pause_resume_depth) {
    admin_srv a;
    start(&a, false);
    h_resp *r = admin_ok(&a, "POST", "/admin/apps/support/pause", 200);
    ck_assert(json_is_true(json_object_get(r->json, "paused")));
    h_resp_free(r);
    json_t *st = app_state(&a, "support");
    ck_assert(json_is_true(json_object_get(st, "paused")));
    ck_assert(json_is_true(json_object_get(st, "configured")));
    ck_assert_int_eq(int_at(st, "pending"), 0);
    json_decref(st);
    r = h_get(a.s, "/metrics");
    ck_assert_ptr_nonnull(strstr(r->body, "amp2dify_app_paused_by_operator{app=\"support\"} 1"));
    h_resp_free(r);

    for (int i = 0; i < 5; i++) {
        char id[32];
        snprintf(id, sizeof id, "paused-%d", i);
        post_event(&a, "e", "u", id);
    }
    /* Paused: nothing reaches Dify, and the five wait in the queue. */
    st = app_state_pending(&a, "support", 5);
    ck_assert_int_eq(int_at(st, "pending"), 5);
    ck_assert_int_gt(int_at(st, "oldest_pending_ms"), 0);
    json_decref(st);
    ck_assert_uint_eq(fake_dify_wait_arrived(a.f, 1, 1000), 0);

    r = admin_ok(&a, "POST", "/admin/apps/support/resume", 200);
    ck_assert(json_is_false(json_object_get(r->json, "paused")));
    h_resp_free(r);
    ck_assert_uint_eq(fake_dify_wait_delivered(a.f, 5, 10000), 5);
    st = app_state_pending(&a, "support", 0);
    ck_assert_int_eq(int_at(st, "pending"), 0);
    ck_assert(json_is_false(json_object_get(st, "paused")));
    json_decref(st);

    r = admin_ok(&a, "POST", "/admin/apps/nope/pause", 404);
    ck_assert_ptr_nonnull(strstr(str_at(r->json, "detail"), "'nope'"));
    h_resp_free(r);
    r = admin_ok(&a, "GET", "/admin/apps/support/pause", 405);
    h_resp_free(r);
    bad_input(&a, "POST", "/admin/apps/support/pause?now=1", "'now'");
    bad_input(&a, "GET", "/admin/apps?x=1", "'x'");
    r = admin_ok(&a, "GET", "/admin/apps/support/stop", 404);
    h_resp_free(r);
    /* A body is refused, not ignored. */
    const char *headers[] = {AUTH, NULL};
    h_req rq = {.method = "POST",
                .path = "/admin/apps/support/pause",
                .body = "{\"x\":1}",
                .headers = headers};
    r = h_request_port(a.port, &rq);
    ck_assert_int_eq(r->status, 400);
    ck_assert_ptr_nonnull(strstr(r->body, "query string"));
    h_resp_free(r);
    st = app_state(&a, "support");
    ck_assert(json_is_false(json_object_get(st, "paused")));
    json_decref(st);
    stop(&a);
}
END_TEST

#define BETA_KEY "app-e2e-beta-key"

static const char two_apps_config[] =
    "{\"listen\": {\"address\": \"127.0.0.1\", \"port\": @PORT@},\n"
    " \"spool\": {\"path\": \"@DIR@/spool.db\"},\n"
    " \"dify\": {\"base_url\": \"http://127.0.0.1:@DIFY_PORT@/v1\", \"timeout_seconds\": 10,\n"
    "          \"workers\": 4, \"retry\": {\"initial_ms\": 50, \"max_ms\": 200}},\n"
    " \"apps\": {\"alpha\": {\"api_key_env\": \"DIFY_API_KEY\", \"max_in_flight\": 4},\n"
    "          \"beta\": {\"api_key_env\": \"BETA_KEY\", \"max_in_flight\": 4}},\n"
    " \"routes\": [{\"name\": \"to-alpha\", \"app\": \"alpha\",\n"
    "              \"filter\": {\"field\": \"event_type\", \"op\": \"equals\", \"value\": "
    "\"a\"}},\n"
    "             {\"name\": \"to-beta\", \"app\": \"beta\",\n"
    "              \"filter\": {\"field\": \"event_type\", \"op\": \"equals\", \"value\": "
    "\"b\"}}]}\n";

/* Requests Dify got with app's key. */
static size_t requests_with_key(fake_dify *f, const char *key) {
    json_t *all = fake_dify_requests(f);
    char *want = amp_xasprintf("Bearer %s", key);
    size_t n = 0, i;
    json_t *r;
    json_array_foreach(all, i, r) {
        const char *auth = json_string_value(json_object_get(r, "authorization"));
        n += auth && strcmp(auth, want) == 0;
    }
    free(want);
    json_decref(all);
    return n;
}

/* More events of a paused app than its memory queue holds (16), beside a
 * second app: the other app's go out, the paused app's wait (some written
 * back to the queue), and all of them go out after the resume. */
START_TEST(pause_one_app_others_go_on) {
    admin_srv a;
    start_with(&a, false, two_apps_config, "BETA_KEY=" BETA_KEY);
    fake_dify_add_key(a.f, BETA_KEY);
    h_resp *r = admin_ok(&a, "POST", "/admin/apps/alpha/pause", 200);
    h_resp_free(r);
    for (int i = 0; i < 40; i++) {
        char id[32];
        snprintf(id, sizeof id, "alpha-%d", i);
        post_event(&a, "a", "u", id);
        if (i % 4 == 0) {
            snprintf(id, sizeof id, "beta-%d", i);
            post_event(&a, "b", "u", id);
        }
    }
    ck_assert_uint_eq(fake_dify_wait_delivered(a.f, 10, 10000), 10);
    ck_assert_uint_eq(requests_with_key(a.f, BETA_KEY), 10);
    ck_assert_uint_eq(requests_with_key(a.f, H_API_KEY), 0);
    json_t *st = app_state(&a, "alpha");
    ck_assert_int_eq(int_at(st, "pending"), 40);
    ck_assert(json_is_true(json_object_get(st, "paused")));
    json_decref(st);
    st = app_state_pending(&a, "beta", 0);
    ck_assert_int_eq(int_at(st, "pending"), 0);
    ck_assert(json_is_false(json_object_get(st, "paused")));
    json_decref(st);
    /* Still nothing of alpha a moment later. */
    h_sleep_ms(500);
    ck_assert_uint_eq(requests_with_key(a.f, H_API_KEY), 0);

    int64_t resumed = h_mono_ms();
    r = admin_ok(&a, "POST", "/admin/apps/alpha/resume", 200);
    h_resp_free(r);
    /* Rows written back come due within as long as the pause lasted
     * (2..30 s); the bound leaves room for a slow machine. */
    ck_assert_uint_eq(fake_dify_wait_delivered(a.f, 50, 40000), 50);
    ck_assert_uint_eq(requests_with_key(a.f, H_API_KEY), 40);
    fprintf(stderr,
            "pause_one_app_others_go_on: 40 events of the paused app delivered %lld ms "
            "after the resume\n",
            (long long)(h_mono_ms() - resumed));
    stop(&a);
}
END_TEST

/* The token is read with the config: a SIGHUP after the file changed
 * takes the new one at once, and the old one gets 401. */
START_TEST(token_follows_reload) {
    admin_srv a;
    start(&a, true);
    const char *file = strchr(a.token_env, '=') + 1;
    FILE *f = fopen(file, "w");
    ck_assert_ptr_nonnull(f);
    fputs("admin-e2e-token-rotated-42\n", f);
    fclose(f);
    kill(h_server_pid(a.s), SIGHUP);
    ck_assert(h_server_log_wait(a.s, "config reloaded", 5000));
    h_resp *r = admin(&a, "GET", "/admin/apps", AUTH);
    ck_assert_int_eq(r->status, 401);
    h_resp_free(r);
    r = admin(&a, "GET", "/admin/apps", "Authorization: Bearer admin-e2e-token-rotated-42");
    ck_assert_msg(r->status == 200, "%ld %s", r->status, r->body);
    h_resp_free(r);
    stop(&a);
}
END_TEST

START_TEST(start_needs_token) {
    uint16_t port = h_free_port();
    char *listen = amp_xasprintf("AMP2DIFY_ADMIN_LISTEN=127.0.0.1:%u", port);
    const char *env[] = {listen, "AMP2DIFY_ADMIN_TOKEN", "AMP2DIFY_ADMIN_TOKEN_FILE", NULL};
    h_opts o = {.env = env, .no_wait = true};
    h_server *s = h_server_start(&o);
    ck_assert_ptr_nonnull(s);
    int st = h_server_wait_exit(s, 10000);
    ck_assert_msg(st >= 0 && WIFEXITED(st) && WEXITSTATUS(st) == 2, "status %d", st);
    char *log = h_server_log(s);
    ck_assert_msg(strstr(log, "AMP2DIFY_ADMIN_TOKEN: found nothing"), "log: %s", log);
    free(log);
    h_server_stop(s);
    free(listen);

    /* Off by default: no admin listener, nothing logged about one. */
    const char *none[] = {"AMP2DIFY_ADMIN_LISTEN", NULL};
    h_opts plain = {.env = none};
    s = h_server_start(&plain);
    ck_assert_ptr_nonnull(s);
    log = h_server_log(s);
    ck_assert_ptr_null(strstr(log, "admin API"));
    free(log);
    char *why = h_server_stop_clean(s);
    ck_assert_msg(why == NULL, "%s", why);
}
END_TEST

static Suite *admin_suite(void) {
    Suite *s = suite_create("admin");
    TCase *tc = tcase_create("admin");
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, token_or_nothing);
    tcase_add_test(tc, where_is_my_event);
    tcase_add_test(tc, dead_letters);
    tcase_add_test(tc, pause_resume_depth);
    tcase_add_test(tc, pause_one_app_others_go_on);
    tcase_add_test(tc, token_follows_reload);
    tcase_add_test(tc, start_needs_token);
    suite_add_tcase(s, tc);
    return s;
}

int main(void) {
    return amp_check_run(admin_suite());
}
