/*
 * The Dify sink: a stored job becomes POST {base}/<endpoint> with
 * "Authorization: Bearer <app key>" and the event's dedupe key as
 * X-Trace-Id (the conversation id added for per-user routes), and Dify's
 * answer (blocking JSON or a folded SSE stream, see http.c) becomes an
 * exchange: status, {"code","message"}, a workflow's data.status,
 * conversation id, Retry-After. What that means is decide.c's business.
 */
#include "sink.h"
#include "../base/alloc.h"
#include "../base/clock.h"

#include <string.h>


typedef struct dify_app {
    const amp_app *app;
    char *url;
    char *auth; /* "Authorization: Bearer <key>" — never logged */
} dify_app;

typedef struct dify_conn {
    amp_forward_http *http;
    amp_forward_reply reply;
} dify_conn;

static void app_destroy(void *p) {
    dify_app *a = p;
    if (!a)
        return;
    free(a->url);
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
    a->url = amp_forward_join_url(base_url, amp_map_endpoint_path(app->endpoint));
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
}

static void conn_destroy(void *p) {
    dify_conn *c = p;
    if (!c)
        return;
    release(c);
    amp_forward_http_destroy(c->http);
    free(c);
}

static void send_job(void *p, const void *target, const amp_queue_job *job,
                     amp_forward_exchange *ex) {
    dify_conn *c = p;
    const dify_app *a = target;
    amp_forward_reply *r = &c->reply;

    const char *conversation = job->per_user ? job->conversation_id : NULL;
    ex->had_conversation = conversation && *conversation;
    char *body = amp_forward_request_body(job->body, conversation);
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

    amp_forward_http_post(c->http, a->url, headers, body, strlen(body), r);
    free(body);
    ex->now_ms = amp_now_ms();
    ex->latency_ms = r->latency_ms;
    ex->streamed = r->streamed;
    ex->aborted = r->transport_error == CURLE_ABORTED_BY_CALLBACK;
    ex->transport_error = r->transport_error;
    ex->transport_code = r->transport_code;
    ex->transport_message = r->error;
    ex->status = r->status;
    ex->too_large = r->too_large;
    amp_forward_exchange_answer(ex, r->body);
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
    char *text = res ? json_dumps(res, JSON_COMPACT | JSON_PRESERVE_ORDER) : NULL;
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
