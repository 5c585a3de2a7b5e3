/*
 * Spool unit tests on a real SQLite file: batches all or nothing, dedupe,
 * claim rules (due time, claimed rows, per-user order), acknowledgements,
 * conversations, and what a reopen (restart) sees; and the spool's VFS,
 * which gathers a transaction's log frames into few writes.
 */
#include <check.h>
#include <dirent.h>
#include <sqlite3.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "../../base/log.h"
#include "../../base/clock.h"
#include "../../spool/spool.h"
#include "../../spool/spool_int.h" /* amp_spool_set_key_hash_for_tests */
#include "../check_run.h"

static char dir[64];
static char path[128];

static void setup(void) {
    amp_log_set_level(AMP_LOG_ERROR);
    snprintf(dir, sizeof dir, "/tmp/amp2dify-spool-XXXXXX");
    ck_assert_ptr_nonnull(mkdtemp(dir));
    snprintf(path, sizeof path, "%s/spool.db", dir);
}

static void teardown(void) {
    char cmd[160];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    ck_assert_int_eq(system(cmd), 0);
}

/* Open with o (its path is set to the test's spool), or fail the test. */
static amp_queue *open_opts(amp_spool_opts o) {
    char err[256] = "";
    o.path = path;
    amp_queue *s = amp_spool_open(&o, err, sizeof err);
    ck_assert_msg(s != NULL, "open: %s", err);
    return s;
}

static amp_queue *open_spool(int64_t window_s) {
    return open_opts((amp_spool_opts){.dedupe_window_s = window_s});
}

typedef struct {
    amp_queue_result res;
    int calls;
} done_box;

static void on_done(void *ctx, const amp_queue_result *res) {
    done_box *b = ctx;
    b->res = *res;
    b->calls++;
}

/* Submit and wait for the commit; returns the result. */
static amp_queue_result submit(amp_queue *s, amp_queue_batch *b) {
    done_box box = {0};
    amp_queue_submit(s, b, on_done, &box);
    amp_queue_flush(s);
    ck_assert_int_eq(box.calls, 1);
    return box.res;
}

static void add(amp_queue_batch *b, const char *key, const char *user, bool per_user,
                const char *body) {
    amp_queue_batch_event(b, key);
    amp_queue_batch_request(b, "r", "app", user, per_user, body);
}

/* Events "<prefix><i>", one row each, for i = from, from + step, ...
 * below to. */
static amp_queue_batch *keys_batch(const char *prefix, int from, int to, int step) {
    amp_queue_batch *b = amp_queue_batch_create();
    for (int i = from; i < to; i += step) {
        char key[32];
        snprintf(key, sizeof key, "%s%d", prefix, i);
        add(b, key, "u", false, "{}");
    }
    return b;
}

static int claim_all(amp_queue *s, int64_t now, amp_queue_job **jobs, size_t max, int64_t *next) {
    int n = amp_queue_claim(s, now, jobs, max, next);
    ck_assert_int_ge(n, 0);
    return n;
}

static void free_jobs(amp_queue_job **jobs, int n) {
    for (int i = 0; i < n; i++)
        amp_queue_job_free(jobs[i]);
}

/* One event on route, claimed and dead-lettered (400), committed. */
static void add_dead_letter(amp_queue *s, const char *route) {
    amp_queue_batch *b = amp_queue_batch_create();
    add(b, route, "u", false, "{}");
    submit(s, b);
    amp_queue_job *jobs[2];
    int64_t next;
    ck_assert_int_eq(claim_all(s, amp_now_ms() + 1, jobs, 2, &next), 1);
    amp_queue_acknowledge(
        s, &(amp_queue_ack){.id = jobs[0]->id, .kind = AMP_QUEUE_ACK_DEAD, .http_status = 400});
    free_jobs(jobs, 1);
    amp_queue_flush(s);
}

/* Claims what is due at now: exactly one row, with this body. */
static void claim_one(amp_queue *s, int64_t now, const char *body) {
    amp_queue_job *jobs[2];
    int64_t next;
    int n = claim_all(s, now, jobs, 2, &next);
    ck_assert_int_eq(n, 1);
    ck_assert_str_eq(jobs[0]->body, body);
    free_jobs(jobs, n);
}

/* The first column of sql's first row, as an integer. */
static long long query_int(sqlite3 *db, const char *sql) {
    sqlite3_stmt *st;
    ck_assert_int_eq(sqlite3_prepare_v2(db, sql, -1, &st, NULL), SQLITE_OK);
    ck_assert_int_eq(sqlite3_step(st), SQLITE_ROW);
    long long v = sqlite3_column_int64(st, 0);
    sqlite3_finalize(st);
    return v;
}

/* Runs sql (one or more statements) on db. */
static void exec_ok(sqlite3 *db, const char *sql) {
    char *err = NULL;
    int rc = sqlite3_exec(db, sql, NULL, NULL, &err);
    if (rc != SQLITE_OK) /* only then: an assertion writes to Check's pipe */
        ck_abort_msg("%s: %s", sql, err ? err : sqlite3_errstr(rc));
}

/* Runs sql on the spool from a connection of its own, as another process
 * would. */
static void spool_sql(const char *sql) {
    sqlite3 *db;
    ck_assert_int_eq(sqlite3_open(path, &db), SQLITE_OK);
    exec_ok(db, sql);
    sqlite3_close(db);
}

/* A batch keeps copies of everything added, however many events and
 * requests and however long the strings (its arena grows in chunks), and
 * a replaced source is the one read back. */
START_TEST(batch_keeps_copies_of_what_was_added) {
    amp_queue_batch *b = amp_queue_batch_create();
    char big[9000], key[32], user[32];
    memset(big, 'b', sizeof big - 1);
    big[sizeof big - 1] = '\0';
    for (int e = 0; e < 40; e++) {
        snprintf(key, sizeof key, "key-%d", e);
        amp_queue_batch_event(b, e % 7 == 3 ? NULL : key);
        for (int r = 0; r < e % 3 + 1; r++) {
            snprintf(user, sizeof user, "user-%d-%d", e, r);
            amp_queue_batch_request(b, "route", "app", user, r == 1, e % 5 == 0 ? big : user);
            if (r == 0) {
                amp_queue_batch_source(b, "first");
                amp_queue_batch_source(b, user);
            }
        }
        key[0] = user[0] = 'X'; /* the batch holds copies */
    }
    ck_assert_uint_eq(amp_queue_batch_events(b), 40);
    for (int e = 0; e < 40; e++) {
        const amp_queue_request *reqs;
        size_t n;
        const char *k = amp_queue_batch_event_at(b, (size_t)e, &reqs, &n);
        snprintf(key, sizeof key, "key-%d", e);
        if (e % 7 == 3)
            ck_assert_ptr_null(k);
        else
            ck_assert_str_eq(k, key);
        ck_assert_uint_eq(n, (size_t)(e % 3 + 1));
        for (size_t r = 0; r < n; r++) {
            snprintf(user, sizeof user, "user-%d-%zu", e, r);
            ck_assert_str_eq(reqs[r].route, "route");
            ck_assert_str_eq(reqs[r].app, "app");
            ck_assert_str_eq(reqs[r].user, user);
            ck_assert_int_eq(reqs[r].per_user, r == 1);
            ck_assert_str_eq(reqs[r].body, e % 5 == 0 ? big : user);
            if (r == 0)
                ck_assert_str_eq(reqs[r].source, user);
            else
                ck_assert_ptr_null(reqs[r].source);
        }
    }
    amp_queue_batch_destroy(b);
    amp_queue_batch_destroy(NULL);
}
END_TEST

START_TEST(batch_stored_and_claimed) {
    amp_queue *s = open_spool(3600);
    amp_queue_batch *b = amp_queue_batch_create();
    add(b, "k1", "u1", false, "{\"a\":1}");
    add(b, NULL, "u2", false, "{\"a\":2}");
    amp_queue_result r = submit(s, b);
    ck_assert_int_eq(r.status, 0);
    ck_assert_uint_eq(r.accepted, 2);
    ck_assert_uint_eq(r.duplicates, 0);

    amp_queue_job *jobs[8];
    int64_t next;
    int n = claim_all(s, amp_now_ms() + 1, jobs, 8, &next);
    ck_assert_int_eq(n, 2);
    ck_assert_str_eq(jobs[0]->body, "{\"a\":1}");
    ck_assert_str_eq(jobs[0]->dedupe_key, "k1");
    ck_assert_str_eq(jobs[0]->user, "u1");
    ck_assert_ptr_null(jobs[1]->dedupe_key);
    ck_assert_int_eq(jobs[0]->attempts, 0);
    ck_assert_int_eq(next, INT64_MAX);

    /* Claimed rows are not handed out twice. */
    amp_queue_job *again[8];
    ck_assert_int_eq(claim_all(s, amp_now_ms() + 1, again, 8, &next), 0);
    free_jobs(jobs, n);
    amp_queue_close(s);
}
END_TEST

START_TEST(dedupe_within_and_across_requests) {
    amp_queue *s = open_spool(3600);
    amp_queue_batch *b = amp_queue_batch_create();
    add(b, "dup", "u", false, "{}");
    add(b, "dup", "u", false, "{}");
    add(b, "other", "u", false, "{}");
    amp_queue_result r = submit(s, b);
    ck_assert_uint_eq(r.accepted, 2);
    ck_assert_uint_eq(r.duplicates, 1);

    b = amp_queue_batch_create();
    add(b, "dup", "u", false, "{}");
    r = submit(s, b);
    ck_assert_uint_eq(r.accepted, 0);
    ck_assert_uint_eq(r.duplicates, 1);
    amp_queue_close(s);

    /* Still a duplicate after a restart. */
    s = open_spool(3600);
    b = amp_queue_batch_create();
    add(b, "other", "u", false, "{}");
    r = submit(s, b);
    ck_assert_uint_eq(r.duplicates, 1);
    amp_queue_stats st;
    ck_assert_int_eq(amp_queue_stats_get(s, &st), 0);
    ck_assert_int_eq(st.pending, 2);
    amp_queue_close(s);
}
END_TEST

START_TEST(dedupe_disabled_with_zero_window) {
    amp_queue *s = open_spool(0);
    amp_queue_batch *b = amp_queue_batch_create();
    add(b, "k", "u", false, "{}");
    add(b, "k", "u", false, "{}");
    amp_queue_result r = submit(s, b);
    ck_assert_uint_eq(r.accepted, 2);
    ck_assert_uint_eq(r.duplicates, 0);
    amp_queue_close(s);
}
END_TEST

START_TEST(acks_delivered_retry_dead) {
    amp_queue *s = open_spool(3600);
    amp_queue_batch *b = amp_queue_batch_create();
    add(b, "a", "u1", false, "{}");
    add(b, "b", "u2", false, "{}");
    add(b, "c", "u3", false, "{}");
    submit(s, b);

    int64_t now = amp_now_ms() + 1, next;
    amp_queue_job *jobs[8];
    ck_assert_int_eq(claim_all(s, now, jobs, 8, &next), 3);
    amp_queue_acknowledge(s, &(amp_queue_ack){.id = jobs[0]->id,
                                              .kind = AMP_QUEUE_ACK_DELIVERED,
                                              .http_status = 200,
                                              .result_json = "{\"status\":200}"});
    amp_queue_acknowledge(s, &(amp_queue_ack){.id = jobs[1]->id,
                                              .kind = AMP_QUEUE_ACK_RETRY,
                                              .due_ms = now + 60000,
                                              .http_status = 503,
                                              .code = "unavailable"});
    amp_queue_acknowledge(s, &(amp_queue_ack){.id = jobs[2]->id,
                                              .kind = AMP_QUEUE_ACK_DEAD,
                                              .http_status = 400,
                                              .code = "app_unavailable",
                                              .message = "App unavailable"});
    int64_t retry_id = jobs[1]->id;
    free_jobs(jobs, 3);
    amp_queue_flush(s);

    /* Only the retried row is pending, and it is not due yet. */
    ck_assert_int_eq(claim_all(s, now, jobs, 8, &next), 0);
    ck_assert_int_eq(next, now + 60000);
    ck_assert_int_eq(claim_all(s, now + 60000, jobs, 8, &next), 1);
    ck_assert_int_eq(jobs[0]->id, retry_id);
    ck_assert_int_eq(jobs[0]->attempts, 1);
    free_jobs(jobs, 1);

    amp_queue_stats st;
    ck_assert_int_eq(amp_queue_stats_get(s, &st), 0);
    ck_assert_int_eq(st.pending, 1);
    ck_assert_int_eq(st.delivered, 1);
    ck_assert_int_eq(st.dead, 1);
    amp_queue_close(s);
}
END_TEST

