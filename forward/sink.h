/*
 * sink — the seam between the delivery engine and one destination API.
 *
 * forward.c owns scheduling (claims, per-app queues, limits, pause,
 * workers) and acknowledgements; a sink owns the wire: how a stored job
 * becomes a request, and what the answer says, as an amp_forward_exchange
 * that amp_forward_decide (decide.c) turns into a verdict. Dify's Service
 * API is the first sink (dify.c); another destination (say, results sent
 * back to Amplitude's HTTP API) is a sibling file with its own table of
 * these functions, not a branch inside forward.c.
 *
 * Threading: an app handle is created before the workers start and only
 * read afterwards (shared by all workers); a connection belongs to one
 * worker thread.
 */
#ifndef AMP_FORWARD_SINK_H
#define AMP_FORWARD_SINK_H

#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

#include "forward_int.h"

typedef struct amp_forward_sink {
    const char *name; /* for logs: "dify" */
    /* Per app: what every request of the app needs (URL, credentials).
     * base_url and key are read during the call; app is borrowed and must
     * outlive the handle. NULL and err on failure. Caller owns. */
    void *(*app_create)(const char *base_url, const amp_app *app, const char *key, char *err,
                        size_t errlen);
    void (*app_destroy)(void *app); /* accepts NULL; wipes credentials */
    /* Per worker: one reused connection. A request under way ends soon
     * after *abort_flag (borrowed, may be NULL) turns true. NULL and err on
     * failure. Caller owns. */
    void *(*conn_create)(long connect_timeout_s, long timeout_s, const atomic_bool *abort_flag,
                         char *err, size_t errlen);
    void (*conn_destroy)(void *conn); /* accepts NULL */
    /* Send job (borrowed) for app and fill the "what happened" part of *ex
     * (refused_* .. streamed), had_conversation and now_ms (the wall clock
     * when the answer arrived); its strings are borrowed from conn until
     * release. Never fails
     * otherwise: every problem is described in *ex. */
    void (*send)(void *conn, const void *app, const amp_queue_job *job, amp_forward_exchange *ex);
    /* The delivery result to keep for a job decided DELIVERED, from the
     * last answer. Caller owns (free); NULL for none. */
    char *(*result)(void *conn, const void *app);
    /* Forget the last answer (the exchange's strings die with it). */
    void (*release)(void *conn);
} amp_forward_sink;

/* The Dify Service API sink (dify.c): a static table, never freed. */
const amp_forward_sink *amp_forward_dify_sink(void);

#endif
