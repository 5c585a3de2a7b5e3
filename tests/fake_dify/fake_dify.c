#include "fake_dify.h"

#include <arpa/inet.h>
#include <errno.h>
#include <microhttpd.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "../../base/alloc.h"
#include "../../base/buf.h"
#include "../../base/clock.h"
#include "../../json/jsonr.h"

/* Large enough for any event the relay could produce; a fake needs no tight cap. */
#define FAKE_MAX_BODY (16u * 1024 * 1024)
#define FAKE_CONN_LIMIT 1024

typedef enum { EP_NONE, EP_CHAT, EP_COMPLETION, EP_WORKFLOW } endpoint;

/* What /info and /parameters say about one key's app. */
typedef struct app_meta {
    char *bearer; /* "Bearer <key>" */
    char *mode;
    json_t *form; /* user_input_form */
} app_meta;

/* A workflow or chatflow run, kept after its request so that it can be
 * resumed or read, as Dify keeps running what it started. */
typedef struct run_rec {
    char id[37];
    char *user;
    char *tail;        /* SSE frames after the point where the stream dropped ("" none) */
    char *final_frame; /* the one event a resume of a finished run sends */
    json_t *detail;    /* WorkflowRunDetailResponse once finished */
    int64_t finish_ms; /* wall clock when the run is over */
    bool delivered;    /* its outcome reached the client once */
} run_rec;

typedef struct beh_node {
    fake_dify_behaviour b; /* strings owned */
    struct beh_node *next;
} beh_node;

typedef struct conv_slot {
    char *id; /* NULL = empty */
    char *user;
} conv_slot;

struct fake_dify {
    struct MHD_Daemon *daemon;
    int listen_fd;
    uint16_t port;
    char **bearers; /* "Bearer <key>", one per accepted key; guarded by mu */
    size_t nbearers;

    pthread_mutex_t mu;
    pthread_cond_t changed; /* counters moved, or stopping */
    /* Only for stopping: delayed answers sleep on it, and waking hundreds of
     * them on every counter change would burn the CPU a benchmark measures. */
    pthread_cond_t stop_cv;
    bool stopping;

    beh_node *head, *tail;
    size_t npending;
    fake_dify_behaviour dflt; /* strings owned */
    double fail_rate;
    uint64_t fail_rng;
    uint64_t id_rng;

    bool recording;
    json_t *records;
    uint64_t seq;
    size_t count;
    size_t arrived;
    size_t delivered;
    size_t connections;

    conv_slot *convs;
    size_t conv_cap, conv_len;

    app_meta *metas;
    size_t nmetas;
    char **versions;
    size_t nversions;
    size_t meta_count;
    run_rec *runs;
    size_t nruns;
};

/* Per-request state, from MHD's first callback to its completion notice. */
typedef struct req_ctx {
    fake_dify *f;
    amp_buf body;
    bool too_large;
    int64_t arrived_ms;
    bool success;   /* counts as a delivery once fully sent */
    json_t *record; /* borrowed reference into f->records, or NULL */
    long run;       /* index in f->runs of the run this answer hands over, or -1 */
} req_ctx;

/* ---- small helpers ------------------------------------------------------ */

static char *xstrdup_or_null(const char *s) {
    return s ? amp_xstrdup(s) : NULL;
}

static void beh_copy(fake_dify_behaviour *dst, const fake_dify_behaviour *src) {
    *dst = *src;
    dst->code = xstrdup_or_null(src->code);
    dst->message = xstrdup_or_null(src->message);
    dst->retry_after = xstrdup_or_null(src->retry_after);
    dst->answer = xstrdup_or_null(src->answer);
    dst->html_body = xstrdup_or_null(src->html_body);
}

/* The app of an Authorization header; NULL when it has none set. f->mu held. */
static const app_meta *meta_of(fake_dify *f, const char *auth) {
    for (size_t i = 0; auth && i < f->nmetas; i++)
        if (strcmp(f->metas[i].bearer, auth) == 0)
            return &f->metas[i];
    return NULL;
}

static bool is_chatflow(fake_dify *f, const char *auth) {
    pthread_mutex_lock(&f->mu);
    const app_meta *m = meta_of(f, auth);
    bool yes = m && strcmp(m->mode, "advanced-chat") == 0;
    pthread_mutex_unlock(&f->mu);
    return yes;
}

static bool version_known(fake_dify *f, const char *id) {
    bool yes = false;
    pthread_mutex_lock(&f->mu);
    for (size_t i = 0; i < f->nversions && !yes; i++)
        yes = strcmp(f->versions[i], id) == 0;
    pthread_mutex_unlock(&f->mu);
    return yes;
}

/* Index of run id, or -1. f->mu held. */
static long run_find(fake_dify *f, const char *id) {
    for (size_t i = 0; i < f->nruns; i++)
        if (strcmp(f->runs[i].id, id) == 0)
            return (long)i;
    return -1;
}

static void beh_free(fake_dify_behaviour *b) {
    free((char *)b->code);
    free((char *)b->message);
    free((char *)b->retry_after);
    free((char *)b->answer);
    free((char *)b->html_body);
    memset(b, 0, sizeof(*b));
}

