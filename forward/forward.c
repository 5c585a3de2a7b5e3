/*
 * The delivery engine: one dispatcher thread that claims due rows from the
 * spool, and a pool of workers that each send one request at a time over
 * their own reused connection and acknowledge the outcome to the spool.
 *
 * The dispatcher never claims more rows than there are idle workers, so a
 * claimed row is always about to be sent (rows wait in the spool, not in
 * memory, and a crash loses nothing that was not in flight). It sleeps until
 * kicked (new work committed), until a worker frees up after a full claim,
 * or until the next row is due — at most MAX_WAIT_MS, so a wall-clock jump
 * cannot strand work.
 *
 * Per-app state lives in app_state: the URL, the auth header, metric
 * series, and the pause after a rejected key (401/403): jobs of a paused
 * app are released to the pause's end without a request (not counted as
 * attempts, never expired), and the requests after it are the probes. Not
 * built yet, planned on the same structure: token-bucket rate limits
 * (rate_per_sec, burst) and max_in_flight, enforced by the dispatcher
 * holding back claimed jobs per app; a single probe after a pause (today
 * every worker may probe at once); skipping paused apps inside
 * amp_spool_claim instead of claiming and releasing their rows.
 *
 * Locking: f->mu guards the queue, the counters and app_state's mutable
 * fields. Nothing blocking (spool calls, HTTP) runs under it.
 */
#include "forward.h"
#include "forward_int.h"

#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <string.h>
#include <time.h>

#include "../server/log.h"

#define MAX_WAIT_MS 1000
/* Floor between claims when rows are due but none could be claimed (a
 * per-user row waiting for its sibling's acknowledgement to commit); the
 * spool's notify after that commit wakes the dispatcher sooner. */
#define MIN_RECLAIM_MS 20
#define TRACE_ID_MAX 256

typedef struct app_state {
    const amp_app *app;
    char *url;
    char *auth; /* "Authorization: Bearer <key>" — never logged */
    /* Metric series, all NULL without a registry: */
    amp_series *m_delivered, *m_retried, *m_dead;
    amp_series *m_in_flight, *m_paused, *m_seconds;
    /* Guarded by amp_forward.mu: */
    int64_t paused_until_ms; /* 0: not paused */
    int pause_strikes;       /* consecutive rejections; grows the pause */
} app_state;

typedef struct worker {
    amp_forward *f;
    amp_forward_http *http;
    pthread_t thread;
    bool started;
    uint64_t rng;
} worker;

struct amp_forward {
    amp_forward_opts opts;
    amp_spool *spool;
    app_state *apps;
    size_t napps;
    amp_metrics *metrics; /* may be NULL */
    worker *workers;
    unsigned nworkers;
    pthread_t dispatcher;
    bool dispatcher_started;

    pthread_mutex_t mu;
    pthread_cond_t dispatch_cv; /* wake or stopping */
    pthread_cond_t work_cv;     /* queue non-empty or stopping */
    amp_spool_job **queue;      /* ring of nworkers slots */
    size_t qhead, qlen;
    unsigned outstanding; /* queued + being delivered */
    bool wake;            /* kicked, or a slot freed while want_slot */
    bool want_slot;       /* the last claim filled every slot */
    bool stopping;
};

/* ---- small pieces ----------------------------------------------------- */

