/*
 * forward_int — private pieces shared by the files of the forward module:
 *
 *   classify.c  pure helpers: outcome, backoff, Retry-After, URL joining,
 *               the stored delivery result (forward.h declares the public
 *               ones, the rest are here so unit tests can reach them)
 *   decide.c    pure: what one exchange with a sink means (the ack, the
 *               conversation, the app's pause)
 *   sink.h      the seam between the engine and a destination API
 *   dify.c      the Dify sink: request, headers, answer -> exchange; a
 *               dropped workflow stream resumed by its run id
 *   appinfo.c   GET /info and /parameters of an app, for config checks
 *   http.c      one HTTP connection: a reused curl easy handle, a capped
 *               response buffer, Retry-After capture
 *   sse.c       incremental parser of Dify's streaming answers
 *               (text/event-stream), folding the events into the same JSON
 *               shape a blocking answer has
 *   amplitude.c Amplitude's HTTP V2 API: batched report events, each
 *               event's fate from the answer (400 / 413 / 429 rules)
 *   report.c    route reports: the event, its storage, the reporter thread
 *               that batches report jobs to Amplitude
 *   pace.c      pure pacing arithmetic: token bucket, probe interval of a
 *               paused app, due times of rows sent back to the spool
 *   forward.c   dispatcher, per-app queues and limits, worker pool,
 *               acknowledgements
 *
 * Threading: an amp_forward_http or amp_forward_sse belongs to one thread at
 * a time (one per worker); everything in classify.c, decide.c and pace.c is
 * pure and reentrant.
 */
#ifndef AMP_FORWARD_INT_H
#define AMP_FORWARD_INT_H

#include <curl/curl.h>
#include <stdatomic.h>
#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "../mapping/mapping.h"
#include "../base/version.h"
#include "../queue/queue.h"
#include "forward.h"

/* Fallback for builds that leave version.h out. */
#ifndef AMP_VERSION
#define AMP_VERSION "0.1.0"
#endif

/* Largest Dify answer kept in memory. Blocking answers are one JSON object
 * of an LLM reply plus metadata; 1 MiB is far above any real one. */
#define AMP_FORWARD_MAX_RESPONSE ((size_t)1 << 20)
/* Bytes of the answer text kept in the stored delivery result. */
#define AMP_FORWARD_ANSWER_CAP ((size_t)4096)
/* Longest wait a Retry-After header may impose. */
#define AMP_FORWARD_RETRY_AFTER_CAP_MS ((int64_t)86400 * 1000)

/* ---- classify.c ------------------------------------------------------ */

/* Length of the longest prefix of s[0..len) that is at most max bytes and
 * does not end inside a UTF-8 sequence. */
size_t amp_forward_utf8_cut(const char *s, size_t len, size_t max);

/* "{base}/{path}" with any trailing slashes of base dropped. Caller owns. */
char *amp_forward_join_url(const char *base, const char *path);

/* Request body to send: body_json as is, or with "conversation_id" and
 * "workflow_id" set for those that are non-NULL and non-empty. Caller owns;
 * NULL when body_json is not a JSON object (only then). */
char *amp_forward_request_body(const char *body_json, const char *conversation_id,
                               const char *workflow_id);

/* The X-Trace-Id Dify accepts is ^[A-Za-z0-9_-]{1,128}$. A dedupe key of
 * that form is sent as it is; any other (longer, dots, colons, spaces...)
 * as the lowercase hex SHA-256 of the key, so one event always gets the
 * same id. out receives a terminated string; NULL or "" key: "". */
#define AMP_FORWARD_TRACE_ID_MAX 128
void amp_forward_trace_id(const char *key, char out[AMP_FORWARD_TRACE_ID_MAX + 1]);

/* The conversation id in a Dify answer (borrowed from body), or NULL. */
const char *amp_forward_answer_conversation(const json_t *body);

