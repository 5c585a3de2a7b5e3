/*
 * router — the access handler: match the route, create the request state on
 * the first call, collect the body into a capped buffer, and hand the final
 * call to the endpoint.
 */
#include <openssl/rand.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../base/log.h"
#include "../json/jsonw.h"
#include "handlers_int.h"
#include "http.h"
#include "../base/alloc.h"
#include "../base/buf.h"
#include "../base/clock.h"
#include "../base/parse.h"

/* How much of an oversized body is read and dropped before the connection
 * is cut, in multiples of listen.max_body_bytes. */
#define DISCARD_LIMIT_FACTOR 4

typedef struct route {
    const char *path; /* NULL: the configured webhook path, or sources.sdk.path when sdk */
    bool sdk;
    const char *method;
    amp_endpoint_fn begin; /* first call, may reply at once; NULL for none */
    amp_endpoint_fn finish;
} route;

static const route routes[] = {
    {NULL, false, MHD_HTTP_METHOD_POST, amp_handlers_webhook_begin, amp_handlers_webhook_finish},
    {NULL, true, MHD_HTTP_METHOD_POST, amp_handlers_sdk_begin, amp_handlers_sdk_finish},
    {"/healthz", false, MHD_HTTP_METHOD_GET, NULL, amp_handlers_health_healthz},
    {"/readyz", false, MHD_HTTP_METHOD_GET, NULL, amp_handlers_health_readyz},
    {"/metrics", false, MHD_HTTP_METHOD_GET, NULL, amp_handlers_metrics_endpoint},
};

/* A GET endpoint answers HEAD too (libmicrohttpd then sends the headers
 * without the body), so probes such as `wget --spider` work. */
static bool is_get(const route *rt) {
    return strcmp(rt->method, MHD_HTTP_METHOD_GET) == 0;
}

static bool allowed(const route *rt, const char *method) {
    return strcmp(method, rt->method) == 0 ||
           (is_get(rt) && strcmp(method, MHD_HTTP_METHOD_HEAD) == 0);
}

amp_handlers *amp_handlers_create(const amp_config *cfg, amp_queue *queue, amp_metrics *metrics) {
    amp_handlers *h = amp_xcalloc(1, sizeof *h);
    atomic_init(&h->gen, NULL);
    amp_handlers_set_config(h, cfg);
    h->queue = queue;
    h->metrics = metrics;
    h->ingest_seconds = amp_metrics_series(metrics, "amp2dify_ingest_duration_seconds", NULL);
    h->events_accepted =
        amp_metrics_series(metrics, "amp2dify_events_total", "outcome", "accepted", NULL);
    h->events_duplicate =
        amp_metrics_series(metrics, "amp2dify_events_total", "outcome", "duplicate", NULL);
    h->events_filtered =
        amp_metrics_series(metrics, "amp2dify_events_total", "outcome", "filtered", NULL);
    h->events_rejected =
        amp_metrics_series(metrics, "amp2dify_events_total", "outcome", "rejected", NULL);
    atomic_init(&h->http_200, NULL);
    atomic_init(&h->http_202, NULL);
    atomic_init(&h->draining, false);
    atomic_init(&h->open, 0);
    atomic_init(&h->suspended, 0);
    /* Unique ids need no randomness per request; without OpenSSL's random
     * bytes the ids are still unique within this process. */
    if (RAND_bytes((unsigned char *)&h->id_prefix, sizeof h->id_prefix) != 1)
        h->id_prefix = (uint64_t)amp_now_ms();
    atomic_init(&h->id_next, 0);
    return h;
}

void amp_handlers_set_config(amp_handlers *h, const amp_config *cfg) {
    amp_handlers_gen *g = amp_xcalloc(1, sizeof *g);
    g->cfg = cfg;
    g->proxies = amp_handlers_client_parse_proxies(cfg->listen.trusted_proxies,
                                                   cfg->listen.ntrusted_proxies, &g->nproxies);
    g->older = atomic_load(&h->gen);
    atomic_store(&h->gen, g);
}

void amp_handlers_destroy(amp_handlers *h) {
    if (!h)
        return;
    for (amp_handlers_gen *g = atomic_load(&h->gen), *older; g; g = older) {
        older = g->older;
        free(g->proxies);
        free(g);
    }
    free(h);
}

void amp_handlers_set_draining(amp_handlers *h, bool draining) {
    atomic_store(&h->draining, draining);
}

int amp_handlers_open(amp_handlers *h) {
    return atomic_load(&h->open);
}

int amp_handlers_suspended(amp_handlers *h) {
    /* The spool drops this count just after resuming a connection, and the
     * request may be answered and completed in between: one completed is
     * not waiting. Every waiting request is open (admitted before it is
     * suspended, completed only after its resume), so when none is open
     * none waits; read in this order, a request still open is counted. */
    int n = atomic_load(&h->suspended);
    return atomic_load(&h->open) > 0 ? n : 0;
}

