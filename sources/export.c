/*
 * export — Amplitude's Export API as a source (see export.h).
 */
#include "export.h"

#include <archive.h>
#include <archive_entry.h>
#include <curl/curl.h>
#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <libgen.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "../base/alloc.h"
#include "../base/buf.h"
#include "../base/clock.h"
#include "../base/log.h"
#include "source.h"

/* Batches submitted and not yet answered, at most. */
#define MAX_IN_FLIGHT 4
/* How long a full queue may hold an hour back before the run gives up. */
#define QUEUE_FULL_WAIT_MS 60000
/* The longest line (one event) read from a part. */
#define MAX_LINE_BYTES (8u << 20)
/* The longest backoff between attempts. */
#define RETRY_MAX_MS 600000
#define READ_BLOCK (64 * 1024)

/* ---- hours --------------------------------------------------------------- */

void amp_source_export_format_hour(int64_t hour, char *buf, size_t len) {
    char iso[40];
    if (amp_map_time_format(hour * 3600000, iso, sizeof iso) != 0) {
        snprintf(buf, len, "?");
        return;
    }
    snprintf(buf, len, "%.13s", iso); /* YYYY-MM-DDTHH */
}

/* YYYYMMDDTHH for the request. */
static void request_hour(int64_t hour, char *buf, size_t len) {
    char h[16];
    amp_source_export_format_hour(hour, h, sizeof h);
    snprintf(buf, len, "%.4s%.2s%.2sT%.2s", h, h + 5, h + 8, h + 11);
}

int amp_source_export_parse_hour(const char *s, int64_t *hour) {
    char iso[32];
    size_t n = strlen(s);
    if (n == 11 && s[8] == 'T') /* YYYYMMDDTHH */
        snprintf(iso, sizeof iso, "%.4s-%.2s-%.2sT%.2s:00:00", s, s + 4, s + 6, s + 9);
    else if (n == 13 && s[10] == 'T') /* YYYY-MM-DDTHH */
        snprintf(iso, sizeof iso, "%.13s:00:00", s);
    else
        return -1;
    int64_t ms;
    if (amp_map_time_parse(iso, strlen(iso), false, &ms) != 0 || ms < 0)
        return -1;
    *hour = ms / 3600000;
    return 0;
}

/* ---- cursor -------------------------------------------------------------- */

int amp_source_export_cursor_read(const char *path, int64_t *hour, char *err, size_t errlen) {
    FILE *f = fopen(path, "r");
    if (!f) {
        if (errno == ENOENT)
            return 0;
        snprintf(err, errlen, "cannot read the export cursor '%s': %s", path, strerror(errno));
        return -1;
    }
    char line[64] = "";
    bool ok = fgets(line, sizeof line, f) != NULL;
    fclose(f);
    line[strcspn(line, "\r\n")] = '\0';
    if (!ok || amp_source_export_parse_hour(line, hour) != 0) {
        snprintf(err, errlen, "the export cursor '%s' holds '%.20s', not an hour YYYYMMDDTHH", path,
                 line);
        return -1;
    }
    return 1;
}

/* Replace the cursor durably: a temporary file, fsync, rename, fsync of the
 * directory. 0, or -1 with err. */
static int cursor_write(const char *path, int64_t hour, char *err, size_t errlen) {
    char *tmp = amp_xasprintf("%s.tmp", path);
    char text[32];
    request_hour(hour, text, sizeof text);
    size_t n = strlen(text);
    text[n++] = '\n';
    int rc = -1;
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd < 0 || write(fd, text, n) != (ssize_t)n || fsync(fd) != 0) {
        snprintf(err, errlen, "cannot write the export cursor '%s': %s", tmp, strerror(errno));
        goto out;
    }
    close(fd);
    fd = -1;
    if (rename(tmp, path) != 0) {
        snprintf(err, errlen, "cannot write the export cursor '%s': %s", path, strerror(errno));
        goto out;
    }
    char *dcopy = amp_xstrdup(path);
    int dfd = open(dirname(dcopy), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    free(dcopy);
    if (dfd >= 0) {
        fsync(dfd);
        close(dfd);
    }
    rc = 0;
out:
    if (fd >= 0)
        close(fd);
    free(tmp);
    return rc;
}

