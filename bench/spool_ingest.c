/*
 * spool_ingest — the spool's CPU per stored event and per delivery, without
 * HTTP, and a plain SQLite client as the reference.
 *
 *   spool_ingest --dir DIR [--events N] [--inflight K] [--body BYTES]
 *                [--dedupe-s SECONDS] [--claim-window W] [--claim-batch B]
 *                [--mode spool|sqlite|journal]
 *
 * spool (the default): opens a spool in DIR (spool.sync "full", dedupe over
 * 7 days unless --dedupe-s says otherwise; 0: none) and submits N one-event requests (random
 * UUID-shaped insert_id, one ~BYTES-byte Dify body, 10,000 users), keeping K of them in flight as K
 * HTTP connections would. Then it delivers them as a dispatcher does: up to W rows (80) claimed
 * at a time, claims of at least B rows (8), the oldest B rows acknowledged DELIVERED (with a
 * ~200-byte result) each round, until every row is acknowledged. (80 and 8 were amp2dify's at 64
 * workers until it kept 2 rows queued per worker; they stay the defaults so that runs compare
 * with earlier ones. Today's dispatcher at 64 workers: --claim-window 192 --claim-batch 64.)
 * The spool threads (amp-commit, amp-sync, amp-checkpoint) are measured from /proc (schedstat:
 * nanoseconds on CPU); claims on this thread with CLOCK_THREAD_CPUTIME_ID. Prints:
 *
 *   SPOOL_INGEST events=N stored=S us_per_event=E commit=C sync=Y checkpoint=K wall_ms=W
 *   SPOOL_DELIVER deliveries=D us_per_delivery=T claim=A ack=B wall_ms=W
 *
 * sqlite: the reference the note compares with, a plain SQLite client: one
 * table (id INTEGER PRIMARY KEY, body TEXT), WAL, synchronous FULL (one
 * fsync of the log per commit), N rows of the same body in transactions of
 * 64, on this thread. Prints:
 *
 *   SQLITE_INSERT rows=N us_per_row=R wall_ms=W
 *
 * journal: a measurement of a design the spool does not have (issue 19's
 * proposal), on this thread: the request body goes only to an append-only
 * journal (one pwritev of the group's records and one fdatasync per 64
 * rows, into a file written and synced beforehand, as a recycled segment
 * would be), and SQLite keeps a compact index row per event (times, app,
 * user, the record's offset and length, the key's hash; the spool's two
 * partial indexes on pending rows) plus a dedupe row, written every 1,024
 * rows in one transaction with synchronous NORMAL (no sync per commit, only
 * around checkpoints, so the index file stays consistent after a power
 * cut): the journal is what makes an event durable, and its tail would
 * rebuild the index's last commits after a crash.
 * Each key is hashed (SHA-256) and looked up in the dedupe table first, as
 * the spool does. Prints the CPU per row, split into the journal's part and
 * the index's part:
 *
 *   JOURNAL_INGEST rows=N us_per_row=R journal=J index=I wall_ms=W
 */
#include <dirent.h>
#include <fcntl.h>
#include <openssl/sha.h>
#include <pthread.h>
#include <sqlite3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include "../base/alloc.h"
#include "../base/clock.h"
#include "../base/parse.h"
#include "../spool/spool.h"

static int usage(void) {
    fprintf(stderr, "usage: spool_ingest --dir DIR [--events N] [--inflight K] [--body BYTES] "
                    "[--dedupe-s SECONDS] [--claim-window W] [--claim-batch B] "
                    "[--mode spool|sqlite|journal]\n");
    return 2;
}

/* CPU nanoseconds of this process's threads whose name starts with prefix. */
static int64_t threads_cpu_ns(const char *prefix) {
    DIR *d = opendir("/proc/self/task");
    int64_t total = 0;
    struct dirent *e;
    while (d && (e = readdir(d))) {
        if (e->d_name[0] == '.')
            continue;
        char path[300], comm[64] = "";
        snprintf(path, sizeof path, "/proc/self/task/%s/comm", e->d_name);
        FILE *f = fopen(path, "r");
        if (!f)
            continue;
        if (!fgets(comm, sizeof comm, f))
            comm[0] = 0;
        fclose(f);
        if (strncmp(comm, prefix, strlen(prefix)) != 0)
            continue;
        snprintf(path, sizeof path, "/proc/self/task/%s/schedstat", e->d_name);
        f = fopen(path, "r");
        long long ns = 0;
        if (f && fscanf(f, "%lld", &ns) == 1)
            total += ns;
        if (f)
            fclose(f);
    }
    if (d)
        closedir(d);
    return total;
}