START_TEST(per_user_rows_go_in_order) {
    amp_queue *s = open_spool(3600);
    amp_queue_batch *b = amp_queue_batch_create();
    add(b, "1", "alice", true, "{\"n\":1}");
    add(b, "2", "alice", true, "{\"n\":2}");
    add(b, "3", "bob", true, "{\"n\":3}");
    submit(s, b);

    int64_t now = amp_now_ms() + 1, next;
    amp_queue_job *jobs[8];
    int n = claim_all(s, now, jobs, 8, &next);
    ck_assert_int_eq(n, 2); /* alice's first and bob's; alice's second waits */
    ck_assert_str_eq(jobs[0]->body, "{\"n\":1}");
    ck_assert_str_eq(jobs[1]->body, "{\"n\":3}");
    ck_assert_ptr_null(jobs[0]->conversation_id);

    /* Alice's first is retried: her second still waits behind it. */
    amp_queue_acknowledge(
        s, &(amp_queue_ack){.id = jobs[0]->id, .kind = AMP_QUEUE_ACK_RETRY, .due_ms = now + 10});
    amp_queue_acknowledge(s, &(amp_queue_ack){.id = jobs[1]->id,
                                              .kind = AMP_QUEUE_ACK_DELIVERED,
                                              .http_status = 200,
                                              .conversation_id = "conv-bob"});
    free_jobs(jobs, n);
    amp_queue_flush(s);
    ck_assert_int_eq(claim_all(s, now + 5, jobs, 8, &next), 0);

    n = claim_all(s, now + 10, jobs, 8, &next);
    ck_assert_int_eq(n, 1);
    ck_assert_str_eq(jobs[0]->body, "{\"n\":1}");
    amp_queue_acknowledge(s, &(amp_queue_ack){.id = jobs[0]->id,
                                              .kind = AMP_QUEUE_ACK_DELIVERED,
                                              .http_status = 200,
                                              .conversation_id = "conv-alice"});
    free_jobs(jobs, n);
    amp_queue_flush(s);

    n = claim_all(s, now + 10, jobs, 8, &next);
    ck_assert_int_eq(n, 1);
    ck_assert_str_eq(jobs[0]->body, "{\"n\":2}");
    ck_assert_str_eq(jobs[0]->conversation_id, "conv-alice");
    /* An empty conversation id clears the stored one. */
    amp_queue_acknowledge(s, &(amp_queue_ack){.id = jobs[0]->id,
                                              .kind = AMP_QUEUE_ACK_RETRY,
                                              .due_ms = now,
                                              .conversation_id = ""});
    free_jobs(jobs, n);
    amp_queue_flush(s);
    n = claim_all(s, now + 10, jobs, 8, &next);
    ck_assert_int_eq(n, 1);
    ck_assert_ptr_null(jobs[0]->conversation_id);
    free_jobs(jobs, n);
    amp_queue_close(s);
}
END_TEST

/* Only conversation rows wait for the user's earlier rows, and only for
 * earlier conversation rows. */
START_TEST(per_user_order_is_per_conversation) {
    amp_queue *s = open_spool(3600);
    amp_queue_batch *b = amp_queue_batch_create();
    add(b, "1", "alice", false, "{\"n\":1}");
    add(b, "2", "alice", true, "{\"n\":2}");
    add(b, "3", "alice", false, "{\"n\":3}");
    add(b, "4", "alice", true, "{\"n\":4}");
    submit(s, b);

    int64_t now = amp_now_ms() + 1, next;
    amp_queue_job *jobs[8];
    int n = claim_all(s, now, jobs, 8, &next);
    ck_assert_int_eq(n, 3); /* all but the second conversation row */
    ck_assert_str_eq(jobs[0]->body, "{\"n\":1}");
    ck_assert_str_eq(jobs[1]->body, "{\"n\":2}");
    ck_assert_str_eq(jobs[2]->body, "{\"n\":3}");
    for (int i = 0; i < n; i++)
        amp_queue_acknowledge(s, &(amp_queue_ack){.id = jobs[i]->id,
                                                  .kind = AMP_QUEUE_ACK_DELIVERED,
                                                  .http_status = 200});
    free_jobs(jobs, n);
    amp_queue_flush(s);
    claim_one(s, now, "{\"n\":4}");
    amp_queue_close(s);
}
END_TEST

/* A request whose second event cannot be stored is refused whole, and the
 * requests committed with it are stored all the same (the first try of a
 * group has no savepoints; the committer rolls back and writes the group
 * again with one per request). */
START_TEST(failing_request_is_refused_alone) {
    amp_queue *s = open_spool(3600);
    spool_sql("CREATE TRIGGER poison BEFORE INSERT ON deliveries "
              "WHEN NEW.body = '\"poison\"' BEGIN SELECT RAISE(ABORT, 'poisoned'); END;");

    done_box box[3];
    memset(box, 0, sizeof box);
    const char *bodies[3][2] = {
        {"{\"a\":1}", NULL}, {"{\"b\":1}", "\"poison\""}, {"{\"c\":1}", NULL}};
    for (int i = 0; i < 3; i++) {
        amp_queue_batch *b = amp_queue_batch_create();
        for (int j = 0; j < 2 && bodies[i][j]; j++) {
            char key[16];
            snprintf(key, sizeof key, "k%d%d", i, j);
            add(b, key, "u", false, bodies[i][j]);
        }
        amp_queue_submit(s, b, on_done, &box[i]);
    }
    amp_queue_flush(s);
    for (int i = 0; i < 3; i++)
        ck_assert_int_eq(box[i].calls, 1);
    ck_assert_int_eq(box[0].res.status, 0);
    ck_assert_int_eq(box[0].res.accepted, 1);
    ck_assert_int_ne(box[1].res.status, 0);
    ck_assert_int_eq(box[1].res.accepted, 0);
    ck_assert_int_eq(box[2].res.status, 0);
    ck_assert_int_eq(box[2].res.accepted, 1);

    amp_queue_job *jobs[8];
    int64_t next;
    int n = claim_all(s, amp_now_ms() + 1, jobs, 8, &next);
    ck_assert_int_eq(n, 2); /* not even the refused request's first event */
    ck_assert_str_eq(jobs[0]->body, "{\"a\":1}");
    ck_assert_str_eq(jobs[1]->body, "{\"c\":1}");
    free_jobs(jobs, n);
    ck_assert_int_eq(amp_queue_depth(s), 2);
    /* The refused request's keys were not kept: sent again, it is new. */
    amp_queue_batch *b = amp_queue_batch_create();
    add(b, "k10", "u", false, "{\"b\":1}");
    ck_assert_int_eq(submit(s, b).accepted, 1);
    amp_queue_close(s);
}
END_TEST

/* Another process holds the write lock (a sqlite3 shell, a backup) for longer
 * than spool.lock_timeout_ms: the request waiting behind it is refused, not
 * half stored, and the spool is not writable; once the lock is gone the
 * committer's probe makes it writable again by itself, with no traffic, and
 * the next request is stored. */
START_TEST(locked_beyond_deadline_then_recovers) {
    amp_queue *s = open_opts((amp_spool_opts){.dedupe_window_s = 3600, .lock_timeout_ms = 200});
    sqlite3 *db;
    ck_assert_int_eq(sqlite3_open(path, &db), SQLITE_OK);
    exec_ok(db, "BEGIN IMMEDIATE");

    amp_queue_batch *b = amp_queue_batch_create();
    add(b, "locked", "u", false, "{\"a\":1}");
    int64_t t0 = amp_mono_ms();
    amp_queue_result r = submit(s, b);
    int64_t waited = amp_mono_ms() - t0;
    ck_assert_int_ne(r.status, 0);
    ck_assert_uint_eq(r.accepted, 0);
    ck_assert_msg(waited >= 150 && waited < 3000, "refused after %lld ms", (long long)waited);
    ck_assert(!amp_queue_writable(s));

    exec_ok(db, "ROLLBACK");
    sqlite3_close(db);
    t0 = amp_mono_ms();
    while (!amp_queue_writable(s) && amp_mono_ms() - t0 < 5000)
        usleep(20000);
    ck_assert_msg(amp_queue_writable(s), "still not writable %lld ms after the lock went",
                  (long long)(amp_mono_ms() - t0));

    b = amp_queue_batch_create();
    add(b, "locked", "u", false, "{\"b\":1}"); /* the refused key was not kept */
    r = submit(s, b);
    ck_assert_int_eq(r.status, 0);
    ck_assert_uint_eq(r.accepted, 1);
    claim_one(s, amp_now_ms() + 1, "{\"b\":1}");
    amp_queue_close(s);
}
END_TEST

/* Once a request is answered, its rows are in the log for every other
 * connection, a plain read-only one included, while the spool is still
 * open: the answer comes after the commit, not at the next checkpoint. */
START_TEST(answered_rows_visible_to_other_connections) {
    amp_queue *s = open_spool(3600);
    sqlite3 *db;
    ck_assert_int_eq(sqlite3_open_v2(path, &db, SQLITE_OPEN_READONLY, NULL), SQLITE_OK);
    for (int i = 0; i < 50; i++) {
        amp_queue_batch *b = amp_queue_batch_create();
        char key[16], body[64];
        snprintf(key, sizeof key, "v%d", i);
        snprintf(body, sizeof body, "{\"n\":%d}", i);
        add(b, key, "u", false, body);
        ck_assert_int_eq(submit(s, b).accepted, 1);
        sqlite3_stmt *st;
        ck_assert_int_eq(
            sqlite3_prepare_v2(db, "SELECT count(*), max(body) FROM deliveries", -1, &st, NULL),
            SQLITE_OK);
        ck_assert_int_eq(sqlite3_step(st), SQLITE_ROW);
        ck_assert_int_eq(sqlite3_column_int(st, 0), i + 1);
        sqlite3_finalize(st);
    }
    sqlite3_close(db);
    amp_queue_close(s);
}
END_TEST

static int user_version(sqlite3 *db) {
    return (int)query_int(db, "PRAGMA user_version");
}

/* A spool left by the first schema is migrated in place on open. */
START_TEST(version_1_spool_is_migrated) {
    amp_queue *s = open_spool(3600);
    amp_queue_batch *b = amp_queue_batch_create();
    add(b, "old", "alice", true, "{\"from\":1}");
    submit(s, b);
    amp_queue_close(s);

    /* Back to version 1: its (app, user) index covered every pending row,
     * and its dedupe rows had no first row id (version 3). */
    spool_sql("DROP TABLE dedupe; DROP TABLE dedupe_recent; DROP TABLE dedupe_merged;"
              "DROP TABLE dedupe_runs; DROP TABLE dedupe_segs;"
              "CREATE TABLE dedupe (key TEXT PRIMARY KEY, seen_ms INTEGER NOT NULL) WITHOUT ROWID;"
              "CREATE INDEX dedupe_seen ON dedupe(seen_ms);"
              "INSERT INTO dedupe SELECT dedupe_key, created_ms FROM deliveries;"
              "ALTER TABLE deliveries DROP COLUMN source;"
              "DROP INDEX deliveries_user;"
              "CREATE INDEX deliveries_user ON deliveries(app, user, id) WHERE state = 0;"
              "PRAGMA user_version = 1;");

    s = open_spool(3600);
    claim_one(s, amp_now_ms() + 1, "{\"from\":1}");
    amp_queue_close(s);

    sqlite3 *db;
    ck_assert_int_eq(sqlite3_open(path, &db), SQLITE_OK);
    ck_assert_int_eq(user_version(db), 8);
    sqlite3_stmt *st;
    ck_assert_int_eq(sqlite3_prepare_v2(db,
                                        "SELECT sql FROM sqlite_schema WHERE name = "
                                        "'deliveries_user'",
                                        -1, &st, NULL),
                     SQLITE_OK);
    ck_assert_int_eq(sqlite3_step(st), SQLITE_ROW);
    ck_assert_ptr_nonnull(strstr((const char *)sqlite3_column_text(st, 0), "per_user = 1"));
    sqlite3_finalize(st);
    /* Version 3's first row id of a dedupe entry came with the migration. */
    ck_assert_int_eq(sqlite3_prepare_v2(db, "SELECT first_id FROM dedupe", -1, &st, NULL),
                     SQLITE_OK);
    sqlite3_finalize(st);
    /* Version 4's source column too, NULL for the old row. */
    ck_assert_int_eq(sqlite3_prepare_v2(db, "SELECT source FROM deliveries", -1, &st, NULL),
                     SQLITE_OK);
    ck_assert_int_eq(sqlite3_step(st), SQLITE_ROW);
    ck_assert_int_eq(sqlite3_column_type(st, 0), SQLITE_NULL);
    sqlite3_finalize(st);
    sqlite3_close(db);

    /* The migrated spool keeps a new job's source event. */
    s = open_spool(3600);
    b = amp_queue_batch_create();
    amp_queue_batch_event(b, "new");
    amp_queue_batch_request(b, "rs", "app", "bob", false, "{\"n\":2}");
    amp_queue_batch_source(b, "{\"device_id\":\"d-1\"}");
    amp_queue_batch_request(b, "r2", "app", "bob", false, "{\"n\":3}");
    submit(s, b);
    int64_t next;
    amp_queue_job *jobs[4];
    ck_assert_int_eq(claim_all(s, amp_now_ms() + 1, jobs, 4, &next), 3); /* "old" again too */
    for (int i = 0; i < 3; i++) {
        if (strcmp(jobs[i]->route, "rs") == 0)
            ck_assert_str_eq(jobs[i]->source, "{\"device_id\":\"d-1\"}");
        else
            ck_assert_ptr_null(jobs[i]->source);
        amp_queue_job_free(jobs[i]);
    }
    amp_queue_close(s);
}
END_TEST

/* count(*) of a table of the test's spool, through a connection of its own. */
static int64_t table_rows(const char *table) {
    sqlite3 *db;
    char sql[128];
    snprintf(sql, sizeof sql, "SELECT count(*) FROM %s", table);
    ck_assert_int_eq(sqlite3_open(path, &db), SQLITE_OK);
    int64_t n = query_int(db, sql);
    sqlite3_close(db);
    return n;
}

/* Keys merged: in the dedupe table or in a run (schema v8). */
static int64_t merged_keys(void) {
    return table_rows("dedupe") + table_rows("dedupe_runs");
}

static size_t event_jobs(amp_queue *s, const char *key) {
    json_t *ev = amp_queue_event(s, key, 100);
    ck_assert_ptr_nonnull(ev);
    size_t n = json_array_size(json_object_get(ev, "jobs"));
    json_decref(ev);
    return n;
}

