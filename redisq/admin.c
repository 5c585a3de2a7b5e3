/* The durability check, statistics and dead letters, on one synchronous
 * connection (the engine's, or the `dlq` command's admin handle). */
#include "redisq_int.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../base/alloc.h"
#include "../base/clock.h"
#include "../base/log.h"

/* Dead letters are read in pages of this many. */
#define DLQ_PAGE 500
/* Dead letters replayed or purged per call. */
#define DLQ_CHUNK 200

int amp_redisq_admin_init(rq_admin *a, const amp_redisq_opts *o, char *err, size_t errlen) {
    memset(a, 0, sizeof *a);
    a->shards = o->shards;
    char why[256];
    if (amp_redisq_parse_url(o->url, &a->url, why, sizeof why) != 0) {
        snprintf(err, errlen, "queue.url: found '%s'; expected %s", o->url ? o->url : "", why);
        return -1;
    }
    a->c = amp_redisq_connect(&a->url, err, errlen);
    if (!a->c)
        return -1;
    if (amp_redisq_load_scripts(a->c, &a->shas, err, errlen) != 0) {
        redisFree(a->c);
        a->c = NULL;
        return -1;
    }
    pthread_mutex_init(&a->mu, NULL);
    return 0;
}

void amp_redisq_admin_destroy(rq_admin *a) {
    redisFree(a->c);
    a->c = NULL;
    pthread_mutex_destroy(&a->mu);
}

/* Under a->mu: the connection, reconnected when the last one failed. */
static redisContext *conn(rq_admin *a) {
    if (a->c && a->c->err) {
        redisFree(a->c);
        a->c = NULL;
    }
    if (!a->c) {
        char err[300];
        a->c = amp_redisq_connect(&a->url, err, sizeof err);
        if (!a->c)
            amp_log(AMP_LOG_ERROR, "redis unreachable", "{s:s}", "error", err);
    }
    return a->c;
}

/* ---- checks --------------------------------------------------------------- */

static char *config_get(redisContext *c, const char *name) {
    redisReply *r = redisCommand(c, "CONFIG GET %s", name);
    char *v = NULL;
    if (r && r->type == REDIS_REPLY_ARRAY && r->elements == 2 &&
        r->element[1]->type == REDIS_REPLY_STRING)
        v = amp_xstrdup(r->element[1]->str);
    if (r)
        freeReplyObject(r);
    return v;
}

int amp_redisq_durability(redisContext *c, char *found, size_t found_len, char *expected,
                          size_t expected_len) {
    snprintf(expected, expected_len,
             "appendonly yes, appendfsync always and maxmemory-policy noeviction "
             "(or queue.allow_weak_durability true)");
    static const char *const names[] = {"appendonly", "appendfsync", "maxmemory-policy"};
    static const char *const want[] = {"yes", "always", "noeviction"};
    char *got[3] = {0};
    int rc = 0;
    for (int i = 0; i < 3; i++) {
        got[i] = config_get(c, names[i]);
        if (!got[i]) {
            snprintf(found, found_len, "a Redis whose CONFIG GET %s did not answer (%s)", names[i],
                     c->err ? c->errstr : "refused or renamed");
            rc = -1;
            goto out;
        }
    }
    size_t off = 0;
    found[0] = 0;
    for (int i = 0; i < 3; i++)
        if (strcmp(got[i], want[i]) != 0) {
            off += (size_t)snprintf(found + off, off < found_len ? found_len - off : 0, "%s%s %s",
                                    rc ? ", " : "a Redis with ", names[i], got[i]);
            rc = 1;
        }
out:
    for (int i = 0; i < 3; i++)
        free(got[i]);
    return rc;
}

int amp_redisq_check_shards(redisContext *c, int shards, char *err, size_t errlen) {
    redisReply *r = redisCommand(c, "SET " RQ_PREFIX "shards %d NX GET", shards);
    if (!r || r->type == REDIS_REPLY_ERROR) {
        snprintf(err, errlen, "Redis did not record the shard count: %s", r ? r->str : c->errstr);
        if (r)
            freeReplyObject(r);
        return -1;
    }
    int rc = 0;
    if (r->type == REDIS_REPLY_STRING && atoi(r->str) != shards) {
        snprintf(err, errlen,
                 "queue.shards: found %d; expected %s, the shard count this Redis queue was "
                 "created with (its jobs are placed by it)",
                 shards, r->str);
        rc = -1;
    }
    freeReplyObject(r);
    return rc;
}