/* splitmix64: tiny, seedable, good enough for ids and a fail-rate coin. */
static uint64_t rng_next(uint64_t *s) {
    uint64_t z = (*s += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

/* A version-4 looking UUID; f->mu must be held. */
static void make_uuid(fake_dify *f, char out[37]) {
    uint64_t hi = rng_next(&f->id_rng), lo = rng_next(&f->id_rng);
    hi = (hi & ~0xf000ULL) | 0x4000ULL;       /* version 4 */
    lo = (lo & ~(3ULL << 62)) | (2ULL << 62); /* RFC 4122 variant */
    snprintf(out, 37, "%08x-%04x-%04x-%04x-%012llx", (unsigned)(hi >> 32),
             (unsigned)((hi >> 16) & 0xffff), (unsigned)(hi & 0xffff), (unsigned)(lo >> 48),
             (unsigned long long)(lo & 0xffffffffffffULL));
}

static void new_uuid(fake_dify *f, char out[37]) {
    pthread_mutex_lock(&f->mu);
    make_uuid(f, out);
    pthread_mutex_unlock(&f->mu);
}

static struct timespec deadline_after(unsigned ms) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    ts.tv_sec += ms / 1000;
    ts.tv_nsec += (long)(ms % 1000) * 1000000L;
    if (ts.tv_nsec >= 1000000000L) {
        ts.tv_sec++;
        ts.tv_nsec -= 1000000000L;
    }
    return ts;
}

/* Sleep that fake_dify_stop cuts short, so stopping never waits for a
 * scripted delay. */
static void pause_ms(fake_dify *f, unsigned ms) {
    if (!ms)
        return;
    struct timespec until = deadline_after(ms);
    pthread_mutex_lock(&f->mu);
    while (!f->stopping) {
        if (pthread_cond_timedwait(&f->stop_cv, &f->mu, &until) == ETIMEDOUT)
            break;
    }
    pthread_mutex_unlock(&f->mu);
}

/* ---- conversations -------------------------------------------------------- */

static size_t str_hash(const char *s) {
    size_t h = 1469598103934665603ULL;
    for (; *s; s++)
        h = (h ^ (unsigned char)*s) * 1099511628211ULL;
    return h;
}

static conv_slot *conv_find(fake_dify *f, const char *id) {
    if (!f->conv_cap)
        return NULL;
    for (size_t i = str_hash(id) & (f->conv_cap - 1), n = 0; n < f->conv_cap;
         i = (i + 1) & (f->conv_cap - 1), n++) {
        if (!f->convs[i].id)
            return NULL;
        if (strcmp(f->convs[i].id, id) == 0)
            return &f->convs[i];
    }
    return NULL;
}

static void conv_insert_slot(conv_slot *tab, size_t cap, char *id, char *user) {
    size_t i = str_hash(id) & (cap - 1);
    while (tab[i].id)
        i = (i + 1) & (cap - 1);
    tab[i].id = id;
    tab[i].user = user;
}

/* Takes ownership of nothing: copies id and user. f->mu must be held. */
static void conv_add(fake_dify *f, const char *id, const char *user) {
    if ((f->conv_len + 1) * 2 > f->conv_cap) {
        size_t cap = f->conv_cap ? f->conv_cap * 2 : 64;
        conv_slot *tab = amp_xcalloc(cap, sizeof(conv_slot));
        for (size_t i = 0; i < f->conv_cap; i++)
            if (f->convs[i].id)
                conv_insert_slot(tab, cap, f->convs[i].id, f->convs[i].user);
        free(f->convs);
        f->convs = tab;
        f->conv_cap = cap;
    }
    conv_insert_slot(f->convs, f->conv_cap, amp_xstrdup(id), amp_xstrdup(user));
    f->conv_len++;
}

/* ---- answers ---------------------------------------------------------------- */

static const char *default_code(int status) {
    switch (status) {
    case 400:
        return "app_unavailable";
    case 401:
        return "unauthorized";
    case 403:
        return "forbidden";
    case 404:
        return "not_found";
    case 405:
        return "method_not_allowed";
    case 408:
        return "request_timeout";
    case 413:
        return "request_entity_too_large";
    case 415:
        return "unsupported_media_type";
    case 429:
        return "too_many_requests";
    case 500:
        return "internal_server_error";
    case 502:
        return "bad_gateway";
    case 503:
        return "service_unavailable";
    case 504:
        return "gateway_timeout";
    default:
        return "error";
    }
}

static const char *default_message(int status) {
    switch (status) {
    case 400:
        return "App unavailable, please check your app configurations.";
    case 401:
        return "Access token is invalid";
    case 403:
        return "You don't have the permission to access the requested resource. It is either "
               "read-protected or not readable by the server.";
    case 404:
        return "Conversation Not Exists.";
    case 405:
        return "The method is not allowed for the requested URL.";
    case 408:
        return "The server closed the network connection because the browser didn't finish the "
               "request within the specified time.";
    case 413:
        return "The data value transmitted exceeds the capacity limit.";
    case 415:
        return "Did not attempt to load JSON data because the request Content-Type was not "
               "'application/json'.";
    case 429:
        return "Too many requests. Please try again later.";
    case 500:
        return "The server encountered an internal error and was unable to complete your request. "
               "Either the server is overloaded or there is an error in the application.";
    case 502:
        return "The proxy server received an invalid response from an upstream server.";
    case 503:
        return "The server is temporarily unable to service your request due to maintenance "
               "downtime or capacity problems. Please try again later.";
    case 504:
        return "The connection to an upstream server timed out.";
    default:
        return "Unexpected error.";
    }
}

/* Dify's error envelope; caller owns. */
static char *envelope(int status, const char *code, const char *message) {
    json_t *o = json_pack("{s:s, s:s, s:i}", "code", code ? code : default_code(status), "message",
                          message ? message : default_message(status), "status", status);
    if (!o)
        abort();
    char *s = json_dumps(o, JSON_COMPACT | JSON_REAL_PRECISION(6));
    json_decref(o);
    if (!s)
        abort();
    return s;
}

static json_t *usage_json(size_t body_len, size_t answer_len) {
    int prompt = 10 + (int)(body_len / 4), completion = 1 + (int)(answer_len / 4);
    char pp[32], cp[32], tp[32];
    snprintf(pp, sizeof(pp), "%.7f", prompt * 0.001 * 0.001);
    snprintf(cp, sizeof(cp), "%.7f", completion * 0.002 * 0.001);
    snprintf(tp, sizeof(tp), "%.7f", prompt * 0.001 * 0.001 + completion * 0.002 * 0.001);
    json_t *u =
        json_pack("{s:i, s:s, s:s, s:s, s:i, s:s, s:s, s:s, s:i, s:s, s:s, s:f}", "prompt_tokens",
                  prompt, "prompt_unit_price", "0.001", "prompt_price_unit", "0.001",
                  "prompt_price", pp, "completion_tokens", completion, "completion_unit_price",
                  "0.002", "completion_price_unit", "0.001", "completion_price", cp, "total_tokens",
                  prompt + completion, "total_price", tp, "currency", "USD", "latency", 0.042);
    if (!u)
        abort();
    return u;
}

static char *dump_compact(json_t *o) {
    if (!o)
        abort();
    char *s = json_dumps(o, JSON_COMPACT | JSON_REAL_PRECISION(6));
    if (!s)
        abort();
    return s;
}

/* Everything needed to write one successful answer. */
typedef struct answer_ctx {
    endpoint ep;
    const char *answer;
    const char *conversation_id; /* chat only */
    const json_t *inputs;
    size_t body_len;
    const fake_dify_behaviour *b;
    char task_id[37], message_id[37], run_id[37], workflow_id[37];
    json_int_t now_s;
    bool chatflow; /* a chat request to an "advanced-chat" app: a workflow runs it */
} answer_ctx;

static json_t *finished_event(const answer_ctx *a);
static json_t *paused_event(const answer_ctx *a);
static json_t *human_input_event(const answer_ctx *a);

static char *blocking_body(const answer_ctx *a) {
    json_t *o;
    size_t alen = strlen(a->answer);
    if (a->ep == EP_WORKFLOW) {
        bool failed = a->b->workflow_failed;
        json_t *outputs = failed ? json_null() : json_pack("{s:s}", "result", a->answer);
        json_t *error = failed ? json_string(a->b->message ? a->b->message
                                                           : "Node LLM run failed: model timeout")
                               : json_null();
        const char *status = failed ? "failed" : a->b->human_input ? "paused" : "succeeded";
        if (a->b->human_input)
            outputs = (json_decref(outputs), json_object());
        o = json_pack("{s:s, s:s, s:{s:s, s:s, s:s, s:o, s:o, s:f, s:i, s:i, s:I, s:I}}", "task_id",
                      a->task_id, "workflow_run_id", a->run_id, "data", "id", a->run_id,
                      "workflow_id", a->workflow_id, "status", status, "outputs", outputs, "error",
                      error, "elapsed_time", 0.042, "total_tokens",
                      failed ? 0 : 10 + (int)(alen / 4), "total_steps", 3, "created_at", a->now_s,
                      "finished_at", a->now_s);
    } else {
        o = json_pack("{s:s, s:s, s:s, s:s, s:s, s:s, s:{s:o, s:[]}, s:I}", "event", "message",
                      "task_id", a->task_id, "id", a->message_id, "message_id", a->message_id,
                      "mode", a->ep == EP_CHAT ? "chat" : "completion", "answer", a->answer,
                      "metadata", "usage", usage_json(a->body_len, alen), "retriever_resources",
                      "created_at", a->now_s);
        if (o && a->ep == EP_CHAT)
            json_object_set_new(o, "conversation_id", json_string(a->conversation_id));
        if (o && a->chatflow) {
            json_object_set_new(o, "workflow_run_id", json_string(a->run_id));
            if (a->b->human_input)
                json_object_set_new(o, "event", json_string("workflow_paused"));
        }
    }
    char *s = dump_compact(o);
    json_decref(o);
    return s;
}

static void sse_data(amp_buf *out, json_t *ev) {
    char *s = dump_compact(ev);
    json_decref(ev);
    if (amp_buf_append(out, "data: ", 6) || amp_buf_append(out, s, strlen(s)) ||
        amp_buf_append(out, "\n\n", 2))
        abort();
    free(s);
}

static void sse_ping(amp_buf *out) {
    if (amp_buf_append(out, "event: ping\n\n", 13))
        abort();
}

/* A message-like chat/completion event with the common fields. */
static json_t *chat_event(const answer_ctx *a, const char *event) {
    json_t *o = json_pack("{s:s, s:s, s:s, s:I}", "event", event, "task_id", a->task_id,
                          "message_id", a->message_id, "created_at", a->now_s);
    if (!o)
        abort();
    if (a->ep == EP_CHAT)
        json_object_set_new(o, "conversation_id", json_string(a->conversation_id));
    if (a->chatflow)
        json_object_set_new(o, "workflow_run_id", json_string(a->run_id));
    return o;
}

static json_t *error_event(const answer_ctx *a) {
    int st = a->b->status && a->b->status != 200 ? a->b->status : 500;
    json_t *o =
        json_pack("{s:s, s:s, s:i, s:s, s:s}", "event", "error", "message_id", a->message_id,
                  "status", st, "code", a->b->code ? a->b->code : default_code(st), "message",
                  a->b->message ? a->b->message : default_message(st));
    if (!o)
        abort();
    if (a->ep == EP_CHAT)
        json_object_set_new(o, "conversation_id", json_string(a->conversation_id));
    return o;
}

/* The answer cut before each space, as Dify streams tokens (" I", "'m"...):
 * cutting only at ASCII spaces keeps every piece valid UTF-8. */
static size_t next_piece(const char *s, size_t pos, size_t len) {
    size_t end = pos + 1;
    while (end < len && s[end] != ' ')
        end++;
    return end;
}

static json_t *finished_event(const answer_ctx *a) {
    bool failed = a->b->workflow_failed;
    size_t alen = strlen(a->answer);
    json_t *outputs =
        failed ? json_null() : json_pack("{s:s}", a->chatflow ? "answer" : "result", a->answer);
    json_t *error =
        failed ? json_string(a->b->message ? a->b->message : "Node LLM run failed: model timeout")
               : json_null();
    json_t *o =
        json_pack("{s:s, s:s, s:s, s:{s:s, s:s, s:s, s:o, s:o, s:f, s:i, s:i, s:I, s:I}}", "event",
                  "workflow_finished", "task_id", a->task_id, "workflow_run_id", a->run_id, "data",
                  "id", a->run_id, "workflow_id", a->workflow_id, "status",
                  failed ? "failed" : "succeeded", "outputs", outputs, "error", error,
                  "elapsed_time", 0.042, "total_tokens", failed ? 0 : 10 + (int)(alen / 4),
                  "total_steps", 3, "created_at", a->now_s, "finished_at", a->now_s);
    if (!o)
        abort();
    return o;
}

static json_t *human_input_event(const answer_ctx *a) {
    json_t *o =
        json_pack("{s:s, s:s, s:s, s:I, s:{s:s, s:s, s:s, s:s, s:s, s:[], s:[{s:s, s:s}], s:I}}",
                  "event", "human_input_required", "task_id", a->task_id, "workflow_run_id",
                  a->run_id, "created_at", a->now_s, "data", "form_id", a->message_id, "form_token",
                  "tok_fake", "node_id", "approval_node", "node_title", "Approval", "form_content",
                  "Please review the draft.", "inputs", "actions", "id", "approve", "title",
                  "Approve", "expiration_time", a->now_s + 3600);
    if (!o)
        abort();
    if (a->ep == EP_CHAT) {
        json_object_set_new(o, "conversation_id", json_string(a->conversation_id));
        json_object_set_new(o, "message_id", json_string(a->message_id));
    }
    return o;
}

static json_t *paused_event(const answer_ctx *a) {
    json_t *o =
        json_pack("{s:s, s:s, s:s, s:{s:s, s:[s], s:{}, s:[{s:s}], s:s, s:I, s:f, s:i, "
                  "s:i}}",
                  "event", "workflow_paused", "task_id", a->task_id, "workflow_run_id", a->run_id,
                  "data", "workflow_run_id", a->run_id, "paused_nodes", "approval_node", "outputs",
                  "reasons", "type", "human_input_required", "status", "paused", "created_at",
                  a->now_s, "elapsed_time", 0.042, "total_tokens", 0, "total_steps", 2);
    if (!o)
        abort();
    if (a->ep == EP_CHAT)
        json_object_set_new(o, "conversation_id", json_string(a->conversation_id));
    return o;
}

/* The run's detail, as GET /workflows/run/{id} answers once it is over. */
static json_t *run_detail(const answer_ctx *a) {
    bool failed = a->b->workflow_failed, paused = a->b->human_input;
    char *inputs = dump_compact(a->inputs ? (json_t *)a->inputs : json_object());
    json_t *o = json_pack(
        "{s:s, s:s, s:s, s:s, s:o, s:o, s:i, s:i, s:I, s:o, s:f}", "id", a->run_id, "workflow_id",
        a->workflow_id, "status",
        failed   ? "failed"
        : paused ? "paused"
                 : "succeeded",
        "inputs", inputs, "outputs",
        failed || paused ? json_object() : json_pack("{s:s}", "result", a->answer), "error",
        failed ? json_string(a->b->message ? a->b->message : "Node LLM run failed: model timeout")
               : json_null(),
        "total_steps", 3, "total_tokens", failed ? 0 : 10 + (int)(strlen(a->answer) / 4),
        "created_at", a->now_s, "finished_at", paused ? json_null() : json_integer(a->now_s),
        "elapsed_time", 0.042);
    free(inputs);
    if (!o)
        abort();
    return o;
}

/* Keep the run (f->mu not held); its index. tail is the part of the stream
 * the client did not get (taken over), or NULL. */
static long run_keep(fake_dify *f, const answer_ctx *a, const char *user, char *tail,
                     unsigned run_ms) {
    run_rec r;
    memset(&r, 0, sizeof r);
    memcpy(r.id, a->run_id, sizeof r.id);
    r.user = amp_xstrdup(user ? user : "");
    r.tail = tail ? tail : amp_xstrdup("");
    amp_buf fb;
    amp_buf_init(&fb, SIZE_MAX / 2);
    if (a->b->human_input)
        sse_data(&fb, paused_event(a));
    else
        sse_data(&fb, finished_event(a));
    r.final_frame = fb.data;
    r.detail = run_detail(a);
    r.finish_ms = amp_now_ms() + run_ms;
    pthread_mutex_lock(&f->mu);
    f->runs = amp_xrealloc(f->runs, (f->nruns + 1) * sizeof *f->runs);
    f->runs[f->nruns] = r;
    long idx = (long)f->nruns++;
    pthread_mutex_unlock(&f->mu);
    return idx;
}

static char *stream_body(const answer_ctx *a) {
    amp_buf out;
    amp_buf_init(&out, SIZE_MAX / 2);
    const char *ans = a->answer;
    size_t alen = strlen(ans);
    bool err = a->b->sse_error;

    if (a->ep == EP_WORKFLOW) {
        json_t *inputs = a->inputs ? json_deep_copy(a->inputs) : json_object();
        sse_data(&out, json_pack("{s:s, s:s, s:s, s:{s:s, s:s, s:o, s:I}}", "event",
                                 "workflow_started", "task_id", a->task_id, "workflow_run_id",
                                 a->run_id, "data", "id", a->run_id, "workflow_id", a->workflow_id,
                                 "inputs", inputs, "created_at", a->now_s));
        sse_data(&out,
                 json_pack("{s:s, s:s, s:s, s:{s:s, s:s, s:s, s:s, s:i, s:I}}", "event",
                           "node_started", "task_id", a->task_id, "workflow_run_id", a->run_id,
                           "data", "id", "node_exec_1", "node_id", "llm", "node_type", "llm",
                           "title", "LLM", "index", 1, "created_at", a->now_s));
        for (size_t pos = 0, n = 0; pos < alen && !a->b->human_input; n++) {
            size_t end = next_piece(ans, pos, alen);
            json_t *text = json_stringn(ans + pos, end - pos);
            sse_data(&out, json_pack("{s:s, s:s, s:s, s:{s:o, s:[s,s]}}", "event", "text_chunk",
                                     "task_id", a->task_id, "workflow_run_id", a->run_id, "data",
                                     "text", text ? text : json_string(""),
                                     "from_variable_selector", "llm", "text"));
            pos = end;
            if (n == 0) {
                sse_ping(&out);
                if (err)
                    break;
            }
        }
        if (err) {
            sse_data(&out, error_event(a));
        } else if (a->b->human_input) {
            sse_data(&out, human_input_event(a));
            sse_data(&out, paused_event(a));
        } else if (!a->b->sse_unfinished) {
            sse_data(&out, finished_event(a));
        }
    } else {
        if (a->chatflow)
            sse_data(&out,
                     json_pack("{s:s, s:s, s:s, s:{s:s, s:s, s:I}}", "event", "workflow_started",
                               "task_id", a->task_id, "workflow_run_id", a->run_id, "data", "id",
                               a->run_id, "workflow_id", a->workflow_id, "created_at", a->now_s));
        for (size_t pos = 0, n = 0; pos < alen; n++) {
            size_t end = next_piece(ans, pos, alen);
            json_t *ev = chat_event(a, "message");
            json_t *piece = json_stringn(ans + pos, end - pos);
            json_object_set_new(ev, "answer", piece ? piece : json_string(""));
            sse_data(&out, ev);
            pos = end;
            if (n == 0) {
                sse_ping(&out);
                if (err || (a->chatflow && a->b->human_input))
                    break;
            }
        }
        if (err) {
            sse_data(&out, error_event(a));
        } else if (a->chatflow && a->b->human_input) {
            sse_data(&out, human_input_event(a));
            sse_data(&out, paused_event(a));
        } else if (!a->b->sse_unfinished) {
            json_t *end = chat_event(a, "message_end");
            json_object_set_new(end, "id", json_string(a->message_id));
            json_t *meta = json_pack("{s:o, s:[]}", "usage", usage_json(a->body_len, alen),
                                     "retriever_resources");
            if (!meta)
                abort();
            json_object_set_new(end, "metadata", meta);
            sse_data(&out, end);
            if (a->chatflow)
                sse_data(&out, finished_event(a));
        }
    }
    return out.data; /* caller owns */
}

/* ---- streaming through MHD's callback responses --------------------------- */

typedef struct stream {
    fake_dify *f;
    char *data;
    size_t len;
    size_t chunk;          /* 0: one SSE frame per write */
    unsigned pause;        /* ms between writes */
    size_t drop_at;        /* close the connection here, without the closing chunk; 0: never */
    int64_t wait_until_ms; /* a resumed running run: send nothing before this (wall clock) */
} stream;

/* Offset just past the n-th SSE frame of text, or 0 when it has fewer. */
static size_t frame_end(const char *text, unsigned n) {
    const char *p = text;
    for (unsigned i = 0; i < n; i++) {
        const char *e = strstr(p, "\n\n");
        if (!e)
            return 0;
        p = e + 2;
    }
    return (size_t)(p - text);
}

static ssize_t stream_read(void *cls, uint64_t pos, char *buf, size_t max) {
    stream *s = cls;
    if (s->drop_at && pos >= s->drop_at)
        return MHD_CONTENT_READER_END_WITH_ERROR; /* cut: the client sees a broken stream */
    if (pos >= s->len)
        return MHD_CONTENT_READER_END_OF_STREAM;
    if (pos == 0 && s->wait_until_ms) {
        int64_t left = s->wait_until_ms - amp_now_ms();
        if (left > 0)
            pause_ms(s->f, (unsigned)left);
    }
    if (pos > 0)
        pause_ms(s->f, s->pause);
    size_t n;
    if (s->chunk) {
        n = s->chunk;
    } else {
        const char *end = memmem(s->data + pos, s->len - pos, "\n\n", 2);
        n = end ? (size_t)(end - (s->data + pos)) + 2 : s->len - pos;
    }
    if (n > s->len - pos)
        n = s->len - pos;
    if (s->drop_at && n > s->drop_at - pos)
        n = s->drop_at - pos;
    if (n > max)
        n = max;
    memcpy(buf, s->data + pos, n);
    return (ssize_t)n;
}

static void stream_free(void *cls) {
    stream *s = cls;
    free(s->data);
    free(s);
}

/* ---- the request handler ---------------------------------------------------- */

static endpoint endpoint_of(const char *url) {
    if (strncmp(url, "/v1/", 4) == 0)
        url += 3;
    if (strcmp(url, "/chat-messages") == 0)
        return EP_CHAT;
    if (strcmp(url, "/completion-messages") == 0)
        return EP_COMPLETION;
    if (strcmp(url, "/workflows/run") == 0)
        return EP_WORKFLOW;
    return EP_NONE;
}

static json_t *str_or_null(const char *s) {
    return s ? json_string(s) : json_null();
}

static void record(fake_dify *f, req_ctx *ctx, struct MHD_Connection *conn, const char *url,
                   const char *method, const json_t *body, int status, bool streaming,
                   const char *response, bool api) {
    pthread_mutex_lock(&f->mu);
    f->seq++;
    if (api)
        f->count++;
    if (f->recording) {
        json_t *r = json_object();
        json_t *raw = json_stringn(ctx->body.data ? ctx->body.data : "", ctx->body.len);
        json_object_set_new(r, "seq", json_integer((json_int_t)f->seq));
        json_object_set_new(r, "method", json_string(method));
        json_object_set_new(r, "path", json_string(url));
        json_object_set_new(
            r, "authorization",
            str_or_null(MHD_lookup_connection_value(conn, MHD_HEADER_KIND, "Authorization")));
        json_object_set_new(
            r, "trace_id",
            str_or_null(MHD_lookup_connection_value(conn, MHD_HEADER_KIND, "X-Trace-Id")));
        json_object_set_new(
            r, "content_type",
            str_or_null(MHD_lookup_connection_value(conn, MHD_HEADER_KIND, "Content-Type")));
        json_object_set_new(
            r, "user_agent",
            str_or_null(MHD_lookup_connection_value(conn, MHD_HEADER_KIND, "User-Agent")));
        const union MHD_ConnectionInfo *ci =
            MHD_get_connection_info(conn, MHD_CONNECTION_INFO_SOCKET_CONTEXT);
        json_object_set_new(r, "connection",
                            json_integer(ci ? (json_int_t)(uintptr_t)ci->socket_context : 0));
        json_object_set_new(r, "body", body ? json_deep_copy(body) : json_null());
        /* Bodies that are not UTF-8 cannot be JSON strings; null says so. */
        json_object_set_new(r, "raw_body", raw ? raw : json_null());
        json_object_set_new(r, "arrived_ms", json_integer(ctx->arrived_ms));
        json_object_set_new(r, "status", json_integer(status));
        json_object_set_new(r, "delivered", json_false());
        json_object_set_new(r, "streaming", json_boolean(streaming));
        json_object_set_new(r, "response", str_or_null(response));
        json_array_append_new(f->records, r);
        if (ctx->success)
            ctx->record = json_incref(r); /* marked delivered on completion */
    }
    pthread_cond_broadcast(&f->changed);
    pthread_mutex_unlock(&f->mu);
}

static enum MHD_Result queue_text(struct MHD_Connection *conn, unsigned status, const char *text,
                                  const char *content_type, const char *retry_after,
                                  const char *allow) {
    struct MHD_Response *r =
        MHD_create_response_from_buffer(strlen(text), (void *)text, MHD_RESPMEM_MUST_COPY);
    if (!r)
        return MHD_NO;
    MHD_add_response_header(r, MHD_HTTP_HEADER_CONTENT_TYPE, content_type);
    if (retry_after)
        MHD_add_response_header(r, MHD_HTTP_HEADER_RETRY_AFTER, retry_after);
    if (allow)
        MHD_add_response_header(r, MHD_HTTP_HEADER_ALLOW, allow);
    enum MHD_Result ret = MHD_queue_response(conn, status, r);
    MHD_destroy_response(r);
    return ret;
}

/* Answer with Dify's error envelope, and record it. */
static enum MHD_Result fail(fake_dify *f, req_ctx *ctx, struct MHD_Connection *conn,
                            const char *url, const char *method, const json_t *body, int status,
                            const char *code, const char *message, const char *retry_after,
                            const char *allow, bool api) {
    char *text = envelope(status, code, message);
    record(f, ctx, conn, url, method, body, status, false, text, api);
    enum MHD_Result ret =
        queue_text(conn, (unsigned)status, text, "application/json", retry_after, allow);
    free(text);
    return ret;
}

/* Take the next scripted behaviour, or the default one (possibly turned
 * into a 500 by the fail rate). Caller owns *out's strings. */
static void take_behaviour(fake_dify *f, fake_dify_behaviour *out) {
    pthread_mutex_lock(&f->mu);
    beh_node *n = f->head;
    if (n) {
        f->head = n->next;
        if (!f->head)
            f->tail = NULL;
        f->npending--;
        *out = n->b;
        free(n);
    } else {
        beh_copy(out, &f->dflt);
        if (f->fail_rate > 0) {
            double r = (double)(rng_next(&f->fail_rng) >> 11) / 9007199254740992.0;
            if (r < f->fail_rate)
                out->status = 500;
        }
    }
    pthread_mutex_unlock(&f->mu);
}

static bool content_type_is_json(const char *ct) {
    static const char want[] = "application/json";
    if (!ct || strncasecmp(ct, want, sizeof(want) - 1) != 0)
        return false;
    char c = ct[sizeof(want) - 1];
    return c == '\0' || c == ';' || c == ' ';
}

/* Validate the body against the endpoint's required fields; NULL when fine,
 * else Dify-like message (static). */
static const char *check_body(endpoint ep, const json_t *body) {
    if (!json_is_object(body))
        return "Request body must be a JSON object.";
    if (!json_is_object(json_object_get(body, "inputs")))
        return "inputs is required in input form";
    if (ep == EP_CHAT && !json_is_string(json_object_get(body, "query")))
        return "Arg query must be provided.";
    const json_t *q = json_object_get(body, "query");
    if (ep == EP_COMPLETION && q && !json_is_string(q))
        return "Arg query must be a string.";
    if (!json_is_string(json_object_get(body, "user")))
        return "Arg user must be provided.";
    const json_t *mode = json_object_get(body, "response_mode");
    if (mode && !json_is_null(mode)) {
        const char *m = json_string_value(mode);
        if (!m || (strcmp(m, "blocking") != 0 && strcmp(m, "streaming") != 0))
            return "response_mode must be 'blocking' or 'streaming'.";
    }
    const json_t *cid = json_object_get(body, "conversation_id");
    if (ep == EP_CHAT && cid && !json_is_null(cid) && !json_is_string(cid))
        return "conversation_id must be a string.";
    return NULL;
}

static bool key_ok(fake_dify *f, const char *auth) {
    bool ok = false;
    pthread_mutex_lock(&f->mu);
    for (size_t i = 0; auth && !ok && i < f->nbearers; i++)
        ok = strcmp(auth, f->bearers[i]) == 0;
    pthread_mutex_unlock(&f->mu);
    return ok;
}

/* Reject auth ("Bearer <key>") from now on. */
static void revoke_bearer(fake_dify *f, const char *auth) {
    pthread_mutex_lock(&f->mu);
    for (size_t i = 0; i < f->nbearers; i++) {
        if (strcmp(f->bearers[i], auth) == 0) {
            free(f->bearers[i]);
            f->bearers[i] = f->bearers[--f->nbearers];
            break;
        }
    }
    pthread_mutex_unlock(&f->mu);
}

static enum MHD_Result handle_api(fake_dify *f, req_ctx *ctx, struct MHD_Connection *conn,
                                  const char *url, const char *method, endpoint ep,
                                  const char *version) {
    fake_dify_behaviour b;
    take_behaviour(f, &b);
    pthread_mutex_lock(&f->mu);
    f->arrived++;
    pthread_cond_broadcast(&f->changed);
    pthread_mutex_unlock(&f->mu);
    enum MHD_Result ret;
    json_t *body = NULL;
    char *answer_owned = NULL;

    /* Parsed up front so that every record, even a dropped one, shows it.
     * amp2dify's reader, jansson's verdict: benchmarks share the CPUs with
     * this fake, and jansson's loader was a fifth of its time. */
    if (!ctx->too_large && ctx->body.len)
        body = amp_json_loadb(ctx->body.data, ctx->body.len, 0, NULL);
    pause_ms(f, b.delay_ms);
    if (b.drop) {
        record(f, ctx, conn, url, method, body, 0, false, NULL, true);
        ret = MHD_NO; /* MHD closes the connection without a response */
        goto out;
    }
    const char *auth = MHD_lookup_connection_value(conn, MHD_HEADER_KIND, "Authorization");
    if (!key_ok(f, auth)) {
        ret = fail(f, ctx, conn, url, method, NULL, 401, "unauthorized", "Access token is invalid",
                   NULL, NULL, true);
        goto out;
    }
    if (b.revoke_key)
        revoke_bearer(f, auth);
    if (b.status && b.status != 200 && !b.sse_error && b.html_body) {
        record(f, ctx, conn, url, method, body, b.status, false, b.html_body, true);
        ret = queue_text(conn, (unsigned)b.status, b.html_body, "text/html; charset=utf-8",
                         b.retry_after, NULL);
        goto out;
    }
    if (b.status && b.status != 200 && !b.sse_error) {
        ret = fail(f, ctx, conn, url, method, body, b.status, b.code, b.message, b.retry_after,
                   NULL, true);
        goto out;
    }
    if (ctx->too_large) {
        ret = fail(f, ctx, conn, url, method, NULL, 413, NULL, NULL, NULL, NULL, true);
        goto out;
    }
    if (!content_type_is_json(MHD_lookup_connection_value(conn, MHD_HEADER_KIND, "Content-Type"))) {
        ret = fail(f, ctx, conn, url, method, body, 415, NULL, NULL, NULL, NULL, true);
        goto out;
    }
    const char *why = body ? check_body(ep, body) : "Failed to decode JSON object.";
    if (why) {
        ret = fail(f, ctx, conn, url, method, body, 400, "invalid_param", why, NULL, NULL, true);
        goto out;
    }

    const char *body_version =
        ep == EP_CHAT ? json_string_value(json_object_get(body, "workflow_id")) : NULL;
    if (body_version)
        version = body_version;
    if (version && !version_known(f, version)) {
        char *m = amp_xasprintf("Workflow not found with id: %s", version);
        ret = fail(f, ctx, conn, url, method, body, 404, "not_found", m, NULL, NULL, true);
        free(m);
        goto out;
    }

    answer_ctx a;
    memset(&a, 0, sizeof(a));
    a.ep = ep;
    a.chatflow = ep == EP_CHAT && is_chatflow(f, auth);
    a.b = &b;
    a.body_len = ctx->body.len;
    a.inputs = json_object_get(body, "inputs");
    a.now_s = (json_int_t)time(NULL);
    new_uuid(f, a.task_id);
    new_uuid(f, a.message_id);
    new_uuid(f, a.run_id);
    new_uuid(f, a.workflow_id);
    if (version)
        snprintf(a.workflow_id, sizeof a.workflow_id, "%s", version);

    const char *user = json_string_value(json_object_get(body, "user"));
    char conv[37] = "";
    if (ep == EP_CHAT) {
        const char *cid = json_string_value(json_object_get(body, "conversation_id"));
        pthread_mutex_lock(&f->mu);
        bool known = true;
        if (cid && *cid) {
            /* Dify scopes conversations to their user: another user's id is
             * just as unknown. */
            conv_slot *slot = conv_find(f, cid);
            known = slot && strcmp(slot->user, user) == 0;
            if (known)
                snprintf(conv, sizeof(conv), "%s", cid);
        } else {
            make_uuid(f, conv);
            conv_add(f, conv, user);
        }
        pthread_mutex_unlock(&f->mu);
        if (!known) {
            ret = fail(f, ctx, conn, url, method, body, 404, "not_found",
                       "Conversation Not Exists.", NULL, NULL, true);
            goto out;
        }
        a.conversation_id = conv;
    }

    if (b.answer) {
        a.answer = b.answer;
    } else {
        const char *q = json_string_value(json_object_get(body, "query"));
        if (q && *q) {
            answer_owned = amp_xasprintf("Echo: %s", q);
        } else {
            char *in = dump_compact(json_object_get(body, "inputs"));
            answer_owned = amp_xasprintf("Echo: %s", in);
            free(in);
        }
        a.answer = answer_owned;
    }

    const char *mode = json_string_value(json_object_get(body, "response_mode"));
    bool streaming = mode && strcmp(mode, "streaming") == 0;
    bool has_run = ep == EP_WORKFLOW || a.chatflow;
    ctx->success = !b.sse_error && !(streaming && b.sse_unfinished) &&
                   !(ep == EP_WORKFLOW && b.workflow_failed) && !b.human_input &&
                   !(streaming && b.stream_drop_after);
    if (streaming) {
        stream *s = amp_xcalloc(1, sizeof(stream));
        s->f = f;
        s->data = stream_body(&a);
        s->len = strlen(s->data);
        s->chunk = b.stream_chunk;
        s->pause = b.stream_pause_ms;
        s->drop_at = b.stream_drop_after ? frame_end(s->data, b.stream_drop_after) : 0;
        if (has_run)
            ctx->run = run_keep(f, &a, user, amp_xstrdup(s->drop_at ? s->data + s->drop_at : ""),
                                b.run_ms);
        record(f, ctx, conn, url, method, body, 200, true, s->data, true);
        struct MHD_Response *r = MHD_create_response_from_callback(
            MHD_SIZE_UNKNOWN, s->chunk ? s->chunk : 4096, stream_read, s, stream_free);
        if (!r) {
            stream_free(s);
            ret = MHD_NO;
            goto out;
        }
        MHD_add_response_header(r, MHD_HTTP_HEADER_CONTENT_TYPE, "text/event-stream");
        MHD_add_response_header(r, MHD_HTTP_HEADER_CACHE_CONTROL, "no-cache");
        ret = MHD_queue_response(conn, MHD_HTTP_OK, r);
        MHD_destroy_response(r);
    } else {
        char *text = blocking_body(&a);
        if (has_run)
            ctx->run = run_keep(f, &a, user, NULL, b.run_ms);
        record(f, ctx, conn, url, method, body, 200, false, text, true);
        ret = queue_text(conn, MHD_HTTP_OK, text, "application/json", NULL, NULL);
        free(text);
    }
out:
    free(answer_owned);
    json_decref(body);
    beh_free(&b);
    return ret;
}

/* GET /info, /parameters, /workflow/{run}/events, /workflows/run/{run}. */
static enum MHD_Result handle_get(fake_dify *f, req_ctx *ctx, struct MHD_Connection *conn,
                                  const char *url, const char *path) {
    const char *auth = MHD_lookup_connection_value(conn, MHD_HEADER_KIND, "Authorization");
    bool meta = strcmp(path, "/info") == 0 || strcmp(path, "/parameters") == 0;
    if (meta) {
        /* Counted by fake_dify_meta_count, never in the request log (which
         * holds what the relay sends for events), whatever the answer. */
        pthread_mutex_lock(&f->mu);
        f->meta_count++;
        pthread_mutex_unlock(&f->mu);
        if (!key_ok(f, auth)) {
            char *text = envelope(401, "unauthorized", "Access token is invalid");
            enum MHD_Result ret = queue_text(conn, 401, text, "application/json", NULL, NULL);
            free(text);
            return ret;
        }
    } else if (!key_ok(f, auth)) {
        return fail(f, ctx, conn, url, "GET", NULL, 401, "unauthorized", "Access token is invalid",
                    NULL, NULL, true);
    }
    if (meta) {
        pthread_mutex_lock(&f->mu);
        const app_meta *m = meta_of(f, auth);
        json_t *o;
        if (path[1] == 'i') {
            o = json_pack("{s:s, s:s, s:[], s:s, s:s}", "name", "Fake App", "description",
                          "A fake Dify app.", "tags", "mode", m ? m->mode : "chat", "author_name",
                          "amp2dify tests");
        } else {
            o = json_pack(
                "{s:s, s:[], s:{s:b}, s:{s:b}, s:{s:b}, s:{s:b}, s:{s:b}, s:O, s:{}, "
                "s:{s:i, s:i, s:i, s:i, s:i}}",
                "opening_statement", "", "suggested_questions", "suggested_questions_after_answer",
                "enabled", 0, "speech_to_text", "enabled", 0, "retriever_resource", "enabled", 0,
                "annotation_reply", "enabled", 0, "more_like_this", "enabled", 0, "user_input_form",
                m && m->form ? m->form : json_array(), "file_upload", "system_parameters",
                "file_size_limit", 15, "image_file_size_limit", 10, "audio_file_size_limit", 50,
                "video_file_size_limit", 100, "workflow_file_upload_limit", 10);
            if (!(m && m->form))
                json_decref(json_object_get(o, "user_input_form")); /* the [] made above */
        }
        pthread_cond_broadcast(&f->changed);
        pthread_mutex_unlock(&f->mu);
        char *text = dump_compact(o);
        json_decref(o);
        enum MHD_Result ret = queue_text(conn, MHD_HTTP_OK, text, "application/json", NULL, NULL);
        free(text);
        return ret;
    }

    /* A run: its id is the path segment after the prefix. */
    bool events = strncmp(path, "/workflow/", 10) == 0;
    const char *id = path + (events ? 10 : 15);
    size_t idlen =
        events ? (size_t)(strstr(id, "/events") ? strstr(id, "/events") - id : 0) : strlen(id);
    if (events && (idlen == 0 || strcmp(id + idlen, "/events") != 0))
        return fail(f, ctx, conn, url, "GET", NULL, 404, "not_found",
                    "The requested URL was not found on the server.", NULL, NULL, false);
    char rid[64];
    snprintf(rid, sizeof rid, "%.*s", (int)(idlen < sizeof rid ? idlen : sizeof rid - 1), id);
    const char *user = MHD_lookup_connection_value(conn, MHD_GET_ARGUMENT_KIND, "user");
    pthread_mutex_lock(&f->mu);
    f->arrived++;
    long k = run_find(f, rid);
    bool mine = k >= 0 && (!events || (user && strcmp(user, f->runs[k].user) == 0));
    if (!mine) {
        pthread_mutex_unlock(&f->mu);
        if (events && !user)
            return fail(f, ctx, conn, url, "GET", NULL, 400, "invalid_param",
                        "user is required in query", NULL, NULL, true);
        return fail(f, ctx, conn, url, "GET", NULL, 404, "not_found", "Workflow run not found.",
                    NULL, NULL, true);
    }
    run_rec *r = &f->runs[k];
    bool running = amp_now_ms() < r->finish_ms;
    const char *status = json_string_value(json_object_get(r->detail, "status"));
    bool succeeded = status && strcmp(status, "succeeded") == 0;
    ctx->run = k;
    enum MHD_Result ret;
    if (!events) {
        json_t *d = json_deep_copy(r->detail);
        if (running) {
            json_object_set_new(d, "status", json_string("running"));
            json_object_set_new(d, "outputs", json_object());
            json_object_set_new(d, "finished_at", json_null());
        }
        pthread_mutex_unlock(&f->mu);
        ctx->success = !running && succeeded;
        char *text = dump_compact(d);
        json_decref(d);
        record(f, ctx, conn, url, "GET", NULL, 200, false, text, true);
        ret = queue_text(conn, MHD_HTTP_OK, text, "application/json", NULL, NULL);
        free(text);
        return ret;
    }
    /* A run still going streams what it has left once it gets there; one
     * already over sends its single closing event. */
    stream *s = amp_xcalloc(1, sizeof(stream));
    s->f = f;
    s->data = amp_xstrdup(running && r->tail[0] ? r->tail : r->final_frame);
    s->len = strlen(s->data);
    s->wait_until_ms = running ? r->finish_ms : 0;
    pthread_mutex_unlock(&f->mu);
    ctx->success = succeeded;
    record(f, ctx, conn, url, "GET", NULL, 200, true, s->data, true);
    struct MHD_Response *resp =
        MHD_create_response_from_callback(MHD_SIZE_UNKNOWN, 4096, stream_read, s, stream_free);
    if (!resp) {
        stream_free(s);
        return MHD_NO;
    }
    MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_TYPE, "text/event-stream");
    MHD_add_response_header(resp, MHD_HTTP_HEADER_CACHE_CONTROL, "no-cache");
    ret = MHD_queue_response(conn, MHD_HTTP_OK, resp);
    MHD_destroy_response(resp);
    return ret;
}

