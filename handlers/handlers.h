/*
 * handlers — the HTTP endpoints (SPEC "HTTP interface"), behind one
 * libmicrohttpd access handler with a static route table:
 *
 *   POST {listen.path}   webhook.c: authenticate, decode, map (sources/),
 *                        submit the batch to the queue, suspend the
 *                        connection; the queue's done callback resumes it
 *                        with 202 or 503
 *   GET  /healthz        health.c
 *   GET  /readyz         health.c
 *   GET  /metrics        metrics.c: Prometheus text format 0.0.4
 *
 * Errors are JSON {"error":"<code>","detail":"<text>"}.
 *
 * Threading: the access and completion callbacks run on libmicrohttpd's
 * threads and never block on disk or network. The config and queue passed to
 * amp_handlers_create are borrowed and must outlive the handlers.
 */
#ifndef AMP_HANDLERS_H
#define AMP_HANDLERS_H

#include <microhttpd.h>
#include <stdbool.h>

#include "../config/config.h"
#include "../base/metrics.h"
#include "../queue/queue.h"

typedef struct amp_handlers amp_handlers;

/* cfg, queue and metrics are borrowed. Caller owns the result. */
amp_handlers *amp_handlers_create(const amp_config *cfg, amp_queue *queue, amp_metrics *metrics);
void amp_handlers_destroy(amp_handlers *h); /* accepts NULL */

/* Serve new requests under cfg (borrowed; it and every config given before
 * must outlive the handlers: requests under way keep theirs). */
void amp_handlers_set_config(amp_handlers *h, const amp_config *cfg);

/* Draining: /readyz answers 503 and webhook requests begun from now on get
 * 503 unavailable with Retry-After, while requests begun before (even if
 * their body is still arriving) finish normally. */
void amp_handlers_set_draining(amp_handlers *h, bool draining);

/* Requests begun before draining and not yet completed (answered and
 * sent, or ended by the client): shutdown waits for zero, within its
 * bound. */
int amp_handlers_open(amp_handlers *h);

/* Of those, connections suspended waiting for the queue: the daemon must
 * not be stopped while any is. */
int amp_handlers_suspended(amp_handlers *h);

/* libmicrohttpd callbacks; cls is the amp_handlers. amp_handlers_uri (the
 * URI log callback) creates the request state as soon as the request line
 * is in, so a request libmicrohttpd answers by itself (headers beyond its
 * buffer) still gets an access-log line and is counted. */
void *amp_handlers_uri(void *cls, const char *uri, struct MHD_Connection *conn);
enum MHD_Result amp_handlers_access(void *cls, struct MHD_Connection *conn, const char *url,
                                    const char *method, const char *version,
                                    const char *upload_data, size_t *upload_data_size,
                                    void **req_cls);
void amp_handlers_completed(void *cls, struct MHD_Connection *conn, void **req_cls,
                            enum MHD_RequestTerminationCode toe);

#endif