static int64_t thread_cpu_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static uint64_t rng = 0x9E3779B97F4A7C15ull;
static uint64_t next_rand(void) {
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return rng;
}

#define KEY_BYTES 40 /* a UUID-shaped insert_id and its terminator, with room */

/* A random UUID-shaped insert_id, as the SDKs send them. */
static void make_key(char out[KEY_BYTES]) {
    uint64_t a = next_rand(), b = next_rand();
    snprintf(out, KEY_BYTES, "%08x-%04x-%04x-%04x-%012llx", (unsigned)(a >> 32),
             (unsigned)(a >> 16) & 0xffff, (unsigned)a & 0xffff, (unsigned)(b >> 48),
             (unsigned long long)(b & 0xffffffffffffull));
}

/* A Dify chat-messages body of about bytes bytes for event i. */
static void make_body(char *out, size_t cap, size_t bytes, int64_t i, const char *user) {
    int n = snprintf(out, cap,
                     "{\"inputs\":{\"event_type\":\"Viewed_Page\",\"event_time\":"
                     "\"2026-11-21T10:15:42.123Z\",\"event_properties\":{\"seq\":%lld,"
                     "\"pad\":\"",
                     (long long)i);
    size_t tail = strlen("\"}},\"query\":\"event\",\"user\":\"\",\"response_mode\":\"blocking\"}") +
                  strlen(user);
    while ((size_t)n + tail < bytes && (size_t)n + 1 < cap)
        out[n++] = (char)('a' + next_rand() % 26);
    snprintf(out + n, cap - (size_t)n,
             "\"}},\"query\":\"event\",\"user\":\"%s\",\"response_mode\":\"blocking\"}", user);
}

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cond = PTHREAD_COND_INITIALIZER;
static int64_t in_flight, answered, stored, failed;

static void done(void *ctx, const amp_queue_result *res) {
    (void)ctx;
    pthread_mutex_lock(&mu);
    in_flight--;
    answered++;
    stored += res->accepted;
    failed += res->status != 0;
    pthread_cond_signal(&cond);
    pthread_mutex_unlock(&mu);
}