/* The delivery result kept in the spool: {"status", "message_id" or
 * "workflow_run_id", "conversation_id", "usage", "latency_ms", "answer" (at
 * most AMP_FORWARD_ANSWER_CAP bytes) or, for workflows, "workflow_status"
 * and "outputs"}. body (borrowed) may be NULL. Caller owns the result. */
json_t *amp_forward_result(amp_endpoint endpoint, long http_status, const json_t *body,
                           int64_t latency_ms);

/* ---- decide.c: one exchange, one verdict ------------------------------
 * A delivery is: send (the sink), decide (pure, here), apply (forward.c:
 * ack, logs, metrics, pause bookkeeping). Everything the decision depends
 * on is in the exchange, so a table of exchanges tests every rule. */

/* What the ack does to the conversation stored for (app, user). */
typedef enum {
    AMP_FORWARD_CONV_KEEP,  /* leave it as it is */
    AMP_FORWARD_CONV_STORE, /* store verdict.conversation_id (per_user answers) */
    AMP_FORWARD_CONV_CLEAR, /* forget it: the next attempt starts a new one */
} amp_forward_conv;

/* What the exchange says about the app's key. forward.c applies it to the
 * app's pause state (which only it knows): PAUSE and PROBE_REJECTED pause
 * an app that is not paused; PROBE_REJECTED of a paused app doubles the
 * probe interval; PROBE_AGAIN keeps a paused app paused for the same
 * interval; RESUME ends a pause. */
typedef enum {
    AMP_FORWARD_PAUSE_NONE,           /* nothing learnt about the key */
    AMP_FORWARD_PAUSE_APP,            /* a request's key was rejected (401/403) */
    AMP_FORWARD_PAUSE_PROBE_REJECTED, /* the probe's key was rejected */
    AMP_FORWARD_PAUSE_PROBE_AGAIN,    /* the probe got no verdict (429, 5xx, no answer) */
    AMP_FORWARD_PAUSE_RESUME,         /* an answer got past the key check */
} amp_forward_pause;

/* One exchange with a sink, and the job and settings around it. Strings
 * are borrowed (from the sink's reply or the job) for as long as the
 * verdict is used. */
typedef struct amp_forward_exchange {
    /* What happened; the sink fills these. */
    const char *refused_code; /* non-NULL: nothing was sent (the job cannot make a
                                 request): dead letter with this code */
    const char *refused_message;
    bool aborted;               /* ended by amp_forward_stop past its grace */
    int transport_error;        /* non-zero: no whole answer (connect, timeout, cut stream) */
    const char *transport_code; /* "timeout", "connect_failed", ... */
    const char *transport_message;
    long status;                 /* HTTP status; 0 when none arrived */
    const char *code, *message;  /* Dify's {"code","message"} when present */
    const char *workflow_status; /* a workflow answer's data.status, or NULL */
    const char *workflow_error;  /* its data.error, or NULL */
    const char *conversation_id; /* the answer's conversation id (non-empty), or NULL */
    bool too_large;              /* the answer exceeded AMP_FORWARD_MAX_RESPONSE */
    bool waiting_input;          /* the run paused for human input (workflow_paused,
                                    human_input_required, or data.status "paused") */
    const char *run_id;          /* the workflow run the request started (streams show it
                                    early), or NULL: a retry resumes it instead of posting */
    int64_t retry_after_ms;      /* Retry-After, parsed; -1 when absent */
    int64_t latency_us;          /* reported, not decided on */
    bool streamed;               /* reported, not decided on */
    /* The job. */
    int attempts;          /* made before this one */
    int64_t created_ms;    /* start of its schedule (wall clock) */
    bool per_user;         /* its (app, user) keeps a conversation */
    bool had_conversation; /* the request carried a conversation id */
    bool probe;            /* it was its paused app's probe */
    /* Settings, clock, chance. */
    int64_t now_ms; /* wall clock when the answer arrived */
    int64_t retry_initial_ms, retry_max_ms;
    int64_t retry_max_age_s; /* <= 0: no expiry */
    double rnd;              /* uniform in [0, 1): backoff jitter */
} amp_forward_exchange;

