/* Statistics and dead letters, on the reader connection: the parts of the
 * engine an admin handle (amp_spool_open_admin) has too. */
#include "spool_int.h"

#include <stdlib.h>
#include <string.h>

#include "../base/log.h"
#include "../base/clock.h"

int64_t amp_spool_oldest_pending_ms(void *e) {
    amp_spool *s = e;
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

int amp_spool_stats_get(void *e, amp_queue_stats *out) {
    amp_spool *s = e;
    memset(out, 0, sizeof *out);
    pthread_mutex_lock(&s->claim_mu);
    sqlite3_stmt *st = NULL;
    int rc = -1;
    if (sqlite3_prepare_v2(
            s->rdb,
            "SELECT (SELECT count(*) FROM deliveries WHERE state = 0),"
            " (SELECT count(*) FROM deliveries WHERE state = 1 AND state <> 0),"
            " (SELECT count(*) FROM deliveries WHERE state = 2 AND state <> 0),"
            " (SELECT count(*) FROM deliveries WHERE state = 3 AND state <> 0),"
            " (SELECT created_ms FROM deliveries WHERE state = 0 ORDER BY id LIMIT 1)",
            -1, &st, NULL) == SQLITE_OK &&
        sqlite3_step(st) == SQLITE_ROW) {
        out->pending = sqlite3_column_int64(st, 0);
        out->delivered = sqlite3_column_int64(st, 1);
        out->dead = sqlite3_column_int64(st, 2);
        out->waiting = sqlite3_column_int64(st, 3);
        out->oldest_pending_ms = sqlite3_column_int64(st, 4);
        rc = 0;
    }
    sqlite3_finalize(st);
    pthread_mutex_unlock(&s->claim_mu);
    return rc;
}

/* ---- the connection for operators ------------------------------------------
 * Dead letters and the admin API's lookups run on the engine's own admin
 * connection (adb, under admin_mu), so a long scan (the jobs per app of a
 * large backlog, a dead-letter list) or a wait for the write lock never
 * holds up the dispatcher's claims on the reader. An admin handle (`dlq`)
 * has no claims and no adb: it uses its reader. */

static sqlite3 *ops_lock(amp_spool *s) {
    if (s->adb) {
        pthread_mutex_lock(&s->admin_mu);
        return s->adb;
    }
    pthread_mutex_lock(&s->claim_mu);
    return s->rdb;
}

static void ops_unlock(amp_spool *s) {
    pthread_mutex_unlock(s->adb ? &s->admin_mu : &s->claim_mu);
}

/* ---- dead letters ---------------------------------------------------------
 * One WHERE clause serves list, replay and purge; unused filters are bound
 * as NULL / 0; "state <> 0" lets it use the index of finished rows. Runs on
 * the operators' connection (ops_lock; in a CLI process, or beside a running
 * daemon: SQLite's locking and the busy timeout serialise writers). */

#define DLQ_WHERE                                                                                  \
    " WHERE state = ?9 AND state <> 0 AND (?1 IS NULL OR route = ?1)"                              \
    " AND (?2 IS NULL OR app = ?2)"                                                                \
    " AND (?3 IS NULL OR last_code = ?3) AND (?4 = 0 OR last_status = ?4)"                         \
    " AND (?5 = 0 OR finished_ms >= ?5) AND (?6 = 0 OR finished_ms < ?6)"                          \
    " AND (?7 IS NULL OR id IN (SELECT value FROM json_each(?7)))"

static sqlite3_stmt *dlq_prepare(sqlite3 *db, const char *sql, const amp_queue_dlq_filter *f,
                                 char **ids_json) {
    sqlite3_stmt *st;
    *ids_json = NULL;
    if (sqlite3_prepare_v2(db, sql, -1, &st, NULL) != SQLITE_OK) {
        amp_log(AMP_LOG_ERROR, "spool query failed", "{s:s}", "error", sqlite3_errmsg(db));
        return NULL;
    }
    amp_spool_bind_text(st, 1, f->route);
    amp_spool_bind_text(st, 2, f->app);
    amp_spool_bind_text(st, 3, f->code);
    sqlite3_bind_int(st, 4, f->status);
    sqlite3_bind_int64(st, 5, f->since_ms);
    sqlite3_bind_int64(st, 6, f->until_ms);
    sqlite3_bind_int(st, 9, f->waiting ? 3 : 2); /* waiting for input, or dead */
    if (f->ids) {
        json_t *arr = json_array();
        for (size_t i = 0; i < f->nids; i++)
            json_array_append_new(arr, json_integer(f->ids[i]));
        *ids_json = json_dumps(arr, JSON_COMPACT);
        json_decref(arr);
        amp_spool_bind_text(st, 7, *ids_json);
    } else {
        sqlite3_bind_null(st, 7);
    }
    return st;
}

json_t *amp_spool_dlq_list(void *e, const amp_queue_dlq_filter *f, size_t limit) {
    amp_spool *s = e;
    char *ids;
    sqlite3 *db = ops_lock(s);
    sqlite3_stmt *st = dlq_prepare(
        db,
        "SELECT id, route, app, user, dedupe_key, last_status, last_code, last_message, "
        "attempts, created_ms, finished_ms, body, state, result FROM deliveries" DLQ_WHERE
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
            if (row && sqlite3_column_int(st, 12) == 3) {
                json_object_set_new(row, "state", json_string("waiting_input"));
                const char *res = (const char *)sqlite3_column_text(st, 13);
                json_t *rj = res ? json_loads(res, 0, NULL) : NULL;
                json_object_set_new(row, "result", rj ? rj : json_null());
            } else if (row) {
                json_object_set_new(row, "state", json_string("dead"));
            }
            if (row)
                json_array_append_new(rows, row);
        }
        if (rc != SQLITE_DONE) {
            amp_log(AMP_LOG_ERROR, "spool query failed", "{s:s}", "error", sqlite3_errmsg(db));
            json_decref(rows);
            rows = NULL;
        }
        sqlite3_finalize(st);
    }
    ops_unlock(s);
    free(ids);
    return rows;
}

