/* The engine: open and close, ingest, claims, acknowledgements, and the
 * lease and wake-up threads. */
#include "redisq_int.h"

#include <inttypes.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "../base/alloc.h"
#include "../base/clock.h"
#include "../base/log.h"

#define TOKEN_MAX 160
/* Statistics (depth, memory) are measured this often by the lease thread. */
#define RECOUNT_MS 1000

typedef struct shard_state {
    bool owned;
    bool draining;          /* handing over: no more claims, released once idle */
    char token[TOKEN_MAX];  /* "<generation>:<owner>" while owned */
    int64_t inflight;       /* claimed under token, not yet acknowledged */
    int64_t drain_until_ms; /* released then even when jobs are still out */
    int64_t free_since_ms;  /* first seen free while another replica should take it; 0 */
} shard_state;

/* An acknowledgement that got no answer (Redis unreachable): kept and sent
 * again by the lease thread, like the SQLite engine holds a failed commit.
 * The same for the undoing of a claim whose answer was lost. */
typedef struct held_ack {
    struct held_ack *next;
    int script;   /* RQ_ACK, or RQ_UNCLAIM */
    int shard;    /* RQ_ACK: the job's */
    rq_args args; /* the script's, token(s) included */
} held_ack;

typedef struct rq {
    amp_redisq_opts o;
    rq_url url;
    rq_admin admin; /* statistics and dead letters; also the shard-count check */
    char owner[128];
    rq_pipe *ingest, *work, *claims; /* claims do not wait behind acknowledgements */
    pthread_t lease_thread, wake_thread;
    bool lease_running, wake_running;

    pthread_mutex_t mu; /* everything below */
    pthread_cond_t stop_cv;
    bool stop;
    shard_state *sh;
    int rr;             /* the shard a claim starts at, for fairness */
    uint64_t claim_seq; /* numbers the claim calls: their tag */
    held_ack *held;
    amp_queue_notify_fn notify;
    void *notify_ctx;

    atomic_llong depth, bytes;
    atomic_bool reachable; /* the lease thread's last exchange worked */
} rq;

static const char unreachable_msg[] = "the queue (Redis) is unreachable";

/* ---- helpers -------------------------------------------------------------- */

static uint64_t fnv(uint64_t h, const void *data, size_t n) {
    const unsigned char *p = data;
    for (size_t i = 0; i < n; i++) {
        h ^= p[i];
        h *= 0x100000001b3ull;
    }
    return h;
}

#define FNV_BASIS 0xcbf29ce484222325ull

int amp_redisq_shard_of(const char *app, const char *user, int nshards) {
    uint64_t h = fnv(FNV_BASIS, app, strlen(app) + 1); /* with its NUL */
    h = fnv(h, user, strlen(user));
    return nshards > 1 ? (int)(h % (uint64_t)nshards) : 0;
}

/* Rendezvous: the member with the highest score takes the shard. */
static uint64_t rendezvous(const char *member, int shard) {
    uint64_t h = fnv(FNV_BASIS, member, strlen(member));
    h = fnv(h, &shard, sizeof shard);
    h ^= h >> 33;
    h *= 0xff51afd7ed558ccdull;
    h ^= h >> 33;
    return h;
}

static void notify(rq *q) {
    pthread_mutex_lock(&q->mu);
    amp_queue_notify_fn fn = q->notify;
    void *ctx = q->notify_ctx;
    pthread_mutex_unlock(&q->mu);
    if (fn)
        fn(ctx);
}

static void set_notify(void *e, amp_queue_notify_fn fn, void *ctx) {
    rq *q = e;
    pthread_mutex_lock(&q->mu);
    q->notify = fn;
    q->notify_ctx = ctx;
    pthread_mutex_unlock(&q->mu);
}

/* ---- ingest --------------------------------------------------------------- */

typedef struct submission {
    rq *q;
    amp_queue_batch *batch;
    amp_queue_done_fn done;
    void *ctx;
} submission;

static void accept_done(void *ctx, redisReply *r) {
    submission *s = ctx;
    amp_queue_result res = {.status = -1, .error = unreachable_msg};
    if (r && r->type == REDIS_REPLY_ARRAY && r->elements == 2 &&
        r->element[0]->type == REDIS_REPLY_INTEGER) {
        res = (amp_queue_result){.status = 0,
                                 .accepted = (unsigned)r->element[0]->integer,
                                 .duplicates = (unsigned)r->element[1]->integer};
    } else if (r && r->type == REDIS_REPLY_ERROR) {
        amp_log(AMP_LOG_ERROR, "redis refused a batch", "{s:s}", "error", r->str);
        res.error = strstr(r->str, "OOM") ? "the queue (Redis) is out of memory"
                                          : "the queue (Redis) refused the batch";
    }
    if (r)
        freeReplyObject(r);
    else /* no answer: refuse new requests until the lease thread reaches Redis */
        atomic_store(&s->q->reachable, false);
    if (res.status == 0 && res.accepted > 0)
        atomic_fetch_add(&s->q->depth, res.accepted);
    s->done(s->ctx, &res);
    if (res.status == 0 && res.accepted > 0)
        notify(s->q);
    amp_queue_batch_destroy(s->batch);
    free(s);
}