/* ---- one run ------------------------------------------------------------- */

typedef struct run {
    amp_queue *q;
    const amp_source_export_opts *o;
    amp_source_export_stats *st;
    int64_t last_request_ms; /* monotonic; 0: none yet */
    int64_t total_hours, start_ms;
    char *err;
    size_t errlen;
    /* the hour being stored: batches in flight and their answers */
    pthread_mutex_t mu;
    pthread_cond_t cond;
    int in_flight;
    bool failed;
    const char *fail_reason;
    amp_series *m_hours, *m_bytes, *m_lag, *m_accepted, *m_dup, *m_filtered, *m_rejected;
} run;

static bool stopping(const run *r) {
    return r->o->stop && atomic_load(r->o->stop);
}

/* Sleep ms in short steps; false when stop was set. */
static bool nap(const run *r, int64_t ms) {
    int64_t end = amp_mono_ms() + ms;
    while (!stopping(r)) {
        int64_t left = end - amp_mono_ms();
        if (left <= 0)
            return true;
        if (left > 100)
            left = 100;
        struct timespec ts = {.tv_sec = 0, .tv_nsec = left * 1000000L};
        nanosleep(&ts, NULL);
    }
    return false;
}

static void count_failure(run *r, const char *reason) {
    if (r->o->metrics)
        amp_series_inc(amp_metrics_series(r->o->metrics, "amp2dify_export_failures_total", "reason",
                                          reason, NULL));
}

static void stored(void *ctx, const amp_queue_result *res) {
    run *r = ctx;
    pthread_mutex_lock(&r->mu);
    r->in_flight--;
    if (res->status != 0) {
        r->failed = true;
        r->fail_reason = res->error ? res->error : "the queue refused the batch";
    } else {
        r->st->accepted += res->accepted;
        r->st->duplicates += res->duplicates;
        if (r->m_accepted) {
            amp_series_add(r->m_accepted, res->accepted);
            amp_series_add(r->m_dup, res->duplicates);
        }
    }
    pthread_cond_broadcast(&r->cond);
    pthread_mutex_unlock(&r->mu);
}

/* Wait until at most max batches are in flight. */
static void wait_in_flight(run *r, int max) {
    pthread_mutex_lock(&r->mu);
    while (r->in_flight > max)
        pthread_cond_wait(&r->cond, &r->mu);
    pthread_mutex_unlock(&r->mu);
}

/* The batch gathered so far into the queue (takes it; *b is reset to
 * NULL). 0, or -1 with r->err when the queue stays full. */
static int submit_batch(run *r, amp_queue_batch **b) {
    amp_queue_batch *batch = *b;
    *b = NULL;
    if (!batch)
        return 0;
    if (amp_queue_batch_events(batch) == 0) {
        amp_queue_batch_destroy(batch);
        return 0;
    }
    int64_t full_since = amp_mono_ms();
    while (amp_queue_full(r->q)) {
        if (amp_mono_ms() - full_since > QUEUE_FULL_WAIT_MS || !nap(r, 200)) {
            amp_queue_batch_destroy(batch);
            snprintf(r->err, r->errlen, "the queue is full: %s",
                     amp_queue_full(r->q) ? amp_queue_full(r->q) : "");
            return -1;
        }
    }
    wait_in_flight(r, MAX_IN_FLIGHT - 1);
    pthread_mutex_lock(&r->mu);
    r->in_flight++;
    pthread_mutex_unlock(&r->mu);
    amp_queue_submit(r->q, batch, stored, r);
    return 0;
}

static void reject(run *r, const char *part, int64_t lineno, const char *why) {
    amp_log(AMP_LOG_WARN, "export event rejected", "{s:s, s:I, s:s}", "part", part, "line",
            (json_int_t)lineno, "error", why);
    r->st->rejected++;
    if (r->m_rejected)
        amp_series_inc(r->m_rejected);
}

