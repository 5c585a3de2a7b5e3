/*
 * spool — the embedded queue engine: a SQLite file in WAL mode. One row per
 * Dify request ("delivery"), a dedupe table of event keys, and the
 * conversation id per (app, user). It implements queue/queue.h; callers use
 * the amp_queue_ functions on the handle amp_spool_open returns.
 *
 * Writes go through one committer thread that groups whatever has gathered
 * (ingest batches from HTTP requests and acknowledgements from workers) into
 * one transaction, so one fsync serves many requests. With spool.sync
 * "full" a syncer thread makes each group durable (one fdatasync of the log
 * for many groups) before its requests are answered; a checkpointer thread
 * copies the log back into the database. An HTTP request is answered 202
 * only from the done callback, after its transaction is durable.
 *
 * Claims (amp_queue_claim) read on a separate connection. A claimed row
 * stays claimed in memory until its acknowledgement is committed, so it is
 * never handed out twice; after a crash nothing is claimed and every pending
 * row is due again. The engine has one shard; acknowledgements are always
 * taken (one whose commit fails is held and retried).
 *
 * Threading: amp_spool_open and amp_spool_open_admin from any thread; the
 * handle then follows queue/queue.h. Done and notify callbacks run on the
 * committer or the syncer thread.
 */
#ifndef AMP_SPOOL_H
#define AMP_SPOOL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "../queue/queue.h"

typedef struct amp_spool_opts {
    const char *path;
    int64_t dedupe_window_s; /* 0 disables dedupe */
    int64_t max_pending;     /* amp_queue_full() at this many pending rows; 0: no limit */
    /* amp_queue_full() at this many bytes of database pages in use (rows,
     * dedupe keys, indexes; neither free pages nor the log count); 0: no
     * limit. While it is reached, delivered rows are pruned before their
     * retention, so a drained backlog gives its room back. A limit reached
     * holds until a tenth of it is free again; each change is logged. */
    int64_t max_bytes;
    int64_t retention_s; /* delivered rows older than this are pruned; 0: kept */
    bool sync_normal;    /* PRAGMA synchronous=NORMAL instead of FULL (see README) */
    /* How long a write waits for a lock another process holds (a `dlq`
     * command, a backup) before it fails: the requests of that group get
     * 503. 0: AMP_SPOOL_LOCK_TIMEOUT_MS. */
    int64_t lock_timeout_ms;
} amp_spool_opts;

#define AMP_SPOOL_LOCK_TIMEOUT_MS 5000

/* Open opts->path (borrowed; creating and migrating the file as needed) and
 * start the committer, syncer and checkpointer threads. Caller owns the
 * handle (amp_queue_close). NULL and err filled on failure. */
amp_queue *amp_spool_open(const amp_spool_opts *opts, char *err, size_t errlen);

/* Open an existing spool for inspection and dead-letter actions (the `dlq`
 * command), beside a running daemon or not: one SQLite connection, no
 * threads, no migrations. Uses opts->path and opts->lock_timeout_ms.
 * Refuses a missing file and a schema version other than this build's,
 * naming both versions in err. The handle offers stats_get,
 * oldest_pending_ms and the dlq operations; the others behave as for an
 * operation an engine leaves out (queue/queue.h). Caller owns the handle. */
amp_queue *amp_spool_open_admin(const amp_spool_opts *opts, char *err, size_t errlen);

/* The dedupe table's key for an event key (schema v5): the first 64 bits of
 * its SHA-256, as a signed integer, never 0. For tools that fill a spool
 * directly. */
int64_t amp_spool_key_hash(const char *key);
/* The same hash, and in *check the next 64 bits of the SHA-256 (the dedupe
 * tables' chk column): a key is a duplicate only when both match, so two
 * keys with one hash are never taken for each other. */
int64_t amp_spool_key_digest(const char *key, int64_t *check);

#endif
