/*
 * backlog_fill — a spool holding a large backlog of pending deliveries, for
 * bench/backlog.sh (restart on a backlog: time to the first delivery, RSS).
 *
 *   backlog_fill --db PATH --count N [--users U] [--per-user]
 *                [--unmerged K] [--pruned] [--route R] [--app A]
 *
 * The schema is created by amp_spool_open itself (so it is the daemon's
 * own, migrations included); the rows are then inserted directly with
 * SQLite in one transaction, synchronous off (a benchmark fixture, not a
 * durability claim). Each row is what the daemon stores for one event of
 * the example route: a ~300-byte chat-messages body, user u-<i mod U>, a
 * unique dedupe key (also in the dedupe table, and counted as merged there:
 * dedupe_merged.upto is the last row, as the daemon's merge leaves it), due
 * now. --unmerged K leaves the last K rows' keys out of the dedupe table and
 * upto before them, as a crash before a merge does: the start then reads
 * them back from their rows. --per-user marks the rows per_user (one
 * conversation per user: the claim query then also checks each user's
 * order). --pruned then deletes every row but the last, as retention does
 * with delivered rows: an old spool, its dedupe table holding N keys, its
 * file the free pages of the deleted rows, new rows' ids after the last
 * (bench/oldspool.sh). Route and app default to "all-events" and
 * "assistant" (examples/amp2dify.json); the daemon must know them.
 *
 * Prints one line:
 * FILL rows=N users=U per_user=0|1 unmerged=K pruned=0|1 ms=T bytes=SIZE
 */
#include <sqlite3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "../base/alloc.h"
#include "../base/clock.h"
#include "../base/parse.h"
#include "../spool/spool.h"

static int usage(void) {
    fprintf(stderr, "usage: backlog_fill --db PATH --count N [--users U] [--per-user] "
                    "[--unmerged K] [--pruned] [--route R] [--app A]\n");
    return 2;
}

static int fail(sqlite3 *db, const char *what) {
    fprintf(stderr, "backlog_fill: %s: %s\n", what, db ? sqlite3_errmsg(db) : "out of memory");
    sqlite3_close(db);
    return 1;
}

/* Size of the database and its WAL, in bytes. */
static long long file_bytes(const char *path) {
    long long total = 0;
    const char *suffixes[] = {"", "-wal"};
    for (size_t i = 0; i < 2; i++) {
        char *p = amp_xasprintf("%s%s", path, suffixes[i]);
        struct stat st;
        if (stat(p, &st) == 0)
            total += (long long)st.st_size;
        free(p);
    }
    return total;
}