amp_redisq_check_result amp_redisq_check(const amp_redisq_opts *opts, char *found, size_t found_len,
                                         char *expected, size_t expected_len) {
    rq_url u;
    char why[300];
    if (amp_redisq_parse_url(opts->url, &u, why, sizeof why) != 0) {
        snprintf(found, found_len, "'%s'", opts->url ? opts->url : "");
        snprintf(expected, expected_len, "%s", why);
        return AMP_REDISQ_CHECK_REFUSED;
    }
    redisContext *c = amp_redisq_connect(&u, why, sizeof why);
    if (!c) {
        snprintf(found, found_len, "no Redis answering (%s)", why);
        snprintf(expected, expected_len, "a reachable Redis");
        return AMP_REDISQ_CHECK_UNREACHABLE;
    }
    amp_redisq_check_result res = AMP_REDISQ_CHECK_OK;
    if (!opts->allow_weak_durability) {
        int d = amp_redisq_durability(c, found, found_len, expected, expected_len);
        if (d != 0)
            res = AMP_REDISQ_CHECK_REFUSED;
    }
    redisFree(c);
    return res;
}

/* ---- statistics ----------------------------------------------------------- */

int amp_redisq_stats_get(rq_admin *a, amp_queue_stats *out) {
    memset(out, 0, sizeof *out);
    pthread_mutex_lock(&a->mu);
    redisContext *c = conn(a);
    int rc = -1;
    if (!c)
        goto out;
    for (int s = 0; s < a->shards; s++) {
        redisAppendCommand(c, "XLEN " RQ_PREFIX "%d:stream", s);
        redisAppendCommand(c, "XRANGE " RQ_PREFIX "%d:stream - + COUNT 1", s);
    }
    redisAppendCommand(c, "GET " RQ_PREFIX "delivered");
    redisAppendCommand(c, "XLEN " RQ_PREFIX "dead");
    redisAppendCommand(c, "XLEN " RQ_PREFIX "waiting");
    int n = 2 * a->shards + 3;
    rc = 0;
    for (int i = 0; i < n; i++) {
        void *rep = NULL;
        if (redisGetReply(c, &rep) != REDIS_OK) {
            rc = -1;
            break;
        }
        redisReply *r = rep;
        if (i < 2 * a->shards && i % 2 == 0 && r->type == REDIS_REPLY_INTEGER)
            out->pending += r->integer;
        if (i < 2 * a->shards && i % 2 == 1 && r->type == REDIS_REPLY_ARRAY && r->elements == 1) {
            int64_t ms = strtoll(r->element[0]->element[0]->str, NULL, 10);
            if (!out->oldest_pending_ms || ms < out->oldest_pending_ms)
                out->oldest_pending_ms = ms;
        }
        if (i == n - 3 && r->type == REDIS_REPLY_STRING)
            out->delivered = strtoll(r->str, NULL, 10);
        if (i == n - 2 && r->type == REDIS_REPLY_INTEGER)
            out->dead = r->integer;
        if (i == n - 1 && r->type == REDIS_REPLY_INTEGER)
            out->waiting = r->integer;
        freeReplyObject(r);
    }
out:
    pthread_mutex_unlock(&a->mu);
    return rc;
}

int64_t amp_redisq_oldest_pending(rq_admin *a) {
    amp_queue_stats st;
    return amp_redisq_stats_get(a, &st) == 0 ? st.oldest_pending_ms : 0;
}

/* ---- dead letters --------------------------------------------------------- */

/* The stream f acts on: the waiting rows (AMP_QUEUE_ACK_WAITING) with
 * f->waiting, else the dead letters. */
static const char *rows_stream(const amp_queue_dlq_filter *f) {
    return f->waiting ? "waiting" : "dead";
}

