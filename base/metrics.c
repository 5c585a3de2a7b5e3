#include "metrics.h"

#include <math.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "alloc.h"
#include "buf.h"

typedef enum { COUNTER, GAUGE, HISTOGRAM } family_type;

static const struct family_def {
    const char *name;
    family_type type;
    const char *help;
} families[] = {
    {"amp2dify_http_requests_total", COUNTER, "HTTP requests answered, by status code."},
    {"amp2dify_auth_failures_total", COUNTER,
     "Webhook requests refused by authentication, by reason."},
    {"amp2dify_events_total", COUNTER,
     "Events received, by outcome (accepted, duplicate, filtered, rejected)."},
    {"amp2dify_deliveries_total", COUNTER,
     "Delivery attempts to Dify, by app and outcome (delivered, retried, dead_lettered, "
     "waiting_input)."},
    {"amp2dify_reports_total", COUNTER,
     "Route reports and SDK tee events sent to Amplitude, by outcome (ingested, refused, "
     "throttled, retried)."},
    {"amp2dify_dify_responses_total", COUNTER,
     "Dify answers, by app, HTTP status (0: no answer) and Dify error code."},
    {"amp2dify_spool_pending", GAUGE, "Deliveries stored and not yet delivered or dead-lettered."},
    {"amp2dify_spool_oldest_pending_age_seconds", GAUGE,
     "Age of the oldest pending delivery (0 when none)."},
    {"amp2dify_spool_writable", GAUGE, "1 when the last spool commit succeeded."},
    {"amp2dify_spool_bytes", GAUGE,
     "Bytes of spool database pages in use (spool.max_bytes counts these)."},
    {"amp2dify_spool_full", GAUGE,
     "1 while spool.max_pending or spool.max_bytes is reached (new events get 503)."},
    {"amp2dify_in_flight", GAUGE, "Requests to Dify under way, by app."},
    {"amp2dify_app_paused", GAUGE, "1 while deliveries to the app are paused (key rejected)."},
    {"amp2dify_connections_open", GAUGE, "HTTP connections open."},
    {"amp2dify_connections_closed_total", COUNTER,
     "HTTP connections closed by the server before the client was done, by reason "
     "(idle_evicted, body_evicted, header_timeout, body_timeout)."},
    {"amp2dify_app_paused_by_operator", GAUGE,
     "1 while an operator has paused the app (admin API)."},
    {"amp2dify_ingest_duration_seconds", HISTOGRAM,
     "Webhook requests, from the headers to the answer (includes the spool commit)."},
    {"amp2dify_delivery_duration_seconds", HISTOGRAM, "Requests to Dify, by app."},
    {"amp2dify_export_hours_total", COUNTER, "Export API hours stored and passed by the cursor."},
    {"amp2dify_export_events_total", COUNTER, "Export API events, by outcome."},
    {"amp2dify_export_bytes_total", COUNTER, "Export API zip bytes downloaded."},
    {"amp2dify_export_failures_total", COUNTER, "Export API requests that failed, by reason."},
    {"amp2dify_export_lag_hours", GAUGE,
     "Hours between now and the last hour the export cursor passed."},
};
#define NFAMILIES (sizeof families / sizeof families[0])

static const double buckets[] = {0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                                 0.25,   0.5,   1,      2.5,   5,    10,    30,   120};
#define NBUCKETS (sizeof buckets / sizeof buckets[0])

/* A double updated atomically through its bit pattern. */
typedef _Atomic uint64_t atomic_f64;

static double f64_load(const atomic_f64 *a) {
    uint64_t bits = atomic_load(a);
    double v;
    memcpy(&v, &bits, sizeof v);
    return v;
}

static void f64_store(atomic_f64 *a, double v) {
    uint64_t bits;
    memcpy(&bits, &v, sizeof bits);
    atomic_store(a, bits);
}

static void f64_add(atomic_f64 *a, double v) {
    uint64_t old = atomic_load(a), next;
    do {
        double cur;
        memcpy(&cur, &old, sizeof cur);
        cur += v;
        memcpy(&next, &cur, sizeof next);
    } while (!atomic_compare_exchange_weak(a, &old, next));
}

struct amp_series {
    struct amp_series *next;
    const struct family_def *family;
    char *labels; /* rendered: app="x",code="y" (may be empty) */
    atomic_f64 value;
    _Atomic uint64_t bucket[NBUCKETS]; /* histogram: per bucket, not cumulative */
    _Atomic uint64_t count;
};

struct amp_metrics {
    pthread_mutex_t mu;
    amp_series *series[NFAMILIES];
    void (*collect)(void *, amp_metrics *);
    void *collect_ctx;
};

amp_metrics *amp_metrics_create(void) {
    amp_metrics *m = amp_xcalloc(1, sizeof *m);
    pthread_mutex_init(&m->mu, NULL);
    return m;
}

void amp_metrics_destroy(amp_metrics *m) {
    if (!m)
        return;
    for (size_t f = 0; f < NFAMILIES; f++) {
        for (amp_series *s = m->series[f], *n; s; s = n) {
            n = s->next;
            free(s->labels);
            free(s);
        }
    }
    pthread_mutex_destroy(&m->mu);
    free(m);
}

void amp_metrics_set_collector(amp_metrics *m, void (*fn)(void *ctx, amp_metrics *m), void *ctx) {
    pthread_mutex_lock(&m->mu);
    m->collect = fn;
    m->collect_ctx = ctx;
    pthread_mutex_unlock(&m->mu);
}

