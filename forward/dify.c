/*
 * The Dify sink: a stored job becomes POST {base}/<endpoint> with
 * "Authorization: Bearer <app key>" and the event's dedupe key as
 * X-Trace-Id (the conversation id added for per-user routes), and Dify's
 * answer (blocking JSON or a folded SSE stream, see http.c) becomes an
 * exchange: status, {"code","message"}, a workflow's data.status,
 * conversation id, Retry-After. What that means is decide.c's business.
 *
 * Workflow and chatflow runs go on inside Dify when our connection drops.
 * So once a stream has shown its workflow_run_id, a dropped connection or a
 * timeout is followed by GET {base}/workflow/{run}/events?user=... (the
 * rest of the run's stream), and when that endpoint does not know the run,
 * GET {base}/workflows/run/{run} (its outcome), instead of posting the
 * event again; the run id also travels with a retry (the job's run_id), so
 * the next attempt resumes too. The event is posted again only when no run
 * id was seen, or Dify says the run does not exist.
 */
#include "sink.h"
#include "../base/alloc.h"
#include "../base/clock.h"
#include "../json/jsonw.h"

#include <string.h>

/* Resumes of one run within one attempt; the retry's resumes come after. */
#define RESUME_TRIES 2

typedef struct dify_app {
    const amp_app *app;
    char *base; /* base_url without trailing slashes */
    char *url;
    char *auth; /* "Authorization: Bearer <key>" — never logged */
} dify_app;

typedef struct dify_conn {
    amp_forward_http *http;
    amp_forward_reply reply;
    char run_id[80]; /* the run the last exchange started or resumed, "" when none */
} dify_conn;

static void app_destroy(void *p) {
    dify_app *a = p;
    if (!a)
        return;
    free(a->url);
    free(a->base);
    if (a->auth) {
        /* The key should not linger in freed heap memory. */
        memset(a->auth, 0, strlen(a->auth));
        free(a->auth);
    }
    free(a);
}

static int has_ctl(const char *s) {
    for (; *s; s++)
        if ((unsigned char)*s < 0x20 || *s == 0x7f)
            return 1;
    return 0;
}

static void *app_create(const char *base_url, const amp_app *app, const char *key, char *err,
                        size_t errlen) {
    if (!key || !*key || has_ctl(key)) {
        /* Never print the key, not even a broken one. */
        snprintf(err, errlen, "apps.%s: API key %s", app->name,
                 !key || !*key ? "is missing" : "contains control characters");
        return NULL;
    }
    dify_app *a = amp_xcalloc(1, sizeof *a);
    a->app = app;
    a->base = amp_forward_join_url(base_url, "");
    a->base[strlen(a->base) - 1] = '\0'; /* join_url's "/" */
    char *path = amp_map_app_path(app);  /* a pinned version has its own */
    a->url = amp_forward_join_url(base_url, path);
    free(path);
    a->auth = amp_xasprintf("Authorization: Bearer %s", key);
    return a;
}

static void *conn_create(long connect_timeout_s, long timeout_s, const atomic_bool *abort_flag,
                         char *err, size_t errlen) {
    amp_forward_http *h =
        amp_forward_http_create(connect_timeout_s, timeout_s, abort_flag, err, errlen);
    if (!h)
        return NULL;
    dify_conn *c = amp_xcalloc(1, sizeof *c);
    c->http = h;
    return c;
}

static void release(void *p) {
    dify_conn *c = p;
    amp_forward_reply_clear(&c->reply);
    c->run_id[0] = '\0';
}

static void conn_destroy(void *p) {
    dify_conn *c = p;
    if (!c)
        return;
    release(c);
    amp_forward_http_destroy(c->http);
    free(c);
}

/* Keep the run id the answer showed (a stream shows it in its first event). */
static void note_run(dify_conn *c) {
    const json_t *v =
        json_is_object(c->reply.body) ? json_object_get(c->reply.body, "workflow_run_id") : NULL;
    const char *id = json_is_string(v) ? json_string_value(v) : NULL;
    if (id && *id && strlen(id) < sizeof c->run_id)
        snprintf(c->run_id, sizeof c->run_id, "%s", id);
}

/* The answer ended before its outcome: no answer at all, or a 2xx stream
 * without its closing event. Anything else is an outcome to decide on. */
static bool cut_short(const amp_forward_reply *r) {
    return r->transport_error && r->transport_error != CURLE_ABORTED_BY_CALLBACK;
}

/* A run's detail (GET /workflows/run/{id}) in the shape of a blocking
 * workflow answer, so that decide and the stored result read it alike. */
static void detail_as_answer(amp_forward_reply *r) {
    json_t *d = r->body;
    if (!json_is_object(d) || !json_is_string(json_object_get(d, "status")))
        return;
    json_t *body = json_pack("{s:O?, s:O}", "workflow_run_id", json_object_get(d, "id"), "data", d);
    if (!body)
        return;
    json_decref(d);
    r->body = body;
}

/* Follow run_id: its remaining events, or its outcome. Returns false when
 * Dify does not know the run (the event must be posted again). */
