/*
 * End-to-end delivery: the real amp2dify ($AMP2DIFY_BIN) delivering to the
 * in-process fake Dify.
 *
 *   per_user_blocking / per_user_streaming  50 users x 10 events posted
 *       concurrently, Dify failing ~20% of requests: each user's events
 *       arrive in order, one at a time, and share one conversation
 *   rate_limit          rate_per_sec 20, burst 1: 100 events arrive at
 *                       20/s within 10%, in no window faster
 *   pause_and_resume    403 then 401 from Dify: one probe per growing
 *                       interval, a metric and a log line without the key,
 *                       every event delivered once the key works again
 *   outcomes            one event per case, one worker: retried (429 with
 *                       Retry-After, 5xx, 408, timeout, dropped connection,
 *                       "Too many requests" 400, in-stream 429), dead-lettered
 *                       with status/code/message (checked through
 *                       `amp2dify dlq list --json`), failed workflow,
 *                       conversation reset, streams in 3-byte chunks
 *   reload_adds_an_app  SIGHUP with a new app and route
 *   delivery_threads_yield_to_ingest  dify.nice: the dispatcher and the
 *                       workers 15 nicer than ingest's threads; 0 on reload
 *
 * Events are posted with libcurl from a few threads (the harness's HTTP
 * helpers are for one thread); signatures come from h_sign.
 */
#include <check.h>
#include <curl/curl.h>
#include <limits.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "../../base/alloc.h"
#include "../../base/buf.h"
#include "../../base/clock.h"
#include "../fake_dify/fake_dify.h"
#include "checked.h"
#include "harness.h"
#include "../check_run.h"

#define USERS 50
#define EVENTS_PER_USER 10
#define POST_THREADS 8

/* ---- helpers ---------------------------------------------------------------- */

typedef struct poster {
    CURL *curl;
    struct curl_slist *headers;
    uint16_t port;
    const char *secret;
} poster;

static void poster_init(poster *p, const h_server *s) {
    memset(p, 0, sizeof *p);
    p->curl = curl_easy_init();
    if (!p->curl)
        abort();
    p->port = h_server_port(s);
    p->secret = h_server_secret(s);
}

static size_t discard(char *d, size_t size, size_t n, void *ud) {
    (void)d;
    (void)ud;
    return size * n;
}

/* POST body to the webhook, signed now; the HTTP status (0: no answer). */
static long poster_post(poster *p, const char *body) {
    int64_t ts = (int64_t)time(NULL);
    char *sig = h_sign(body, strlen(body), ts, p->secret);
    char *sig_h = amp_xasprintf("X-Amplitude-Sig: %s", sig);
    char *ts_h = amp_xasprintf("X-Amplitude-Timestamp: %lld", (long long)ts);
    char *url = amp_xasprintf("http://127.0.0.1:%u" H_WEBHOOK, p->port);
    struct curl_slist *h = curl_slist_append(NULL, "Content-Type: application/json");
    h = curl_slist_append(h, sig_h);
    h = curl_slist_append(h, ts_h);
    h = curl_slist_append(h, "Expect:");
    CURL *c = p->curl;
    curl_easy_setopt(c, CURLOPT_URL, url);
    curl_easy_setopt(c, CURLOPT_NOPROXY, "*");
    curl_easy_setopt(c, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(c, CURLOPT_TIMEOUT_MS, 20000L);
    curl_easy_setopt(c, CURLOPT_HTTPHEADER, h);
    curl_easy_setopt(c, CURLOPT_POSTFIELDS, body);
    curl_easy_setopt(c, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)strlen(body));
    curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, discard);
    long status = 0;
    if (curl_easy_perform(c) == CURLE_OK)
        curl_easy_getinfo(c, CURLINFO_RESPONSE_CODE, &status);
    curl_easy_setopt(c, CURLOPT_HTTPHEADER, NULL);
    curl_slist_free_all(h);
    free(url);
    free(ts_h);
    free(sig_h);
    free(sig);
    return status;
}

static void poster_done(poster *p) {
    curl_easy_cleanup(p->curl);
}

static void post_one(const h_server *s, const char *body) {
    poster p;
    poster_init(&p, s);
    long st = poster_post(&p, body);
    poster_done(&p);
    ck_assert_int_eq(st, 202);
}

/* A JSON array of n events with insert_ids "<prefix>-NNN", from one user
 * or (users) one user each. The text lives until the next call. */
static const char *events_array(const char *type, const char *prefix, int n, bool users) {
    static amp_buf body;
    amp_buf_free(&body);
    amp_buf_init(&body, 4 << 20);
    amp_buf_append(&body, "[", 1);
    for (int i = 0; i < n; i++) {
        char id[64], user[64];
        snprintf(id, sizeof id, "%s-%03d", prefix, i);
        snprintf(user, sizeof user, "%s-user-%03d", prefix, users ? i : 0);
        char *ev = h_event(type, user, id);
        if (i)
            amp_buf_append(&body, ",", 1);
        amp_buf_append(&body, ev, strlen(ev));
        free(ev);
    }
    amp_buf_append(&body, "]", 1);
    return body.data;
}

/* One event of the per-user scenarios. */
static char *user_event(int user, int seq) {
    return amp_xasprintf("{\"event_type\":\"Step\",\"user_id\":\"user-%02d\",\"insert_id\":"
                         "\"u%02d-e%02d\",\"time\":%lld,\"event_properties\":{\"seq\":%d}}",
                         user, user, seq, (long long)amp_now_ms(), seq);
}