#define AMP_FORWARD_VERDICT_TEXT 512

/* The decision. code and message may point into the exchange, to static
 * text, or to text[] (do not copy a verdict by value while using them). */
typedef struct amp_forward_verdict {
    amp_outcome outcome;        /* what the answer meant (logs) */
    amp_queue_ack_kind kind;    /* DELIVERED, RETRY, DEAD, or RELEASE (not an attempt) */
    bool hold;                  /* RELEASE of a paused app's job: back to its queue,
                                   due_ms is left to the pause (forward.c) */
    int64_t due_ms;             /* RETRY and RELEASE (not hold): when due again */
    int64_t delay_ms;           /* RETRY: due_ms - now_ms */
    long status;                /* stored as the row's last status */
    const char *code, *message; /* stored with a RETRY or DEAD */
    const char *answer_code;    /* the code counted in responses_total */
    amp_forward_conv conversation;
    const char *conversation_id; /* STORE: borrowed from the exchange */
    const char *run_id;          /* RETRY: the run to resume next time (from the exchange) */
    bool reset;                  /* RETRY now as a new conversation (404) */
    bool expired;                /* DEAD because the job outlived max_age */
    amp_forward_pause pause;
    bool answered; /* a whole HTTP answer arrived (its latency tells the app's pace) */
    char text[AMP_FORWARD_VERDICT_TEXT]; /* room for a composed message */
} amp_forward_verdict;

/* Decide one exchange. Pure: reads only *in, writes only *out. */
void amp_forward_decide(const amp_forward_exchange *in, amp_forward_verdict *out);

/* The outcome rules (amp_forward_classify reads them from a JSON body):
 * the class of in's answer, with the code and message to report. */
amp_outcome amp_forward_outcome(const amp_forward_exchange *in, const char **code,
                                const char **message);

/* Fill the answer fields of ex (code, message, workflow_status,
 * workflow_error, conversation_id) from Dify's parsed body (borrowed; may
 * be NULL). */
void amp_forward_exchange_answer(amp_forward_exchange *ex, const json_t *body);

/* ---- pace.c ---------------------------------------------------------- */

/* First probe interval of a paused app; it doubles per rejected probe up to
 * AMP_FORWARD_PAUSE_MAX_MS. retry.max_ms plays no part: it paces one
 * event's retries, while a revoked key or an exhausted plan quota is fixed
 * by a person, in minutes (a 400 ms max_ms must not probe a dead key 2.5
 * times a second). */
#define AMP_FORWARD_PAUSE_FIRST_MS ((int64_t)1000)
#define AMP_FORWARD_PAUSE_MAX_MS ((int64_t)5 * 60 * 1000)
/* Latency assumed for an app before its first answer (deferral estimates). */
#define AMP_FORWARD_DEFAULT_LATENCY_MS 250.0
/* Shortest delay given to a row sent back to the spool for pacing. */
#define AMP_FORWARD_DEFER_MIN_MS ((int64_t)20)

/* Token bucket (rate per second, burst tokens) kept as one "theoretical
 * arrival time" tat in microseconds (start with 0). pace_wait: how long
 * until one request may go (0: now; always 0 when rate <= 0). pace_take:
 * the new tat after sending one at now_us; a request sent less than one
 * interval late keeps the schedule (late wake-ups do not lower the rate). */
int64_t amp_forward_pace_wait_us(int64_t tat_us, int64_t now_us, double rate, unsigned burst);
int64_t amp_forward_pace_take(int64_t tat_us, int64_t now_us, double rate);

/* Wait before the next probe of an app paused after `strikes` (>= 1)
 * rejections in a row: 1 s, 2 s, 4 s ... capped at AMP_FORWARD_PAUSE_MAX_MS. */
int64_t amp_forward_pause_interval_ms(int strikes);

/* Requests per second an app can complete: the rate limit, or what
 * max_in_flight allows at the observed latency, whichever is lower; > 0.
 * latency_ms <= 1 means unknown: the rate limit when there is one, else
 * AMP_FORWARD_DEFAULT_LATENCY_MS is assumed. */
