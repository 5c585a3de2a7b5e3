/*
 * redisq_int.h — the Redis engine's shared state, for the files of redisq/
 * only. Who does what:
 *
 *   scripts.c   the Lua scripts
 *   conn.c      URLs, connections, script calls, the pipelined call threads
 *   engine.c    open and close, ingest, claims, acknowledgements, the lease
 *               and watcher threads
 *   admin.c     durability check, statistics and dead letters
 */
#ifndef AMP_REDISQ_INT_H
#define AMP_REDISQ_INT_H

#include <hiredis/hiredis.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>

#include "redisq.h"

#define RQ_PREFIX "amp2dify:"
/* Socket timeout of a call; a blocking read (the watcher) waits less. */
#define RQ_IO_TIMEOUT_MS 5000
#define RQ_CONNECT_TIMEOUT_MS 2000
#define RQ_WATCH_BLOCK_MS 1000
/* Calls sent at once by a call thread (one pipeline, one round trip). */
#define RQ_PIPE_MAX 256

enum {
    RQ_ACCEPT,
    RQ_ACQUIRE,
    RQ_RENEW,
    RQ_RELEASE,
    RQ_CLAIM,
    RQ_ACK,
    RQ_REPLAY,
    RQ_UNCLAIM,
    RQ_NSCRIPTS
};
/* The text of a script (static). */
const char *amp_redisq_script(int script);

/* ---- conn.c ---- */

typedef struct rq_url {
    char host[256];
    int port;
    char password[256]; /* "" when none */
    int db;
} rq_url;

/* 0, or -1 with err naming what is wrong. */
int amp_redisq_parse_url(const char *url, rq_url *out, char *err, size_t errlen);

/* A connection with timeouts set, authenticated and on its database: the
 * context, or NULL with err filled. */
redisContext *amp_redisq_connect(const rq_url *u, char *err, size_t errlen);

/* Arguments of a command, each copied. */
typedef struct rq_args {
    int n, cap;
    char **v;
    size_t *len;
} rq_args;

void amp_redisq_args_add(rq_args *a, const char *s, size_t len);
void amp_redisq_args_str(rq_args *a, const char *s); /* NULL: "" */
void amp_redisq_args_int(rq_args *a, int64_t v);
void amp_redisq_args_free(rq_args *a);

/* The SHA1 of each script, as SCRIPT LOAD answered. */
typedef struct rq_shas {
    char sha[RQ_NSCRIPTS][41];
} rq_shas;

/* SCRIPT LOAD every script on c: 0, or -1 with err. */
int amp_redisq_load_scripts(redisContext *c, rq_shas *shas, char *err, size_t errlen);

/* EVALSHA script with args (ARGV; no KEYS) on c, loading the scripts again
 * when Redis lost them (a restart). The reply (caller frees), or NULL when
 * the connection failed (c is then unusable). */
redisReply *amp_redisq_eval(redisContext *c, const rq_shas *shas, int script, const rq_args *args);

/* A call thread: calls queued from any thread are sent in one pipeline, and
 * each call's done runs on the thread with its reply, which it takes over
 * (freeReplyObject); NULL when none came: the connection failed, and the
 * next calls reconnect. */
typedef struct rq_call rq_call;
typedef void (*rq_done_fn)(void *ctx, redisReply *reply);
typedef struct rq_pipe rq_pipe;

/* Starts the thread; url and shas borrowed for its life. NULL on failure. */
rq_pipe *amp_redisq_pipe_start(const char *name, const rq_url *url, const rq_shas *shas);
/* Takes ownership of args' contents (args is emptied). */
void amp_redisq_pipe_call(rq_pipe *p, int script, rq_args *args, rq_done_fn done, void *ctx);
/* The same, waiting for the reply (caller frees; NULL when none came). */
redisReply *amp_redisq_pipe_call_wait(rq_pipe *p, int script, rq_args *args);
/* Wait until every call queued before this one was answered; false at
 * deadline_ms (amp_mono_ms time; INT64_MAX: none). */
bool amp_redisq_pipe_flush_until(rq_pipe *p, int64_t deadline_ms);
/* Whether the last exchange succeeded. */
bool amp_redisq_pipe_ok(rq_pipe *p);
/* Answers what is queued, stops, frees. Accepts NULL. */
void amp_redisq_pipe_stop(rq_pipe *p);

/* ---- job ids ----
 * A stream id "ms-seq" as an int64: ms * 2^20 + seq (seq < 2^20 within a
 * millisecond of one stream). */
int64_t amp_redisq_id_from_str(const char *s);
void amp_redisq_id_to_str(int64_t id, char *buf, size_t len);

/* ---- admin.c ---- */

typedef struct rq_admin {
    rq_url url;
    rq_shas shas;
    int shards;
    pthread_mutex_t mu;
    redisContext *c; /* under mu; NULL until (re)connected */
} rq_admin;

/* Connect a (url parsed, scripts loaded). 0, or -1 with err. */
int amp_redisq_admin_init(rq_admin *a, const amp_redisq_opts *o, char *err, size_t errlen);
void amp_redisq_admin_destroy(rq_admin *a);
/* What a CONFIG GET found wrong for durability: 0 when fine; 1 with found
 * and expected filled when not; -1 when it could not be read (found
 * says why). */
int amp_redisq_durability(redisContext *c, char *found, size_t found_len, char *expected,
                          size_t expected_len);
/* Refuse a queue created with another shard count (recorded at first
 * open). 0, or -1 with err. */
int amp_redisq_check_shards(redisContext *c, int shards, char *err, size_t errlen);

int amp_redisq_stats_get(rq_admin *a, amp_queue_stats *out);
int64_t amp_redisq_oldest_pending(rq_admin *a);
json_t *amp_redisq_dlq_list(rq_admin *a, const amp_queue_dlq_filter *f, size_t limit);
int64_t amp_redisq_dlq_replay(rq_admin *a, const amp_queue_dlq_filter *f);
int64_t amp_redisq_dlq_purge(rq_admin *a, const amp_queue_dlq_filter *f);

#endif