/* A request begun before shutdown is admitted: it finishes normally (a
 * webhook is stored and answered 202), and shutdown waits for it. Counted
 * before draining is read, so that shutdown, which sets draining and then
 * reads the count, either sees this request or is seen by it. */
static void admit(amp_handlers *h, amp_req *r) {
    atomic_fetch_add(&h->open, 1);
    r->admitted = !atomic_load(&h->draining);
    if (!r->admitted)
        atomic_fetch_sub(&h->open, 1);
}

/* Runs on the committer thread: record the answer and wake the connection. */
static void stored(void *ctx, const amp_queue_result *res) {
    amp_req *r = ctx;
    amp_handlers *h = r->h; /* r may be gone once resumed */
    r->result = *res;
    atomic_store(&r->state, REQ_DONE);
    MHD_resume_connection(r->conn);
    atomic_fetch_sub(&h->suspended, 1);
}

bool amp_handlers_stored_ok(amp_req *r) {
    const amp_queue_result *res = &r->result;
    amp_handlers *h = r->h;
    amp_series_add(h->events_filtered, r->filtered);
    if (res->status != 0) {
        amp_log(AMP_LOG_ERROR, "request not stored", "{s:s, s:s}", "request_id", r->request_id,
                "error", res->error ? res->error : "unknown");
        return false;
    }
    amp_series_add(h->events_accepted, res->accepted);
    amp_series_add(h->events_duplicate, res->duplicates);
    return true;
}

bool amp_handlers_declares_too_large(const amp_req *r) {
    const char *cl =
        MHD_lookup_connection_value(r->conn, MHD_HEADER_KIND, MHD_HTTP_HEADER_CONTENT_LENGTH);
    int64_t len;
    return cl && amp_parse_i64(cl, strlen(cl), 0, INT64_MAX, &len) == 0 &&
           (uint64_t)len > r->gen->cfg->listen.max_body_bytes;
}

enum MHD_Result amp_handlers_submit(amp_req *r, amp_queue_batch *batch) {
    atomic_store(&r->state, REQ_WAITING);
    atomic_fetch_add(&r->h->suspended, 1);
    MHD_suspend_connection(r->conn);
    amp_queue_submit(r->h->queue, batch, stored, r);
    return MHD_YES;
}

void amp_handlers_request_id(amp_req *r) {
    const char *given = MHD_lookup_connection_value(r->conn, MHD_HEADER_KIND, "X-Request-Id");
    if (given) {
        size_t n = strlen(given);
        int ok = n > 0 && n < sizeof r->request_id;
        for (size_t i = 0; ok && i < n; i++)
            ok = given[i] > 0x20 && given[i] < 0x7f && given[i] != '"' && given[i] != '\\';
        if (ok) {
            memcpy(r->request_id, given, n + 1);
            return;
        }
    }
    static const char hex[] = "0123456789abcdef";
    uint64_t v[2] = {r->h->id_prefix, atomic_fetch_add(&r->h->id_next, 1)};
    char *out = r->request_id;
    for (int w = 0; w < 2; w++)
        for (int shift = 60; shift >= 0; shift -= 4)
            *out++ = hex[(v[w] >> shift) & 0xf];
    *out = '\0';
}

static const route *match(const amp_config *cfg, const char *url) {
    for (size_t i = 0; i < sizeof routes / sizeof routes[0]; i++) {
        const char *path = routes[i].path ? routes[i].path
                           : routes[i].sdk
                               ? (cfg->sources.sdk.enabled ? cfg->sources.sdk.path : NULL)
                               : cfg->listen.path;
        if (path && strcmp(path, url) == 0)
            return &routes[i];
    }
    return NULL;
}

static enum MHD_Result first_call(amp_handlers *h, amp_req *r, const char *url,
                                  const char *method) {
    size_t max_header = r->gen->cfg->listen.max_header_bytes;
    const union MHD_ConnectionInfo *hs =
        MHD_get_connection_info(r->conn, MHD_CONNECTION_INFO_REQUEST_HEADER_SIZE);
    if (hs && hs->header_size > max_header) {
        char detail[128];
        snprintf(detail, sizeof detail, "the request line and headers are %zu bytes; at most %zu",
                 hs->header_size, max_header);
        return amp_handlers_reply_error(r, MHD_HTTP_REQUEST_HEADER_FIELDS_TOO_LARGE,
                                        "headers_too_large", detail);
    }
    const route *rt = match(r->gen->cfg, url);
    if (!rt)
        return amp_handlers_reply_error(r, MHD_HTTP_NOT_FOUND, "not_found", "no such endpoint");
    if (!allowed(rt, method)) {
        const char *allow = is_get(rt) ? MHD_HTTP_METHOD_GET ", " MHD_HTTP_METHOD_HEAD : rt->method;
        char detail[64];
        snprintf(detail, sizeof detail, "%s only accepts %s", rt->path ? rt->path : "this path",
                 allow);
        return amp_handlers_reply_error_hdr(r, MHD_HTTP_METHOD_NOT_ALLOWED, "method_not_allowed",
                                            detail, MHD_HTTP_HEADER_ALLOW, allow);
    }
    r->endpoint = rt->finish;
    r->webhook = rt->path == NULL;
    return rt->begin ? rt->begin(h, r) : MHD_YES;
}