static amp_queue_result submit_one(amp_queue *s, const char *key, const char *body) {
    amp_queue_batch *b = amp_queue_batch_create();
    add(b, key, "u", false, body);
    return submit(s, b);
}

/* dedupe_merged.upto: the last row whose key is merged (in a run or the
 * dedupe table). */
static int64_t merged_upto(void) {
    sqlite3 *db;
    ck_assert_int_eq(sqlite3_open(path, &db), SQLITE_OK);
    int64_t n = query_int(db, "SELECT upto FROM dedupe_merged");
    sqlite3_close(db);
    return n;
}

/* New keys are first kept by their events' rows (and in memory), not in
 * dedupe_recent, and merged into a run in key order (schema v8): once
 * enough have gathered while running, and at open. A key is a duplicate
 * wherever it is, before, during and after a merge. */
START_TEST(dedupe_keys_survive_merges) {
    amp_queue *s = open_spool(3600);
    enum { BATCHES = 18, PER = 1000 }; /* more than dedupe.c's MERGE_KEYS (16384) */
    for (int g = 0; g < BATCHES; g++) {
        amp_queue_batch *b = amp_queue_batch_create();
        for (int i = 0; i < PER; i++) {
            char key[32];
            snprintf(key, sizeof key, "m%d-%d", g, i);
            add(b, key, "u", false, "{}");
        }
        ck_assert_uint_eq(submit(s, b).accepted, PER);
    }
    ck_assert_int_eq(table_rows("dedupe_recent"), 0);
    /* A merge is under way (a slice after each group; the merged keys
     * leave dedupe_recent after the last one). The committer takes the
     * next group only after the step that follows the last one: one more
     * flush, and the first slice is in. Sent again, each key is a
     * duplicate, whether merged, waiting for its slice or recent. */
    amp_queue_flush(s);
    ck_assert_int_gt(merged_keys(), 0);
    for (int g = 0; g < BATCHES; g += 4) {
        amp_queue_batch *b = amp_queue_batch_create();
        for (int i = 0; i < PER; i += 97) {
            char key[32];
            snprintf(key, sizeof key, "m%d-%d", g, i);
            add(b, key, "u", false, "{}");
        }
        amp_queue_result r = submit(s, b);
        ck_assert_uint_eq(r.accepted, 0);
        ck_assert_uint_gt(r.duplicates, 0);
    }
    /* More groups drive the merge to its end: the merged keys leave the
     * map, and are found in their run, with the id of their event's row
     * for the admin lookup; the last slice counted the rows it merged. */
    ck_assert_int_eq(merged_upto(), 0);
    int driven = 0;
    for (; driven < 200 && merged_upto() == 0; driven++) {
        char key[32];
        snprintf(key, sizeof key, "drive-%d", driven);
        ck_assert_uint_eq(submit_one(s, key, "{}").accepted, 1);
    }
    ck_assert_int_ge(merged_upto(), 16384);
    ck_assert_int_ge(merged_keys(), merged_upto());
    ck_assert_int_eq(table_rows("dedupe_recent"), 0);
    amp_queue_batch *again = amp_queue_batch_create();
    add(again, "m3-5", "u", false, "{}");
    add(again, "m16-998", "u", false, "{}");
    amp_queue_result dup = submit(s, again);
    ck_assert_uint_eq(dup.duplicates, 2);
    ck_assert_uint_eq(dup.accepted, 0);
    ck_assert_uint_eq(event_jobs(s, "m3-5"), 1);
    amp_queue_close(s);

    /* At open everything recent is merged; the keys still count, and the
     * admin lookup finds an event from its run. */
    s = open_spool(3600);
    ck_assert_int_eq(table_rows("dedupe_recent"), 0);
    ck_assert_int_eq(merged_keys(), BATCHES * PER + driven);
    ck_assert_int_eq(merged_upto(), BATCHES * PER + driven);
    amp_queue_batch *b = amp_queue_batch_create();
    add(b, "m17-999", "u", false, "{}");
    add(b, "m0-0", "u", false, "{}");
    add(b, "fresh", "u", false, "{}");
    amp_queue_result r = submit(s, b);
    ck_assert_uint_eq(r.duplicates, 2);
    ck_assert_uint_eq(r.accepted, 1);
    ck_assert_uint_eq(event_jobs(s, "m17-999"), 1);
    amp_queue_close(s);
}
END_TEST

/* Two different keys with the same 64-bit hash (every key hashes to 42
 * here): both events are stored and delivered, never the second one
 * answered as a duplicate; the same key twice is still a duplicate, in
 * memory and, after the merge at a reopen, in its run; the admin
 * lookup never answers one key with the other's event. */
static int64_t same_hash(const char *key) {
    (void)key;
    return 42;
}

START_TEST(colliding_keys_are_both_delivered) {
    amp_spool_set_key_hash_for_tests(same_hash);
    amp_queue *s = open_spool(3600);
    ck_assert_uint_eq(submit_one(s, "c1", "{\"n\":1}").accepted, 1);
    amp_queue_result r = submit_one(s, "c2", "{\"n\":2}");
    ck_assert_uint_eq(r.duplicates, 0);
    ck_assert_uint_eq(r.accepted, 1);
    r = submit_one(s, "c2", "{}"); /* the same key: found in memory */
    ck_assert_uint_eq(r.duplicates, 1);
    ck_assert_uint_eq(r.accepted, 0);

    amp_queue_job *jobs[4];
    int64_t next;
    ck_assert_int_eq(claim_all(s, amp_now_ms() + 1, jobs, 4, &next), 2);
    ck_assert_str_eq(jobs[0]->dedupe_key, "c1");
    ck_assert_str_eq(jobs[0]->body, "{\"n\":1}");
    ck_assert_str_eq(jobs[1]->dedupe_key, "c2");
    ck_assert_str_eq(jobs[1]->body, "{\"n\":2}");
    free_jobs(jobs, 2);
    /* Both sightings are in dedupe_recent: each key finds its own. */
    ck_assert_uint_eq(event_jobs(s, "c1"), 1);
    ck_assert_uint_eq(event_jobs(s, "c2"), 1);
    ck_assert_uint_eq(event_jobs(s, "c3"), 0);
    amp_queue_close(s);

    /* At open the keys are merged: hash 42 keeps the later key, c2. */
    s = open_spool(3600);
    ck_assert_int_eq(table_rows("dedupe_recent"), 0);
    ck_assert_int_eq(merged_keys(), 1);
    r = submit_one(s, "c2", "{}");
    ck_assert_uint_eq(r.duplicates, 1);
    ck_assert_uint_eq(r.accepted, 0);
    ck_assert_uint_eq(event_jobs(s, "c2"), 1);
    /* c1 lost its dedupe entry to c2: no lookup of c2's event for it, and a
     * repeat of it is stored again (at least once). */
    json_t *ev = amp_queue_event(s, "c1", 100);
    ck_assert_ptr_nonnull(ev);
    ck_assert(json_is_null(json_object_get(ev, "seen_ms")));
    ck_assert_uint_eq(json_array_size(json_object_get(ev, "jobs")), 0);
    json_decref(ev);
    r = submit_one(s, "c3", "{\"n\":3}"); /* a new key against the table */
    ck_assert_uint_eq(r.duplicates, 0);
    ck_assert_uint_eq(r.accepted, 1);
    r = submit_one(s, "c3", "{}"); /* and again: in memory */
    ck_assert_uint_eq(r.duplicates, 1);
    /* c1 and c2 again (claims end with the process, nothing was acked) */
    ck_assert_int_eq(claim_all(s, amp_now_ms() + 1, jobs, 4, &next), 3);
    ck_assert_str_eq(jobs[2]->dedupe_key, "c3");
    free_jobs(jobs, 3);
    amp_queue_close(s);
    amp_spool_set_key_hash_for_tests(NULL);
}
END_TEST

/* Events "r0".."r99" with a row each and "e0".."e9" with none, in one
 * batch. */
static amp_queue_batch *rows_and_rowless(void) {
    amp_queue_batch *b = keys_batch("r", 0, 100, 1);
    for (int i = 0; i < 10; i++) {
        char key[8];
        snprintf(key, sizeof key, "e%d", i);
        amp_queue_batch_event(b, key);
    }
    return b;
}

/* A process stores events, then ends without closing anything (as under
 * kill -9), before any merge: the keys of events with rows are in those
 * rows only, the others in dedupe_recent. The next open reads both back:
 * every key is a duplicate, and its merge counts the rows as merged. */
START_TEST(recent_keys_come_back_from_rows_after_a_crash) {
    pid_t pid = fork();
    ck_assert_int_ge(pid, 0);
    if (pid == 0) {
        char err[256];
        amp_queue *s = amp_spool_open(&(amp_spool_opts){.path = path, .dedupe_window_s = 3600}, err,
                                      sizeof err);
        done_box box = {0};
        if (s)
            amp_queue_submit(s, rows_and_rowless(), on_done, &box);
        if (s)
            amp_queue_flush(s);
        _exit(box.calls == 1 && box.res.accepted == 110 ? 0 : 1);
    }
    int st;
    ck_assert_int_eq(waitpid(pid, &st, 0), pid);
    ck_assert_msg(WIFEXITED(st) && WEXITSTATUS(st) == 0, "the storing process failed: %d", st);
    ck_assert_int_eq(table_rows("deliveries"), 100);
    ck_assert_int_eq(table_rows("dedupe_recent"), 10);
    ck_assert_int_eq(merged_keys(), 0);
    ck_assert_int_eq(merged_upto(), 0);

    amp_queue *s = open_spool(3600);
    ck_assert_int_eq(merged_keys(), 110);
    ck_assert_int_eq(table_rows("dedupe_recent"), 0);
    ck_assert_int_eq(merged_upto(), 100);
    amp_queue_result r = submit(s, rows_and_rowless());
    ck_assert_uint_eq(r.duplicates, 110);
    ck_assert_uint_eq(r.accepted, 0);
    ck_assert_uint_eq(event_jobs(s, "r42"), 1);
    amp_queue_close(s);
}
END_TEST

/* Rows that leave before their keys are merged: a purge of dead letters
 * moves their keys to dedupe_recent, and a row given an id at or below the
 * merged ones (SQLite gives the ids of deleted last rows again) keeps its
 * key there too. Either way the key survives a restart before the next
 * merge. */
START_TEST(keys_survive_purges_and_reused_ids) {
    amp_queue *s = open_spool(3600);
    ck_assert_uint_eq(submit_one(s, "kept", "{}").accepted, 1);
    claim_one(s, amp_now_ms() + 1, "{}"); /* row 1 stays pending, claimed */
    add_dead_letter(s, "purged");         /* row 2, not merged */
    amp_queue_dlq_filter all = {0};
    ck_assert_int_eq(amp_queue_dlq_purge(s, &all), 1);
    ck_assert_int_eq(table_rows("dedupe_recent"), 1);
    amp_queue_close(s);

    /* The open merges both keys: rows up to 1 (the last one left). */
    s = open_spool(3600);
    ck_assert_int_eq(merged_upto(), 1);
    ck_assert_int_eq(table_rows("dedupe_recent"), 0);
    amp_queue_result r = submit_one(s, "purged", "{}");
    ck_assert_uint_eq(r.duplicates, 1);
    ck_assert_uint_eq(r.accepted, 0);
    /* Rows 2 and 3, merged at the next open; then both purged. */
    claim_one(s, amp_now_ms() + 1, "{}");
    add_dead_letter(s, "d2");
    add_dead_letter(s, "d3");
    amp_queue_close(s);
    s = open_spool(3600);
    ck_assert_int_eq(merged_upto(), 3);
    ck_assert_int_eq(amp_queue_dlq_purge(s, &all), 2);
    ck_assert_int_eq(table_rows("dedupe_recent"), 0); /* merged already */
    /* Id 2 again, at or below the merged rows: the key goes to
     * dedupe_recent, and is still a duplicate after a reopen. */
    ck_assert_uint_eq(submit_one(s, "reused", "{}").accepted, 1);
    ck_assert_int_eq(table_rows("deliveries WHERE id = 2 AND dedupe_key = 'reused'"), 1);
    ck_assert_int_eq(table_rows("dedupe_recent"), 1);
    amp_queue_close(s);
    s = open_spool(3600);
    r = submit_one(s, "reused", "{}");
    ck_assert_uint_eq(r.duplicates, 1);
    ck_assert_uint_eq(r.accepted, 0);
    amp_queue_close(s);
}
END_TEST

/* A delivered row whose key is not merged yet holds that key (schema v7),
 * so its retention waits for the merge. Here every merge fails (a trigger
 * refuses inserts into the runs of merged keys) long past the retention: the row
 * stays, and its key is still a duplicate after a restart. Once merges
 * work again the row is pruned, and the key stays a duplicate. */
