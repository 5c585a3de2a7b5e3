/* URLs, connections, script calls and the pipelined call threads. */
#include "redisq_int.h"

#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>
#include <time.h>

#include "../base/alloc.h"
#include "../base/clock.h"
#include "../base/log.h"

/* ---- URL ------------------------------------------------------------------ */

int amp_redisq_parse_url(const char *url, rq_url *out, char *err, size_t errlen) {
    memset(out, 0, sizeof *out);
    out->port = 6379;
    static const char scheme[] = "redis://";
    if (!url || strncmp(url, scheme, sizeof scheme - 1) != 0) {
        snprintf(err, errlen, "a redis://host:port URL");
        return -1;
    }
    const char *p = url + sizeof scheme - 1;
    const char *at = strrchr(p, '@');
    if (at) { /* [user]:password@ */
        const char *colon = memchr(p, ':', (size_t)(at - p));
        const char *pw = colon ? colon + 1 : p;
        size_t n = (size_t)(at - pw);
        if (n >= sizeof out->password) {
            snprintf(err, errlen, "a password shorter than %zu bytes", sizeof out->password);
            return -1;
        }
        memcpy(out->password, pw, n);
        p = at + 1;
    }
    size_t hlen = strcspn(p, ":/");
    if (hlen == 0 || hlen >= sizeof out->host) {
        snprintf(err, errlen, "a host name in the URL");
        return -1;
    }
    memcpy(out->host, p, hlen);
    p += hlen;
    if (*p == ':') {
        char *end;
        long port = strtol(p + 1, &end, 10);
        if (end == p + 1 || port < 1 || port > 65535 || (*end && *end != '/')) {
            snprintf(err, errlen, "a port 1..65535 after the host");
            return -1;
        }
        out->port = (int)port;
        p = end;
    }
    if (*p == '/' && p[1]) {
        char *end;
        long db = strtol(p + 1, &end, 10);
        if (end == p + 1 || *end || db < 0 || db > 1000000) {
            snprintf(err, errlen, "a database number after the '/'");
            return -1;
        }
        out->db = (int)db;
    } else if (*p && strcmp(p, "/") != 0) {
        snprintf(err, errlen, "redis://[:password@]host[:port][/db]");
        return -1;
    }
    return 0;
}

static struct timeval tv_ms(int64_t ms) {
    return (struct timeval){.tv_sec = (time_t)(ms / 1000),
                            .tv_usec = (suseconds_t)(ms % 1000) * 1000};
}

/* A simple command's reply is an error or missing: err filled, -1. */
static int simple(redisContext *c, char *err, size_t errlen, const char *what, int argc,
                  const char **argv) {
    redisReply *r = redisCommandArgv(c, argc, argv, NULL);
    if (!r) {
        snprintf(err, errlen, "%s: %s", what, c->errstr[0] ? c->errstr : "no answer");
        return -1;
    }
    int rc = 0;
    if (r->type == REDIS_REPLY_ERROR) {
        snprintf(err, errlen, "%s: %s", what, r->str);
        rc = -1;
    }
    freeReplyObject(r);
    return rc;
}

redisContext *amp_redisq_connect(const rq_url *u, char *err, size_t errlen) {
    redisContext *c = redisConnectWithTimeout(u->host, u->port, tv_ms(RQ_CONNECT_TIMEOUT_MS));
    if (!c || c->err) {
        snprintf(err, errlen, "cannot connect to Redis at %s:%d: %s", u->host, u->port,
                 c ? c->errstr : "out of memory");
        redisFree(c);
        return NULL;
    }
    redisSetTimeout(c, tv_ms(RQ_IO_TIMEOUT_MS));
    redisEnableKeepAlive(c);
    if (u->password[0]) {
        const char *argv[] = {"AUTH", u->password};
        if (simple(c, err, errlen, "Redis AUTH", 2, argv) != 0)
            goto fail;
    }
    if (u->db) {
        char db[16];
        snprintf(db, sizeof db, "%d", u->db);
        const char *argv[] = {"SELECT", db};
        if (simple(c, err, errlen, "Redis SELECT", 2, argv) != 0)
            goto fail;
    }
    return c;
fail:
    redisFree(c);
    return NULL;
}