typedef struct post_thread {
    pthread_t th;
    const h_server *s;
    int index;
    int failures;
    long last_bad_status;
} post_thread;

/* Thread i posts the events of users i, i + POST_THREADS, ...: round by
 * round, so users interleave, but each user's events go in order (the next
 * one only after the 202 of the previous). */
static void *post_main(void *arg) {
    post_thread *t = arg;
    poster p;
    poster_init(&p, t->s);
    for (int seq = 0; seq < EVENTS_PER_USER; seq++) {
        for (int u = t->index; u < USERS; u += POST_THREADS) {
            char *ev = user_event(u, seq);
            long st = poster_post(&p, ev);
            free(ev);
            if (st != 202) {
                t->failures++;
                t->last_bad_status = st;
            }
        }
    }
    poster_done(&p);
    return NULL;
}

static void post_all_users(const h_server *s) {
    post_thread t[POST_THREADS];
    for (int i = 0; i < POST_THREADS; i++) {
        t[i] = (post_thread){.s = s, .index = i};
        ck_assert_int_eq(pthread_create(&t[i].th, NULL, post_main, &t[i]), 0);
    }
    int failures = 0;
    long bad = 0;
    for (int i = 0; i < POST_THREADS; i++) {
        pthread_join(t[i].th, NULL);
        failures += t[i].failures;
        if (t[i].failures)
            bad = t[i].last_bad_status;
    }
    ck_assert_msg(failures == 0, "%d posts failed (last status %ld)", failures, bad);
}

/* `amp2dify dlq list --json` for the server's config, as an array; caller
 * owns. */
static json_t *dlq_list(const h_server *s) {
    char *cmd =
        amp_xasprintf("%s dlq list --json -c %s/amp2dify.json 2>&1", h_bin(), h_server_dir(s));
    FILE *p = popen(cmd, "r");
    ck_assert_ptr_nonnull(p);
    amp_buf out;
    amp_buf_init(&out, 16 << 20);
    char chunk[4096];
    size_t n;
    while ((n = fread(chunk, 1, sizeof chunk, p)) > 0)
        amp_buf_append(&out, chunk, n);
    int st = pclose(p);
    ck_assert_msg(st == 0, "dlq list failed (%d): %s", st, out.data ? out.data : "");
    /* One JSON object per line. */
    json_t *j = json_array();
    for (char *line = out.data, *nl; line && *line; line = nl ? nl + 1 : NULL) {
        nl = strchr(line, '\n');
        size_t len = nl ? (size_t)(nl - line) : strlen(line);
        if (len == 0)
            continue;
        json_error_t err;
        json_t *row = json_loadb(line, len, 0, &err);
        ck_assert_msg(json_is_object(row), "dlq list printed '%.*s'", (int)len, line);
        json_array_append_new(j, row);
    }
    amp_buf_free(&out);
    free(cmd);
    return j;
}

static const char *jstr(const json_t *o, const char *key) {
    return json_string_value(json_object_get(o, key));
}

static const char *rec_body_str(const json_t *rec, const char *key) {
    return jstr(json_object_get(rec, "body"), key);
}

/* The conversation id in an answer the fake sent (blocking JSON or SSE
 * frames); caller owns, NULL when none. */
static char *answer_conversation(const json_t *rec) {
    const char *resp = jstr(rec, "response");
    static const char key[] = "\"conversation_id\":\"";
    const char *p = resp ? strstr(resp, key) : NULL;
    if (!p)
        return NULL;
    p += sizeof key - 1;
    const char *end = strchr(p, '"');
    return end ? amp_xstrndup(p, (size_t)(end - p)) : NULL;
}

static bool rec_delivered(const json_t *rec) {
    return json_is_true(json_object_get(rec, "delivered"));
}

static int rec_status(const json_t *rec) {
    return (int)json_integer_value(json_object_get(rec, "status"));
}

/* Records whose raw body contains needle, in arrival order; caller owns. */
static json_t *records_with(fake_dify *f, const char *needle) {
    json_t *all = fake_dify_requests(f), *out = json_array();
    size_t i;
    json_t *r;
    json_array_foreach(all, i, r) {
        const char *raw = jstr(r, "raw_body");
        if (raw && strstr(raw, needle))
            json_array_append(out, r);
    }
    json_decref(all);
    return out;
}

/* Wait until some request containing needle was delivered. */
static json_t *wait_delivered(fake_dify *f, const char *needle, unsigned timeout_ms) {
    int64_t end = h_mono_ms() + timeout_ms;
    for (;;) {
        json_t *recs = records_with(f, needle);
        size_t i;
        json_t *r;
        json_array_foreach(recs, i, r) {
            if (rec_delivered(r))
                return recs;
        }
        if (h_mono_ms() > end) {
            char *dump = json_dumps(recs, JSON_COMPACT);
            ck_abort_msg("no delivery of '%s' within %u ms; requests: %.2000s", needle, timeout_ms,
                         dump);
        }
        json_decref(recs);
        h_sleep_ms(20);
    }
}

