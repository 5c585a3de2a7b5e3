/*
 * Self-test of the fake Dify: the end-to-end tests trust it, so it is held
 * to the shapes of shared/dify/openapi_service.json here, with libcurl.
 */
#include <check.h>
#include <curl/curl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../fake_dify/fake_dify.h"
#include "harness.h"
#include "../check_run.h"

#define KEY "app-fake-self-test"

static fake_dify *start(void) {
    fake_dify *f = fake_dify_start(0, KEY);
    ck_assert_ptr_nonnull(f);
    ck_assert_uint_gt(fake_dify_port(f), 0);
    return f;
}

/* POST JSON to the fake with a bearer key (NULL: no Authorization). */
static h_resp *post_to(fake_dify *f, const char *path, const char *body, const char *key) {
    char auth[256];
    const char *headers[3] = {NULL, NULL, NULL};
    if (key) {
        snprintf(auth, sizeof(auth), "Authorization: Bearer %s", key);
        headers[0] = auth;
    }
    h_req req = {.method = "POST", .path = path, .body = body, .headers = headers};
    return h_request_port(fake_dify_port(f), &req);
}

static const char *jstr(const json_t *o, const char *key) {
    return json_string_value(json_object_get(o, key));
}

static void assert_uuid(const char *s) {
    ck_assert_ptr_nonnull(s);
    ck_assert_uint_eq(strlen(s), 36);
    for (int i = 0; i < 36; i++) {
        if (i == 8 || i == 13 || i == 18 || i == 23)
            ck_assert_int_eq(s[i], '-');
        else
            ck_assert_msg(strchr("0123456789abcdef", s[i]), "not hex in %s", s);
    }
}

static void assert_envelope(const h_resp *r, int status, const char *code, const char *message) {
    ck_assert_int_eq(r->status, status);
    ck_assert_ptr_nonnull(r->json);
    ck_assert_str_eq(jstr(r->json, "code"), code);
    if (message)
        ck_assert_str_eq(jstr(r->json, "message"), message);
    ck_assert_int_eq(json_integer_value(json_object_get(r->json, "status")), status);
    ck_assert_uint_eq(json_object_size(r->json), 3);
}

/* The data: frames of an SSE body, in order (pings as {"event":"ping"}). */
static json_t *sse_events(const char *body) {
    json_t *out = json_array();
    const char *p = body;
    while (*p) {
        const char *end = strstr(p, "\n\n");
        ck_assert_msg(end != NULL, "unterminated SSE frame: %s", p);
        if (strncmp(p, "data: ", 6) == 0) {
            json_error_t err;
            json_t *ev = json_loadb(p + 6, (size_t)(end - p - 6), 0, &err);
            ck_assert_msg(ev != NULL, "bad SSE JSON: %s", err.text);
            json_array_append_new(out, ev);
        } else {
            ck_assert_int_eq(strncmp(p, "event: ping", (size_t)(end - p)), 0);
            json_array_append_new(out, json_pack("{s:s}", "event", "ping"));
        }
        p = end + 2;
    }
    return out;
}