/* Reads the outer archive's current entry for the inner (gzip) one. */
static la_ssize_t outer_read(struct archive *inner, void *ctx, const void **buf) {
    (void)inner;
    static _Thread_local char block[READ_BLOCK];
    la_ssize_t n = archive_read_data(ctx, block, sizeof block);
    *buf = block;
    return n;
}

/* One line of a part: decoded, through the routes at once (so the event
 * is freed before the next is parsed) and its requests copied into *b, or
 * a rejection. Events without a key of their own are keyed by part and
 * line, so a second run makes the same keys. */
static void take_line(run *r, const char *line, size_t len, const char *part, int64_t lineno,
                      amp_queue_batch **b) {
    while (len > 0 && (line[len - 1] == '\r' || line[len - 1] == ' '))
        len--;
    if (len == 0)
        return;
    r->st->events++;
    json_t *events = NULL;
    char detail[256];
    if (amp_map_decode_body(line, len, &events, detail, sizeof detail) != AMP_DECODE_OK ||
        json_array_size(events) != 1) {
        reject(r, part, lineno, events ? "not one event" : detail);
        json_decref(events);
        return;
    }
    char stem[280];
    snprintf(stem, sizeof stem, "export:%.200s:%lld", part, (long long)lineno);
    amp_source_input in = {
        .events = events, .mapper = r->o->mapper, .max_events = 1, .message_key = stem};
    unsigned filtered = 0;
    amp_queue_batch *one = amp_source_batch(&in, &filtered, detail, sizeof detail);
    json_decref(events);
    if (!one) {
        reject(r, part, lineno, detail);
        return;
    }
    r->st->filtered += filtered;
    if (r->m_filtered && filtered)
        amp_series_add(r->m_filtered, filtered);
    if (amp_queue_batch_events(one) > 0) {
        if (!*b)
            *b = amp_queue_batch_create();
        const amp_queue_request *reqs;
        size_t nreqs;
        const char *key = amp_queue_batch_event_at(one, 0, &reqs, &nreqs);
        amp_queue_batch_event(*b, key);
        for (size_t i = 0; i < nreqs; i++) {
            amp_queue_batch_request(*b, reqs[i].route, reqs[i].app, reqs[i].user, reqs[i].per_user,
                                    reqs[i].body);
            if (reqs[i].source)
                amp_queue_batch_source(*b, reqs[i].source);
        }
    }
    amp_queue_batch_destroy(one);
}

/* Every line of one part (the outer archive at its entry). 0, or -1. */
static int read_part(run *r, struct archive *outer, const char *part) {
    struct archive *in = archive_read_new();
    archive_read_support_filter_gzip(in);
    archive_read_support_format_raw(in);
    int rc = -1;
    amp_buf line;
    amp_buf_init(&line, MAX_LINE_BYTES);
    amp_queue_batch *pending = NULL;
    int64_t lineno = 0;
    struct archive_entry *e;
    int hr = archive_read_open(in, outer, NULL, outer_read, NULL);
    if (hr == ARCHIVE_OK)
        hr = archive_read_next_header(in, &e);
    if (hr == ARCHIVE_EOF) { /* an empty part */
        rc = 0;
        goto out;
    }
    if (hr != ARCHIVE_OK) {
        snprintf(r->err, r->errlen, "%s: not gzip: %s", part, archive_error_string(in));
        goto out;
    }
    char block[READ_BLOCK];
    for (;;) {
        la_ssize_t n = archive_read_data(in, block, sizeof block);
        if (n < 0) {
            snprintf(r->err, r->errlen, "%s: %s", part, archive_error_string(in));
            goto out;
        }
        if (n == 0)
            break;
        const char *p = block, *end = block + n;
        while (p < end) {
            const char *nl = memchr(p, '\n', (size_t)(end - p));
            size_t take = (size_t)((nl ? nl : end) - p);
            if (amp_buf_append(&line, p, take) != 0) {
                snprintf(r->err, r->errlen, "%s: line %lld is longer than %u bytes", part,
                         (long long)lineno + 1, MAX_LINE_BYTES);
                goto out;
            }
            if (!nl)
                break;
            lineno++;
            take_line(r, line.data ? line.data : "", line.len, part, lineno, &pending);
            line.len = 0;
            if (pending && amp_queue_batch_events(pending) >= r->o->batch_events &&
                submit_batch(r, &pending) != 0)
                goto out;
            p = nl + 1;
        }
    }
    if (line.len > 0) {
        lineno++;
        take_line(r, line.data, line.len, part, lineno, &pending);
    }
    if (submit_batch(r, &pending) != 0)
        goto out;
    rc = 0;
out:
    amp_queue_batch_destroy(pending);
    amp_buf_free(&line);
    archive_read_free(in);
    return rc;
}

