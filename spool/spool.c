#include "spool.h"

#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <libgen.h>
#include <pthread.h>
#include <sqlite3.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "../base/log.h"
#include "../base/util.h"

#define SCHEMA_VERSION 2
#define AMP_STR_(x) #x
#define AMP_STR(x) AMP_STR_(x)
/* Background upkeep: expired dedupe keys, old delivered rows, the depth. */
#define MAINTENANCE_INTERVAL_MS 60000
/* After a failed commit: how often the committer retries the held
 * acknowledgements or probes with a one-page write, so readiness comes back
 * by itself once the cause (a full disk, say) is gone, even without traffic. */
#define PROBE_INTERVAL_MS 1000
#define PRUNE_BATCH 10000
/* Acknowledgements wait up to this long for company before a commit, unless
 * ACK_GROUP_MAX of them are queued or a request arrives. */
#define ACK_GATHER_MS 2
#define ACK_GROUP_MAX 256
/* WAL frames after which the checkpointer copies the log back into the
 * database. SQLite's own automatic checkpoint uses 1000; every commit
 * rewrites the last page of the table and of each index into the log, and
 * a checkpoint copies each page once however often it was rewritten, so a
 * longer log writes less: measured with the ingest benchmark, 4000 frames
 * wrote 7.7 KB per event instead of 9.8 KB and took ~12% more requests/s.
 * Under a steady stream of commits the checkpointer may never catch up with
 * the log's end, and only a checkpoint that does lets the next commit
 * restart the log from its start; past CHECKPOINT_FRAMES_MAX the committer
 * checkpoints itself, which bounds the log (~64 MiB of 4 KiB pages). */
#define CHECKPOINT_FRAMES 4000
#define CHECKPOINT_FRAMES_MAX 16000

enum { STATE_PENDING = 0, STATE_DELIVERED = 1, STATE_DEAD = 2 };

/* ---- claimed-id set ------------------------------------------------------
 * Open addressing with linear probing and backward-shift deletion; ids are
 * positive, 0 marks an empty slot. Only touched under claim_mu. */

typedef struct idset {
    int64_t *slots;
    size_t cap; /* power of two */
    size_t n;
} idset;

static size_t idset_hash(int64_t id, size_t cap) {
    uint64_t x = (uint64_t)id * 0x9E3779B97F4A7C15ull;
    return (size_t)(x >> 17) & (cap - 1);
}

static void idset_add(idset *s, int64_t id);

static void idset_grow(idset *s) {
    idset old = *s;
    s->cap = old.cap ? old.cap * 2 : 256;
    s->slots = amp_xcalloc(s->cap, sizeof(int64_t));
    s->n = 0;
    for (size_t i = 0; i < old.cap; i++)
        if (old.slots[i])
            idset_add(s, old.slots[i]);
    free(old.slots);
}

static void idset_add(idset *s, int64_t id) {
    if ((s->n + 1) * 2 > s->cap)
        idset_grow(s);
    size_t i = idset_hash(id, s->cap);
    while (s->slots[i] && s->slots[i] != id)
        i = (i + 1) & (s->cap - 1);
    if (!s->slots[i]) {
        s->slots[i] = id;
        s->n++;
    }
}

static int idset_has(const idset *s, int64_t id) {
    if (!s->cap)
        return 0;
    size_t i = idset_hash(id, s->cap);
    while (s->slots[i]) {
        if (s->slots[i] == id)
            return 1;
        i = (i + 1) & (s->cap - 1);
    }
    return 0;
}

static void idset_del(idset *s, int64_t id) {
    if (!s->cap)
        return;
    size_t mask = s->cap - 1, i = idset_hash(id, s->cap);
    while (s->slots[i] && s->slots[i] != id)
        i = (i + 1) & mask;
    if (!s->slots[i])
        return;
    s->slots[i] = 0;
    s->n--;
    /* Shift back the entries of the same probe run so lookups stay correct. */
    for (size_t j = (i + 1) & mask; s->slots[j]; j = (j + 1) & mask) {
        size_t h = idset_hash(s->slots[j], s->cap);
        if (((j - h) & mask) >= ((j - i) & mask)) {
            s->slots[i] = s->slots[j];
            s->slots[j] = 0;
            i = j;
        }
    }
}

/* ---- batches and the committer queue ---------------------------------- */

typedef struct req_item {
    char *route, *app, *user, *body;
    bool per_user;
} req_item;

typedef struct event_item {
    char *dedupe_key;
    size_t first_req, nreq;
} event_item;

struct amp_spool_batch {
    event_item *events;
    size_t nevents, cap_events;
    req_item *reqs;
    size_t nreqs, cap_reqs;
};

typedef enum { WORK_BATCH, WORK_ACK, WORK_FLUSH } work_kind;

typedef struct work {
    struct work *next;
    work_kind kind;
    /* WORK_BATCH */
    amp_spool_batch *batch;
    amp_spool_done_fn done;
    void *ctx;
    amp_spool_result result;
    int64_t rows;    /* deliveries inserted */
    int64_t last_id; /* the highest of their ids; 0: none */
    int64_t epoch;   /* s->epoch when committed (see recover()) */
    /* WORK_ACK: owned copies */
    amp_ack ack;
    /* WORK_FLUSH: both under q_mu */
    bool flushed;
    bool abandoned; /* its flusher gave up waiting: whoever answers frees it */
} work;

struct amp_spool {
    sqlite3 *wdb; /* committer thread only */
    sqlite3 *rdb; /* under claim_mu */
    int64_t dedupe_window_ms;
    int64_t retention_ms;
    int64_t max_pending, max_bytes;
    atomic_llong depth;
    atomic_llong bytes;          /* pages in use, measured by check_limits() */
    _Atomic(const char *) full;  /* amp_spool_full(); set by check_limits() */
    int64_t next_maintenance_ms; /* committer only */
    /* Committer only: acknowledgements whose commit failed. Their rows stay
     * claimed (a worker must not deliver them again) until a later commit
     * stores them; retried with the next group or every PROBE_INTERVAL_MS. */
    work *held, *held_tail; /* in the order they were queued */
    int64_t next_probe_ms;
    bool closing; /* the last group: nothing is held any more */

    pthread_mutex_t q_mu;
    pthread_cond_t q_cond;    /* work queued or stop */
    pthread_cond_t q_flushed; /* a flush marker was processed */
    work *q_head, *q_tail;
    size_t q_len;    /* items queued */
    size_t q_urgent; /* of those, requests and flushes (never kept waiting) */
    int stop;
    pthread_t committer;

    /* With spool.sync "full" the committer does not wait for the disk: it
     * commits with synchronous=NORMAL (the log is written, not yet synced)
     * and hands the group's requests to the syncer, which fdatasyncs the
     * log and only then answers them; meanwhile the committer writes the
     * next group. A sync covers every group committed before it started. */
    int wal_fd; /* the log, opened by us; -1 when nothing is synced here */
    pthread_t syncer;
    bool syncer_running;
    pthread_mutex_t sync_mu;
    pthread_cond_t sync_cond; /* work to sync, or stop */
    work *sync_head, *sync_tail;
    bool sync_stop;

    /* Checkpoints run on their own thread and connection, so the committer
     * never copies the log into the database between two groups. */
    sqlite3 *cdb; /* checkpointer thread only */
    pthread_t checkpointer;
    bool checkpointer_running;
    pthread_mutex_t ck_mu;
    pthread_cond_t ck_cond;    /* a checkpoint is due, or stop */
    pthread_mutex_t ck_run_mu; /* held while either thread checkpoints */
    bool ck_due, ck_stop;

    pthread_mutex_t claim_mu;
    idset claimed;

    void (*notify)(void *);
    void *notify_ctx;
    atomic_bool writable;

    /* A row is claimed only once it is on disk: synced_max is the highest
     * row id known to be synced, committed_max the highest committed. After
     * a failed sync the rows above synced_max are not trusted (their senders
     * got 503, and the kernel may have dropped the pages it could not
     * write): `failed` makes the committer delete them (recover()) before it
     * stores anything else, and `epoch`, which recover() advances, tells the
     * syncer which of the groups it still holds were undone. */
    atomic_llong synced_max, committed_max, epoch;
    atomic_bool failed;
    bool refusing;        /* committer only: failed, and recover() did not work */
    int64_t rows_dropped; /* committer only: by recover() attempts since the failure */

    /* committer statements */
    sqlite3_stmt *st_begin, *st_commit, *st_rollback;
    sqlite3_stmt *st_savepoint, *st_release, *st_rollback_to;
    sqlite3_stmt *st_dedupe, *st_insert;
    sqlite3_stmt *st_delivered, *st_retry, *st_dead, *st_release_row;
    sqlite3_stmt *st_conv_set, *st_conv_clear;
    sqlite3_stmt *st_prune_dedupe, *st_prune_delivered, *st_count_pending, *st_probe;
    sqlite3_stmt *st_drop_keys, *st_drop_rows, *st_max_id, *st_bytes;
    sqlite3_stmt *st_data_version;
    int64_t data_version; /* committer only; see external_write() */
    /* reader statements */
    sqlite3_stmt *st_claim, *st_next_due;
};