START_TEST(chat_blocking_success) {
    fake_dify *f = start();
    char auth[] = "Authorization: Bearer " KEY;
    const char *headers[] = {auth, "X-Trace-Id: ins-42", NULL};
    h_req req = {.path = "/v1/chat-messages",
                 .body = "{\"inputs\":{\"plan\":\"pro\"},\"query\":\"signup by u1\","
                         "\"user\":\"u1\",\"response_mode\":\"blocking\"}",
                 .headers = headers};
    h_resp *r = h_request_port(fake_dify_port(f), &req);
    ck_assert_int_eq(r->status, 200);
    ck_assert_str_eq(h_resp_header(r, "Content-Type"), "application/json");
    json_t *j = r->json;
    ck_assert_ptr_nonnull(j);
    ck_assert_str_eq(jstr(j, "event"), "message");
    ck_assert_str_eq(jstr(j, "mode"), "chat");
    ck_assert_str_eq(jstr(j, "answer"), "Echo: signup by u1");
    assert_uuid(jstr(j, "task_id"));
    assert_uuid(jstr(j, "id"));
    assert_uuid(jstr(j, "message_id"));
    assert_uuid(jstr(j, "conversation_id"));
    ck_assert(json_is_integer(json_object_get(j, "created_at")));
    json_t *usage = json_object_get(json_object_get(j, "metadata"), "usage");
    json_int_t pt = json_integer_value(json_object_get(usage, "prompt_tokens"));
    json_int_t ct = json_integer_value(json_object_get(usage, "completion_tokens"));
    ck_assert_int_gt(pt, 0);
    ck_assert_int_gt(ct, 0);
    ck_assert_int_eq(json_integer_value(json_object_get(usage, "total_tokens")), pt + ct);
    ck_assert_str_eq(jstr(usage, "currency"), "USD");
    ck_assert(
        json_is_array(json_object_get(json_object_get(j, "metadata"), "retriever_resources")));

    ck_assert_uint_eq(fake_dify_wait_delivered(f, 1, 2000), 1);
    ck_assert_uint_eq(fake_dify_count(f), 1);
    json_t *reqs = fake_dify_requests(f);
    ck_assert_uint_eq(json_array_size(reqs), 1);
    json_t *rec = json_array_get(reqs, 0);
    ck_assert_str_eq(jstr(rec, "method"), "POST");
    ck_assert_str_eq(jstr(rec, "path"), "/v1/chat-messages");
    ck_assert_str_eq(jstr(rec, "authorization"), "Bearer " KEY);
    ck_assert_str_eq(jstr(rec, "trace_id"), "ins-42");
    ck_assert_str_eq(jstr(rec, "content_type"), "application/json");
    ck_assert_str_eq(jstr(json_object_get(rec, "body"), "user"), "u1");
    ck_assert_str_eq(jstr(json_object_get(json_object_get(rec, "body"), "inputs"), "plan"), "pro");
    ck_assert_int_eq(json_integer_value(json_object_get(rec, "status")), 200);
    ck_assert(json_is_true(json_object_get(rec, "delivered")));
    ck_assert_str_eq(jstr(rec, "response"), r->body);
    json_decref(reqs);
    h_resp_free(r);
    fake_dify_stop(f);
}
END_TEST

START_TEST(completion_and_workflow_blocking) {
    fake_dify *f = start();
    /* Without the /v1 prefix too. */
    h_resp *r =
        post_to(f, "/completion-messages", "{\"inputs\":{\"a\":\"b\"},\"user\":\"u\"}", KEY);
    ck_assert_int_eq(r->status, 200);
    ck_assert_str_eq(jstr(r->json, "mode"), "completion");
    ck_assert_ptr_null(json_object_get(r->json, "conversation_id"));
    ck_assert_str_eq(jstr(r->json, "answer"), "Echo: {\"a\":\"b\"}");
    h_resp_free(r);

    r = post_to(f, "/v1/workflows/run", "{\"inputs\":{\"q\":1},\"user\":\"u\"}", KEY);
    ck_assert_int_eq(r->status, 200);
    assert_uuid(jstr(r->json, "task_id"));
    assert_uuid(jstr(r->json, "workflow_run_id"));
    json_t *d = json_object_get(r->json, "data");
    ck_assert_str_eq(jstr(d, "id"), jstr(r->json, "workflow_run_id"));
    assert_uuid(jstr(d, "workflow_id"));
    ck_assert_str_eq(jstr(d, "status"), "succeeded");
    ck_assert(json_is_null(json_object_get(d, "error")));
    ck_assert_str_eq(jstr(json_object_get(d, "outputs"), "result"), "Echo: {\"q\":1}");
    ck_assert(json_is_number(json_object_get(d, "elapsed_time")));
    ck_assert(json_is_integer(json_object_get(d, "total_tokens")));
    ck_assert(json_is_integer(json_object_get(d, "total_steps")));
    ck_assert(json_is_integer(json_object_get(d, "created_at")));
    ck_assert(json_is_integer(json_object_get(d, "finished_at")));
    h_resp_free(r);

    fake_dify_behaviour b = {.workflow_failed = true, .message = "boom"};
    fake_dify_push(f, &b);
    r = post_to(f, "/v1/workflows/run", "{\"inputs\":{},\"user\":\"u\"}", KEY);
    ck_assert_int_eq(r->status, 200);
    d = json_object_get(r->json, "data");
    ck_assert_str_eq(jstr(d, "status"), "failed");
    ck_assert_str_eq(jstr(d, "error"), "boom");
    h_resp_free(r);

    ck_assert_uint_eq(fake_dify_wait_count(f, 3, 2000), 3);
    h_sleep_ms(100);
    ck_assert_uint_eq(fake_dify_delivered(f), 2); /* a failed run is no delivery */
    fake_dify_stop(f);
}
END_TEST