/* Wait until the dead letter with this dedupe key shows up; caller owns. */
static json_t *wait_dead(const h_server *s, const char *dedupe_key, unsigned timeout_ms) {
    int64_t end = h_mono_ms() + timeout_ms;
    for (;;) {
        json_t *list = dlq_list(s);
        size_t i;
        json_t *d;
        json_array_foreach(list, i, d) {
            if (jstr(d, "dedupe_key") && strcmp(jstr(d, "dedupe_key"), dedupe_key) == 0) {
                json_t *copy = json_deep_copy(d);
                json_decref(list);
                return copy;
            }
        }
        json_decref(list);
        ck_assert_msg(h_mono_ms() < end, "no dead letter '%s' within %u ms", dedupe_key,
                      timeout_ms);
        h_sleep_ms(50);
    }
}

/* ---- 50 users x 10 events, in order, one conversation each -------------------- */

static const char per_user_config[] =
    "{\"listen\": {\"address\": \"127.0.0.1\", \"port\": @PORT@},\n"
    " \"spool\": {\"path\": \"@DIR@/spool.db\"},\n"
    " \"log\": {\"level\": \"warn\"},\n"
    " \"dify\": {\"base_url\": \"http://127.0.0.1:@DIFY_PORT@/v1\", \"timeout_seconds\": 10,\n"
    "          \"workers\": 16, \"retry\": {\"initial_ms\": 20, \"max_ms\": 200}},\n"
    " \"apps\": {\"support\": {\"api_key_env\": \"DIFY_API_KEY\", \"endpoint\": \"chat\",\n"
    "                        \"response_mode\": \"%s\", \"max_in_flight\": 16}},\n"
    " \"routes\": [{\"name\": \"steps\", \"app\": \"support\",\n"
    "              \"query\": \"{{event_type}} #{{event_properties.seq}}\",\n"
    "              \"user\": \"{{user_id}}\", \"conversation\": \"per_user\"}]}\n";

static void check_user(json_t *all, int user, bool streaming) {
    char name[16];
    snprintf(name, sizeof name, "user-%02d", user);
    int next = 0; /* the seq the next delivered request must carry */
    char *conv = NULL;
    size_t i;
    json_t *r;
    json_array_foreach(all, i, r) {
        const char *u = rec_body_str(r, "user");
        if (!u || strcmp(u, name) != 0)
            continue;
        ck_assert_msg(json_is_true(json_object_get(r, "streaming")) == streaming ||
                          rec_status(r) != 200,
                      "%s: response mode", name);
        const char *q = rec_body_str(r, "query");
        char want[32];
        snprintf(want, sizeof want, "Step #%d", next);
        /* One at a time, in order: every request is for the event after the
         * last delivered one (earlier attempts of it may have failed). */
        ck_assert_msg(q && strcmp(q, want) == 0, "%s: got '%s', expected '%s'", name,
                      q ? q : "(none)", want);
        const char *sent = rec_body_str(r, "conversation_id");
        if (conv)
            ck_assert_msg(sent && strcmp(sent, conv) == 0, "%s: %s sent conversation '%s', not %s",
                          name, want, sent ? sent : "(none)", conv);
        else
            ck_assert_msg(!sent || !*sent, "%s: a conversation before the first answer", name);
        if (rec_delivered(r)) {
            char *got = answer_conversation(r);
            ck_assert_msg(got != NULL, "%s: no conversation_id in the answer", name);
            if (conv) {
                ck_assert_str_eq(got, conv);
                free(got);
            } else {
                conv = got;
            }
            next++;
        }
    }
    ck_assert_msg(next == EVENTS_PER_USER, "%s: %d of %d events delivered", name, next,
                  EVENTS_PER_USER);
    free(conv);
}

static void run_per_user(bool streaming) {
    fake_dify *f = h_fake_start();
    if (streaming) {
        /* Odd chunk sizes: frames split anywhere. */
        fake_dify_behaviour b = {.stream_chunk = 5};
        fake_dify_set_default(f, &b);
    }
    fake_dify_set_fail_rate(f, 0.2, streaming ? 7 : 3);
    char *config = amp_xasprintf(per_user_config, streaming ? "streaming" : "blocking");
    h_server *s = h_server_start_with(config, f);

    int64_t t0 = h_mono_ms();
    post_all_users(s);
    size_t total = USERS * EVENTS_PER_USER;
    size_t got = fake_dify_wait_delivered(f, total, 60000);
    ck_assert_msg(got == total, "%zu of %zu delivered", got, total);
    int64_t took = h_mono_ms() - t0;
    h_sleep_ms(200); /* nothing more may arrive */

    json_t *all = fake_dify_requests(f);
    size_t failed = 0, i;
    json_t *r;
    json_array_foreach(all, i, r) {
        if (rec_status(r) == 500)
            failed++;
    }
    /* The fail rate was in force (so retries and ordering were tested). */
    ck_assert_msg(failed >= total / 10, "only %zu failed requests of %zu", failed,
                  json_array_size(all));
    ck_assert_uint_eq(fake_dify_delivered(f), total);
    for (int u = 0; u < USERS; u++)
        check_user(all, u, streaming);
    json_decref(all);

    json_t *dead = dlq_list(s);
    ck_assert_uint_eq(json_array_size(dead), 0);
    json_decref(dead);
    fprintf(stderr, "per_user %s: %zu events, %zu requests (%zu failed) in %lld ms\n",
            streaming ? "streaming" : "blocking", total, total + failed, failed, (long long)took);
    h_server_stop_ok(s);
    fake_dify_stop(f);
    free(config);
}

START_TEST(per_user_blocking) {
    run_per_user(false);
}
END_TEST

START_TEST(per_user_streaming) {
    run_per_user(true);
}
END_TEST

/* ---- rate limit ------------------------------------------------------------ */