static const char schema_v1[] =
    "CREATE TABLE deliveries ("
    "  id INTEGER PRIMARY KEY,"
    "  created_ms INTEGER NOT NULL,"
    "  schedule_ms INTEGER NOT NULL," /* start of the current schedule (max age) */
    "  dedupe_key TEXT,"
    "  route TEXT NOT NULL,"
    "  app TEXT NOT NULL,"
    "  user TEXT NOT NULL,"
    "  per_user INTEGER NOT NULL DEFAULT 0,"
    "  body TEXT NOT NULL,"
    "  state INTEGER NOT NULL DEFAULT 0," /* 0 pending, 1 delivered, 2 dead */
    "  attempts INTEGER NOT NULL DEFAULT 0,"
    "  due_ms INTEGER NOT NULL,"
    "  last_status INTEGER,"
    "  last_code TEXT,"
    "  last_message TEXT,"
    "  result TEXT,"
    "  finished_ms INTEGER);"
    /* next due event */
    "CREATE INDEX deliveries_due ON deliveries(due_ms, id) WHERE state = 0;"
    /* next event of this (app, user) */
    "CREATE INDEX deliveries_user ON deliveries(app, user, id) WHERE state = 0;"
    /* oldest pending row (ids grow with time) */
    "CREATE INDEX deliveries_pending ON deliveries(id) WHERE state = 0;"
    /* dead letters and retention, by time */
    "CREATE INDEX deliveries_finished ON deliveries(state, finished_ms) WHERE state <> 0;"
    "CREATE TABLE dedupe (key TEXT PRIMARY KEY, seen_ms INTEGER NOT NULL) WITHOUT ROWID;"
    "CREATE INDEX dedupe_seen ON dedupe(seen_ms);"
    "CREATE TABLE conversations ("
    "  app TEXT NOT NULL, user TEXT NOT NULL, conversation_id TEXT NOT NULL,"
    "  updated_ms INTEGER NOT NULL, PRIMARY KEY (app, user)) WITHOUT ROWID;";

/* v2: only conversation rows are ordered per user, so only they need the
 * (app, user) index; every other row skipped a random-page write for it. */
static const char schema_v2[] =
    "DROP INDEX deliveries_user;"
    "CREATE INDEX deliveries_user ON deliveries(app, user, id) WHERE state = 0 AND per_user = 1;";

/* Migrations, in order: migrations[v] brings a database from version v to v+1. */
static const char *const migrations[] = {schema_v1, schema_v2};

static int exec(sqlite3 *db, const char *sql, char *err, size_t errlen) {
    char *msg = NULL;
    if (sqlite3_exec(db, sql, NULL, NULL, &msg) != SQLITE_OK) {
        snprintf(err, errlen, "%s", msg ? msg : sqlite3_errmsg(db));
        sqlite3_free(msg);
        return -1;
    }
    return 0;
}

static int migrate(sqlite3 *db, char *err, size_t errlen) {
    sqlite3_stmt *st;
    if (sqlite3_prepare_v2(db, "PRAGMA user_version", -1, &st, NULL) != SQLITE_OK)
        goto fail;
    int version = sqlite3_step(st) == SQLITE_ROW ? sqlite3_column_int(st, 0) : -1;
    sqlite3_finalize(st);
    if (version < 0)
        goto fail;
    if (version > SCHEMA_VERSION) {
        snprintf(err, errlen, "spool schema version %d is newer than this amp2dify (%d)", version,
                 SCHEMA_VERSION);
        return -1;
    }
    for (int v = version; v < SCHEMA_VERSION; v++) {
        char sql[64];
        snprintf(sql, sizeof sql, "PRAGMA user_version = %d", v + 1);
        if (exec(db, "BEGIN IMMEDIATE", err, errlen) || exec(db, migrations[v], err, errlen) ||
            exec(db, sql, err, errlen) || exec(db, "COMMIT", err, errlen)) {
            sqlite3_exec(db, "ROLLBACK", NULL, NULL, NULL);
            return -1;
        }
    }
    return 0;
fail:
    snprintf(err, errlen, "%s", sqlite3_errmsg(db));
    return -1;
}

/* synchronous=NORMAL on every connection: SQLite syncs the log only when it
 * checkpoints, and the database file after each checkpoint. Commits are
 * made durable by the syncer (spool.sync "full", the default), or not at
 * all (spool.sync "normal": a crash of the process loses nothing, a power
 * cut may lose the last commits). */
static int open_db(const amp_spool_opts *opts, sqlite3 **db, char *err, size_t errlen) {
    int flags = SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_NOMUTEX;
    if (sqlite3_open_v2(opts->path, db, flags, NULL) != SQLITE_OK) {
        snprintf(err, errlen, "cannot open spool '%s': %s", opts->path,
                 *db ? sqlite3_errmsg(*db) : "out of memory");
        return -1;
    }
    int64_t lock_ms = opts->lock_timeout_ms > 0 ? opts->lock_timeout_ms : AMP_SPOOL_LOCK_TIMEOUT_MS;
    sqlite3_busy_timeout(*db, lock_ms > INT32_MAX ? INT32_MAX : (int)lock_ms);
    return exec(*db,
                "PRAGMA journal_mode = WAL; PRAGMA foreign_keys = OFF; "
                "PRAGMA synchronous = NORMAL;",
                err, errlen);
}

static int prepare(sqlite3 *db, sqlite3_stmt **st, const char *sql, char *err, size_t errlen) {
    if (sqlite3_prepare_v3(db, sql, -1, SQLITE_PREPARE_PERSISTENT, st, NULL) != SQLITE_OK) {
        snprintf(err, errlen, "spool: %s", sqlite3_errmsg(db));
        return -1;
    }
    return 0;
}

static int prepare_all(amp_spool *s, char *err, size_t errlen) {
    struct {
        sqlite3 *db;
        sqlite3_stmt **st;
        const char *sql;
    } const stmts[] = {
        {s->wdb, &s->st_begin, "BEGIN IMMEDIATE"},
        {s->wdb, &s->st_commit, "COMMIT"},
        {s->wdb, &s->st_rollback, "ROLLBACK"},
        {s->wdb, &s->st_savepoint, "SAVEPOINT batch"},
        {s->wdb, &s->st_release, "RELEASE batch"},
        {s->wdb, &s->st_rollback_to, "ROLLBACK TO batch"},
        /* Insert the key, or refresh it when its previous sighting left the
         * window; no change means a duplicate. */
        {s->wdb, &s->st_dedupe,
         "INSERT INTO dedupe(key, seen_ms) VALUES (?1, ?2) ON CONFLICT(key) DO UPDATE SET "
         "seen_ms = excluded.seen_ms WHERE dedupe.seen_ms < ?3"},
        {s->wdb, &s->st_insert,
         "INSERT INTO deliveries(created_ms, schedule_ms, dedupe_key, route, app, user, per_user, "
         "body, due_ms) VALUES (?1, ?1, ?2, ?3, ?4, ?5, ?6, ?7, ?1)"},
        {s->wdb, &s->st_delivered,
         "UPDATE deliveries SET state = 1, attempts = attempts + 1, last_status = ?2, "
         "last_code = NULL, last_message = NULL, result = ?3, finished_ms = ?4 WHERE id = ?1"},
        {s->wdb, &s->st_retry,
         "UPDATE deliveries SET attempts = attempts + 1, due_ms = ?2, last_status = ?3, "
         "last_code = ?4, last_message = ?5 WHERE id = ?1"},
        {s->wdb, &s->st_dead,
         "UPDATE deliveries SET state = 2, attempts = attempts + 1, last_status = ?2, "
         "last_code = ?3, last_message = ?4, finished_ms = ?5 WHERE id = ?1"},
        {s->wdb, &s->st_release_row, "UPDATE deliveries SET due_ms = ?2 WHERE id = ?1"},
        {s->wdb, &s->st_conv_set,
         "INSERT INTO conversations(app, user, conversation_id, updated_ms) "
         "SELECT app, user, ?2, ?3 FROM deliveries WHERE id = ?1 "
         "ON CONFLICT(app, user) DO UPDATE SET conversation_id = excluded.conversation_id, "
         "updated_ms = excluded.updated_ms"},
        {s->wdb, &s->st_conv_clear,
         "DELETE FROM conversations WHERE (app, user) IN "
         "(SELECT app, user FROM deliveries WHERE id = ?1)"},
        /* Oldest due first; a per_user row only when it is the oldest pending
         * conversation row of its (app, user), so one user's conversation
         * goes out in order. The subquery repeats deliveries_user's
         * condition so that it can use the index. */
        {s->rdb, &s->st_claim,
         "SELECT d.id, d.route, d.app, d.user, d.body, d.dedupe_key, c.conversation_id, "
         "d.per_user, d.attempts, d.schedule_ms FROM deliveries d "
         "LEFT JOIN conversations c ON c.app = d.app AND c.user = d.user AND d.per_user "
         "WHERE d.state = 0 AND d.due_ms <= ?1 AND (d.per_user = 0 OR NOT EXISTS ("
         "  SELECT 1 FROM deliveries e WHERE e.state = 0 AND e.per_user = 1 AND e.app = d.app "
         "  AND e.user = d.user "
         "  AND e.id < d.id)) AND d.id <= ?3 "
         "ORDER BY d.due_ms, d.id LIMIT ?2"},
        {s->wdb, &s->st_prune_dedupe,
         "DELETE FROM dedupe WHERE key IN (SELECT key FROM dedupe WHERE seen_ms < ?1 LIMIT ?2)"},
        /* "state <> 0" repeats the partial index's condition, which SQLite
         * does not infer from "state = 1": without it, every query on
         * delivered or dead rows scans the whole table, pending rows too. */
        {s->wdb, &s->st_prune_delivered,
         "DELETE FROM deliveries WHERE id IN (SELECT id FROM deliveries WHERE state = 1 AND "
         "state <> 0 AND finished_ms < ?1 LIMIT ?2)"},
        {s->wdb, &s->st_count_pending, "SELECT count(*) FROM deliveries WHERE state = 0"},
        /* recover(): what was committed after the last good sync. */
        {s->wdb, &s->st_drop_keys,
         "DELETE FROM dedupe WHERE key IN (SELECT dedupe_key FROM deliveries WHERE id > ?1 AND "
         "dedupe_key IS NOT NULL)"},
        {s->wdb, &s->st_drop_rows, "DELETE FROM deliveries WHERE id > ?1"},
        {s->wdb, &s->st_max_id, "SELECT coalesce(max(id), 0) FROM deliveries"},
        {s->wdb, &s->st_bytes,
         "SELECT (p.page_count - f.freelist_count) * z.page_size "
         "FROM pragma_page_count() p, pragma_freelist_count() f, pragma_page_size() z"},
        {s->wdb, &s->st_data_version, "PRAGMA data_version"},
        /* Rewrites page 1: the smallest real write, to probe writability. */
        {s->wdb, &s->st_probe, "PRAGMA user_version = " AMP_STR(SCHEMA_VERSION)},
        {s->rdb, &s->st_next_due,
         "SELECT min(due_ms) FROM deliveries WHERE state = 0 AND due_ms > ?1"},
    };
    for (size_t i = 0; i < sizeof stmts / sizeof stmts[0]; i++)
        if (prepare(stmts[i].db, stmts[i].st, stmts[i].sql, err, errlen))
            return -1;
    return 0;
}

