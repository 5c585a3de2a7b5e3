/* The schema and its migrations, the connections and their statements. */
#include "spool_int.h"

#include "../base/digest.h"

#include <stdio.h>
#include <string.h>

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
    "  state INTEGER NOT NULL DEFAULT 0," /* 0 pending, 1 delivered, 2 dead, 3 waiting */
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

/* v3: the admin API finds an event's rows by its dedupe key (insert_id):
 * the dedupe row keeps the id of the event's first row (its rows are
 * consecutive). An index of deliveries(dedupe_key) would do the same at a
 * random-page write per row. Measured with amp_queue_submit, 100,000 events
 * with UUID keys in batches of 20, three runs each, interleaved, on a
 * shared 2-CPU host: no lookup 27,900-40,300 events/s and 41.6 MB; the
 * index 16,100-18,700 events/s and 46.6 MB; this column 27,000-31,100
 * events/s and 42.0 MB. */
static const char schema_v3[] = "ALTER TABLE dedupe ADD COLUMN first_id INTEGER;";

/* v4: a job of a route with a report keeps its source event (the report
 * carries its user_id, device_id and fields); NULL for every other row. */
static const char schema_v4[] = "ALTER TABLE deliveries ADD COLUMN source TEXT;";

/* v5: the dedupe table is keyed by a 64-bit hash of the key (see
 * amp_spool_key_hash) as its rowid instead of the key's text, and new keys
 * are first appended to dedupe_recent, then merged into it in key order
 * (dedupe.c). Written straight into a table ordered by key, every new key
 * landed on a random page, which each commit wrote to the log and each
 * checkpoint back to the database: measured with bench/spool_ingest (30,000
 * UUID keys, 64 requests in flight), 44 us of CPU per stored event, 17 us
 * without dedupe. Keys of the old table are carried over (two keys with one
 * hash keep the later sighting). Each key also keeps a check value, the
 * next 64 bits of the same digest (amp_spool_key_digest): a key is a
 * duplicate only when both match, so two keys with one hash are both
 * stored (a collision may deliver twice, never drop). The admin lookup
 * compares the check too. */
static const char schema_v5[] =
    "CREATE TABLE dedupe_v5 (h INTEGER PRIMARY KEY, seen_ms INTEGER NOT NULL, first_id INTEGER,"
    "  chk INTEGER NOT NULL);"
    "INSERT INTO dedupe_v5(h, seen_ms, first_id, chk)"
    "  SELECT amp_key_hash(key), seen_ms, first_id, amp_key_check(key)"
    "  FROM dedupe WHERE true ORDER BY seen_ms "
    "  ON CONFLICT(h) DO UPDATE SET seen_ms = excluded.seen_ms, first_id = excluded.first_id,"
    "  chk = excluded.chk;"
    "DROP TABLE dedupe;"
    "ALTER TABLE dedupe_v5 RENAME TO dedupe;"
    "CREATE INDEX dedupe_seen ON dedupe(seen_ms);"
    "CREATE TABLE dedupe_recent (id INTEGER PRIMARY KEY, h INTEGER NOT NULL,"
    "  seen_ms INTEGER NOT NULL, first_id INTEGER, chk INTEGER NOT NULL);";

/* v6: the dedupe table loses its index by time (dedupe_seen). Every merged
 * key was also an insert into that index, a B-tree of its own with its own
 * pages in the log and the checkpoint, and only pruning read it. Expired
 * keys are now found by walking the table in hash order (upkeep.c); a
 * lookup compares the sighting with the window anyway. Measured in the
 * server under wrk, ingest only, 6 alternating runs (with the committer's
 * data_version read moved into its transaction): the committer and
 * checkpointer x0.89 of their CPU per event with the index. */
static const char schema_v6[] = "DROP INDEX dedupe_seen;";

