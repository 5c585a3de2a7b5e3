/*
 * End-to-end tests of the Redis engine (queue.engine "redis"): real
 * amp2dify processes, a redis-server of the test's own, the fake Dify.
 *
 *   refused_redis_is_explained   a Redis without appendfsync always: check-config
 *                                exits 2 and says which setting; serve refuses to start
 *   redis_down_answers_503       Redis killed: webhooks 503 with Retry-After and
 *                                /readyz 503; back after its restart, nothing lost
 *   chaos_three_replicas         3 replicas, 4 clients posting signed events to them
 *                                for CHAOS_SECONDS, the fake Dify failing 30%: one
 *                                replica kill -9'd twice and restarted, redis-server
 *                                SIGKILLed once and restarted (AOF). Every 202 reaches
 *                                Dify, each user's events in order and in one
 *                                conversation, duplicates bounded; shard moves timed
 */
#include <check.h>
#include <hiredis/hiredis.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "../../base/alloc.h"
#include "../check_run.h"
#include "../fake_dify/fake_dify.h"
#include "harness.h"
#include "redis_server.h"

#define SHARDS 16
#define LEASE_MS 1000
/* The faults take about 10 s (two replica kills 2.5 s apart, then Redis's);
 * the clients post until CHAOS_SECONDS or 3 s after Redis is back. */
#define CHAOS_SECONDS 12
#define CLIENTS 4
#define USERS_PER_CLIENT 8
#define NUSERS (CLIENTS * USERS_PER_CLIENT)
#define REPLICAS 3

static const char config_fmt[] =
    "{\n"
    "  \"listen\": {\"address\": \"127.0.0.1\", \"port\": @PORT@},\n"
    "  \"queue\": {\"engine\": \"redis\", \"url\": \"%s\", \"shards\": %d, \"lease_ms\": %d%s},\n"
    "  \"dify\": {\"base_url\": \"http://127.0.0.1:@DIFY_PORT@/v1\", \"timeout_seconds\": 10,\n"
    "           \"workers\": 8, \"retry\": {\"initial_ms\": 20, \"max_ms\": 100}},\n"
    "  \"apps\": {\"support\": {\"api_key_env\": \"DIFY_API_KEY\", \"endpoint\": \"chat\"}},\n"
    "  \"routes\": [{\"name\": \"all\", \"app\": \"support\", \"query\": \"{{event_type}}\",\n"
    "              \"user\": \"{{user_id}}\", \"conversation\": \"per_user\"}],\n"
    "  \"shutdown_timeout_seconds\": 8\n"
    "}\n";

static char *config_for(const h_redis *r, const char *extra) {
    return amp_xasprintf(config_fmt, h_redis_url(r), SHARDS, LEASE_MS, extra ? extra : "");
}

static h_server *start_replica(const char *config, uint16_t dify_port) {
    h_opts o = {.config_json = config, .dify_port = dify_port};
    return h_server_start(&o);
}

/* POST one signed event to 127.0.0.1:port: the HTTP status (0: no answer). */
static long post_event(uint16_t port, const char *user, int seq, char **retry_after) {
    char *body = amp_xasprintf("{\"events\":[{\"event_type\":\"e%d\",\"user_id\":\"%s\","
                               "\"insert_id\":\"%s-%d\"}]}",
                               seq, user, user, seq);
    int64_t ts = (int64_t)time(NULL);
    char *sig = h_sign(body, strlen(body), ts, H_SECRET);
    char *sig_h = amp_xasprintf("X-Amplitude-Sig: %s", sig);
    char *ts_h = amp_xasprintf("X-Amplitude-Timestamp: %lld", (long long)ts);
    const char *hdrs[] = {ts_h, sig_h, "Content-Type: application/json", NULL};
    h_req req = {.path = H_WEBHOOK, .body = body, .headers = hdrs, .timeout_ms = 5000};
    h_resp *r = h_request_port(port, &req);
    long st = r->status;
    if (retry_after) {
        const char *ra = h_resp_header(r, "Retry-After");
        *retry_after = ra ? amp_xstrdup(ra) : NULL;
    }
    h_resp_free(r);
    free(ts_h);
    free(sig_h);
    free(sig);
    free(body);
    return st;
}