/* Runs first (if not NULL), then sql, in one transaction; sql's changes,
 * or -1. */
static int64_t dlq_change(amp_spool *s, const char *first, const char *sql,
                          const amp_queue_dlq_filter *f) {
    int64_t n = -1;
    sqlite3 *db = ops_lock(s);
    bool ok = sqlite3_exec(db, "BEGIN IMMEDIATE", NULL, NULL, NULL) == SQLITE_OK;
    const char *steps[] = {first, sql};
    for (size_t i = 0; ok && i < 2; i++) {
        if (!steps[i])
            continue;
        char *ids;
        sqlite3_stmt *st = dlq_prepare(db, steps[i], f, &ids);
        ok = st != NULL;
        if (ok) {
            sqlite3_bind_int64(st, 8, amp_now_ms());
            ok = sqlite3_step(st) == SQLITE_DONE;
            n = ok ? sqlite3_changes(db) : -1;
        }
        sqlite3_finalize(st);
        free(ids);
    }
    ok = ok && sqlite3_exec(db, "COMMIT", NULL, NULL, NULL) == SQLITE_OK;
    if (!ok) {
        amp_log(AMP_LOG_ERROR, "spool update failed", "{s:s}", "error", sqlite3_errmsg(db));
        if (!sqlite3_get_autocommit(db))
            sqlite3_exec(db, "ROLLBACK", NULL, NULL, NULL);
        n = -1;
    }
    ops_unlock(s);
    return n;
}

int64_t amp_spool_dlq_replay(void *e, const amp_queue_dlq_filter *f) {
    amp_spool *s = e;
    int64_t n = dlq_change(s, NULL,
                           "UPDATE deliveries SET state = 0, attempts = 0, due_ms = ?8, "
                           "schedule_ms = ?8, finished_ms = NULL, result = NULL" DLQ_WHERE,
                           f);
    if (n > 0)
        amp_spool_notify_waiter(s);
    return n;
}