START_TEST(unmerged_delivered_rows_wait_for_their_merge) {
    amp_spool_set_maintenance_ms_for_tests(20);
    amp_spool_opts o = {.dedupe_window_s = 3600, .retention_s = 1};
    amp_queue *s = open_opts(o);
    spool_sql("CREATE TRIGGER refuse_merge BEFORE INSERT ON dedupe_runs "
              "BEGIN SELECT RAISE(ABORT, 'merges refused by the test'); END");
    ck_assert_uint_eq(submit_one(s, "held", "{}").accepted, 1);
    amp_queue_job *jobs[2];
    int64_t next;
    ck_assert_int_eq(claim_all(s, amp_now_ms() + 1, jobs, 2, &next), 1);
    amp_queue_acknowledge(
        s,
        &(amp_queue_ack){.id = jobs[0]->id, .kind = AMP_QUEUE_ACK_DELIVERED, .http_status = 200});
    free_jobs(jobs, 1);
    amp_queue_flush(s);
    usleep(2500 * 1000); /* the retention and ~100 maintenances, all merges failing */
    amp_queue_stats st;
    ck_assert_int_eq(amp_queue_stats_get(s, &st), 0);
    ck_assert_int_eq(st.delivered, 1);
    ck_assert_int_eq(merged_upto(), 0);
    amp_queue_close(s);

    s = open_opts(o); /* its merge fails too: the key comes from the row */
    amp_queue_result r = submit_one(s, "held", "{}");
    ck_assert_uint_eq(r.duplicates, 1);
    ck_assert_uint_eq(r.accepted, 0);
    spool_sql("DROP TRIGGER refuse_merge");
    int64_t deadline = amp_mono_ms() + 10000;
    while (amp_queue_stats_get(s, &st) == 0 && st.delivered > 0 && amp_mono_ms() < deadline)
        usleep(20 * 1000);
    ck_assert_int_eq(st.delivered, 0);
    ck_assert_int_eq(merged_upto(), 1);
    ck_assert_int_eq(merged_keys(), 1);
    amp_queue_close(s);

    s = open_opts(o);
    r = submit_one(s, "held", "{}");
    ck_assert_uint_eq(r.duplicates, 1);
    ck_assert_uint_eq(r.accepted, 0);
    amp_queue_close(s);
    amp_spool_set_maintenance_ms_for_tests(0);
}
END_TEST

/* Runs (schema v8): a merge writes its keys as a run of their own, and
 * once dedupe.c's RUNS_MAX (16) runs have gathered they are compacted into
 * the dedupe table, about 1,024 keys a step. RUN_KEYS keys a run make a
 * compaction of several steps. */
enum { RUN_KEYS = 200 };

/* Runs first .. first + n - 1 of keys "<prefix><i>", RUN_KEYS each, each
 * merged by a maintenance (every 20 ms here) before the next is stored. */
static void store_runs(amp_queue *s, const char *prefix, int first, int n) {
    for (int r = first; r < first + n; r++) {
        int64_t upto = merged_upto();
        amp_queue_result res = submit(s, keys_batch(prefix, r * RUN_KEYS, (r + 1) * RUN_KEYS, 1));
        ck_assert_uint_eq(res.accepted, RUN_KEYS);
        int64_t deadline = amp_mono_ms() + 5000;
        while (merged_upto() < upto + RUN_KEYS && amp_mono_ms() < deadline)
            usleep(5 * 1000);
        ck_assert_int_ge(merged_upto(), upto + RUN_KEYS);
    }
}

/* Waits until no run is listed (the compaction ended). */
static void wait_runs_compacted(void) {
    int64_t deadline = amp_mono_ms() + 10000;
    while (table_rows("dedupe_segs") > 0 && amp_mono_ms() < deadline)
        usleep(10 * 1000);
    ck_assert_int_eq(table_rows("dedupe_segs"), 0);
}

/* Each of keys "<prefix>0" .. below n is refused as a duplicate. */
static void all_duplicates(amp_queue *s, const char *prefix, int n) {
    amp_queue_result r = submit(s, keys_batch(prefix, 0, n, 1));
    ck_assert_int_eq(r.status, 0);
    ck_assert_uint_eq(r.duplicates, (unsigned)n);
    ck_assert_uint_eq(r.accepted, 0);
}

/* Merged keys stay in their runs, not in the dedupe table, until the
 * sixteenth run: then all of them move into the table, with the id of
 * their event's row for the admin lookup; a key expired meanwhile is left
 * out. Every key is a duplicate throughout. */
START_TEST(runs_are_compacted_into_the_table) {
    amp_spool_set_maintenance_ms_for_tests(20);
    amp_queue_close(open_spool(3600));
    /* A run an earlier process has just left: one key, sighted before the
     * window (a run as old would be compacted at the next maintenance). */
    int64_t now = amp_now_ms(), chk, h = amp_spool_key_digest("expired", &chk);
    char sql[512];
    snprintf(sql, sizeof sql,
             "INSERT INTO dedupe_segs(seg, keys, made_ms) VALUES (1, 1, %lld);"
             "INSERT INTO dedupe_runs(seg, h, seen_ms, chk) VALUES (1, %lld, %lld, %lld);",
             (long long)now, (long long)h, (long long)(now - 7200 * 1000), (long long)chk);
    spool_sql(sql);

    amp_queue *s = open_spool(3600);
    store_runs(s, "c", 0, 14);
    ck_assert_int_eq(table_rows("dedupe"), 0);
    ck_assert_int_eq(table_rows("dedupe_runs"), 14 * RUN_KEYS + 1);
    ck_assert_int_eq(table_rows("dedupe_segs"), 15);
    all_duplicates(s, "c", 14 * RUN_KEYS);

    store_runs(s, "c", 14, 1); /* the sixteenth run */
    wait_runs_compacted();
    ck_assert_int_eq(table_rows("dedupe_runs"), 0);
    ck_assert_int_eq(table_rows("dedupe"), 15 * RUN_KEYS);
    snprintf(sql, sizeof sql, "dedupe WHERE h = %lld", (long long)h);
    ck_assert_int_eq(table_rows(sql), 0);
    all_duplicates(s, "c", 15 * RUN_KEYS);
    json_t *ev = amp_queue_event(s, "c2999", 100);
    ck_assert_ptr_nonnull(ev);
    ck_assert_int_eq(json_array_size(json_object_get(ev, "jobs")), 1);
    json_decref(ev);
    ck_assert_uint_eq(submit_one(s, "expired", "{}").accepted, 1);
    amp_queue_close(s);
    amp_spool_set_maintenance_ms_for_tests(0);
}
END_TEST

/* A compaction that fails half way (a trigger refuses the upper half of
 * the hashes) has moved the lower half into the table and left the upper
 * half in the runs: no key is lost, each is still a duplicate. Once the
 * table takes them again, a later compaction moves the rest. */
START_TEST(a_compaction_cut_short_loses_no_key) {
    amp_spool_set_maintenance_ms_for_tests(20);
    amp_queue *s = open_spool(3600);
    spool_sql("CREATE TRIGGER refuse_upper BEFORE INSERT ON dedupe WHEN NEW.h > 0 "
              "BEGIN SELECT RAISE(ABORT, 'the upper half refused by the test'); END");
    store_runs(s, "x", 0, 16);
    int64_t deadline = amp_mono_ms() + 5000;
    while (table_rows("dedupe_runs WHERE h < 0") > 0 && amp_mono_ms() < deadline)
        usleep(10 * 1000);
    ck_assert_int_eq(table_rows("dedupe_runs WHERE h < 0"), 0);
    ck_assert_int_eq(table_rows("dedupe WHERE h > 0"), 0);
    ck_assert_int_gt(table_rows("dedupe"), 0);
    ck_assert_int_eq(merged_keys(), 16 * RUN_KEYS);
    ck_assert_int_eq(table_rows("dedupe_segs"), 16);
    all_duplicates(s, "x", 16 * RUN_KEYS);

    spool_sql("DROP TRIGGER refuse_upper");
    wait_runs_compacted();
    ck_assert_int_eq(table_rows("dedupe"), 16 * RUN_KEYS);
    ck_assert_int_eq(table_rows("dedupe_runs"), 0);
    all_duplicates(s, "x", 16 * RUN_KEYS);
    amp_queue_close(s);
    amp_spool_set_maintenance_ms_for_tests(0);
}
END_TEST

/* Stores n new keys "<prefix><i>" in one group; returns how many of them
 * were looked up in the dedupe table and the runs. */
static long lookups_for_new(amp_queue *s, const char *prefix, int n) {
    long before = amp_spool_dedupe_lookups_for_tests();
    amp_queue_result r = submit(s, keys_batch(prefix, 0, n, 1));
    ck_assert_uint_eq(r.accepted, (unsigned)n);
    ck_assert_uint_eq(r.duplicates, 0);
    return amp_spool_dedupe_lookups_for_tests() - before;
}

/* Groups of n new keys each ("<tag><group>-<i>") until one costs no more
 * than `most` lookups, or limit groups; returns how many, *cost the last
 * one's. */
static int groups_until(amp_queue *s, const char *tag, int n, long most, int limit, long *cost) {
    int groups = 0;
    do {
        char prefix[16];
        snprintf(prefix, sizeof prefix, "%s%d-", tag, groups++);
        *cost = lookups_for_new(s, prefix, n);
    } while (*cost > most && groups < limit);
    return groups;
}

/* A new key is found new without a look in the dedupe table once the key
 * filter is filled (a slice of the table after each group); every key of
 * the table and of memory is still a duplicate; a filter that has taken
 * more keys than it was sized for is replaced by a bigger one. */
START_TEST(new_keys_skip_the_dedupe_table) {
    enum { OLD = 10000, MORE = 20000 };
    amp_queue *s = open_spool(3600);
    ck_assert_uint_eq(submit(s, keys_batch("old", 0, OLD, 1)).accepted, OLD);
    amp_queue_close(s);
    s = open_spool(3600); /* merged into a run at open */
    ck_assert_int_eq(merged_keys(), OLD);

    /* Until the filter is filled, each new key is looked up. */
    ck_assert_int_eq(lookups_for_new(s, "a", 100), 100);
    long cost;
    int groups = groups_until(s, "b", 100, 5, 100, &cost);
    ck_assert_msg(cost <= 5, "100 new keys still cost %ld lookups after %d groups", cost, groups);

    /* Keys of the table, of memory and of either group are duplicates. */
    amp_queue_batch *b = keys_batch("old", 0, OLD, 7);
    add(b, "a99", "u", false, "{}");
    add(b, "b0-0", "u", false, "{}");
    amp_queue_result r = submit(s, b);
    ck_assert_uint_eq(r.accepted, 0);
    ck_assert_uint_eq(r.duplicates, (OLD + 6) / 7 + 2);

    /* MORE keys fill it past what it was sized for (16,384, the least);
     * the merges put them in the table meanwhile. Its successor, filled
     * the same way, again spares almost every look. */
    for (int i = 0; i < MORE; i += 5000) {
        char prefix[16];
        snprintf(prefix, sizeof prefix, "c%d-", i);
        lookups_for_new(s, prefix, 5000);
    }
    groups = groups_until(s, "d", 1000, 30, 300, &cost);
    ck_assert_msg(cost <= 30, "1,000 new keys still cost %ld lookups after %d groups", cost,
                  groups);
    /* Old keys, and keys stored since the first filter began, merged into
     * the table since (more groups drive the merges on) or still in memory. */
    for (int i = 0; i < 200 && merged_keys() < OLD + MORE / 2; i++) {
        char key[32];
        snprintf(key, sizeof key, "e%d", i);
        ck_assert_uint_eq(submit_one(s, key, "{}").accepted, 1);
    }
    ck_assert_int_ge(merged_keys(), OLD + MORE / 2);
    b = keys_batch("old", 1, OLD, 7);
    for (int i = 0; i < MORE; i += 5000)
        for (int j = 0; j < 5000; j += 25) {
            char key[32];
            snprintf(key, sizeof key, "c%d-%d", i, j);
            add(b, key, "u", false, "{}");
        }
    add(b, "d0-999", "u", false, "{}");
    r = submit(s, b);
    ck_assert_uint_eq(r.accepted, 0);
    ck_assert_uint_eq(r.duplicates, (OLD - 1 + 6) / 7 + MORE / 25 + 1);
    amp_queue_close(s);
}
END_TEST

/* The first filter is sized for the keys the table holds, estimated from
 * its lowest hashes: filled once, a slice of 4,096 hashes after each
 * group (about 50 for 200,000 keys). Sized for the least (16,384) it
 * outgrew itself and started again four times, bigger, 116 groups,
 * and every new key was looked up meanwhile. */
START_TEST(first_filter_is_sized_for_the_table) {
    enum { KEYS = 200000 };
    amp_queue_close(open_spool(3600));
    char sql[512];
    snprintf(sql, sizeof sql,
             "WITH RECURSIVE i(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM i WHERE n < %d) "
             "INSERT OR IGNORE INTO dedupe(h, seen_ms, chk) SELECT random(), %lld, 0 FROM i",
             KEYS, (long long)amp_now_ms());
    spool_sql(sql);
    amp_queue *s = open_spool(3600);
    long cost;
    int groups = groups_until(s, "f", 10, 0, 200, &cost);
    ck_assert_int_eq(cost, 0);
    ck_assert_msg(groups <= 60, "the filter took %d groups to fill", groups);
    amp_queue_close(s);
}
END_TEST

/* A version 4 spool (dedupe keyed by the key's text) is migrated to keys
 * hashed to 64 bits (version 5), then loses the keys' index by time
 * (version 6), then counts every key of its rows as merged (version 7): its
 * pending rows stay claimable, its keys still catch duplicates (and an
 * expired one does not, though its row is recent), the admin lookup still
 * finds an event's rows. */