static long readyz(uint16_t port) {
    h_req req = {.path = "/readyz", .timeout_ms = 3000};
    h_resp *r = h_request_port(port, &req);
    long st = r->status;
    h_resp_free(r);
    return st;
}

/* Poll /readyz until it answers want (bounded): true when it did. */
static bool wait_ready(uint16_t port, long want, unsigned timeout_ms) {
    int64_t end = h_mono_ms() + timeout_ms;
    while (h_mono_ms() < end) {
        if (readyz(port) == want)
            return true;
        h_sleep_ms(50);
    }
    return false;
}

/* A config for check-config alone: the harness's placeholders filled. */
static char *placeholders(char *cfg) {
    for (char *p; (p = strstr(cfg, "@PORT@")) || (p = strstr(cfg, "@DIFY_PORT@"));) {
        size_t n = p[1] == 'P' ? 6 : 11;
        memcpy(p, "1", 1);
        memmove(p + 1, p + n, strlen(p + n) + 1);
    }
    return cfg;
}

/* ---- check-config and start against a Redis that does not fsync ---------- */

START_TEST(refused_redis_is_explained) {
    const char *weak[] = {"--appendfsync", "everysec", NULL};
    h_redis *r = h_redis_start(weak);
    ck_assert_ptr_nonnull(r);
    char *cfg = config_for(r, NULL);
    char *file_cfg = config_for(r, NULL);
    char dir[] = "/tmp/amp2dify-e2e-redis-XXXXXX";
    ck_assert_ptr_nonnull(mkdtemp(dir));
    char *path = amp_xasprintf("%s/config.json", dir);
    FILE *f = fopen(path, "w");
    ck_assert_ptr_nonnull(f);
    fputs(placeholders(file_cfg), f);
    fclose(f);
    const char *bin = h_bin();
    char *cmd = amp_xasprintf("AMP2DIFY_SECRETS=x DIFY_API_KEY=k timeout 20 %s check-config -c %s "
                              "2>&1",
                              bin, path);
    FILE *p = popen(cmd, "r");
    char out[2048] = "";
    size_t n = fread(out, 1, sizeof out - 1, p);
    out[n] = 0;
    int st = pclose(p);
    ck_assert_msg(WIFEXITED(st) && WEXITSTATUS(st) == 2, "check-config exit %d: %s", st, out);
    ck_assert_msg(strstr(out, "queue.url: found a Redis with appendfsync everysec; expected "
                              "appendonly yes, appendfsync always and maxmemory-policy noeviction"),
                  "%s", out);

    /* serve refuses it too, and says why. */
    h_opts o = {.config_json = cfg, .no_wait = true};
    h_server *s = h_server_start(&o);
    ck_assert_ptr_nonnull(s);
    int ws = h_server_wait_exit(s, 15000);
    ck_assert_msg(ws != -1 && WIFEXITED(ws) && WEXITSTATUS(ws) != 0, "serve did not refuse");
    char *log = h_server_log(s);
    ck_assert_msg(strstr(log, "appendfsync everysec"), "%s", log);
    /* The failure names the Redis engine and its URL, not the spool's path. */
    char *named = amp_xasprintf("\"engine\":\"redis\",\"target\":\"%s\"", h_redis_url(r));
    ck_assert_msg(strstr(log, "queue unavailable") && strstr(log, named), "%s", log);
    ck_assert_msg(!strstr(log, "spool"), "%s", log);
    free(named);
    free(log);
    h_server_stop(s);

    /* A password in the URL is not logged. */
    const char *hostport = strstr(h_redis_url(r), "://") + 3;
    char *pw_url = amp_xasprintf("redis://:s3cret-pw@%s", hostport);
    char *pw_cfg = amp_xasprintf(config_fmt, pw_url, SHARDS, LEASE_MS, "");
    o.config_json = pw_cfg;
    s = h_server_start(&o);
    ck_assert_ptr_nonnull(s);
    ws = h_server_wait_exit(s, 15000);
    ck_assert_msg(ws != -1 && WIFEXITED(ws) && WEXITSTATUS(ws) != 0, "serve did not refuse");
    log = h_server_log(s);
    named = amp_xasprintf("\"target\":\"redis://:***@%s\"", hostport);
    ck_assert_msg(strstr(log, named), "%s", log);
    ck_assert_msg(!strstr(log, "s3cret-pw"), "%s", log);
    free(named);
    free(log);
    h_server_stop(s);
    free(pw_cfg);
    free(pw_url);

    /* Opting in makes it acceptable. */
    char *cfg2 = config_for(r, ", \"allow_weak_durability\": true");
    f = fopen(path, "w");
    fputs(placeholders(cfg2), f);
    fclose(f);
    p = popen(cmd, "r");
    n = fread(out, 1, sizeof out - 1, p);
    out[n] = 0;
    st = pclose(p);
    ck_assert_msg(WIFEXITED(st) && WEXITSTATUS(st) == 0, "check-config exit %d: %s", st, out);
    unlink(path);
    rmdir(dir);
    free(cmd);
    free(path);
    free(cfg);
    free(cfg2);
    free(file_cfg);
    h_redis_stop(r);
}
END_TEST