static void submit(void *e, amp_queue_batch *b, amp_queue_done_fn done, void *ctx) {
    rq *q = e;
    rq_args a = {0};
    amp_redisq_args_str(&a, RQ_PREFIX);
    amp_redisq_args_int(&a, q->o.dedupe_window_s);
    size_t nev = amp_queue_batch_events(b);
    amp_redisq_args_int(&a, (int64_t)nev);
    for (size_t i = 0; i < nev; i++) {
        const amp_queue_request *reqs;
        size_t nreqs;
        const char *key = amp_queue_batch_event_at(b, i, &reqs, &nreqs);
        amp_redisq_args_str(&a, key);
        amp_redisq_args_int(&a, (int64_t)nreqs);
        for (size_t r = 0; r < nreqs; r++) {
            amp_redisq_args_int(&a, amp_redisq_shard_of(reqs[r].app, reqs[r].user, q->o.shards));
            amp_redisq_args_str(&a, reqs[r].route);
            amp_redisq_args_str(&a, reqs[r].app);
            amp_redisq_args_str(&a, reqs[r].user);
            amp_redisq_args_str(&a, reqs[r].per_user ? "1" : "0");
            amp_redisq_args_str(&a, reqs[r].body);
            amp_redisq_args_str(&a, reqs[r].source ? reqs[r].source : "");
        }
    }
    submission *s = amp_xcalloc(1, sizeof *s);
    *s = (submission){.q = q, .batch = b, .done = done, .ctx = ctx};
    amp_redisq_pipe_call(q->ingest, RQ_ACCEPT, &a, accept_done, s);
}

/* ---- claims --------------------------------------------------------------- */

static char *reply_str(const redisReply *r) {
    return r->type == REDIS_REPLY_STRING ? amp_xstrndup(r->str, r->len) : amp_xstrdup("");
}

static char *nonempty(const redisReply *r) {
    return r->type == REDIS_REPLY_STRING && r->len > 0 ? amp_xstrndup(r->str, r->len) : NULL;
}

static void lose(rq *q, int s, const char *token, const char *where) {
    pthread_mutex_lock(&q->mu);
    shard_state *st = &q->sh[s];
    bool was = st->owned && strcmp(st->token, token) == 0;
    if (was) {
        st->owned = st->draining = false;
        st->inflight = 0;
    }
    pthread_mutex_unlock(&q->mu);
    if (was)
        amp_log(AMP_LOG_WARN, "shard lease lost", "{s:i, s:s, s:s}", "shard", s, "token", token,
                "noticed_by", where);
}

static void hold(rq *q, int script, int shard, rq_args *args);