START_TEST(version_4_spool_is_migrated) {
    amp_queue *s = open_spool(3600);
    submit(s, keys_batch("k", 0, 5, 1)); /* k0..k4 */
    amp_queue_close(s);

    int64_t old = amp_now_ms() - 7200 * 1000;
    char sql[1024];
    snprintf(sql, sizeof sql,
             "DROP TABLE dedupe; DROP TABLE dedupe_recent; DROP TABLE dedupe_merged;"
             "DROP TABLE dedupe_runs; DROP TABLE dedupe_segs;"
             "CREATE TABLE dedupe (key TEXT PRIMARY KEY, seen_ms INTEGER NOT NULL) WITHOUT ROWID;"
             "CREATE INDEX dedupe_seen ON dedupe(seen_ms);"
             "ALTER TABLE dedupe ADD COLUMN first_id INTEGER;"
             "INSERT INTO dedupe SELECT dedupe_key, created_ms, id FROM deliveries;"
             /* k4 was seen before the window: a new sighting is stored */
             "UPDATE dedupe SET seen_ms = %lld WHERE key = 'k4';"
             "PRAGMA user_version = 4;",
             (long long)old);
    spool_sql(sql);

    s = open_spool(3600);
    amp_queue_result r = submit(s, keys_batch("k", 0, 6, 1)); /* k0..k5 */
    ck_assert_int_eq(r.status, 0);
    ck_assert_uint_eq(r.duplicates, 4);
    ck_assert_uint_eq(r.accepted, 2); /* k4 again, and k5 */
    amp_queue_job *jobs[16];
    int64_t next;
    ck_assert_int_eq(claim_all(s, amp_now_ms() + 1, jobs, 16, &next), 7);
    free_jobs(jobs, 7);
    json_t *ev = amp_queue_event(s, "k2", 100);
    ck_assert_ptr_nonnull(ev);
    ck_assert(json_is_integer(json_object_get(ev, "seen_ms")));
    ck_assert_int_eq(json_array_size(json_object_get(ev, "jobs")), 1);
    json_decref(ev);
    amp_queue_close(s);

    sqlite3 *db;
    ck_assert_int_eq(sqlite3_open(path, &db), SQLITE_OK);
    ck_assert_int_eq(user_version(db), 8);
    /* Version 6 has no index of the keys by time. */
    ck_assert_int_eq(query_int(db, "SELECT count(*) FROM sqlite_schema WHERE name = 'dedupe_seen'"),
                     0);
    /* Version 7 counts the five old rows' keys as merged; the two new
     * events' keys are in their rows only. */
    ck_assert_int_eq(query_int(db, "SELECT upto FROM dedupe_merged"), 5);
    ck_assert_int_eq(query_int(db, "SELECT count(*) FROM dedupe_recent"), 0);
    /* The migrated keys carry their check values (k0..k4, one each). */
    sqlite3_stmt *st;
    ck_assert_int_eq(sqlite3_prepare_v2(db,
                                        "SELECT count(DISTINCT chk) FROM dedupe"
                                        " WHERE chk <> 0",
                                        -1, &st, NULL),
                     SQLITE_OK);
    ck_assert_int_eq(sqlite3_step(st), SQLITE_ROW);
    ck_assert_int_eq(sqlite3_column_int(st, 0), 5);
    sqlite3_finalize(st);
    sqlite3_close(db);
}
END_TEST

/* Expired dedupe keys are pruned by a walk of the table in hash order
 * (schema v6 has no index by time), a bounded part of it per maintenance,
 * each maintenance going on from where the last one stopped. Keys spread
 * over the whole hash range, the lower half fresh and more than one
 * maintenance reads, the upper half expired (and the lowest and highest
 * hashes there are): the expired ones are all pruned within a few
 * maintenances, and the fresh ones all stay. */
START_TEST(expired_dedupe_keys_are_swept) {
    amp_queue_close(open_spool(3600));
    enum { KEYS = 250000 }; /* upkeep.c reads 100,000 a maintenance */
    sqlite3 *db;
    ck_assert_int_eq(sqlite3_open(path, &db), SQLITE_OK);
    char sql[512];
    int64_t old = amp_now_ms() - 7200 * 1000;
    snprintf(sql, sizeof sql,
             "WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n WHERE i < %d) "
             "INSERT INTO dedupe(h, seen_ms, chk) SELECT (i - %d) * 36893488147418, "
             "CASE WHEN i < %d THEN %lld ELSE %lld END, 0 FROM n WHERE i <> %d",
             KEYS, KEYS / 2, KEYS / 2, (long long)amp_now_ms(), (long long)old, KEYS / 2);
    exec_ok(db, sql);
    /* The lowest and the highest hashes there are, expired too. */
    snprintf(sql, sizeof sql,
             "INSERT INTO dedupe(h, seen_ms, chk) VALUES (-9223372036854775808, %lld, 0), "
             "(9223372036854775807, %lld, 0)",
             (long long)old, (long long)old);
    exec_ok(db, sql);
    ck_assert_int_eq(query_int(db, "SELECT count(*) FROM dedupe"), KEYS + 2);
    sqlite3_close(db);

    amp_spool_set_maintenance_ms_for_tests(20);
    amp_queue *s = open_spool(3600);
    int64_t left = -1, deadline = amp_mono_ms() + 20000;
    while ((left = table_rows("dedupe")) > KEYS / 2 && amp_mono_ms() < deadline)
        usleep(20 * 1000);
    amp_queue_close(s);
    amp_spool_set_maintenance_ms_for_tests(0);
    ck_assert_int_eq(left, KEYS / 2);
    ck_assert_int_eq(table_rows("dedupe"), KEYS / 2);
    ck_assert_int_eq(table_rows("dedupe WHERE h < 0"), KEYS / 2);
}
END_TEST

/* Delivered rows are pruned once their retention has passed (maintenance,
 * here every 20 ms), and only they: a dead letter and a pending row stay,
 * a row delivered later stays until its own retention ends, and the
 * pruned event's dedupe key still catches it sent again. */
START_TEST(delivered_rows_pruned_after_retention) {
    amp_spool_set_maintenance_ms_for_tests(20);
    amp_queue *s = open_opts((amp_spool_opts){.dedupe_window_s = 3600, .retention_s = 2});
    amp_queue_batch *b = amp_queue_batch_create();
    add(b, "delivered", "u", false, "{}");
    add(b, "dead", "u", false, "{}");
    add(b, "pending", "u", false, "{}");
    ck_assert_uint_eq(submit(s, b).accepted, 3);
    amp_queue_job *jobs[3];
    int64_t next;
    ck_assert_int_eq(claim_all(s, amp_now_ms() + 1, jobs, 3, &next), 3);
    for (int i = 0; i < 3; i++) {
        const char *key = jobs[i]->dedupe_key;
        if (strcmp(key, "pending") == 0)
            continue; /* stays claimed, pending in the spool */
        bool dead = strcmp(key, "dead") == 0;
        amp_queue_acknowledge(
            s, &(amp_queue_ack){.id = jobs[i]->id,
                                .kind = dead ? AMP_QUEUE_ACK_DEAD : AMP_QUEUE_ACK_DELIVERED,
                                .http_status = dead ? 400 : 200});
    }
    amp_queue_flush(s);
    amp_queue_stats st;
    ck_assert_int_eq(amp_queue_stats_get(s, &st), 0);
    ck_assert_int_eq(st.delivered, 1);

    int64_t deadline = amp_mono_ms() + 10000;
    while (amp_queue_stats_get(s, &st) == 0 && st.delivered > 0 && amp_mono_ms() < deadline)
        usleep(20 * 1000);
    ck_assert_int_eq(st.delivered, 0);
    ck_assert_int_eq(st.dead, 1);
    ck_assert_int_eq(st.pending, 1);

    /* Delivered now: kept for its own retention. */
    amp_queue_batch *late = amp_queue_batch_create();
    add(late, "late", "u", false, "{}");
    ck_assert_uint_eq(submit(s, late).accepted, 1);
    amp_queue_job *lj[2];
    ck_assert_int_eq(claim_all(s, amp_now_ms() + 1, lj, 2, &next), 1);
    amp_queue_acknowledge(
        s, &(amp_queue_ack){.id = lj[0]->id, .kind = AMP_QUEUE_ACK_DELIVERED, .http_status = 200});
    amp_queue_flush(s);
    usleep(200 * 1000); /* ten maintenances */
    ck_assert_int_eq(amp_queue_stats_get(s, &st), 0);
    ck_assert_int_eq(st.delivered, 1);

    amp_queue_batch *again = amp_queue_batch_create();
    add(again, "delivered", "u", false, "{}");
    amp_queue_result r = submit(s, again);
    ck_assert_uint_eq(r.duplicates, 1);
    ck_assert_uint_eq(r.accepted, 0);
    free_jobs(lj, 1);
    free_jobs(jobs, 3);
    amp_queue_close(s);
    amp_spool_set_maintenance_ms_for_tests(0);
}
END_TEST

/* The admin API's lookups: an event's rows by its dedupe key, with the
 * answer's excerpt and conversation; the jobs per app. */
START_TEST(event_lookup_and_app_depths) {
    amp_queue *s = open_spool(3600);
    amp_queue_batch *b = amp_queue_batch_create();
    amp_queue_batch_event(b, "ev-1"); /* fans out to two apps */
    amp_queue_batch_request(b, "r1", "alpha", "u1", true, "{\"n\":1}");
    amp_queue_batch_request(b, "r2", "beta", "u1", false, "{\"n\":2}");
    add(b, "ev-2", "u2", false, "{\"n\":3}");
    submit(s, b);
    int64_t next;
    amp_queue_job *jobs[4];
    ck_assert_int_eq(claim_all(s, amp_now_ms() + 1, jobs, 4, &next), 3);
    /* "ég" twice: the excerpt of 3 characters must not split a sequence. */
    amp_queue_acknowledge(
        s, &(amp_queue_ack){.id = jobs[0]->id,
                            .kind = AMP_QUEUE_ACK_DELIVERED,
                            .http_status = 200,
                            .result_json = "{\"answer\":\"\xc3\xa9g\xc3\xa9g\",\"conversation_id\":"
                                           "\"conv-9\"}",
                            .conversation_id = "conv-9"});
    amp_queue_acknowledge(s, &(amp_queue_ack){.id = jobs[1]->id,
                                              .kind = AMP_QUEUE_ACK_DEAD,
                                              .http_status = 400,
                                              .code = "invalid_param",
                                              .message = "bad"});
    int64_t ev2 = jobs[2]->id; /* stays claimed, pending */
    free_jobs(jobs, 3);
    amp_queue_flush(s);

    json_t *ev = amp_queue_event(s, "ev-1", 3);
    ck_assert_ptr_nonnull(ev);
    ck_assert(json_is_integer(json_object_get(ev, "seen_ms")));
    json_t *js = json_object_get(ev, "jobs");
    ck_assert_uint_eq(json_array_size(js), 2);
    json_t *j0 = json_array_get(js, 0), *j1 = json_array_get(js, 1);
    ck_assert_str_eq(json_string_value(json_object_get(j0, "state")), "delivered");
    ck_assert_str_eq(json_string_value(json_object_get(j0, "app")), "alpha");
    ck_assert_str_eq(json_string_value(json_object_get(j0, "answer")), "\xc3\xa9g\xc3\xa9");
    ck_assert_str_eq(json_string_value(json_object_get(j0, "conversation_id")), "conv-9");
    ck_assert_int_eq(json_integer_value(json_object_get(j0, "attempts")), 1);
    ck_assert_int_eq(json_integer_value(json_object_get(j0, "last_status")), 200);
    ck_assert_str_eq(json_string_value(json_object_get(j1, "state")), "dead");
    ck_assert_str_eq(json_string_value(json_object_get(j1, "last_code")), "invalid_param");
    ck_assert(json_is_null(json_object_get(j1, "answer")));
    ck_assert(json_is_null(json_object_get(j1, "conversation_id")));
    json_decref(ev);

    ev = amp_queue_event(s, "ev-2", 100);
    js = json_object_get(ev, "jobs");
    ck_assert_uint_eq(json_array_size(js), 1);
    ck_assert_str_eq(json_string_value(json_object_get(json_array_get(js, 0), "state")), "pending");
    ck_assert(json_is_null(json_object_get(json_array_get(js, 0), "last_status")));
    json_decref(ev);

    ev = amp_queue_event(s, "never-sent", 100);
    ck_assert(json_is_null(json_object_get(ev, "seen_ms")));
    ck_assert_uint_eq(json_array_size(json_object_get(ev, "jobs")), 0);
    json_decref(ev);

    json_t *d = amp_queue_app_depths(s);
    ck_assert_ptr_nonnull(d);
    ck_assert_ptr_null(json_object_get(d, "alpha")); /* only delivered rows */
    ck_assert_int_eq(json_integer_value(json_object_get(json_object_get(d, "beta"), "dead")), 1);
    ck_assert_int_eq(json_integer_value(json_object_get(json_object_get(d, "beta"), "pending")), 0);
    json_t *app = json_object_get(d, "app");
    ck_assert_int_eq(json_integer_value(json_object_get(app, "pending")), 1);
    ck_assert_int_gt(json_integer_value(json_object_get(app, "oldest_pending_ms")), 0);
    json_decref(d);

    /* The newest rows purged: SQLite gives their ids again, and the next
     * events' rows are still found from their dedupe entries. */
    amp_queue_acknowledge(s, &(amp_queue_ack){.id = ev2, .kind = AMP_QUEUE_ACK_DEAD});
    amp_queue_flush(s);
    amp_queue_dlq_filter all = {0};
    ck_assert_int_eq(amp_queue_dlq_purge(s, &all), 2);
    b = amp_queue_batch_create();
    add(b, "ev-3", "u3", false, "{\"n\":4}");
    add(b, "ev-4", "u4", false, "{\"n\":5}");
    submit(s, b);
    for (int i = 3; i <= 4; i++) {
        char key[8];
        snprintf(key, sizeof key, "ev-%d", i);
        ev = amp_queue_event(s, key, 100);
        js = json_object_get(ev, "jobs");
        ck_assert_uint_eq(json_array_size(js), 1);
        ck_assert_str_eq(json_string_value(json_object_get(json_array_get(js, 0), "user")),
                         i == 3 ? "u3" : "u4");
        ck_assert_int_le(json_integer_value(json_object_get(json_array_get(js, 0), "id")), ev2);
        json_decref(ev);
    }
    /* Purged: known to dedupe, no rows. */
    ev = amp_queue_event(s, "ev-2", 100);
    ck_assert(json_is_integer(json_object_get(ev, "seen_ms")));
    ck_assert_uint_eq(json_array_size(json_object_get(ev, "jobs")), 0);
    json_decref(ev);
    amp_queue_close(s);

    /* Without dedupe there is no entry to start from. */
    s = open_spool(0);
    b = amp_queue_batch_create();
    add(b, "nodedupe", "u", false, "{}");
    submit(s, b);
    ev = amp_queue_event(s, "nodedupe", 100);
    ck_assert(json_is_null(json_object_get(ev, "seen_ms")));
    ck_assert_uint_eq(json_array_size(json_object_get(ev, "jobs")), 0);
    json_decref(ev);
    amp_queue_close(s);
}
END_TEST