START_TEST(unauthorized) {
    fake_dify *f = start();
    const char *body = "{\"inputs\":{},\"query\":\"q\",\"user\":\"u\"}";
    h_resp *r = post_to(f, "/v1/chat-messages", body, "wrong-key");
    assert_envelope(r, 401, "unauthorized", "Access token is invalid");
    h_resp_free(r);
    r = post_to(f, "/v1/chat-messages", body, NULL);
    assert_envelope(r, 401, "unauthorized", "Access token is invalid");
    h_resp_free(r);
    ck_assert_uint_eq(fake_dify_count(f), 2);
    ck_assert_uint_eq(fake_dify_delivered(f), 0);
    fake_dify_stop(f);
}
END_TEST

START_TEST(invalid_bodies) {
    fake_dify *f = start();
    static const char *const cases[][2] = {
        {"/v1/chat-messages", "{\"inputs\":{},\"user\":\"u\"}"},                 /* no query */
        {"/v1/chat-messages", "{\"inputs\":{},\"query\":\"q\"}"},                /* no user */
        {"/v1/chat-messages", "{\"inputs\":[],\"query\":\"q\",\"user\":\"u\"}"}, /* inputs */
        {"/v1/completion-messages", "{\"inputs\":{}}"},
        {"/v1/workflows/run", "{\"user\":\"u\"}"},
        {"/v1/workflows/run", "not json"},
        {"/v1/chat-messages",
         "{\"inputs\":{},\"query\":\"q\",\"user\":\"u\",\"response_mode\":\"fast\"}"},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        h_resp *r = post_to(f, cases[i][0], cases[i][1], KEY);
        assert_envelope(r, 400, "invalid_param", NULL);
        h_resp_free(r);
    }
    const char *headers[] = {"Authorization: Bearer " KEY, "Content-Type: text/plain", NULL};
    h_req req = {
        .path = "/v1/workflows/run", .body = "{\"inputs\":{},\"user\":\"u\"}", .headers = headers};
    h_resp *r = h_request_port(fake_dify_port(f), &req);
    assert_envelope(r, 415, "unsupported_media_type", NULL);
    h_resp_free(r);

    r = post_to(f, "/v1/nope", "{}", KEY);
    ck_assert_int_eq(r->status, 404);
    h_resp_free(r);
    h_req get = {.method = "GET", .path = "/v1/chat-messages"};
    r = h_request_port(fake_dify_port(f), &get);
    ck_assert_int_eq(r->status, 405);
    ck_assert_ptr_nonnull(strstr(h_resp_header(r, "Allow"), "POST"));
    h_resp_free(r);
    ck_assert_uint_eq(fake_dify_delivered(f), 0);
    fake_dify_stop(f);
}
END_TEST