static enum MHD_Result on_request(void *cls, struct MHD_Connection *conn, const char *url,
                                  const char *method, const char *version, const char *upload_data,
                                  size_t *upload_data_size, void **con_cls) {
    (void)version;
    fake_dify *f = cls;
    req_ctx *ctx = *con_cls;
    if (!ctx) {
        ctx = amp_xcalloc(1, sizeof(req_ctx));
        ctx->f = f;
        amp_buf_init(&ctx->body, FAKE_MAX_BODY);
        ctx->arrived_ms = amp_now_ms();
        ctx->run = -1;
        *con_cls = ctx;
        return MHD_YES;
    }
    if (*upload_data_size) {
        if (!ctx->too_large && amp_buf_append(&ctx->body, upload_data, *upload_data_size) != 0)
            ctx->too_large = true;
        *upload_data_size = 0;
        return MHD_YES;
    }

    const char *path = strncmp(url, "/v1/", 4) == 0 ? url + 3 : url;
    if (strcmp(path, "/info") == 0 || strcmp(path, "/parameters") == 0 ||
        strncmp(path, "/workflow/", 10) == 0 ||
        (strncmp(path, "/workflows/run/", 15) == 0 && path[15])) {
        if (strcmp(method, "GET") != 0)
            return fail(f, ctx, conn, url, method, NULL, 405, NULL, NULL, NULL, "GET, OPTIONS",
                        false);
        return handle_get(f, ctx, conn, url, path);
    }
    /* A published version: /workflows/{id}/run. */
    char pinned[64] = "";
    size_t plen = strlen(path);
    if (strncmp(path, "/workflows/", 11) == 0 && plen > 15 && plen - 15 < sizeof pinned &&
        strcmp(path + plen - 4, "/run") == 0 && strcmp(path, "/workflows/run") != 0) {
        memcpy(pinned, path + 11, plen - 15);
        pinned[plen - 15] = '\0';
        if (strchr(pinned, '/'))
            pinned[0] = '\0';
    }
    endpoint ep = pinned[0] ? EP_WORKFLOW : endpoint_of(url);
    if (ep == EP_NONE)
        return fail(f, ctx, conn, url, method, NULL, 404, "not_found",
                    "The requested URL was not found on the server. If you entered the URL "
                    "manually please check your spelling and try again.",
                    NULL, NULL, false);
    if (strcmp(method, "POST") != 0)
        return fail(f, ctx, conn, url, method, NULL, 405, NULL, NULL, NULL, "POST, OPTIONS", false);
    return handle_api(f, ctx, conn, url, method, ep, pinned[0] ? pinned : NULL);
}