static const char *field(const redisReply *e, const char *name) {
    const redisReply *kv = e->element[1];
    for (size_t j = 0; j + 1 < kv->elements; j += 2)
        if (strcmp(kv->element[j]->str, name) == 0)
            return kv->element[j + 1]->str;
    return NULL;
}

static bool eq(const char *want, const char *got) {
    return !want || (got && strcmp(want, got) == 0);
}

static bool matches(const amp_queue_dlq_filter *f, const redisReply *e, int64_t id) {
    int64_t dead_ms = id >> 20;
    if (!eq(f->route, field(e, "route")) || !eq(f->app, field(e, "app")) ||
        !eq(f->code, field(e, "code")))
        return false;
    const char *st = field(e, "status");
    if (f->status && (!st || atoi(st) != f->status))
        return false;
    if ((f->since_ms && dead_ms < f->since_ms) || (f->until_ms && dead_ms >= f->until_ms))
        return false;
    if (f->ids) {
        for (size_t i = 0; i < f->nids; i++)
            if (f->ids[i] == id)
                return true;
        return false;
    }
    return true;
}

static const char *nz(const char *s) {
    return s && *s ? s : NULL;
}

/* Calls each(e, id, ctx) for every matching row of rows_stream(f), oldest first,
 * until it returns false. -1 when Redis failed. Under a->mu. */
static int walk(rq_admin *a, const amp_queue_dlq_filter *f,
                bool (*each)(const redisReply *e, int64_t id, void *ctx), void *ctx) {
    redisContext *c = conn(a);
    if (!c)
        return -1;
    char from[48] = "-";
    for (;;) {
        redisReply *r =
            redisCommand(c, "XRANGE " RQ_PREFIX "%s %s + COUNT %d", rows_stream(f), from, DLQ_PAGE);
        if (!r || r->type != REDIS_REPLY_ARRAY) {
            if (r)
                freeReplyObject(r);
            return -1;
        }
        size_t n = r->elements;
        for (size_t i = 0; i < n; i++) {
            const redisReply *e = r->element[i];
            int64_t id = amp_redisq_id_from_str(e->element[0]->str);
            if (matches(f, e, id) && !each(e, id, ctx)) {
                freeReplyObject(r);
                return 0;
            }
            if (i == n - 1)
                snprintf(from, sizeof from, "(%s", e->element[0]->str);
        }
        freeReplyObject(r);
        if (n < DLQ_PAGE)
            return 0;
    }
}

typedef struct list_ctx {
    json_t *rows;
    size_t limit;
    bool waiting; /* the rows are waiting ones */
} list_ctx;

static bool add_row(const redisReply *e, int64_t id, void *p) {
    list_ctx *l = p;
    if (json_array_size(l->rows) >= l->limit)
        return false;
    const char *att = field(e, "attempts"), *st = field(e, "status"), *cr = field(e, "created_ms");
    json_t *row =
        json_pack("{s:I, s:s?, s:s?, s:s?, s:s?, s:i, s:s?, s:s?, s:i, s:I, s:I, s:s?}", "id",
                  (json_int_t)id, "route", field(e, "route"), "app", field(e, "app"), "user",
                  field(e, "user"), "dedupe_key", nz(field(e, "key")), "status", st ? atoi(st) : 0,
                  "code", nz(field(e, "code")), "message", nz(field(e, "message")), "attempts",
                  att ? atoi(att) : 0, "created_ms", (json_int_t)(cr ? strtoll(cr, NULL, 10) : 0),
                  "dead_ms", (json_int_t)(id >> 20), "body", field(e, "body"));
    if (row && l->waiting) {
        json_object_set_new(row, "state", json_string("waiting_input"));
        const char *res = nz(field(e, "result"));
        json_t *rj = res ? json_loads(res, 0, NULL) : NULL;
        json_object_set_new(row, "result", rj ? rj : json_null());
    } else if (row) {
        json_object_set_new(row, "state", json_string("dead"));
    }
    if (row)
        json_array_append_new(l->rows, row);
    return json_array_size(l->rows) < l->limit;
}