/* ---- arguments ------------------------------------------------------------ */

void amp_redisq_args_add(rq_args *a, const char *s, size_t len) {
    if (a->n == a->cap) {
        a->cap = a->cap ? a->cap * 2 : 16;
        a->v = amp_xrealloc(a->v, (size_t)a->cap * sizeof *a->v);
        a->len = amp_xrealloc(a->len, (size_t)a->cap * sizeof *a->len);
    }
    a->v[a->n] = amp_xstrndup(s, len);
    a->len[a->n++] = len;
}

void amp_redisq_args_str(rq_args *a, const char *s) {
    s = s ? s : "";
    amp_redisq_args_add(a, s, strlen(s));
}

void amp_redisq_args_int(rq_args *a, int64_t v) {
    char buf[24];
    int n = snprintf(buf, sizeof buf, "%" PRId64, v);
    amp_redisq_args_add(a, buf, (size_t)n);
}

void amp_redisq_args_free(rq_args *a) {
    for (int i = 0; i < a->n; i++)
        free(a->v[i]);
    free(a->v);
    free(a->len);
    memset(a, 0, sizeof *a);
}

/* ---- scripts -------------------------------------------------------------- */

int amp_redisq_load_scripts(redisContext *c, rq_shas *shas, char *err, size_t errlen) {
    for (int i = 0; i < RQ_NSCRIPTS; i++) {
        redisReply *r = redisCommand(c, "SCRIPT LOAD %s", amp_redisq_script(i));
        if (!r || r->type != REDIS_REPLY_STRING || r->len != 40) {
            snprintf(err, errlen, "Redis SCRIPT LOAD failed: %s",
                     r && r->type == REDIS_REPLY_ERROR ? r->str
                     : c->errstr[0]                    ? c->errstr
                                                       : "no answer");
            if (r)
                freeReplyObject(r);
            return -1;
        }
        memcpy(shas->sha[i], r->str, 41);
        freeReplyObject(r);
    }
    return 0;
}

/* "EVALSHA sha 0 args..." as argv (borrowing args' strings). */
static void eval_argv(const rq_shas *shas, int script, const rq_args *args, const char **argv,
                      size_t *lens) {
    argv[0] = "EVALSHA";
    lens[0] = 7;
    argv[1] = shas->sha[script];
    lens[1] = 40;
    argv[2] = "0";
    lens[2] = 1;
    for (int i = 0; i < args->n; i++) {
        argv[i + 3] = args->v[i];
        lens[i + 3] = args->len[i];
    }
}

static bool noscript(const redisReply *r) {
    return r && r->type == REDIS_REPLY_ERROR && strncmp(r->str, "NOSCRIPT", 8) == 0;
}

/* After NOSCRIPT: load the scripts again (their SHA1 does not change). */
static int reload(redisContext *c) {
    rq_shas again;
    char err[256];
    if (amp_redisq_load_scripts(c, &again, err, sizeof err) != 0) {
        amp_log(AMP_LOG_ERROR, "redis scripts could not be loaded", "{s:s}", "error", err);
        return -1;
    }
    return 0;
}

redisReply *amp_redisq_eval(redisContext *c, const rq_shas *shas, int script, const rq_args *args) {
    const char **argv = amp_xcalloc((size_t)args->n + 3, sizeof *argv);
    size_t *lens = amp_xcalloc((size_t)args->n + 3, sizeof *lens);
    eval_argv(shas, script, args, argv, lens);
    redisReply *r = redisCommandArgv(c, args->n + 3, argv, lens);
    if (noscript(r)) {
        freeReplyObject(r);
        r = reload(c) == 0 ? redisCommandArgv(c, args->n + 3, argv, lens) : NULL;
    }
    free(argv);
    free(lens);
    return r;
}

/* ---- call threads --------------------------------------------------------- */

struct rq_call {
    rq_call *next;
    int script;
    rq_args args;
    rq_done_fn done;
    void *ctx;
};