static void on_completed(void *cls, struct MHD_Connection *conn, void **con_cls,
                         enum MHD_RequestTerminationCode toe) {
    (void)conn;
    fake_dify *f = cls;
    req_ctx *ctx = *con_cls;
    if (!ctx)
        return;
    /* A delivery counts once the whole answer left: a stream cut short by
     * the client is not one. */
    if (ctx->success && toe == MHD_REQUEST_TERMINATED_COMPLETED_OK) {
        pthread_mutex_lock(&f->mu);
        /* A run's outcome counts once, however it reached the client: its
         * own answer, a resumed stream or its detail. */
        bool again = ctx->run >= 0 && f->runs[ctx->run].delivered;
        if (ctx->run >= 0)
            f->runs[ctx->run].delivered = true;
        if (!again)
            f->delivered++;
        if (ctx->record && !again)
            json_object_set_new(ctx->record, "delivered", json_true());
        pthread_cond_broadcast(&f->changed);
        pthread_mutex_unlock(&f->mu);
    }
    if (ctx->record) {
        pthread_mutex_lock(&f->mu);
        json_decref(ctx->record);
        pthread_mutex_unlock(&f->mu);
    }
    amp_buf_free(&ctx->body);
    free(ctx);
    *con_cls = NULL;
}

/* Number each connection as it opens; records carry the number. */
static void on_connection(void *cls, struct MHD_Connection *conn, void **socket_context,
                          enum MHD_ConnectionNotificationCode toe) {
    (void)conn;
    fake_dify *f = cls;
    if (toe != MHD_CONNECTION_NOTIFY_STARTED)
        return;
    pthread_mutex_lock(&f->mu);
    *socket_context = (void *)(uintptr_t)++f->connections;
    pthread_mutex_unlock(&f->mu);
}