json_t *amp_redisq_dlq_list(rq_admin *a, const amp_queue_dlq_filter *f, size_t limit) {
    list_ctx l = {.rows = json_array(), .limit = limit, .waiting = f->waiting};
    pthread_mutex_lock(&a->mu);
    int rc = limit ? walk(a, f, add_row, &l) : 0;
    pthread_mutex_unlock(&a->mu);
    if (rc != 0) {
        json_decref(l.rows);
        return NULL;
    }
    return l.rows;
}

typedef struct change_ctx {
    rq_admin *a;
    const char *stream; /* rows_stream() */
    bool replay;
    rq_args args;
    int64_t done;
    int pending;
    bool failed;
} change_ctx;

/* Send the gathered ids: XDEL (purge) or the replay script. */
static void change_flush(change_ctx *x) {
    if (x->pending == 0 || x->failed)
        return;
    redisReply *r =
        x->replay ? amp_redisq_eval(x->a->c, &x->a->shas, RQ_REPLAY, &x->args)
                  : redisCommandArgv(x->a->c, x->args.n, (const char **)x->args.v, x->args.len);
    if (r && r->type == REDIS_REPLY_INTEGER)
        x->done += r->integer;
    else
        x->failed = true;
    if (r)
        freeReplyObject(r);
    amp_redisq_args_free(&x->args);
    x->pending = 0;
}

static void change_start(change_ctx *x) {
    if (x->replay) {
        amp_redisq_args_str(&x->args, RQ_PREFIX);
        amp_redisq_args_str(&x->args, x->stream);
    } else {
        char key[32];
        snprintf(key, sizeof key, RQ_PREFIX "%s", x->stream);
        amp_redisq_args_str(&x->args, "XDEL");
        amp_redisq_args_str(&x->args, key);
    }
}

/* Ids are gathered during the walk, then changed in chunks: a walk reads
 * pages by id, so changing them as it goes would not skip any. */
typedef struct gather {
    change_ctx *x;
    char **ids; /* "<dead id> <shard>" */
    size_t n, cap;
} gather;

static bool gather_one(const redisReply *e, int64_t id, void *p) {
    (void)id;
    gather *g = p;
    if (g->n == g->cap) {
        g->cap = g->cap ? g->cap * 2 : 64;
        g->ids = amp_xrealloc(g->ids, g->cap * sizeof *g->ids);
    }
    const char *app = field(e, "app"), *user = field(e, "user");
    char sh[16];
    snprintf(sh, sizeof sh, "%d",
             amp_redisq_shard_of(app ? app : "", user ? user : "", g->x->a->shards));
    g->ids[g->n++] = amp_xasprintf("%s %s", e->element[0]->str, sh);
    return true;
}

static int64_t change(rq_admin *a, const amp_queue_dlq_filter *f, bool replay) {
    change_ctx x = {.a = a, .stream = rows_stream(f), .replay = replay};
    gather g = {.x = &x};
    pthread_mutex_lock(&a->mu);
    int rc = walk(a, f, gather_one, &g);
    for (size_t i = 0; rc == 0 && i < g.n; i++) {
        char *sp = strchr(g.ids[i], ' ');
        *sp = 0;
        if (x.pending == 0)
            change_start(&x);
        amp_redisq_args_str(&x.args, g.ids[i]);
        if (replay)
            amp_redisq_args_str(&x.args, sp + 1);
        if (++x.pending >= DLQ_CHUNK)
            change_flush(&x);
    }
    if (rc == 0)
        change_flush(&x);
    amp_redisq_args_free(&x.args);
    pthread_mutex_unlock(&a->mu);
    for (size_t i = 0; i < g.n; i++)
        free(g.ids[i]);
    free(g.ids);
    return rc != 0 || x.failed ? -1 : x.done;
}

int64_t amp_redisq_dlq_replay(rq_admin *a, const amp_queue_dlq_filter *f) {
    return change(a, f, true);
}

int64_t amp_redisq_dlq_purge(rq_admin *a, const amp_queue_dlq_filter *f) {
    return change(a, f, false);
}