static void *committer_main(void *arg);
static int step_done(sqlite3_stmt *st);
static int start_syncer(amp_spool *s, char *err, size_t errlen);
static void stop_syncer(amp_spool *s);

/* True when another connection (another process: the daemon's own reader
 * only reads) committed since the last call. Costs one pragma. */
static bool external_write(amp_spool *s) {
    bool changed = false;
    if (sqlite3_step(s->st_data_version) == SQLITE_ROW) {
        int64_t v = sqlite3_column_int64(s->st_data_version, 0);
        changed = s->data_version != 0 && v != s->data_version;
        s->data_version = v;
    }
    sqlite3_reset(s->st_data_version);
    return changed;
}

/* ---- checkpoints --------------------------------------------------------- */

/* After each commit of the committer's connection: frames is the size of the
 * log. Asks the checkpointer, unless the log outgrew the bound. */
static int wal_hook(void *ctx, sqlite3 *db, const char *name, int frames) {
    amp_spool *s = ctx;
    if (frames >= CHECKPOINT_FRAMES_MAX) {
        /* After the checkpointer's pass, if one is under way (a second
         * checkpoint would only get SQLITE_BUSY); no commit can come in
         * between, so this one reaches the log's end. */
        pthread_mutex_lock(&s->ck_run_mu);
        sqlite3_wal_checkpoint_v2(db, name, SQLITE_CHECKPOINT_PASSIVE, NULL, NULL);
        pthread_mutex_unlock(&s->ck_run_mu);
    } else if (frames >= CHECKPOINT_FRAMES) {
        pthread_mutex_lock(&s->ck_mu);
        if (!s->ck_due) {
            s->ck_due = true;
            pthread_cond_signal(&s->ck_cond);
        }
        pthread_mutex_unlock(&s->ck_mu);
    }
    return SQLITE_OK;
}

/* PASSIVE: copies what no reader still needs without blocking the
 * committer, which restarts the log from its start once all of it is in the
 * database. A failure (the disk is full, say) is retried at the next
 * request; the log only grows meanwhile. */
static void *checkpointer_main(void *arg) {
    amp_spool *s = arg;
    pthread_setname_np(pthread_self(), "amp-checkpoint");
    pthread_mutex_lock(&s->ck_mu);
    for (;;) {
        while (!s->ck_due && !s->ck_stop)
            pthread_cond_wait(&s->ck_cond, &s->ck_mu);
        if (s->ck_stop)
            break;
        s->ck_due = false;
        pthread_mutex_unlock(&s->ck_mu);
        pthread_mutex_lock(&s->ck_run_mu);
        int rc = sqlite3_wal_checkpoint_v2(s->cdb, NULL, SQLITE_CHECKPOINT_PASSIVE, NULL, NULL);
        pthread_mutex_unlock(&s->ck_run_mu);
        if (rc != SQLITE_OK && rc != SQLITE_BUSY)
            amp_log(AMP_LOG_WARN, "spool checkpoint failed", "{s:s}", "error",
                    sqlite3_errmsg(s->cdb));
        pthread_mutex_lock(&s->ck_mu);
    }
    pthread_mutex_unlock(&s->ck_mu);
    return NULL;
}

static int start_checkpointer(amp_spool *s, const amp_spool_opts *opts, char *err, size_t errlen) {
    if (open_db(opts, &s->cdb, err, errlen))
        return -1;
    sqlite3_wal_hook(s->wdb, wal_hook, s); /* replaces the automatic checkpoint */
    if (pthread_create(&s->checkpointer, NULL, checkpointer_main, s) != 0) {
        snprintf(err, errlen, "spool: cannot start the checkpoint thread");
        return -1;
    }
    s->checkpointer_running = true;
    return 0;
}

/* Sets *stop under mu, wakes the thread waiting on cond and joins it;
 * nothing when it never started. */
static void stop_thread(pthread_t t, bool *running, pthread_mutex_t *mu, pthread_cond_t *cond,
                        bool *stop) {
    if (!*running)
        return;
    pthread_mutex_lock(mu);
    *stop = true;
    pthread_cond_signal(cond);
    pthread_mutex_unlock(mu);
    pthread_join(t, NULL);
    *running = false;
}

static void stop_checkpointer(amp_spool *s) {
    stop_thread(s->checkpointer, &s->checkpointer_running, &s->ck_mu, &s->ck_cond, &s->ck_stop);
}

static const char full_pending[] = "the spool holds spool.max_pending events";
static const char full_bytes[] = "the spool reached spool.max_bytes";

/* A limit reached holds until a tenth of it is free again, so that a
 * spool at its limit does not flip (and log) with every delivery. */
static bool over(int64_t value, int64_t limit, bool was_over) {
    return limit > 0 && value >= (was_over ? limit - limit / 10 : limit);
}

/* Back-pressure, measured again after anything that changes the depth or
 * the size: a commit, a recount. Logs each change. While the size limit
 * holds, maintain() runs every PROBE_INTERVAL_MS, as it is what frees room.
 * Committer thread (or amp_spool_open, before it starts). */
static void check_limits(amp_spool *s) {
    if (sqlite3_step(s->st_bytes) == SQLITE_ROW)
        atomic_store(&s->bytes, sqlite3_column_int64(s->st_bytes, 0));
    sqlite3_reset(s->st_bytes);
    int64_t depth = atomic_load(&s->depth), bytes = atomic_load(&s->bytes);
    const char *was = atomic_load(&s->full);
    const char *why = over(depth, s->max_pending, was == full_pending) ? full_pending
                      : over(bytes, s->max_bytes, was == full_bytes)   ? full_bytes
                                                                       : NULL;
    atomic_store(&s->full, why);
    if (why && why != was)
        amp_log(AMP_LOG_WARN, "spool full: new events get 503", "{s:s, s:I, s:I}", "reason", why,
                "pending", (json_int_t)depth, "bytes", (json_int_t)bytes);
    else if (!why && was)
        amp_log(AMP_LOG_INFO, "spool takes new events again", "{s:I, s:I}", "pending",
                (json_int_t)depth, "bytes", (json_int_t)bytes);
    int64_t soon = amp_mono_ms() + PROBE_INTERVAL_MS;
    if (why == full_bytes && s->next_maintenance_ms > soon)
        s->next_maintenance_ms = soon;
}