static const char rate_config[] =
    "{\"listen\": {\"address\": \"127.0.0.1\", \"port\": @PORT@},\n"
    " \"spool\": {\"path\": \"@DIR@/spool.db\"},\n"
    " \"dify\": {\"base_url\": \"http://127.0.0.1:@DIFY_PORT@/v1\", \"timeout_seconds\": 10,\n"
    "          \"workers\": 16, \"retry\": {\"initial_ms\": 50, \"max_ms\": 200}},\n"
    " \"apps\": {\"paced\": {\"api_key_env\": \"DIFY_API_KEY\", \"endpoint\": \"completion\",\n"
    "                      \"rate_per_sec\": 20, \"burst\": 1, \"max_in_flight\": 4}},\n"
    " \"routes\": [{\"name\": \"all\", \"app\": \"paced\", \"query\": \"{{insert_id}}\"}]}\n";

#define RATE_EVENTS 100
#define RATE 20.0

static int cmp_i64(const void *a, const void *b) {
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return x < y ? -1 : x > y;
}

START_TEST(rate_limit) {
    fake_dify *f = h_fake_start();
    h_server *s = h_server_start_with(rate_config, f);
    /* All at once, in one request: the limit alone must spread them. */
    post_one(s, events_array("Paced", "rate", RATE_EVENTS, false));

    size_t got = fake_dify_wait_delivered(f, RATE_EVENTS, 20000);
    ck_assert_uint_eq(got, RATE_EVENTS);
    json_t *all = fake_dify_requests(f);
    ck_assert_uint_eq(json_array_size(all), RATE_EVENTS);
    int64_t t[RATE_EVENTS];
    for (size_t i = 0; i < RATE_EVENTS; i++)
        t[i] = json_integer_value(json_object_get(json_array_get(all, i), "arrived_ms"));
    json_decref(all);
    qsort(t, RATE_EVENTS, sizeof t[0], cmp_i64);

    /* burst 1: request k may go at k / rate. 99 intervals of 50 ms. */
    double span = (double)(t[RATE_EVENTS - 1] - t[0]);
    double ideal = (RATE_EVENTS - 1) * 1000.0 / RATE;
    double rate = (RATE_EVENTS - 1) * 1000.0 / span;
    int slow_gaps = 0;
    int64_t max_gap = 0;
    for (int i = 1; i < RATE_EVENTS; i++) {
        slow_gaps += t[i] - t[i - 1] > 60;
        if (t[i] - t[i - 1] > max_gap)
            max_gap = t[i] - t[i - 1];
    }
    fprintf(stderr,
            "rate_limit: %d requests over %.0f ms = %.2f/s (limit %.0f/s); %d gaps over 60 ms, "
            "longest %lld ms\n",
            RATE_EVENTS, span, rate, RATE, slow_gaps, (long long)max_gap);
    /* The limit is what a request may not run ahead of; a busy machine may
     * only make the whole run slower, so the upper bound is loose (it still
     * catches a limit applied twice). */
    ck_assert_msg(span >= ideal * 0.9 && span <= ideal * 1.5,
                  "100 requests took %.0f ms; at %.0f/s that is %.0f ms (-10%%, +50%%)", span, RATE,
                  ideal);
    /* No window runs ahead of the limit either: any 41 consecutive
     * requests span at least 40 intervals, less 200 ms. A request sent late
     * does not delay the next one's slot, so a window whose first request
     * was late (a busy machine) is that much shorter; 200 ms is a generous
     * bound on that lateness, and a limit over 22.2/s still fails. */
    for (int i = 0; i + 40 < RATE_EVENTS; i++)
        ck_assert_msg(t[i + 40] - t[i] >= (int64_t)(40 * 1000.0 / RATE) - 200,
                      "requests %d..%d within %lld ms", i, i + 40, (long long)(t[i + 40] - t[i]));
    h_server_stop_ok(s);
    fake_dify_stop(f);
}
END_TEST

/* ---- pause on a rejected key ------------------------------------------------- */

static const char pause_config[] =
    "{\"listen\": {\"address\": \"127.0.0.1\", \"port\": @PORT@},\n"
    " \"spool\": {\"path\": \"@DIR@/spool.db\"},\n"
    " \"dify\": {\"base_url\": \"http://127.0.0.1:@DIFY_PORT@/v1\", \"timeout_seconds\": 10,\n"
    "          \"workers\": 8, \"retry\": {\"initial_ms\": 50, \"max_ms\": 2000}},\n"
    " \"apps\": {\"support\": {\"api_key_env\": \"DIFY_API_KEY\", \"endpoint\": \"chat\",\n"
    "                        \"max_in_flight\": 4}},\n"
    " \"routes\": [{\"name\": \"all\", \"app\": \"support\", \"query\": \"{{insert_id}}\",\n"
    "              \"user\": \"{{user_id}}\"}]}\n";

#define PAUSE_EVENTS 20