/* ---- Redis down: 503 + Retry-After, /readyz 503, and back ----------------- */

START_TEST(redis_down_answers_503) {
    fake_dify *fd = fake_dify_start(0, H_API_KEY);
    ck_assert_ptr_nonnull(fd);
    h_redis *r = h_redis_start(NULL);
    ck_assert_ptr_nonnull(r);
    char *cfg = config_for(r, NULL);
    h_server *s = start_replica(cfg, fake_dify_port(fd));
    ck_assert_ptr_nonnull(s);
    uint16_t port = h_server_port(s);
    ck_assert(wait_ready(port, 200, 5000));
    ck_assert_int_eq(post_event(port, "alice", 0, NULL), 202);

    h_redis_kill(r, SIGKILL);
    ck_assert_msg(wait_ready(port, 503, 5000), "/readyz stayed ready with Redis down");
    char *ra = NULL;
    long st = post_event(port, "alice", 1, &ra);
    ck_assert_int_eq(st, 503);
    ck_assert_msg(ra && atoi(ra) > 0, "no Retry-After on 503");
    free(ra);

    ck_assert_int_eq(h_redis_restart(r), 0);
    ck_assert_msg(wait_ready(port, 200, 10000), "/readyz not ready after Redis came back");
    /* The sender retries the refused event: it is taken now. */
    int64_t end = h_mono_ms() + 5000;
    while ((st = post_event(port, "alice", 1, NULL)) != 202 && h_mono_ms() < end)
        h_sleep_ms(100);
    ck_assert_int_eq(st, 202);
    ck_assert_uint_eq(fake_dify_wait_delivered(fd, 2, 10000), 2);
    char *problem = h_server_stop_clean(s);
    ck_assert_msg(problem == NULL, "%s", problem);
    free(cfg);
    h_redis_stop(r);
    fake_dify_stop(fd);
}
END_TEST

/* ---- chaos ---------------------------------------------------------------- */

/* When the clients stop: CHAOS_SECONDS after the start, extended so that
 * they post for a while after Redis is back however slow the faults were. */
static _Atomic int64_t chaos_end_ms;

typedef struct client {
    int idx;
    uint16_t ports[REPLICAS];
    int next[USERS_PER_CLIENT]; /* per user: events answered 202 (seq 0..next-1) */
    long posts, refused;
    int64_t last_ok_ms; /* when the last 202 came */
} client;

static void user_name(char *buf, size_t len, int client_idx, int k) {
    snprintf(buf, len, "u%d-%d", client_idx, k);
}