static int claim(void *e, int shard, int64_t now_ms, amp_queue_job **jobs, size_t max,
                 int64_t *next_due_ms) {
    rq *q = e;
    *next_due_ms = INT64_MAX;
    if (max == 0)
        return 0;
    rq_args a = {0};
    amp_redisq_args_str(&a, RQ_PREFIX);
    amp_redisq_args_int(&a, now_ms);
    amp_redisq_args_int(&a, (int64_t)max);
    int nsh = 0;
    pthread_mutex_lock(&q->mu);
    char tag[24];
    snprintf(tag, sizeof tag, "%" PRIu64, ++q->claim_seq);
    amp_redisq_args_str(&a, tag);
    int start = shard >= 0 && shard < q->o.shards ? shard : q->rr;
    int count = shard >= 0 && shard < q->o.shards ? 1 : q->o.shards;
    /* The tokens sent, in the order of the reply's entries. */
    char(*sent)[TOKEN_MAX] = amp_xcalloc((size_t)count, TOKEN_MAX);
    int *sent_shard = amp_xcalloc((size_t)count, sizeof *sent_shard);
    for (int k = 0; k < count; k++) {
        int s = (start + k) % q->o.shards;
        if (!q->sh[s].owned || q->sh[s].draining)
            continue;
        amp_redisq_args_int(&a, s);
        amp_redisq_args_str(&a, q->sh[s].token);
        amp_redisq_args_str(&a, q->owner);
        snprintf(sent[nsh], TOKEN_MAX, "%s", q->sh[s].token);
        sent_shard[nsh] = s;
        nsh++;
    }
    if (count > 1)
        q->rr = (q->rr + 1) % q->o.shards;
    pthread_mutex_unlock(&q->mu);
    if (nsh == 0) {
        amp_redisq_args_free(&a);
        free(sent);
        free(sent_shard);
        return 0;
    }
    redisReply *r = amp_redisq_pipe_call_wait(q->claims, RQ_CLAIM, &a);
    if (!r) {
        /* The script may have run with its answer lost (Redis went away
         * after it): its jobs would stay claimed by nobody while this
         * replica keeps the lease. Undo it once Redis answers again. */
        rq_args u = {0};
        amp_redisq_args_str(&u, RQ_PREFIX);
        amp_redisq_args_str(&u, tag);
        amp_redisq_args_int(&u, now_ms);
        for (int k = 0; k < nsh; k++) {
            amp_redisq_args_int(&u, sent_shard[k]);
            amp_redisq_args_str(&u, sent[k]);
        }
        hold(q, RQ_UNCLAIM, -1, &u);
    }
    free(sent_shard);
    if (!r || r->type != REDIS_REPLY_ARRAY) {
        if (r && r->type == REDIS_REPLY_ERROR)
            amp_log(AMP_LOG_ERROR, "redis claim failed", "{s:s}", "error", r->str);
        if (r)
            freeReplyObject(r);
        free(sent);
        return -1;
    }
    size_t n = 0;
    for (size_t i = 0; i < r->elements; i++) {
        redisReply *sr = r->element[i];
        if (sr->type != REDIS_REPLY_ARRAY || sr->elements < 2)
            continue;
        int s = atoi(sr->element[0]->str ? sr->element[0]->str : "0");
        if (i >= (size_t)nsh)
            break;
        if (sr->element[1]->integer == 0) {
            lose(q, s, sent[i], "claim");
            continue;
        }
        if (sr->elements < 4)
            continue;
        int64_t nd = strtoll(sr->element[2]->str, NULL, 10);
        if (nd >= 0 && nd < *next_due_ms)
            *next_due_ms = nd;
        redisReply *js = sr->element[3];
        int64_t got = 0;
        for (size_t j = 0; j < js->elements && n < max; j++) {
            redisReply *jr = js->element[j];
            if (jr->type != REDIS_REPLY_ARRAY || jr->elements < 9)
                continue;
            amp_queue_job *job = amp_xcalloc(1, sizeof *job);
            job->id = amp_redisq_id_from_str(jr->element[0]->str);
            job->shard = s;
            job->route = reply_str(jr->element[1]);
            job->app = reply_str(jr->element[2]);
            job->user = reply_str(jr->element[3]);
            job->per_user =
                jr->element[4]->type == REDIS_REPLY_STRING && strcmp(jr->element[4]->str, "1") == 0;
            job->body = reply_str(jr->element[5]);
            job->dedupe_key = nonempty(jr->element[6]);
            job->attempts =
                jr->element[7]->type == REDIS_REPLY_STRING ? atoi(jr->element[7]->str) : 0;
            job->conversation_id = nonempty(jr->element[8]);
            job->run_id = jr->elements > 9 ? nonempty(jr->element[9]) : NULL;
            job->source = jr->elements > 10 ? nonempty(jr->element[10]) : NULL;
            job->created_ms = job->id >> 20;
            jobs[n++] = job;
            got++;
        }
        pthread_mutex_lock(&q->mu);
        if (q->sh[s].owned && strcmp(q->sh[s].token, sent[i]) == 0)
            q->sh[s].inflight += got;
        pthread_mutex_unlock(&q->mu);
    }
    freeReplyObject(r);
    free(sent);
    if (n == max)
        *next_due_ms = now_ms;
    return (int)n;
}

/* ---- acknowledgements ----------------------------------------------------- */

static const char *kind_name(amp_queue_ack_kind k) {
    switch (k) {
    case AMP_QUEUE_ACK_DELIVERED:
        return "delivered";
    case AMP_QUEUE_ACK_RETRY:
        return "retry";
    case AMP_QUEUE_ACK_DEAD:
        return "dead";
    case AMP_QUEUE_ACK_WAITING:
        return "waiting";
    case AMP_QUEUE_ACK_RELEASE:
    default:
        return "release";
    }
}

static void settle(rq *q, int s, const char *token) {
    pthread_mutex_lock(&q->mu);
    if (q->sh[s].owned && strcmp(q->sh[s].token, token) == 0 && q->sh[s].inflight > 0)
        q->sh[s].inflight--;
    pthread_mutex_unlock(&q->mu);
}

/* An acknowledgement on its way: what its answer needs. */
typedef struct pending_ack {
    rq *q;
    int shard;
    char token[TOKEN_MAX];
    char id[48];
    rq_args keep; /* the script's arguments, held again if no answer comes */
} pending_ack;

static void hold(rq *q, int script, int shard, rq_args *args) {
    held_ack *h = amp_xcalloc(1, sizeof *h);
    h->script = script;
    h->shard = shard;
    h->args = *args;
    memset(args, 0, sizeof *args);
    pthread_mutex_lock(&q->mu);
    h->next = q->held;
    q->held = h;
    pthread_mutex_unlock(&q->mu);
}

