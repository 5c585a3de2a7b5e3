/*
 * forward — delivery to Dify's Service API.
 *
 * A dispatcher thread claims due rows from the queue into per-app queues; a
 * pool of worker threads takes them as each app's limits allow (token
 * bucket rate_per_sec/burst, max_in_flight, a pause after a rejected key
 * with one probe at a growing interval). Each worker owns one reused curl
 * easy handle (keep-alive) and POSTs {base}/<endpoint> with "Authorization:
 * Bearer <app key>" and the event's dedupe key as X-Trace-Id (the Dify
 * sink, dify.c, behind the seam of sink.h). Each exchange is decided in one
 * pure function (amp_forward_decide, decide.c) and the verdict applied:
 * delivered, retry at a backoff time (exponential, full jitter, capped),
 * dead-lettered with Dify's status, code and message, or released without
 * spending an attempt; plus the app's pause. forward.c's opening comment
 * explains the scheduling and the measurements behind it.
 *
 * Threading: amp_forward_start/stop from one thread; the classification and
 * backoff helpers are pure and reentrant.
 */
#ifndef AMP_FORWARD_H
#define AMP_FORWARD_H

#include <jansson.h>
#include <stdbool.h>
#include <stdint.h>

#include "../mapping/mapping.h"
#include "../base/metrics.h"
#include "../queue/queue.h"

/* Largest pool (dify.workers): one thread and one connection each. */
#define AMP_FORWARD_MAX_WORKERS 1024u

typedef struct amp_forward_opts {
    const char *base_url; /* e.g. "https://api.dify.ai/v1", no trailing slash needed */
    long connect_timeout_s;
    long timeout_s;   /* whole request */
    unsigned workers; /* worker threads, 1..AMP_FORWARD_MAX_WORKERS */
    /* Added to the niceness of the dispatcher, the workers and the
     * reporter (0..19), so that when the CPUs are busy, ingest (HTTP and
     * spool threads) goes first and delivery takes what is left. */
    unsigned nice;
    int64_t retry_initial_ms;
    int64_t retry_max_ms;
    int64_t retry_max_age_s; /* older than this at a retry decision: dead, "expired" */
    size_t napps;
    const amp_app *const *apps;  /* array read during start; entries must outlive it */
    const char *const *api_keys; /* parallel to apps; read during start (copied) */
    amp_metrics *metrics;        /* may be NULL; borrowed, must outlive the forwarder */
    int64_t stop_grace_ms;       /* amp_forward_stop waits this long for requests under way,
                                    then ends them; 0: as long as they take */
    /* Apps paused by an operator from the start (amp_forward_set_paused),
     * NULL-terminated names; read during start; may be NULL. */
    const char *const *paused_apps;
    /* Route reports (forward_int.h, report.c): the routes' "report" specs
     * (mapper borrowed, must outlive the forwarder; NULL: none), and where
     * report jobs go: Amplitude's HTTP V2 host (NULL: api2.amplitude.com)
     * and its API key (copied; NULL: no reporter, report jobs wait). */
    const amp_mapper *mapper;
    const char *report_base_url;
    const char *report_api_key;
    unsigned report_batch_events; /* 0: 2000 */
    unsigned report_linger_ms;
    unsigned report_throttle_ms; /* 0: AMP_FORWARD_AMPLITUDE_THROTTLE_MS */
} amp_forward_opts;

typedef struct amp_forward amp_forward;

/* Start the dispatcher and workers. opts, base_url, the apps array and the
 * keys are only read during the call (copied); the amp_app entries are
 * borrowed and must outlive the forwarder; so must queue. Installs
 * amp_forward_kick as the queue's notify callback (amp_forward_stop removes
 * it). Every app needs a
 * non-empty key without control characters. NULL and err on failure. */
amp_forward *amp_forward_start(const amp_forward_opts *opts, amp_queue *queue, char *err,
                               size_t errlen);