/* ---- lifecycle and the test-facing API ---------------------------------- */

static int listen_on(uint16_t port, uint16_t *bound) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -1;
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    struct sockaddr_in sa;
    memset(&sa, 0, sizeof(sa));
    sa.sin_family = AF_INET;
    sa.sin_port = htons(port);
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t sl = sizeof(sa);
    if (bind(fd, (struct sockaddr *)&sa, sizeof(sa)) != 0 || listen(fd, FAKE_CONN_LIMIT) != 0 ||
        getsockname(fd, (struct sockaddr *)&sa, &sl) != 0) {
        int e = errno;
        close(fd);
        errno = e;
        return -1;
    }
    *bound = ntohs(sa.sin_port);
    return fd;
}

static void free_keys(fake_dify *f) {
    for (size_t i = 0; i < f->nbearers; i++)
        free(f->bearers[i]);
    free(f->bearers);
}

fake_dify *fake_dify_start(uint16_t port, const char *api_key) {
    fake_dify *f = amp_xcalloc(1, sizeof(fake_dify));
    fake_dify_add_key(f, api_key ? api_key : "");
    pthread_mutex_init(&f->mu, NULL);
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&f->changed, &ca);
    pthread_cond_init(&f->stop_cv, &ca);
    pthread_condattr_destroy(&ca);
    f->recording = true;
    f->records = json_array();
    if (!f->records)
        abort();
    f->id_rng = (uint64_t)amp_now_ms() ^ ((uint64_t)getpid() << 32) ^ (uint64_t)(uintptr_t)f;
    f->fail_rng = 1;

    f->listen_fd = listen_on(port, &f->port);
    if (f->listen_fd < 0) {
        fprintf(stderr, "fake_dify: cannot listen on 127.0.0.1:%u: %s\n", port, strerror(errno));
        goto fail;
    }
    f->daemon = MHD_start_daemon(
        MHD_USE_THREAD_PER_CONNECTION | MHD_USE_POLL_INTERNAL_THREAD, 0, NULL, NULL, on_request, f,
        MHD_OPTION_LISTEN_SOCKET, f->listen_fd, MHD_OPTION_CONNECTION_LIMIT,
        (unsigned)FAKE_CONN_LIMIT, MHD_OPTION_CONNECTION_TIMEOUT, (unsigned)120,
        MHD_OPTION_THREAD_STACK_SIZE, (size_t)(256 * 1024), MHD_OPTION_NOTIFY_COMPLETED,
        on_completed, f, MHD_OPTION_NOTIFY_CONNECTION, on_connection, f, MHD_OPTION_END);
    if (!f->daemon) {
        fprintf(stderr, "fake_dify: cannot start the HTTP daemon on port %u\n", f->port);
        close(f->listen_fd);
        goto fail;
    }
    return f;
