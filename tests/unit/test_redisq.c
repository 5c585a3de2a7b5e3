/* The Redis engine's Lua scripts, called one by one against a redis-server
 * of the test's own (tests/e2e/redis_server.h), and the engine through the
 * queue interface. Fencing: a stale generation can neither claim nor
 * acknowledge; accept is idempotent; a retry keeps its stream entry. */
#include <arpa/inet.h>
#include <check.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "../../base/clock.h"
#include "../../base/log.h"
#include "../../redisq/redisq_int.h"
#include "../check_run.h"
#include "../e2e/harness.h"
#include "../e2e/redis_server.h"

static h_redis *srv;
static redisContext *c;
static rq_shas shas;

static void setup(void) {
    amp_log_set_level(AMP_LOG_ERROR);
    srv = h_redis_start(NULL);
    ck_assert_ptr_nonnull(srv);
    rq_url u;
    char err[256];
    ck_assert_int_eq(amp_redisq_parse_url(h_redis_url(srv), &u, err, sizeof err), 0);
    c = amp_redisq_connect(&u, err, sizeof err);
    ck_assert_msg(c != NULL, "%s", err);
    ck_assert_int_eq(amp_redisq_load_scripts(c, &shas, err, sizeof err), 0);
}

static void teardown(void) {
    redisFree(c);
    h_redis_stop(srv);
}

/* Run script with the NULL-terminated string arguments; caller frees. */
static redisReply *run(int script, ...) {
    rq_args a = {0};
    va_list ap;
    va_start(ap, script);
    for (const char *s; (s = va_arg(ap, const char *));)
        amp_redisq_args_str(&a, s);
    va_end(ap);
    redisReply *r = amp_redisq_eval(c, &shas, script, &a);
    amp_redisq_args_free(&a);
    ck_assert_ptr_nonnull(r);
    ck_assert_msg(r->type != REDIS_REPLY_ERROR, "script %d: %s", script, r->str);
    return r;
}

static long long cmd_int(const char *fmt, const char *arg) {
    redisReply *r = redisCommand(c, fmt, arg);
    ck_assert_ptr_nonnull(r);
    long long v = r->type == REDIS_REPLY_INTEGER ? r->integer : -1;
    freeReplyObject(r);
    return v;
}

/* One event with one request on shard 0, its source event SOURCE1. */
#define SOURCE1 "{\"device_id\":\"d1\"}"
static redisReply *accept1(const char *key, const char *user, const char *per_user,
                           const char *body) {
    return run(RQ_ACCEPT, RQ_PREFIX, "600", "1", key, "1", "0", "all", "support", user, per_user,
               body, SOURCE1, NULL);
}

/* Take shard 0 for owner: the token (static buffer). */
static const char *acquire0(const char *owner, char *token, size_t len) {
    char now[24];
    snprintf(now, sizeof now, "%lld", (long long)amp_now_ms());
    redisReply *r = run(RQ_ACQUIRE, RQ_PREFIX, "0", owner, "60000", now, NULL);
    ck_assert_int_eq(r->type, REDIS_REPLY_ARRAY);
    snprintf(token, len, "%s", r->element[0]->str);
    freeReplyObject(r);
    return token;
}

/* Claim from shard 0 at now_ms: the reply's shard entry {shard, ok, next, jobs}. */
static redisReply *claim0(const char *token, const char *owner, int64_t now_ms) {
    char now[24];
    snprintf(now, sizeof now, "%lld", (long long)now_ms);
    return run(RQ_CLAIM, RQ_PREFIX, now, "10", "t1", "0", token, owner, NULL);
}

static long long ack0(const char *token, const char *id, const char *kind, int64_t due_ms) {
    char due[24], now[24];
    snprintf(due, sizeof due, "%lld", (long long)due_ms);
    snprintf(now, sizeof now, "%lld", (long long)amp_now_ms());
    redisReply *r = run(RQ_ACK, RQ_PREFIX, "0", token, id, kind, due, now, "500", "boom",
                        "it failed", "", "", NULL);
    ck_assert_int_eq(r->type, REDIS_REPLY_INTEGER);
    long long v = r->integer;
    freeReplyObject(r);
    return v;
}

static size_t njobs(const redisReply *r) {
    const redisReply *s = r->element[0];
    return s->element[1]->integer == 1 ? s->element[3]->elements : 0;
}

static const char *job_field(const redisReply *r, size_t j, size_t f) {
    return r->element[0]->element[3]->element[j]->element[f]->str;
}

START_TEST(accept_is_idempotent_for_keyed_events) {
    redisReply *r = accept1("k1", "u1", "0", "{}");
    ck_assert_int_eq(r->element[0]->integer, 1);
    ck_assert_int_eq(r->element[1]->integer, 0);
    freeReplyObject(r);
    /* The same request again (its answer was lost): nothing new. */
    r = accept1("k1", "u1", "0", "{}");
    ck_assert_int_eq(r->element[0]->integer, 0);
    ck_assert_int_eq(r->element[1]->integer, 1);
    freeReplyObject(r);
    ck_assert_int_eq(cmd_int("XLEN %s", RQ_PREFIX "0:stream"), 1);
    ck_assert_int_gt(cmd_int("TTL %s", RQ_PREFIX "dedupe:k1"), 500);
}
END_TEST

