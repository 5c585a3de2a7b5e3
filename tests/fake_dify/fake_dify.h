/*
 * fake_dify — an in-process stand-in for Dify's Service API, for end-to-end
 * tests and benchmarks. A real HTTP server on 127.0.0.1 (libmicrohttpd, one
 * thread per connection so an answer may be delayed) that answers
 *
 *     POST [/v1]/chat-messages        ChatCompletionResponse / SSE
 *     POST [/v1]/completion-messages  CompletionResponse / SSE
 *     POST [/v1]/workflows/run        WorkflowBlockingResponse / SSE
 *     POST [/v1]/workflows/{id}/run   the same, for a published version
 *                                     (fake_dify_add_workflow_version)
 *     GET  [/v1]/info                 AppInfoResponse (mode per key)
 *     GET  [/v1]/parameters           AppParametersResponse (user_input_form)
 *     GET  [/v1]/workflow/{run}/events?user=U   the run's stream, resumed
 *     GET  [/v1]/workflows/run/{run}  WorkflowRunDetailResponse
 *
 * with the bodies and error envelopes ({"code","message","status"}) of
 * shared/dify/openapi_service.json. It checks "Authorization: Bearer <key>"
 * (one key per app: fake_dify_add_key accepts more than the first),
 * the required body fields, and conversation ids (an id it never issued is
 * 404 "Conversation Not Exists.").
 *
 * Tests script it: each request to an API endpoint takes the next behaviour
 * from a FIFO (status, Retry-After, delay, dropped connection, SSE chunking,
 * in-stream error, cut stream, failed workflow); an empty FIFO means the
 * default behaviour (success, plus the optional global delay and fail
 * rate). Every request is recorded and can be read back as JSON, with the
 * number of the connection it came on (keep-alive shows as one number).
 * Workflow runs (and chatflow runs: keys whose mode is "advanced-chat") are
 * kept, so a stream dropped after N events (stream_drop_after) can be
 * resumed from /workflow/{run}/events or read from /workflows/run/{run}, as
 * Dify keeps running what it started. /info and /parameters are counted
 * apart (fake_dify_meta_count) and not recorded with the API requests.
 *
 * Threading: every function is safe from any thread while the server runs;
 * fake_dify_stop must not race with other calls on the same instance.
 */
#ifndef FAKE_DIFY_H
#define FAKE_DIFY_H

#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef struct fake_dify fake_dify;

/* One scripted answer. Zero-initialise and set what matters; the strings are
 * copied by fake_dify_push. */
typedef struct fake_dify_behaviour {
    /* HTTP status. 0 or 200: a success (after the normal auth, body and
     * conversation checks). Anything else is answered with Dify's envelope,
     * with a realistic code and message for that status unless given. */
    int status;
    const char *code;        /* NULL: default for status ("too_many_requests", ...) */
    const char *message;     /* NULL: default for status */
    const char *retry_after; /* Retry-After header value, or NULL for none */
    /* Error statuses: send this text as text/html instead of the envelope,
     * as a proxy in front of Dify would (e.g. a 502 page). */
    const char *html_body;
    unsigned delay_ms; /* wait this long before answering */
    bool drop;         /* close the connection without any answer */
    /* Streaming answers (request "response_mode":"streaming"): bytes per
     * write; 0 means one write per SSE frame. */
    size_t stream_chunk;
    unsigned stream_pause_ms; /* pause between writes, so chunks travel apart */
    /* A 200 stream that ends with an `error` event instead of finishing.
     * The event carries status (when not 0/200, else 500), code and message. */
    bool sse_error;
    /* A 200 stream that stops before its closing event (message_end,
     * workflow_finished), as when Dify's worker dies mid-answer. */
    bool sse_unfinished;
    /* Workflows: 200 with data.status "failed" and data.error = message (or a
     * default). Ignored by chat and completion endpoints. */
    bool workflow_failed;
    const char *answer; /* NULL: "Echo: <query>" (workflows: outputs.result) */
    /* Streams: close the connection (no closing chunk) after this many SSE
     * events; the run goes on and finishes inside the fake. 0: never. */
    unsigned stream_drop_after;
    /* The run stays "running" this long after the POST: a resume waits for
     * it, a run detail says "running" meanwhile. */
    unsigned run_ms;
    /* Workflows and chatflows: the run reaches a Human Input node and
     * pauses (human_input_required, then workflow_paused; a blocking
     * workflow answers data.status "paused"). */
    bool human_input;
    /* Answer this request as usual, then reject its key (a revoked key)
     * until fake_dify_add_key gives it back. */
    bool revoke_key;
} fake_dify_behaviour;