fail:
    json_decref(f->records);
    pthread_cond_destroy(&f->changed);
    pthread_cond_destroy(&f->stop_cv);
    pthread_mutex_destroy(&f->mu);
    free_keys(f);
    free(f);
    return NULL;
}

void fake_dify_stop(fake_dify *f) {
    if (!f)
        return;
    pthread_mutex_lock(&f->mu);
    f->stopping = true;
    pthread_cond_broadcast(&f->changed);
    pthread_cond_broadcast(&f->stop_cv);
    pthread_mutex_unlock(&f->mu);
    MHD_stop_daemon(f->daemon); /* joins every connection thread */
    close(f->listen_fd);        /* MHD does not close a socket it was given */
    for (beh_node *n = f->head, *next; n; n = next) {
        next = n->next;
        beh_free(&n->b);
        free(n);
    }
    beh_free(&f->dflt);
    for (size_t i = 0; i < f->conv_cap; i++) {
        free(f->convs[i].id);
        free(f->convs[i].user);
    }
    free(f->convs);
    for (size_t i = 0; i < f->nmetas; i++) {
        free(f->metas[i].bearer);
        free(f->metas[i].mode);
        json_decref(f->metas[i].form);
    }
    free(f->metas);
    for (size_t i = 0; i < f->nversions; i++)
        free(f->versions[i]);
    free(f->versions);
    for (size_t i = 0; i < f->nruns; i++) {
        free(f->runs[i].user);
        free(f->runs[i].tail);
        free(f->runs[i].final_frame);
        json_decref(f->runs[i].detail);
    }
    free(f->runs);
    json_decref(f->records);
    pthread_cond_destroy(&f->changed);
    pthread_cond_destroy(&f->stop_cv);
    pthread_mutex_destroy(&f->mu);
    free_keys(f);
    free(f);
}