static void ack_done(void *ctx, redisReply *r) {
    pending_ack *p = ctx;
    if (r && r->type == REDIS_REPLY_INTEGER) {
        settle(p->q, p->shard, p->token);
        if (r->integer != 1)
            amp_log(AMP_LOG_WARN,
                    "acknowledgement lost: the job is not claimed under this "
                    "lease; its owner delivers it again",
                    "{s:s, s:i}", "id", p->id, "shard", p->shard);
        if (r->integer == 0)
            lose(p->q, p->shard, p->token, "acknowledgement");
    } else {
        if (r)
            amp_log(AMP_LOG_ERROR, "redis acknowledgement failed", "{s:s}", "error",
                    r->type == REDIS_REPLY_ERROR ? r->str : "unexpected reply");
        /* No answer: the lease thread sends it again until it lands or the
         * lease is found gone. The job stays claimed meanwhile. */
        hold(p->q, RQ_ACK, p->shard, &p->keep);
    }
    if (r)
        freeReplyObject(r);
    amp_redisq_args_free(&p->keep);
    free(p);
}

/* Sent without waiting, like the SQLite engine's group commit: the worker
 * goes on at once, and the script's answer comes on the work thread. LOST
 * is answered at once when this replica already knows the lease is gone;
 * a loss found by the script is logged and the shard given up (its new
 * owner delivers the job again). */
static amp_queue_ack_status acknowledge(void *e, const amp_queue_ack *ack) {
    rq *q = e;
    int s = ack->shard;
    if (s < 0 || s >= q->o.shards)
        return AMP_QUEUE_ACK_FAILED;
    pending_ack *p = amp_xcalloc(1, sizeof *p);
    p->q = q;
    p->shard = s;
    pthread_mutex_lock(&q->mu);
    bool owned = q->sh[s].owned;
    snprintf(p->token, sizeof p->token, "%s", q->sh[s].token);
    pthread_mutex_unlock(&q->mu);
    if (!owned) {
        free(p);
        return AMP_QUEUE_ACK_LOST;
    }
    amp_redisq_id_to_str(ack->id, p->id, sizeof p->id);
    rq_args a = {0};
    amp_redisq_args_str(&a, RQ_PREFIX);
    amp_redisq_args_int(&a, s);
    amp_redisq_args_str(&a, p->token);
    amp_redisq_args_str(&a, p->id);
    amp_redisq_args_str(&a, kind_name(ack->kind));
    amp_redisq_args_int(&a, ack->due_ms);
    amp_redisq_args_int(&a, amp_now_ms());
    amp_redisq_args_int(&a, ack->http_status);
    amp_redisq_args_str(&a, ack->code);
    amp_redisq_args_str(&a, ack->message);
    amp_redisq_args_str(&a, !ack->conversation_id ? "" : ack->conversation_id[0] ? "set" : "clear");
    amp_redisq_args_str(&a, ack->conversation_id);
    amp_redisq_args_str(&a, ack->kind == AMP_QUEUE_ACK_WAITING ? ack->result_json : NULL);
    amp_redisq_args_str(&a, ack->kind == AMP_QUEUE_ACK_RETRY || ack->kind == AMP_QUEUE_ACK_RELEASE
                                ? ack->run_id
                                : NULL);
    for (int i = 0; i < a.n; i++)
        amp_redisq_args_add(&p->keep, a.v[i], a.len[i]);
    amp_redisq_pipe_call(q->work, RQ_ACK, &a, ack_done, p);
    return AMP_QUEUE_ACK_TAKEN;
}

static bool flush_until(void *e, int64_t deadline_ms) {
    rq *q = e;
    return amp_redisq_pipe_flush_until(q->ingest, deadline_ms) &&
           amp_redisq_pipe_flush_until(q->work, deadline_ms);
}

/* ---- the lease thread ----------------------------------------------------- */

typedef struct members {
    char **v;
    size_t n;
} members;

static void members_free(members *m) {
    for (size_t i = 0; i < m->n; i++)
        free(m->v[i]);
    free(m->v);
    m->v = NULL;
    m->n = 0;
}

/* Heartbeat, then the live replicas. -1 when Redis did not answer. */
static int heartbeat(rq *q, redisContext *c, members *m) {
    int64_t now = amp_now_ms();
    redisAppendCommand(c, "ZADD " RQ_PREFIX "members %lld %s", (long long)(now + q->o.lease_ms),
                       q->owner);
    redisAppendCommand(c, "ZREMRANGEBYSCORE " RQ_PREFIX "members -inf %lld", (long long)now);
    redisAppendCommand(c, "ZRANGE " RQ_PREFIX "members 0 -1");
    int rc = 0;
    for (int i = 0; i < 3; i++) {
        void *rep = NULL;
        if (redisGetReply(c, &rep) != REDIS_OK)
            return -1;
        redisReply *r = rep;
        if (i == 2 && r->type == REDIS_REPLY_ARRAY) {
            m->v = amp_xcalloc(r->elements + 1, sizeof *m->v);
            for (size_t k = 0; k < r->elements; k++)
                m->v[m->n++] = reply_str(r->element[k]);
        } else if (r->type == REDIS_REPLY_ERROR) {
            rc = -1;
        }
        freeReplyObject(r);
    }
    return rc;
}