START_TEST(stale_generation_can_neither_claim_nor_ack) {
    char ta[160], tb[160];
    acquire0("A", ta, sizeof ta);
    ck_assert_str_eq(ta, "1:A");
    freeReplyObject(accept1("k1", "u1", "1", "{\"q\":1}"));
    redisReply *r = claim0(ta, "A", amp_now_ms());
    ck_assert_uint_eq(njobs(r), 1);
    char id[48];
    snprintf(id, sizeof id, "%s", job_field(r, 0, 0));
    freeReplyObject(r);

    /* A stalls past its lease (the key expires); B takes the shard. */
    ck_assert_int_eq(cmd_int("DEL %s", RQ_PREFIX "0:lease"), 1);
    acquire0("B", tb, sizeof tb);
    ck_assert_str_eq(tb, "2:B");

    /* A wakes up: its claim and its acknowledgement are refused. */
    r = claim0(ta, "A", amp_now_ms());
    ck_assert_int_eq(r->element[0]->element[1]->integer, 0);
    freeReplyObject(r);
    ck_assert_int_eq(ack0(ta, id, "delivered", 0), 0);
    ck_assert_int_eq(ack0(ta, id, "retry", 0), 0);
    ck_assert_int_eq(cmd_int("XLEN %s", RQ_PREFIX "0:stream"), 1);
    ck_assert_int_eq(cmd_int("ZCARD %s", RQ_PREFIX "0:ready"), 1); /* A's claim was reset */
    r = run(RQ_RENEW, RQ_PREFIX, "60000", "0", ta, NULL);
    ck_assert_int_eq(r->element[0]->integer, 0);
    freeReplyObject(r);

    /* B owns the job now: same entry, attempts untouched by A. */
    r = claim0(tb, "B", amp_now_ms());
    ck_assert_uint_eq(njobs(r), 1);
    ck_assert_str_eq(job_field(r, 0, 0), id);
    ck_assert_str_eq(job_field(r, 0, 7), "0");
    freeReplyObject(r);
    /* While B has it claimed, A still cannot acknowledge it. */
    ck_assert_int_eq(ack0(ta, id, "delivered", 0), 0);
    ck_assert_int_eq(cmd_int("XLEN %s", RQ_PREFIX "0:stream"), 1);
    ck_assert_int_eq(ack0(tb, id, "delivered", 0), 1);
    ck_assert_int_eq(cmd_int("XLEN %s", RQ_PREFIX "0:stream"), 0);
    /* Acknowledged once: a second one finds no claim. */
    ck_assert_int_eq(ack0(tb, id, "delivered", 0), 2);
}
END_TEST

START_TEST(lease_is_exclusive_and_released_by_its_owner_only) {
    char ta[160];
    acquire0("A", ta, sizeof ta);
    char now[24];
    snprintf(now, sizeof now, "%lld", (long long)amp_now_ms());
    redisReply *r = run(RQ_ACQUIRE, RQ_PREFIX, "0", "B", "60000", now, NULL);
    ck_assert_int_eq(r->type, REDIS_REPLY_NIL);
    freeReplyObject(r);
    r = run(RQ_RELEASE, RQ_PREFIX, "0", "7:B", NULL);
    ck_assert_int_eq(r->integer, 0);
    freeReplyObject(r);
    r = run(RQ_RELEASE, RQ_PREFIX, "0", ta, NULL);
    ck_assert_int_eq(r->integer, 1);
    freeReplyObject(r);
    ck_assert_int_eq(cmd_int("EXISTS %s", RQ_PREFIX "0:lease"), 0);
}
END_TEST

START_TEST(retry_keeps_its_entry_and_waits_for_its_due_time) {
    char t[160];
    acquire0("A", t, sizeof t);
    freeReplyObject(accept1("k1", "u1", "0", "{}"));
    int64_t now = amp_now_ms();
    redisReply *r = claim0(t, "A", now);
    char id[48];
    snprintf(id, sizeof id, "%s", job_field(r, 0, 0));
    freeReplyObject(r);
    ck_assert_int_eq(ack0(t, id, "retry", now + 60000), 1);
    ck_assert_int_eq(cmd_int("XLEN %s", RQ_PREFIX "0:stream"), 1); /* no new XADD */
    r = claim0(t, "A", now + 1000);
    ck_assert_uint_eq(njobs(r), 0);
    ck_assert_int_eq(strtoll(r->element[0]->element[2]->str, NULL, 10), now + 60000);
    freeReplyObject(r);
    r = claim0(t, "A", now + 60000);
    ck_assert_uint_eq(njobs(r), 1);
    ck_assert_str_eq(job_field(r, 0, 0), id);
    ck_assert_str_eq(job_field(r, 0, 7), "1"); /* attempts */
    freeReplyObject(r);
    /* A release (not attempted) keeps the attempts. */
    ck_assert_int_eq(ack0(t, id, "release", now), 1);
    r = claim0(t, "A", now + 60000);
    ck_assert_str_eq(job_field(r, 0, 7), "1");
    freeReplyObject(r);
}
END_TEST