START_TEST(pause_and_resume) {
    fake_dify *f = h_fake_start();
    /* The app is disabled (403) and then its key revoked (401): the fake
     * rejects everything until the test "fixes the key". */
    fake_dify_behaviour reject = {.status = 401};
    fake_dify_set_default(f, &reject);
    fake_dify_push_status(f, 403);
    h_server *s = h_server_start_with(pause_config, f);

    int64_t t0 = h_mono_ms();
    post_one(s, events_array("Paused", "pause", PAUSE_EVENTS, true));

    /* Probes at about 1 s and then 2 s intervals (retry.max_ms 2000). */
    ck_assert(h_server_log_wait(s, "\"msg\":\"dify app paused\"", 5000));
    ck_assert(h_metric_wait(s, "amp2dify_app_paused{app=\"support\"}", 1, 5000) == 1);
    while (h_mono_ms() - t0 < 5500)
        h_sleep_ms(50);
    ck_assert_uint_eq(fake_dify_delivered(f), 0);

    /* Key fixed: the next probe succeeds and everything follows. */
    fake_dify_behaviour ok = {0};
    fake_dify_set_default(f, &ok);
    int64_t fixed = h_mono_ms();
    size_t got = fake_dify_wait_delivered(f, PAUSE_EVENTS, 8000);
    int64_t caught_up = h_mono_ms() - fixed;
    ck_assert_msg(got == PAUSE_EVENTS, "%zu of %d delivered after the key was fixed", got,
                  PAUSE_EVENTS);
    /* At most one probe interval (2 s) plus the catch-up itself. */
    ck_assert_msg(caught_up < 3500, "caught up %lld ms after the key was fixed",
                  (long long)caught_up);

    json_t *all = fake_dify_requests(f);
    int64_t rejected[64];
    size_t nrej = 0, i;
    json_t *r;
    json_array_foreach(all, i, r) {
        int st = rec_status(r);
        if ((st == 401 || st == 403) && nrej < 64)
            rejected[nrej++] = json_integer_value(json_object_get(r, "arrived_ms"));
    }
    qsort(rejected, nrej, sizeof rejected[0], cmp_i64);
    /* The first wave (requests already on their way when the first answer
     * came) is at most max_in_flight; after it, one probe at a time with
     * growing gaps: ~1 s, then ~2 s. */
    size_t wave = 0;
    while (wave < nrej && rejected[wave] - rejected[0] < 500)
        wave++;
    ck_assert_msg(wave >= 1 && wave <= 4, "first wave of %zu rejected requests", wave);
    size_t probes = nrej - wave;
    ck_assert_msg(probes >= 2 && probes <= 3, "%zu rejected probes in ~5.5 s", probes);
    int64_t prev = rejected[wave - 1];
    for (size_t k = wave; k < nrej; k++) {
        int64_t gap = rejected[k] - prev;
        int64_t want = k == wave ? 1000 : 2000;
        ck_assert_msg(gap >= want * 9 / 10, "probe %zu came %lld ms after the previous one",
                      k - wave + 1, (long long)gap);
        prev = rejected[k];
    }
    /* Every event delivered exactly once: nothing was spent on the pause. */
    ck_assert_uint_eq(fake_dify_delivered(f), PAUSE_EVENTS);
    json_decref(all);
    json_t *dead = dlq_list(s);
    ck_assert_uint_eq(json_array_size(dead), 0);
    json_decref(dead);

    /* The log names the app and the status (of whichever rejection came
     * back first), never the key. */
    json_t *lines = h_server_log_lines(s, "dify app paused");
    ck_assert_uint_eq(json_array_size(lines), 1);
    json_t *line = json_array_get(lines, 0);
    ck_assert_str_eq(jstr(line, "app"), "support");
    json_int_t status = json_integer_value(json_object_get(line, "status"));
    ck_assert_msg(status == 401 || status == 403, "paused on status %lld", (long long)status);
    json_decref(lines);
    ck_assert(h_server_log_wait(s, "\"msg\":\"dify app resumed\"", 2000));
    char *log = h_server_log(s);
    ck_assert_ptr_null(strstr(log, H_API_KEY));
    free(log);
    ck_assert(h_metric(s, "amp2dify_app_paused{app=\"support\"}") == 0);
    fprintf(stderr, "pause_and_resume: %zu rejected (%zu probes), caught up in %lld ms\n", nrej,
            probes, (long long)caught_up);
    h_server_stop_ok(s);
    fake_dify_stop(f);
}
END_TEST

/* ---- every outcome, one event at a time -------------------------------------- */

static const char outcomes_config[] =
    "{\"listen\": {\"address\": \"127.0.0.1\", \"port\": @PORT@},\n"
    " \"spool\": {\"path\": \"@DIR@/spool.db\"},\n"
    " \"log\": {\"level\": \"warn\"},\n"
    " \"dify\": {\"base_url\": \"http://127.0.0.1:@DIFY_PORT@/v1\", \"timeout_seconds\": 1,\n"
    "          \"workers\": 1, \"retry\": {\"initial_ms\": 20, \"max_ms\": 100}},\n"
    " \"apps\": {\"chat\": {\"api_key_env\": \"DIFY_API_KEY\", \"endpoint\": \"chat\"},\n"
    "          \"flow\": {\"api_key_env\": \"DIFY_API_KEY\", \"endpoint\": \"workflow\"},\n"
    "          \"stream\": {\"api_key_env\": \"DIFY_API_KEY\", \"endpoint\": \"chat\",\n"
    "                     \"response_mode\": \"streaming\"}},\n"
    " \"routes\": [\n"
    "  {\"name\": \"chat\", \"app\": \"chat\", \"conversation\": \"per_user\",\n"
    "   \"filter\": {\"field\": \"event_type\", \"op\": \"prefix\", \"value\": \"Chat\"},\n"
    "   \"query\": \"{{insert_id}}\", \"user\": \"{{user_id}}\"},\n"
    "  {\"name\": \"flow\", \"app\": \"flow\",\n"
    "   \"filter\": {\"field\": \"event_type\", \"op\": \"prefix\", \"value\": \"Flow\"},\n"
    "   \"map\": [{\"source\": \"insert_id\", \"target\": \"id\"}], \"user\": \"{{user_id}}\"},\n"
    "  {\"name\": \"stream\", \"app\": \"stream\",\n"
    "   \"filter\": {\"field\": \"event_type\", \"op\": \"prefix\", \"value\": \"Stream\"},\n"
    "   \"query\": \"{{insert_id}}\", \"user\": \"{{user_id}}\"}]}\n";