static void *client_main(void *arg) {
    client *c = arg;
    unsigned rr = (unsigned)c->idx;
    for (int i = 0; h_mono_ms() < atomic_load(&chaos_end_ms); i++) {
        int k = i % USERS_PER_CLIENT;
        char user[32];
        user_name(user, sizeof user, c->idx, k);
        /* A user's next event only after the previous one got its 202;
         * a refused one is sent again (same insert_id) to the next replica. */
        long st = post_event(c->ports[rr++ % REPLICAS], user, c->next[k], NULL);
        c->posts++;
        if (st == 202) {
            c->next[k]++;
            c->last_ok_ms = h_mono_ms();
        } else
            c->refused++;
        h_sleep_ms(40);
    }
    return NULL;
}

static char *owner_of(h_server *s) {
    json_t *lines = h_server_log_lines(s, "redis queue open");
    size_t n = json_array_size(lines);
    const char *o =
        n ? json_string_value(json_object_get(json_array_get(lines, n - 1), "owner")) : NULL;
    char *out = o ? amp_xstrdup(o) : NULL;
    json_decref(lines);
    return out;
}

/* Shards whose lease owner is owner (NULL: shards without a lease). -1 when
 * Redis does not answer. */
static int shards_held(redisContext **c, const h_redis *r, const char *owner) {
    if (!*c || (*c)->err) {
        redisFree(*c);
        struct timeval tv = {.tv_sec = 1};
        *c = redisConnectWithTimeout("127.0.0.1", h_redis_port(r), tv);
        if (!*c || (*c)->err)
            return -1;
    }
    int n = 0;
    for (int s = 0; s < SHARDS; s++) {
        redisReply *rep = redisCommand(*c, "GET amp2dify:%d:lease", s);
        if (!rep)
            return -1;
        const char *colon = rep->type == REDIS_REPLY_STRING ? strchr(rep->str, ':') : NULL;
        if (owner ? colon && strcmp(colon + 1, owner) == 0 : !colon)
            n++;
        freeReplyObject(rep);
    }
    return n;
}

/* Time until the dead owner's shards have all moved (none held by it, none
 * free), bounded; -1 when they did not. */
static int64_t time_to_move(redisContext **c, const h_redis *r, const char *dead, int64_t since) {
    int64_t end = h_mono_ms() + 10000;
    while (h_mono_ms() < end) {
        if (shards_held(c, r, dead) == 0 && shards_held(c, r, NULL) == 0)
            return h_mono_ms() - since;
        h_sleep_ms(20);
    }
    return -1;
}

/* Time until a restarted replica holds shards again, bounded; -1 if never. */
static int64_t time_to_return(redisContext **c, const h_redis *r, const char *owner,
                              int64_t since) {
    int64_t end = h_mono_ms() + 10000;
    while (h_mono_ms() < end) {
        if (shards_held(c, r, owner) > 0 && shards_held(c, r, NULL) == 0)
            return h_mono_ms() - since;
        h_sleep_ms(20);
    }
    return -1;
}

static void kill_and_restart(h_server *s, redisContext **rc, const h_redis *r, int64_t *moved,
                             int64_t *back) {
    char *owner = owner_of(s);
    ck_assert_ptr_nonnull(owner);
    int64_t t0 = h_mono_ms();
    h_server_kill(s, SIGKILL, 0);
    *moved = time_to_move(rc, r, owner, t0);
    free(owner);
    int64_t t1 = h_mono_ms();
    ck_assert_int_eq(h_server_restart(s), 0);
    char *again = owner_of(s);
    ck_assert_ptr_nonnull(again);
    *back = time_to_return(rc, r, again, t1);
    free(again);
}

static int seq_of(const json_t *rec) {
    const char *q = json_string_value(json_object_get(json_object_get(rec, "body"), "query"));
    return q && q[0] == 'e' ? atoi(q + 1) : -1;
}