static const char *desired_owner(const members *m, int shard, const char *me) {
    const char *best = me;
    uint64_t top = 0;
    bool any = false;
    for (size_t i = 0; i < m->n; i++) {
        uint64_t h = rendezvous(m->v[i], shard);
        if (!any || h > top) {
            top = h;
            best = m->v[i];
            any = true;
        }
    }
    return best;
}

/* Renew every owned lease in one script call. -1 when Redis did not answer. */
static int renew(rq *q, redisContext *c) {
    rq_args a = {0};
    amp_redisq_args_str(&a, RQ_PREFIX);
    amp_redisq_args_int(&a, q->o.lease_ms);
    int *which = amp_xcalloc((size_t)q->o.shards, sizeof *which);
    char(*tokens)[TOKEN_MAX] = amp_xcalloc((size_t)q->o.shards, TOKEN_MAX);
    int n = 0;
    pthread_mutex_lock(&q->mu);
    for (int s = 0; s < q->o.shards; s++)
        if (q->sh[s].owned) {
            which[n] = s;
            snprintf(tokens[n], TOKEN_MAX, "%s", q->sh[s].token);
            amp_redisq_args_int(&a, s);
            amp_redisq_args_str(&a, tokens[n]);
            n++;
        }
    pthread_mutex_unlock(&q->mu);
    int rc = 0;
    if (n > 0) {
        redisReply *r = amp_redisq_eval(c, &q->admin.shas, RQ_RENEW, &a);
        if (!r) {
            rc = -1;
        } else {
            for (size_t i = 0; r->type == REDIS_REPLY_ARRAY && i < r->elements && (int)i < n; i++)
                if (r->element[i]->integer == 0)
                    lose(q, which[i], tokens[i], "renewal");
            freeReplyObject(r);
        }
    }
    amp_redisq_args_free(&a);
    free(which);
    free(tokens);
    return rc;
}

static int acquire(rq *q, redisContext *c, int s) {
    rq_args a = {0};
    amp_redisq_args_str(&a, RQ_PREFIX);
    amp_redisq_args_int(&a, s);
    amp_redisq_args_str(&a, q->owner);
    amp_redisq_args_int(&a, q->o.lease_ms);
    amp_redisq_args_int(&a, amp_now_ms());
    redisReply *r = amp_redisq_eval(c, &q->admin.shas, RQ_ACQUIRE, &a);
    amp_redisq_args_free(&a);
    if (!r)
        return -1;
    int got = 0;
    if (r->type == REDIS_REPLY_ARRAY && r->elements == 3) {
        pthread_mutex_lock(&q->mu);
        shard_state *st = &q->sh[s];
        st->owned = true;
        st->draining = false;
        st->inflight = 0;
        st->free_since_ms = 0;
        snprintf(st->token, sizeof st->token, "%.*s", (int)r->element[0]->len, r->element[0]->str);
        pthread_mutex_unlock(&q->mu);
        amp_log(AMP_LOG_INFO, "shard acquired", "{s:i, s:s, s:I, s:I}", "shard", s, "token",
                r->element[0]->str, "claims_reset", (json_int_t)r->element[1]->integer,
                "pending_taken_over", (json_int_t)r->element[2]->integer);
        got = 1;
    } else if (r->type == REDIS_REPLY_ERROR) {
        amp_log(AMP_LOG_ERROR, "shard acquisition failed", "{s:i, s:s}", "shard", s, "error",
                r->str);
    }
    freeReplyObject(r);
    return got;
}

static void release(rq *q, redisContext *c, int s, const char *why) {
    char token[TOKEN_MAX];
    pthread_mutex_lock(&q->mu);
    snprintf(token, sizeof token, "%s", q->sh[s].token);
    int64_t out = q->sh[s].inflight;
    q->sh[s].owned = q->sh[s].draining = false;
    q->sh[s].inflight = 0;
    pthread_mutex_unlock(&q->mu);
    redisReply *r = redisCommand(c, "EVALSHA %s 0 %s %d %s", q->admin.shas.sha[RQ_RELEASE],
                                 RQ_PREFIX, s, token);
    if (r)
        freeReplyObject(r);
    amp_log(AMP_LOG_INFO, "shard released", "{s:i, s:s, s:s, s:I}", "shard", s, "token", token,
            "why", why, "jobs_out", (json_int_t)out);
}

/* Leases: take the free shards this replica should own, hand over those
 * another live replica should own. Returns how many were taken. */
