/*
 * Route reports: after a job of a route with a "report" reaches its final
 * state, one Amplitude event describing it is stored in the queue (durable
 * and deduplicated like any job), and the reporter sends those jobs back to
 * Amplitude in batches over the HTTP V2 API (amplitude.c).
 *
 * The report event: event_type from the route's (else its app's) report
 * (default "dify_response"), user_id and device_id the source event's (kept
 * with the job; a job stored without it: the job's user as user_id),
 * insert_id "amp2dify-" + the source event's key (as X-Trace-Id spells it)
 * so that every resend is the same event to Amplitude, time the final
 * state's, and event_properties: status ("delivered" or "dead"), dify_app,
 * route, endpoint, attempts, http_status, latency_ms, tokens,
 * conversation_id, message_id or workflow_run_id, answer (at most
 * answer_chars characters), error_code and error_message (dead); or, with
 * "properties", each template rendered over those fields plus "event" (the
 * source event).
 *
 * The reporter: one thread with one connection. The dispatcher (forward.c)
 * hands it the report jobs it claims; it waits up to linger_ms for a batch
 * of batch_events to fill, sends, and acknowledges each job from its
 * event's fate: ingested -> delivered; refused by Amplitude -> dead letter
 * with Amplitude's reason; throttled -> released to reports.throttle_ms
 * (30 s) later (not an attempt); 5xx or no answer -> retry with the engine's backoff.
 */
#include "forward_int.h"
#include "../base/alloc.h"
#include "../base/clock.h"
#include "../base/log.h"

#include <errno.h>
#include <pthread.h>
#include <string.h>
#include <time.h>

/* ---- the event ----------------------------------------------------------- */

static void set_str(json_t *o, const char *k, const char *v) {
    if (v && *v)
        json_object_set_new(o, k, json_string(v));
}

/* A non-empty string member of o, or NULL. */
static const char *str_member(const json_t *o, const char *k) {
    const char *v = json_string_value(json_object_get(o, k));
    return v && *v ? v : NULL;
}

char *amp_forward_report_event(const amp_map_report *spec, const amp_queue_job *job,
                               amp_endpoint endpoint, bool delivered, long status, const char *code,
                               const char *message, const char *result_json, int64_t now_ms) {
    json_t *props = json_object();
    json_object_set_new(props, "status", json_string(delivered ? "delivered" : "dead"));
    set_str(props, "dify_app", job->app);
    set_str(props, "route", job->route);
    json_object_set_new(props, "endpoint", json_string(amp_map_endpoint_path(endpoint)));
    json_object_set_new(props, "attempts", json_integer(job->attempts + 1));
    if (status > 0)
        json_object_set_new(props, "http_status", json_integer(status));
    json_t *res = result_json ? json_loads(result_json, 0, NULL) : NULL;
    if (json_is_object(res)) {
        static const char *const copy[] = {"latency_ms", "conversation_id", "message_id",
                                           "workflow_run_id", "workflow_status"};
        for (size_t i = 0; i < sizeof copy / sizeof copy[0]; i++) {
            json_t *v = json_object_get(res, copy[i]);
            if (v && !json_is_null(v))
                json_object_set(props, copy[i], v);
        }
        json_t *tokens = json_object_get(json_object_get(res, "usage"), "total_tokens");
        if (json_is_integer(tokens))
            json_object_set(props, "tokens", tokens);
        const char *answer = json_string_value(json_object_get(res, "answer"));
        if (answer && spec->answer_chars > 0) {
            /* answer_chars characters, never a cut UTF-8 sequence. */
            size_t len = strlen(answer), bytes = 0;
            for (unsigned c = 0; bytes < len && c < spec->answer_chars; c++) {
                bytes++;
                while (bytes < len && ((unsigned char)answer[bytes] & 0xC0) == 0x80)
                    bytes++;
            }
            json_object_set_new(props, "answer", json_stringn(answer, bytes));
        }
    }
    json_decref(res);
    if (!delivered) {
        set_str(props, "error_code", code);
        set_str(props, "error_message", message);
    }
    /* The source event (stored with the job when its route reports): its
     * user_id and device_id, and its fields for the properties templates. */
    json_t *src = job->source ? json_loads(job->source, 0, NULL) : NULL;
    if (!json_is_object(src)) {
        json_decref(src);
        src = NULL;
    }
    if (spec->props) {
        json_t *fields = json_deep_copy(props);
        if (src)
            json_object_set(fields, "event", src);
        json_t *custom = amp_map_report_properties(spec, fields);
        json_decref(fields);
        json_decref(props);
        props = custom;
    }
    char id[AMP_FORWARD_TRACE_ID_MAX + 1];
    char *insert_id;
    if (job->dedupe_key && *job->dedupe_key) {
        amp_forward_trace_id(job->dedupe_key, id);
        insert_id = amp_xasprintf("amp2dify-%s-%s", job->route ? job->route : "", id);
    } else {
        insert_id = amp_xasprintf("amp2dify-job-%d-%lld", job->shard, (long long)job->id);
    }
    json_t *ev = json_object();
    json_object_set_new(ev, "event_type", json_string(spec->event_type));
    const char *user_id = src ? str_member(src, "user_id") : NULL;
    const char *device_id = src ? str_member(src, "device_id") : NULL;
    if (!user_id && !device_id)
        user_id = job->user; /* a job stored without its source event */
    if (user_id)
        json_object_set_new(ev, "user_id", json_string(user_id));
    if (device_id)
        json_object_set_new(ev, "device_id", json_string(device_id));
    json_object_set_new(ev, "insert_id", json_string(insert_id));
    json_object_set_new(ev, "time", json_integer((json_int_t)now_ms));
    json_object_set_new(ev, "event_properties", props);
    free(insert_id);
    json_decref(src);
    char *text = json_dumps(ev, JSON_COMPACT | JSON_PRESERVE_ORDER);
    json_decref(ev);
    return text;
}