/* Label values escaped as the text format asks: backslash, quote, newline. */
static void append_label(amp_buf *b, const char *name, const char *value) {
    if (b->len)
        amp_buf_append(b, ",", 1);
    amp_buf_append(b, name, strlen(name));
    amp_buf_append(b, "=\"", 2);
    for (const char *p = value; *p; p++) {
        if (*p == '\\' || *p == '"')
            amp_buf_append(b, "\\", 1), amp_buf_append(b, p, 1);
        else if (*p == '\n')
            amp_buf_append(b, "\\n", 2);
        else
            amp_buf_append(b, p, 1);
    }
    amp_buf_append(b, "\"", 1);
}

amp_series *amp_metrics_series(amp_metrics *m, const char *family, ...) {
    size_t f = 0;
    while (f < NFAMILIES && strcmp(families[f].name, family) != 0)
        f++;
    if (f == NFAMILIES) {
        fprintf(stderr, "metrics: unknown family %s\n", family);
        abort();
    }
    amp_buf labels;
    amp_buf_init(&labels, 4096);
    va_list ap;
    va_start(ap, family);
    const char *name;
    while ((name = va_arg(ap, const char *))) {
        const char *value = va_arg(ap, const char *);
        append_label(&labels, name, value ? value : "");
    }
    va_end(ap);
    const char *key = labels.data ? labels.data : "";

    pthread_mutex_lock(&m->mu);
    amp_series *s = m->series[f];
    while (s && strcmp(s->labels, key) != 0)
        s = s->next;
    if (!s) {
        s = amp_xcalloc(1, sizeof *s);
        s->family = &families[f];
        s->labels = amp_xstrdup(key);
        s->next = m->series[f];
        m->series[f] = s;
    }
    pthread_mutex_unlock(&m->mu);
    amp_buf_free(&labels);
    return s;
}

void amp_series_inc(amp_series *s) {
    f64_add(&s->value, 1);
}

void amp_series_add(amp_series *s, double v) {
    f64_add(&s->value, v);
}

void amp_series_set(amp_series *s, double v) {
    f64_store(&s->value, v);
}

void amp_series_observe(amp_series *s, double v) {
    size_t i = 0;
    while (i < NBUCKETS && v > buckets[i])
        i++;
    if (i < NBUCKETS)
        atomic_fetch_add(&s->bucket[i], 1);
    atomic_fetch_add(&s->count, 1);
    f64_add(&s->value, v);
}

double amp_series_value(const amp_series *s) {
    return f64_load(&s->value);
}

static void put_number(amp_buf *b, double v) {
    char num[40];
    if (isinf(v))
        snprintf(num, sizeof num, v > 0 ? "+Inf" : "-Inf");
    else if (v == floor(v) && fabs(v) < 9007199254740992.0)
        snprintf(num, sizeof num, "%.0f", v);
    else
        snprintf(num, sizeof num, "%.17g", v);
    amp_buf_append(b, num, strlen(num));
}

static void put_sample(amp_buf *b, const char *name, const char *suffix, const char *labels,
                       const char *extra, double v) {
    char line[512];
    int has = labels[0] != '\0', ex = extra != NULL;
    snprintf(line, sizeof line, "%s%s%s%s%s%s%s ", name, suffix, has || ex ? "{" : "", labels,
             has && ex ? "," : "", ex ? extra : "", has || ex ? "}" : "");
    amp_buf_append(b, line, strlen(line));
    put_number(b, v);
    amp_buf_append(b, "\n", 1);
}

char *amp_metrics_render(amp_metrics *m) {
    pthread_mutex_lock(&m->mu);
    void (*collect)(void *, amp_metrics *) = m->collect;
    void *ctx = m->collect_ctx;
    pthread_mutex_unlock(&m->mu);
    if (collect)
        collect(ctx, m);

    amp_buf b;
    amp_buf_init(&b, 64 * 1024 * 1024);
    pthread_mutex_lock(&m->mu);
    for (size_t f = 0; f < NFAMILIES; f++) {
        const struct family_def *fd = &families[f];
        if (!m->series[f])
            continue;
        static const char *const type_names[] = {"counter", "gauge", "histogram"};
        char head[512];
        snprintf(head, sizeof head, "# HELP %s %s\n# TYPE %s %s\n", fd->name, fd->help, fd->name,
                 type_names[fd->type]);
        amp_buf_append(&b, head, strlen(head));
        for (amp_series *s = m->series[f]; s; s = s->next) {
            if (fd->type != HISTOGRAM) {
                put_sample(&b, fd->name, "", s->labels, NULL, f64_load(&s->value));
                continue;
            }
            /* Read count first: the buckets then never add up to more. */
            uint64_t count = atomic_load(&s->count), cumulative = 0;
            for (size_t i = 0; i < NBUCKETS; i++) {
                char le[48];
                cumulative += atomic_load(&s->bucket[i]);
                snprintf(le, sizeof le, "le=\"%g\"", buckets[i]);
                put_sample(&b, fd->name, "_bucket", s->labels, le,
                           (double)(cumulative < count ? cumulative : count));
            }
            put_sample(&b, fd->name, "_bucket", s->labels, "le=\"+Inf\"", (double)count);
            put_sample(&b, fd->name, "_sum", s->labels, NULL, f64_load(&s->value));
            put_sample(&b, fd->name, "_count", s->labels, NULL, (double)count);
        }
    }
    pthread_mutex_unlock(&m->mu);
    return b.data ? b.data : amp_xstrdup("");
}