static int balance(rq *q, redisContext *c, const members *m) {
    int64_t now = amp_mono_ms();
    int taken = 0;
    for (int s = 0; s < q->o.shards; s++) {
        const char *want = desired_owner(m, s, q->owner);
        bool mine = strcmp(want, q->owner) == 0;
        pthread_mutex_lock(&q->mu);
        shard_state st = q->sh[s];
        if (st.owned && !mine && !st.draining) {
            q->sh[s].draining = true;
            q->sh[s].drain_until_ms = now + q->o.lease_ms;
        }
        pthread_mutex_unlock(&q->mu);
        if (st.owned && st.draining && (st.inflight == 0 || now >= st.drain_until_ms)) {
            release(q, c, s, "another replica takes it");
            continue;
        }
        if (st.owned)
            continue;
        /* A shard whose replica does not take it within two lease periods
         * (it stalls) is taken by whoever sees it free. */
        if (!mine) {
            pthread_mutex_lock(&q->mu);
            if (!q->sh[s].free_since_ms)
                q->sh[s].free_since_ms = now;
            mine = now - q->sh[s].free_since_ms > 2 * q->o.lease_ms;
            pthread_mutex_unlock(&q->mu);
        }
        if (mine) {
            int g = acquire(q, c, s);
            if (g < 0)
                return taken;
            taken += g;
            if (g == 0 && strcmp(want, q->owner) != 0) {
                pthread_mutex_lock(&q->mu);
                q->sh[s].free_since_ms = 0; /* held by someone: not free */
                pthread_mutex_unlock(&q->mu);
            }
        }
    }
    return taken;
}

static void retry_held(rq *q, redisContext *c) {
    pthread_mutex_lock(&q->mu);
    held_ack *list = q->held;
    q->held = NULL;
    pthread_mutex_unlock(&q->mu);
    held_ack *keep = NULL;
    while (list) {
        held_ack *h = list;
        list = h->next;
        redisReply *r = c ? amp_redisq_eval(c, &q->admin.shas, h->script, &h->args) : NULL;
        if (!r) {
            h->next = keep;
            keep = h;
            continue;
        }
        if (h->script == RQ_ACK)
            settle(q, h->shard, h->args.v[2]);
        else if (r->type == REDIS_REPLY_INTEGER && r->integer > 0)
            amp_log(AMP_LOG_INFO, "claim with a lost answer undone: its jobs are due again",
                    "{s:I}", "jobs", (json_int_t)r->integer);
        freeReplyObject(r);
        amp_redisq_args_free(&h->args);
        free(h);
    }
    pthread_mutex_lock(&q->mu);
    while (keep) {
        held_ack *h = keep;
        keep = h->next;
        h->next = q->held;
        q->held = h;
    }
    pthread_mutex_unlock(&q->mu);
}

/* Pending jobs (stream lengths) and Redis memory in use. */
static void recount(rq *q, redisContext *c) {
    for (int s = 0; s < q->o.shards; s++)
        redisAppendCommand(c, "XLEN " RQ_PREFIX "%d:stream", s);
    redisAppendCommand(c, "INFO memory");
    int64_t depth = 0;
    for (int s = 0; s <= q->o.shards; s++) {
        void *rep = NULL;
        if (redisGetReply(c, &rep) != REDIS_OK)
            return;
        redisReply *r = rep;
        if (r->type == REDIS_REPLY_INTEGER)
            depth += r->integer;
        if (r->type == REDIS_REPLY_STRING) {
            const char *u = strstr(r->str, "used_memory:");
            if (u)
                atomic_store(&q->bytes, strtoll(u + 12, NULL, 10));
        }
        freeReplyObject(r);
    }
    atomic_store(&q->depth, depth);
}

static void wait_ms(rq *q, int64_t ms) {
    struct timespec ts = amp_mono_deadline_in(ms);
    pthread_mutex_lock(&q->mu);
    if (!q->stop)
        pthread_cond_timedwait(&q->stop_cv, &q->mu, &ts);
    pthread_mutex_unlock(&q->mu);
}

static bool stopping(rq *q) {
    pthread_mutex_lock(&q->mu);
    bool s = q->stop;
    pthread_mutex_unlock(&q->mu);
    return s;
}

static void *lease_main(void *arg) {
    rq *q = arg;
    pthread_setname_np(pthread_self(), "amp-rq-lease");
    int64_t tick = q->o.lease_ms / 4 > 25 ? q->o.lease_ms / 4 : 25;
    redisContext *c = NULL;
    int64_t next_recount = 0;
    bool down_logged = false;
    while (!stopping(q)) {
        char err[300];
        if (!c) {
            c = amp_redisq_connect(&q->url, err, sizeof err);
            if (!c) {
                atomic_store(&q->reachable, false);
                if (!down_logged)
                    amp_log(AMP_LOG_ERROR, "redis unreachable", "{s:s}", "error", err);
                down_logged = true;
                wait_ms(q, tick < 250 ? tick : 250);
                continue;
            }
        }
        members m = {0};
        int taken = 0;
        bool ok = heartbeat(q, c, &m) == 0 && renew(q, c) == 0 && (taken = balance(q, c, &m)) >= 0;
        members_free(&m);
        if (ok) {
            retry_held(q, c);
            if (amp_mono_ms() >= next_recount) {
                recount(q, c);
                next_recount = amp_mono_ms() + RECOUNT_MS;
            }
        }
        if (c->err) {
            ok = false;
            redisFree(c);
            c = NULL;
        }
        atomic_store(&q->reachable, ok);
        if (ok && down_logged) {
            amp_log(AMP_LOG_INFO, "redis reachable again", NULL);
            down_logged = false;
        }
        if (taken > 0)
            notify(q);
        if (ok)
            wait_ms(q, tick);
    }
    /* Closing: the forwarder has stopped and its acknowledgements are
     * stored, so the leases go back at once instead of expiring. */
    if (c) {
        retry_held(q, c);
        for (int s = 0; s < q->o.shards; s++) {
            pthread_mutex_lock(&q->mu);
            bool owned = q->sh[s].owned;
            pthread_mutex_unlock(&q->mu);
            if (owned)
                release(q, c, s, "shutdown");
        }
        redisReply *r = redisCommand(c, "ZREM " RQ_PREFIX "members %s", q->owner);
        if (r)
            freeReplyObject(r);
        redisFree(c);
    }
    return NULL;
}