/* splitmix64: jitter only needs to be spread, not secret. */
static double next_rnd(uint64_t *s) {
    uint64_t z = (*s += 0x9E3779B97F4A7C15ULL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    z ^= z >> 31;
    return (double)(z >> 11) / 9007199254740992.0; /* 2^53 */
}

static app_state *find_app(amp_forward *f, const char *name) {
    for (size_t i = 0; name && i < f->napps; i++)
        if (strcmp(f->apps[i].app->name, name) == 0)
            return &f->apps[i];
    return NULL;
}

/* ---- metrics (no-ops without a registry) ------------------------------ */

static void m_add(amp_series *s, double v) {
    if (s)
        amp_series_add(s, v);
}

static void m_set(amp_series *s, double v) {
    if (s)
        amp_series_set(s, v);
}

/* Dify's code becomes a label value: only short snake_case words, so an odd
 * upstream cannot blow up the number of series. */
static const char *code_label(const char *code) {
    if (!code)
        return "";
    for (size_t n = 0; code[n]; n++) {
        char c = code[n];
        if (n >= 48 || !((c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '_'))
            return "other";
    }
    return code;
}

static void count_response(amp_forward *f, const app_state *a, long status, const char *code) {
    if (!f->metrics)
        return;
    char st[24];
    snprintf(st, sizeof st, "%ld", status);
    amp_series_inc(amp_metrics_series(f->metrics, "amp2dify_dify_responses_total", "app",
                                      a->app->name, "status", st, "code", code_label(code), NULL));
}

static void count_dead(amp_forward *f, const app_state *a, const amp_spool_job *job) {
    if (a)
        m_add(a->m_dead, 1);
    else if (f->metrics && job->app)
        amp_series_inc(amp_metrics_series(f->metrics, "amp2dify_deliveries_total", "app", job->app,
                                          "outcome", "dead_lettered", NULL));
}

static const char *outcome_name(amp_outcome o) {
    switch (o) {
    case AMP_OUTCOME_DELIVERED:
        return "delivered";
    case AMP_OUTCOME_RETRY:
        return "retry";
    case AMP_OUTCOME_PERMANENT:
        return "permanent";
    case AMP_OUTCOME_PAUSE_APP:
        return "pause_app";
    case AMP_OUTCOME_RESET_CONVERSATION:
        return "reset_conversation";
    }
    return "unknown";
}

/* The dedupe key comes from the event, i.e. from the sender: keep it from
 * smuggling header lines or megabytes into the request. */
static void trace_header(char *out, size_t outlen, const char *key) {
    static const char prefix[] = "X-Trace-Id: ";
    size_t n = sizeof prefix - 1;
    memcpy(out, prefix, n);
    for (size_t i = 0; key[i] && i < TRACE_ID_MAX && n + 1 < outlen; i++) {
        unsigned char c = (unsigned char)key[i];
        out[n++] = (c < 0x20 || c == 0x7f) ? '_' : (char)c;
    }
    out[n] = '\0';
}

static void gettime_after(struct timespec *ts, int64_t ms) {
    clock_gettime(CLOCK_MONOTONIC, ts);
    ts->tv_sec += ms / 1000;
    ts->tv_nsec += (long)(ms % 1000) * 1000000L;
    if (ts->tv_nsec >= 1000000000L) {
        ts->tv_sec++;
        ts->tv_nsec -= 1000000000L;
    }
}

/* ---- acknowledgements ------------------------------------------------- */

static void ack_release(amp_forward *f, const amp_spool_job *job, int64_t due_ms) {
    amp_ack a = {.id = job->id, .kind = AMP_ACK_RELEASE, .due_ms = due_ms};
    amp_spool_ack(f->spool, &a);
}

static void ack_dead(amp_forward *f, const app_state *a, const amp_spool_job *job, long status,
                     const char *code, const char *message) {
    amp_ack ack = {.id = job->id,
                   .kind = AMP_ACK_DEAD,
                   .http_status = (int)status,
                   .code = code,
                   .message = message};
    amp_spool_ack(f->spool, &ack);
    count_dead(f, a, job);
    amp_log(AMP_LOG_INFO, "dify delivery dead-lettered", "{s:I, s:s, s:s, s:i, s:s*, s:s*, s:i}",
            "id", (json_int_t)job->id, "app", job->app, "route", job->route ? job->route : "",
            "status", (int)status, "code", code, "message", message, "attempt", job->attempts + 1);
}

static void on_retry(amp_forward *f, worker *w, const app_state *a, const amp_spool_job *job,
                     const amp_forward_reply *r, const char *code, const char *message,
                     int64_t now) {
    int64_t max_age_s = f->opts.retry_max_age_s;
    if (max_age_s > 0 && max_age_s < INT64_MAX / 1000 && now - job->created_ms > max_age_s * 1000) {
        char *msg = amp_xasprintf("gave up after %" PRId64 " s; last: %ld %s%s%s",
                                  (now - job->created_ms) / 1000, r->status, code ? code : "",
                                  message ? " " : "", message ? message : "");
        ack_dead(f, a, job, r->status, "expired", msg);
        free(msg);
        return;
    }
    int64_t delay = amp_forward_backoff_ms(f->opts.retry_initial_ms, f->opts.retry_max_ms,
                                           job->attempts, next_rnd(&w->rng));
    int64_t ra = amp_forward_retry_after_ms(r->retry_after[0] ? r->retry_after : NULL, now);
    if (ra > delay)
        delay = ra;
    amp_ack ack = {.id = job->id,
                   .kind = AMP_ACK_RETRY,
                   .due_ms = now + delay,
                   .http_status = (int)r->status,
                   .code = code,
                   .message = message};
    amp_spool_ack(f->spool, &ack);
    m_add(a->m_retried, 1);
    amp_log(AMP_LOG_WARN, "dify delivery retry", "{s:I, s:s, s:i, s:s*, s:s*, s:i, s:I}", "id",
            (json_int_t)job->id, "app", job->app, "status", (int)r->status, "code", code, "message",
            message, "attempt", job->attempts + 1, "retry_in_ms", (json_int_t)delay);
}

static void on_delivered(amp_forward *f, app_state *a, const amp_spool_job *job,
                         const amp_forward_reply *r) {
    json_t *res = amp_forward_result(a->app->endpoint, r->status, r->body, r->latency_ms);
    if (res && r->too_large)
        json_object_set_new(res, "response_truncated", json_true());
    char *text = res ? json_dumps(res, JSON_COMPACT | JSON_PRESERVE_ORDER) : NULL;
    json_decref(res);
    amp_ack ack = {.id = job->id,
                   .kind = AMP_ACK_DELIVERED,
                   .http_status = (int)r->status,
                   .result_json = text,
                   .conversation_id =
                       job->per_user ? amp_forward_answer_conversation(r->body) : NULL};
    amp_spool_ack(f->spool, &ack);
    free(text);
    m_add(a->m_delivered, 1);

    pthread_mutex_lock(&f->mu);
    bool resumed = a->pause_strikes > 0;
    a->pause_strikes = 0;
    a->paused_until_ms = 0;
    pthread_mutex_unlock(&f->mu);
    if (resumed) {
        m_set(a->m_paused, 0);
        amp_log(AMP_LOG_INFO, "dify app resumed", "{s:s}", "app", a->app->name);
    }
}

static void on_pause(amp_forward *f, worker *w, app_state *a, const amp_spool_job *job, long status,
                     int64_t now) {
    /* A rejected key rejects every event of the app: stop sending them for
     * a while instead of dead-lettering them one by one. The pause doubles
     * per consecutive rejection up to retry.max_ms; "equal jitter" keeps it
     * at least half of that so a bad key is not hammered. */
    pthread_mutex_lock(&f->mu);
    bool fresh = a->paused_until_ms <= now;
    if (fresh) {
        int64_t cap = amp_forward_backoff_ms(f->opts.retry_initial_ms, f->opts.retry_max_ms,
                                             a->pause_strikes, 1.0);
        int64_t delay = cap / 2 + (int64_t)(next_rnd(&w->rng) * (double)(cap - cap / 2));
        if (delay < 1000)
            delay = 1000;
        a->paused_until_ms = now + delay;
        if (a->pause_strikes < 64)
            a->pause_strikes++;
    }
    int64_t until = a->paused_until_ms;
    pthread_mutex_unlock(&f->mu);

    ack_release(f, job, until);
    if (fresh) {
        m_set(a->m_paused, 1);
        amp_log(AMP_LOG_WARN, "dify app paused: key rejected", "{s:s, s:i, s:I}", "app",
                a->app->name, "status", (int)status, "retry_in_ms", (json_int_t)(until - now));
    }
}

/* ---- one delivery ----------------------------------------------------- */

static void deliver(worker *w, amp_spool_job *job) {
    amp_forward *f = w->f;
    int64_t now = amp_now_ms();
    app_state *a = find_app(f, job->app);
    if (!a) {
        /* The config changed under a stored row: nobody can take it. */
        ack_dead(f, NULL, job, 0, "unknown_app", "the row's app is not in the configuration");
        return;
    }

    pthread_mutex_lock(&f->mu);
    int64_t paused_until = a->paused_until_ms;
    pthread_mutex_unlock(&f->mu);
    if (paused_until > now) {
        ack_release(f, job, paused_until);
        return;
    }

    char *body = amp_forward_request_body(job->body, job->per_user ? job->conversation_id : NULL);
    if (!body) {
        ack_dead(f, a, job, 0, "invalid_body", "stored request body is not a JSON object");
        return;
    }
    char trace[sizeof "X-Trace-Id: " + TRACE_ID_MAX];
    const char *headers[4];
    size_t nh = 0;
    headers[nh++] = "Content-Type: application/json";
    headers[nh++] = a->auth;
    if (job->dedupe_key && *job->dedupe_key) {
        trace_header(trace, sizeof trace, job->dedupe_key);
        headers[nh++] = trace;
    }
    headers[nh] = NULL;

    amp_forward_reply r;
    m_add(a->m_in_flight, 1);
    amp_forward_http_post(w->http, a->url, headers, body, strlen(body), &r);
    m_add(a->m_in_flight, -1);
    free(body);
    now = amp_now_ms();
    if (a->m_seconds)
        amp_series_observe(a->m_seconds, (double)r.latency_ms / 1e3);

    const char *code = NULL, *message = NULL;
    amp_outcome o = amp_forward_classify(r.transport_error, r.status, r.body, &code, &message);
    if (r.transport_error) {
        code = r.transport_code;
        message = r.error;
    } else if (r.too_large && o != AMP_OUTCOME_DELIVERED) {
        code = "response_too_large";
        message = "Dify's answer exceeded the size cap";
    }
    count_response(f, a, r.status, r.transport_error ? r.transport_code : code);
    amp_log(AMP_LOG_DEBUG, "dify delivery", "{s:I, s:s, s:s, s:i, s:s, s:I, s:i, s:b}", "id",
            (json_int_t)job->id, "app", job->app, "route", job->route ? job->route : "", "status",
            (int)r.status, "outcome", outcome_name(o), "latency_ms", (json_int_t)r.latency_ms,
            "attempt", job->attempts + 1, "streamed", r.streamed);

    switch (o) {
    case AMP_OUTCOME_DELIVERED:
        on_delivered(f, a, job, &r);
        break;
    case AMP_OUTCOME_RETRY:
        on_retry(f, w, a, job, &r, code, message, now);
        break;
    case AMP_OUTCOME_PAUSE_APP:
        on_pause(f, w, a, job, r.status, now);
        break;
    case AMP_OUTCOME_RESET_CONVERSATION:
        if (job->per_user && job->conversation_id && *job->conversation_id) {
            /* Dify forgot the conversation (deleted, expired): start a new
             * one right away, without waiting for a backoff. */
            amp_ack ack = {.id = job->id,
                           .kind = AMP_ACK_RETRY,
                           .due_ms = now,
                           .http_status = (int)r.status,
                           .code = code,
                           .message = message,
                           .conversation_id = ""};
            amp_spool_ack(f->spool, &ack);
            m_add(a->m_retried, 1);
            amp_log(AMP_LOG_INFO, "dify conversation reset", "{s:I, s:s}", "id",
                    (json_int_t)job->id, "app", job->app);
            break;
        }
        /* We sent no conversation, so this 404 is about something else. */
        ack_dead(f, a, job, r.status, code, message);
        break;
    case AMP_OUTCOME_PERMANENT:
        ack_dead(f, a, job, r.status, code, message);
        break;
    }
    amp_forward_reply_clear(&r);
}

/* ---- threads ---------------------------------------------------------- */

static void *worker_main(void *arg) {
    worker *w = arg;
    amp_forward *f = w->f;
    pthread_mutex_lock(&f->mu);
    for (;;) {
        while (f->qlen == 0 && !f->stopping)
            pthread_cond_wait(&f->work_cv, &f->mu);
        if (f->qlen == 0)
            break; /* stopping, nothing left */
        amp_spool_job *job = f->queue[f->qhead];
        f->qhead = (f->qhead + 1) % f->nworkers;
        f->qlen--;
        bool stopping = f->stopping;
        pthread_mutex_unlock(&f->mu);

        if (stopping)
            ack_release(f, job, amp_now_ms()); /* claimed, never sent: give back */
        else
            deliver(w, job);
        amp_spool_job_free(job);

        pthread_mutex_lock(&f->mu);
        f->outstanding--;
        if (f->want_slot) {
            f->want_slot = false;
            f->wake = true;
            pthread_cond_signal(&f->dispatch_cv);
        }
    }
    pthread_mutex_unlock(&f->mu);
    return NULL;
}

static void *dispatcher_main(void *arg) {
    amp_forward *f = arg;
    amp_spool_job **jobs = amp_xcalloc(f->nworkers, sizeof *jobs);
    pthread_mutex_lock(&f->mu);
    while (!f->stopping) {
        f->wake = false;
        unsigned free_slots = f->nworkers - f->outstanding;
        int64_t wait_ms = MAX_WAIT_MS;
        if (free_slots > 0) {
            pthread_mutex_unlock(&f->mu);
            int64_t next_due = INT64_MAX;
            int64_t now = amp_now_ms();
            int n = amp_spool_claim(f->spool, now, jobs, free_slots, &next_due);
            if (n < 0)
                amp_log(AMP_LOG_ERROR, "spool claim failed", NULL);
            pthread_mutex_lock(&f->mu);
            for (int i = 0; i < n; i++) {
                f->queue[(f->qhead + f->qlen) % f->nworkers] = jobs[i];
                f->qlen++;
            }
            if (n > 0) {
                f->outstanding += (unsigned)n;
                pthread_cond_broadcast(&f->work_cv);
            }
            if (n >= 0 && (unsigned)n == free_slots) {
                /* Maybe more is due: claim again when a worker frees up. */
                f->want_slot = true;
            } else if (n >= 0 && next_due != INT64_MAX) {
                int64_t d = next_due - amp_now_ms();
                wait_ms = d < MIN_RECLAIM_MS ? MIN_RECLAIM_MS : d > MAX_WAIT_MS ? MAX_WAIT_MS : d;
            }
        } else {
            f->want_slot = true;
        }
        if (f->wake || f->stopping)
            continue;
        struct timespec deadline;
        gettime_after(&deadline, wait_ms);
        while (!f->wake && !f->stopping) {
            if (pthread_cond_timedwait(&f->dispatch_cv, &f->mu, &deadline) == ETIMEDOUT)
                break;
        }
    }
    pthread_mutex_unlock(&f->mu);
    free(jobs);
    return NULL;
}

static void notify_cb(void *ctx) {
    amp_forward_kick(ctx);
}

void amp_forward_kick(amp_forward *f) {
    if (!f)
        return;
    pthread_mutex_lock(&f->mu);
    f->wake = true;
    pthread_cond_signal(&f->dispatch_cv);
    pthread_mutex_unlock(&f->mu);
}

/* ---- lifecycle -------------------------------------------------------- */

static void destroy(amp_forward *f) {
    for (size_t i = 0; i < f->napps; i++) {
        free(f->apps[i].url);
        if (f->apps[i].auth) {
            /* The key should not linger in freed heap memory. */
            memset(f->apps[i].auth, 0, strlen(f->apps[i].auth));
            free(f->apps[i].auth);
        }
    }
    free(f->apps);
    for (unsigned i = 0; f->workers && i < f->nworkers; i++)
        amp_forward_http_destroy(f->workers[i].http);
    free(f->workers);
    /* Only a start that failed before the workers ran can leave jobs. */
    for (size_t i = 0; i < f->qlen; i++) {
        amp_spool_job *job = f->queue[(f->qhead + i) % f->nworkers];
        ack_release(f, job, amp_now_ms());
        amp_spool_job_free(job);
    }
    free(f->queue);
    pthread_cond_destroy(&f->work_cv);
    pthread_cond_destroy(&f->dispatch_cv);
    pthread_mutex_destroy(&f->mu);
    free(f);
}

static int has_ctl(const char *s) {
    for (; *s; s++)
        if ((unsigned char)*s < 0x20 || *s == 0x7f)
            return 1;
    return 0;
}

amp_forward *amp_forward_start(const amp_forward_opts *opts, amp_spool *spool, char *err,
                               size_t errlen) {
    if (!opts || !spool || !opts->base_url || opts->workers == 0 || opts->timeout_s <= 0 ||
        opts->connect_timeout_s <= 0 || (opts->napps && (!opts->apps || !opts->api_keys))) {
        snprintf(err, errlen, "forward: invalid options");
        return NULL;
    }
    amp_forward *f = amp_xcalloc(1, sizeof *f);
    f->opts = *opts;
    /* Everything pointed to is copied below (URLs, auth headers, the app
     * pointers); do not keep pointers the caller may free after this call. */
    f->opts.base_url = NULL;
    f->opts.apps = NULL;
    f->opts.api_keys = NULL;
    f->spool = spool;
    f->metrics = opts->metrics;
    f->nworkers = opts->workers;
    pthread_mutex_init(&f->mu, NULL);
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    /* Timed waits on the monotonic clock: wall-clock steps must not turn a
     * 1 s sleep into an hour. */
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&f->dispatch_cv, &ca);
    pthread_condattr_destroy(&ca);
    pthread_cond_init(&f->work_cv, NULL);
    f->queue = amp_xcalloc(f->nworkers, sizeof *f->queue);

    f->apps = amp_xcalloc(opts->napps, sizeof *f->apps);
    f->napps = opts->napps;
    for (size_t i = 0; i < opts->napps; i++) {
        const amp_app *app = opts->apps[i];
        const char *key = opts->api_keys[i];
        f->apps[i].app = app;
        f->apps[i].url = amp_forward_join_url(opts->base_url, amp_endpoint_path(app->endpoint));
        if (!key || !*key || has_ctl(key)) {
            /* Never print the key, not even a broken one. */
            snprintf(err, errlen, "apps.%s: API key %s", app->name,
                     !key || !*key ? "is missing" : "contains control characters");
            goto fail;
        }
        f->apps[i].auth = amp_xasprintf("Authorization: Bearer %s", key);
        if (f->metrics) {
            /* Fixed label sets: look them up once. */
            app_state *a = &f->apps[i];
            amp_metrics *m = f->metrics;
            const char *fam = "amp2dify_deliveries_total";
            a->m_delivered =
                amp_metrics_series(m, fam, "app", app->name, "outcome", "delivered", NULL);
            a->m_retried = amp_metrics_series(m, fam, "app", app->name, "outcome", "retried", NULL);
            a->m_dead =
                amp_metrics_series(m, fam, "app", app->name, "outcome", "dead_lettered", NULL);
            a->m_in_flight = amp_metrics_series(m, "amp2dify_in_flight", "app", app->name, NULL);
            a->m_paused = amp_metrics_series(m, "amp2dify_app_paused", "app", app->name, NULL);
            a->m_seconds =
                amp_metrics_series(m, "amp2dify_delivery_duration_seconds", "app", app->name, NULL);
            m_set(a->m_paused, 0);
        }
    }

    f->workers = amp_xcalloc(f->nworkers, sizeof *f->workers);
    uint64_t seed = (uint64_t)amp_mono_ms() ^ ((uint64_t)amp_now_ms() << 20);
    for (unsigned i = 0; i < f->nworkers; i++) {
        worker *w = &f->workers[i];
        w->f = f;
        w->rng = seed + i * 0x9E3779B97F4A7C15ULL;
        w->http = amp_forward_http_create(opts->connect_timeout_s, opts->timeout_s, err, errlen);
        if (!w->http)
            goto fail;
    }
    for (unsigned i = 0; i < f->nworkers; i++) {
        if (pthread_create(&f->workers[i].thread, NULL, worker_main, &f->workers[i]) != 0) {
            snprintf(err, errlen, "forward: cannot start worker thread");
            goto fail;
        }
        f->workers[i].started = true;
    }
    if (pthread_create(&f->dispatcher, NULL, dispatcher_main, f) != 0) {
        snprintf(err, errlen, "forward: cannot start dispatcher thread");
        goto fail;
    }
    f->dispatcher_started = true;
    amp_spool_set_notify(spool, notify_cb, f);
    amp_log(AMP_LOG_INFO, "forwarder started", "{s:i, s:i}", "workers", (int)f->nworkers, "apps",
            (int)f->napps);
    return f;
fail:
    amp_forward_stop(f);
    return NULL;
}

void amp_forward_stop(amp_forward *f) {
    if (!f)
        return;
    if (f->dispatcher_started)
        amp_spool_set_notify(f->spool, NULL, NULL);
    pthread_mutex_lock(&f->mu);
    f->stopping = true;
    pthread_cond_broadcast(&f->dispatch_cv);
    pthread_cond_broadcast(&f->work_cv);
    pthread_mutex_unlock(&f->mu);
    if (f->dispatcher_started)
        pthread_join(f->dispatcher, NULL);
    /* Workers finish the request in hand (bounded by the request timeout)
     * and release whatever was queued but not yet sent. */
    for (unsigned i = 0; f->workers && i < f->nworkers; i++)
        if (f->workers[i].started)
            pthread_join(f->workers[i].thread, NULL);
    /* Acknowledgements are committed asynchronously: make them durable
     * before the caller closes the spool. This also waits out a notify
     * callback the committer may still be running with f. */
    amp_spool_flush(f->spool);
    destroy(f);
}
