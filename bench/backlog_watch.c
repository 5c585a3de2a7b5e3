/*
 * backlog_watch — the figures of bench/backlog.sh, taken while amp2dify
 * starts on a large backlog.
 *
 *   backlog_watch --db PATH --pid PID --start-ms T0 [--sample-after-ms 5000]
 *                 [--timeout-s 30]
 *
 * Polls the spool (read-only, every 2 ms) until a row is marked delivered:
 * its finished_ms is when the daemon committed the acknowledgement of Dify's
 * answer, so finished_ms - T0 (T0: the daemon's start, Unix ms) bounds the
 * time to the first delivery from above. Then, at T0 + sample-after-ms, it
 * reads VmRSS and VmHWM of PID from /proc and counts the delivered rows.
 * Prints one line:
 *
 *   WATCH first_delivery_ms=F delivered=N sample_ms=S vmrss_kb=R vmhwm_kb=H
 *
 * F is -1 when nothing was delivered within the timeout (exit status 1),
 * and R and H are -1 when PID is gone. Mirrors spool/schema.c's schema
 * (state 1 = delivered, finished_ms); a change there must be mirrored here.
 */
#include <sqlite3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "../base/clock.h"
#include "../base/parse.h"

#define POLL_MS 2

static void sleep_ms(long ms) {
    struct timespec ts = {.tv_sec = ms / 1000, .tv_nsec = (ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

static int usage(void) {
    fprintf(stderr, "usage: backlog_watch --db PATH --pid PID --start-ms T0 "
                    "[--sample-after-ms MS] [--timeout-s S]\n");
    return 2;
}

/* One integer from sql; def when the result is NULL or the query fails. */
static int64_t query_i64(sqlite3_stmt *st, int64_t def) {
    int64_t v = def;
    if (sqlite3_step(st) == SQLITE_ROW && sqlite3_column_type(st, 0) != SQLITE_NULL)
        v = sqlite3_column_int64(st, 0);
    sqlite3_reset(st);
    return v;
}

/* "VmRSS:   1234 kB" -> 1234; -1 when the process or the line is missing. */
static void read_mem(long pid, int64_t *rss_kb, int64_t *hwm_kb) {
    *rss_kb = *hwm_kb = -1;
    char path[64], line[256];
    snprintf(path, sizeof path, "/proc/%ld/status", pid);
    FILE *fp = fopen(path, "r");
    if (!fp)
        return;
    while (fgets(line, sizeof line, fp)) {
        int64_t *dst = strncmp(line, "VmRSS:", 6) == 0   ? rss_kb
                       : strncmp(line, "VmHWM:", 6) == 0 ? hwm_kb
                                                         : NULL;
        if (!dst)
            continue;
        const char *p = line + 6;
        while (*p == ' ' || *p == '\t')
            p++;
        size_t n = strspn(p, "0123456789");
        if (amp_parse_i64(p, n, 0, INT64_MAX, dst) != 0)
            *dst = -1;
    }
    fclose(fp);
}

int main(int argc, char **argv) {
    const char *path = NULL;
    int64_t pid = 0, start_ms = 0, sample_after = 5000, timeout_s = 30;
    if (argc % 2 == 0)
        return usage(); /* options come in pairs */
    for (int i = 1; i + 1 < argc; i += 2) {
        const char *a = argv[i], *v = argv[i + 1];
        int64_t *dst = strcmp(a, "--pid") == 0               ? &pid
                       : strcmp(a, "--start-ms") == 0        ? &start_ms
                       : strcmp(a, "--sample-after-ms") == 0 ? &sample_after
                       : strcmp(a, "--timeout-s") == 0       ? &timeout_s
                                                             : NULL;
        if (strcmp(a, "--db") == 0)
            path = v;
        else if (!dst || amp_parse_i64(v, strlen(v), 0, INT64_MAX, dst) != 0)
            return usage();
    }
    if (!path || pid <= 0 || start_ms <= 0)
        return usage();

    sqlite3 *db = NULL;
    sqlite3_stmt *first = NULL, *count = NULL;
    /* "state <> 0" lets SQLite use the partial index of finished rows. */
    if (sqlite3_open_v2(path, &db, SQLITE_OPEN_READONLY, NULL) != SQLITE_OK ||
        sqlite3_prepare_v2(db,
                           "SELECT min(finished_ms) FROM deliveries WHERE state = 1 AND "
                           "state <> 0",
                           -1, &first, NULL) != SQLITE_OK ||
        sqlite3_prepare_v2(db, "SELECT count(*) FROM deliveries WHERE state = 1 AND state <> 0", -1,
                           &count, NULL) != SQLITE_OK) {
        fprintf(stderr, "backlog_watch: %s: %s\n", path, db ? sqlite3_errmsg(db) : "no memory");
        sqlite3_close(db);
        return 1;
    }
    sqlite3_busy_timeout(db, 1000);

    int64_t first_ms = -1, deadline = amp_mono_ms() + timeout_s * 1000;
    while (amp_mono_ms() < deadline) {
        int64_t f = query_i64(first, -1);
        if (f > 0) {
            first_ms = f - start_ms;
            break;
        }
        sleep_ms(POLL_MS);
    }
    int64_t wait = start_ms + sample_after - amp_now_ms();
    if (wait > 0)
        sleep_ms((long)wait);
    int64_t rss, hwm;
    read_mem((long)pid, &rss, &hwm);
    int64_t sample_ms = amp_now_ms() - start_ms;
    int64_t delivered = query_i64(count, 0);
    sqlite3_finalize(first);
    sqlite3_finalize(count);
    sqlite3_close(db);
    printf("WATCH first_delivery_ms=%lld delivered=%lld sample_ms=%lld vmrss_kb=%lld "
           "vmhwm_kb=%lld\n",
           (long long)first_ms, (long long)delivered, (long long)sample_ms, (long long)rss,
           (long long)hwm);
    return first_ms >= 0 ? 0 : 1;
}