static int run_spool(const char *dir, int64_t events, int64_t inflight, size_t bytes,
                     int64_t dedupe_s, int64_t window, int64_t batch) {
    char *path = amp_xasprintf("%s/spool.db", dir), err[512];
    amp_spool_opts so = {.path = path, .dedupe_window_s = dedupe_s};
    amp_queue *q = amp_spool_open(&so, err, sizeof err);
    if (!q) {
        fprintf(stderr, "spool_ingest: %s\n", err);
        return 1;
    }
    char *body = amp_xmalloc(bytes + 256);
    int64_t c0 = threads_cpu_ns("amp-commit"), y0 = threads_cpu_ns("amp-sync"),
            k0 = threads_cpu_ns("amp-checkpoint"), t0 = amp_mono_ms();
    for (int64_t i = 0; i < events; i++) {
        pthread_mutex_lock(&mu);
        while (in_flight >= inflight)
            pthread_cond_wait(&cond, &mu);
        in_flight++;
        pthread_mutex_unlock(&mu);
        char key[KEY_BYTES], user[32];
        make_key(key);
        snprintf(user, sizeof user, "u-%lld", (long long)(next_rand() % 10000));
        make_body(body, bytes + 256, bytes, i, user);
        amp_queue_batch *eb = amp_queue_batch_create();
        amp_queue_batch_event(eb, key);
        amp_queue_batch_request(eb, "all-events", "assistant", user, false, body);
        amp_queue_submit(q, eb, done, NULL);
    }
    pthread_mutex_lock(&mu);
    while (in_flight > 0)
        pthread_cond_wait(&cond, &mu);
    pthread_mutex_unlock(&mu);
    int64_t c1 = threads_cpu_ns("amp-commit"), y1 = threads_cpu_ns("amp-sync"),
            k1 = threads_cpu_ns("amp-checkpoint"), t1 = amp_mono_ms();
    double per = stored ? 1e-3 / (double)stored : 0;
    printf("SPOOL_INGEST events=%lld stored=%lld failed=%lld us_per_event=%.2f commit=%.2f "
           "sync=%.2f checkpoint=%.2f wall_ms=%lld\n",
           (long long)events, (long long)stored, (long long)failed,
           (double)(c1 - c0 + y1 - y0 + k1 - k0) * per, (double)(c1 - c0) * per,
           (double)(y1 - y0) * per, (double)(k1 - k0) * per, (long long)(t1 - t0));

    /* Deliver everything: claim, acknowledge, as the dispatcher does. */
    static const char result[] =
        "{\"event\":\"message\",\"message_id\":\"9da23599-e713-473b-982c-4328d4f5c78a\","
        "\"conversation_id\":\"45701982-8118-4bc5-8e9b-64562b4555f2\",\"mode\":\"chat\","
        "\"answer\":\"ok\",\"created_at\":1705407629}";
    int64_t claim_ns = 0, deliveries = 0;
    c0 = threads_cpu_ns("amp-commit"), y0 = threads_cpu_ns("amp-sync"),
    k0 = threads_cpu_ns("amp-checkpoint"), t0 = amp_mono_ms();
    /* As the dispatcher: up to `window` rows claimed at once, claims of at
     * least `batch` rows, the oldest `batch` finished (acknowledged) each
     * round. */
    int64_t *ring = amp_xcalloc((size_t)window, sizeof *ring), head = 0, held = 0;
    amp_queue_job **jobs = amp_xcalloc((size_t)window, sizeof *jobs);
    for (int idle = 0; idle < 200;) {
        int n = 0;
        if (window - held >= batch) {
            int64_t next_due, a = thread_cpu_ns();
            n = amp_queue_claim(q, amp_now_ms(), jobs, (size_t)(window - held), &next_due);
            claim_ns += thread_cpu_ns() - a;
            for (int i = 0; i < n; i++) {
                ring[(head + held++) % window] = jobs[i]->id;
                amp_queue_job_free(jobs[i]);
            }
        }
        if (n <= 0 && held == 0) {
            if (deliveries >= stored)
                break;
            idle++;
            amp_queue_flush(q); /* acknowledged rows come back unclaimed */
            continue;
        }
        idle = 0;
        for (int64_t i = 0; i < batch && held > 0; i++, held--, head = (head + 1) % window) {
            amp_queue_ack ack = {.id = ring[head],
                                 .kind = AMP_QUEUE_ACK_DELIVERED,
                                 .http_status = 200,
                                 .result_json = result};
            amp_queue_acknowledge(q, &ack);
            deliveries++;
        }
    }
    free(ring);
    free(jobs);
    amp_queue_flush(q);
    c1 = threads_cpu_ns("amp-commit"), y1 = threads_cpu_ns("amp-sync"),
    k1 = threads_cpu_ns("amp-checkpoint"), t1 = amp_mono_ms();
    per = deliveries ? 1e-3 / (double)deliveries : 0;
    printf("SPOOL_DELIVER deliveries=%lld us_per_delivery=%.2f claim=%.2f ack=%.2f wall_ms=%lld\n",
           (long long)deliveries, (double)(claim_ns + c1 - c0 + y1 - y0 + k1 - k0) * per,
           (double)claim_ns * per, (double)(c1 - c0 + y1 - y0 + k1 - k0) * per,
           (long long)(t1 - t0));
    amp_queue_close(q);
    free(body);
    free(path);
    return failed || deliveries != stored ? 1 : 0;
}