START_TEST(scripted_statuses) {
    fake_dify *f = start();
    const char *body = "{\"inputs\":{},\"query\":\"q\",\"user\":\"u\"}";
    fake_dify_push_status(f, 500);
    fake_dify_behaviour b429 = {.status = 429, .retry_after = "2"};
    fake_dify_push(f, &b429);
    fake_dify_behaviour b400 = {.status = 400,
                                .code = "invalid_param",
                                .message = "Too many requests for this app, retry later"};
    fake_dify_push(f, &b400);
    fake_dify_behaviour b502 = {.status = 502, .html_body = "<html>Bad Gateway</html>"};
    fake_dify_push(f, &b502);
    ck_assert_uint_eq(fake_dify_pending(f), 4);

    h_resp *r = post_to(f, "/v1/chat-messages", body, KEY);
    assert_envelope(r, 500, "internal_server_error", NULL);
    h_resp_free(r);
    r = post_to(f, "/v1/chat-messages", body, KEY);
    assert_envelope(r, 429, "too_many_requests", "Too many requests. Please try again later.");
    ck_assert_str_eq(h_resp_header(r, "Retry-After"), "2");
    h_resp_free(r);
    r = post_to(f, "/v1/chat-messages", body, KEY);
    assert_envelope(r, 400, "invalid_param", "Too many requests for this app, retry later");
    h_resp_free(r);
    r = post_to(f, "/v1/chat-messages", body, KEY);
    ck_assert_int_eq(r->status, 502);
    ck_assert_str_eq(r->body, "<html>Bad Gateway</html>");
    ck_assert_ptr_null(r->json);
    h_resp_free(r);
    r = post_to(f, "/v1/chat-messages", body, KEY);
    ck_assert_int_eq(r->status, 200);
    h_resp_free(r);

    ck_assert_uint_eq(fake_dify_pending(f), 0);
    ck_assert_uint_eq(fake_dify_wait_delivered(f, 1, 2000), 1);
    ck_assert_uint_eq(fake_dify_count(f), 5);
    json_t *reqs = fake_dify_requests(f);
    static const int want[] = {500, 429, 400, 502, 200};
    for (size_t i = 0; i < 5; i++)
        ck_assert_int_eq(json_integer_value(json_object_get(json_array_get(reqs, i), "status")),
                         want[i]);
    json_decref(reqs);
    fake_dify_stop(f);
}
END_TEST

START_TEST(drop_and_delay) {
    fake_dify *f = start();
    const char *body = "{\"inputs\":{},\"query\":\"q\",\"user\":\"u\"}";
    fake_dify_behaviour drop = {.drop = true};
    fake_dify_push(f, &drop);
    h_resp *r = post_to(f, "/v1/chat-messages", body, KEY);
    ck_assert_int_eq(r->status, 0);
    ck_assert_ptr_nonnull(r->error);
    h_resp_free(r);

    fake_dify_behaviour slow = {.delay_ms = 300};
    fake_dify_push(f, &slow);
    int64_t t0 = h_mono_ms();
    r = post_to(f, "/v1/chat-messages", body, KEY);
    int64_t took = h_mono_ms() - t0;
    ck_assert_int_eq(r->status, 200);
    ck_assert_int_ge(took, 290);
    h_resp_free(r);

    /* A delay longer than the client waits: the client gives up. */
    fake_dify_behaviour stuck = {.delay_ms = 5000};
    fake_dify_push(f, &stuck);
    h_req req = {.path = "/v1/chat-messages",
                 .body = body,
                 .headers = (const char *const[]){"Authorization: Bearer " KEY, NULL},
                 .timeout_ms = 200};
    r = h_request_port(fake_dify_port(f), &req);
    ck_assert_int_eq(r->status, 0);
    h_resp_free(r);

    ck_assert_uint_eq(fake_dify_wait_delivered(f, 1, 2000), 1);
    json_t *reqs = fake_dify_requests(f);
    ck_assert_int_eq(json_integer_value(json_object_get(json_array_get(reqs, 0), "status")), 0);
    json_decref(reqs);
    /* Stopping does not wait for the 5 s delay in progress. */
    t0 = h_mono_ms();
    fake_dify_stop(f);
    ck_assert_int_lt(h_mono_ms() - t0, 3000);
}
END_TEST