/* v7: a new key whose event has rows is no longer also appended to
 * dedupe_recent: the rows carry the key (dedupe_key) and its sighting
 * (created_ms). dedupe_merged.upto is the last row whose key is in the
 * dedupe table; the keys of the rows after it are the recent ones, read
 * again from those rows at open (dedupe.c). dedupe_recent keeps the keys
 * that have no rows after upto: an event without rows, rows whose ids fall
 * at or below upto (the highest rows were deleted, and SQLite gives their
 * ids again), and the keys of rows a purge deletes before they are merged.
 * Every key of a database of version 6 is in dedupe or dedupe_recent, so
 * upto starts at its last row. */
static const char schema_v7[] =
    "CREATE TABLE dedupe_merged (upto INTEGER NOT NULL);"
    "INSERT INTO dedupe_merged(upto) SELECT coalesce(max(id), 0) FROM deliveries;";

/* v8: a merge writes its keys as a run of their own (dedupe_runs, keyed by
 * the run's number, seg, then the hash), appended after the last run
 * instead of spread over the dedupe table, and dedupe_segs lists the runs
 * with their key counts and times; runs are compacted into the dedupe table
 * many keys to a page (dedupe.c). Merged straight into a table of two
 * million keys, each key was a page of its own in the log and in the
 * checkpoint. Nothing is copied: the dedupe table keeps its keys. */
static const char schema_v8[] =
    "CREATE TABLE dedupe_runs (seg INTEGER NOT NULL, h INTEGER NOT NULL,"
    "  seen_ms INTEGER NOT NULL, first_id INTEGER, chk INTEGER NOT NULL,"
    "  PRIMARY KEY (seg, h)) WITHOUT ROWID;"
    "CREATE TABLE dedupe_segs (seg INTEGER PRIMARY KEY, keys INTEGER NOT NULL,"
    "  made_ms INTEGER NOT NULL);";

/* Migrations, in order: migrations[v] brings a database from version v to v+1. */
static const char *const migrations[] = {schema_v1, schema_v2, schema_v3, schema_v4,
                                         schema_v5, schema_v6, schema_v7, schema_v8};

/* Tests only (amp_spool_set_key_hash_for_tests): replaces the hash. */
static int64_t (*hash_for_tests)(const char *key);

void amp_spool_set_key_hash_for_tests(int64_t (*hash)(const char *key)) {
    hash_for_tests = hash;
}

int64_t amp_spool_key_digest(const char *key, int64_t *check) {
    unsigned char md[AMP_SHA256_LEN];
    amp_sha256(key, strlen(key), md);
    uint64_t h = 0, c = 0;
    for (int i = 0; i < 8; i++) {
        h = h << 8 | md[i];
        c = c << 8 | md[8 + i];
    }
    *check = (int64_t)c;
    if (hash_for_tests)
        h = (uint64_t)hash_for_tests(key);
    return h ? (int64_t)h : 1; /* 0 marks an empty slot in dedupe.c */
}

int64_t amp_spool_key_hash(const char *key) {
    int64_t check;
    return amp_spool_key_digest(key, &check);
}

/* amp_key_hash(text) and amp_key_check(text) in SQL, for the migration and
 * recover(); user data: 0 the hash, 1 the check. */
static void sql_key_digest(sqlite3_context *ctx, int argc, sqlite3_value **argv) {
    (void)argc;
    const unsigned char *key = sqlite3_value_text(argv[0]);
    if (key) {
        int64_t check, h = amp_spool_key_digest((const char *)key, &check);
        sqlite3_result_int64(ctx, sqlite3_user_data(ctx) ? check : h);
    } else {
        sqlite3_result_null(ctx);
    }
}

static int exec(sqlite3 *db, const char *sql, char *err, size_t errlen) {
    char *msg = NULL;
    if (sqlite3_exec(db, sql, NULL, NULL, &msg) != SQLITE_OK) {
        snprintf(err, errlen, "%s", msg ? msg : sqlite3_errmsg(db));
        sqlite3_free(msg);
        return -1;
    }
    return 0;
}