/* The hour of a part's name "<dir>/<project>_<YYYY-MM-DD>_<H>#<n>.json.gz":
 * 0, or -1 when the name is not so. */
static int part_hour(const char *name, int64_t *hour) {
    const char *base = strrchr(name, '/');
    base = base ? base + 1 : name;
    const char *hash = strchr(base, '#');
    if (!hash)
        return -1;
    const char *p = hash;
    while (p > base && p[-1] >= '0' && p[-1] <= '9')
        p--;
    size_t hlen = (size_t)(hash - p);
    if (hlen < 1 || hlen > 2 || p - base < 12 || p[-1] != '_' || p[-12] != '_')
        return -1;
    unsigned h = 0;
    for (const char *q = p; q < hash; q++)
        h = h * 10 + (unsigned)(*q - '0');
    char iso[32];
    snprintf(iso, sizeof iso, "%.10s 00:00:00", p - 11);
    int64_t ms;
    if (h > 23 || amp_map_time_parse(iso, strlen(iso), true, &ms) != 0)
        return -1;
    *hour = ms / 3600000 + h;
    return 0;
}

static struct archive *open_zip(run *r, const char *file) {
    struct archive *a = archive_read_new();
    archive_read_support_format_zip_seekable(a);
    if (archive_read_open_filename(a, file, READ_BLOCK) != ARCHIVE_OK) {
        snprintf(r->err, r->errlen, "the export is not a zip: %s", archive_error_string(a));
        archive_read_free(a);
        return NULL;
    }
    return a;
}

static void report_hour(run *r, int64_t hour) {
    char h[16];
    amp_source_export_format_hour(hour, h, sizeof h);
    r->st->hours++;
    if (r->m_hours) {
        amp_series_inc(r->m_hours);
        amp_series_set(r->m_lag, (double)(amp_now_ms() / 3600000 - hour));
    }
    double secs = (double)(amp_mono_ms() - r->start_ms) / 1e3;
    double rate = secs > 0 ? (double)r->st->events / secs : 0;
    if (r->o->progress) {
        fprintf(stderr, "\rexport %s  hours %lld/%lld  events %lld  %.0f events/s   ", h,
                (long long)r->st->hours, (long long)r->total_hours, (long long)r->st->events, rate);
        fflush(stderr);
    } else {
        amp_log(AMP_LOG_INFO, "export hour stored", "{s:s, s:I, s:I, s:I, s:I, s:i}", "hour", h,
                "events", (json_int_t)r->st->events, "accepted", (json_int_t)r->st->accepted,
                "duplicates", (json_int_t)r->st->duplicates, "rejected",
                (json_int_t)r->st->rejected, "events_per_second", (int)rate);
    }
}

/* Every part of one hour, then the cursor. 0, or -1 with r->err. */
static int store_hour(run *r, const char *file, int64_t hour) {
    struct archive *a = open_zip(r, file);
    if (!a)
        return -1;
    int rc = 0;
    struct archive_entry *e;
    int hr;
    while (rc == 0 && (hr = archive_read_next_header(a, &e)) == ARCHIVE_OK) {
        const char *name = archive_entry_pathname(e);
        int64_t h;
        if (!name || archive_entry_filetype(e) == AE_IFDIR || part_hour(name, &h) != 0 || h != hour)
            continue;
        rc = read_part(r, a, name);
    }
    if (rc == 0 && hr != ARCHIVE_EOF) {
        snprintf(r->err, r->errlen, "the export zip: %s", archive_error_string(a));
        rc = -1;
    }
    archive_read_free(a);
    wait_in_flight(r, 0);
    if (rc == 0 && r->failed) {
        snprintf(r->err, r->errlen, "hour not stored: %s", r->fail_reason);
        rc = -1;
    }
    r->failed = false;
    if (rc == 0 && cursor_write(r->o->cursor_path, hour, r->err, r->errlen) != 0)
        rc = -1;
    if (rc == 0)
        report_hour(r, hour);
    return rc;
}