START_TEST(conversations) {
    fake_dify *f = start();
    h_resp *r =
        post_to(f, "/v1/chat-messages",
                "{\"inputs\":{},\"query\":\"q\",\"user\":\"u1\",\"conversation_id\":\"\"}", KEY);
    ck_assert_int_eq(r->status, 200);
    char conv[64];
    snprintf(conv, sizeof(conv), "%s", jstr(r->json, "conversation_id"));
    assert_uuid(conv);
    h_resp_free(r);

    char body[256];
    snprintf(body, sizeof(body),
             "{\"inputs\":{},\"query\":\"q2\",\"user\":\"u1\",\"conversation_id\":\"%s\"}", conv);
    r = post_to(f, "/v1/chat-messages", body, KEY);
    ck_assert_int_eq(r->status, 200);
    ck_assert_str_eq(jstr(r->json, "conversation_id"), conv);
    h_resp_free(r);

    /* Another user's conversation is as unknown as an invented one. */
    snprintf(body, sizeof(body),
             "{\"inputs\":{},\"query\":\"q\",\"user\":\"u2\",\"conversation_id\":\"%s\"}", conv);
    r = post_to(f, "/v1/chat-messages", body, KEY);
    assert_envelope(r, 404, "not_found", "Conversation Not Exists.");
    h_resp_free(r);
    r = post_to(f, "/v1/chat-messages",
                "{\"inputs\":{},\"query\":\"q\",\"user\":\"u1\",\"conversation_id\":"
                "\"45701982-8118-4bc5-8e9b-64562b4555f2\"}",
                KEY);
    assert_envelope(r, 404, "not_found", "Conversation Not Exists.");
    h_resp_free(r);

    /* Without conversation_id: a new one each time. */
    r = post_to(f, "/v1/chat-messages", "{\"inputs\":{},\"query\":\"q\",\"user\":\"u1\"}", KEY);
    ck_assert_int_eq(r->status, 200);
    ck_assert_str_ne(jstr(r->json, "conversation_id"), conv);
    h_resp_free(r);
    fake_dify_stop(f);
}
END_TEST

/* The stream arrives in pieces of at most `chunk` bytes and parses to the
 * whole answer: message chunks, a ping, message_end with usage. */
static void check_stream(size_t chunk) {
    fake_dify *f = start();
    fake_dify_behaviour b = {.stream_chunk = chunk, .stream_pause_ms = 1};
    fake_dify_push(f, &b);
    h_resp *r = post_to(f, "/v1/chat-messages",
                        "{\"inputs\":{},\"query\":\"one two three four\",\"user\":\"u\","
                        "\"response_mode\":\"streaming\"}",
                        KEY);
    ck_assert_int_eq(r->status, 200);
    ck_assert_str_eq(h_resp_header(r, "Content-Type"), "text/event-stream");
    /* With a pause between writes most pieces travel apart. */
    ck_assert_uint_ge(r->pieces, r->len / chunk / 4);

    json_t *evs = sse_events(r->body);
    char answer[256] = "";
    bool ping = false, end = false;
    const char *conv = NULL;
    for (size_t i = 0; i < json_array_size(evs); i++) {
        json_t *ev = json_array_get(evs, i);
        const char *name = jstr(ev, "event");
        ck_assert(!end); /* nothing after message_end */
        if (strcmp(name, "message") == 0) {
            strncat(answer, jstr(ev, "answer"), sizeof(answer) - strlen(answer) - 1);
            assert_uuid(jstr(ev, "task_id"));
            assert_uuid(jstr(ev, "message_id"));
            if (!conv)
                conv = jstr(ev, "conversation_id");
            ck_assert_str_eq(jstr(ev, "conversation_id"), conv);
        } else if (strcmp(name, "ping") == 0) {
            ping = true;
        } else {
            ck_assert_str_eq(name, "message_end");
            json_t *usage = json_object_get(json_object_get(ev, "metadata"), "usage");
            ck_assert_int_gt(json_integer_value(json_object_get(usage, "total_tokens")), 0);
            end = true;
        }
    }
    ck_assert(ping);
    ck_assert(end);
    ck_assert_str_eq(answer, "Echo: one two three four");
    json_decref(evs);
    h_resp_free(r);
    ck_assert_uint_eq(fake_dify_wait_delivered(f, 1, 2000), 1);
    fake_dify_stop(f);
}

START_TEST(sse_chunked) {
    static const size_t sizes[] = {1, 3, 7};
    check_stream(sizes[_i]);
}
END_TEST