double amp_forward_effective_rate(double rate_per_sec, unsigned max_in_flight, double latency_ms);

/* Due time for a row that found its app's memory queue full: rows come back
 * one per 1/rate after the queue (queued of queue_cap) is half drained, and
 * at least AMP_FORWARD_DEFER_MIN_MS from now. *next_ms carries the app's
 * schedule from call to call (start with 0). */
int64_t amp_forward_defer_due_ms(int64_t *next_ms, int64_t now_ms, double rate, unsigned queued,
                                 unsigned queue_cap);

/* ---- http.c: one connection ----------------------------------------- */

typedef struct amp_forward_http amp_forward_http;

/* One reused curl easy handle with timeouts, protocol limits and the
 * callbacks set once. A request under way ends with CURLE_ABORTED_BY_CALLBACK
 * within a second after *abort_flag (borrowed, may be NULL) turns true. NULL and err on
 * failure. Caller owns. */
amp_forward_http *amp_forward_http_create(long connect_timeout_s, long timeout_s,
                                          const atomic_bool *abort_flag, char *err, size_t errlen);
void amp_forward_http_destroy(amp_forward_http *h); /* accepts NULL */

typedef struct amp_forward_reply {
    int transport_error;         /* CURLcode; 0 when a whole HTTP answer arrived */
    const char *transport_code;  /* static: "timeout", "connect_failed", ... */
    char error[CURL_ERROR_SIZE]; /* curl's text when transport_error */
    long status;                 /* HTTP status; 0 when none arrived */
    json_t *body;         /* parsed answer (blocking JSON or folded stream), or NULL; owned */
    bool too_large;       /* the answer exceeded AMP_FORWARD_MAX_RESPONSE */
    bool streamed;        /* the answer was text/event-stream */
    char retry_after[64]; /* Retry-After header value, "" when absent */
    int64_t latency_ms;
} amp_forward_reply;

/* POST body to url with the given extra headers (borrowed, NULL-terminated
 * list of "Name: value" lines). Fills *reply (cleared first); release it
 * with amp_forward_reply_clear. Never fails otherwise: every problem is a
 * transport error in the reply. */
void amp_forward_http_post(amp_forward_http *h, const char *url, const char *const *headers,
                           const char *body, size_t body_len, amp_forward_reply *reply);
/* The same as a GET (Dify's /info, /parameters, a run's events or detail).
 * A text/event-stream answer is folded as for a POST; when the transfer
 * breaks, reply->body still holds what the stream showed so far. */
void amp_forward_http_get(amp_forward_http *h, const char *url, const char *const *headers,
                          amp_forward_reply *reply);
/* s percent-encoded for a URL's query or path. Caller owns; NULL when out of
 * memory. */
char *amp_forward_http_escape(amp_forward_http *h, const char *s);
void amp_forward_reply_clear(amp_forward_reply *r);

/* ---- sse.c: streaming answers ---------------------------------------- */

typedef struct amp_forward_sse amp_forward_sse;

amp_forward_sse *amp_forward_sse_create(void);    /* caller owns */
void amp_forward_sse_destroy(amp_forward_sse *p); /* accepts NULL */
void amp_forward_sse_reset(amp_forward_sse *p);

/* Feed the next bytes of the stream (any split). -1 when the stream broke a
 * limit (a line over AMP_FORWARD_MAX_RESPONSE); the transfer should stop. */
int amp_forward_sse_feed(amp_forward_sse *p, const char *data, size_t len);

/* After the stream ended: the events folded into the JSON a blocking answer
 * would have been (chat/completion: "event","message_id","conversation_id",
 * "answer","metadata"; workflow: "workflow_run_id","data"; an "error" event
 * becomes {"status","code","message"}). *complete says whether a closing
 * event (message_end, workflow_finished, error) was seen. Caller owns; NULL
 * when no event carried anything. */
json_t *amp_forward_sse_finish(amp_forward_sse *p, bool *complete);