/* The hours of [s, e] the zip holds parts of, in order, then the cursor at
 * e. 0, or -1 with r->err. */
static int store_zip(run *r, const char *file, int64_t s, int64_t e) {
    struct archive *a = open_zip(r, file);
    if (!a)
        return -1;
    size_t n = (size_t)(e - s + 1);
    bool *has = amp_xcalloc(n, sizeof *has);
    struct archive_entry *ent;
    int hr, rc = 0;
    while ((hr = archive_read_next_header(a, &ent)) == ARCHIVE_OK) {
        const char *name = archive_entry_pathname(ent);
        if (!name || archive_entry_filetype(ent) == AE_IFDIR)
            continue;
        int64_t h;
        if (part_hour(name, &h) != 0) {
            snprintf(r->err, r->errlen,
                     "the export holds '%.200s', not a part named "
                     "<project>_<YYYY-MM-DD>_<H>#<n>.json.gz",
                     name);
            rc = -1;
            break;
        }
        if (h < s || h > e) {
            char hs[16];
            amp_source_export_format_hour(h, hs, sizeof hs);
            snprintf(r->err, r->errlen,
                     "the export holds '%.200s', of hour %s outside the range "
                     "asked",
                     name, hs);
            rc = -1;
            break;
        }
        has[h - s] = true;
    }
    if (rc == 0 && hr != ARCHIVE_EOF) {
        snprintf(r->err, r->errlen, "the export zip: %s", archive_error_string(a));
        rc = -1;
    }
    archive_read_free(a);
    for (int64_t h = s; rc == 0 && h <= e; h++) {
        if (stopping(r)) {
            rc = 1;
            break;
        }
        if (has[h - s])
            rc = store_hour(r, file, h);
        else if (h == e && cursor_write(r->o->cursor_path, h, r->err, r->errlen) != 0)
            rc = -1;
        if (rc == 0 && !has[h - s]) {
            r->st->hours++;
            if (r->m_hours)
                amp_series_inc(r->m_hours);
        }
    }
    free(has);
    return rc;
}

typedef struct fetched {
    long status;
    char head[512]; /* the start of a non-200 body */
} fetched;

static size_t write_file(char *p, size_t size, size_t n, void *ctx) {
    return fwrite(p, size, n, ctx);
}

/* A download under way ends when stop is set. */
static int progress_cb(void *ctx, curl_off_t dt, curl_off_t dn, curl_off_t ut, curl_off_t un) {
    (void)dt, (void)dn, (void)ut, (void)un;
    return stopping(ctx) ? 1 : 0;
}

/* GET the range into file. 0 with f->status; -1 with r->err on a transport
 * failure. */