static int run_sqlite(const char *dir, int64_t rows, size_t bytes) {
    char *path = amp_xasprintf("%s/plain.db", dir);
    sqlite3 *db = NULL;
    sqlite3_stmt *ins = NULL;
    int ok = sqlite3_open(path, &db) == SQLITE_OK &&
             sqlite3_exec(db,
                          "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; "
                          "CREATE TABLE t (id INTEGER PRIMARY KEY, body TEXT NOT NULL)",
                          NULL, NULL, NULL) == SQLITE_OK &&
             sqlite3_prepare_v2(db, "INSERT INTO t(body) VALUES (?1)", -1, &ins, NULL) == SQLITE_OK;
    char *body = amp_xmalloc(bytes + 256);
    int64_t c0 = thread_cpu_ns(), t0 = amp_mono_ms();
    for (int64_t i = 0; ok && i < rows; i++) {
        if (i % 64 == 0)
            ok = sqlite3_exec(db, "BEGIN", NULL, NULL, NULL) == SQLITE_OK;
        make_body(body, bytes + 256, bytes, i, "u-1");
        sqlite3_bind_text(ins, 1, body, -1, SQLITE_STATIC);
        ok = ok && sqlite3_step(ins) == SQLITE_DONE;
        sqlite3_reset(ins);
        if (ok && (i % 64 == 63 || i == rows - 1))
            ok = sqlite3_exec(db, "COMMIT", NULL, NULL, NULL) == SQLITE_OK;
    }
    int64_t c1 = thread_cpu_ns(), t1 = amp_mono_ms();
    if (!ok)
        fprintf(stderr, "spool_ingest: sqlite: %s\n", sqlite3_errmsg(db));
    else
        printf("SQLITE_INSERT rows=%lld us_per_row=%.2f wall_ms=%lld\n", (long long)rows,
               (double)(c1 - c0) / 1e3 / (double)rows, (long long)(t1 - t0));
    sqlite3_finalize(ins);
    sqlite3_close(db);
    free(body);
    free(path);
    return ok ? 0 : 1;
}

#define JOURNAL_GROUP 64   /* records per pwritev + fdatasync */
#define JOURNAL_INDEX 1024 /* rows per index transaction */
#define JOURNAL_HEADER 24  /* a record's id, length and key hash */

/* Writes and syncs size zero bytes to path, as a recycled journal segment;
 * returns the descriptor or -1. */
static int journal_segment(const char *path, size_t size) {
    int fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0600);
    char zero[65536] = {0};
    for (size_t off = 0; fd >= 0 && off < size; off += sizeof zero)
        if (pwrite(fd, zero, sizeof zero, (off_t)off) != (ssize_t)sizeof zero) {
            close(fd);
            fd = -1;
        }
    if (fd >= 0 && fsync(fd) != 0) {
        close(fd);
        fd = -1;
    }
    return fd;
}