/* The dead-letter filters by name, shared by `dlq` and the admin API. */
START_TEST(dlq_filters_by_name) {
    amp_queue_dlq_filter f = {0};
    char err[160];
    ck_assert(!amp_queue_dlq_filter_any(&f));
    ck_assert_int_eq(amp_queue_dlq_filter_set(&f, "route", "r", err, sizeof err), 0);
    ck_assert_int_eq(amp_queue_dlq_filter_set(&f, "app", "a", err, sizeof err), 0);
    ck_assert_int_eq(amp_queue_dlq_filter_set(&f, "code", "c", err, sizeof err), 0);
    ck_assert_int_eq(amp_queue_dlq_filter_set(&f, "status", "404", err, sizeof err), 0);
    ck_assert_int_eq(amp_queue_dlq_filter_set(&f, "since", "1700000000", err, sizeof err), 0);
    ck_assert_int_eq(amp_queue_dlq_filter_set(&f, "until", "2024-01-02T03:04:05Z", err, sizeof err),
                     0);
    ck_assert_int_eq(amp_queue_dlq_filter_set(&f, "id", "7", err, sizeof err), 0);
    ck_assert_int_eq(amp_queue_dlq_filter_set(&f, "id", "9", err, sizeof err), 0);
    ck_assert_str_eq(f.route, "r");
    ck_assert_str_eq(f.app, "a");
    ck_assert_str_eq(f.code, "c");
    ck_assert_int_eq(f.status, 404);
    ck_assert_int_eq(f.since_ms, 1700000000000LL);
    ck_assert_int_eq(f.until_ms, 1704164645000LL);
    ck_assert_uint_eq(f.nids, 2);
    ck_assert_int_eq(f.ids[1], 9);
    ck_assert(amp_queue_dlq_filter_any(&f));
    ck_assert_int_eq(amp_queue_dlq_filter_set(&f, "colour", "x", err, sizeof err), 1);
    ck_assert_int_eq(amp_queue_dlq_filter_set(&f, "status", "99", err, sizeof err), -1);
    ck_assert_str_eq(err, "found '99'; expected an HTTP status 100..599");
    ck_assert_int_eq(amp_queue_dlq_filter_set(&f, "since", "yesterday", err, sizeof err), -1);
    ck_assert_str_eq(err, "found 'yesterday'; expected Unix seconds or YYYY-MM-DDTHH:MM:SSZ");
    ck_assert_int_eq(amp_queue_dlq_filter_set(&f, "id", "0", err, sizeof err), -1);
    ck_assert_str_eq(err, "found '0'; expected a positive job id");
    amp_queue_dlq_filter_clear(&f);
    ck_assert(!amp_queue_dlq_filter_any(&f));
    ck_assert_ptr_null(f.ids);
}
END_TEST

/* An engine that leaves the operator operations out: the queue says so
 * (the admin API answers 501) and the calls return NULL. */
static void null_close(void *e) {
    (void)e;
}

START_TEST(engine_may_leave_operator_ops_out) {
    static const amp_queue_ops bare = {.close = null_close};
    amp_queue *q = amp_queue_create(&bare, NULL, 1);
    ck_assert(!amp_queue_offers(q, AMP_QUEUE_OFFERS_EVENT));
    ck_assert(!amp_queue_offers(q, AMP_QUEUE_OFFERS_APP_DEPTHS));
    ck_assert(!amp_queue_offers(q, AMP_QUEUE_OFFERS_DLQ));
    ck_assert_ptr_null(amp_queue_event(q, "k", 10));
    ck_assert_ptr_null(amp_queue_app_depths(q));
    amp_queue_close(q);
    amp_queue *s = open_spool(3600);
    ck_assert(amp_queue_offers(s, AMP_QUEUE_OFFERS_EVENT));
    ck_assert(amp_queue_offers(s, AMP_QUEUE_OFFERS_APP_DEPTHS));
    ck_assert(amp_queue_offers(s, AMP_QUEUE_OFFERS_DLQ));
    amp_queue_close(s);
}
END_TEST

static off_t file_size(const char *suffix) {
    char p[160];
    snprintf(p, sizeof p, "%s%s", path, suffix);
    struct stat st;
    return stat(p, &st) == 0 ? st.st_size : 0;
}

/* Checkpoints run beside the committer: while the spool stays open, the
 * rows reach the database file and the log stays bounded (8000 frames of
 * 4 KiB pages, plus what one group adds; the 88 MB written here would not
 * fit). */
START_TEST(log_is_checkpointed_and_bounded) {
    amp_queue *s = open_opts((amp_spool_opts){.dedupe_window_s = 3600, .sync_normal = true});
    char body[1100];
    memset(body, 'x', sizeof body - 1);
    body[sizeof body - 1] = '\0';
    off_t wal_max = 0;
    for (int g = 0; g < 8000; g++) {
        amp_queue_batch *b = amp_queue_batch_create();
        for (int i = 0; i < 10; i++) {
            char key[32], user[32];
            snprintf(key, sizeof key, "k%d-%d", g, i);
            snprintf(user, sizeof user, "u%d", (g * 7 + i) % 1000);
            add(b, key, user, false, body);
        }
        ck_assert_int_eq(submit(s, b).accepted, 10);
        off_t w = file_size("-wal");
        wal_max = w > wal_max ? w : wal_max;
    }
    off_t db_size = file_size("");
    amp_queue_close(s);
    ck_assert_msg(wal_max <= (off_t)(8000 + 200) * (4096 + 24), "log grew to %lld bytes",
                  (long long)wal_max);
    /* 80,000 rows of ~1.1 KB: most of them in the database file already. */
    ck_assert_msg(db_size > 50 * 1000 * 1000, "database file %lld bytes while open",
                  (long long)db_size);
}
END_TEST

START_TEST(pending_rows_survive_reopen) {
    amp_queue *s = open_spool(3600);
    amp_queue_batch *b = amp_queue_batch_create();
    add(b, "x", "u", false, "{\"keep\":true}");
    submit(s, b);
    claim_one(s, amp_now_ms() + 1, "{\"keep\":true}");
    amp_queue_close(s); /* claimed but never acknowledged, as in a crash */

    s = open_spool(3600);
    claim_one(s, amp_now_ms() + 1, "{\"keep\":true}");
    amp_queue_close(s);
}
END_TEST

START_TEST(claim_limit_and_next_due) {
    amp_queue *s = open_spool(3600);
    submit(s, keys_batch("k", 0, 10, 1));
    amp_queue_job *jobs[10];
    int64_t now = amp_now_ms() + 1, next;
    ck_assert_int_eq(claim_all(s, now, jobs, 4, &next), 4);
    ck_assert_int_eq(next, now); /* more are due now */
    int64_t last = jobs[3]->id;
    free_jobs(jobs, 4);
    /* The query itself skips claimed rows: a claim of 4 behind 4 claimed
     * rows gets the next 4, not the claimed ones filtered out afterwards. */
    ck_assert_int_eq(claim_all(s, now, jobs, 4, &next), 4);
    ck_assert_int_gt(jobs[0]->id, last);
    free_jobs(jobs, 4);
    ck_assert_int_eq(claim_all(s, now, jobs, 10, &next), 2);
    free_jobs(jobs, 2);
    amp_queue_close(s);
}
END_TEST

/* The engine contract of the waiting state and of a retry's run id (what
 * any engine behind queue.h keeps): a RETRY's run_id comes back with the
 * job; a WAITING row is neither pending nor dead, is counted apart, listed
 * with f.waiting only, and a replay of it is a fresh schedule without the
 * old run. */
START_TEST(waiting_rows_and_retry_run_ids) {
    amp_queue *s = open_spool(3600);
    amp_queue_batch *b = amp_queue_batch_create();
    add(b, "w1", "u1", false, "{\"n\":1}");
    add(b, "w2", "u2", false, "{\"n\":2}");
    submit(s, b);
    int64_t now = amp_now_ms() + 1, next;
    amp_queue_job *jobs[4];
    ck_assert_int_eq(claim_all(s, now, jobs, 4, &next), 2);
    ck_assert_ptr_null(jobs[0]->run_id);
    int64_t waiting_id = jobs[0]->id, retry_id = jobs[1]->id;
    amp_queue_acknowledge(s, &(amp_queue_ack){.id = waiting_id,
                                              .kind = AMP_QUEUE_ACK_WAITING,
                                              .http_status = 200,
                                              .code = "waiting_input",
                                              .message = "paused",
                                              .result_json = "{\"workflow_run_id\":\"run-w\"}"});
    amp_queue_acknowledge(s, &(amp_queue_ack){.id = retry_id,
                                              .kind = AMP_QUEUE_ACK_RETRY,
                                              .due_ms = now,
                                              .http_status = 200,
                                              .code = "timeout",
                                              .run_id = "run-r"});
    free_jobs(jobs, 2);
    amp_queue_flush(s);

    /* The retried job comes back with its run; the waiting one does not. */
    ck_assert_int_eq(claim_all(s, now + 1, jobs, 4, &next), 1);
    ck_assert_int_eq(jobs[0]->id, retry_id);
    ck_assert_str_eq(jobs[0]->run_id, "run-r");
    /* A release (its app paused) keeps the run, or stores the newer one it
     * names. */
    const char *released[] = {NULL, "run-r2"}, *expect[] = {"run-r", "run-r2"};
    for (int i = 0; i < 2; i++) {
        amp_queue_acknowledge(s, &(amp_queue_ack){.id = retry_id,
                                                  .kind = AMP_QUEUE_ACK_RELEASE,
                                                  .due_ms = now,
                                                  .run_id = released[i]});
        free_jobs(jobs, 1);
        amp_queue_flush(s);
        ck_assert_int_eq(claim_all(s, now + 1, jobs, 4, &next), 1);
        ck_assert_str_eq(jobs[0]->run_id, expect[i]);
    }
    amp_queue_acknowledge(
        s, &(amp_queue_ack){.id = retry_id, .kind = AMP_QUEUE_ACK_DELIVERED, .http_status = 200});
    free_jobs(jobs, 1);
    amp_queue_flush(s);

    amp_queue_stats st;
    ck_assert_int_eq(amp_queue_stats_get(s, &st), 0);
    ck_assert_int_eq(st.pending, 0);
    ck_assert_int_eq(st.dead, 0);
    ck_assert_int_eq(st.waiting, 1);
    ck_assert_int_eq(st.delivered, 1);
    ck_assert_int_eq(amp_queue_depth(s), 0);

    amp_queue_dlq_filter dead = {0}, waiting = {.waiting = true};
    json_t *rows = amp_queue_dlq_list(s, &dead, 10);
    ck_assert_uint_eq(json_array_size(rows), 0);
    json_decref(rows);
    rows = amp_queue_dlq_list(s, &waiting, 10);
    ck_assert_uint_eq(json_array_size(rows), 1);
    json_t *r0 = json_array_get(rows, 0);
    ck_assert_str_eq(json_string_value(json_object_get(r0, "state")), "waiting_input");
    ck_assert_str_eq(json_string_value(json_object_get(r0, "code")), "waiting_input");
    ck_assert_str_eq(
        json_string_value(json_object_get(json_object_get(r0, "result"), "workflow_run_id")),
        "run-w");
    json_decref(rows);

    /* A dead-letter purge leaves it; a replay of waiting rows starts it
     * afresh, without the old run. */
    ck_assert_int_eq(amp_queue_dlq_purge(s, &dead), 0);
    ck_assert_int_eq(amp_queue_dlq_replay(s, &waiting), 1);
    ck_assert_int_eq(claim_all(s, amp_now_ms() + 1, jobs, 4, &next), 1);
    ck_assert_int_eq(jobs[0]->id, waiting_id);
    ck_assert_int_eq(jobs[0]->attempts, 0);
    ck_assert_ptr_null(jobs[0]->run_id);
    free_jobs(jobs, 1);
    amp_queue_close(s);
}
END_TEST