int main(int argc, char **argv) {
    const char *path = NULL, *route = "all-events", *app = "assistant";
    int64_t count = -1, users = 10000, unmerged = 0;
    bool per_user = false, pruned = false;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (strcmp(a, "--per-user") == 0) {
            per_user = true;
            continue;
        }
        if (strcmp(a, "--pruned") == 0) {
            pruned = true;
            continue;
        }
        if (!v)
            return usage();
        i++;
        if (strcmp(a, "--db") == 0)
            path = v;
        else if (strcmp(a, "--route") == 0)
            route = v;
        else if (strcmp(a, "--app") == 0)
            app = v;
        else if (strcmp(a, "--count") == 0) {
            if (amp_parse_i64(v, strlen(v), 1, 100000000, &count) != 0)
                return usage();
        } else if (strcmp(a, "--unmerged") == 0) {
            if (amp_parse_i64(v, strlen(v), 0, 100000000, &unmerged) != 0)
                return usage();
        } else if (strcmp(a, "--users") == 0) {
            if (amp_parse_i64(v, strlen(v), 1, 100000000, &users) != 0)
                return usage();
        } else {
            return usage();
        }
    }
    if (!path || count < 0 || unmerged > count)
        return usage();

    int64_t t0 = amp_mono_ms();
    char err[512];
    amp_spool_opts so = {.path = path, .dedupe_window_s = 604800};
    amp_queue *spool = amp_spool_open(&so, err, sizeof err);
    if (!spool) {
        fprintf(stderr, "backlog_fill: %s\n", err);
        return 1;
    }
    amp_queue_close(spool);

    sqlite3 *db = NULL;
    if (sqlite3_open_v2(path, &db, SQLITE_OPEN_READWRITE, NULL) != SQLITE_OK)
        return fail(db, "open");
    if (sqlite3_exec(db, "PRAGMA synchronous = OFF; PRAGMA cache_size = -65536; BEGIN IMMEDIATE",
                     NULL, NULL, NULL) != SQLITE_OK)
        return fail(db, "begin");
    sqlite3_stmt *ins = NULL, *key = NULL;
    if (sqlite3_prepare_v2(db,
                           "INSERT INTO deliveries(created_ms, schedule_ms, dedupe_key, route, "
                           "app, user, per_user, body, due_ms) "
                           "VALUES (?1, ?1, ?2, ?3, ?4, ?5, ?6, ?7, ?1)",
                           -1, &ins, NULL) != SQLITE_OK ||
        sqlite3_prepare_v2(db, "INSERT INTO dedupe(h, seen_ms, chk) VALUES (?1, ?2, ?3)", -1, &key,
                           NULL) != SQLITE_OK)
        return fail(db, "prepare");

    static const char *const types[] = {"Signed_Up", "Viewed_Page", "Started_Trial",
                                        "Upgraded_Plan", "Invited_Teammate"};
    int64_t now = amp_now_ms();
    char dkey[64], user[32], body[1024];
    for (int64_t i = 0; i < count; i++) {
        const char *type = types[i % 5];
        snprintf(dkey, sizeof dkey, "backlog-%lld", (long long)i);
        snprintf(user, sizeof user, "u-%lld", (long long)(i % users));
        snprintf(body, sizeof body,
                 "{\"inputs\":{\"event_type\":\"%s\",\"event_time\":\"2026-11-21T10:15:42.123Z\","
                 "\"event_properties\":{\"plan\":\"pro\",\"seats\":%lld},"
                 "\"user_properties\":{\"country\":\"DE\"}},"
                 "\"query\":\"Amplitude event %s from user %s; properties: "
                 "{\\\"plan\\\":\\\"pro\\\",\\\"seats\\\":%lld}\",\"user\":\"%s\","
                 "\"response_mode\":\"blocking\"}",
                 type, (long long)(i % 50), type, user, (long long)(i % 50), user);
        /* Rows stored over the last hour, oldest first, all due now. */
        int64_t created = now - 3600000 + i * 3600000 / count;
        sqlite3_bind_int64(ins, 1, created);
        sqlite3_bind_text(ins, 2, dkey, -1, SQLITE_STATIC);
        sqlite3_bind_text(ins, 3, route, -1, SQLITE_STATIC);
        sqlite3_bind_text(ins, 4, app, -1, SQLITE_STATIC);
        sqlite3_bind_text(ins, 5, user, -1, SQLITE_STATIC);
        sqlite3_bind_int(ins, 6, per_user);
        sqlite3_bind_text(ins, 7, body, -1, SQLITE_STATIC);
        if (sqlite3_step(ins) != SQLITE_DONE)
            return fail(db, "insert delivery");
        sqlite3_reset(ins);
        if (i >= count - unmerged)
            continue;
        int64_t chk, h = amp_spool_key_digest(dkey, &chk);
        sqlite3_bind_int64(key, 1, h);
        sqlite3_bind_int64(key, 2, created);
        sqlite3_bind_int64(key, 3, chk);
        if (sqlite3_step(key) != SQLITE_DONE)
            return fail(db, "insert dedupe key");
        sqlite3_reset(key);
    }
    sqlite3_finalize(ins);
    sqlite3_finalize(key);
    /* The keys before the unmerged tail are merged (ids run 1..count); fold
     * the WAL into the database, as a daemon that ran a while would. */
    char sql[256];
    snprintf(sql, sizeof sql,
             "UPDATE dedupe_merged SET upto = %lld; %s COMMIT; PRAGMA wal_checkpoint(TRUNCATE)",
             (long long)(count - unmerged),
             pruned ? "DELETE FROM deliveries WHERE id < (SELECT max(id) FROM deliveries);" : "");
    if (sqlite3_exec(db, sql, NULL, NULL, NULL) != SQLITE_OK)
        return fail(db, "commit");
    sqlite3_close(db);
    printf("FILL rows=%lld users=%lld per_user=%d unmerged=%lld pruned=%d ms=%lld bytes=%lld\n",
           (long long)count, (long long)(users < count ? users : count), per_user ? 1 : 0,
           (long long)unmerged, pruned ? 1 : 0, (long long)(amp_mono_ms() - t0), file_bytes(path));
    return 0;
}