static int run_journal(const char *dir, int64_t rows, size_t bytes) {
    char *jpath = amp_xasprintf("%s/journal", dir), *dbpath = amp_xasprintf("%s/index.db", dir);
    size_t rec_cap = bytes + 256;
    int fd = journal_segment(jpath, (size_t)rows * (rec_cap + JOURNAL_HEADER) + 65536);
    sqlite3 *db = NULL;
    sqlite3_stmt *find = NULL, *ins = NULL, *recent = NULL;
    int ok =
        fd >= 0 && sqlite3_open(dbpath, &db) == SQLITE_OK &&
        sqlite3_exec(db,
                     "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; "
                     "CREATE TABLE events (id INTEGER PRIMARY KEY, created_ms INTEGER, "
                     "  due_ms INTEGER, app TEXT, user TEXT, per_user INTEGER, "
                     "  state INTEGER DEFAULT 0, attempts INTEGER DEFAULT 0, "
                     "  jofs INTEGER, jlen INTEGER, h INTEGER);"
                     "CREATE INDEX events_due ON events(due_ms, id) WHERE state = 0;"
                     "CREATE INDEX events_pending ON events(id) WHERE state = 0;"
                     "CREATE TABLE dedupe (h INTEGER PRIMARY KEY, seen_ms INTEGER, chk INTEGER);"
                     "CREATE TABLE recent (id INTEGER PRIMARY KEY, h INTEGER, seen_ms INTEGER,"
                     "  chk INTEGER);",
                     NULL, NULL, NULL) == SQLITE_OK &&
        sqlite3_prepare_v2(db, "SELECT chk FROM dedupe WHERE h = ?1", -1, &find, NULL) ==
            SQLITE_OK &&
        sqlite3_prepare_v2(db,
                           "INSERT INTO events(id, created_ms, due_ms, app, user, per_user, "
                           "jofs, jlen, h) VALUES (?1, ?2, ?2, 'assistant', ?3, 0, ?4, ?5, ?6)",
                           -1, &ins, NULL) == SQLITE_OK &&
        sqlite3_prepare_v2(db, "INSERT INTO recent(h, seen_ms, chk) VALUES (?1, ?2, ?3)", -1,
                           &recent, NULL) == SQLITE_OK;
    bool set_up = ok;
    if (!set_up)
        fprintf(stderr, "spool_ingest: journal: %s\n",
                fd < 0 ? "cannot write the journal segment" : sqlite3_errmsg(db));
    /* What the index rows of the current transaction need. */
    typedef struct {
        char user[32];
        int64_t ofs, len, h, chk;
    } index_row;
    index_row *meta = amp_xcalloc(JOURNAL_INDEX, sizeof *meta);
    char *recs = amp_xmalloc((size_t)JOURNAL_GROUP * (rec_cap + JOURNAL_HEADER));
    struct iovec iov[JOURNAL_GROUP];
    int64_t journal_ns = 0, index_ns = 0, off = 0, now = amp_now_ms();
    int64_t t0 = amp_mono_ms();
    char(*keys)[KEY_BYTES] = amp_xcalloc(JOURNAL_GROUP, sizeof *keys);
    for (int64_t i = 0; ok && i < rows;) {
        /* The group's requests, made outside the measured CPU (the spool
         * mode makes them on another thread than those it measures). */
        int64_t n = rows - i < JOURNAL_GROUP ? rows - i : JOURNAL_GROUP, group_off = off;
        for (int64_t k = 0; k < n; k++) {
            index_row *m = &meta[(i + k) % JOURNAL_INDEX];
            make_key(keys[k]);
            snprintf(m->user, sizeof m->user, "u-%lld", (long long)(next_rand() % 10000));
            make_body(recs + (size_t)k * (rec_cap + JOURNAL_HEADER) + JOURNAL_HEADER, rec_cap,
                      bytes, i + k, m->user);
        }
        int64_t c0 = thread_cpu_ns();
        for (int64_t k = 0; ok && k < n; k++, i++) {
            char *rec = recs + (size_t)k * (rec_cap + JOURNAL_HEADER);
            unsigned char md[SHA256_DIGEST_LENGTH];
            SHA256((const unsigned char *)keys[k], strlen(keys[k]), md);
            index_row *m = &meta[i % JOURNAL_INDEX];
            memcpy(&m->h, md, sizeof m->h);
            memcpy(&m->chk, md + 8, sizeof m->chk);
            sqlite3_bind_int64(find, 1, m->h);
            ok = sqlite3_step(find) == SQLITE_DONE; /* a new key */
            sqlite3_reset(find);
            int64_t id = i + 1;
            m->len = (int64_t)strlen(rec + JOURNAL_HEADER);
            m->ofs = off;
            memcpy(rec, &id, 8);
            memcpy(rec + 8, &m->len, 8);
            memcpy(rec + 16, &m->h, 8);
            iov[k] = (struct iovec){rec, (size_t)(JOURNAL_HEADER + m->len)};
            off += JOURNAL_HEADER + m->len;
        }
        if (ok && (pwritev(fd, iov, (int)n, (off_t)group_off) != (ssize_t)(off - group_off) ||
                   fdatasync(fd) != 0)) {
            perror("spool_ingest: journal: write");
            ok = set_up = false; /* reported */
        }
        int64_t c1 = thread_cpu_ns();
        journal_ns += c1 - c0;
        if (ok && (i % JOURNAL_INDEX == 0 || i == rows)) {
            int64_t first = (i - 1) / JOURNAL_INDEX * JOURNAL_INDEX;
            ok = sqlite3_exec(db, "BEGIN", NULL, NULL, NULL) == SQLITE_OK;
            for (int64_t r = first; ok && r < i; r++) {
                const index_row *m = &meta[r % JOURNAL_INDEX];
                sqlite3_bind_int64(ins, 1, r + 1);
                sqlite3_bind_int64(ins, 2, now);
                sqlite3_bind_text(ins, 3, m->user, -1, SQLITE_STATIC);
                sqlite3_bind_int64(ins, 4, m->ofs);
                sqlite3_bind_int64(ins, 5, m->len);
                sqlite3_bind_int64(ins, 6, m->h);
                ok = sqlite3_step(ins) == SQLITE_DONE;
                sqlite3_reset(ins);
                sqlite3_bind_int64(recent, 1, m->h);
                sqlite3_bind_int64(recent, 2, now);
                sqlite3_bind_int64(recent, 3, m->chk);
                ok = ok && sqlite3_step(recent) == SQLITE_DONE;
                sqlite3_reset(recent);
            }
            ok = ok && sqlite3_exec(db, "COMMIT", NULL, NULL, NULL) == SQLITE_OK;
            index_ns += thread_cpu_ns() - c1;
        }
    }
    int64_t t1 = amp_mono_ms();
    if (!ok && set_up)
        fprintf(stderr, "spool_ingest: journal: %s\n", sqlite3_errmsg(db));
    else if (ok)
        printf("JOURNAL_INGEST rows=%lld us_per_row=%.2f journal=%.2f index=%.2f wall_ms=%lld\n",
               (long long)rows, (double)(journal_ns + index_ns) / 1e3 / (double)rows,
               (double)journal_ns / 1e3 / (double)rows, (double)index_ns / 1e3 / (double)rows,
               (long long)(t1 - t0));
    sqlite3_finalize(find);
    sqlite3_finalize(ins);
    sqlite3_finalize(recent);
    sqlite3_close(db);
    if (fd >= 0)
        close(fd);
    free(recs);
    free(keys);
    free(meta);
    free(jpath);
    free(dbpath);
    return ok ? 0 : 1;
}