uint16_t fake_dify_port(const fake_dify *f) {
    return f->port;
}

void fake_dify_add_key(fake_dify *f, const char *api_key) {
    char *bearer = amp_xasprintf("Bearer %s", api_key);
    pthread_mutex_lock(&f->mu);
    f->bearers = amp_xrealloc(f->bearers, (f->nbearers + 1) * sizeof *f->bearers);
    f->bearers[f->nbearers++] = bearer;
    pthread_mutex_unlock(&f->mu);
}

void fake_dify_set_app(fake_dify *f, const char *api_key, const char *mode,
                       const char *user_input_form_json) {
    json_t *form = user_input_form_json ? json_loads(user_input_form_json, 0, NULL) : json_array();
    if (!json_is_array(form)) {
        fprintf(stderr, "fake_dify_set_app: user_input_form is not a JSON array\n");
        abort();
    }
    char *bearer = amp_xasprintf("Bearer %s", api_key);
    pthread_mutex_lock(&f->mu);
    app_meta *m = (app_meta *)meta_of(f, bearer);
    if (m) {
        free(bearer);
        free(m->mode);
        json_decref(m->form);
    } else {
        f->metas = amp_xrealloc(f->metas, (f->nmetas + 1) * sizeof *f->metas);
        m = &f->metas[f->nmetas++];
        m->bearer = bearer;
    }
    m->mode = amp_xstrdup(mode);
    m->form = form;
    pthread_mutex_unlock(&f->mu);
}