static void count_pending(amp_spool *s) {
    if (sqlite3_step(s->st_count_pending) == SQLITE_ROW)
        atomic_store(&s->depth, sqlite3_column_int64(s->st_count_pending, 0));
    sqlite3_reset(s->st_count_pending);
    check_limits(s);
}

amp_spool *amp_spool_open(const amp_spool_opts *opts, char *err, size_t errlen) {
    amp_spool *s = amp_xcalloc(1, sizeof *s);
    s->dedupe_window_ms = opts->dedupe_window_s * 1000;
    s->retention_ms = opts->retention_s * 1000;
    s->max_pending = opts->max_pending;
    s->max_bytes = opts->max_bytes;
    atomic_init(&s->depth, 0);
    atomic_init(&s->bytes, 0);
    atomic_init(&s->full, NULL);
    pthread_mutex_init(&s->q_mu, NULL);
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&s->q_cond, &ca);
    pthread_cond_init(&s->q_flushed, &ca); /* both wait with deadline_in() */
    pthread_condattr_destroy(&ca);
    pthread_mutex_init(&s->claim_mu, NULL);
    pthread_mutex_init(&s->ck_mu, NULL);
    pthread_cond_init(&s->ck_cond, NULL);
    pthread_mutex_init(&s->ck_run_mu, NULL);
    pthread_mutex_init(&s->sync_mu, NULL);
    pthread_cond_init(&s->sync_cond, NULL);
    s->wal_fd = -1;
    atomic_init(&s->writable, true);
    atomic_init(&s->synced_max, 0);
    atomic_init(&s->committed_max, 0);
    atomic_init(&s->epoch, 0);
    atomic_init(&s->failed, false);

    if (open_db(opts, &s->wdb, err, errlen) || migrate(s->wdb, err, errlen) ||
        open_db(opts, &s->rdb, err, errlen) || prepare_all(s, err, errlen) ||
        start_checkpointer(s, opts, err, errlen) ||
        (!opts->sync_normal && start_syncer(s, err, errlen)))
        goto fail;
    s->next_maintenance_ms = amp_mono_ms() + MAINTENANCE_INTERVAL_MS;
    count_pending(s);
    /* What a previous run left is on disk as far as anyone can know. */
    if (sqlite3_step(s->st_max_id) == SQLITE_ROW) {
        atomic_store(&s->synced_max, sqlite3_column_int64(s->st_max_id, 0));
        atomic_store(&s->committed_max, atomic_load(&s->synced_max));
    }
    sqlite3_reset(s->st_max_id);
    if (pthread_create(&s->committer, NULL, committer_main, s) != 0) {
        snprintf(err, errlen, "spool: cannot start the committer thread");
        goto fail;
    }
    return s;
fail:
    s->stop = 1;
    amp_spool_close(s);
    return NULL;
}

static void finalize_all(amp_spool *s) {
    sqlite3_stmt **all[] = {
        &s->st_begin,        &s->st_commit,          &s->st_rollback,      &s->st_savepoint,
        &s->st_release,      &s->st_rollback_to,     &s->st_dedupe,        &s->st_insert,
        &s->st_delivered,    &s->st_retry,           &s->st_dead,          &s->st_release_row,
        &s->st_conv_set,     &s->st_conv_clear,      &s->st_claim,         &s->st_next_due,
        &s->st_prune_dedupe, &s->st_prune_delivered, &s->st_count_pending, &s->st_probe,
        &s->st_data_version, &s->st_drop_keys,       &s->st_drop_rows,     &s->st_max_id,
        &s->st_bytes,
    };
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++) {
        sqlite3_finalize(*all[i]);
        *all[i] = NULL;
    }
}

void amp_spool_close(amp_spool *s) {
    if (!s)
        return;
    pthread_mutex_lock(&s->q_mu);
    int running = !s->stop;
    s->stop = 1;
    pthread_cond_broadcast(&s->q_cond);
    pthread_mutex_unlock(&s->q_mu);
    if (running)
        pthread_join(s->committer, NULL);
    stop_syncer(s); /* after the committer: it answers the last groups */
    stop_checkpointer(s);
    finalize_all(s);
    sqlite3_close(s->cdb);
    sqlite3_close(s->rdb);
    sqlite3_close(s->wdb); /* the last one: checkpoints and removes the log */
    free(s->claimed.slots);
    pthread_mutex_destroy(&s->q_mu);
    pthread_cond_destroy(&s->q_cond);
    pthread_cond_destroy(&s->q_flushed);
    pthread_mutex_destroy(&s->claim_mu);
    pthread_mutex_destroy(&s->ck_mu);
    pthread_cond_destroy(&s->ck_cond);
    pthread_mutex_destroy(&s->ck_run_mu);
    pthread_mutex_destroy(&s->sync_mu);
    pthread_cond_destroy(&s->sync_cond);
    if (s->wal_fd >= 0)
        close(s->wal_fd);
    free(s);
}

void amp_spool_set_notify(amp_spool *s, void (*fn)(void *ctx), void *ctx) {
    pthread_mutex_lock(&s->q_mu);
    s->notify = fn;
    s->notify_ctx = ctx;
    pthread_mutex_unlock(&s->q_mu);
}

bool amp_spool_writable(amp_spool *s) {
    return atomic_load(&s->writable);
}

int64_t amp_spool_depth(amp_spool *s) {
    return atomic_load(&s->depth);
}

int64_t amp_spool_bytes(amp_spool *s) {
    return atomic_load(&s->bytes);
}

const char *amp_spool_full(amp_spool *s) {
    return atomic_load(&s->full);
}

/* ---- batch building ------------------------------------------------------ */

amp_spool_batch *amp_spool_batch_create(void) {
    return amp_xcalloc(1, sizeof(amp_spool_batch));
}

void amp_spool_batch_destroy(amp_spool_batch *b) {
    if (!b)
        return;
    for (size_t i = 0; i < b->nevents; i++)
        free(b->events[i].dedupe_key);
    for (size_t i = 0; i < b->nreqs; i++) {
        free(b->reqs[i].route);
        free(b->reqs[i].app);
        free(b->reqs[i].user);
        free(b->reqs[i].body);
    }
    free(b->events);
    free(b->reqs);
    free(b);
}

void amp_spool_batch_event(amp_spool_batch *b, const char *dedupe_key) {
    if (b->nevents == b->cap_events) {
        b->cap_events = b->cap_events ? b->cap_events * 2 : 4;
        b->events = amp_xrealloc(b->events, b->cap_events * sizeof *b->events);
    }
    b->events[b->nevents++] =
        (event_item){.dedupe_key = amp_xstrdup(dedupe_key), .first_req = b->nreqs, .nreq = 0};
}

void amp_spool_batch_request(amp_spool_batch *b, const char *route, const char *app,
                             const char *user, bool per_user, const char *body_json) {
    if (b->nevents == 0)
        amp_spool_batch_event(b, NULL);
    if (b->nreqs == b->cap_reqs) {
        b->cap_reqs = b->cap_reqs ? b->cap_reqs * 2 : 4;
        b->reqs = amp_xrealloc(b->reqs, b->cap_reqs * sizeof *b->reqs);
    }
    b->reqs[b->nreqs++] = (req_item){.route = amp_xstrdup(route),
                                     .app = amp_xstrdup(app),
                                     .user = amp_xstrdup(user),
                                     .body = amp_xstrdup(body_json),
                                     .per_user = per_user};
    b->events[b->nevents - 1].nreq++;
}

/* ---- queue --------------------------------------------------------------- */

static void enqueue(amp_spool *s, work *w) {
    pthread_mutex_lock(&s->q_mu);
    if (s->q_tail)
        s->q_tail->next = w;
    else
        s->q_head = w;
    s->q_tail = w;
    s->q_len++;
    if (w->kind != WORK_ACK)
        s->q_urgent++;
    /* An acknowledgement only wakes the committer to start gathering, or
     * when the group is full; requests and flushes wake it at once. */
    if (w->kind != WORK_ACK || s->q_len == 1 || s->q_len >= ACK_GROUP_MAX)
        pthread_cond_signal(&s->q_cond);
    pthread_mutex_unlock(&s->q_mu);
}

static void deadline_in(struct timespec *ts, int64_t ms) {
    clock_gettime(CLOCK_MONOTONIC, ts);
    ts->tv_sec += ms / 1000;
    ts->tv_nsec += (ms % 1000) * 1000000L;
    if (ts->tv_nsec >= 1000000000L) {
        ts->tv_sec++;
        ts->tv_nsec -= 1000000000L;
    }
}

void amp_spool_submit(amp_spool *s, amp_spool_batch *b, amp_spool_done_fn done, void *ctx) {
    work *w = amp_xcalloc(1, sizeof *w);
    w->kind = WORK_BATCH;
    w->batch = b;
    w->done = done;
    w->ctx = ctx;
    enqueue(s, w);
}