int64_t amp_spool_dlq_purge(void *e, const amp_queue_dlq_filter *f) {
    amp_spool *s = e;
    /* ?8 is bound by dlq_change; "?8 > 0" keeps it used and always true.
     * Rows after dedupe_merged.upto hold their events' recent dedupe keys
     * (schema v7): those keys go to dedupe_recent first, so that a purge
     * does not make the event new again. */
    return dlq_change(s,
                      "INSERT INTO dedupe_recent(h, seen_ms, chk) SELECT amp_key_hash(dedupe_key), "
                      "max(created_ms), amp_key_check(dedupe_key) FROM deliveries" DLQ_WHERE
                      " AND ?8 > 0 AND dedupe_key IS NOT NULL"
                      " AND id > (SELECT upto FROM dedupe_merged) GROUP BY dedupe_key",
                      "DELETE FROM deliveries" DLQ_WHERE " AND ?8 > 0", f);
}

/* ---- operators ------------------------------------------------------------ */

static const char *state_name(int state) {
    return state == STATE_PENDING ? "pending" : state == STATE_DELIVERED ? "delivered" : "dead";
}

/* Column i as a JSON value: null, an integer or a string. */
static json_t *column(sqlite3_stmt *st, int i) {
    switch (sqlite3_column_type(st, i)) {
    case SQLITE_NULL:
        return json_null();
    case SQLITE_INTEGER:
        return json_integer((json_int_t)sqlite3_column_int64(st, i));
    default: {
        const char *t = (const char *)sqlite3_column_text(st, i);
        return t ? json_string(t) : json_null();
    }
    }
}

/* Rows one event may fan out to (one per route) that a lookup reads. */
#define EVENT_ROWS_MAX 4096

/* The dedupe row (schema v3; since v5 found by the key's hash, in
 * dedupe_recent, dedupe or, since v8, a run of dedupe_runs, the latest
 * sighting with the key's check too,
 * so another key with the same hash never answers for it; the key itself is checked
 * against the rows' dedupe_key; since v7 also the rows after
 * dedupe_merged.upto, whose keys are not merged yet, when dedupe is on)
 * gives the id of the event's first row; its
 * rows follow it (one committer inserts them one after the other). The
 * answer excerpt is cut by substr(), which counts characters, so a UTF-8
 * sequence is never split. */