/* Stop claiming, let workers finish their current request (for up to
 * opts.stop_grace_ms; requests still under way then are ended and their rows
 * released, not counted as attempts), release claimed rows not yet sent,
 * join, remove the queue's notify callback and amp_queue_flush so every
 * acknowledgement is stored before the caller closes the queue. Accepts
 * NULL. */
void amp_forward_stop(amp_forward *f);

/* Wake the dispatcher (new work was committed). Safe from any thread. */
void amp_forward_kick(amp_forward *f);

/* What Dify says about one app (appinfo.c): GET {base}/info and
 * {base}/parameters with its key (borrowed). 0 with *mode (caller owns) and
 * *form (the user_input_form array, caller owns); -1 with err when Dify did
 * not answer both with 200 JSON (unreachable, a rejected key...).
 * curl_global_init must have run. */
int amp_forward_app_describe(const char *base_url, const char *key, long connect_timeout_s,
                             long timeout_s, char **mode, json_t **form, char *err, size_t errlen);
/* ---- operators (the admin API, through cmd/serve.c) -------------------
 * Pause or resume an app. A paused app sends nothing new (requests under
 * way finish); its rows wait, in its memory queue or, when that is full,
 * in the queue with a due time as far ahead as the pause has lasted,
 * between AMP_FORWARD_HOLD_DEFER_MIN_MS and _MAX_MS (so after a resume they
 * come back within that), and other apps go on. Gauge
 * amp2dify_app_paused_by_operator{app}. The pause lives in this forwarder:
 * whoever starts the next one passes it in opts.paused_apps. 0, or -1 for
 * an app this forwarder does not know. Safe from any thread. */
#define AMP_FORWARD_HOLD_DEFER_MIN_MS ((int64_t)2000)
#define AMP_FORWARD_HOLD_DEFER_MAX_MS ((int64_t)30000)
int amp_forward_set_paused(amp_forward *f, const char *app, bool paused);
/* Every app's state: {"<app>": {"paused" (by an operator), "key_rejected"
 * (Dify refused its key: paused until a probe gets through), "in_flight",
 * "queued_in_memory"}}. Caller owns. Safe from any thread. */
json_t *amp_forward_apps(amp_forward *f);

/* ---- pure helpers, exposed for tests ---------------------------------- */

typedef enum {
    AMP_OUTCOME_DELIVERED,
    AMP_OUTCOME_RETRY,
    AMP_OUTCOME_PERMANENT,
    AMP_OUTCOME_PAUSE_APP,          /* 401 / 403: bad key or disabled app */
    AMP_OUTCOME_RESET_CONVERSATION, /* 404 "Conversation Not Exists.", 400 conversation_completed */
    AMP_OUTCOME_WAITING_INPUT,      /* a workflow paused for human input (workflow_paused,
                                       human_input_required): no result yet, nothing to retry */
} amp_outcome;

/* Classify one exchange. transport_error is non-zero when no HTTP answer
 * arrived (connect failure, timeout, dropped connection); body is Dify's
 * parsed answer or NULL. *code and *message (may be NULL) receive borrowed
 * pointers into body when it carries Dify's {"code","message","status"}. */
amp_outcome amp_forward_classify(int transport_error, long http_status, const json_t *body,
                                 const char **code, const char **message);

/* Full-jitter exponential backoff: uniform in [0, min(max_ms, initial_ms *
 * 2^attempt)], using rnd (uniform in [0, 1)). attempt counts from 0. */
int64_t amp_forward_backoff_ms(int64_t initial_ms, int64_t max_ms, int attempt, double rnd);

/* Parse a Retry-After header value (delta seconds or an HTTP date in any of
 * RFC 9110 5.6.7's three forms: IMF-fixdate, RFC 850, asctime; libcurl's
 * curl_getdate reads them) into milliseconds from now_ms; -1 when absent or
 * unparsable. */
int64_t amp_forward_retry_after_ms(const char *value, int64_t now_ms);

#endif