static int fetch(run *r, int64_t s, int64_t e, const char *file, fetched *f) {
    if (r->last_request_ms) {
        int64_t wait = r->last_request_ms + r->o->min_request_interval_ms - amp_mono_ms();
        if (wait > 0 && !nap(r, wait))
            return -1;
    }
    r->last_request_ms = amp_mono_ms();
    char hs[16], he[16];
    request_hour(s, hs, sizeof hs);
    request_hour(e, he, sizeof he);
    const char *base = r->o->base_url;
    size_t bl = strlen(base);
    char *url = amp_xasprintf("%.*s/api/2/export?start=%s&end=%s",
                              (int)(bl && base[bl - 1] == '/' ? bl - 1 : bl), base, hs, he);
    FILE *out = fopen(file, "w+b");
    if (!out) {
        snprintf(r->err, r->errlen, "cannot write '%s': %s", file, strerror(errno));
        free(url);
        return -1;
    }
    CURL *c = curl_easy_init();
    curl_easy_setopt(c, CURLOPT_URL, url);
    curl_easy_setopt(c, CURLOPT_HTTPAUTH, (long)CURLAUTH_BASIC);
    curl_easy_setopt(c, CURLOPT_USERNAME, r->o->api_key);
    curl_easy_setopt(c, CURLOPT_PASSWORD, r->o->secret_key);
    curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, write_file);
    curl_easy_setopt(c, CURLOPT_WRITEDATA, out);
    curl_easy_setopt(c, CURLOPT_TIMEOUT, (long)r->o->timeout_s);
    curl_easy_setopt(c, CURLOPT_CONNECTTIMEOUT, 30L);
    curl_easy_setopt(c, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(c, CURLOPT_FOLLOWLOCATION, 1L);
    curl_easy_setopt(c, CURLOPT_MAXREDIRS, 5L);
    curl_easy_setopt(c, CURLOPT_USERAGENT, "amp2dify-export");
    curl_easy_setopt(c, CURLOPT_XFERINFOFUNCTION, progress_cb);
    curl_easy_setopt(c, CURLOPT_XFERINFODATA, r);
    curl_easy_setopt(c, CURLOPT_NOPROGRESS, 0L);
    CURLcode cc = curl_easy_perform(c);
    r->st->requests++;
    int rc = 0;
    if (cc != CURLE_OK) {
        snprintf(r->err, r->errlen, "GET %s: %s", url, curl_easy_strerror(cc));
        rc = -1;
    } else {
        curl_easy_getinfo(c, CURLINFO_RESPONSE_CODE, &f->status);
        curl_off_t got = 0;
        curl_easy_getinfo(c, CURLINFO_SIZE_DOWNLOAD_T, &got);
        r->st->bytes += got;
        if (r->m_bytes)
            amp_series_add(r->m_bytes, (double)got);
        f->head[0] = '\0';
        if (f->status != 200 && fflush(out) == 0 && fseek(out, 0, SEEK_SET) == 0) {
            size_t n = fread(f->head, 1, sizeof f->head - 1, out);
            f->head[n] = '\0';
        }
    }
    curl_easy_cleanup(c);
    if (fclose(out) != 0 && rc == 0) {
        snprintf(r->err, r->errlen, "cannot write '%s': %s", file, strerror(errno));
        rc = -1;
    }
    free(url);
    return rc;
}

static bool says_too_large(const char *body) {
    return strcasestr(body, "too large") != NULL;
}

/* One range: fetched (with retries) and stored, or split. 0; 1 stopped;
 * -1 failed; -2 authentication refused. */