/* One store waited for: the engine's done callback and the waiter each hold
 * a reference, so a waiter that gives up leaves it to the callback. */
typedef struct store_wait {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int refs;
    bool done;
    int status;
    char *key;
} store_wait;

static void store_wait_unref(store_wait *w) {
    pthread_mutex_lock(&w->mu);
    int left = --w->refs;
    pthread_mutex_unlock(&w->mu);
    if (left)
        return;
    pthread_cond_destroy(&w->cv);
    pthread_mutex_destroy(&w->mu);
    free(w->key);
    free(w);
}

static void stored(void *ctx, const amp_queue_result *res) {
    store_wait *w = ctx;
    if (res->status != 0)
        amp_log(AMP_LOG_ERROR, "report not stored", "{s:s, s:s*}", "dedupe_key",
                w->key ? w->key : "", "error", res->error);
    pthread_mutex_lock(&w->mu);
    w->done = true;
    w->status = res->status;
    pthread_cond_broadcast(&w->cv);
    pthread_mutex_unlock(&w->mu);
    store_wait_unref(w);
}

int amp_forward_report_store(amp_queue *q, const amp_queue_job *job, const char *event_json,
                             int64_t wait_ms) {
    store_wait *w = amp_xcalloc(1, sizeof *w);
    pthread_mutex_init(&w->mu, NULL);
    amp_cond_init_mono(&w->cv);
    w->refs = 2;
    w->key = job->dedupe_key && *job->dedupe_key
                 ? amp_xasprintf("report:%s:%s", job->route ? job->route : "", job->dedupe_key)
                 : NULL;
    amp_queue_batch *b = amp_queue_batch_create();
    amp_queue_batch_event(b, w->key);
    amp_queue_batch_request(b, job->route, AMP_FORWARD_REPORT_APP, job->user, false, event_json);
    amp_queue_submit(q, b, stored, w);
    struct timespec ts = amp_mono_deadline_in(wait_ms);
    pthread_mutex_lock(&w->mu);
    while (!w->done && pthread_cond_timedwait(&w->cv, &w->mu, &ts) != ETIMEDOUT) {
    }
    int rc = w->done && w->status == 0 ? 0 : -1;
    pthread_mutex_unlock(&w->mu);
    store_wait_unref(w);
    return rc;
}

/* ---- the reporter -------------------------------------------------------- */

struct amp_forward_reporter {
    amp_queue *q;
    char *url;
    char *key;
    unsigned batch, linger_ms;
    unsigned nice;
    int64_t throttle_ms;
    int64_t retry_initial_ms, retry_max_ms;
    amp_forward_http *http;
    amp_series *m_ingested, *m_refused, *m_held, *m_retried;
    uint64_t rng;
    pthread_t thread;
    bool started;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    amp_queue_job **jobs; /* waiting to be sent, oldest first */
    size_t n, cap;
    int64_t first_ms; /* monotonic: when the oldest waiting job came */
    bool stopping;
};

static void count(amp_series *s, double v) {
    if (s && v > 0)
        amp_series_add(s, v);
}

