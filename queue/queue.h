/*
 * queue — the durable queue between ingest and delivery, as an engine
 * interface. Handlers submit the events of a request as one batch and answer
 * 2xx from the done callback; the forwarder claims due jobs, delivers them
 * and acknowledges each one. An engine stores the jobs: spool/ (SQLite, the
 * embedded default) is the first; a Redis Streams engine implements the same
 * operations (amp_queue_ops below). Callers see only the opaque amp_queue.
 *
 * Contract every engine keeps:
 * - A batch is stored all or nothing; done is called exactly once, after the
 *   batch is durable (status 0) or refused (status -1), never before.
 * - A claimed job is not handed out again while its claim holds. The claim
 *   ends with its acknowledgement, or when the engine loses it (a crash: the
 *   SQLite engine forgets claims at restart; Redis: the lease expires and
 *   another consumer may take the job over). Delivery is at-least-once.
 * - Shards: an engine has amp_queue_shards() shards (the SQLite engine 1,
 *   Redis one stream per shard). A per_user job lives in the shard chosen by
 *   its (app, user), so one user's jobs share a shard, and within a shard the
 *   engine hands out only the oldest pending per_user job of an (app, user),
 *   and only while no other job of it is claimed: per-user order holds
 *   across consumers. A job carries its shard; its acknowledgement names it.
 * - An acknowledgement can fail to land (a Redis lease lost to another
 *   consumer): amp_queue_acknowledge says so. The SQLite engine always takes
 *   it; when its commit fails it holds the acknowledgement (the job stays
 *   claimed) and retries.
 *
 * Threading: every function is safe from any thread unless said otherwise.
 * Done and notify callbacks run on the engine's own threads and must not
 * block. amp_queue_close must not race with other calls on the same handle.
 */
#ifndef AMP_QUEUE_H
#define AMP_QUEUE_H

#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef struct amp_queue amp_queue;

/* ---- ingest ---------------------------------------------------------- */

/* The events of one HTTP request, stored all or nothing. */
typedef struct amp_queue_batch amp_queue_batch;

/* Caller owns; never NULL. */
amp_queue_batch *amp_queue_batch_create(void);
void amp_queue_batch_destroy(amp_queue_batch *b); /* accepts NULL */

/* Start the next event; dedupe_key may be NULL (never a duplicate). The
 * requests added after this call belong to this event. dedupe_key copied. */
void amp_queue_batch_event(amp_queue_batch *b, const char *dedupe_key);
/* One Dify request for the current event. All strings copied. */
void amp_queue_batch_request(amp_queue_batch *b, const char *route, const char *app,
                             const char *user, bool per_user, const char *body_json);
/* The source event (JSON text, copied) of the last request added, kept with
 * its job for a report (amp_queue_job.source). Only after a request. */
void amp_queue_batch_source(amp_queue_batch *b, const char *source_json);

typedef struct amp_queue_result {
    int status;          /* 0 stored; -1 not stored (see error) */
    unsigned accepted;   /* events stored */
    unsigned duplicates; /* events whose key was already seen */
    const char *error;   /* static reason when status is -1 */
} amp_queue_result;

/* res is borrowed for the call. */
typedef void (*amp_queue_done_fn)(void *ctx, const amp_queue_result *res);

/* Queue a batch (takes ownership of b). done is called exactly once, on an
 * engine thread, after the batch is durable or refused; on a handle that
 * takes no events (amp_spool_open_admin) at once, on the caller's thread. */
void amp_queue_submit(amp_queue *q, amp_queue_batch *b, amp_queue_done_fn done, void *ctx);

/* Called on an engine thread once new due work may be claimable. fn may be
 * NULL (no notification); ctx borrowed until replaced or the queue closed. */
typedef void (*amp_queue_notify_fn)(void *ctx);
void amp_queue_set_notify(amp_queue *q, amp_queue_notify_fn fn, void *ctx);

/* ---- delivery -------------------------------------------------------- */

#define AMP_QUEUE_SHARD_ANY (-1)