void fake_dify_add_workflow_version(fake_dify *f, const char *workflow_id) {
    pthread_mutex_lock(&f->mu);
    f->versions = amp_xrealloc(f->versions, (f->nversions + 1) * sizeof *f->versions);
    f->versions[f->nversions++] = amp_xstrdup(workflow_id);
    pthread_mutex_unlock(&f->mu);
}

size_t fake_dify_meta_count(fake_dify *f) {
    pthread_mutex_lock(&f->mu);
    size_t n = f->meta_count;
    pthread_mutex_unlock(&f->mu);
    return n;
}

void fake_dify_push(fake_dify *f, const fake_dify_behaviour *b) {
    beh_node *n = amp_xcalloc(1, sizeof(beh_node));
    beh_copy(&n->b, b);
    pthread_mutex_lock(&f->mu);
    if (f->tail)
        f->tail->next = n;
    else
        f->head = n;
    f->tail = n;
    f->npending++;
    pthread_mutex_unlock(&f->mu);
}

void fake_dify_push_n(fake_dify *f, const fake_dify_behaviour *b, unsigned n) {
    for (unsigned i = 0; i < n; i++)
        fake_dify_push(f, b);
}

void fake_dify_push_status(fake_dify *f, int status) {
    fake_dify_behaviour b;
    memset(&b, 0, sizeof(b));
    b.status = status;
    fake_dify_push(f, &b);
}

size_t fake_dify_pending(fake_dify *f) {
    pthread_mutex_lock(&f->mu);
    size_t n = f->npending;
    pthread_mutex_unlock(&f->mu);
    return n;
}

void fake_dify_set_default(fake_dify *f, const fake_dify_behaviour *b) {
    fake_dify_behaviour copy;
    beh_copy(&copy, b);
    pthread_mutex_lock(&f->mu);
    fake_dify_behaviour old = f->dflt;
    f->dflt = copy;
    pthread_mutex_unlock(&f->mu);
    beh_free(&old);
}

void fake_dify_set_fail_rate(fake_dify *f, double rate, uint64_t seed) {
    pthread_mutex_lock(&f->mu);
    f->fail_rate = rate < 0 ? 0 : rate > 1 ? 1 : rate;
    f->fail_rng = seed;
    pthread_mutex_unlock(&f->mu);
}

void fake_dify_set_recording(fake_dify *f, bool on) {
    pthread_mutex_lock(&f->mu);
    f->recording = on;
    pthread_mutex_unlock(&f->mu);
}

json_t *fake_dify_requests(fake_dify *f) {
    pthread_mutex_lock(&f->mu);
    json_t *copy = json_deep_copy(f->records);
    pthread_mutex_unlock(&f->mu);
    if (!copy)
        abort();
    return copy;
}

/* A counter's value, read under the lock. */
static size_t read_counter(fake_dify *f, const size_t *counter) {
    pthread_mutex_lock(&f->mu);
    size_t n = *counter;
    pthread_mutex_unlock(&f->mu);
    return n;
}

size_t fake_dify_count(fake_dify *f) {
    return read_counter(f, &f->count);
}

size_t fake_dify_arrived(fake_dify *f) {
    return read_counter(f, &f->arrived);
}

size_t fake_dify_connections(fake_dify *f) {
    return read_counter(f, &f->connections);
}

size_t fake_dify_delivered(fake_dify *f) {
    return read_counter(f, &f->delivered);
}

static size_t wait_for(fake_dify *f, const size_t *counter, size_t n, unsigned timeout_ms) {
    struct timespec until = deadline_after(timeout_ms);
    pthread_mutex_lock(&f->mu);
    while (*counter < n && !f->stopping) {
        if (pthread_cond_timedwait(&f->changed, &f->mu, &until) == ETIMEDOUT)
            break;
    }
    size_t got = *counter;
    pthread_mutex_unlock(&f->mu);
    return got;
}

size_t fake_dify_wait_delivered(fake_dify *f, size_t n, unsigned timeout_ms) {
    return wait_for(f, &f->delivered, n, timeout_ms);
}

size_t fake_dify_wait_count(fake_dify *f, size_t n, unsigned timeout_ms) {
    return wait_for(f, &f->count, n, timeout_ms);
}

size_t fake_dify_wait_arrived(fake_dify *f, size_t n, unsigned timeout_ms) {
    return wait_for(f, &f->arrived, n, timeout_ms);
}

void fake_dify_reset(fake_dify *f) {
    pthread_mutex_lock(&f->mu);
    /* Requests in flight hold their own reference to their record. */
    json_t *old = f->records;
    f->records = json_array();
    if (!f->records)
        abort();
    f->count = 0;
    f->arrived = 0;
    f->delivered = 0;
    /* Records live elsewhere only through in-flight requests' references,
     * which are also dropped under this lock. */
    json_decref(old);
    pthread_mutex_unlock(&f->mu);
}