/* PRAGMA user_version: the schema version, or -1 (err filled). */
static int schema_version(sqlite3 *db, char *err, size_t errlen) {
    sqlite3_stmt *st;
    int version = -1;
    if (sqlite3_prepare_v2(db, "PRAGMA user_version", -1, &st, NULL) == SQLITE_OK) {
        version = sqlite3_step(st) == SQLITE_ROW ? sqlite3_column_int(st, 0) : -1;
        sqlite3_finalize(st);
    }
    if (version < 0)
        snprintf(err, errlen, "%s", sqlite3_errmsg(db));
    return version;
}

int amp_spool_migrate(sqlite3 *db, char *err, size_t errlen) {
    int version = schema_version(db, err, errlen);
    if (version < 0)
        return -1;
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
}

/* synchronous=NORMAL on every connection: SQLite syncs the log only when it
 * checkpoints, and the database file after each checkpoint. Commits are
 * made durable by the syncer (spool.sync "full", the default), or not at
 * all (spool.sync "normal": a crash of the process loses nothing, a power
 * cut may lose the last commits). */
int amp_spool_open_db(const amp_spool_opts *opts, bool create, sqlite3 **db, char *err,
                      size_t errlen) {
    int flags = SQLITE_OPEN_READWRITE | SQLITE_OPEN_NOMUTEX | (create ? SQLITE_OPEN_CREATE : 0);
    if (sqlite3_open_v2(opts->path, db, flags, amp_spool_vfs()) != SQLITE_OK) {
        snprintf(err, errlen, "cannot open spool '%s': %s", opts->path,
                 *db ? sqlite3_errmsg(*db) : "out of memory");
        return -1;
    }
    sqlite3_create_function_v2(*db, "amp_key_hash", 1,
                               SQLITE_UTF8 | SQLITE_DETERMINISTIC | SQLITE_DIRECTONLY, NULL,
                               sql_key_digest, NULL, NULL, NULL);
    sqlite3_create_function_v2(*db, "amp_key_check", 1,
                               SQLITE_UTF8 | SQLITE_DETERMINISTIC | SQLITE_DIRECTONLY, (void *)1,
                               sql_key_digest, NULL, NULL, NULL);
    int64_t lock_ms = opts->lock_timeout_ms > 0 ? opts->lock_timeout_ms : AMP_SPOOL_LOCK_TIMEOUT_MS;
    sqlite3_busy_timeout(*db, lock_ms > INT32_MAX ? INT32_MAX : (int)lock_ms);
    if (!create) {
        /* Before the pragmas: journal_mode would already write to a file
         * this build does not own. */
        char why[256];
        int version = schema_version(*db, why, sizeof why);
        if (version < 0) {
            snprintf(err, errlen, "cannot read spool '%s': %s", opts->path, why);
            return -1;
        }
        if (version != SCHEMA_VERSION) {
            snprintf(err, errlen,
                     "spool '%s' has schema version %d, this amp2dify expects version %d%s",
                     opts->path, version, SCHEMA_VERSION,
                     version < SCHEMA_VERSION ? " (`amp2dify serve` migrates it)" : "");
            return -1;
        }
    }
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

/* The hashes of the keys of the rows after ?1 (recover() in committer.c
 * drops them with those rows). */
#define KEYS_AFTER                                                                                 \
    "(SELECT amp_key_hash(dedupe_key) FROM deliveries WHERE id > ?1 AND dedupe_key IS NOT NULL)"

/* Statements of a connection s does not have open (an admin handle's
 * committer connection) stay NULL. */
int amp_spool_prepare_all(amp_spool *s, char *err, size_t errlen) {
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
        /* Dedupe (dedupe.c). first_id: the id of the event's first row
         * (its rows are consecutive); NULL when it has none. */
        /* A key is a duplicate if the table or a run holds it, sighted
         * since ?3: one seek in the table and one in each run. */
        {s->wdb, &s->st_dedupe_find,
         "SELECT EXISTS (SELECT 1 FROM dedupe WHERE h = ?1 AND chk = ?2 AND seen_ms >= ?3) "
         "OR EXISTS (SELECT 1 FROM dedupe_runs WHERE seg IN (SELECT seg FROM dedupe_segs) "
         "AND h = ?1 AND chk = ?2 AND seen_ms >= ?3)"},
        {s->wdb, &s->st_recent_add,
         "INSERT INTO dedupe_recent(h, seen_ms, first_id, chk) VALUES (?1, ?2, ?3, ?4)"},
        {s->wdb, &s->st_recent_all,
         "SELECT h, seen_ms, chk, first_id FROM dedupe_recent ORDER BY id"},
        {s->wdb, &s->st_recent_ids,
         /* Two subqueries: min() and max() in one SELECT scan the table. */
         "SELECT (SELECT coalesce(min(id), 1) FROM dedupe_recent), "
         "(SELECT coalesce(max(id), 0) FROM dedupe_recent)"},
        {s->wdb, &s->st_dedupe_merge,
         "INSERT INTO dedupe_runs(seg, h, seen_ms, first_id, chk) VALUES (?5, ?1, ?2, ?3, ?4)"},
        {s->wdb, &s->st_seg_add, "INSERT INTO dedupe_segs(seg, keys, made_ms) VALUES (?1, ?2, ?3)"},
        {s->wdb, &s->st_segs_get,
         "SELECT count(*), coalesce(sum(keys), 0), coalesce(min(made_ms), 0), "
         "coalesce(max(seg), 0) FROM dedupe_segs"},
        /* A compaction step: the keys of runs up to ?3 whose hashes are in
         * [?1, ?2] into the table (those sighted before ?4 are expired and
         * left out; of one hash, the latest sighting stays), then out of
         * the runs; after the last step, the runs themselves. */
        {s->wdb, &s->st_compact_copy,
         "INSERT INTO dedupe(h, seen_ms, first_id, chk) "
         "SELECT h, seen_ms, first_id, chk FROM dedupe_runs "
         "WHERE seg IN (SELECT seg FROM dedupe_segs WHERE seg <= ?3) AND h BETWEEN ?1 AND ?2 "
         "AND seen_ms >= ?4 ORDER BY h, seen_ms "
         "ON CONFLICT(h) DO UPDATE "
         "SET seen_ms = excluded.seen_ms, first_id = excluded.first_id, chk = excluded.chk "
         "WHERE excluded.seen_ms >= dedupe.seen_ms"},
        {s->wdb, &s->st_compact_drop,
         "DELETE FROM dedupe_runs "
         "WHERE seg IN (SELECT seg FROM dedupe_segs WHERE seg <= ?3) AND h BETWEEN ?1 AND ?2"},
        {s->wdb, &s->st_compact_end, "DELETE FROM dedupe_segs WHERE seg <= ?1"},
        {s->wdb, &s->st_recent_drop, "DELETE FROM dedupe_recent WHERE id <= ?1"},
        {s->wdb, &s->st_merged_get, "SELECT upto FROM dedupe_merged"},
        {s->wdb, &s->st_merged_set, "UPDATE dedupe_merged SET upto = ?1"},
        {s->wdb, &s->st_rows_keys,
         "SELECT id, created_ms, dedupe_key FROM deliveries WHERE id > ?1 "
         "AND dedupe_key IS NOT NULL ORDER BY id"},
        {s->wdb, &s->st_filter_scan, "SELECT h FROM dedupe WHERE h >= ?1 ORDER BY h LIMIT ?2"},
        {s->wdb, &s->st_filter_nth, "SELECT h FROM dedupe ORDER BY h LIMIT 1 OFFSET ?1"},
        {s->wdb, &s->st_filter_runs,
         "SELECT seg, h FROM dedupe_runs WHERE (seg, h) > (?1, ?2) ORDER BY seg, h LIMIT ?3"},
        {s->wdb, &s->st_insert,
         "INSERT INTO deliveries(created_ms, schedule_ms, dedupe_key, route, app, user, per_user, "
         "body, due_ms, source) VALUES (?1, ?1, ?2, ?3, ?4, ?5, ?6, ?7, ?1, ?8)"},
        {s->wdb, &s->st_delivered,
         "UPDATE deliveries SET state = 1, attempts = attempts + 1, last_status = ?2, "
         "last_code = NULL, last_message = NULL, result = ?3, finished_ms = ?4 WHERE id = ?1"},
        /* A pending row's result column holds the workflow run a lost
         * connection left running (the next claim hands it back), and is
         * the delivery result once delivered or waiting. */
        {s->wdb, &s->st_retry,
         "UPDATE deliveries SET attempts = attempts + 1, due_ms = ?2, last_status = ?3, "
         "last_code = ?4, last_message = ?5, result = ?6 WHERE id = ?1"},
        /* Waiting for human input: finished for now, neither pending nor
         * dead (state 3); listed by `dlq list --waiting`. */
        {s->wdb, &s->st_waiting,
         "UPDATE deliveries SET state = 3, attempts = attempts + 1, last_status = ?2, "
         "last_code = ?3, last_message = ?4, result = ?5, finished_ms = ?6 WHERE id = ?1"},
        {s->wdb, &s->st_dead,
         "UPDATE deliveries SET state = 2, attempts = attempts + 1, last_status = ?2, "
         "last_code = ?3, last_message = ?4, finished_ms = ?5 WHERE id = ?1"},
        /* A release keeps the stored run unless it names a newer one. */
        {s->wdb, &s->st_release_row,
         "UPDATE deliveries SET due_ms = ?2, result = coalesce(?3, result) WHERE id = ?1"},
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
         "d.per_user, d.attempts, d.schedule_ms, d.result, d.source FROM deliveries d "
         "LEFT JOIN conversations c ON c.app = d.app AND c.user = d.user AND d.per_user "
         "WHERE d.state = 0 AND d.due_ms <= ?1 AND d.id <= ?3 AND NOT amp_claimed(d.id) "
         "AND (d.per_user = 0 OR NOT EXISTS ("
         "  SELECT 1 FROM deliveries e WHERE e.state = 0 AND e.per_user = 1 AND e.app = d.app "
         "  AND e.user = d.user "
         "  AND e.id < d.id)) "
         "ORDER BY d.due_ms, d.id LIMIT ?2"},
        /* The dedupe sweep (upkeep.c): where a slice of ?2 hashes from ?1
         * ends, then the expired keys in it. */
        {s->wdb, &s->st_sweep_end,
         "SELECT max(h) FROM (SELECT h FROM dedupe WHERE h >= ?1 ORDER BY h LIMIT ?2)"},
        {s->wdb, &s->st_prune_dedupe,
         "DELETE FROM dedupe WHERE h >= ?1 AND h <= ?2 AND seen_ms < ?3"},
        /* "state <> 0" repeats the partial index's condition, which SQLite
         * does not infer from "state = 1": without it, every query on
         * delivered or dead rows scans the whole table, pending rows too. */
        {s->wdb, &s->st_prune_delivered,
         "DELETE FROM deliveries WHERE id IN (SELECT id FROM deliveries WHERE state = 1 AND "
         "state <> 0 AND finished_ms < ?1 AND id <= ?3 LIMIT ?2)"},
        {s->wdb, &s->st_count_pending, "SELECT count(*) FROM deliveries WHERE state = 0"},
        /* recover(): what was committed after the last good sync. */
        {s->wdb, &s->st_drop_keys, "DELETE FROM dedupe WHERE h IN " KEYS_AFTER},
        {s->wdb, &s->st_drop_run_keys,
         "DELETE FROM dedupe_runs WHERE seg IN (SELECT seg FROM dedupe_segs) AND h IN " KEYS_AFTER},
        {s->wdb, &s->st_drop_recent_keys, "DELETE FROM dedupe_recent WHERE h IN " KEYS_AFTER},
        {s->wdb, &s->st_drop_rows, "DELETE FROM deliveries WHERE id > ?1"},
        {s->wdb, &s->st_max_id, "SELECT coalesce(max(id), 0) FROM deliveries"},
        /* Plain pragmas: each pragma_...() table function in a query
         * prepares its pragma again every time it runs, and this runs
         * after every commit. */
        {s->wdb, &s->st_page_count, "PRAGMA page_count"},
        {s->wdb, &s->st_free_pages, "PRAGMA freelist_count"},
        {s->wdb, &s->st_data_version, "PRAGMA data_version"},
        /* Rewrites page 1: the smallest real write, to probe writability. */
        {s->wdb, &s->st_probe, "PRAGMA user_version = " AMP_STR(SCHEMA_VERSION)},
        {s->rdb, &s->st_next_due,
         "SELECT min(due_ms) FROM deliveries WHERE state = 0 AND due_ms > ?1"},
    };
    if (s->rdb &&
        sqlite3_create_function_v2(s->rdb, "amp_claimed", 1, SQLITE_UTF8 | SQLITE_DIRECTONLY, s,
                                   amp_spool_sql_claimed, NULL, NULL, NULL) != SQLITE_OK) {
        snprintf(err, errlen, "spool: %s", sqlite3_errmsg(s->rdb));
        return -1;
    }
    for (size_t i = 0; i < sizeof stmts / sizeof stmts[0]; i++)
        if (stmts[i].db && prepare(stmts[i].db, stmts[i].st, stmts[i].sql, err, errlen))
            return -1;
    sqlite3_stmt *st;
    if (s->wdb) { /* fixed for the database's life */
        if (prepare(s->wdb, &st, "PRAGMA page_size", err, errlen))
            return -1;
        int rc = sqlite3_step(st);
        s->page_size = rc == SQLITE_ROW ? sqlite3_column_int64(st, 0) : 0;
        sqlite3_finalize(st);
        if (s->page_size <= 0) {
            snprintf(err, errlen, "spool: cannot read the page size: %s", sqlite3_errmsg(s->wdb));
            return -1;
        }
    }
    return 0;
}