static int do_range(run *r, int64_t s, int64_t e) {
    char *file = amp_xasprintf("%s.zip", r->o->cursor_path);
    int64_t backoff = r->o->retry_initial_ms;
    int rc = -1;
    for (unsigned attempt = 1;; attempt++) {
        if (stopping(r)) {
            rc = 1;
            break;
        }
        fetched f = {0};
        int got = fetch(r, s, e, file, &f);
        if (stopping(r)) {
            rc = 1;
            break;
        }
        const char *reason = "transport";
        if (got == 0) {
            if (f.status == 200) {
                rc = store_zip(r, file, s, e);
                if (rc < 0)
                    count_failure(r, "store");
                break;
            }
            if (f.status == 404) { /* no data in the range */
                rc = 0;
                for (int64_t h = s; h <= e; h++) {
                    r->st->hours++;
                    if (r->m_hours)
                        amp_series_inc(r->m_hours);
                }
                if (cursor_write(r->o->cursor_path, e, r->err, r->errlen) != 0)
                    rc = -1;
                break;
            }
            if (f.status == 400 && says_too_large(f.head) && e > s) {
                count_failure(r, "too_large");
                int64_t mid = s + (e - s) / 2;
                char a[16], b[16];
                amp_source_export_format_hour(s, a, sizeof a);
                amp_source_export_format_hour(e, b, sizeof b);
                amp_log(AMP_LOG_INFO, "export range too large; split in halves", "{s:s, s:s}",
                        "start", a, "end", b);
                unlink(file);
                rc = do_range(r, s, mid);
                if (rc == 0)
                    rc = do_range(r, mid + 1, e);
                free(file);
                return rc;
            }
            if (f.status == 401 || f.status == 403) {
                count_failure(r, "auth");
                snprintf(r->err, r->errlen,
                         "Amplitude refused the keys (HTTP %ld): check AMPLITUDE_API_KEY and "
                         "AMPLITUDE_SECRET_KEY",
                         f.status);
                rc = -2;
                break;
            }
            snprintf(r->err, r->errlen, "Export API answered HTTP %ld: %.200s", f.status, f.head);
            if (f.status == 429 || f.status >= 500)
                reason = f.status == 429 ? "throttled" : "server";
            else {
                count_failure(r, "http");
                break; /* another 4xx: asking again will not help */
            }
        }
        count_failure(r, reason);
        if (attempt >= r->o->max_attempts)
            break;
        amp_log(AMP_LOG_WARN, "export request failed; retrying", "{s:s, s:i, s:I}", "error", r->err,
                "attempt", (int)attempt, "retry_in_ms", (json_int_t)backoff);
        if (!nap(r, backoff)) {
            rc = 1;
            break;
        }
        backoff = backoff * 2 > RETRY_MAX_MS ? RETRY_MAX_MS : backoff * 2;
    }
    unlink(file);
    free(file);
    return rc;
}

amp_source_export_status amp_source_export_run(amp_queue *q, const amp_source_export_opts *o,
                                               int64_t first, int64_t last,
                                               amp_source_export_stats *stats, char *err,
                                               size_t errlen) {
    amp_source_export_stats local = {0};
    run r = {.q = q, .o = o, .st = stats ? stats : &local, .err = err, .errlen = errlen};
    err[0] = '\0';
    int64_t cursor;
    int c = amp_source_export_cursor_read(o->cursor_path, &cursor, err, errlen);
    if (c < 0)
        return AMP_SOURCE_EXPORT_FAILED;
    if (c == 1 && cursor >= first && cursor < last + 1)
        first = cursor + 1;
    else if (c == 1 && cursor >= last)
        first = last + 1;
    if (first > last)
        return AMP_SOURCE_EXPORT_OK;
    pthread_mutex_init(&r.mu, NULL);
    pthread_cond_init(&r.cond, NULL);
    if (o->metrics) {
        r.m_hours = amp_metrics_series(o->metrics, "amp2dify_export_hours_total", NULL);
        r.m_bytes = amp_metrics_series(o->metrics, "amp2dify_export_bytes_total", NULL);
        r.m_lag = amp_metrics_series(o->metrics, "amp2dify_export_lag_hours", NULL);
        r.m_accepted = amp_metrics_series(o->metrics, "amp2dify_export_events_total", "outcome",
                                          "accepted", NULL);
        r.m_dup = amp_metrics_series(o->metrics, "amp2dify_export_events_total", "outcome",
                                     "duplicate", NULL);
        r.m_filtered = amp_metrics_series(o->metrics, "amp2dify_export_events_total", "outcome",
                                          "filtered", NULL);
        r.m_rejected = amp_metrics_series(o->metrics, "amp2dify_export_events_total", "outcome",
                                          "rejected", NULL);
    }
    r.total_hours = last - first + 1;
    r.start_ms = amp_mono_ms();
    int rc = 0;
    unsigned step = o->hours_per_request ? o->hours_per_request : 1;
    for (int64_t s = first; rc == 0 && s <= last; s += step) {
        int64_t e = s + step - 1 > last ? last : s + step - 1;
        rc = do_range(&r, s, e);
    }
    wait_in_flight(&r, 0);
    if (o->progress)
        fputc('\n', stderr);
    pthread_mutex_destroy(&r.mu);
    pthread_cond_destroy(&r.cond);
    switch (rc) {
    case 0:
        return AMP_SOURCE_EXPORT_OK;
    case 1:
        return AMP_SOURCE_EXPORT_STOPPED;
    case -2:
        return AMP_SOURCE_EXPORT_AUTH;
    default:
        return AMP_SOURCE_EXPORT_FAILED;
    }
}