/* A claim whose answer was lost (Redis went away after the script ran):
 * the engine undoes it by its tag, and only its own claims under its own
 * lease. Without it the job stays claimed by nobody while the lease holds,
 * and its user's later jobs wait behind it. */
START_TEST(lost_claim_is_undone_by_its_tag) {
    char t[160];
    acquire0("A", t, sizeof t);
    freeReplyObject(accept1("k1", "u1", "1", "{\"n\":1}"));
    freeReplyObject(accept1("k2", "u1", "1", "{\"n\":2}"));
    redisReply *r = claim0(t, "A", amp_now_ms()); /* tag "t1"; its answer "lost" */
    ck_assert_uint_eq(njobs(r), 1);
    char id[48];
    snprintf(id, sizeof id, "%s", job_field(r, 0, 0));
    freeReplyObject(r);
    r = claim0(t, "A", amp_now_ms());
    ck_assert_uint_eq(njobs(r), 0);
    freeReplyObject(r);
    /* Another claim's tag, or a stale lease: nothing moves. */
    r = run(RQ_UNCLAIM, RQ_PREFIX, "t2", "0", "0", t, NULL);
    ck_assert_int_eq(r->integer, 0);
    freeReplyObject(r);
    r = run(RQ_UNCLAIM, RQ_PREFIX, "t1", "0", "0", "7:B", NULL);
    ck_assert_int_eq(r->integer, 0);
    freeReplyObject(r);
    r = run(RQ_UNCLAIM, RQ_PREFIX, "t1", "0", "0", t, NULL);
    ck_assert_int_eq(r->integer, 1);
    freeReplyObject(r);
    ck_assert_int_eq(cmd_int("HLEN %s", RQ_PREFIX "0:inflight"), 0);
    /* The same job again, first of its user, attempts untouched. */
    r = claim0(t, "A", amp_now_ms());
    ck_assert_uint_eq(njobs(r), 1);
    ck_assert_str_eq(job_field(r, 0, 0), id);
    ck_assert_str_eq(job_field(r, 0, 7), "0");
    freeReplyObject(r);
}
END_TEST

START_TEST(per_user_jobs_go_one_at_a_time_in_order) {
    char t[160];
    acquire0("A", t, sizeof t);
    freeReplyObject(accept1("a1", "u1", "1", "{\"n\":1}"));
    freeReplyObject(accept1("a2", "u1", "1", "{\"n\":2}"));
    freeReplyObject(accept1("b1", "u2", "1", "{\"n\":1}"));
    redisReply *r = claim0(t, "A", amp_now_ms());
    ck_assert_uint_eq(njobs(r), 2); /* u1's first and u2's */
    char id1[48];
    snprintf(id1, sizeof id1, "%s", job_field(r, 0, 0));
    ck_assert_str_eq(job_field(r, 0, 5), "{\"n\":1}");
    ck_assert_str_eq(job_field(r, 0, 3), "u1");
    freeReplyObject(r);
    r = claim0(t, "A", amp_now_ms());
    ck_assert_uint_eq(njobs(r), 0); /* u1's second waits for the first */
    freeReplyObject(r);
    /* A retry of the first keeps the second waiting. */
    ck_assert_int_eq(ack0(t, id1, "retry", amp_now_ms()), 1);
    r = claim0(t, "A", amp_now_ms());
    ck_assert_uint_eq(njobs(r), 1);
    ck_assert_str_eq(job_field(r, 0, 0), id1);
    freeReplyObject(r);
    /* Delivered, with a conversation: the second comes, carrying it. */
    char now[24];
    snprintf(now, sizeof now, "%lld", (long long)amp_now_ms());
    r = run(RQ_ACK, RQ_PREFIX, "0", t, id1, "delivered", "0", now, "200", "", "", "set", "conv-1",
            NULL);
    ck_assert_int_eq(r->integer, 1);
    freeReplyObject(r);
    r = claim0(t, "A", amp_now_ms());
    ck_assert_uint_eq(njobs(r), 1);
    ck_assert_str_eq(job_field(r, 0, 5), "{\"n\":2}");
    ck_assert_str_eq(job_field(r, 0, 8), "conv-1");
    freeReplyObject(r);
}
END_TEST