void amp_spool_ack(amp_spool *s, const amp_ack *ack) {
    work *w = amp_xcalloc(1, sizeof *w);
    w->kind = WORK_ACK;
    w->ack = *ack;
    w->ack.code = amp_xstrdup(ack->code);
    w->ack.message = amp_xstrdup(ack->message);
    w->ack.result_json = amp_xstrdup(ack->result_json);
    w->ack.conversation_id = amp_xstrdup(ack->conversation_id);
    enqueue(s, w);
}

void amp_spool_flush(amp_spool *s) {
    amp_spool_flush_until(s, INT64_MAX);
}

bool amp_spool_flush_until(amp_spool *s, int64_t deadline_ms) {
    work *w = amp_xcalloc(1, sizeof *w);
    w->kind = WORK_FLUSH;
    enqueue(s, w);
    pthread_mutex_lock(&s->q_mu);
    while (!w->flushed) {
        if (deadline_ms == INT64_MAX) {
            pthread_cond_wait(&s->q_flushed, &s->q_mu);
            continue;
        }
        int64_t left = deadline_ms - amp_mono_ms();
        if (left <= 0)
            break;
        struct timespec ts;
        deadline_in(&ts, left);
        pthread_cond_timedwait(&s->q_flushed, &s->q_mu, &ts);
    }
    bool flushed = w->flushed;
    w->abandoned = !flushed;
    pthread_mutex_unlock(&s->q_mu);
    if (flushed)
        free(w);
    return flushed;
}

static void free_ack_strings(amp_ack *a) {
    free((char *)a->code);
    free((char *)a->message);
    free((char *)a->result_json);
    free((char *)a->conversation_id);
}

/* The notify callback may be swapped at any time: read it under the lock. */
static void notify_waiter(amp_spool *s) {
    pthread_mutex_lock(&s->q_mu);
    void (*fn)(void *) = s->notify;
    void *ctx = s->notify_ctx;
    pthread_mutex_unlock(&s->q_mu);
    if (fn)
        fn(ctx);
}

/* ---- committer ----------------------------------------------------------- */

static int step_done(sqlite3_stmt *st) {
    int rc = sqlite3_step(st);
    sqlite3_reset(st);
    sqlite3_clear_bindings(st);
    return rc == SQLITE_DONE || rc == SQLITE_ROW ? 0 : -1;
}

static void bind_text(sqlite3_stmt *st, int i, const char *v) {
    if (v)
        sqlite3_bind_text(st, i, v, -1, SQLITE_STATIC);
    else
        sqlite3_bind_null(st, i);
}

/* Store one batch inside the open transaction. Guarded, it runs under a
 * savepoint, so a failing batch is undone alone and the others stay; the
 * savepoint costs a copy of every page the batch touches that the group
 * already changed, so the first try of a group goes without (see
 * write_group). -1 when a statement failed; the batch's counts are then 0. */
static int write_batch(amp_spool *s, work *w, int64_t now, bool guarded) {
    amp_spool_batch *b = w->batch;
    if (guarded && step_done(s->st_savepoint))
        return -1;
    for (size_t e = 0; e < b->nevents; e++) {
        const event_item *ev = &b->events[e];
        if (ev->dedupe_key && s->dedupe_window_ms > 0) {
            sqlite3_bind_text(s->st_dedupe, 1, ev->dedupe_key, -1, SQLITE_STATIC);
            sqlite3_bind_int64(s->st_dedupe, 2, now);
            sqlite3_bind_int64(s->st_dedupe, 3, now - s->dedupe_window_ms);
            if (step_done(s->st_dedupe))
                goto fail;
            if (sqlite3_changes(s->wdb) == 0) {
                w->result.duplicates++;
                continue;
            }
        }
        for (size_t r = ev->first_req; r < ev->first_req + ev->nreq; r++) {
            const req_item *q = &b->reqs[r];
            sqlite3_bind_int64(s->st_insert, 1, now);
            bind_text(s->st_insert, 2, ev->dedupe_key);
            sqlite3_bind_text(s->st_insert, 3, q->route, -1, SQLITE_STATIC);
            sqlite3_bind_text(s->st_insert, 4, q->app, -1, SQLITE_STATIC);
            sqlite3_bind_text(s->st_insert, 5, q->user, -1, SQLITE_STATIC);
            sqlite3_bind_int(s->st_insert, 6, q->per_user);
            sqlite3_bind_text(s->st_insert, 7, q->body, -1, SQLITE_STATIC);
            if (step_done(s->st_insert))
                goto fail;
            w->rows++;
            w->last_id = sqlite3_last_insert_rowid(s->wdb);
        }
        w->result.accepted++;
    }
    if (guarded && step_done(s->st_release))
        goto fail;
    return 0;
fail:
    if (guarded) {
        step_done(s->st_rollback_to);
        step_done(s->st_release);
    }
    w->result.accepted = w->result.duplicates = 0;
    w->rows = w->last_id = 0;
    return -1;
}

static int write_ack(amp_spool *s, const amp_ack *a, int64_t now) {
    sqlite3_stmt *st;
    switch (a->kind) {
    case AMP_ACK_DELIVERED:
        st = s->st_delivered;
        sqlite3_bind_int64(st, 1, a->id);
        sqlite3_bind_int(st, 2, a->http_status);
        bind_text(st, 3, a->result_json);
        sqlite3_bind_int64(st, 4, now);
        break;
    case AMP_ACK_RETRY:
        st = s->st_retry;
        sqlite3_bind_int64(st, 1, a->id);
        sqlite3_bind_int64(st, 2, a->due_ms);
        sqlite3_bind_int(st, 3, a->http_status);
        bind_text(st, 4, a->code);
        bind_text(st, 5, a->message);
        break;
    case AMP_ACK_DEAD:
        st = s->st_dead;
        sqlite3_bind_int64(st, 1, a->id);
        sqlite3_bind_int(st, 2, a->http_status);
        bind_text(st, 3, a->code);
        bind_text(st, 4, a->message);
        sqlite3_bind_int64(st, 5, now);
        break;
    case AMP_ACK_RELEASE:
    default:
        st = s->st_release_row;
        sqlite3_bind_int64(st, 1, a->id);
        sqlite3_bind_int64(st, 2, a->due_ms);
        break;
    }
    if (step_done(st))
        return -1;
    if (a->conversation_id && a->conversation_id[0]) {
        sqlite3_bind_int64(s->st_conv_set, 1, a->id);
        sqlite3_bind_text(s->st_conv_set, 2, a->conversation_id, -1, SQLITE_STATIC);
        sqlite3_bind_int64(s->st_conv_set, 3, now);
        return step_done(s->st_conv_set);
    }
    if (a->conversation_id) {
        sqlite3_bind_int64(s->st_conv_clear, 1, a->id);
        return step_done(s->st_conv_clear);
    }
    return 0;
}

/* ---- answers and the syncer ------------------------------------------------ */

/* Answers a request batch (and frees it), or releases a flush marker (its
 * flusher frees it, unless it gave up waiting). */
static void answer(amp_spool *s, work *w) {
    if (w->kind == WORK_FLUSH) {
        pthread_mutex_lock(&s->q_mu);
        bool abandoned = w->abandoned;
        w->flushed = true;
        pthread_cond_broadcast(&s->q_flushed);
        pthread_mutex_unlock(&s->q_mu);
        if (abandoned)
            free(w);
        return;
    }
    if (w->result.status != 0 && !w->result.error)
        w->result.error = "the spool could not store the events";
    w->done(w->ctx, &w->result);
    amp_spool_batch_destroy(w->batch);
    free(w);
}

static void hand_to_syncer(amp_spool *s, work *head, work *tail) {
    pthread_mutex_lock(&s->sync_mu);
    if (s->sync_tail)
        s->sync_tail->next = head;
    else
        s->sync_head = head;
    s->sync_tail = tail;
    pthread_cond_signal(&s->sync_cond);
    pthread_mutex_unlock(&s->sync_mu);
}

/* Takes everything committed so far, makes it durable with one fdatasync of
 * the log (which covers every write before it, whichever descriptor made
 * it), then answers it. Groups committed during a sync wait for the next
 * one, so under load each sync serves several groups. */