/* ---- amplitude.c: results back to Amplitude (HTTP V2 API) --------------
 * Report events go to POST {base}/2/httpapi as {"api_key","events":[...]},
 * many per request, and Amplitude answers per request but names events in
 * it: a 400 lists the events it refused (the rest were not ingested either,
 * and go again at once), a 429 the users and devices it throttles (their
 * events wait about 30 s, the others go again at once), a 413 asks for
 * smaller requests (the batch is halved). Each event gets its own fate, so
 * a caller holding one queue job per event acknowledges each on its own. */

#define AMP_FORWARD_AMPLITUDE_BASE "https://api2.amplitude.com"
#define AMP_FORWARD_AMPLITUDE_BASE_EU "https://api.eu.amplitude.com"
/* Per request: at most this many events, and a body under this many bytes. */
#define AMP_FORWARD_AMPLITUDE_MAX_EVENTS ((size_t)2000)
#define AMP_FORWARD_AMPLITUDE_MAX_BYTES ((size_t)1000 * 1000)
/* How long the events of a throttled user or device wait. */
#define AMP_FORWARD_AMPLITUDE_THROTTLE_MS ((int64_t)30000)

typedef enum {
    AMP_FORWARD_AMPLITUDE_INGESTED, /* 200: done */
    AMP_FORWARD_AMPLITUDE_REFUSED,  /* named in a 400 (or alone and too large): dead letter */
    AMP_FORWARD_AMPLITUDE_AGAIN,    /* not ingested, not at fault: send again now */
    AMP_FORWARD_AMPLITUDE_HOLD,     /* its user or device is throttled: again at due_ms */
    AMP_FORWARD_AMPLITUDE_SPLIT,    /* 413: send again in smaller requests */
    AMP_FORWARD_AMPLITUDE_RETRY,    /* 5xx or no answer: again after a backoff */
} amp_forward_amplitude_fate;

/* One event of a request, as the sink sees it. */
typedef struct amp_forward_amplitude_event {
    const char *json;      /* the event object as JSON text (borrowed) */
    const char *user_id;   /* may be NULL */
    const char *device_id; /* may be NULL */
    /* Filled by decide / send: */
    amp_forward_amplitude_fate fate;
    int64_t due_ms;  /* HOLD */
    char reason[96]; /* REFUSED: what Amplitude said, e.g. "invalid field: time" */
} amp_forward_amplitude_event;

/* How many of the first n events fit one request: at most max_events and
 * a body under max_bytes (at least 1 when n > 0: an event too large alone
 * is sent alone, and its 413 refuses it). */
size_t amp_forward_amplitude_fit(const amp_forward_amplitude_event *ev, size_t n, size_t max_events,
                                 size_t max_bytes);

/* The request body for ev[0..n) with api_key (JSON-escaped). Caller owns. */
char *amp_forward_amplitude_body(const char *api_key, const amp_forward_amplitude_event *ev,
                                 size_t n);

/* Pure: the fate of each of ev[0..n) after one answer (transport_error
 * non-zero: none arrived; body: Amplitude's parsed JSON, may be NULL).
 * A 400 that names no event refuses them all, with its "error". */
void amp_forward_amplitude_decide(int transport_error, long status, const json_t *body,
                                  amp_forward_amplitude_event *ev, size_t n, int64_t now_ms);

/* What one delivery of a set of events did. */
typedef struct amp_forward_amplitude_stats {
    unsigned requests;    /* HTTP requests made */
    long last_status;     /* of the last answer; 0 when none */
    char last_error[128]; /* transport code or Amplitude's "error" of the last failure */
} amp_forward_amplitude_stats;

/* Send ev[0..n) to url (".../2/httpapi") with api_key over h, as many
 * requests as it takes: requests of at most max_events (and under
 * AMP_FORWARD_AMPLITUDE_MAX_BYTES); a 413 halves the size and sends again;
 * events a 400 or a 429 left out for no fault of theirs go again at once
 * (at most AMP_FORWARD_AMPLITUDE_ROUNDS requests beyond one per batch). Every event ends
 * INGESTED, REFUSED, HOLD or RETRY (AGAIN and SPLIT left when rounds ran
 * out are turned into RETRY). stats may be NULL. */