json_t *amp_spool_event(void *e, const char *dedupe_key, size_t answer_chars) {
    amp_spool *s = e;
    sqlite3 *db = ops_lock(s);
    json_t *out = NULL, *jobs = json_array();
    json_t *seen = json_null();
    int64_t first = 0;
    sqlite3_stmt *st = NULL;
    int rc =
        sqlite3_prepare_v2(db,
                           "SELECT seen_ms, first_id FROM dedupe_recent WHERE h = ?1 AND chk = ?2 "
                           "UNION ALL SELECT seen_ms, first_id FROM dedupe "
                           "WHERE h = ?1 AND chk = ?2 "
                           "UNION ALL SELECT seen_ms, first_id FROM dedupe_runs "
                           "WHERE seg IN (SELECT seg FROM dedupe_segs) AND h = ?1 AND chk = ?2 "
                           "UNION ALL SELECT created_ms, min(id) FROM deliveries "
                           "WHERE ?4 AND id > (SELECT upto FROM dedupe_merged) "
                           "AND dedupe_key = ?3 "
                           "GROUP BY created_ms "
                           "ORDER BY 1 DESC LIMIT 1",
                           -1, &st, NULL);
    if (rc == SQLITE_OK) {
        int64_t check = 0, h = dedupe_key ? amp_spool_key_digest(dedupe_key, &check) : 0;
        sqlite3_bind_int64(st, 1, h);
        sqlite3_bind_int64(st, 2, check);
        amp_spool_bind_text(st, 3, dedupe_key);
        sqlite3_bind_int(st, 4, s->dedupe_window_ms > 0);
        rc = sqlite3_step(st);
        if (rc == SQLITE_ROW) {
            json_decref(seen);
            seen = json_integer((json_int_t)sqlite3_column_int64(st, 0));
            first = sqlite3_column_int64(st, 1); /* 0 (NULL): stored before v3 */
            rc = SQLITE_DONE;
        }
    }
    sqlite3_finalize(st);
    st = NULL;
    if (rc == SQLITE_DONE && first > 0)
        rc = sqlite3_prepare_v2(
            db,
            "SELECT d.id, d.route, d.app, d.user, d.state, d.attempts, d.last_status, d.last_code,"
            " d.last_message, d.created_ms, d.due_ms, d.finished_ms,"
            " substr(coalesce(json_extract(d.result, '$.answer'),"
            "   json_extract(d.result, '$.outputs')), 1, ?2),"
            " coalesce(json_extract(d.result, '$.conversation_id'), c.conversation_id)"
            " FROM deliveries d LEFT JOIN conversations c"
            "   ON d.per_user AND c.app = d.app AND c.user = d.user"
            " WHERE d.id BETWEEN ?3 AND ?3 + " AMP_STR(
                EVENT_ROWS_MAX) " - 1"
                                " AND d.dedupe_key = ?1 ORDER BY d.id",
            -1, &st, NULL);
    if (rc == SQLITE_OK && st) {
        amp_spool_bind_text(st, 1, dedupe_key);
        sqlite3_bind_int64(st, 2,
                           (sqlite3_int64)(answer_chars > INT32_MAX ? INT32_MAX : answer_chars));
        sqlite3_bind_int64(st, 3, first);
        while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
            int state = sqlite3_column_int(st, 4);
            json_t *job = json_pack(
                "{s:I, s:i, s:o, s:o, s:o, s:s, s:i, s:o, s:o, s:o, s:o, s:o, s:o, s:o, s:o}", "id",
                (json_int_t)sqlite3_column_int64(st, 0), "shard", 0, "route", column(st, 1), "app",
                column(st, 2), "user", column(st, 3), "state", state_name(state), "attempts",
                sqlite3_column_int(st, 5), "last_status", column(st, 6), "last_code", column(st, 7),
                "last_message", column(st, 8), "created_ms", column(st, 9), "due_ms",
                state == STATE_PENDING ? column(st, 10) : json_null(), "finished_ms",
                column(st, 11), "answer", column(st, 12), "conversation_id", column(st, 13));
            if (job)
                json_array_append_new(jobs, job);
        }
    }
    if (rc == SQLITE_DONE) {
        out = json_pack("{s:o, s:O}", "seen_ms", seen, "jobs", jobs);
    } else {
        amp_log(AMP_LOG_ERROR, "spool query failed", "{s:s}", "error", sqlite3_errmsg(db));
        json_decref(seen);
    }
    sqlite3_finalize(st);
    ops_unlock(s);
    json_decref(jobs);
    return out;
}

json_t *amp_spool_app_depths(void *e) {
    amp_spool *s = e;
    sqlite3 *db = ops_lock(s);
    sqlite3_stmt *st = NULL;
    json_t *out = NULL;
    int rc = sqlite3_prepare_v2(
        db,
        "SELECT app, sum(state = 0), sum(state = 2), coalesce(min(CASE WHEN state = 0 THEN"
        " created_ms END), 0) FROM deliveries WHERE state <> 1 GROUP BY app ORDER BY app",
        -1, &st, NULL);
    if (rc == SQLITE_OK) {
        out = json_object();
        while ((rc = sqlite3_step(st)) == SQLITE_ROW)
            json_object_set_new(
                out, (const char *)sqlite3_column_text(st, 0),
                json_pack("{s:I, s:I, s:I}", "pending", (json_int_t)sqlite3_column_int64(st, 1),
                          "dead", (json_int_t)sqlite3_column_int64(st, 2), "oldest_pending_ms",
                          (json_int_t)sqlite3_column_int64(st, 3)));
    }
    if (rc != SQLITE_DONE) {
        amp_log(AMP_LOG_ERROR, "spool query failed", "{s:s}", "error", sqlite3_errmsg(db));
        json_decref(out);
        out = NULL;
    }
    sqlite3_finalize(st);
    ops_unlock(s);
    return out;
}
