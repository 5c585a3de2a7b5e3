/*
 * handlers_int — what the endpoint files of handlers/ share: the per-request
 * state, the handlers object, and the reply helpers (reply.c). Private to
 * handlers/.
 */
#ifndef AMP_HANDLERS_INT_H
#define AMP_HANDLERS_INT_H

#include <stdatomic.h>

#include "../base/buf.h"
#include "handlers.h"

typedef struct amp_cidr amp_cidr;

/* One loaded config and what is derived from it. Replaced on reload; old
 * generations stay until amp_handlers_destroy, so a request keeps the one
 * it started with. */
typedef struct amp_handlers_gen {
    const amp_config *cfg;
    amp_cidr *proxies; /* listen.trusted_proxies, parsed */
    size_t nproxies;
    struct amp_handlers_gen *older;
} amp_handlers_gen;

struct amp_handlers {
    _Atomic(amp_handlers_gen *) gen;
    amp_queue *queue;
    amp_metrics *metrics;
    amp_series *ingest_seconds;
    amp_series *events_accepted, *events_duplicate, *events_filtered, *events_rejected;
    /* amp2dify_http_requests_total for 200 and 202, looked up on first use
     * (a series shows in /metrics from its first request, as every code's). */
    _Atomic(amp_series *) http_200, http_202;
    atomic_bool draining;
    atomic_int open;      /* requests admitted (begun before draining), not yet completed */
    atomic_int suspended; /* of those, connections waiting for the spool's answer */
    /* Generated request ids: a random prefix drawn at start, then a count. */
    uint64_t id_prefix;
    atomic_uint_fast64_t id_next;
};

typedef struct amp_req amp_req;
typedef enum MHD_Result (*amp_endpoint_fn)(amp_handlers *h, amp_req *r);

typedef enum { REQ_READING, REQ_WAITING, REQ_DONE } amp_req_state;

/* One HTTP request; created on the first callback, freed on completion. */
struct amp_req {
    amp_handlers *h;
    const amp_handlers_gen *gen; /* the config this request runs under */
    struct MHD_Connection *conn;
    amp_endpoint_fn endpoint;
    char request_id[64];
    char client[64];   /* see client.c */
    int64_t start_us;  /* monotonic */
    unsigned status;   /* the answer's status, once queued */
    const char *error; /* its error code (static), for the access log */
    bool webhook;
    bool admitted; /* begun before shutdown: answered normally, counted in h->open */
    bool routed;   /* the access handler has seen it (headers complete) */
    /* body (webhook) */
    amp_buf body;
    bool too_large;
    size_t discarded; /* bytes dropped after the body outgrew the cap */
    /* the spool's answer, written by the committer before it resumes us */
    _Atomic amp_req_state state;
    amp_queue_result result;
    unsigned filtered;
    size_t nevents; /* events of the request (sdk.c) */
};

/* reply.c — each queues a JSON response and returns MHD's result. */
enum MHD_Result amp_handlers_reply_json(amp_req *r, unsigned status,
                                        json_t *body /* takes ownership */);
enum MHD_Result amp_handlers_reply_error(amp_req *r, unsigned status, const char *code,
                                         const char *detail);
/* The same for a body already written as JSON text (malloc'd; taken). */
enum MHD_Result amp_handlers_reply_text(amp_req *r, unsigned status, char *text);
/* Like amp_handlers_reply_error, with one extra header (e.g. Allow). */
enum MHD_Result amp_handlers_reply_error_hdr(amp_req *r, unsigned status, const char *code,
                                             const char *detail, const char *hname,
                                             const char *hvalue);
/* 503 unavailable with Retry-After: RETRY_SOON_S while shutting down or
 * while the spool fails, RETRY_FULL_S when it is full (it drains slower). */
#define RETRY_SOON_S 5
#define RETRY_FULL_S 30
enum MHD_Result amp_handlers_reply_unavailable(amp_req *r, const char *detail,
                                               unsigned retry_after_s);

/* router.c: r->request_id from X-Request-Id when it is short and printable,
 * else 16 random bytes in hex. */
void amp_handlers_request_id(amp_req *r);
/* router.c: true when the request declares (Content-Length) a body larger
 * than listen.max_body_bytes, so it can be refused before any is read. */
bool amp_handlers_declares_too_large(const amp_req *r);
/* router.c: hand batch (taken) to the queue and suspend the connection
 * until it is stored; the endpoint's finish step then finds r->state
 * REQ_DONE and the answer in r->result. Returns MHD_YES. */
enum MHD_Result amp_handlers_submit(amp_req *r, amp_queue_batch *batch);
/* router.c: once the queue answered (r->result), count the request's
 * filtered, accepted and duplicate events; false, logged, when nothing was
 * stored (r->result.error says why). */
bool amp_handlers_stored_ok(amp_req *r);

/* webhook.c */
enum MHD_Result amp_handlers_webhook_begin(amp_handlers *h, amp_req *r);
enum MHD_Result amp_handlers_webhook_finish(amp_handlers *h, amp_req *r);

/* sdk.c: the Amplitude HTTP V2-shaped endpoint (sources.sdk) */
enum MHD_Result amp_handlers_sdk_begin(amp_handlers *h, amp_req *r);
enum MHD_Result amp_handlers_sdk_finish(amp_handlers *h, amp_req *r);

/* client.c */
amp_cidr *amp_handlers_client_parse_proxies(char *const *cidrs, size_t n,
                                            size_t *count); /* caller owns */
void amp_handlers_client_address(const amp_handlers_gen *g, struct MHD_Connection *conn, char *out,
                                 size_t len);

/* metrics.c */
enum MHD_Result amp_handlers_metrics_endpoint(amp_handlers *h, amp_req *r);

/* health.c */
enum MHD_Result amp_handlers_health_healthz(amp_handlers *h, amp_req *r);
enum MHD_Result amp_handlers_health_readyz(amp_handlers *h, amp_req *r);

#endif