struct rq_pipe {
    char name[16];
    const rq_url *url;
    const rq_shas *shas;
    redisContext *c; /* the thread's */
    pthread_t thread;
    pthread_mutex_t mu;
    pthread_cond_t cond;    /* calls queued, or stop */
    pthread_cond_t settled; /* a round of calls was answered */
    rq_call *head, *tail;
    uint64_t queued, answered; /* calls ever queued / answered (under mu) */
    bool stop;
    atomic_bool ok;
    int64_t next_connect_ms; /* thread only: no reconnect before */
    bool logged_down;        /* thread only */
};

static void answer(rq_call *k, redisReply *r) {
    k->done(k->ctx, r); /* takes the reply */
    amp_redisq_args_free(&k->args);
    free(k);
}

static void drop_conn(rq_pipe *p, const char *why) {
    if (!p->logged_down)
        amp_log(AMP_LOG_ERROR, "redis connection lost", "{s:s, s:s}", "thread", p->name, "error",
                why);
    p->logged_down = true;
    redisFree(p->c);
    p->c = NULL;
    atomic_store(&p->ok, false);
    p->next_connect_ms = amp_mono_ms() + 100;
}

/* One round: send every call of the list in one pipeline, then read the
 * answers in order. */
static void run_round(rq_pipe *p, rq_call *list) {
    if (!p->c && amp_mono_ms() >= p->next_connect_ms) {
        char err[300];
        p->c = amp_redisq_connect(p->url, err, sizeof err);
        if (!p->c) {
            drop_conn(p, err);
        } else if (p->logged_down) {
            amp_log(AMP_LOG_INFO, "redis connection back", "{s:s}", "thread", p->name);
            p->logged_down = false;
        }
    }
    rq_call *k = list;
    int sent = 0;
    if (p->c) {
        for (rq_call *x = list; x; x = x->next) {
            const char **argv = amp_xcalloc((size_t)x->args.n + 3, sizeof *argv);
            size_t *lens = amp_xcalloc((size_t)x->args.n + 3, sizeof *lens);
            eval_argv(p->shas, x->script, &x->args, argv, lens);
            redisAppendCommandArgv(p->c, x->args.n + 3, argv, lens);
            free(argv);
            free(lens);
            sent++;
        }
    }
    bool reloaded = false;
    while (k) {
        rq_call *next = k->next;
        redisReply *r = NULL;
        if (p->c && sent > 0) {
            void *rep = NULL;
            if (redisGetReply(p->c, &rep) != REDIS_OK)
                drop_conn(p, p->c->errstr);
            r = rep;
            sent--;
        }
        if (noscript(r) && p->c) {
            /* Redis restarted and lost its script cache: load the scripts
             * and send this call again on its own. */
            freeReplyObject(r);
            r = NULL;
            if (reloaded || reload(p->c) == 0) {
                reloaded = true;
                r = amp_redisq_eval(p->c, p->shas, k->script, &k->args);
                if (!r)
                    drop_conn(p, p->c->errstr);
            }
        }
        if (r)
            atomic_store(&p->ok, true);
        answer(k, r);
        k = next;
    }
}

static void *pipe_main(void *arg) {
    rq_pipe *p = arg;
    pthread_setname_np(pthread_self(), p->name);
    pthread_mutex_lock(&p->mu);
    for (;;) {
        while (!p->head && !p->stop)
            pthread_cond_wait(&p->cond, &p->mu);
        if (!p->head && p->stop)
            break;
        /* Take up to RQ_PIPE_MAX calls. */
        rq_call *list = p->head, *last = p->head;
        int n = 1;
        while (last->next && n < RQ_PIPE_MAX) {
            last = last->next;
            n++;
        }
        p->head = last->next;
        if (!p->head)
            p->tail = NULL;
        last->next = NULL;
        pthread_mutex_unlock(&p->mu);
        run_round(p, list);
        pthread_mutex_lock(&p->mu);
        p->answered += (uint64_t)n;
        pthread_cond_broadcast(&p->settled);
    }
    pthread_mutex_unlock(&p->mu);
    redisFree(p->c);
    p->c = NULL;
    return NULL;
}