static amp_req *req_new(amp_handlers *h, struct MHD_Connection *conn) {
    amp_req *r = amp_xcalloc(1, sizeof *r);
    r->h = h;
    r->gen = atomic_load(&h->gen);
    r->conn = conn;
    r->start_us = amp_mono_us();
    amp_buf_init(&r->body, r->gen->cfg->listen.max_body_bytes);
    atomic_init(&r->state, REQ_READING);
    return r;
}

void *amp_handlers_uri(void *cls, const char *uri, struct MHD_Connection *conn) {
    (void)uri;
    return req_new(cls, conn);
}

enum MHD_Result amp_handlers_access(void *cls, struct MHD_Connection *conn, const char *url,
                                    const char *method, const char *version,
                                    const char *upload_data, size_t *upload_data_size,
                                    void **req_cls) {
    (void)version;
    amp_handlers *h = cls;
    amp_req *r = *req_cls;

    if (!r) /* no URI log callback (not started by amp_http_start) */
        r = *req_cls = req_new(h, conn);
    if (!r->routed) {
        r->routed = true;
        r->start_us = amp_mono_us(); /* the headers are in */
        admit(h, r);
        amp_handlers_request_id(r);
        amp_handlers_client_address(r->gen, conn, r->client, sizeof r->client);
        enum MHD_Result ret = first_call(h, r, url, method);
        /* Answered at once: being sent. Else its body (if any) is due. */
        amp_http_conn_phase(conn, r->status ? AMP_HTTP_CONN_BUSY : AMP_HTTP_CONN_BODY);
        return ret;
    }
    if (!r->endpoint) /* answered on the first call; discard any body */
        return *upload_data_size = 0, MHD_YES;

    if (*upload_data_size) {
        if (!r->too_large && amp_buf_append(&r->body, upload_data, *upload_data_size) != 0) {
            r->too_large = true;
            amp_buf_free(&r->body);
        }
        if (r->too_large) {
            /* A body without Content-Length that outgrows the cap: read and
             * drop a little more so an honest sender still gets its 413,
             * then cut the connection (libmicrohttpd cannot answer in the
             * middle of an upload). */
            r->discarded += *upload_data_size;
            if (r->discarded > DISCARD_LIMIT_FACTOR * r->gen->cfg->listen.max_body_bytes) {
                amp_log(AMP_LOG_INFO, "request cut", "{s:s, s:s, s:s}", "request_id", r->request_id,
                        "client", r->client, "error", "body_too_large");
                return MHD_NO;
            }
        }
        *upload_data_size = 0;
        return MHD_YES;
    }
    amp_http_conn_phase(conn, AMP_HTTP_CONN_BUSY);
    return r->endpoint(h, r);
}

/* A request libmicrohttpd answered by itself before our handler saw it:
 * its headers outgrew the buffer (431), or the request line or a header did
 * not parse (400). Logged and counted like our own answers. */
static void answered_by_library(amp_req *r) {
    const union MHD_ConnectionInfo *st =
        MHD_get_connection_info(r->conn, MHD_CONNECTION_INFO_HTTP_STATUS);
    r->status = st ? st->http_status : 0;
    if (!r->status)
        return;
    r->error = r->status == MHD_HTTP_REQUEST_HEADER_FIELDS_TOO_LARGE ? "headers_too_large"
               : r->status == MHD_HTTP_URI_TOO_LONG                  ? "uri_too_long"
                                                                     : "bad_request";
    amp_handlers_request_id(r);
    amp_handlers_client_address(r->gen, r->conn, r->client, sizeof r->client);
}

/* ---- the access line ------------------------------------------------ */

/* ,"key": (no comma first); key is a plain literal. */
static int put_key(amp_buf *b, const char *key) {
    return (b->len && amp_buf_append(b, ",", 1) != 0) || amp_buf_append(b, "\"", 1) != 0 ||
                   amp_buf_append(b, key, strlen(key)) != 0 || amp_buf_append(b, "\":", 2) != 0
               ? -1
               : 0;
}

static int put_str(amp_buf *b, const char *key, const char *v) {
    if (put_key(b, key) != 0)
        return -1;
    return v ? amp_json_write_string(b, v, strlen(v)) : amp_buf_append(b, "null", 4);
}