static double rnd01(uint64_t *s) {
    uint64_t z = (*s += 0x9E3779B97F4A7C15ULL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    z ^= z >> 31;
    return (double)(z >> 11) / 9007199254740992.0;
}

static void ack(amp_forward_reporter *r, const amp_queue_job *job, amp_queue_ack *a) {
    a->id = job->id;
    a->shard = job->shard;
    if (amp_queue_acknowledge(r->q, a) != AMP_QUEUE_ACK_TAKEN)
        amp_log(AMP_LOG_WARN, "report acknowledgement not stored", "{s:I}", "id",
                (json_int_t)job->id);
}

static void send_batch(amp_forward_reporter *r, amp_queue_job **jobs, size_t n) {
    amp_forward_amplitude_event *ev = amp_xcalloc(n, sizeof *ev);
    /* The ids the 429 rules hold by: the event's own user_id and device_id. */
    json_t **parsed = amp_xcalloc(n, sizeof *parsed);
    for (size_t i = 0; i < n; i++) {
        ev[i].json = jobs[i]->body;
        parsed[i] = json_loads(jobs[i]->body, 0, NULL);
        ev[i].user_id = str_member(parsed[i], "user_id");
        ev[i].device_id = str_member(parsed[i], "device_id");
    }
    amp_forward_amplitude_stats st;
    amp_forward_amplitude_send(r->http, r->url, r->key, ev, n, r->batch, &st);
    int64_t now = amp_now_ms();
    unsigned tally[6] = {0};
    for (size_t i = 0; i < n; i++) {
        amp_queue_ack a = {.http_status = (int)st.last_status};
        tally[ev[i].fate]++;
        switch (ev[i].fate) {
        case AMP_FORWARD_AMPLITUDE_INGESTED:
            a.kind = AMP_QUEUE_ACK_DELIVERED;
            a.http_status = 200;
            break;
        case AMP_FORWARD_AMPLITUDE_REFUSED:
            a.kind = AMP_QUEUE_ACK_DEAD;
            a.code = "amplitude_refused";
            a.message = ev[i].reason;
            amp_log(AMP_LOG_INFO, "report refused by Amplitude", "{s:I, s:s}", "id",
                    (json_int_t)jobs[i]->id, "reason", ev[i].reason);
            break;
        case AMP_FORWARD_AMPLITUDE_HOLD:
            a.kind = AMP_QUEUE_ACK_RELEASE;
            a.due_ms = now + r->throttle_ms;
            break;
        default:
            a.kind = AMP_QUEUE_ACK_RETRY;
            a.due_ms = now + amp_forward_backoff_ms(r->retry_initial_ms, r->retry_max_ms,
                                                    jobs[i]->attempts, rnd01(&r->rng));
            a.code = "amplitude_unavailable";
            a.message = st.last_error;
            break;
        }
        ack(r, jobs[i], &a);
    }
    count(r->m_ingested, tally[AMP_FORWARD_AMPLITUDE_INGESTED]);
    count(r->m_refused, tally[AMP_FORWARD_AMPLITUDE_REFUSED]);
    count(r->m_held, tally[AMP_FORWARD_AMPLITUDE_HOLD]);
    count(r->m_retried, tally[AMP_FORWARD_AMPLITUDE_RETRY]);
    if (tally[AMP_FORWARD_AMPLITUDE_RETRY] || tally[AMP_FORWARD_AMPLITUDE_HOLD])
        amp_log(AMP_LOG_WARN, "reports not taken by Amplitude yet", "{s:i, s:i, s:i, s:s}", "retry",
                (int)tally[AMP_FORWARD_AMPLITUDE_RETRY], "throttled",
                (int)tally[AMP_FORWARD_AMPLITUDE_HOLD], "status", (int)st.last_status, "error",
                st.last_error);
    for (size_t i = 0; i < n; i++)
        json_decref(parsed[i]);
    free(parsed);
    free(ev);
}

static void *reporter_main(void *arg) {
    amp_forward_reporter *r = arg;
    pthread_setname_np(pthread_self(), "amp-report");
    amp_forward_lower_priority(r->nice);
    amp_queue_job **batch = amp_xcalloc(r->batch, sizeof *batch);
    pthread_mutex_lock(&r->mu);
    while (!r->stopping) {
        if (r->n == 0) {
            pthread_cond_wait(&r->cv, &r->mu);
            continue;
        }
        /* Linger for a fuller batch. */
        int64_t until = r->first_ms + r->linger_ms;
        if (r->n < r->batch && amp_mono_ms() < until) {
            struct timespec ts = amp_mono_deadline_at_us(until * 1000);
            while (!r->stopping && r->n < r->batch &&
                   pthread_cond_timedwait(&r->cv, &r->mu, &ts) != ETIMEDOUT) {
            }
            if (r->stopping)
                break;
        }
        size_t k = r->n < r->batch ? r->n : r->batch;
        memcpy(batch, r->jobs, k * sizeof *batch);
        memmove(r->jobs, r->jobs + k, (r->n - k) * sizeof *r->jobs);
        r->n -= k;
        r->first_ms = amp_mono_ms();
        pthread_mutex_unlock(&r->mu);
        send_batch(r, batch, k);
        for (size_t i = 0; i < k; i++)
            amp_queue_job_free(batch[i]);
        pthread_mutex_lock(&r->mu);
    }
    pthread_mutex_unlock(&r->mu);
    free(batch);
    return NULL;
}

amp_forward_reporter *amp_forward_reporter_start(const amp_forward_reporter_opts *o, amp_queue *q,
                                                 char *err, size_t errlen) {
    if (!o->api_key || !*o->api_key) {
        snprintf(err, errlen, "reports: AMPLITUDE_API_KEY is missing");
        return NULL;
    }
    amp_forward_http *h =
        amp_forward_http_create(o->connect_timeout_s, o->timeout_s, o->abort_flag, err, errlen);
    if (!h)
        return NULL;
    amp_forward_reporter *r = amp_xcalloc(1, sizeof *r);
    r->q = q;
    r->http = h;
    r->url =
        amp_forward_join_url(o->base_url ? o->base_url : AMP_FORWARD_AMPLITUDE_BASE, "2/httpapi");
    r->key = amp_xstrdup(o->api_key);
    r->batch = o->batch_events && o->batch_events <= AMP_FORWARD_AMPLITUDE_MAX_EVENTS
                   ? o->batch_events
                   : (unsigned)AMP_FORWARD_AMPLITUDE_MAX_EVENTS;
    r->linger_ms = o->linger_ms;
    r->nice = o->nice;
    r->throttle_ms = o->throttle_ms ? o->throttle_ms : AMP_FORWARD_AMPLITUDE_THROTTLE_MS;
    r->retry_initial_ms = o->retry_initial_ms > 0 ? o->retry_initial_ms : 1000;
    r->retry_max_ms = o->retry_max_ms > 0 ? o->retry_max_ms : 60000;
    r->rng = (uint64_t)amp_now_ms() * 0x2545F4914F6CDD1DULL;
    r->cap = (size_t)r->batch * 2;
    r->jobs = amp_xcalloc(r->cap, sizeof *r->jobs);
    if (o->metrics) {
        const char *fam = "amp2dify_reports_total";
        r->m_ingested = amp_metrics_series(o->metrics, fam, "outcome", "ingested", NULL);
        r->m_refused = amp_metrics_series(o->metrics, fam, "outcome", "refused", NULL);
        r->m_held = amp_metrics_series(o->metrics, fam, "outcome", "throttled", NULL);
        r->m_retried = amp_metrics_series(o->metrics, fam, "outcome", "retried", NULL);
    }
    pthread_mutex_init(&r->mu, NULL);
    amp_cond_init_mono(&r->cv);
    if (pthread_create(&r->thread, NULL, reporter_main, r) != 0) {
        snprintf(err, errlen, "reports: cannot start the reporter thread");
        amp_forward_reporter_stop(r);
        return NULL;
    }
    r->started = true;
    return r;
}

bool amp_forward_reporter_offer(amp_forward_reporter *r, amp_queue_job *job) {
    pthread_mutex_lock(&r->mu);
    bool ok = !r->stopping && r->n < r->cap;
    if (ok) {
        if (r->n == 0)
            r->first_ms = amp_mono_ms();
        r->jobs[r->n++] = job;
        pthread_cond_signal(&r->cv);
    }
    pthread_mutex_unlock(&r->mu);
    return ok;
}

void amp_forward_reporter_stop(amp_forward_reporter *r) {
    if (!r)
        return;
    pthread_mutex_lock(&r->mu);
    r->stopping = true;
    pthread_cond_broadcast(&r->cv);
    pthread_mutex_unlock(&r->mu);
    if (r->started)
        pthread_join(r->thread, NULL);
    /* Not sent: back to the queue, not an attempt. */
    int64_t now = amp_now_ms();
    for (size_t i = 0; i < r->n; i++) {
        amp_queue_ack a = {.kind = AMP_QUEUE_ACK_RELEASE, .due_ms = now};
        ack(r, r->jobs[i], &a);
        amp_queue_job_free(r->jobs[i]);
    }
    free(r->jobs);
    pthread_cond_destroy(&r->cv);
    pthread_mutex_destroy(&r->mu);
    amp_forward_http_destroy(r->http);
    if (r->key)
        memset(r->key, 0, strlen(r->key));
    free(r->key);
    free(r->url);
    free(r);
}