void amp_spool_finalize_all(amp_spool *s) {
    sqlite3_stmt **all[] = {
        &s->st_begin,           &s->st_commit,        &s->st_rollback,
        &s->st_savepoint,       &s->st_release,       &s->st_rollback_to,
        &s->st_dedupe_find,     &s->st_insert,        &s->st_waiting,
        &s->st_delivered,       &s->st_retry,         &s->st_dead,
        &s->st_release_row,     &s->st_conv_set,      &s->st_conv_clear,
        &s->st_claim,           &s->st_next_due,      &s->st_prune_dedupe,
        &s->st_prune_delivered, &s->st_count_pending, &s->st_probe,
        &s->st_data_version,    &s->st_drop_keys,     &s->st_drop_rows,
        &s->st_max_id,          &s->st_page_count,    &s->st_free_pages,
        &s->st_recent_add,      &s->st_recent_all,    &s->st_recent_ids,
        &s->st_dedupe_merge,    &s->st_recent_drop,   &s->st_drop_recent_keys,
        &s->st_filter_scan,     &s->st_sweep_end,     &s->st_merged_get,
        &s->st_merged_set,      &s->st_rows_keys,     &s->st_seg_add,
        &s->st_segs_get,        &s->st_compact_copy,  &s->st_compact_drop,
        &s->st_compact_end,     &s->st_filter_runs,   &s->st_drop_run_keys,
        &s->st_filter_nth,
    };
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++) {
        sqlite3_finalize(*all[i]);
        *all[i] = NULL;
    }
}