/* Post one event whose insert_id (and query) is id. */
static void post_case(const h_server *s, const char *type, const char *user, const char *id) {
    char *ev = h_event(type, user, id);
    post_one(s, ev);
    free(ev);
}

/* The event goes through the scripted answers, then is delivered after
 * exactly `attempts` requests (or at least, when at_least). */
static json_t *expect_delivered(fake_dify *f, const char *id, size_t attempts, bool at_least) {
    json_t *recs = wait_delivered(f, id, 10000);
    if (at_least)
        ck_assert_msg(json_array_size(recs) >= attempts, "%s: %zu requests, expected >= %zu", id,
                      json_array_size(recs), attempts);
    else
        ck_assert_msg(json_array_size(recs) == attempts, "%s: %zu requests, expected %zu", id,
                      json_array_size(recs), attempts);
    return recs;
}

static void expect_dead(const h_server *s, fake_dify *f, const char *id, int status,
                        const char *code, const char *message) {
    json_t *d = wait_dead(s, id, 10000);
    ck_assert_int_eq(json_integer_value(json_object_get(d, "status")), status);
    ck_assert_str_eq(jstr(d, "code"), code);
    if (message)
        ck_assert_str_eq(jstr(d, "message"), message);
    ck_assert_int_eq(json_integer_value(json_object_get(d, "attempts")), 1);
    json_decref(d);
    json_t *recs = records_with(f, id);
    ck_assert_uint_eq(json_array_size(recs), 1); /* never retried */
    json_decref(recs);
}