static void *syncer_main(void *arg) {
    amp_spool *s = arg;
    pthread_setname_np(pthread_self(), "amp-sync");
    pthread_mutex_lock(&s->sync_mu);
    for (;;) {
        while (!s->sync_head && !s->sync_stop)
            pthread_cond_wait(&s->sync_cond, &s->sync_mu);
        if (!s->sync_head)
            break; /* stopping, and nothing left */
        work *head = s->sync_head;
        s->sync_head = s->sync_tail = NULL;
        pthread_mutex_unlock(&s->sync_mu);

        bool stored = false;
        for (work *w = head; w; w = w->next)
            stored |= w->kind == WORK_BATCH && w->result.status == 0;
        /* Read before the sync, which covers every commit made before it. */
        int64_t upto = atomic_load(&s->committed_max), epoch = atomic_load(&s->epoch);
        bool synced = !stored || fdatasync(s->wal_fd) == 0;
        if (!synced) {
            amp_log(AMP_LOG_ERROR, "spool sync failed", "{s:s}", "error", strerror(errno));
            atomic_store(&s->failed, true); /* the committer recovers, see recover() */
            atomic_store(&s->writable, false);
        }
        /* A group is answered 202 only if it was synced and no failed sync
         * since has made the committer undo it (failed first, then epoch:
         * recover() advances the epoch before it clears failed). */
        bool trusted = synced && !atomic_load(&s->failed);
        int64_t epoch_now = atomic_load(&s->epoch);
        if (stored && trusted && epoch_now == epoch && upto > atomic_load(&s->synced_max)) {
            atomic_store(&s->synced_max, upto);
            notify_waiter(s); /* the new rows are claimable now */
        }
        for (work *w = head; w; w = w->next) {
            if (w->kind == WORK_BATCH && w->result.status == 0 &&
                (!trusted || w->epoch != epoch_now)) {
                w->result.status = -1;
                w->result.accepted = w->result.duplicates = 0;
                w->result.error = "the spool could not sync its log to disk";
            }
        }
        for (work *w = head, *next; w; w = next) {
            next = w->next;
            answer(s, w);
        }
        pthread_mutex_lock(&s->sync_mu);
    }
    pthread_mutex_unlock(&s->sync_mu);
    return NULL;
}

/* Opens the log for the syncer and makes the spool's directory entries
 * durable once (SQLite itself would only at its first checkpoint). */