START_TEST(dead_letters_list_replay_purge) {
    char t[160];
    acquire0("A", t, sizeof t);
    freeReplyObject(accept1("k1", "u1", "1", "{}"));
    redisReply *r = claim0(t, "A", amp_now_ms());
    char id[48];
    snprintf(id, sizeof id, "%s", job_field(r, 0, 0));
    freeReplyObject(r);
    ck_assert_int_eq(ack0(t, id, "dead", 0), 1);
    ck_assert_int_eq(cmd_int("XLEN %s", RQ_PREFIX "0:stream"), 0);
    ck_assert_int_eq(cmd_int("XLEN %s", RQ_PREFIX "dead"), 1);
    ck_assert_int_eq(cmd_int("XLEN %s", RQ_PREFIX "0:stream"), 0);

    /* Through the admin handle: list, then replay. */
    amp_redisq_opts o = {.url = h_redis_url(srv), .shards = 1, .lease_ms = 1000};
    char err[256];
    amp_queue *q = amp_redisq_open_admin(&o, err, sizeof err);
    ck_assert_msg(q != NULL, "%s", err);
    amp_queue_dlq_filter f = {0};
    json_t *rows = amp_queue_dlq_list(q, &f, 10);
    ck_assert_uint_eq(json_array_size(rows), 1);
    json_t *row = json_array_get(rows, 0);
    ck_assert_int_eq(json_integer_value(json_object_get(row, "status")), 500);
    ck_assert_str_eq(json_string_value(json_object_get(row, "code")), "boom");
    ck_assert_int_eq(json_integer_value(json_object_get(row, "attempts")), 1);
    json_decref(rows);
    f.code = "other";
    ck_assert_int_eq(amp_queue_dlq_replay(q, &f), 0);
    f.code = "boom";
    ck_assert_int_eq(amp_queue_dlq_replay(q, &f), 1);
    ck_assert_int_eq(cmd_int("XLEN %s", RQ_PREFIX "dead"), 0);
    ck_assert_int_eq(cmd_int("XLEN %s", RQ_PREFIX "0:stream"), 1);

    /* The replayed job dies again; purge by id removes it for good. It kept
     * its source event through the dead letter and the replay. */
    r = claim0(t, "A", amp_now_ms());
    ck_assert_uint_eq(njobs(r), 1);
    ck_assert_str_eq(job_field(r, 0, 10), SOURCE1);
    snprintf(id, sizeof id, "%s", job_field(r, 0, 0));
    freeReplyObject(r);
    ck_assert_int_eq(ack0(t, id, "dead", 0), 1);
    f.code = NULL;
    rows = amp_queue_dlq_list(q, &f, 10);
    ck_assert_uint_eq(json_array_size(rows), 1);
    int64_t dead_id = json_integer_value(json_object_get(json_array_get(rows, 0), "id"));
    json_decref(rows);
    int64_t other = dead_id + 1;
    f.ids = &other;
    f.nids = 1;
    ck_assert_int_eq(amp_queue_dlq_purge(q, &f), 0);
    f.ids = &dead_id;
    ck_assert_int_eq(amp_queue_dlq_purge(q, &f), 1);
    ck_assert_int_eq(cmd_int("XLEN %s", RQ_PREFIX "dead"), 0);
    ck_assert_int_eq(cmd_int("XLEN %s", RQ_PREFIX "0:stream"), 0);
    amp_queue_close(q);
}
END_TEST

static void stored(void *ctx, const amp_queue_result *res) {
    *(int *)ctx = res->status == 0 ? (int)res->accepted : -1;
}

START_TEST(engine_submits_claims_and_acknowledges) {
    amp_redisq_opts o = {
        .url = h_redis_url(srv), .shards = 4, .lease_ms = 1000, .dedupe_window_s = 60};
    char err[256];
    amp_queue *q = amp_redisq_open(&o, err, sizeof err);
    ck_assert_msg(q != NULL, "%s", err);
    volatile int got = -2;
    amp_queue_batch *b = amp_queue_batch_create();
    amp_queue_batch_event(b, "e1");
    amp_queue_batch_request(b, "all", "support", "u1", true, "{\"query\":\"x\"}");
    amp_queue_batch_source(b, "{\"user_id\":\"u1\"}");
    amp_queue_submit(q, b, stored, (void *)&got);
    ck_assert(amp_queue_flush_until(q, amp_mono_ms() + 5000));
    ck_assert_int_eq(got, 1);
    amp_queue_job *jobs[4];
    int n = 0;
    int64_t nd;
    for (int64_t end = amp_mono_ms() + 5000; n == 0 && amp_mono_ms() < end;) {
        n = amp_queue_claim(q, amp_now_ms(), jobs, 4, &nd);
        if (n == 0)
            h_sleep_ms(20);
    }
    ck_assert_int_eq(n, 1);
    ck_assert_int_eq(jobs[0]->shard, amp_redisq_shard_of("support", "u1", 4));
    ck_assert_str_eq(jobs[0]->user, "u1");
    ck_assert_str_eq(jobs[0]->dedupe_key, "e1");
    ck_assert_str_eq(jobs[0]->source, "{\"user_id\":\"u1\"}");
    ck_assert(jobs[0]->per_user);
    amp_queue_ack ack = {.id = jobs[0]->id,
                         .shard = jobs[0]->shard,
                         .kind = AMP_QUEUE_ACK_DELIVERED,
                         .http_status = 200};
    ck_assert_int_eq(amp_queue_acknowledge(q, &ack), AMP_QUEUE_ACK_TAKEN);
    ck_assert(amp_queue_flush_until(q, amp_mono_ms() + 5000));
    /* Acknowledged twice: the second finds no claim and changes nothing. */
    ck_assert_int_eq(amp_queue_acknowledge(q, &ack), AMP_QUEUE_ACK_TAKEN);
    ck_assert(amp_queue_flush_until(q, amp_mono_ms() + 5000));
    amp_queue_job_free(jobs[0]);
    amp_queue_stats st;
    ck_assert_int_eq(amp_queue_stats_get(q, &st), 0);
    ck_assert_int_eq(st.pending, 0);
    ck_assert_int_eq(st.delivered, 1);
    ck_assert(amp_queue_writable(q));
    amp_queue_close(q);
    /* A queue created with 4 shards refuses another count. */
    o.shards = 8;
    ck_assert_ptr_null(amp_redisq_open(&o, err, sizeof err));
    ck_assert_msg(strstr(err, "queue.shards: found 8; expected 4"), "%s", err);
}
END_TEST