START_TEST(outcomes) {
    fake_dify *f = h_fake_start();
    h_server *s = h_server_start_with(outcomes_config, f);

    /* 429 with Retry-After: 1 — the retry waits a second, not the 20 ms backoff. */
    fake_dify_behaviour b429 = {.status = 429, .retry_after = "1"};
    fake_dify_push(f, &b429);
    post_case(s, "Chat", "u-429", "case-429");
    json_t *recs = expect_delivered(f, "case-429", 2, false);
    int64_t gap = json_integer_value(json_object_get(json_array_get(recs, 1), "arrived_ms")) -
                  json_integer_value(json_object_get(json_array_get(recs, 0), "arrived_ms"));
    ck_assert_msg(gap >= 950, "Retry-After: 1 honoured after %lld ms", (long long)gap);
    json_decref(recs);

    /* 5xx, one of them an HTML page from a proxy, then 408. */
    fake_dify_push_status(f, 500);
    fake_dify_behaviour b502 = {.status = 502,
                                .html_body = "<html><body>Bad gateway</body></html>"};
    fake_dify_push(f, &b502);
    fake_dify_push_status(f, 503);
    fake_dify_push_status(f, 504);
    fake_dify_push_status(f, 408);
    post_case(s, "Chat", "u-5xx", "case-5xx");
    json_decref(expect_delivered(f, "case-5xx", 6, false));

    /* Timeout (timeout_seconds 1, the answer would take 1.5 s). The fake
     * records the slow request when it answers, after the retry. */
    fake_dify_behaviour slow = {.delay_ms = 1500};
    fake_dify_push(f, &slow);
    size_t before = fake_dify_count(f);
    post_case(s, "Chat", "u-slow", "case-timeout");
    json_decref(wait_delivered(f, "case-timeout", 10000));
    ck_assert_uint_ge(fake_dify_wait_count(f, before + 2, 3000), before + 2);
    json_decref(expect_delivered(f, "case-timeout", 2, false));

    /* Connection dropped without an answer. */
    fake_dify_behaviour drop = {.drop = true};
    fake_dify_push(f, &drop);
    post_case(s, "Chat", "u-drop", "case-drop");
    recs = expect_delivered(f, "case-drop", 2, true);
    ck_assert_int_eq(rec_status(json_array_get(recs, 0)), 0);
    json_decref(recs);

    /* Dify's concurrency limit, spelled as a 400. */
    fake_dify_behaviour busy = {
        .status = 400,
        .code = "invalid_param",
        .message = "Too many requests. The current maximum concurrent requests allowed for "
                   "this app is 1."};
    fake_dify_push(f, &busy);
    post_case(s, "Chat", "u-busy", "case-busy");
    json_decref(expect_delivered(f, "case-busy", 2, false));

    /* An in-stream error with a retryable status, then a stream cut in
     * 3-byte pieces. */
    fake_dify_behaviour sse429 = {.status = 429, .sse_error = true};
    fake_dify_push(f, &sse429);
    fake_dify_behaviour chunky = {.stream_chunk = 3};
    fake_dify_push(f, &chunky);
    post_case(s, "Stream", "u-stream", "case-stream-retry");
    recs = expect_delivered(f, "case-stream-retry", 2, false);
    ck_assert(json_is_true(json_object_get(json_array_get(recs, 1), "streaming")));
    json_decref(recs);

    /* Permanent: dead-lettered at once with Dify's status, code, message. */
    fake_dify_push_status(f, 400);
    post_case(s, "Chat", "u-bad", "case-400");
    expect_dead(s, f, "case-400", 400, "app_unavailable",
                "App unavailable, please check your app configurations.");

    fake_dify_behaviour param = {
        .status = 400, .code = "invalid_param", .message = "inputs is required in input form"};
    fake_dify_push(f, &param);
    post_case(s, "Chat", "u-param", "case-param");
    expect_dead(s, f, "case-param", 400, "invalid_param", "inputs is required in input form");

    fake_dify_push_status(f, 413);
    post_case(s, "Chat", "u-413", "case-413");
    expect_dead(s, f, "case-413", 413, "request_entity_too_large", NULL);

    fake_dify_behaviour quota = {.status = 400,
                                 .sse_error = true,
                                 .code = "provider_quota_exceeded",
                                 .message = "Your quota for this model has been exhausted."};
    fake_dify_push(f, &quota);
    post_case(s, "Stream", "u-quota", "case-stream-dead");
    expect_dead(s, f, "case-stream-dead", 400, "provider_quota_exceeded",
                "Your quota for this model has been exhausted.");

    /* A workflow that ran and failed is permanent too, with its error. */
    fake_dify_behaviour wf = {.workflow_failed = true, .message = "Node LLM run failed: boom"};
    fake_dify_push(f, &wf);
    post_case(s, "Flow", "u-flow", "case-flow-failed");
    expect_dead(s, f, "case-flow-failed", 200, "workflow_failed", "Node LLM run failed: boom");
    post_case(s, "Flow", "u-flow", "case-flow-ok");
    json_decref(expect_delivered(f, "case-flow-ok", 1, false));

    /* Dify forgot the conversation: the event is sent again as a new one,
     * and the user's next event continues the new conversation. */
    post_case(s, "Chat", "u-conv", "case-conv-1");
    recs = expect_delivered(f, "case-conv-1", 1, false);
    char *first = answer_conversation(json_array_get(recs, 0));
    ck_assert_ptr_nonnull(first);
    json_decref(recs);
    fake_dify_behaviour gone = {
        .status = 404, .code = "not_found", .message = "Conversation Not Exists."};
    fake_dify_push(f, &gone);
    post_case(s, "Chat", "u-conv", "case-conv-2");
    recs = expect_delivered(f, "case-conv-2", 2, false);
    ck_assert_str_eq(rec_body_str(json_array_get(recs, 0), "conversation_id"), first);
    ck_assert_ptr_null(rec_body_str(json_array_get(recs, 1), "conversation_id"));
    char *second = answer_conversation(json_array_get(recs, 1));
    ck_assert_ptr_nonnull(second);
    ck_assert_str_ne(second, first);
    json_decref(recs);
    post_case(s, "Chat", "u-conv", "case-conv-3");
    recs = expect_delivered(f, "case-conv-3", 1, false);
    ck_assert_str_eq(rec_body_str(json_array_get(recs, 0), "conversation_id"), second);
    json_decref(recs);
    free(first);
    free(second);

    /* Exactly the five permanent cases are dead letters. */
    json_t *dead = dlq_list(s);
    ck_assert_uint_eq(json_array_size(dead), 5);
    json_decref(dead);
    ck_assert_uint_eq(fake_dify_pending(f), 0);
    h_server_stop_ok(s);
    fake_dify_stop(f);
}
END_TEST

/* CHAT_ROUTE sends events to app "a" (chat), and is left open for a
 * filter. */
#define CHAT_ROUTE                                                                                 \
    "{\"name\": \"chat\", \"app\": \"a\", \"query\": \"{{event_type}} {{insert_id}}\""

/* Rewrites the server's config: its listener, spool and fake Dify, DIFY
 * (more members of "dify", "" for none) and REST (the apps and routes);
 * then SIGHUP, and waits for "config reloaded". */
static void reload_config(h_server *s, const char *dify, const char *rest) {
    char *path = amp_xasprintf("%s/amp2dify.json", h_server_dir(s));
    FILE *out = fopen(path, "w");
    ck_assert_ptr_nonnull(out);
    fprintf(out,
            "{\"listen\": {\"address\": \"127.0.0.1\", \"port\": %u},"
            " \"spool\": {\"path\": \"%s/spool.db\"},"
            " \"dify\": {\"base_url\": \"http://127.0.0.1:%u/v1\"%s}, %s",
            (unsigned)h_server_port(s), h_server_dir(s), (unsigned)h_server_dify_port(s), dify,
            rest);
    ck_assert_int_eq(fclose(out), 0);
    free(path);
    ck_assert_int_eq(kill(h_server_pid(s), SIGHUP), 0);
    ck_assert_msg(h_server_log_wait(s, "config reloaded", 15000), "no 'config reloaded' line");
}

/* SPEC: "SIGHUP reloads the config atomically". A reload that adds an app
 * and a route to it restarts delivery under the new config: the new
 * route's events reach the new app's endpoint, the others still reach the
 * old one, and nothing posted around the reload is lost. */