START_TEST(dead_letters_list_replay_purge) {
    amp_queue *s = open_spool(3600);
    amp_queue_batch *b = amp_queue_batch_create();
    add(b, "d1", "u1", false, "{\"n\":1}");
    add(b, "d2", "u2", false, "{\"n\":2}");
    add(b, "d3", "u3", false, "{\"n\":3}");
    submit(s, b);
    int64_t now = amp_now_ms() + 1, next;
    amp_queue_job *jobs[4];
    ck_assert_int_eq(claim_all(s, now, jobs, 4, &next), 3);
    amp_queue_acknowledge(s, &(amp_queue_ack){.id = jobs[0]->id,
                                              .kind = AMP_QUEUE_ACK_DEAD,
                                              .http_status = 400,
                                              .code = "app_unavailable",
                                              .message = "App unavailable"});
    amp_queue_acknowledge(s, &(amp_queue_ack){.id = jobs[1]->id,
                                              .kind = AMP_QUEUE_ACK_DEAD,
                                              .http_status = 404,
                                              .code = "not_found",
                                              .message = "gone"});
    amp_queue_acknowledge(
        s,
        &(amp_queue_ack){.id = jobs[2]->id, .kind = AMP_QUEUE_ACK_DELIVERED, .http_status = 200});
    int64_t first = jobs[0]->id, second = jobs[1]->id;
    free_jobs(jobs, 3);
    amp_queue_flush(s);

    amp_queue_dlq_filter all = {0};
    json_t *rows = amp_queue_dlq_list(s, &all, 100);
    ck_assert_uint_eq(json_array_size(rows), 2);
    json_t *r0 = json_array_get(rows, 0);
    ck_assert_str_eq(json_string_value(json_object_get(r0, "code")), "app_unavailable");
    ck_assert_int_eq(json_integer_value(json_object_get(r0, "status")), 400);
    ck_assert_str_eq(json_string_value(json_object_get(r0, "body")), "{\"n\":1}");
    json_decref(rows);

    amp_queue_dlq_filter by_status = {.status = 404};
    rows = amp_queue_dlq_list(s, &by_status, 100);
    ck_assert_uint_eq(json_array_size(rows), 1);
    ck_assert_int_eq(json_integer_value(json_object_get(json_array_get(rows, 0), "id")), second);
    json_decref(rows);
    amp_queue_dlq_filter by_code = {.code = "nothing-like-this"};
    rows = amp_queue_dlq_list(s, &by_code, 100);
    ck_assert_uint_eq(json_array_size(rows), 0);
    json_decref(rows);

    /* Replay one by id: pending again, due now, attempts reset. */
    amp_queue_dlq_filter one = {.ids = &first, .nids = 1};
    ck_assert_int_eq(amp_queue_dlq_replay(s, &one), 1);
    ck_assert_int_eq(claim_all(s, amp_now_ms() + 1, jobs, 4, &next), 1);
    ck_assert_int_eq(jobs[0]->id, first);
    ck_assert_int_eq(jobs[0]->attempts, 0);
    ck_assert_int_ge(jobs[0]->created_ms, now - 1);
    free_jobs(jobs, 1);

    /* Purge removes only dead letters. */
    ck_assert_int_eq(amp_queue_dlq_purge(s, &all), 1);
    amp_queue_stats st;
    ck_assert_int_eq(amp_queue_stats_get(s, &st), 0);
    ck_assert_int_eq(st.dead, 0);
    ck_assert_int_eq(st.pending, 1);
    ck_assert_int_eq(st.delivered, 1);
    amp_queue_close(s);
}
END_TEST

START_TEST(depth_tracks_pending_and_limit) {
    amp_spool_opts o = {.dedupe_window_s = 3600, .max_pending = 3};
    amp_queue *s = open_opts(o);
    amp_queue_batch *b = amp_queue_batch_create();
    add(b, "a", "u", false, "{}");
    add(b, "b", "u", false, "{}");
    submit(s, b);
    ck_assert_int_eq(amp_queue_depth(s), 2);
    ck_assert(!amp_queue_full(s));
    b = amp_queue_batch_create();
    add(b, "c", "u", false, "{}");
    add(b, "a", "u", false, "{}"); /* duplicate: no row */
    submit(s, b);
    ck_assert_int_eq(amp_queue_depth(s), 3);
    ck_assert_str_eq(amp_queue_full(s), "the spool holds spool.max_pending events");

    amp_queue_job *jobs[4];
    int64_t next;
    ck_assert_int_eq(claim_all(s, amp_now_ms() + 1, jobs, 4, &next), 3);
    amp_queue_acknowledge(
        s,
        &(amp_queue_ack){.id = jobs[0]->id, .kind = AMP_QUEUE_ACK_DELIVERED, .http_status = 200});
    amp_queue_acknowledge(
        s, &(amp_queue_ack){.id = jobs[1]->id, .kind = AMP_QUEUE_ACK_RETRY, .due_ms = 1});
    free_jobs(jobs, 3);
    amp_queue_flush(s);
    ck_assert_int_eq(amp_queue_depth(s), 2);
    ck_assert(!amp_queue_full(s));
    amp_queue_close(s);

    /* Counted again from the file on open. */
    s = open_opts(o);
    ck_assert_int_eq(amp_queue_depth(s), 2);
    amp_queue_close(s);
}
END_TEST

/* A limit reached holds until a tenth of it is free: no flip per delivery. */
START_TEST(limit_holds_until_a_tenth_is_free) {
    amp_queue *s = open_opts((amp_spool_opts){.dedupe_window_s = 3600, .max_pending = 20});
    submit(s, keys_batch("k", 0, 20, 1));
    ck_assert_ptr_nonnull(amp_queue_full(s));
    amp_queue_job *jobs[20];
    int64_t next;
    ck_assert_int_eq(claim_all(s, amp_now_ms() + 1, jobs, 20, &next), 20);
    int acked = 0;
    for (; acked < 2; acked++) /* 18 pending: still full */
        amp_queue_acknowledge(
            s, &(amp_queue_ack){.id = jobs[acked]->id, .kind = AMP_QUEUE_ACK_DELIVERED});
    amp_queue_flush(s);
    ck_assert_int_eq(amp_queue_depth(s), 18);
    ck_assert_ptr_nonnull(amp_queue_full(s));
    amp_queue_acknowledge(
        s, &(amp_queue_ack){.id = jobs[acked++]->id, .kind = AMP_QUEUE_ACK_DELIVERED});
    amp_queue_flush(s);
    ck_assert_int_eq(amp_queue_depth(s), 17);
    ck_assert_ptr_null(amp_queue_full(s));
    free_jobs(jobs, 20);
    amp_queue_close(s);
}
END_TEST

/* spool.max_bytes: full once the rows take that much room; the delivered
 * rows then go before their retention (dead letters stay), and the spool
 * takes new events again by itself. */
START_TEST(size_limit_prunes_delivered_rows_then_recovers) {
    amp_queue *s = open_spool(3600);
    int64_t empty = amp_queue_bytes(s);
    ck_assert_int_gt(empty, 0);
    amp_queue_close(s);
    s = open_opts((amp_spool_opts){.dedupe_window_s = 3600, .max_bytes = empty + (256 << 10)});
    ck_assert_ptr_null(amp_queue_full(s));

    char body[4096];
    memset(body, 'x', sizeof body - 1);
    body[sizeof body - 1] = '\0';
    int stored = 0;
    while (!amp_queue_full(s) && stored < 400) { /* ~64 rows of 4 KiB fill it */
        char key[32];
        snprintf(key, sizeof key, "big-%d", stored);
        amp_queue_batch *b = amp_queue_batch_create();
        add(b, key, "u", false, body);
        ck_assert_int_eq(submit(s, b).accepted, 1);
        stored++;
    }
    ck_assert_str_eq(amp_queue_full(s), "the spool reached spool.max_bytes");
    ck_assert_int_ge(amp_queue_bytes(s), empty + (256 << 10));
    ck_assert_int_gt(stored, 32);

    /* Delivered (all but one dead letter): still full until pruned. */
    amp_queue_job *jobs[400];
    int64_t next;
    ck_assert_int_eq(claim_all(s, amp_now_ms() + 1, jobs, 400, &next), stored);
    for (int i = 0; i < stored; i++)
        amp_queue_acknowledge(
            s, &(amp_queue_ack){.id = jobs[i]->id,
                                .kind = i == 0 ? AMP_QUEUE_ACK_DEAD : AMP_QUEUE_ACK_DELIVERED,
                                .http_status = i == 0 ? 400 : 200});
    free_jobs(jobs, stored);
    amp_queue_flush(s);
    ck_assert_int_eq(amp_queue_depth(s), 0);

    /* Maintenance runs every second while the size limit holds. */
    int64_t deadline = amp_mono_ms() + 5000;
    while (amp_queue_full(s) && amp_mono_ms() < deadline)
        usleep(20 * 1000);
    ck_assert_ptr_null(amp_queue_full(s));
    ck_assert_int_lt(amp_queue_bytes(s), empty + (256 << 10));
    amp_queue_stats st;
    ck_assert_int_eq(amp_queue_stats_get(s, &st), 0);
    ck_assert_int_eq(st.delivered, 0);
    ck_assert_int_eq(st.dead, 1);
    amp_queue_batch *b = amp_queue_batch_create();
    add(b, "after", "u", false, "{}");
    ck_assert_int_eq(submit(s, b).accepted, 1);
    amp_queue_close(s);
}
END_TEST

/* A replay by another process (the dlq command) is counted by the daemon's
 * spool at its next commit. */
START_TEST(depth_follows_replay_from_another_process) {
    amp_queue *s = open_spool(3600);
    add_dead_letter(s, "r1");
    ck_assert_int_eq(amp_queue_depth(s), 0);

    char err[256] = "";
    amp_queue *cli = amp_spool_open_admin(&(amp_spool_opts){.path = path}, err, sizeof err);
    ck_assert_msg(cli != NULL, "admin open: %s", err);
    amp_queue_dlq_filter all = {0};
    ck_assert_int_eq(amp_queue_dlq_replay(cli, &all), 1);
    amp_queue_close(cli);

    amp_queue_batch *b = amp_queue_batch_create();
    add(b, "r2", "u", false, "{}");
    submit(s, b);
    ck_assert_int_eq(amp_queue_depth(s), 2);
    amp_queue_close(s);
}
END_TEST

/* The engine interface as the SQLite engine fills it: one shard, whatever
 * the hint; acknowledgements always taken. */
START_TEST(one_shard_and_acks_taken) {
    amp_queue *s = open_spool(3600);
    ck_assert_int_eq(amp_queue_shards(s), 1);
    amp_queue_batch *b = amp_queue_batch_create();
    add(b, "k1", "u", false, "{}");
    submit(s, b);
    amp_queue_job *jobs[2];
    int64_t next;
    ck_assert_int_eq(amp_queue_claim_shard(s, 0, amp_now_ms() + 1, jobs, 2, &next), 1);
    ck_assert_int_eq(jobs[0]->shard, 0);
    ck_assert_int_eq(amp_queue_acknowledge(s, &(amp_queue_ack){.id = jobs[0]->id,
                                                               .shard = jobs[0]->shard,
                                                               .kind = AMP_QUEUE_ACK_DELIVERED,
                                                               .http_status = 200}),
                     AMP_QUEUE_ACK_TAKEN);
    free_jobs(jobs, 1);
    amp_queue_flush(s);
    ck_assert_int_eq(
        amp_queue_claim_shard(s, AMP_QUEUE_SHARD_ANY, amp_now_ms() + 1, jobs, 2, &next), 0);
    ck_assert_int_eq(next, INT64_MAX);
    amp_queue_close(s);
}
END_TEST

/* Threads of this process, from /proc/self/task. */
static int thread_count(void) {
    DIR *d = opendir("/proc/self/task");
    ck_assert_ptr_nonnull(d);
    int n = 0;
    for (struct dirent *e; (e = readdir(d));)
        n += e->d_name[0] != '.';
    closedir(d);
    return n;
}

/* The `dlq` command's handle: one connection, no spool threads, and only
 * inspection and dead letters. */
START_TEST(admin_handle_has_no_threads) {
    amp_queue *s = open_spool(3600);
    add_dead_letter(s, "dead");
    amp_queue_close(s);

    int before = thread_count();
    char err[256] = "";
    amp_queue *a = amp_spool_open_admin(&(amp_spool_opts){.path = path}, err, sizeof err);
    ck_assert_msg(a != NULL, "admin open: %s", err);
    ck_assert_int_eq(thread_count(), before);

    amp_queue_dlq_filter all = {0};
    json_t *rows = amp_queue_dlq_list(a, &all, 10);
    ck_assert_int_eq(json_array_size(rows), 1);
    json_decref(rows);
    amp_queue_stats st;
    ck_assert_int_eq(amp_queue_stats_get(a, &st), 0);
    ck_assert_int_eq(st.dead, 1);
    /* It takes no events, claims nothing and says so. */
    done_box box = {0};
    amp_queue_batch *b = amp_queue_batch_create();
    add(b, "new", "u", false, "{}");
    amp_queue_submit(a, b, on_done, &box);
    ck_assert_int_eq(box.calls, 1);
    ck_assert_int_eq(box.res.status, -1);
    ck_assert_ptr_nonnull(amp_queue_full(a));
    amp_queue_job *jobs[2];
    int64_t next;
    ck_assert_int_eq(amp_queue_claim(a, amp_now_ms(), jobs, 2, &next), -1);
    ck_assert_int_eq(amp_queue_dlq_purge(a, &all), 1);
    amp_queue_close(a);
}
END_TEST

/* Sets the spool's user_version, as another amp2dify would have left it. */
static void set_user_version(int v) {
    char sql[64];
    snprintf(sql, sizeof sql, "PRAGMA user_version = %d", v);
    spool_sql(sql);
}