typedef struct amp_queue_job {
    int64_t id; /* unique within its shard */
    int shard;  /* where it was claimed; 0 with one shard */
    char *route;
    char *app;
    char *user;
    char *body;            /* Dify request body without conversation_id */
    char *dedupe_key;      /* may be NULL */
    char *conversation_id; /* per (app, user); NULL when none stored */
    bool per_user;
    char *run_id;       /* a Dify workflow run an earlier attempt started and lost the
                           connection to (set by a RETRY ack's run_id), or NULL */
    int attempts;       /* attempts made before this one */
    int64_t created_ms; /* start of the current schedule: stored, or replayed */
    char *source;       /* the source event's JSON when its route reports, else NULL */
} amp_queue_job;

void amp_queue_job_free(amp_queue_job *j); /* accepts NULL */

/* Number of shards, at least 1. */
int amp_queue_shards(const amp_queue *q);

/* Claim up to max due jobs (due_ms <= now_ms), oldest first, skipping jobs
 * already claimed and jobs not yet durable, from any shard. Per-user order
 * as in the contract above. Fills jobs[] (caller owns each) and returns the
 * count, or -1 on error. *next_due_ms receives the earliest due time of an
 * unclaimed pending job after this claim (now_ms when there may be more due
 * at once), or INT64_MAX when there is none. */
int amp_queue_claim(amp_queue *q, int64_t now_ms, amp_queue_job **jobs, size_t max,
                    int64_t *next_due_ms);
/* The same from one shard (0..amp_queue_shards()-1), or AMP_QUEUE_SHARD_ANY.
 * A hint: an engine with one shard ignores it. */
int amp_queue_claim_shard(amp_queue *q, int shard, int64_t now_ms, amp_queue_job **jobs, size_t max,
                          int64_t *next_due_ms);

typedef enum {
    AMP_QUEUE_ACK_DELIVERED, /* done; result_json kept for inspection */
    AMP_QUEUE_ACK_RETRY,     /* pending again at due_ms, attempts + 1 */
    AMP_QUEUE_ACK_DEAD,      /* dead letter with status, code, message */
    AMP_QUEUE_ACK_RELEASE,   /* not attempted (paused app, shutdown): pending at due_ms,
                                attempts unchanged */
    AMP_QUEUE_ACK_WAITING,   /* done for now, no result: the destination waits for a person
                                (a workflow paused for human input). Neither pending nor
                                dead; code, message and result_json kept */
} amp_queue_ack_kind;

typedef struct amp_queue_ack {
    int64_t id; /* the job's id */
    int shard;  /* the job's shard */
    amp_queue_ack_kind kind;
    int64_t due_ms;              /* RETRY, RELEASE */
    int http_status;             /* 0 when no HTTP answer */
    const char *code;            /* Dify code or local reason; may be NULL */
    const char *message;         /* may be NULL */
    const char *result_json;     /* DELIVERED, WAITING: stored result; may be NULL */
    const char *run_id;          /* RETRY: handed back as the job's run_id (NULL clears it);
                                    RELEASE: the same, but NULL keeps the stored one */
    const char *conversation_id; /* when non-NULL, stored for (app, user); "" clears it */
} amp_queue_ack;

typedef enum {
    AMP_QUEUE_ACK_TAKEN = 0,   /* it lands (the SQLite engine: at its next commit) */
    AMP_QUEUE_ACK_LOST = 1,    /* the claim was lost (lease expired, another consumer owns the
                                  job): nothing changed; forget the job */
    AMP_QUEUE_ACK_FAILED = -1, /* not stored; the job comes back when its claim ends */
} amp_queue_ack_status;

/* Acknowledge a claimed job (ack and its strings borrowed for the call).
 * The job is unclaimed once the acknowledgement is stored; amp_queue_flush
 * waits for that. */
amp_queue_ack_status amp_queue_acknowledge(amp_queue *q, const amp_queue_ack *ack);

/* Block until everything queued before this call went through a write
 * attempt. An acknowledgement whose write failed (disk full) is held and
 * retried by the engine, so it may still be pending when this returns. */
void amp_queue_flush(amp_queue *q);
/* The same, but it gives up at deadline_ms (amp_mono_ms() time): false when
 * the engine has not got that far by then, a disk that hangs for instance. */
bool amp_queue_flush_until(amp_queue *q, int64_t deadline_ms);

/* ---- inspection ------------------------------------------------------ */