static int start_syncer(amp_spool *s, char *err, size_t errlen) {
    const char *db = sqlite3_db_filename(s->wdb, "main");
    char *wal = amp_xasprintf("%s-wal", db ? db : "");
    s->wal_fd = open(wal, O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    if (s->wal_fd < 0) {
        snprintf(err, errlen, "spool: cannot open '%s': %s", wal, strerror(errno));
        free(wal);
        return -1;
    }
    char *dir = amp_xstrdup(wal);
    int dfd = open(dirname(dir), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    int synced = dfd >= 0 && fsync(dfd) == 0;
    if (dfd >= 0)
        close(dfd);
    free(dir);
    free(wal);
    if (!synced || fdatasync(s->wal_fd) != 0) {
        snprintf(err, errlen, "spool: cannot sync the spool's directory or log: %s",
                 strerror(errno));
        return -1;
    }
    if (pthread_create(&s->syncer, NULL, syncer_main, s) != 0) {
        snprintf(err, errlen, "spool: cannot start the sync thread");
        return -1;
    }
    s->syncer_running = true;
    return 0;
}

/* Answers what is still waiting for a sync, then stops the thread. */
static void stop_syncer(amp_spool *s) {
    stop_thread(s->syncer, &s->syncer_running, &s->sync_mu, &s->sync_cond, &s->sync_stop);
}

/* Readiness, logged when it changes; a failure schedules the next probe. */
static void set_writable(amp_spool *s, bool ok) {
    /* Only when readiness is lost: a steady stream of failing groups must
     * not keep postponing the probe. */
    if (!ok && (atomic_load(&s->writable) || s->next_probe_ms <= amp_mono_ms()))
        s->next_probe_ms = amp_mono_ms() + PROBE_INTERVAL_MS;
    if (atomic_exchange(&s->writable, ok) != ok && ok)
        amp_log(AMP_LOG_INFO, "spool writable again", NULL);
}

/* What a group's writes change once committed. */
typedef struct group_tally {
    int64_t depth_change; /* pending rows added, minus rows finished */
    bool new_work;        /* something for the dispatcher to claim */
    bool batch_failed;    /* a request could not be stored */
} group_tally;

/* Every request and acknowledgement of the group, inside the open
 * transaction. Unguarded, the first failing request stops it: its earlier
 * statements are in the transaction, so the caller rolls back and writes
 * the group again guarded, where only that request is refused. Failed
 * acknowledgements are logged and left out either way. -1 only unguarded. */
static int write_group(amp_spool *s, work *head, int64_t now, bool guarded, group_tally *t) {
    *t = (group_tally){0};
    for (work *w = head; w; w = w->next) {
        if (w->kind == WORK_BATCH) {
            w->result = (amp_spool_result){0};
            w->rows = w->last_id = 0;
            if (s->refusing) { /* nothing new until recover() works */
                w->result.status = -1;
                w->result.error = "the spool is recovering from a failed sync";
                t->batch_failed = true;
                continue;
            }
            w->result.status = write_batch(s, w, now, guarded);
            if (w->result.status != 0 && !guarded)
                return -1;
            t->batch_failed |= w->result.status != 0;
            t->new_work |= w->result.status == 0 && w->result.accepted > 0;
            t->depth_change += w->rows;
        } else if (w->kind == WORK_ACK) {
            if (write_ack(s, &w->ack, now) != 0)
                amp_log(AMP_LOG_ERROR, "spool ack failed", "{s:I, s:s}", "id",
                        (json_int_t)w->ack.id, "error", sqlite3_errmsg(s->wdb));
            else if (w->ack.kind == AMP_ACK_DELIVERED || w->ack.kind == AMP_ACK_DEAD)
                t->depth_change--;
            t->new_work |= w->ack.kind != AMP_ACK_DEAD;
        }
    }
    return 0;
}

/* After a commit: the group's rows are in the log. Without a syncer that is
 * all the spool waits for, so they are claimable at once. */
static void committed(amp_spool *s, work *head) {
    int64_t epoch = atomic_load(&s->epoch), top = atomic_load(&s->committed_max);
    for (work *w = head; w; w = w->next) {
        w->epoch = epoch;
        if (w->kind == WORK_BATCH && w->result.status == 0 && w->last_id > top)
            top = w->last_id;
    }
    atomic_store(&s->committed_max, top);
    if (s->wal_fd < 0)
        atomic_store(&s->synced_max, top);
}

/* After a failed sync (the syncer set s->failed): the rows committed since
 * the last good sync were answered 503 and may not be on disk, the kernel
 * having perhaps dropped the pages it could not write. Delete them and
 * their dedupe keys, so that their senders' retries are stored as new,
 * then copy the whole log into the database with a TRUNCATE checkpoint,
 * which syncs the database file: once that works, everything the spool
 * holds is on disk again. False (and retried by the next group or probe)
 * while the disk still fails. Committer thread. */
static bool recover(amp_spool *s) {
    int64_t synced = atomic_load(&s->synced_max);
    sqlite3_bind_int64(s->st_drop_keys, 1, synced);
    sqlite3_bind_int64(s->st_drop_rows, 1, synced);
    bool ok = step_done(s->st_begin) == 0 && step_done(s->st_drop_keys) == 0 &&
              step_done(s->st_drop_rows) == 0;
    int64_t dropped = ok ? sqlite3_changes(s->wdb) : 0;
    ok = ok && step_done(s->st_commit) == 0;
    if (ok)
        s->rows_dropped += dropped; /* gone even if the checkpoint fails below */
    if (!ok && sqlite3_get_autocommit(s->wdb) == 0)
        step_done(s->st_rollback);
    if (ok) {
        pthread_mutex_lock(&s->ck_run_mu);
        ok = sqlite3_wal_checkpoint_v2(s->wdb, NULL, SQLITE_CHECKPOINT_TRUNCATE, NULL, NULL) ==
             SQLITE_OK;
        pthread_mutex_unlock(&s->ck_run_mu);
    }
    if (!ok) {
        amp_log(AMP_LOG_WARN, "spool recovery after a failed sync did not work yet", "{s:s}",
                "error", sqlite3_errmsg(s->wdb));
        return false;
    }
    atomic_store(&s->committed_max, synced);
    atomic_fetch_add(&s->epoch, 1);
    atomic_store(&s->failed, false);
    count_pending(s);
    amp_log(AMP_LOG_INFO, "spool recovered from a failed sync", "{s:I}", "rows_dropped",
            (json_int_t)s->rows_dropped);
    s->rows_dropped = 0;
    return true;
}

/* One group: everything queued so far, in one transaction. */
static void commit_group(amp_spool *s, work *head) {
    int64_t now = amp_now_ms();
    int nbatches = 0, nacks = 0, ok = 1;
    group_tally t = {0};
    char why[256] = "";

    for (work *w = head; w; w = w->next)
        nbatches += w->kind == WORK_BATCH, nacks += w->kind == WORK_ACK;

    /* After a failed sync nothing new is stored before recover() worked. */
    s->refusing = nbatches > 0 && atomic_load(&s->failed) && !recover(s);
    if (nbatches + nacks > 0) {
        ok = step_done(s->st_begin) == 0;
        if (ok && write_group(s, head, now, false, &t) != 0) {
            /* A failure may already have ended the transaction. */
            if (sqlite3_get_autocommit(s->wdb) == 0)
                step_done(s->st_rollback);
            ok = step_done(s->st_begin) == 0;
            if (ok)
                write_group(s, head, now, true, &t);
        }
        if (ok && step_done(s->st_commit)) {
            ok = 0;
            /* Before ROLLBACK replaces it with its own message. */
            snprintf(why, sizeof why, "%s", sqlite3_errmsg(s->wdb));
            step_done(s->st_rollback);
        } else if (!ok) {
            snprintf(why, sizeof why, "%s", sqlite3_errmsg(s->wdb));
        }
        if (!ok)
            amp_log(AMP_LOG_ERROR, "spool commit failed", "{s:s, s:i, s:i}", "error", why,
                    "requests", nbatches, "acks", nacks);
        set_writable(s, ok && !t.batch_failed && !atomic_load(&s->failed));
        if (ok) {
            atomic_fetch_add(&s->depth, t.depth_change);
            check_limits(s);
            committed(s, head);
        }
        if (ok && external_write(s))
            count_pending(s); /* e.g. `amp2dify dlq replay` from another process */
    }

    /* Unclaim acknowledged rows once committed. Acknowledgements that
     * failed are held and their rows stay claimed: unclaimed, a row still
     * due would be delivered again at once, over and over while the disk
     * stays full. */
    if (nacks && (ok || s->closing)) {
        pthread_mutex_lock(&s->claim_mu);
        for (work *w = head; w; w = w->next)
            if (w->kind == WORK_ACK)
                idset_del(&s->claimed, w->ack.id);
        pthread_mutex_unlock(&s->claim_mu);
    }

    /* Requests and flush markers are answered here, or, when the syncer
     * makes commits durable, by the syncer after its next fdatasync (in
     * order, so a flush still follows everything queued before it). */
    work *to_sync = NULL, *sync_last = NULL;
    for (work *w = head; w;) {
        work *next = w->next;
        if (w->kind == WORK_BATCH && !ok) {
            w->result.status = -1;
            w->result.accepted = w->result.duplicates = 0;
        }
        if (w->kind == WORK_ACK && !ok && !s->closing) {
            w->next = NULL;
            if (s->held_tail)
                s->held_tail->next = w;
            else
                s->held = w;
            s->held_tail = w;
        } else if (w->kind == WORK_ACK) {
            free_ack_strings(&w->ack);
            free(w);
        } else if (s->wal_fd >= 0) {
            w->next = NULL;
            if (sync_last)
                sync_last->next = w;
            else
                to_sync = w;
            sync_last = w;
        } else {
            answer(s, w);
        }
        w = next;
    }
    if (to_sync)
        hand_to_syncer(s, to_sync, sync_last);

    if (ok && (t.new_work || nacks))
        notify_waiter(s);
}

/* The held acknowledgements go first in the next group. */
static work *with_held(amp_spool *s, work *head) {
    if (!s->held)
        return head;
    work *first = s->held;
    s->held_tail->next = head;
    s->held = s->held_tail = NULL;
    return first;
}

/* Nothing queued, yet the spool is not known to be writable: retry the held
 * acknowledgements, or write one page. */
static void probe(amp_spool *s) {
    if (atomic_load(&s->failed)) {
        set_writable(s, recover(s));
        return;
    }
    if (s->held) {
        commit_group(s, with_held(s, NULL));
        return;
    }
    int ok = step_done(s->st_begin) == 0;
    ok = ok && step_done(s->st_probe) == 0;
    ok = ok && step_done(s->st_commit) == 0;
    if (!ok)
        step_done(s->st_rollback);
    if (ok && s->wal_fd >= 0)
        ok = fdatasync(s->wal_fd) == 0;
    set_writable(s, ok);
}

/* Delete one bounded slice of expired rows; returns rows deleted. */
static int64_t prune(amp_spool *s, sqlite3_stmt *st, int64_t before_ms) {
    sqlite3_bind_int64(st, 1, before_ms);
    sqlite3_bind_int(st, 2, PRUNE_BATCH);
    int64_t n = step_done(st) == 0 ? sqlite3_changes(s->wdb) : -1;
    if (n < 0)
        amp_log(AMP_LOG_WARN, "spool pruning failed", "{s:s}", "error", sqlite3_errmsg(s->wdb));
    return n;
}

/* Runs between groups on the committer thread; each slice is its own short
 * transaction so ingest never waits long behind it. */
static void maintain(amp_spool *s) {
    int64_t now = amp_now_ms(), deduped = 0, delivered = 0, n;
    if (s->dedupe_window_ms > 0)
        while ((n = prune(s, s->st_prune_dedupe, now - s->dedupe_window_ms)) > 0 &&
               (deduped += n) < 100 * PRUNE_BATCH)
            ;
    /* Over spool.max_bytes, delivered rows go before their retention. */
    bool pressed = atomic_load(&s->full) == full_bytes;
    if (s->retention_ms > 0 || pressed)
        while ((n = prune(s, s->st_prune_delivered, pressed ? now + 1 : now - s->retention_ms)) >
                   0 &&
               (delivered += n) < 100 * PRUNE_BATCH)
            ;
    count_pending(s);
    if (deduped || delivered)
        amp_log(AMP_LOG_INFO, "spool pruned", "{s:I, s:I, s:I, s:b}", "dedupe_keys",
                (json_int_t)deduped, "delivered", (json_int_t)delivered, "pending",
                (json_int_t)atomic_load(&s->depth), "before_retention", pressed);
}

static void *committer_main(void *arg) {
    amp_spool *s = arg;
    pthread_setname_np(pthread_self(), "amp-commit");
    pthread_mutex_lock(&s->q_mu);
    for (;;) {
        while (!s->q_head && !s->stop) {
            int64_t now = amp_mono_ms();
            bool stalled = s->held || !atomic_load(&s->writable) || atomic_load(&s->failed);
            if (stalled && now >= s->next_probe_ms) {
                pthread_mutex_unlock(&s->q_mu);
                probe(s);
                pthread_mutex_lock(&s->q_mu);
                continue;
            }
            int64_t wait = s->next_maintenance_ms - now;
            if (stalled && s->next_probe_ms - now < wait)
                wait = s->next_probe_ms - now;
            if (wait <= 0) {
                pthread_mutex_unlock(&s->q_mu);
                maintain(s);
                pthread_mutex_lock(&s->q_mu);
                s->next_maintenance_ms = amp_mono_ms() + MAINTENANCE_INTERVAL_MS;
                continue;
            }
            struct timespec ts;
            deadline_in(&ts, wait);
            pthread_cond_timedwait(&s->q_cond, &s->q_mu, &ts);
        }
        if (!s->q_head && s->stop)
            break;
        /* Only acknowledgements so far: let more gather for a moment, so a
         * high delivery rate costs one commit (and fsync) per group, not
         * per delivery. */
        if (!s->q_urgent && !s->stop && s->q_len < ACK_GROUP_MAX) {
            struct timespec ts;
            deadline_in(&ts, ACK_GATHER_MS);
            while (!s->q_urgent && !s->stop && s->q_len < ACK_GROUP_MAX &&
                   pthread_cond_timedwait(&s->q_cond, &s->q_mu, &ts) == 0)
                ;
        }
        work *head = s->q_head;
        s->q_head = s->q_tail = NULL;
        s->q_len = s->q_urgent = 0;
        pthread_mutex_unlock(&s->q_mu);
        commit_group(s, with_held(s, head));
        pthread_mutex_lock(&s->q_mu);
    }
    pthread_mutex_unlock(&s->q_mu);
    /* A last try for held acknowledgements; if it fails too, their rows
     * are simply delivered again after the next start (at-least-once). */
    s->closing = true;
    if (s->held)
        commit_group(s, with_held(s, NULL));
    return NULL;
}

/* ---- delivery side ------------------------------------------------------- */

void amp_spool_job_free(amp_spool_job *j) {
    if (!j)
        return;
    free(j->route);
    free(j->app);
    free(j->user);
    free(j->body);
    free(j->dedupe_key);
    free(j->conversation_id);
    free(j);
}

static char *col_text(sqlite3_stmt *st, int i) {
    const unsigned char *t = sqlite3_column_text(st, i);
    return t ? amp_xstrdup((const char *)t) : NULL;
}

int amp_spool_claim(amp_spool *s, int64_t now_ms, amp_spool_job **jobs, size_t max,
                    int64_t *next_due_ms) {
    size_t n = 0;
    int rc = 0;
    *next_due_ms = INT64_MAX;
    pthread_mutex_lock(&s->claim_mu);
    /* Claimed rows are still pending in the database: ask for enough rows
     * to see past them. */
    sqlite3_bind_int64(s->st_claim, 1, now_ms);
    sqlite3_bind_int64(s->st_claim, 2, (sqlite3_int64)(max + s->claimed.n));
    sqlite3_bind_int64(s->st_claim, 3, atomic_load(&s->synced_max));
    int step = SQLITE_DONE;
    while (n < max && (step = sqlite3_step(s->st_claim)) == SQLITE_ROW) {
        int64_t id = sqlite3_column_int64(s->st_claim, 0);
        if (idset_has(&s->claimed, id))
            continue;
        amp_spool_job *j = amp_xcalloc(1, sizeof *j);
        j->id = id;
        j->route = col_text(s->st_claim, 1);
        j->app = col_text(s->st_claim, 2);
        j->user = col_text(s->st_claim, 3);
        j->body = col_text(s->st_claim, 4);
        j->dedupe_key = col_text(s->st_claim, 5);
        j->conversation_id = col_text(s->st_claim, 6);
        j->per_user = sqlite3_column_int(s->st_claim, 7) != 0;
        j->attempts = sqlite3_column_int(s->st_claim, 8);
        j->created_ms = sqlite3_column_int64(s->st_claim, 9);
        idset_add(&s->claimed, id);
        jobs[n++] = j;
    }
    if (n < max && step != SQLITE_DONE) {
        amp_log(AMP_LOG_ERROR, "spool claim failed", "{s:s}", "error", sqlite3_errmsg(s->rdb));
        rc = -1;
    }
    sqlite3_reset(s->st_claim);

    if (n == max) {
        *next_due_ms = now_ms; /* there may be more due right now */
    } else if (rc == 0) {
        sqlite3_bind_int64(s->st_next_due, 1, now_ms);
        if (sqlite3_step(s->st_next_due) == SQLITE_ROW &&
            sqlite3_column_type(s->st_next_due, 0) != SQLITE_NULL)
            *next_due_ms = sqlite3_column_int64(s->st_next_due, 0);
        sqlite3_reset(s->st_next_due);
    }
    pthread_mutex_unlock(&s->claim_mu);
    return rc < 0 && n == 0 ? -1 : (int)n;
}

int64_t amp_spool_oldest_pending_ms(amp_spool *s) {
    int64_t v = 0;
    pthread_mutex_lock(&s->claim_mu);
    sqlite3_stmt *st = NULL;
    if (sqlite3_prepare_v2(s->rdb,
                           "SELECT created_ms FROM deliveries INDEXED BY deliveries_pending "
                           "WHERE state = 0 ORDER BY id LIMIT 1",
                           -1, &st, NULL) == SQLITE_OK &&
        sqlite3_step(st) == SQLITE_ROW)
        v = sqlite3_column_int64(st, 0);
    sqlite3_finalize(st);
    pthread_mutex_unlock(&s->claim_mu);
    return v;
}

int amp_spool_stats_get(amp_spool *s, amp_spool_stats *out) {
    memset(out, 0, sizeof *out);
    pthread_mutex_lock(&s->claim_mu);
    sqlite3_stmt *st = NULL;
    int rc = -1;
    if (sqlite3_prepare_v2(
            s->rdb,
            "SELECT (SELECT count(*) FROM deliveries WHERE state = 0),"
            " (SELECT count(*) FROM deliveries WHERE state = 1 AND state <> 0),"
            " (SELECT count(*) FROM deliveries WHERE state = 2 AND state <> 0),"
            " (SELECT created_ms FROM deliveries WHERE state = 0 ORDER BY id LIMIT 1)",
            -1, &st, NULL) == SQLITE_OK &&
        sqlite3_step(st) == SQLITE_ROW) {
        out->pending = sqlite3_column_int64(st, 0);
        out->delivered = sqlite3_column_int64(st, 1);
        out->dead = sqlite3_column_int64(st, 2);
        out->oldest_pending_ms = sqlite3_column_int64(st, 3);
        rc = 0;
    }
    sqlite3_finalize(st);
    pthread_mutex_unlock(&s->claim_mu);
    return rc;
}

/* ---- dead letters ---------------------------------------------------------
 * One WHERE clause serves list, replay and purge; unused filters are bound
 * as NULL / 0; "state <> 0" lets it use the index of finished rows. Runs on
 * the reader connection (a CLI process, or beside a running daemon: SQLite's
 * locking and the busy timeout serialise writers). */

#define DLQ_WHERE                                                                                  \
    " WHERE state = 2 AND state <> 0 AND (?1 IS NULL OR route = ?1)"                               \
    " AND (?2 IS NULL OR app = ?2)"                                                                \
    " AND (?3 IS NULL OR last_code = ?3) AND (?4 = 0 OR last_status = ?4)"                         \
    " AND (?5 = 0 OR finished_ms >= ?5) AND (?6 = 0 OR finished_ms < ?6)"                          \
    " AND (?7 IS NULL OR id IN (SELECT value FROM json_each(?7)))"

static sqlite3_stmt *dlq_prepare(amp_spool *s, const char *sql, const amp_dlq_filter *f,
                                 char **ids_json) {
    sqlite3_stmt *st;
    *ids_json = NULL;
    if (sqlite3_prepare_v2(s->rdb, sql, -1, &st, NULL) != SQLITE_OK) {
        amp_log(AMP_LOG_ERROR, "spool query failed", "{s:s}", "error", sqlite3_errmsg(s->rdb));
        return NULL;
    }
    bind_text(st, 1, f->route);
    bind_text(st, 2, f->app);
    bind_text(st, 3, f->code);
    sqlite3_bind_int(st, 4, f->status);
    sqlite3_bind_int64(st, 5, f->since_ms);
    sqlite3_bind_int64(st, 6, f->until_ms);
    if (f->ids) {
        json_t *arr = json_array();
        for (size_t i = 0; i < f->nids; i++)
            json_array_append_new(arr, json_integer(f->ids[i]));
        *ids_json = json_dumps(arr, JSON_COMPACT);
        json_decref(arr);
        bind_text(st, 7, *ids_json);
    } else {
        sqlite3_bind_null(st, 7);
    }
    return st;
}

json_t *amp_spool_dlq_list(amp_spool *s, const amp_dlq_filter *f, size_t limit) {
    char *ids;
    pthread_mutex_lock(&s->claim_mu);
    sqlite3_stmt *st = dlq_prepare(
        s,
        "SELECT id, route, app, user, dedupe_key, last_status, last_code, last_message, "
        "attempts, created_ms, finished_ms, body FROM deliveries" DLQ_WHERE
        " ORDER BY finished_ms, id LIMIT ?8",
        f, &ids);
    json_t *rows = NULL;
    if (st) {
        sqlite3_bind_int64(st, 8, (sqlite3_int64)(limit > INT64_MAX ? INT64_MAX : limit));
        rows = json_array();
        int rc;
        while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
            json_t *row = json_pack(
                "{s:I, s:s?, s:s?, s:s?, s:s?, s:i, s:s?, s:s?, s:i, s:I, s:I, s:s?}", "id",
                (json_int_t)sqlite3_column_int64(st, 0), "route", sqlite3_column_text(st, 1), "app",
                sqlite3_column_text(st, 2), "user", sqlite3_column_text(st, 3), "dedupe_key",
                sqlite3_column_text(st, 4), "status", sqlite3_column_int(st, 5), "code",
                sqlite3_column_text(st, 6), "message", sqlite3_column_text(st, 7), "attempts",
                sqlite3_column_int(st, 8), "created_ms", (json_int_t)sqlite3_column_int64(st, 9),
                "dead_ms", (json_int_t)sqlite3_column_int64(st, 10), "body",
                sqlite3_column_text(st, 11));
            if (row)
                json_array_append_new(rows, row);
        }
        if (rc != SQLITE_DONE) {
            amp_log(AMP_LOG_ERROR, "spool query failed", "{s:s}", "error", sqlite3_errmsg(s->rdb));
            json_decref(rows);
            rows = NULL;
        }
        sqlite3_finalize(st);
    }
    pthread_mutex_unlock(&s->claim_mu);
    free(ids);
    return rows;
}

static int64_t dlq_change(amp_spool *s, const char *sql, const amp_dlq_filter *f) {
    char *ids;
    int64_t n = -1;
    pthread_mutex_lock(&s->claim_mu);
    sqlite3_stmt *st = dlq_prepare(s, sql, f, &ids);
    if (st) {
        sqlite3_bind_int64(st, 8, amp_now_ms());
        if (sqlite3_step(st) == SQLITE_DONE)
            n = sqlite3_changes(s->rdb);
        else
            amp_log(AMP_LOG_ERROR, "spool update failed", "{s:s}", "error", sqlite3_errmsg(s->rdb));
        sqlite3_finalize(st);
    }
    pthread_mutex_unlock(&s->claim_mu);
    free(ids);
    return n;
}

int64_t amp_spool_dlq_replay(amp_spool *s, const amp_dlq_filter *f) {
    int64_t n = dlq_change(s,
                           "UPDATE deliveries SET state = 0, attempts = 0, due_ms = ?8, "
                           "schedule_ms = ?8, finished_ms = NULL" DLQ_WHERE,
                           f);
    if (n > 0)
        notify_waiter(s);
    return n;
}

int64_t amp_spool_dlq_purge(amp_spool *s, const amp_dlq_filter *f) {
    /* ?8 is bound by dlq_change; "?8 > 0" keeps it used and always true. */
    return dlq_change(s, "DELETE FROM deliveries" DLQ_WHERE " AND ?8 > 0", f);
}