START_TEST(chaos_three_replicas) {
    fake_dify *fd = fake_dify_start(0, H_API_KEY);
    ck_assert_ptr_nonnull(fd);
    fake_dify_set_fail_rate(fd, 0.3, 42);
    h_redis *r = h_redis_start(NULL);
    ck_assert_ptr_nonnull(r);
    char *cfg = config_for(r, NULL);
    h_server *rep[REPLICAS];
    for (int i = 0; i < REPLICAS; i++) {
        rep[i] = start_replica(cfg, fake_dify_port(fd));
        ck_assert_ptr_nonnull(rep[i]);
    }
    redisContext *rc = NULL;
    /* Every shard leased before the load starts. */
    int64_t end = h_mono_ms() + 10000;
    while (shards_held(&rc, r, NULL) != 0 && h_mono_ms() < end)
        h_sleep_ms(20);

    client cl[CLIENTS];
    pthread_t th[CLIENTS];
    int64_t t_start = h_mono_ms();
    atomic_store(&chaos_end_ms, t_start + CHAOS_SECONDS * 1000);
    for (int i = 0; i < CLIENTS; i++) {
        memset(&cl[i], 0, sizeof cl[i]);
        cl[i].idx = i;
        for (int k = 0; k < REPLICAS; k++)
            cl[i].ports[k] = h_server_port(rep[k]);
        ck_assert_int_eq(pthread_create(&th[i], NULL, client_main, &cl[i]), 0);
    }

    int64_t moved[2], back[2];
    for (int round = 0; round < 2; round++) {
        h_sleep_ms(2500);
        kill_and_restart(rep[0], &rc, r, &moved[round], &back[round]);
    }
    h_sleep_ms(1000);
    int64_t t_redis = h_mono_ms();
    h_redis_kill(r, SIGKILL);
    h_sleep_ms(700);
    ck_assert_int_eq(h_redis_restart(r), 0);
    int64_t redis_down_ms = h_mono_ms() - t_redis;

    int64_t redis_back = h_mono_ms();
    if (atomic_load(&chaos_end_ms) < redis_back + 3000)
        atomic_store(&chaos_end_ms, redis_back + 3000);
    long posts = 0, refused = 0, accepted = 0, late_ok = 0;
    for (int i = 0; i < CLIENTS; i++) {
        pthread_join(th[i], NULL);
        posts += cl[i].posts;
        refused += cl[i].refused;
        late_ok += cl[i].last_ok_ms > redis_back + 1000;
        for (int k = 0; k < USERS_PER_CLIENT; k++)
            accepted += cl[i].next[k];
    }
    int64_t posting_ms = h_mono_ms() - t_start;

    /* Every accepted event delivered: wait (bounded) until each (user, seq)
     * shows among the fake's successful deliveries. */
    int64_t drain_start = h_mono_ms();
    long missing = accepted;
    json_t *all = NULL;
    while (h_mono_ms() < drain_start + 60000) {
        json_decref(all);
        all = fake_dify_requests(fd);
        static unsigned char seen[NUSERS][4096];
        memset(seen, 0, sizeof seen);
        size_t i;
        json_t *rec;
        json_array_foreach(all, i, rec) {
            if (!json_is_true(json_object_get(rec, "delivered")))
                continue;
            const char *u =
                json_string_value(json_object_get(json_object_get(rec, "body"), "user"));
            int ci, k, seq = seq_of(rec);
            if (!u || sscanf(u, "u%d-%d", &ci, &k) != 2 || seq < 0 || seq >= 4096)
                continue;
            seen[ci * USERS_PER_CLIENT + k][seq] = 1;
        }
        missing = 0;
        for (int ci = 0; ci < CLIENTS; ci++)
            for (int k = 0; k < USERS_PER_CLIENT; k++)
                for (int s = 0; s < cl[ci].next[k]; s++)
                    missing += !seen[ci * USERS_PER_CLIENT + k][s];
        if (missing == 0)
            break;
        h_sleep_ms(200);
    }
    int64_t drain_ms = h_mono_ms() - drain_start;
    h_sleep_ms(300); /* late duplicates would show now */
    json_decref(all);
    all = fake_dify_requests(fd);

    /* Per user: delivered seqs never go back (a duplicate repeats the last
     * one at most), one conversation id sent, duplicates counted. */
    int last[NUSERS], convs_created[NUSERS];
    char *conv[NUSERS];
    long delivered = 0, dups = 0, order_errors = 0, conv_errors = 0, attempts = 0;
    for (int u = 0; u < NUSERS; u++) {
        last[u] = -1;
        conv[u] = NULL;
        convs_created[u] = 0;
    }
    size_t i;
    json_t *rec;
    json_array_foreach(all, i, rec) {
        attempts++;
        if (!json_is_true(json_object_get(rec, "delivered")))
            continue;
        const json_t *body = json_object_get(rec, "body");
        const char *u = json_string_value(json_object_get(body, "user"));
        int ci, k, seq = seq_of(rec);
        if (!u || sscanf(u, "u%d-%d", &ci, &k) != 2)
            continue;
        int x = ci * USERS_PER_CLIENT + k;
        delivered++;
        if (seq < last[x]) {
            order_errors++;
            fprintf(stderr, "order: %s got e%d after e%d\n", u, seq, last[x]);
        }
        if (seq == last[x])
            dups++;
        last[x] = seq > last[x] ? seq : last[x];
        const char *cid = json_string_value(json_object_get(body, "conversation_id"));
        if (!cid || !*cid) {
            convs_created[x]++;
        } else if (!conv[x]) {
            conv[x] = amp_xstrdup(cid);
        } else if (strcmp(conv[x], cid) != 0) {
            conv_errors++;
            fprintf(stderr, "conversation: %s sent %s after %s\n", u, cid, conv[x]);
        }
    }
    int users_two_convs = 0;
    for (int u = 0; u < NUSERS; u++) {
        users_two_convs += convs_created[u] > 1;
        free(conv[u]);
    }
    fprintf(stderr,
            "chaos: %ld ms posting, %ld posts, %ld accepted (202), %ld refused (503 or no "
            "answer); Dify got %ld requests, %ld delivered, %ld duplicates, %d users with a "
            "second conversation; drained in %lld ms after posting stopped; replica kill 1: "
            "shards moved in %lld ms, back %lld ms after restart; kill 2: moved %lld ms, back "
            "%lld ms; redis-server down %lld ms\n",
            (long)posting_ms, posts, accepted, refused, attempts, delivered, dups, users_two_convs,
            (long long)drain_ms, (long long)moved[0], (long long)back[0], (long long)moved[1],
            (long long)back[1], (long long)redis_down_ms);
    ck_assert_msg(missing == 0, "%ld accepted events never reached Dify", missing);
    ck_assert_int_eq(order_errors, 0);
    ck_assert_int_eq(conv_errors, 0);
    ck_assert_int_gt(accepted, 100);
    ck_assert_msg(late_ok == CLIENTS, "only %ld clients got a 202 after Redis came back", late_ok);
    /* At most one event per user in flight at each of the three faults,
     * plus one per user for a shard handed over with its job still out. */
    ck_assert_msg(dups <= NUSERS * 4, "%ld duplicates", dups);
    for (int k = 0; k < 2; k++) {
        ck_assert_msg(moved[k] >= 0 && moved[k] <= 3 * LEASE_MS + 1000,
                      "shards of the killed replica moved in %lld ms", (long long)moved[k]);
        ck_assert_msg(back[k] >= 0, "the restarted replica got no shard back");
    }
    json_decref(all);
    redisFree(rc);
    for (int k = 0; k < REPLICAS; k++) {
        char *problem = h_server_stop_clean(rep[k]);
        ck_assert_msg(problem == NULL, "replica %d: %s", k, problem);
    }
    free(cfg);
    h_redis_stop(r);
    fake_dify_stop(fd);
}
END_TEST

int main(void) {
    Suite *su = suite_create("redis");
    TCase *tc = tcase_create("redis");
    tcase_set_timeout(tc, 150);
    tcase_add_test(tc, refused_redis_is_explained);
    tcase_add_test(tc, redis_down_answers_503);
    tcase_add_test(tc, chaos_three_replicas);
    suite_add_tcase(su, tc);
    return amp_check_run(su);
}