/* Claim from q until want jobs came (bounded: 5 s, the lease thread takes
 * the shards first, a lost connection comes back); returns how many. */
static int claim_wait(amp_queue *q, amp_queue_job **jobs, int want) {
    int n = 0;
    int64_t nd;
    for (int64_t end = amp_mono_ms() + 5000; n < want && amp_mono_ms() < end;) {
        int got = amp_queue_claim(q, amp_now_ms(), jobs + n, (size_t)(want - n), &nd);
        if (got > 0) /* -1: Redis unreachable for now */
            n += got;
        if (n < want)
            h_sleep_ms(20);
    }
    return n;
}

static void ack_wait(amp_queue *q, const amp_queue_ack *ack) {
    ck_assert_int_eq(amp_queue_acknowledge(q, ack), AMP_QUEUE_ACK_TAKEN);
    ck_assert(amp_queue_flush_until(q, amp_mono_ms() + 5000));
}

static amp_queue_job *job_by_key(amp_queue_job **jobs, int n, const char *key) {
    for (int i = 0; i < n; i++)
        if (jobs[i]->dedupe_key && strcmp(jobs[i]->dedupe_key, key) == 0)
            return jobs[i];
    ck_abort_msg("no job %s", key);
    return NULL;
}

/* The engine contract of the waiting state and of a retry's run id, as the
 * SQLite engine keeps it (test_spool's waiting_rows_and_retry_run_ids): a
 * RETRY's run_id comes back with the job (a RELEASE keeps it); a WAITING
 * job is neither pending nor dead, does not hold its user's later jobs
 * back, is counted apart, listed with f.waiting only (with its result), and
 * a replay of it is a fresh schedule without the old run. */