rq_pipe *amp_redisq_pipe_start(const char *name, const rq_url *url, const rq_shas *shas) {
    rq_pipe *p = amp_xcalloc(1, sizeof *p);
    snprintf(p->name, sizeof p->name, "%s", name);
    p->url = url;
    p->shas = shas;
    atomic_init(&p->ok, true);
    pthread_mutex_init(&p->mu, NULL);
    pthread_cond_init(&p->cond, NULL);
    amp_cond_init_mono(&p->settled);
    if (pthread_create(&p->thread, NULL, pipe_main, p) != 0) {
        pthread_cond_destroy(&p->settled);
        pthread_cond_destroy(&p->cond);
        pthread_mutex_destroy(&p->mu);
        free(p);
        return NULL;
    }
    return p;
}

void amp_redisq_pipe_call(rq_pipe *p, int script, rq_args *args, rq_done_fn done, void *ctx) {
    rq_call *k = amp_xcalloc(1, sizeof *k);
    k->script = script;
    k->args = *args;
    memset(args, 0, sizeof *args);
    k->done = done;
    k->ctx = ctx;
    pthread_mutex_lock(&p->mu);
    if (p->tail)
        p->tail->next = k;
    else
        p->head = k;
    p->tail = k;
    p->queued++;
    pthread_cond_signal(&p->cond);
    pthread_mutex_unlock(&p->mu);
}

typedef struct waiter {
    pthread_mutex_t mu;
    pthread_cond_t cond;
    bool done;
    redisReply *reply;
} waiter;

static void wake_waiter(void *ctx, redisReply *r) {
    waiter *w = ctx;
    pthread_mutex_lock(&w->mu);
    w->reply = r;
    w->done = true;
    pthread_cond_signal(&w->cond);
    pthread_mutex_unlock(&w->mu);
}

redisReply *amp_redisq_pipe_call_wait(rq_pipe *p, int script, rq_args *args) {
    waiter w = {.done = false};
    pthread_mutex_init(&w.mu, NULL);
    pthread_cond_init(&w.cond, NULL);
    amp_redisq_pipe_call(p, script, args, wake_waiter, &w);
    pthread_mutex_lock(&w.mu);
    while (!w.done)
        pthread_cond_wait(&w.cond, &w.mu);
    pthread_mutex_unlock(&w.mu);
    pthread_cond_destroy(&w.cond);
    pthread_mutex_destroy(&w.mu);
    return w.reply;
}

bool amp_redisq_pipe_flush_until(rq_pipe *p, int64_t deadline_ms) {
    pthread_mutex_lock(&p->mu);
    uint64_t target = p->queued;
    while (p->answered < target) {
        if (deadline_ms == INT64_MAX) {
            pthread_cond_wait(&p->settled, &p->mu);
            continue;
        }
        int64_t left = deadline_ms - amp_mono_ms();
        if (left <= 0)
            break;
        struct timespec ts = amp_mono_deadline_in(left);
        pthread_cond_timedwait(&p->settled, &p->mu, &ts);
    }
    bool done = p->answered >= target;
    pthread_mutex_unlock(&p->mu);
    return done;
}

bool amp_redisq_pipe_ok(rq_pipe *p) {
    return atomic_load(&p->ok);
}

void amp_redisq_pipe_stop(rq_pipe *p) {
    if (!p)
        return;
    pthread_mutex_lock(&p->mu);
    p->stop = true;
    pthread_cond_signal(&p->cond);
    pthread_mutex_unlock(&p->mu);
    pthread_join(p->thread, NULL);
    pthread_cond_destroy(&p->settled);
    pthread_cond_destroy(&p->cond);
    pthread_mutex_destroy(&p->mu);
    free(p);
}

/* ---- ids ------------------------------------------------------------------ */

int64_t amp_redisq_id_from_str(const char *s) {
    char *end;
    unsigned long long ms = strtoull(s, &end, 10);
    unsigned long long seq = *end == '-' ? strtoull(end + 1, NULL, 10) : 0;
    return (int64_t)((ms << 20) | (seq & 0xFFFFF));
}

void amp_redisq_id_to_str(int64_t id, char *buf, size_t len) {
    snprintf(buf, len, "%" PRId64 "-%" PRId64, id >> 20, id & 0xFFFFF);
}