/* Start listening on 127.0.0.1:port (0 = an ephemeral port). api_key is the
 * only accepted bearer token (copied). NULL on failure (reason on stderr).
 * Caller owns the result; release with fake_dify_stop. */
fake_dify *fake_dify_start(uint16_t port, const char *api_key);
/* Close every connection, join the threads, free everything. Accepts NULL. */
void fake_dify_stop(fake_dify *f);

uint16_t fake_dify_port(const fake_dify *f);

/* Accept "Bearer <api_key>" too (copied): Dify has one key per app. */
void fake_dify_add_key(fake_dify *f, const char *api_key);

/* What /info and /parameters answer for api_key (all copied): mode
 * ("chat", "completion", "agent-chat", "advanced-chat", "workflow",
 * "agent") and the user_input_form array as JSON text (NULL: []). A key
 * without this answers mode "chat" and an empty form. */
void fake_dify_set_app(fake_dify *f, const char *api_key, const char *mode,
                       const char *user_input_form_json);
/* A published workflow version that /workflows/{id}/run and a chatflow's
 * "workflow_id" accept (copied); any other id is 404 "Workflow not found". */
void fake_dify_add_workflow_version(fake_dify *f, const char *workflow_id);
/* GET /info and /parameters requests answered so far. */
size_t fake_dify_meta_count(fake_dify *f);

/* Append a scripted behaviour (copied) to the FIFO. */
void fake_dify_push(fake_dify *f, const fake_dify_behaviour *b);
/* Push the same behaviour n times. */
void fake_dify_push_n(fake_dify *f, const fake_dify_behaviour *b, unsigned n);
/* Shorthand: push an error status with its default code and message. */
void fake_dify_push_status(fake_dify *f, int status);
/* Behaviours not yet consumed. */
size_t fake_dify_pending(fake_dify *f);

/* Defaults when the FIFO is empty (copied): start with success, no delay. */
void fake_dify_set_default(fake_dify *f, const fake_dify_behaviour *b);
/* When the FIFO is empty, answer 500 with this probability (0..1), drawn
 * from a generator seeded with seed, so a run is reproducible. */
void fake_dify_set_fail_rate(fake_dify *f, double rate, uint64_t seed);
/* Keep per-request details (default true). Benchmarks turn it off so that
 * memory stays flat; counters are kept either way. */
void fake_dify_set_recording(fake_dify *f, bool on);

/* Snapshot of the recorded requests in the order they were answered (a
 * scripted delay answers later); caller owns. Each is
 *   {"seq", "method", "path", "authorization" (or null), "trace_id" (or
 *    null), "content_type" (or null), "user_agent" (or null), "connection"
 *    (number of the TCP connection, from 1), "body" (parsed JSON or null),
 *    "raw_body", "arrived_ms" (wall clock), "status" (the HTTP status
 *    answered; 0 for a dropped connection), "delivered" (bool: a success
 *    the product must count as delivered), "streaming" (bool),
 *    "response" (the bytes sent, or null)}                               */
json_t *fake_dify_requests(fake_dify *f);

size_t fake_dify_count(fake_dify *f);       /* API requests answered or dropped */
size_t fake_dify_arrived(fake_dify *f);     /* API requests received (before any delay) */
size_t fake_dify_connections(fake_dify *f); /* TCP connections accepted so far */
size_t fake_dify_delivered(fake_dify *f);   /* of which successful deliveries */
/* Wait until at least n successful deliveries happened or timeout_ms passed;
 * returns the number reached. */
size_t fake_dify_wait_delivered(fake_dify *f, size_t n, unsigned timeout_ms);
/* Wait until at least n API requests were answered (any status). */
size_t fake_dify_wait_count(fake_dify *f, size_t n, unsigned timeout_ms);
/* Wait until at least n API requests arrived (answered or not yet). */
size_t fake_dify_wait_arrived(fake_dify *f, size_t n, unsigned timeout_ms);

/* Forget recorded requests and counters (scripted behaviours stay; the
 * connection count goes on, so connection numbers stay unique). */
void fake_dify_reset(fake_dify *f);

#endif
