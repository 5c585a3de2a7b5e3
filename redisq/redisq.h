/*
 * redisq — the Redis Streams queue engine, for several amp2dify replicas
 * sharing one Redis (queue.engine "redis"). It implements queue/queue.h;
 * callers use the amp_queue_ functions on the handle amp_redisq_open returns.
 *
 * Layout in Redis (standalone, one database; every key starts with "amp2dify:"):
 *   <s>:stream    shard s's jobs, in arrival order; consumer group "g"
 *   <s>:ready     sorted set: ids of jobs that may be claimed, score = due ms
 *   <s>:inflight  hash: ids claimed by the shard's current owner, each with the
 *                 tag of its claim call (a claim whose answer was lost is undone)
 *   <s>:meta      hash: attempts made, per id
 *   <s>:run       hash: the Dify workflow run a retry left running, per id
 *   <s>:u:<user>  list: the pending per_user ids of one (app, user), oldest first
 *   <s>:conv      hash: conversation id per (app, user)
 *   <s>:lease     "<generation>:<owner>", with an expiry (PX)
 *   <s>:gen       the shard's generation counter
 *   dedupe:<key>  an event key seen within the dedupe window (SET NX EX)
 *   dead          the dead letters (a stream); delivered: a counter
 *   waiting       jobs waiting for a person (a workflow paused for human input:
 *                 done for now, neither pending nor dead), a stream like dead
 *   members       sorted set of live replicas (score = heartbeat expiry)
 *   shards        the shard count the queue was created with
 *
 * A job's shard is hash(app, user) mod shards, so one user's jobs share one
 * stream. Each shard is owned by one replica at a time through its lease;
 * every read, acknowledgement, conversation write and dead-letter move is a
 * Lua script that first compares the lease with the caller's
 * "<generation>:<owner>" (fencing): a former owner that stalled past its
 * lease can neither claim nor acknowledge. Only the oldest pending per_user
 * job of an (app, user) is ever in <s>:ready, so one user's jobs go out one
 * at a time, in order. A retry keeps its stream entry (no new XADD, which
 * would reorder) and goes back to <s>:ready with its due time; a new owner
 * takes the former owner's pending entries over (XAUTOCLAIM) and makes the
 * ones it had claimed due again. Delivered and dead entries are removed
 * with XACK + XDEL, never XTRIM MAXLEN.
 *
 * Accept is one Lua script per HTTP request: for each event SET NX EX of its
 * dedupe key, then XADD of its requests. It is idempotent for keyed events,
 * so a request whose outcome is unknown (a dropped connection) can be sent
 * again. Redis must persist every write before it answers (appendonly yes,
 * appendfsync always) and never evict (maxmemory-policy noeviction); the
 * engine refuses to open otherwise unless allow_weak_durability is set.
 *
 * Shards are spread over the live replicas by rendezvous hashing: each
 * replica takes the free shards that hash to it, and gives back (after its
 * claimed jobs of that shard are acknowledged, or a lease period) those that
 * hash to a replica that joined. A dead replica's shards move once their
 * leases expire.
 *
 * Threads: an ingest thread (pipelined accept scripts), a work thread
 * (claims and acknowledgements, pipelined), a lease thread (heartbeat,
 * leases, depth) and a watcher (a plain blocking XREAD on the owned streams
 * that wakes the forwarder). Each has its own hiredis context.
 */
#ifndef AMP_REDISQ_H
#define AMP_REDISQ_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "../queue/queue.h"

typedef struct amp_redisq_opts {
    const char *url;            /* redis://[:password@]host[:port][/db] */
    int shards;                 /* 1..AMP_REDISQ_MAX_SHARDS */
    int64_t lease_ms;           /* a shard's lease; renewed every quarter of it */
    int64_t dedupe_window_s;    /* 0 disables dedupe */
    int64_t max_pending;        /* amp_queue_full() at this many pending jobs; 0: no limit */
    bool allow_weak_durability; /* accept a Redis that does not fsync every write */
} amp_redisq_opts;

#define AMP_REDISQ_MAX_SHARDS 1024

/* Connect, check the server's durability settings and the shard count the
 * queue was created with, and start the threads. Caller owns the handle
 * (amp_queue_close). NULL and err filled on failure. */
amp_queue *amp_redisq_open(const amp_redisq_opts *opts, char *err, size_t errlen);

/* One connection and no threads, for the `dlq` command beside running
 * replicas: stats_get, oldest_pending_ms and the dlq operations. */
amp_queue *amp_redisq_open_admin(const amp_redisq_opts *opts, char *err, size_t errlen);

typedef enum {
    AMP_REDISQ_CHECK_OK = 0,
    AMP_REDISQ_CHECK_UNREACHABLE = 1, /* no connection, or no answer */
    AMP_REDISQ_CHECK_REFUSED = 2,     /* it answers, but its settings are refused */
} amp_redisq_check_result;

/* What amp_redisq_open checks before it starts: connection, durability
 * settings. On failure found receives what was found ("a Redis with
 * appendfsync everysec") and expected what is required. */
amp_redisq_check_result amp_redisq_check(const amp_redisq_opts *opts, char *found, size_t found_len,
                                         char *expected, size_t expected_len);

/* The shard of (app, user) among nshards: FNV-1a of app, a NUL, user. */
int amp_redisq_shard_of(const char *app, const char *user, int nshards);

#endif