int main(int argc, char **argv) {
    const char *dir = NULL, *mode = "spool";
    int64_t events = 100000, inflight = 64, bytes = 700, dedupe_s = 604800, window = 80, batch = 8;
    for (int i = 1; i < argc; i += 2) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!v)
            return usage();
        if (strcmp(a, "--dir") == 0)
            dir = v;
        else if (strcmp(a, "--mode") == 0)
            mode = v;
        else if (strcmp(a, "--events") == 0) {
            if (amp_parse_i64(v, strlen(v), 1, 100000000, &events))
                return usage();
        } else if (strcmp(a, "--inflight") == 0) {
            if (amp_parse_i64(v, strlen(v), 1, 100000, &inflight))
                return usage();
        } else if (strcmp(a, "--claim-window") == 0) {
            if (amp_parse_i64(v, strlen(v), 1, 100000, &window))
                return usage();
        } else if (strcmp(a, "--claim-batch") == 0) {
            if (amp_parse_i64(v, strlen(v), 1, 100000, &batch))
                return usage();
        } else if (strcmp(a, "--dedupe-s") == 0) {
            if (amp_parse_i64(v, strlen(v), 0, 100000000, &dedupe_s))
                return usage();
        } else if (strcmp(a, "--body") == 0) {
            if (amp_parse_i64(v, strlen(v), 64, 1000000, &bytes))
                return usage();
        } else {
            return usage();
        }
    }
    if (!dir)
        return usage();
    if (strcmp(mode, "sqlite") == 0)
        return run_sqlite(dir, events, (size_t)bytes);
    if (strcmp(mode, "journal") == 0)
        return run_journal(dir, events, (size_t)bytes);
    if (strcmp(mode, "spool") == 0)
        return run_spool(dir, events, inflight, (size_t)bytes, dedupe_s, window,
                         batch > window ? window : batch);
    return usage();
}