START_TEST(admin_open_refuses_other_schema_version) {
    amp_queue_close(open_spool(3600));
    const struct {
        int version;
        const char *found;
    } cases[] = {{7, "schema version 7,"}, {9, "schema version 9,"}, {0, "schema version 0,"}};
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        set_user_version(cases[i].version);
        char err[256] = "";
        ck_assert_ptr_null(amp_spool_open_admin(&(amp_spool_opts){.path = path}, err, sizeof err));
        ck_assert_msg(strstr(err, cases[i].found) && strstr(err, "expects version 8") &&
                          strstr(err, path),
                      "err: %s", err);
        /* Refused before anything was written: the version is as found. */
        sqlite3 *db;
        ck_assert_int_eq(sqlite3_open(path, &db), SQLITE_OK);
        ck_assert_int_eq(user_version(db), cases[i].version);
        sqlite3_close(db);
    }
    set_user_version(8);
    char err[256] = "";
    amp_queue *a = amp_spool_open_admin(&(amp_spool_opts){.path = path}, err, sizeof err);
    ck_assert_msg(a != NULL, "admin open: %s", err);
    amp_queue_close(a);
}
END_TEST

START_TEST(admin_open_refuses_missing_spool) {
    char err[256] = "";
    ck_assert_ptr_null(amp_spool_open_admin(&(amp_spool_opts){.path = path}, err, sizeof err));
    ck_assert_msg(strstr(err, path) != NULL, "err: %s", err);
    struct stat st;
    ck_assert_int_ne(stat(path, &st), 0); /* not created */
}
END_TEST

START_TEST(unwritable_path_fails_to_open) {
    char err[256] = "";
    amp_spool_opts o = {.path = "/nonexistent-dir/x/spool.db", .dedupe_window_s = 0};
    ck_assert_ptr_null(amp_spool_open(&o, err, sizeof err));
    ck_assert_msg(strstr(err, "/nonexistent-dir/x/spool.db") != NULL, "err: %s", err);
}
END_TEST

/* ---- the spool's VFS (walbuf.c) ---------------------------------------
 * SQLite directly on the test's file, with the spool's log settings (WAL,
 * synchronous NORMAL) and no automatic checkpoint, so every frame stays in
 * the log.
 *   a_transaction_is_few_writes     200 KiB of rows: at most 3 write calls
 *                                   (one per 124 KiB and the commit frame's
 *                                   page), against two per page through
 *                                   SQLite's own VFS
 *   commits_are_in_the_file         a second connection sees each commit at
 *                                   once; a process that ends without closing
 *                                   anything (as kill -9 would) leaves every
 *                                   commit in the log, read back whole
 *   spilled_transaction_survives    a transaction larger than the page cache
 *                                   rewrites frames it spilled, and SQLite then
 *                                   rewrites their headers, the commit frame's
 *                                   last: still recovered whole after the end
 */
#define ROW_BYTES 1000

/* A connection as the spool opens one: vfs NULL is SQLite's default. */
static sqlite3 *open_db(const char *vfs) {
    sqlite3 *db = NULL;
    ck_assert_int_eq(sqlite3_open_v2(path, &db, SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE, vfs),
                     SQLITE_OK);
    exec_ok(db, "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; "
                "PRAGMA wal_autocheckpoint = 0;");
    return db;
}

/* Rows [from, to) of t, each ROW_BYTES of the byte id + add, inserted or
 * replaced, in the transaction under way. No Check assertion inside the
 * loop: each one writes to Check's pipe, and a_transaction_is_few_writes
 * counts write calls. */
static void put_rows(sqlite3 *db, int from, int to, int add) {
    sqlite3_stmt *st;
    ck_assert_int_eq(
        sqlite3_prepare_v2(db, "INSERT OR REPLACE INTO t (id, v) VALUES (?, ?)", -1, &st, NULL),
        SQLITE_OK);
    static unsigned char v[ROW_BYTES];
    int rc = SQLITE_DONE;
    for (int i = from; i < to && rc == SQLITE_DONE; i++) {
        memset(v, (i + add) & 0xff, sizeof v);
        sqlite3_bind_int(st, 1, i);
        sqlite3_bind_blob(st, 2, v, sizeof v, SQLITE_STATIC);
        rc = sqlite3_step(st);
        sqlite3_reset(st);
    }
    sqlite3_finalize(st);
    ck_assert_int_eq(rc, SQLITE_DONE);
}

static void insert_rows(sqlite3 *db, int from, int to) {
    exec_ok(db, "BEGIN");
    put_rows(db, from, to, 0);
    exec_ok(db, "COMMIT");
}

/* Rows of t that are not ROW_BYTES of the byte id + add. */
static int bad_rows(sqlite3 *db, int add) {
    sqlite3_stmt *st;
    ck_assert_int_eq(sqlite3_prepare_v2(db, "SELECT id, v FROM t", -1, &st, NULL), SQLITE_OK);
    int bad = 0;
    while (sqlite3_step(st) == SQLITE_ROW) {
        int id = sqlite3_column_int(st, 0);
        const unsigned char *v = sqlite3_column_blob(st, 1);
        int n = sqlite3_column_bytes(st, 1);
        bool ok = n == ROW_BYTES;
        for (int i = 0; ok && i < n; i++)
            ok = v[i] == ((id + add) & 0xff);
        bad += !ok;
    }
    sqlite3_finalize(st);
    return bad;
}

static void integrity_ok(sqlite3 *db) {
    sqlite3_stmt *st;
    ck_assert_int_eq(sqlite3_prepare_v2(db, "PRAGMA integrity_check", -1, &st, NULL), SQLITE_OK);
    ck_assert_int_eq(sqlite3_step(st), SQLITE_ROW);
    ck_assert_str_eq((const char *)sqlite3_column_text(st, 0), "ok");
    sqlite3_finalize(st);
}

/* This process's write calls so far (write, pwrite, writev...); -1 when
 * unknown. Asserts nothing itself: see put_rows. */
static long write_calls(void) {
    FILE *f = fopen("/proc/self/io", "r");
    if (!f)
        return -1;
    char line[128];
    long n = -1;
    while (fgets(line, sizeof line, f))
        if (sscanf(line, "syscw: %ld", &n) == 1)
            break;
    fclose(f);
    return n;
}

static int frames_in_log;
static int count_frames(void *ctx, sqlite3 *db, const char *name, int frames) {
    (void)ctx, (void)db, (void)name;
    frames_in_log = frames;
    return SQLITE_OK;
}

/* Write calls and log frames of the commit of 200 new rows through vfs
 * (the page cache holds them all until then). */
static void one_transaction(const char *vfs, long *writes, int *frames) {
    sqlite3 *db = open_db(vfs);
    sqlite3_wal_hook(db, count_frames, NULL);
    exec_ok(db, "CREATE TABLE t (id INTEGER PRIMARY KEY, v BLOB)");
    int frames_before = frames_in_log; /* the table's */
    exec_ok(db, "BEGIN");
    put_rows(db, 0, 200, 0);
    long w0 = write_calls();
    exec_ok(db, "COMMIT");
    long w1 = write_calls();
    ck_assert_msg(w0 >= 0 && w1 >= 0, "cannot read /proc/self/io");
    *writes = w1 - w0;
    *frames = frames_in_log - frames_before;
    sqlite3_close(db);
}

START_TEST(a_transaction_is_few_writes) {
    ck_assert_ptr_nonnull(amp_spool_vfs());
    long ours, theirs;
    int frames_ours, frames_theirs;
    one_transaction(amp_spool_vfs(), &ours, &frames_ours);
    unlink(path);
    char wal[sizeof path + 8];
    snprintf(wal, sizeof wal, "%s-wal", path);
    unlink(wal);
    one_transaction(NULL, &theirs, &frames_theirs);
    fprintf(stderr, "walbuf: 200 rows, %d frames: %ld write calls, %ld through SQLite's VFS\n",
            frames_ours, ours, theirs);
    ck_assert_int_ge(frames_ours, 50);
    ck_assert_int_ge(theirs, 2L * frames_theirs);
    /* ~54 frames of 4,120 bytes: two buffers of at most 124 KiB and the
     * commit frame's page. */
    ck_assert_msg(ours <= 3, "%ld write calls for %d frames", ours, frames_ours);
}
END_TEST

/* In a child process: the transactions, then the end without closing
 * anything. Exits 1 when a second connection did not see a commit. */
static void child_commits_then_dies(void (*transactions)(sqlite3 *db)) {
    pid_t pid = fork();
    ck_assert_int_ge(pid, 0);
    if (pid == 0) {
        sqlite3 *db = open_db(amp_spool_vfs());
        exec_ok(db, "CREATE TABLE t (id INTEGER PRIMARY KEY, v BLOB)");
        transactions(db);
        _exit(0); /* nothing closed, nothing checkpointed */
    }
    int st;
    ck_assert_int_eq(waitpid(pid, &st, 0), pid);
    ck_assert_msg(WIFEXITED(st) && WEXITSTATUS(st) == 0, "the writing process failed: %d", st);
}

static void three_commits(sqlite3 *db) {
    sqlite3 *reader = open_db(amp_spool_vfs());
    for (int k = 0; k < 3; k++) {
        insert_rows(db, k * 300, (k + 1) * 300); /* ~300 KiB: several buffers */
        if (query_int(reader, "SELECT count(*) FROM t") != (k + 1) * 300 || bad_rows(reader, 0))
            _exit(1);
    }
}

START_TEST(commits_are_in_the_file) {
    child_commits_then_dies(three_commits);
    sqlite3 *db = open_db(NULL); /* recovers the log */
    ck_assert_int_eq(query_int(db, "SELECT count(*) FROM t"), 900);
    ck_assert_int_eq(bad_rows(db, 0), 0);
    integrity_ok(db);
    sqlite3_close(db);
}
END_TEST

/* One transaction bigger than the page cache: its new rows spill to the
 * log, then every row is replaced, so spilled pages are written again. */
static void spill_and_rewrite(sqlite3 *db) {
    exec_ok(db, "PRAGMA cache_size = 10"); /* pages */
    insert_rows(db, 0, 100);
    exec_ok(db, "BEGIN");
    put_rows(db, 100, 700, 0);
    put_rows(db, 0, 700, 1);
    exec_ok(db, "COMMIT");
}

START_TEST(spilled_transaction_survives) {
    child_commits_then_dies(spill_and_rewrite);
    sqlite3 *db = open_db(NULL);
    ck_assert_int_eq(query_int(db, "SELECT count(*) FROM t"), 700);
    ck_assert_int_eq(bad_rows(db, 1), 0);
    integrity_ok(db);
    sqlite3_close(db);
}
END_TEST

int main(void) {
    Suite *su = suite_create("spool");
    TCase *tc = tcase_create("spool");
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_set_timeout(tc, 30);
    tcase_add_test(tc, batch_keeps_copies_of_what_was_added);
    tcase_add_test(tc, batch_stored_and_claimed);
    tcase_add_test(tc, waiting_rows_and_retry_run_ids);
    tcase_add_test(tc, dedupe_within_and_across_requests);
    tcase_add_test(tc, dedupe_disabled_with_zero_window);
    tcase_add_test(tc, acks_delivered_retry_dead);
    tcase_add_test(tc, per_user_rows_go_in_order);
    tcase_add_test(tc, per_user_order_is_per_conversation);
    tcase_add_test(tc, failing_request_is_refused_alone);
    tcase_add_test(tc, locked_beyond_deadline_then_recovers);
    tcase_add_test(tc, answered_rows_visible_to_other_connections);
    tcase_add_test(tc, version_1_spool_is_migrated);
    tcase_add_test(tc, recent_keys_come_back_from_rows_after_a_crash);
    tcase_add_test(tc, unmerged_delivered_rows_wait_for_their_merge);
    tcase_add_test(tc, keys_survive_purges_and_reused_ids);
    tcase_add_test(tc, version_4_spool_is_migrated);
    tcase_add_test(tc, dedupe_keys_survive_merges);
    tcase_add_test(tc, expired_dedupe_keys_are_swept);
    tcase_add_test(tc, delivered_rows_pruned_after_retention);
    tcase_add_test(tc, colliding_keys_are_both_delivered);
    tcase_add_test(tc, new_keys_skip_the_dedupe_table);
    tcase_add_test(tc, log_is_checkpointed_and_bounded);
    tcase_add_test(tc, pending_rows_survive_reopen);
    tcase_add_test(tc, claim_limit_and_next_due);
    tcase_add_test(tc, dead_letters_list_replay_purge);
    tcase_add_test(tc, event_lookup_and_app_depths);
    tcase_add_test(tc, dlq_filters_by_name);
    tcase_add_test(tc, engine_may_leave_operator_ops_out);
    tcase_add_test(tc, depth_tracks_pending_and_limit);
    tcase_add_test(tc, limit_holds_until_a_tenth_is_free);
    tcase_add_test(tc, size_limit_prunes_delivered_rows_then_recovers);
    tcase_add_test(tc, depth_follows_replay_from_another_process);
    tcase_add_test(tc, one_shard_and_acks_taken);
    tcase_add_test(tc, admin_handle_has_no_threads);
    tcase_add_test(tc, first_filter_is_sized_for_the_table);
    tcase_add_test(tc, runs_are_compacted_into_the_table);
    tcase_add_test(tc, a_compaction_cut_short_loses_no_key);
    tcase_add_test(tc, admin_open_refuses_other_schema_version);
    tcase_add_test(tc, admin_open_refuses_missing_spool);
    tcase_add_test(tc, unwritable_path_fails_to_open);
    tcase_add_test(tc, a_transaction_is_few_writes);
    tcase_add_test(tc, commits_are_in_the_file);
    tcase_add_test(tc, spilled_transaction_survives);
    suite_add_tcase(su, tc);
    return amp_check_run(su);
}