START_TEST(waiting_rows_and_retry_run_ids) {
    amp_redisq_opts o = {
        .url = h_redis_url(srv), .shards = 1, .lease_ms = 1000, .dedupe_window_s = 60};
    char err[256];
    amp_queue *q = amp_redisq_open(&o, err, sizeof err);
    ck_assert_msg(q != NULL, "%s", err);
    volatile int got = -2;
    amp_queue_batch *b = amp_queue_batch_create();
    amp_queue_batch_event(b, "w1");
    amp_queue_batch_request(b, "all", "support", "u1", true, "{\"n\":1}");
    amp_queue_batch_event(b, "w2");
    amp_queue_batch_request(b, "all", "support", "u2", false, "{\"n\":2}");
    amp_queue_batch_event(b, "w3");
    amp_queue_batch_request(b, "all", "support", "u1", true, "{\"n\":3}");
    amp_queue_submit(q, b, stored, (void *)&got);
    ck_assert(amp_queue_flush_until(q, amp_mono_ms() + 5000));
    ck_assert_int_eq(got, 3);

    /* u1's first and u2's; u1's second waits behind the first. */
    amp_queue_job *jobs[4];
    ck_assert_int_eq(claim_wait(q, jobs, 2), 2);
    amp_queue_job *w1 = job_by_key(jobs, 2, "w1"), *w2 = job_by_key(jobs, 2, "w2");
    ck_assert_ptr_null(w1->run_id);
    ck_assert_ptr_null(w2->run_id);
    ack_wait(q, &(amp_queue_ack){.id = w1->id,
                                 .shard = w1->shard,
                                 .kind = AMP_QUEUE_ACK_WAITING,
                                 .http_status = 200,
                                 .code = "waiting_input",
                                 .message = "paused",
                                 .result_json = "{\"workflow_run_id\":\"run-w\"}"});
    ack_wait(q, &(amp_queue_ack){.id = w2->id,
                                 .shard = w2->shard,
                                 .kind = AMP_QUEUE_ACK_RETRY,
                                 .due_ms = amp_now_ms(),
                                 .http_status = 200,
                                 .code = "timeout",
                                 .run_id = "run-r"});
    int64_t w2_id = w2->id;
    for (int i = 0; i < 2; i++)
        amp_queue_job_free(jobs[i]);

    /* The retried job comes back with its run; the waiting one does not
     * come back, and u1's second job is no longer held. */
    ck_assert_int_eq(claim_wait(q, jobs, 2), 2);
    w2 = job_by_key(jobs, 2, "w2");
    amp_queue_job *w3 = job_by_key(jobs, 2, "w3");
    ck_assert_int_eq(w2->id, w2_id);
    ck_assert_int_eq(w2->attempts, 1);
    ck_assert_str_eq(w2->run_id, "run-r");
    ck_assert_ptr_null(w3->run_id);
    /* A release (not attempted) keeps the run when it names none. */
    ack_wait(q, &(amp_queue_ack){.id = w2->id,
                                 .shard = w2->shard,
                                 .kind = AMP_QUEUE_ACK_RELEASE,
                                 .due_ms = amp_now_ms()});
    ack_wait(q, &(amp_queue_ack){.id = w3->id,
                                 .shard = w3->shard,
                                 .kind = AMP_QUEUE_ACK_DELIVERED,
                                 .http_status = 200});
    for (int i = 0; i < 2; i++)
        amp_queue_job_free(jobs[i]);
    ck_assert_int_eq(claim_wait(q, jobs, 1), 1);
    ck_assert_int_eq(jobs[0]->id, w2_id);
    ck_assert_str_eq(jobs[0]->run_id, "run-r");
    /* A release naming a newer run stores it. */
    ack_wait(q, &(amp_queue_ack){.id = w2_id,
                                 .shard = jobs[0]->shard,
                                 .kind = AMP_QUEUE_ACK_RELEASE,
                                 .due_ms = amp_now_ms(),
                                 .run_id = "run-r2"});
    amp_queue_job_free(jobs[0]);
    ck_assert_int_eq(claim_wait(q, jobs, 1), 1);
    ck_assert_int_eq(jobs[0]->id, w2_id);
    ck_assert_str_eq(jobs[0]->run_id, "run-r2");
    ack_wait(q, &(amp_queue_ack){.id = jobs[0]->id,
                                 .shard = jobs[0]->shard,
                                 .kind = AMP_QUEUE_ACK_DELIVERED,
                                 .http_status = 200});
    amp_queue_job_free(jobs[0]);

    amp_queue_stats st;
    ck_assert_int_eq(amp_queue_stats_get(q, &st), 0);
    ck_assert_int_eq(st.pending, 0);
    ck_assert_int_eq(st.dead, 0);
    ck_assert_int_eq(st.waiting, 1);
    ck_assert_int_eq(st.delivered, 2);

    amp_queue_dlq_filter dead = {0}, waiting = {.waiting = true};
    json_t *rows = amp_queue_dlq_list(q, &dead, 10);
    ck_assert_uint_eq(json_array_size(rows), 0);
    json_decref(rows);
    rows = amp_queue_dlq_list(q, &waiting, 10);
    ck_assert_uint_eq(json_array_size(rows), 1);
    json_t *r0 = json_array_get(rows, 0);
    ck_assert_str_eq(json_string_value(json_object_get(r0, "state")), "waiting_input");
    ck_assert_str_eq(json_string_value(json_object_get(r0, "code")), "waiting_input");
    ck_assert_str_eq(json_string_value(json_object_get(r0, "message")), "paused");
    ck_assert_str_eq(json_string_value(json_object_get(r0, "dedupe_key")), "w1");
    ck_assert_int_eq(json_integer_value(json_object_get(r0, "attempts")), 1);
    ck_assert_str_eq(
        json_string_value(json_object_get(json_object_get(r0, "result"), "workflow_run_id")),
        "run-w");
    json_decref(rows);

    /* A dead-letter purge or replay leaves it; a replay of waiting rows
     * starts it afresh, without the old run. */
    ck_assert_int_eq(amp_queue_dlq_purge(q, &dead), 0);
    ck_assert_int_eq(amp_queue_dlq_replay(q, &dead), 0);
    ck_assert_int_eq(amp_queue_dlq_replay(q, &waiting), 1);
    ck_assert_int_eq(amp_queue_stats_get(q, &st), 0);
    ck_assert_int_eq(st.waiting, 0);
    ck_assert_int_eq(st.pending, 1);
    ck_assert_int_eq(claim_wait(q, jobs, 1), 1);
    ck_assert_str_eq(jobs[0]->dedupe_key, "w1");
    ck_assert_str_eq(jobs[0]->body, "{\"n\":1}");
    ck_assert_int_eq(jobs[0]->attempts, 0);
    ck_assert_ptr_null(jobs[0]->run_id);
    /* Waiting again, then purged: gone from the waiting rows only. */
    ack_wait(q, &(amp_queue_ack){.id = jobs[0]->id,
                                 .shard = jobs[0]->shard,
                                 .kind = AMP_QUEUE_ACK_WAITING,
                                 .http_status = 200,
                                 .code = "waiting_input"});
    amp_queue_job_free(jobs[0]);
    ck_assert_int_eq(amp_queue_dlq_purge(q, &waiting), 1);
    ck_assert_int_eq(amp_queue_stats_get(q, &st), 0);
    ck_assert_int_eq(st.waiting, 0);
    ck_assert_int_eq(st.pending, 0);
    ck_assert_int_eq(st.dead, 0);
    amp_queue_close(q);
}
END_TEST

