/*
 * spool — the durable queue between ingest and delivery: a SQLite file in
 * WAL mode. One row per Dify request ("delivery"), a dedupe table of event
 * keys, and the conversation id per (app, user).
 *
 * Writes go through one committer thread that groups whatever has gathered
 * (ingest batches from HTTP requests and acknowledgements from workers) into
 * one transaction, so one fsync serves many requests. An HTTP request is
 * answered 202 only from the done callback, after its transaction committed.
 *
 * Reads for delivery (amp_spool_claim) use a separate connection. A claimed
 * row stays claimed in memory until its acknowledgement is committed, so it
 * is never handed out twice; after a crash nothing is claimed and every
 * pending row is due again.
 *
 * Threading: every function is safe from any thread. Done callbacks and the
 * notify callback run on the spool's own threads (the committer, or the
 * thread that syncs the log) and must not block.
 */
#ifndef AMP_SPOOL_H
#define AMP_SPOOL_H

#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef struct amp_spool amp_spool;

typedef struct amp_spool_opts {
    const char *path;
    int64_t dedupe_window_s; /* 0 disables dedupe */
    int64_t max_pending;     /* amp_spool_full() at this many pending rows; 0: no limit */
    /* amp_spool_full() at this many bytes of database pages in use (rows,
     * dedupe keys, indexes; neither free pages nor the log count); 0: no
     * limit. While it is reached, delivered rows are pruned before their
     * retention, so a drained backlog gives its room back. */
    int64_t max_bytes;
    int64_t retention_s; /* delivered rows older than this are pruned; 0: kept */
    bool sync_normal;    /* PRAGMA synchronous=NORMAL instead of FULL (see README) */
    /* How long a write waits for a lock another process holds (a `dlq`
     * command, a backup) before it fails: the requests of that group get
     * 503. 0: AMP_SPOOL_LOCK_TIMEOUT_MS. */
    int64_t lock_timeout_ms;
} amp_spool_opts;

#define AMP_SPOOL_LOCK_TIMEOUT_MS 5000

/* Open (creating and migrating as needed). NULL and err filled on failure. */
amp_spool *amp_spool_open(const amp_spool_opts *opts, char *err, size_t errlen);
/* Commits everything submitted so far, stops the committer, closes.
 * Accepts NULL. */
void amp_spool_close(amp_spool *s);

/* Called on a spool thread once new due work is claimable: after the sync
 * of new rows (at their commit with spool.sync "normal"), or after a commit
 * of acknowledgements. */
void amp_spool_set_notify(amp_spool *s, void (*fn)(void *ctx), void *ctx);

/* ---- ingest ---------------------------------------------------------- */

/* The events of one HTTP request, stored all or nothing. */
typedef struct amp_spool_batch amp_spool_batch;

amp_spool_batch *amp_spool_batch_create(void);
void amp_spool_batch_destroy(amp_spool_batch *b); /* accepts NULL */

/* Start the next event; dedupe_key may be NULL (never a duplicate). The
 * requests added after this call belong to this event. */
void amp_spool_batch_event(amp_spool_batch *b, const char *dedupe_key);
/* One Dify request for the current event. All strings copied. */
void amp_spool_batch_request(amp_spool_batch *b, const char *route, const char *app,
                             const char *user, bool per_user, const char *body_json);

typedef struct amp_spool_result {
    int status;          /* 0 committed; -1 not stored (see error) */
    unsigned accepted;   /* events stored */
    unsigned duplicates; /* events whose key was already seen */
    const char *error;   /* static reason when status is -1 */
} amp_spool_result;

typedef void (*amp_spool_done_fn)(void *ctx, const amp_spool_result *res);

/* Queue a batch (takes ownership). done is called exactly once, on the
 * committer thread, after the commit or its failure. */
void amp_spool_submit(amp_spool *s, amp_spool_batch *b, amp_spool_done_fn done, void *ctx);

/* ---- delivery -------------------------------------------------------- */

typedef struct amp_spool_job {
    int64_t id;
    char *route;
    char *app;
    char *user;
    char *body;            /* Dify request body without conversation_id */
    char *dedupe_key;      /* may be NULL */
    char *conversation_id; /* per (app, user); NULL when none stored */
    bool per_user;
    int attempts;       /* attempts made before this one */
    int64_t created_ms; /* start of the current schedule: stored, or replayed */
} amp_spool_job;

void amp_spool_job_free(amp_spool_job *j); /* accepts NULL */