/* ---- wake-ups ------------------------------------------------------------- *
 * The accept script publishes the shards it wrote to; a subscriber
 * connection (a plain blocking read, polled so that it can stop) wakes the
 * forwarder when one of them is owned here. A lost message costs at most the
 * forwarder's poll interval. */

static void on_message(rq *q, redisReply *r) {
    if (r->type != REDIS_REPLY_ARRAY || r->elements != 3 ||
        r->element[2]->type != REDIS_REPLY_STRING)
        return;
    bool mine = false;
    const char *p = r->element[2]->str;
    pthread_mutex_lock(&q->mu);
    while (*p && !mine) {
        int s = atoi(p);
        mine = s >= 0 && s < q->o.shards && q->sh[s].owned;
        p += strcspn(p, ",");
        p += *p == ',';
    }
    pthread_mutex_unlock(&q->mu);
    if (mine)
        notify(q);
}

static void *wake_main(void *arg) {
    rq *q = arg;
    pthread_setname_np(pthread_self(), "amp-rq-wake");
    redisContext *c = NULL;
    while (!stopping(q)) {
        if (!c) {
            char err[300];
            c = amp_redisq_connect(&q->url, err, sizeof err);
            if (!c) {
                wait_ms(q, 250);
                continue;
            }
            redisReply *r = redisCommand(c, "SUBSCRIBE " RQ_PREFIX "wake");
            if (!r) {
                redisFree(c);
                c = NULL;
                continue;
            }
            freeReplyObject(r);
        }
        struct pollfd pfd = {.fd = c->fd, .events = POLLIN};
        int pr = poll(&pfd, 1, 200);
        if (pr <= 0)
            continue;
        if (redisBufferRead(c) != REDIS_OK) {
            redisFree(c);
            c = NULL;
            continue;
        }
        void *rep = NULL;
        while (redisGetReplyFromReader(c, &rep) == REDIS_OK && rep) {
            on_message(q, rep);
            freeReplyObject(rep);
            rep = NULL;
        }
    }
    redisFree(c);
    return NULL;
}

/* ---- inspection ----------------------------------------------------------- */

static int stats_get(void *e, amp_queue_stats *out) {
    return amp_redisq_stats_get(&((rq *)e)->admin, out);
}

static int64_t oldest_pending_ms(void *e) {
    return amp_redisq_oldest_pending(&((rq *)e)->admin);
}

static int64_t depth(void *e) {
    return atomic_load(&((rq *)e)->depth);
}

static int64_t bytes(void *e) {
    return atomic_load(&((rq *)e)->bytes);
}

/* The lease thread's last exchange worked, and no batch went unanswered
 * since. */
static bool writable(void *e) {
    return atomic_load(&((rq *)e)->reachable);
}

static const char *full(void *e) {
    rq *q = e;
    if (!writable(q))
        return unreachable_msg;
    if (q->o.max_pending > 0 && atomic_load(&q->depth) >= q->o.max_pending)
        return "the queue holds spool.max_pending jobs";
    return NULL;
}

static json_t *dlq_list(void *e, const amp_queue_dlq_filter *f, size_t limit) {
    return amp_redisq_dlq_list(&((rq *)e)->admin, f, limit);
}

static int64_t dlq_replay(void *e, const amp_queue_dlq_filter *f) {
    rq *q = e;
    int64_t n = amp_redisq_dlq_replay(&q->admin, f);
    if (n > 0)
        notify(q);
    return n;
}

static int64_t dlq_purge(void *e, const amp_queue_dlq_filter *f) {
    return amp_redisq_dlq_purge(&((rq *)e)->admin, f);
}

/* ---- open and close ------------------------------------------------------- */

static void close_engine(void *e) {
    rq *q = e;
    if (!q)
        return;
    if (q->ingest)
        amp_redisq_pipe_flush_until(q->ingest, INT64_MAX);
    if (q->work)
        amp_redisq_pipe_flush_until(q->work, INT64_MAX);
    if (q->claims)
        amp_redisq_pipe_flush_until(q->claims, INT64_MAX);
    pthread_mutex_lock(&q->mu);
    q->stop = true;
    pthread_cond_broadcast(&q->stop_cv);
    pthread_mutex_unlock(&q->mu);
    if (q->wake_running)
        pthread_join(q->wake_thread, NULL);
    if (q->lease_running)
        pthread_join(q->lease_thread, NULL);
    amp_redisq_pipe_stop(q->ingest);
    amp_redisq_pipe_stop(q->work);
    amp_redisq_pipe_stop(q->claims);
    while (q->held) {
        held_ack *h = q->held;
        q->held = h->next;
        amp_redisq_args_free(&h->args);
        free(h);
    }
    amp_redisq_admin_destroy(&q->admin);
    free(q->sh);
    pthread_cond_destroy(&q->stop_cv);
    pthread_mutex_destroy(&q->mu);
    free(q);
}