static bool resume(dify_conn *c, const dify_app *a, const amp_queue_job *job, const char *run_id,
                   const char *const *headers) {
    amp_forward_reply *r = &c->reply;
    char run[sizeof c->run_id];
    snprintf(run, sizeof run, "%s", run_id);
    char *erun = amp_forward_http_escape(c->http, run);
    char *euser = amp_forward_http_escape(c->http, job->user ? job->user : "");
    if (!erun || !euser) {
        free(erun);
        free(euser);
        return true; /* out of memory: keep the run, retry later */
    }
    char *events = amp_xasprintf("%s/workflow/%s/events?user=%s", a->base, erun, euser);
    char *detail = amp_xasprintf("%s/workflows/run/%s", a->base, erun);
    bool known = true;
    for (int i = 0; i < RESUME_TRIES; i++) {
        amp_forward_reply_clear(r);
        amp_forward_http_get(c->http, events, headers, r);
        if (r->transport_error == CURLE_ABORTED_BY_CALLBACK)
            break;
        if (!r->transport_error && r->status >= 200 && r->status < 300)
            break; /* the rest of the stream, to its closing event */
        if (cut_short(r) && r->status >= 200 && r->status < 300)
            continue; /* dropped again: resume again */
        /* The events endpoint has no stream for it (an older Dify, a run
         * finished long ago): ask for the run's outcome. */
        amp_forward_reply_clear(r);
        amp_forward_http_get(c->http, detail, headers, r);
        if (!r->transport_error && r->status == 404) {
            known = false;
        } else if (!r->transport_error && r->status >= 200 && r->status < 300) {
            detail_as_answer(r);
            const json_t *st = json_object_get(json_object_get(r->body, "data"), "status");
            const char *status = json_string_value(st);
            if (status && strcmp(status, "running") == 0) {
                /* Still going: come back later, to the same run. */
                amp_forward_reply_clear(r);
                r->transport_error = -1;
                r->transport_code = "run_in_progress";
                snprintf(r->error, sizeof r->error, "workflow run %s is still running", run);
            }
        }
        break;
    }
    free(events);
    free(detail);
    free(erun);
    free(euser);
    if (known)
        snprintf(c->run_id, sizeof c->run_id, "%s", run);
    return known;
}

static void send_job(void *p, const void *target, const amp_queue_job *job,
                     amp_forward_exchange *ex) {
    dify_conn *c = p;
    const dify_app *a = target;
    amp_forward_reply *r = &c->reply;
    c->run_id[0] = '\0';

    const char *conversation = job->per_user ? job->conversation_id : NULL;
    ex->had_conversation = conversation && *conversation;
    /* A chatflow runs a pinned version through the body's workflow_id. */
    const char *version = a->app->endpoint == AMP_ENDPOINT_CHAT ? a->app->workflow_id : NULL;
    char *body = amp_forward_request_body(job->body, conversation, version);
    if (!body) {
        ex->refused_code = "invalid_body";
        ex->refused_message = "stored request body is not a JSON object";
        ex->now_ms = amp_now_ms();
        return;
    }
    char trace[sizeof "X-Trace-Id: " + AMP_FORWARD_TRACE_ID_MAX];
    const char *headers[4];
    size_t nh = 0;
    headers[nh++] = "Content-Type: application/json";
    headers[nh++] = a->auth;
    if (job->dedupe_key && *job->dedupe_key) {
        /* The key comes from the sender; Dify takes only this form. */
        char id[AMP_FORWARD_TRACE_ID_MAX + 1];
        amp_forward_trace_id(job->dedupe_key, id);
        snprintf(trace, sizeof trace, "X-Trace-Id: %s", id);
        headers[nh++] = trace;
    }
    headers[nh] = NULL;
    const char *get_headers[] = {a->auth, nh > 2 ? trace : NULL, NULL};

    int64_t t0 = amp_mono_us();
    bool posted = false;
    if (!(job->run_id && *job->run_id && resume(c, a, job, job->run_id, get_headers))) {
        amp_forward_http_post(c->http, a->url, headers, body, strlen(body), r);
        posted = true;
    }
    free(body);
    if (posted) {
        note_run(c);
        if (cut_short(r) && c->run_id[0]) {
            /* Dify keeps running what it started: follow the run. */
            char run[sizeof c->run_id];
            snprintf(run, sizeof run, "%s", c->run_id);
            if (!resume(c, a, job, run, get_headers)) {
                /* Dify forgot the run it just named: posting again is all
                 * that is left. */
                c->run_id[0] = '\0';
                amp_forward_reply_clear(r);
                r->transport_error = -1;
                r->transport_code = "run_not_found";
                snprintf(r->error, sizeof r->error, "workflow run %s not found after a drop", run);
            }
        }
    } else {
        note_run(c);
    }
    ex->now_ms = amp_now_ms();
    ex->latency_us = amp_mono_us() - t0;
    ex->streamed = r->streamed;
    ex->aborted = r->transport_error == CURLE_ABORTED_BY_CALLBACK;
    ex->transport_error = r->transport_error;
    ex->transport_code = r->transport_code;
    ex->transport_message = r->error;
    ex->status = r->status;
    ex->too_large = r->too_large;
    amp_forward_exchange_answer(ex, r->body);
    if (c->run_id[0])
        ex->run_id = c->run_id;
    ex->retry_after_ms =
        r->retry_after[0] ? amp_forward_retry_after_ms(r->retry_after, ex->now_ms) : -1;
}

static char *result(void *p, const void *target) {
    const dify_conn *c = p;
    const dify_app *a = target;
    const amp_forward_reply *r = &c->reply;
    json_t *res = amp_forward_result(a->app->endpoint, r->status, r->body, r->latency_ms);
    if (res && r->too_large)
        json_object_set_new(res, "response_truncated", json_true());
    char *text = res ? amp_json_dumps(res) : NULL;
    json_decref(res);
    return text;
}

static const amp_forward_sink dify_sink = {
    .name = "dify",
    .app_create = app_create,
    .app_destroy = app_destroy,
    .conn_create = conn_create,
    .conn_destroy = conn_destroy,
    .send = send_job,
    .result = result,
    .release = release,
};

const amp_forward_sink *amp_forward_dify_sink(void) {
    return &dify_sink;
}