/* Claim up to max due rows (due_ms <= now_ms), oldest first, skipping rows
 * already claimed and rows whose commit is not synced yet. For per_user
 * rows only the oldest pending row of its (app, user) is eligible, and only
 * while no other row of it is claimed. Fills jobs[] (caller owns each) and
 * returns the count, or -1 on error. *next_due_ms receives the earliest due
 * time of an unclaimed pending row after this claim, or INT64_MAX when
 * there is none. */
int amp_spool_claim(amp_spool *s, int64_t now_ms, amp_spool_job **jobs, size_t max,
                    int64_t *next_due_ms);

typedef enum {
    AMP_ACK_DELIVERED, /* done; result_json kept for inspection */
    AMP_ACK_RETRY,     /* pending again at due_ms, attempts + 1 */
    AMP_ACK_DEAD,      /* dead letter with status, code, message */
    AMP_ACK_RELEASE,   /* not attempted (paused app, shutdown): pending, attempts unchanged */
} amp_ack_kind;

typedef struct amp_ack {
    int64_t id;
    amp_ack_kind kind;
    int64_t due_ms;              /* RETRY */
    int http_status;             /* 0 when no HTTP answer */
    const char *code;            /* Dify code or local reason; may be NULL */
    const char *message;         /* may be NULL */
    const char *result_json;     /* DELIVERED: stored result; may be NULL */
    const char *conversation_id; /* when non-NULL, stored for (app, user); "" clears it */
} amp_ack;

/* Queue an acknowledgement (strings copied). The row is unclaimed once it is
 * committed; amp_spool_flush waits for that. */
void amp_spool_ack(amp_spool *s, const amp_ack *ack);

/* Block until everything queued before this call went through a commit
 * attempt. An acknowledgement whose commit failed (disk full) is held and
 * retried by the committer, so it may still be pending when this returns. */
void amp_spool_flush(amp_spool *s);
/* The same, but it gives up at deadline_ms (amp_mono_ms() time): false when
 * the spool has not got that far by then, a disk that hangs for instance. */
bool amp_spool_flush_until(amp_spool *s, int64_t deadline_ms);

/* ---- inspection (tests, CLI) ---------------------------------------- */

typedef struct amp_spool_stats {
    int64_t pending;
    int64_t delivered;
    int64_t dead;
    int64_t oldest_pending_ms; /* created_ms of the oldest pending row, 0 when none */
} amp_spool_stats;

/* Exact counts (scans; for tests and the CLI). */
int amp_spool_stats_get(amp_spool *s, amp_spool_stats *out);
/* created_ms of the oldest pending row, 0 when none (cheap; for metrics). */
int64_t amp_spool_oldest_pending_ms(amp_spool *s);

/* Whether the last commit succeeded (readiness). */
bool amp_spool_writable(amp_spool *s);

/* Pending rows (kept in memory, recounted in the background). */
int64_t amp_spool_depth(amp_spool *s);
/* Bytes of database pages in use (see opts.max_bytes), as of the last
 * commit. */
int64_t amp_spool_bytes(amp_spool *s);
/* Back-pressure: why the spool takes nothing new now, a static sentence
 * naming the limit reached (opts.max_pending or opts.max_bytes); NULL when
 * it takes new events. A limit reached holds until a tenth of it is free
 * again. Each change is logged. */
const char *amp_spool_full(amp_spool *s);

/* ---- dead letters (the `dlq` command) ------------------------------- */

typedef struct amp_dlq_filter {
    const char *route; /* NULL: any */
    const char *app;
    const char *code;
    int status;         /* 0: any */
    int64_t since_ms;   /* dead-lettered at or after; 0: any */
    int64_t until_ms;   /* dead-lettered before; 0: any */
    const int64_t *ids; /* only these rows; NULL: any */
    size_t nids;
} amp_dlq_filter;

/* Dead letters matching f, oldest first, at most limit: a JSON array of
 * {id, route, app, user, dedupe_key, status, code, message, attempts,
 * created_ms, dead_ms, body}. Caller owns; NULL on error. */
json_t *amp_spool_dlq_list(amp_spool *s, const amp_dlq_filter *f, size_t limit);
/* Back to pending with a fresh schedule (due now, attempts 0, max age
 * counted from now). Returns the number of rows, or -1. */
int64_t amp_spool_dlq_replay(amp_spool *s, const amp_dlq_filter *f);
/* Delete matching dead letters. Returns the number of rows, or -1. */
int64_t amp_spool_dlq_purge(amp_spool *s, const amp_dlq_filter *f);

#endif