#define AMP_FORWARD_AMPLITUDE_ROUNDS 32
void amp_forward_amplitude_send(amp_forward_http *h, const char *url, const char *api_key,
                                amp_forward_amplitude_event *ev, size_t n, size_t max_events,
                                amp_forward_amplitude_stats *stats);

/* ---- report.c: route reports, stored and sent back to Amplitude --------
 * When a job of a route with a "report" reaches its final state (delivered
 * or dead), one Amplitude event describing it is stored in the queue as a
 * job of its own, for the destination AMP_FORWARD_REPORT_APP (its body the
 * event's JSON, its dedupe key "report:" + the source event's key, so a
 * source delivered twice reports once). The dispatcher hands such jobs to
 * the reporter, which sends them in batches (amplitude.c) and acknowledges
 * each from its own fate. */

#define AMP_FORWARD_REPORT_APP AMP_MAP_AMPLITUDE_APP

/* The report event for job (borrowed) at its final state: delivered or
 * dead (status, code, message of the last answer), result_json the stored
 * delivery result (may be NULL), endpoint the app's. Caller owns. */
char *amp_forward_report_event(const amp_map_report *spec, const amp_queue_job *job,
                               amp_endpoint endpoint, bool delivered, long status, const char *code,
                               const char *message, const char *result_json, int64_t now_ms);

/* Store event_json (borrowed) as the report job of job (borrowed) in q and
 * wait, at most wait_ms, until the engine says it is durable: 0 then; -1
 * when it was refused or not confirmed in time (logged). The caller
 * acknowledges job only after a 0, so a crash between the two cannot lose
 * the report (the engines store a batch and an acknowledgement through
 * separate paths: Redis runs them as separate scripts). */
int amp_forward_report_store(amp_queue *q, const amp_queue_job *job, const char *event_json,
                             int64_t wait_ms);

/* Called by each delivery thread (dispatcher, workers, reporter) as it
 * starts: raises its own niceness by nice (Linux keeps it per thread), at
 * most to 19, so that on busy CPUs ingest runs first. A failure costs only
 * the priority; the first one is logged. */
void amp_forward_lower_priority(unsigned nice);

typedef struct amp_forward_reporter amp_forward_reporter;

typedef struct amp_forward_reporter_opts {
    const char *base_url;  /* Amplitude's host; copied */
    const char *api_key;   /* copied; never logged */
    unsigned batch_events; /* 1..AMP_FORWARD_AMPLITUDE_MAX_EVENTS */
    unsigned linger_ms;    /* a batch waits this long to fill */
    unsigned throttle_ms;  /* a throttled user's reports wait this long; 0: the default */
    long connect_timeout_s, timeout_s;
    int64_t retry_initial_ms, retry_max_ms;
    amp_metrics *metrics; /* may be NULL; borrowed */
    /* A request under way ends soon after *abort_flag turns true (borrowed,
     * may be NULL): the forwarder's stop past its grace. */
    const atomic_bool *abort_flag;
    unsigned nice; /* added to the reporter thread's niceness (dify.nice) */
} amp_forward_reporter_opts;

/* Start the reporter's thread; q borrowed, must outlive it. NULL and err on
 * failure. */
amp_forward_reporter *amp_forward_reporter_start(const amp_forward_reporter_opts *o, amp_queue *q,
                                                 char *err, size_t errlen);
/* Take a claimed report job (ownership passes on true). false when the
 * reporter's memory is full: the caller releases the job. */
bool amp_forward_reporter_offer(amp_forward_reporter *r, amp_queue_job *job);
/* Send what is in hand (for up to the timeout), release the rest, join.
 * Accepts NULL. */
void amp_forward_reporter_stop(amp_forward_reporter *r);

#endif