/* ---- a proxy that loses one answer ----------------------------------------
 * Between the engine and redis-server on loopback: it passes bytes both
 * ways, but the first time a client sends a call containing `arm` (a
 * script's SHA1), it lets Redis run it, swallows the answer and closes that
 * connection, as when Redis goes away between running a script and
 * answering. */
typedef struct lossy {
    int lfd;
    uint16_t port, to_port;
    char arm[41];
    atomic_bool armed, stop, fired;
    pthread_t thread;
} lossy;

typedef struct lossy_conn {
    lossy *lp;
    int cfd;
} lossy_conn;

static void *lossy_conn_main(void *arg) {
    lossy_conn *lc = arg;
    lossy *lp = lc->lp;
    int sfd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons(lp->to_port)};
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (connect(sfd, (struct sockaddr *)&sa, sizeof sa) != 0)
        goto out;
    char buf[65536];
    bool swallow = false;
    while (!atomic_load(&lp->stop)) {
        struct pollfd pf[2] = {{.fd = lc->cfd, .events = POLLIN}, {.fd = sfd, .events = POLLIN}};
        if (poll(pf, 2, 100) <= 0)
            continue;
        if (pf[0].revents) {
            ssize_t n = read(lc->cfd, buf, sizeof buf);
            if (n <= 0)
                break;
            if (atomic_load(&lp->armed) && memmem(buf, (size_t)n, lp->arm, 40)) {
                atomic_store(&lp->armed, false);
                swallow = true;
            }
            if (write(sfd, buf, (size_t)n) != n)
                break;
        }
        if (pf[1].revents) {
            ssize_t n = read(sfd, buf, sizeof buf);
            if (n <= 0)
                break;
            if (swallow) { /* Redis ran it; the answer never arrives */
                atomic_store(&lp->fired, true);
                break;
            }
            if (write(lc->cfd, buf, (size_t)n) != n)
                break;
        }
    }
out:
    close(sfd);
    close(lc->cfd);
    free(lc);
    return NULL;
}

static void *lossy_main(void *arg) {
    lossy *lp = arg;
    while (!atomic_load(&lp->stop)) {
        struct pollfd pf = {.fd = lp->lfd, .events = POLLIN};
        if (poll(&pf, 1, 100) <= 0)
            continue;
        int cfd = accept(lp->lfd, NULL, NULL);
        if (cfd < 0)
            continue;
        lossy_conn *lc = malloc(sizeof *lc);
        lc->lp = lp;
        lc->cfd = cfd;
        pthread_t t;
        if (pthread_create(&t, NULL, lossy_conn_main, lc) == 0)
            pthread_detach(t);
    }
    return NULL;
}

static void lossy_start(lossy *lp, uint16_t to_port) {
    memset(lp, 0, sizeof *lp);
    lp->to_port = to_port;
    lp->lfd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in sa = {.sin_family = AF_INET};
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    ck_assert_int_eq(bind(lp->lfd, (struct sockaddr *)&sa, sizeof sa), 0);
    ck_assert_int_eq(listen(lp->lfd, 16), 0);
    socklen_t len = sizeof sa;
    getsockname(lp->lfd, (struct sockaddr *)&sa, &len);
    lp->port = ntohs(sa.sin_port);
    ck_assert_int_eq(pthread_create(&lp->thread, NULL, lossy_main, lp), 0);
}

/* Stops accepting; the open connections end with the engine's. */
static void lossy_stop(lossy *lp) {
    atomic_store(&lp->stop, true);
    pthread_join(lp->thread, NULL);
    close(lp->lfd);
}

/* The engine's side of lost_claim_is_undone_by_its_tag: a claim whose
 * answer never came leaves no job claimed by nobody; the job (and its
 * user's next) come out while this replica keeps its lease. */