static int put_int(amp_buf *b, const char *key, long long v) {
    return put_key(b, key) != 0 || amp_json_write_int(b, v) != 0 ? -1 : 0;
}

/* The one access line of a webhook request (the event bodies stay out).
 * Written straight into a buffer: built as jansson values it cost about
 * 6 us of every request. The line is the one the amp_log calls below (the
 * fallback, for a value jansson must report on) write. */
static void access_line(const amp_req *r, enum MHD_RequestTerminationCode toe, int64_t ms) {
    if (!amp_log_enabled(AMP_LOG_INFO))
        return;
    bool ok = r->status == MHD_HTTP_ACCEPTED || r->status == MHD_HTTP_OK;
    amp_buf b;
    amp_buf_init(&b, 4096);
    int bad = put_str(&b, "request_id", r->request_id) || put_str(&b, "client", r->client) ||
              put_int(&b, "status", (int)r->status);
    if (ok)
        bad = bad || put_int(&b, "accepted", (int)r->result.accepted) ||
              put_int(&b, "duplicates", (int)r->result.duplicates) ||
              put_int(&b, "filtered", (int)r->filtered);
    else
        bad = bad || put_str(&b, "error", r->error) || put_int(&b, "termination", (int)toe);
    bad = bad || put_int(&b, "ms", ms);
    if (!bad)
        amp_log_fields(AMP_LOG_INFO, "request", b.data, b.len);
    else if (ok)
        amp_log(AMP_LOG_INFO, "request", "{s:s, s:s, s:i, s:i, s:i, s:i, s:I}", "request_id",
                r->request_id, "client", r->client, "status", (int)r->status, "accepted",
                (int)r->result.accepted, "duplicates", (int)r->result.duplicates, "filtered",
                (int)r->filtered, "ms", (json_int_t)ms);
    else
        amp_log(AMP_LOG_INFO, "request", "{s:s, s:s, s:i, s:s?, s:i, s:I}", "request_id",
                r->request_id, "client", r->client, "status", (int)r->status, "error", r->error,
                "termination", (int)toe, "ms", (json_int_t)ms);
    amp_buf_free(&b);
}

/* amp2dify_http_requests_total{code}; the two codes of accepted webhooks
 * skip the registry's lookup (its lock and label building) after the first. */
static amp_series *requests_series(amp_handlers *h, unsigned status) {
    _Atomic(amp_series *) *cached = status == MHD_HTTP_ACCEPTED ? &h->http_202
                                    : status == MHD_HTTP_OK     ? &h->http_200
                                                                : NULL;
    amp_series *s = cached ? atomic_load(cached) : NULL;
    if (s)
        return s;
    char code[16];
    snprintf(code, sizeof code, "%u", status);
    s = amp_metrics_series(h->metrics, "amp2dify_http_requests_total", "code", code, NULL);
    if (cached)
        atomic_store(cached, s); /* the registry gives every caller the same series */
    return s;
}

void amp_handlers_completed(void *cls, struct MHD_Connection *conn, void **req_cls,
                            enum MHD_RequestTerminationCode toe) {
    amp_handlers *h = cls;
    amp_req *r = *req_cls;
    if (!r)
        return;
    *req_cls = NULL;
    amp_http_conn_phase(conn, AMP_HTTP_CONN_IDLE);
    if (!r->routed)
        answered_by_library(r);
    if (r->admitted)
        atomic_fetch_sub(&h->open, 1);
    if (r->status)
        amp_series_inc(requests_series(h, r->status));
    if (r->webhook) {
        /* In microseconds: a difference of two readings in whole
         * milliseconds is up to 1 ms off, and most answers take 1-3 ms. */
        int64_t us = amp_mono_us() - r->start_us;
        amp_series_observe(h->ingest_seconds, (double)us / 1e6);
        access_line(r, toe, us / 1000);
    } else if (r->status == MHD_HTTP_REQUEST_HEADER_FIELDS_TOO_LARGE || (!r->routed && r->status)) {
        /* Oversized or unparsable headers: one access line, whatever the path. */
        amp_log(AMP_LOG_INFO, "request", "{s:s, s:s, s:i, s:s?, s:I}", "request_id", r->request_id,
                "client", r->client, "status", (int)r->status, "error", r->error, "ms",
                (json_int_t)((amp_mono_us() - r->start_us) / 1000));
    } else if (toe != MHD_REQUEST_TERMINATED_COMPLETED_OK) {
        amp_log(AMP_LOG_DEBUG, "request ended early", "{s:s, s:s, s:i}", "request_id",
                r->request_id, "client", r->client, "reason", (int)toe);
    }
    amp_buf_free(&r->body);
    free(r);
}