static void close_admin(void *e) {
    rq *q = e;
    amp_redisq_admin_destroy(&q->admin);
    free(q);
}

static const amp_queue_ops engine_ops = {
    .close = close_engine,
    .set_notify = set_notify,
    .submit = submit,
    .claim = claim,
    .acknowledge = acknowledge,
    .flush_until = flush_until,
    .stats_get = stats_get,
    .oldest_pending_ms = oldest_pending_ms,
    .depth = depth,
    .bytes = bytes,
    .writable = writable,
    .full = full,
    .dlq_list = dlq_list,
    .dlq_replay = dlq_replay,
    .dlq_purge = dlq_purge,
};

static const amp_queue_ops admin_ops = {
    .close = close_admin,
    .stats_get = stats_get,
    .oldest_pending_ms = oldest_pending_ms,
    .dlq_list = dlq_list,
    .dlq_replay = dlq_replay,
    .dlq_purge = dlq_purge,
};

amp_queue *amp_redisq_open_admin(const amp_redisq_opts *opts, char *err, size_t errlen) {
    rq *q = amp_xcalloc(1, sizeof *q);
    q->o = *opts;
    if (amp_redisq_admin_init(&q->admin, opts, err, errlen) != 0) {
        free(q);
        return NULL;
    }
    return amp_queue_create(&admin_ops, q, opts->shards);
}

amp_queue *amp_redisq_open(const amp_redisq_opts *opts, char *err, size_t errlen) {
    if (opts->shards < 1 || opts->shards > AMP_REDISQ_MAX_SHARDS || opts->lease_ms < 1) {
        snprintf(err, errlen, "queue.shards must be 1..%d and queue.lease_ms positive",
                 AMP_REDISQ_MAX_SHARDS);
        return NULL;
    }
    rq *q = amp_xcalloc(1, sizeof *q);
    q->o = *opts;
    pthread_mutex_init(&q->mu, NULL);
    amp_cond_init_mono(&q->stop_cv);
    q->sh = amp_xcalloc((size_t)opts->shards, sizeof *q->sh);
    atomic_init(&q->reachable, true);
    if (amp_redisq_admin_init(&q->admin, opts, err, errlen) != 0)
        goto fail_early;
    q->url = q->admin.url;
    if (!opts->allow_weak_durability) {
        char found[256], expected[256];
        int d = amp_redisq_durability(q->admin.c, found, sizeof found, expected, sizeof expected);
        if (d != 0) {
            snprintf(err, errlen, "Redis at %s:%d refused: found %s; expected %s", q->url.host,
                     q->url.port, found, expected);
            goto fail;
        }
    }
    if (amp_redisq_check_shards(q->admin.c, opts->shards, err, errlen) != 0)
        goto fail;
    char host[64] = "host";
    gethostname(host, sizeof host - 1);
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    snprintf(q->owner, sizeof q->owner, "%s-%ld-%lx", host, (long)getpid(),
             (unsigned long)(ts.tv_nsec ^ (ts.tv_sec << 20)) & 0xffffffUL);
    q->ingest = amp_redisq_pipe_start("amp-rq-ingest", &q->url, &q->admin.shas);
    q->work = amp_redisq_pipe_start("amp-rq-work", &q->url, &q->admin.shas);
    q->claims = amp_redisq_pipe_start("amp-rq-claim", &q->url, &q->admin.shas);
    if (!q->ingest || !q->work || !q->claims) {
        snprintf(err, errlen, "cannot start the Redis threads");
        goto fail;
    }
    if (pthread_create(&q->lease_thread, NULL, lease_main, q) != 0) {
        snprintf(err, errlen, "cannot start the lease thread");
        goto fail;
    }
    q->lease_running = true;
    if (pthread_create(&q->wake_thread, NULL, wake_main, q) != 0) {
        snprintf(err, errlen, "cannot start the wake-up thread");
        goto fail;
    }
    q->wake_running = true;
    amp_log(AMP_LOG_INFO, "redis queue open", "{s:s, s:i, s:i, s:I}", "owner", q->owner, "shards",
            opts->shards, "port", q->url.port, "lease_ms", (json_int_t)opts->lease_ms);
    return amp_queue_create(&engine_ops, q, opts->shards);
fail:
    close_engine(q);
    return NULL;
fail_early:
    free(q->sh);
    pthread_cond_destroy(&q->stop_cv);
    pthread_mutex_destroy(&q->mu);
    free(q);
    return NULL;
}