typedef struct amp_queue_stats {
    int64_t pending;
    int64_t delivered;
    int64_t dead;
    int64_t waiting;           /* AMP_QUEUE_ACK_WAITING rows */
    int64_t oldest_pending_ms; /* created_ms of the oldest pending job, 0 when none */
} amp_queue_stats;

/* Exact counts (may scan; for tests and the CLI). 0, or -1 on error. */
int amp_queue_stats_get(amp_queue *q, amp_queue_stats *out);
/* created_ms of the oldest pending job, 0 when none (cheap; for metrics). */
int64_t amp_queue_oldest_pending_ms(amp_queue *q);
/* Pending jobs (kept in memory, recounted in the background). */
int64_t amp_queue_depth(amp_queue *q);
/* Bytes the engine holds (SQLite: database pages in use), as last measured. */
int64_t amp_queue_bytes(amp_queue *q);
/* Whether the last write succeeded (readiness). */
bool amp_queue_writable(amp_queue *q);
/* Back-pressure: why the queue takes nothing new now, a static sentence
 * naming the limit reached; NULL when it takes new events. */
const char *amp_queue_full(amp_queue *q);

/* ---- dead letters (the `dlq` command) -------------------------------- */

typedef struct amp_queue_dlq_filter {
    const char *route; /* NULL: any */
    const char *app;
    const char *code;
    int status;       /* 0: any */
    int64_t since_ms; /* dead-lettered at or after; 0: any */
    int64_t until_ms; /* dead-lettered before; 0: any */
    int64_t *ids;     /* only these jobs; NULL: any */
    size_t nids;
    bool waiting; /* the waiting rows (AMP_QUEUE_ACK_WAITING) instead of dead letters */
} amp_queue_dlq_filter;

/* The filters by name, as the `dlq` command's options (--route ...) and the
 * admin API's query parameters (route=...) spell them, so both read them the
 * same way: "route", "app", "code" (value kept, borrowed), "status" (an HTTP
 * status 100..599), "since" and "until" (Unix seconds or UTC
 * "YYYY-MM-DDTHH:MM:SSZ"), "id" (a job id; each use adds one, into an array
 * f owns: amp_queue_dlq_filter_clear). 0 when set; 1 when name is no filter;
 * -1 when value is bad, with "found X; expected Y" in err. */
int amp_queue_dlq_filter_set(amp_queue_dlq_filter *f, const char *name, const char *value,
                             char *err, size_t errlen);
/* Whether f narrows anything (false: every dead letter). */
bool amp_queue_dlq_filter_any(const amp_queue_dlq_filter *f);
/* Free the ids amp_queue_dlq_filter_set added and clear f. */
void amp_queue_dlq_filter_clear(amp_queue_dlq_filter *f);

/* Dead letters matching f (borrowed), oldest first, at most limit: a JSON
 * array of {id, route, app, user, dedupe_key, status, code, message,
 * attempts, created_ms, dead_ms, body, state ("dead" or, with f->waiting,
 * "waiting_input" plus its "result")}. Caller owns; NULL on error. */
json_t *amp_queue_dlq_list(amp_queue *q, const amp_queue_dlq_filter *f, size_t limit);
/* Back to pending with a fresh schedule (due now, attempts 0, max age
 * counted from now). Returns the number of jobs, or -1. */
int64_t amp_queue_dlq_replay(amp_queue *q, const amp_queue_dlq_filter *f);
/* Delete matching dead letters. Returns the number of jobs, or -1. */
int64_t amp_queue_dlq_purge(amp_queue *q, const amp_queue_dlq_filter *f);

/* ---- operators (the admin API) ---------------------------------------
 * An engine may leave these out (NULL in its ops): the functions then
 * return NULL and the admin API answers 501 for the endpoint. */

/* The operations an engine may leave out, by what the admin API asks. */
typedef enum {
    AMP_QUEUE_OFFERS_EVENT,      /* amp_queue_event */
    AMP_QUEUE_OFFERS_APP_DEPTHS, /* amp_queue_app_depths */
    AMP_QUEUE_OFFERS_DLQ,        /* amp_queue_dlq_list, _replay and _purge, all three */
} amp_queue_offer;
/* Whether the engine behind q implements what. */
bool amp_queue_offers(const amp_queue *q, amp_queue_offer what);