START_TEST(sse_error_and_workflow_stream) {
    fake_dify *f = start();
    fake_dify_behaviour err = {.sse_error = true,
                               .code = "completion_request_error",
                               .message = "model overloaded",
                               .stream_chunk = 5};
    fake_dify_push(f, &err);
    h_resp *r = post_to(f, "/v1/chat-messages",
                        "{\"inputs\":{},\"query\":\"a b c\",\"user\":\"u\","
                        "\"response_mode\":\"streaming\"}",
                        KEY);
    ck_assert_int_eq(r->status, 200);
    json_t *evs = sse_events(r->body);
    json_t *last = json_array_get(evs, json_array_size(evs) - 1);
    ck_assert_str_eq(jstr(last, "event"), "error");
    ck_assert_str_eq(jstr(last, "code"), "completion_request_error");
    ck_assert_str_eq(jstr(last, "message"), "model overloaded");
    ck_assert_int_eq(json_integer_value(json_object_get(last, "status")), 500);
    for (size_t i = 0; i < json_array_size(evs); i++)
        ck_assert_str_ne(jstr(json_array_get(evs, i), "event"), "message_end");
    json_decref(evs);
    h_resp_free(r);

    r = post_to(f, "/v1/workflows/run",
                "{\"inputs\":{\"x\":\"y\"},\"user\":\"u\",\"response_mode\":\"streaming\"}", KEY);
    ck_assert_int_eq(r->status, 200);
    evs = sse_events(r->body);
    ck_assert_str_eq(jstr(json_array_get(evs, 0), "event"), "workflow_started");
    last = json_array_get(evs, json_array_size(evs) - 1);
    ck_assert_str_eq(jstr(last, "event"), "workflow_finished");
    ck_assert_str_eq(jstr(json_object_get(last, "data"), "status"), "succeeded");
    ck_assert_str_eq(jstr(last, "workflow_run_id"),
                     jstr(json_array_get(evs, 0), "workflow_run_id"));
    json_decref(evs);
    h_resp_free(r);

    fake_dify_behaviour wf = {.workflow_failed = true, .stream_chunk = 2};
    fake_dify_push(f, &wf);
    r = post_to(f, "/v1/workflows/run",
                "{\"inputs\":{},\"user\":\"u\",\"response_mode\":\"streaming\"}", KEY);
    evs = sse_events(r->body);
    last = json_array_get(evs, json_array_size(evs) - 1);
    ck_assert_str_eq(jstr(json_object_get(last, "data"), "status"), "failed");
    ck_assert_ptr_nonnull(jstr(json_object_get(last, "data"), "error"));
    json_decref(evs);
    h_resp_free(r);

    ck_assert_uint_eq(fake_dify_wait_count(f, 3, 2000), 3);
    h_sleep_ms(100);
    ck_assert_uint_eq(fake_dify_delivered(f), 1);
    fake_dify_stop(f);
}
END_TEST

START_TEST(fail_rate_is_reproducible) {
    const char *body = "{\"inputs\":{},\"query\":\"q\",\"user\":\"u\"}";
    char seq[2][41];
    for (int run = 0; run < 2; run++) {
        fake_dify *f = start();
        fake_dify_set_fail_rate(f, 0.5, 1234);
        for (int i = 0; i < 40; i++) {
            h_resp *r = post_to(f, "/v1/chat-messages", body, KEY);
            ck_assert(r->status == 200 || r->status == 500);
            seq[run][i] = r->status == 200 ? 'o' : 'x';
            h_resp_free(r);
        }
        seq[run][40] = '\0';
        fake_dify_stop(f);
    }
    ck_assert_str_eq(seq[0], seq[1]);
    ck_assert_ptr_nonnull(strchr(seq[0], 'o'));
    ck_assert_ptr_nonnull(strchr(seq[0], 'x'));

    fake_dify *f = start();
    fake_dify_set_fail_rate(f, 1.0, 1);
    h_resp *r = post_to(f, "/v1/chat-messages", body, KEY);
    ck_assert_int_eq(r->status, 500);
    h_resp_free(r);
    /* Scripted behaviours win over the fail rate. */
    fake_dify_behaviour ok = {.status = 200};
    fake_dify_push(f, &ok);
    r = post_to(f, "/v1/chat-messages", body, KEY);
    ck_assert_int_eq(r->status, 200);
    h_resp_free(r);
    fake_dify_stop(f);
}
END_TEST