START_TEST(engine_undoes_a_claim_whose_answer_was_lost) {
    rq_url u;
    char err[256];
    ck_assert_int_eq(amp_redisq_parse_url(h_redis_url(srv), &u, err, sizeof err), 0);
    lossy lp;
    lossy_start(&lp, (uint16_t)u.port);
    char url[64];
    snprintf(url, sizeof url, "redis://127.0.0.1:%u", (unsigned)lp.port);
    amp_redisq_opts o = {.url = url, .shards = 1, .lease_ms = 1000, .dedupe_window_s = 60};
    amp_queue *q = amp_redisq_open(&o, err, sizeof err);
    ck_assert_msg(q != NULL, "%s", err);
    volatile int got = -2;
    amp_queue_batch *b = amp_queue_batch_create();
    amp_queue_batch_event(b, "k1");
    amp_queue_batch_request(b, "all", "support", "u1", true, "{\"n\":1}");
    amp_queue_batch_event(b, "k2");
    amp_queue_batch_request(b, "all", "support", "u1", true, "{\"n\":2}");
    amp_queue_submit(q, b, stored, (void *)&got);
    ck_assert(amp_queue_flush_until(q, amp_mono_ms() + 5000));
    ck_assert_int_eq(got, 2);

    /* The first claim script that reaches Redis runs; its answer is lost. */
    snprintf(lp.arm, sizeof lp.arm, "%s", shas.sha[RQ_CLAIM]);
    atomic_store(&lp.armed, true);
    amp_queue_job *jobs[2];
    int64_t nd;
    for (int64_t end = amp_mono_ms() + 5000; !atomic_load(&lp.fired) && amp_mono_ms() < end;) {
        ck_assert_int_le(amp_queue_claim(q, amp_now_ms(), jobs, 2, &nd), 0);
        h_sleep_ms(20);
    }
    ck_assert(atomic_load(&lp.fired));
    ck_assert_int_eq(cmd_int("HLEN %s", RQ_PREFIX "0:inflight"), 1); /* claimed by nobody */

    /* Well within the lease this replica keeps renewing: k1, then k2. */
    ck_assert_int_eq(claim_wait(q, jobs, 1), 1);
    ck_assert_str_eq(jobs[0]->dedupe_key, "k1");
    ck_assert_int_eq(jobs[0]->attempts, 0);
    ack_wait(q, &(amp_queue_ack){.id = jobs[0]->id,
                                 .shard = jobs[0]->shard,
                                 .kind = AMP_QUEUE_ACK_DELIVERED,
                                 .http_status = 200});
    amp_queue_job_free(jobs[0]);
    ck_assert_int_eq(claim_wait(q, jobs, 1), 1);
    ck_assert_str_eq(jobs[0]->dedupe_key, "k2");
    amp_queue_job_free(jobs[0]);
    amp_queue_close(q);
    lossy_stop(&lp);
}
END_TEST

START_TEST(weak_durability_is_refused_unless_allowed) {
    const char *weak[] = {"--appendfsync", "everysec", NULL};
    h_redis *w = h_redis_start(weak);
    ck_assert_ptr_nonnull(w);
    amp_redisq_opts o = {.url = h_redis_url(w), .shards = 2, .lease_ms = 1000};
    char err[512];
    ck_assert_ptr_null(amp_redisq_open(&o, err, sizeof err));
    ck_assert_msg(strstr(err, "appendfsync everysec"), "%s", err);
    char found[256], expected[256];
    ck_assert_int_eq(amp_redisq_check(&o, found, sizeof found, expected, sizeof expected),
                     AMP_REDISQ_CHECK_REFUSED);
    o.allow_weak_durability = true;
    ck_assert_int_eq(amp_redisq_check(&o, found, sizeof found, expected, sizeof expected),
                     AMP_REDISQ_CHECK_OK);
    amp_queue *q = amp_redisq_open(&o, err, sizeof err);
    ck_assert_msg(q != NULL, "%s", err);
    amp_queue_close(q);
    h_redis_stop(w);
}
END_TEST

START_TEST(url_forms) {
    rq_url u;
    char err[128];
    ck_assert_int_eq(amp_redisq_parse_url("redis://h:7000/3", &u, err, sizeof err), 0);
    ck_assert_str_eq(u.host, "h");
    ck_assert_int_eq(u.port, 7000);
    ck_assert_int_eq(u.db, 3);
    ck_assert_int_eq(amp_redisq_parse_url("redis://:pw@h", &u, err, sizeof err), 0);
    ck_assert_str_eq(u.password, "pw");
    ck_assert_int_eq(u.port, 6379);
    ck_assert_int_eq(amp_redisq_parse_url("http://h", &u, err, sizeof err), -1);
    ck_assert_int_eq(amp_redisq_parse_url("redis://h:0", &u, err, sizeof err), -1);
    ck_assert_int_eq(amp_redisq_parse_url("redis://h/x", &u, err, sizeof err), -1);
    char buf[48];
    amp_redisq_id_to_str(amp_redisq_id_from_str("1700000000123-45"), buf, sizeof buf);
    ck_assert_str_eq(buf, "1700000000123-45");
}
END_TEST

int main(void) {
    Suite *su = suite_create("redisq");
    TCase *tc = tcase_create("scripts");
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_set_timeout(tc, 30);
    tcase_add_test(tc, accept_is_idempotent_for_keyed_events);
    tcase_add_test(tc, stale_generation_can_neither_claim_nor_ack);
    tcase_add_test(tc, lease_is_exclusive_and_released_by_its_owner_only);
    tcase_add_test(tc, retry_keeps_its_entry_and_waits_for_its_due_time);
    tcase_add_test(tc, per_user_jobs_go_one_at_a_time_in_order);
    tcase_add_test(tc, lost_claim_is_undone_by_its_tag);
    tcase_add_test(tc, dead_letters_list_replay_purge);
    tcase_add_test(tc, engine_submits_claims_and_acknowledges);
    tcase_add_test(tc, waiting_rows_and_retry_run_ids);
    tcase_add_test(tc, engine_undoes_a_claim_whose_answer_was_lost);
    tcase_add_test(tc, weak_durability_is_refused_unless_allowed);
    suite_add_tcase(su, tc);
    TCase *tp = tcase_create("pure");
    tcase_add_test(tp, url_forms);
    suite_add_tcase(su, tp);
    return amp_check_run(su);
}