/* The jobs stored for one event, found by its dedupe key (the event's
 * insert_id), for as long as the engine's dedupe remembers the key (the
 * SQLite engine: not at all with dedupe off): {"seen_ms": when the key was
 * last seen by dedupe, or null,
 * "jobs": [{id, shard, route, app, user, state ("pending", "delivered",
 * "dead"), attempts, last_status (null before an answer), last_code,
 * last_message, created_ms, due_ms (pending), finished_ms (delivered or
 * dead), answer (the first answer_chars characters of the stored answer, or
 * of a workflow's outputs as JSON; null when none), conversation_id (the
 * answer's, else the one stored for the job's (app, user) when it keeps a
 * conversation; null when none)}], oldest first}. Both empty (null, []) when
 * nothing is known of the key. Caller owns; NULL on error. */
json_t *amp_queue_event(amp_queue *q, const char *dedupe_key, size_t answer_chars);
/* Jobs per app, every app that has any: {"<app>": {"pending", "dead",
 * "oldest_pending_ms" (created_ms of its oldest pending job, 0 when
 * none)}}. Exact (may scan). Caller owns; NULL on error. */
json_t *amp_queue_app_depths(amp_queue *q);

/* Stores everything submitted so far, stops the engine, frees the handle.
 * Accepts NULL. */
void amp_queue_close(amp_queue *q);

/* ---- for engines ------------------------------------------------------
 * An engine fills a static amp_queue_ops and wraps its state with
 * amp_queue_create. Every operation gets the engine state e (borrowed) and
 * has the contract of the amp_queue_ function of the same name (claim: of
 * amp_queue_claim_shard, which sets *next_due_ms to INT64_MAX first). An engine
 * may leave an operation NULL when its handle cannot do it (an admin handle
 * that only inspects): submit then answers status -1, claim and the
 * dead-letter operations return -1 (list NULL), acknowledge FAILED, flush
 * returns true, the statistics 0 (stats_get -1), writable false, full a
 * sentence saying the handle takes no events, event and app_depths NULL
 * (the admin API answers 501 not_implemented). */
typedef struct amp_queue_ops {
    void (*close)(void *e); /* required; frees e */
    void (*set_notify)(void *e, amp_queue_notify_fn fn, void *ctx);
    void (*submit)(void *e, amp_queue_batch *b, amp_queue_done_fn done, void *ctx);
    int (*claim)(void *e, int shard, int64_t now_ms, amp_queue_job **jobs, size_t max,
                 int64_t *next_due_ms);
    amp_queue_ack_status (*acknowledge)(void *e, const amp_queue_ack *ack);
    bool (*flush_until)(void *e, int64_t deadline_ms); /* INT64_MAX: no deadline */
    int (*stats_get)(void *e, amp_queue_stats *out);
    int64_t (*oldest_pending_ms)(void *e);
    int64_t (*depth)(void *e);
    int64_t (*bytes)(void *e);
    bool (*writable)(void *e);
    const char *(*full)(void *e);
    json_t *(*dlq_list)(void *e, const amp_queue_dlq_filter *f, size_t limit);
    int64_t (*dlq_replay)(void *e, const amp_queue_dlq_filter *f);
    int64_t (*dlq_purge)(void *e, const amp_queue_dlq_filter *f);
    json_t *(*event)(void *e, const char *dedupe_key, size_t answer_chars);
    json_t *(*app_depths)(void *e);
} amp_queue_ops;

/* A handle over engine state e (takes ownership: ops->close frees it).
 * ops borrowed for the handle's life (a static table). nshards >= 1. */
amp_queue *amp_queue_create(const amp_queue_ops *ops, void *e, int nshards);

/* A request of a batch, as an engine stores it (borrowed from the batch). */
typedef struct amp_queue_request {
    const char *route, *app, *user, *body;
    bool per_user;
    const char *source; /* NULL: none (amp_queue_batch_source) */
} amp_queue_request;

/* Number of events in b. */
size_t amp_queue_batch_events(const amp_queue_batch *b);
/* Event i of b (i < amp_queue_batch_events): returns its dedupe key (may be
 * NULL), sets *reqs to its requests and *nreqs to their count (borrowed
 * from b). */
const char *amp_queue_batch_event_at(const amp_queue_batch *b, size_t i,
                                     const amp_queue_request **reqs, size_t *nreqs);

#endif