/* ---- poller -------------------------------------------------------------- */

struct amp_source_export_poller {
    amp_queue *q;
    amp_source_export_opts o;
    char *base_url, *api_key, *secret_key, *cursor_path;
    unsigned interval_s, lag_hours;
    int64_t start_hour;
    atomic_bool stop;
    pthread_mutex_t mu;
    pthread_cond_t cond;
    pthread_t thread;
};

static void *poll_main(void *arg) {
    amp_source_export_poller *p = arg;
    for (;;) {
        if (atomic_load(&p->stop))
            break;
        /* The last hour at least lag_hours old: it ended lag_hours ago. */
        int64_t last = amp_now_ms() / 3600000 - (int64_t)p->lag_hours - 1;
        char err[512] = "";
        int64_t cursor;
        int c = amp_source_export_cursor_read(p->o.cursor_path, &cursor, err, sizeof err);
        int64_t first = c == 1 ? cursor + 1 : p->start_hour >= 0 ? p->start_hour : last;
        amp_source_export_status st = AMP_SOURCE_EXPORT_OK;
        if (c < 0)
            st = AMP_SOURCE_EXPORT_FAILED;
        else if (first <= last)
            st = amp_source_export_run(p->q, &p->o, first, last, NULL, err, sizeof err);
        if (st == AMP_SOURCE_EXPORT_FAILED || st == AMP_SOURCE_EXPORT_AUTH)
            amp_log(AMP_LOG_ERROR,
                    st == AMP_SOURCE_EXPORT_AUTH ? "export stopped"
                                                 : "export failed; next poll "
                                                   "tries again",
                    "{s:s}", "error", err);
        if (st == AMP_SOURCE_EXPORT_AUTH)
            break;
        pthread_mutex_lock(&p->mu);
        struct timespec ts = amp_mono_deadline_in((int64_t)p->interval_s * 1000);
        while (!atomic_load(&p->stop) && pthread_cond_timedwait(&p->cond, &p->mu, &ts) != ETIMEDOUT)
            ;
        pthread_mutex_unlock(&p->mu);
    }
    return NULL;
}

amp_source_export_poller *amp_source_export_start(amp_queue *q, const amp_source_export_opts *o,
                                                  unsigned interval_s, unsigned lag_hours,
                                                  int64_t start_hour) {
    amp_source_export_poller *p = amp_xcalloc(1, sizeof *p);
    p->q = q;
    p->o = *o;
    p->base_url = amp_xstrdup(o->base_url);
    p->api_key = amp_xstrdup(o->api_key);
    p->secret_key = amp_xstrdup(o->secret_key);
    p->cursor_path = amp_xstrdup(o->cursor_path);
    p->o.base_url = p->base_url;
    p->o.api_key = p->api_key;
    p->o.secret_key = p->secret_key;
    p->o.cursor_path = p->cursor_path;
    p->o.stop = &p->stop;
    p->o.progress = false;
    p->interval_s = interval_s ? interval_s : 1;
    p->lag_hours = lag_hours;
    p->start_hour = start_hour;
    atomic_init(&p->stop, false);
    pthread_mutex_init(&p->mu, NULL);
    amp_cond_init_mono(&p->cond);
    if (pthread_create(&p->thread, NULL, poll_main, p) != 0) {
        p->thread = 0;
        amp_source_export_stop(p);
        return NULL;
    }
    return p;
}

void amp_source_export_stop(amp_source_export_poller *p) {
    if (!p)
        return;
    pthread_mutex_lock(&p->mu);
    atomic_store(&p->stop, true);
    pthread_cond_broadcast(&p->cond);
    pthread_mutex_unlock(&p->mu);
    if (p->thread)
        pthread_join(p->thread, NULL);
    pthread_mutex_destroy(&p->mu);
    pthread_cond_destroy(&p->cond);
    free(p->base_url);
    free(p->api_key);
    free(p->secret_key);
    free(p->cursor_path);
    free(p);
}
