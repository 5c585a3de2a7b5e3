/*
 * spool_stat — what the delivery side of `make bench` did, read from the
 * spool of a running (or stopped) amp2dify, so run.sh needs neither the
 * sqlite3 command-line tool nor a metrics endpoint.
 *
 *   spool_stat --db PATH [--wait-drain SECONDS]
 *
 * --wait-drain polls (every 100 ms, at most SECONDS) until no delivery is
 * pending. Then it prints one line:
 *
 *   SPOOL pending=P delivered=D dead=X first_created_ms=A last_created_ms=B
 *         last_finished_ms=C drain_wait_ms=W lag_p50_ms=L lag_p99_ms=M
 *
 * lag is finished_ms - created_ms of delivered rows: how long an event sat
 * in the spool between its 202 and Dify's answer.
 *
 * It reads the deliveries table of spool/schema.c's schema (state 0 pending,
 * 1 delivered, 2 dead; created_ms and finished_ms in Unix milliseconds)
 * through a read-only connection; WAL mode lets it read while amp2dify
 * writes. A schema change there must be mirrored here.
 */
#include <sqlite3.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#include "../base/clock.h"
#include "../base/parse.h"

#define POLL_MS 100

static int query_i64(sqlite3 *db, const char *sql, int64_t *out) {
    sqlite3_stmt *st = NULL;
    int rc = sqlite3_prepare_v2(db, sql, -1, &st, NULL);
    if (rc == SQLITE_OK) {
        rc = sqlite3_step(st);
        if (rc == SQLITE_ROW) {
            *out = sqlite3_column_int64(st, 0);
            rc = SQLITE_OK;
        } else if (rc == SQLITE_DONE) {
            *out = 0;
            rc = SQLITE_OK;
        }
    }
    if (rc != SQLITE_OK)
        fprintf(stderr, "spool_stat: %s: %s\n", sql, sqlite3_errmsg(db));
    sqlite3_finalize(st);
    return rc == SQLITE_OK ? 0 : -1;
}

/* The q-quantile (0..1) of finished_ms - created_ms over delivered rows. */
static int lag_quantile(sqlite3 *db, int64_t delivered, double q, int64_t *out) {
    *out = 0;
    if (delivered <= 0)
        return 0;
    int64_t offset = (int64_t)(q * (double)(delivered - 1));
    char sql[256];
    snprintf(sql, sizeof sql,
             "SELECT finished_ms - created_ms AS lag FROM deliveries WHERE state = 1 "
             "ORDER BY lag LIMIT 1 OFFSET %lld",
             (long long)offset);
    return query_i64(db, sql, out);
}

static void sleep_ms(long ms) {
    struct timespec ts = {.tv_sec = ms / 1000, .tv_nsec = (ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

static int usage(void) {
    fprintf(stderr, "usage: spool_stat --db PATH [--wait-drain SECONDS]\n");
    return 2;
}

int main(int argc, char **argv) {
    const char *path = NULL;
    int64_t wait_s = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!v)
            return usage();
        i++;
        if (strcmp(a, "--db") == 0)
            path = v;
        else if (strcmp(a, "--wait-drain") == 0) {
            if (amp_parse_i64(v, strlen(v), 0, 3600, &wait_s) != 0)
                return usage();
        } else
            return usage();
    }
    if (!path)
        return usage();

    sqlite3 *db = NULL;
    if (sqlite3_open_v2(path, &db, SQLITE_OPEN_READONLY, NULL) != SQLITE_OK) {
        fprintf(stderr, "spool_stat: cannot open '%s': %s\n", path,
                db ? sqlite3_errmsg(db) : "out of memory");
        sqlite3_close(db);
        return 1;
    }
    sqlite3_busy_timeout(db, 2000);

    int rc = 1;
    int64_t pending = 0, delivered = 0, dead = 0, first_created = 0, last_created = 0;
    int64_t last_finished = 0, lag50 = 0, lag99 = 0;
    int64_t t0 = amp_mono_ms(), deadline = t0 + wait_s * 1000;
    for (;;) {
        if (query_i64(db, "SELECT count(*) FROM deliveries WHERE state = 0", &pending) != 0)
            goto out;
        if (pending == 0 || amp_mono_ms() >= deadline)
            break;
        sleep_ms(POLL_MS);
    }
    int64_t waited = amp_mono_ms() - t0;
    if (query_i64(db, "SELECT count(*) FROM deliveries WHERE state = 1", &delivered) ||
        query_i64(db, "SELECT count(*) FROM deliveries WHERE state = 2", &dead) ||
        query_i64(db, "SELECT coalesce(min(created_ms), 0) FROM deliveries", &first_created) ||
        query_i64(db, "SELECT coalesce(max(created_ms), 0) FROM deliveries", &last_created) ||
        query_i64(db, "SELECT coalesce(max(finished_ms), 0) FROM deliveries WHERE state = 1",
                  &last_finished) ||
        lag_quantile(db, delivered, 0.50, &lag50) || lag_quantile(db, delivered, 0.99, &lag99))
        goto out;
    printf("SPOOL pending=%lld delivered=%lld dead=%lld first_created_ms=%lld "
           "last_created_ms=%lld last_finished_ms=%lld drain_wait_ms=%lld lag_p50_ms=%lld "
           "lag_p99_ms=%lld\n",
           (long long)pending, (long long)delivered, (long long)dead, (long long)first_created,
           (long long)last_created, (long long)last_finished, (long long)waited, (long long)lag50,
           (long long)lag99);
    rc = 0;
out:
    sqlite3_close(db);
    return rc;
}