START_TEST(wait_is_bounded_and_reset) {
    fake_dify *f = start();
    int64_t t0 = h_mono_ms();
    ck_assert_uint_eq(fake_dify_wait_delivered(f, 1, 200), 0);
    ck_assert_int_ge(h_mono_ms() - t0, 190);
    h_resp *r =
        post_to(f, "/v1/chat-messages", "{\"inputs\":{},\"query\":\"q\",\"user\":\"u\"}", KEY);
    h_resp_free(r);
    ck_assert_uint_eq(fake_dify_wait_delivered(f, 1, 2000), 1);
    fake_dify_reset(f);
    ck_assert_uint_eq(fake_dify_count(f), 0);
    json_t *reqs = fake_dify_requests(f);
    ck_assert_uint_eq(json_array_size(reqs), 0);
    json_decref(reqs);
    fake_dify_stop(f);
}
END_TEST

/* Many connections at once, each answered after a delay: thread per
 * connection keeps them all in flight together. */
START_TEST(many_concurrent_connections) {
    enum { N = 200 };
    fake_dify *f = start();
    fake_dify_behaviour slow = {.delay_ms = 300};
    fake_dify_set_default(f, &slow);
    CURLM *m = curl_multi_init();
    CURL *hs[N];
    struct curl_slist *hdrs = curl_slist_append(NULL, "Authorization: Bearer " KEY);
    hdrs = curl_slist_append(hdrs, "Content-Type: application/json");
    char url[64];
    snprintf(url, sizeof(url), "http://127.0.0.1:%u/v1/chat-messages", fake_dify_port(f));
    FILE *sink = fopen("/dev/null", "w");
    for (int i = 0; i < N; i++) {
        hs[i] = curl_easy_init();
        curl_easy_setopt(hs[i], CURLOPT_URL, url);
        curl_easy_setopt(hs[i], CURLOPT_NOPROXY, "*");
        curl_easy_setopt(hs[i], CURLOPT_HTTPHEADER, hdrs);
        curl_easy_setopt(hs[i], CURLOPT_POSTFIELDS,
                         "{\"inputs\":{},\"query\":\"q\",\"user\":\"u\"}");
        curl_easy_setopt(hs[i], CURLOPT_WRITEDATA, sink);
        curl_easy_setopt(hs[i], CURLOPT_TIMEOUT_MS, 20000L);
        curl_multi_add_handle(m, hs[i]);
    }
    int64_t t0 = h_mono_ms();
    int running = 1;
    for (int spins = 0; running && spins < 100000; spins++) {
        curl_multi_perform(m, &running);
        curl_multi_poll(m, NULL, 0, 100, NULL);
    }
    int64_t took = h_mono_ms() - t0;
    int ok = 0;
    for (int i = 0; i < N; i++) {
        long st = 0;
        curl_easy_getinfo(hs[i], CURLINFO_RESPONSE_CODE, &st);
        ok += st == 200;
        curl_multi_remove_handle(m, hs[i]);
        curl_easy_cleanup(hs[i]);
    }
    curl_multi_cleanup(m);
    curl_slist_free_all(hdrs);
    fclose(sink);
    ck_assert_int_eq(ok, N);
    /* Serially this would take N * 300 ms. */
    ck_assert_int_lt(took, 10000);
    ck_assert_uint_eq(fake_dify_wait_delivered(f, N, 5000), N);
    fake_dify_stop(f);
}
END_TEST

static Suite *suite(void) {
    Suite *s = suite_create("fake_dify");
    TCase *tc = tcase_create("fake_dify");
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, chat_blocking_success);
    tcase_add_test(tc, completion_and_workflow_blocking);
    tcase_add_test(tc, unauthorized);
    tcase_add_test(tc, invalid_bodies);
    tcase_add_test(tc, scripted_statuses);
    tcase_add_test(tc, drop_and_delay);
    tcase_add_test(tc, conversations);
    tcase_add_loop_test(tc, sse_chunked, 0, 3);
    tcase_add_test(tc, sse_error_and_workflow_stream);
    tcase_add_test(tc, fail_rate_is_reproducible);
    tcase_add_test(tc, wait_is_bounded_and_reset);
    tcase_add_test(tc, many_concurrent_connections);
    suite_add_tcase(s, tc);
    return s;
}

int main(void) {
    return amp_check_run(suite());
}