START_TEST(reload_adds_an_app) {
    fake_dify *f = h_fake_start();
    h_server *s =
        h_server_start_with("{\"listen\": {\"address\": \"127.0.0.1\", \"port\": @PORT@},"
                            " \"spool\": {\"path\": \"@DIR@/spool.db\"},"
                            " \"dify\": {\"base_url\": \"http://127.0.0.1:@DIFY_PORT@/v1\"},"
                            " \"apps\": {\"a\": {}}, \"routes\": [" CHAT_ROUTE "}]}",
                            f);
    char *ev = h_event("E", "user-1", "ins-before");
    post_one(s, ev);
    free(ev);
    json_decref(wait_delivered(f, "ins-before", 10000));

    reload_config(s, "",
                  "\"apps\": {\"a\": {}, \"b\": {\"endpoint\": \"completion\"}},"
                  " \"routes\": [" CHAT_ROUTE ", \"filter\": {\"field\": \"event_type\","
                  " \"op\": \"not_equals\", \"value\": \"F\"}},"
                  " {\"name\": \"compl\", \"app\": \"b\", \"filter\": {\"field\":"
                  " \"event_type\", \"op\": \"equals\", \"value\": \"F\"},"
                  " \"map\": [{\"source\": \"insert_id\", \"target\": \"id\"}]}]}");
    json_t *lines = h_server_log_lines(s, "config reloaded");
    ck_assert_str_eq(jstr(json_array_get(lines, 0), "delivery_restarted"), "apps");
    json_decref(lines);

    ev = h_event("F", "user-1", "ins-after-f");
    post_one(s, ev);
    free(ev);
    ev = h_event("E", "user-1", "ins-after-e");
    post_one(s, ev);
    free(ev);
    json_t *recs = wait_delivered(f, "ins-after-f", 10000);
    ck_assert_uint_eq(json_array_size(recs), 1);
    ck_assert_str_eq(jstr(json_array_get(recs, 0), "path"), "/v1/completion-messages");
    json_decref(recs);
    recs = wait_delivered(f, "ins-after-e", 10000);
    ck_assert_uint_eq(json_array_size(recs), 1);
    ck_assert_str_eq(jstr(json_array_get(recs, 0), "path"), "/v1/chat-messages");
    json_decref(recs);
    ck_assert_uint_eq(fake_dify_delivered(f), 3);
    h_server_stop_ok(s);
    fake_dify_stop(f);
}
END_TEST

/* dify.nice (README): delivery threads run at a lower priority than
 * ingest, so that when the CPUs are busy, requests are answered first. By
 * default the dispatcher and the workers are 15 nicer than the process,
 * the HTTP and spool threads keep its niceness; a reload that sets
 * "nice": 0 restarts delivery at the process's niceness. */
START_TEST(delivery_threads_yield_to_ingest) {
    fake_dify *f = h_fake_start();
    h_server *s =
        h_server_start_with("{\"listen\": {\"address\": \"127.0.0.1\", \"port\": @PORT@},"
                            " \"spool\": {\"path\": \"@DIR@/spool.db\"},"
                            " \"dify\": {\"base_url\": \"http://127.0.0.1:@DIFY_PORT@/v1\","
                            " \"workers\": 3},"
                            " \"apps\": {\"a\": {}}, \"routes\": [" CHAT_ROUTE "}]}",
                            f);
    int pid = h_server_pid(s);
    int base = h_nice(pid);
    ck_assert_int_ne(base, INT_MIN);
    char why[160];
    int lowered = base + 15 > 19 ? 19 : base + 15;
    ck_assert_msg(h_wait_nice(pid, "amp-worker", 3, lowered, why, sizeof why), "%s", why);
    ck_assert_msg(h_wait_nice(pid, "amp-dispatch", 1, lowered, why, sizeof why), "%s", why);
    ck_assert_msg(h_wait_nice(pid, "MHD-worker", 0, base, why, sizeof why), "%s", why);
    ck_assert_msg(h_wait_nice(pid, "amp-commit", 1, base, why, sizeof why), "%s", why);
    char *ev = h_event("E", "user-1", "ins-nice-default");
    post_one(s, ev);
    free(ev);
    json_decref(wait_delivered(f, "ins-nice-default", 10000));

    reload_config(s, ", \"workers\": 3, \"nice\": 0",
                  "\"apps\": {\"a\": {}}, \"routes\": [" CHAT_ROUTE "}]}");
    ck_assert_msg(h_wait_nice(pid, "amp-worker", 3, base, why, sizeof why), "%s", why);
    ck_assert_msg(h_wait_nice(pid, "amp-dispatch", 1, base, why, sizeof why), "%s", why);
    ev = h_event("E", "user-1", "ins-nice-0");
    post_one(s, ev);
    free(ev);
    json_decref(wait_delivered(f, "ins-nice-0", 10000));
    h_server_stop_ok(s);
    fake_dify_stop(f);
}
END_TEST

static Suite *delivery_suite(void) {
    Suite *s = suite_create("delivery");
    TCase *tc = tcase_create("delivery");
    /* Generous for sanitizer builds; each case takes a few seconds. */
    tcase_set_timeout(tc, 150);
    tcase_add_test(tc, per_user_blocking);
    tcase_add_test(tc, per_user_streaming);
    tcase_add_test(tc, rate_limit);
    tcase_add_test(tc, pause_and_resume);
    tcase_add_test(tc, outcomes);
    tcase_add_test(tc, reload_adds_an_app);
    tcase_add_test(tc, delivery_threads_yield_to_ingest);
    suite_add_tcase(s, tc);
    return s;
}

int main(void) {
    if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK)
        return 1;
    int rc = amp_check_run(delivery_suite());
    curl_global_cleanup();
    return rc;
}
