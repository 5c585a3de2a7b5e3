/*
 * mapping — from a request body to Dify requests.
 *
 *   decode   body bytes -> array of validated events (single object, array,
 *            or {"events":[...]} including the Amplitude HTTP V2 body)
 *   mapper   the compiled "apps" and "routes" sections of the config:
 *            filters, field mappings with transforms, request templates.
 *            Compiled once at config load; applying it parses nothing.
 *
 * Threading: decode is reentrant. An amp_mapper is immutable after
 * amp_mapper_compile and may be shared by any number of threads.
 */
#ifndef AMP_MAPPING_H
#define AMP_MAPPING_H

#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>

#include "../base/errs.h"
#include "../json/schema.h"

/* ---- decode ---------------------------------------------------------- */

typedef enum {
    AMP_DECODE_OK,
    AMP_DECODE_INVALID_JSON,  /* -> 400 invalid_json, detail has line and column */
    AMP_DECODE_INVALID_EVENT, /* -> 400 invalid_event, detail names the event and field */
} amp_decode_result;

/* Parse and validate a whole body. On AMP_DECODE_OK *events is a new JSON
 * array of event objects (caller owns). Otherwise *events is NULL and detail
 * holds a human-readable reason ("line 1, column 17: ..." or
 * "events[2]: needs user_id or device_id"). */
amp_decode_result amp_map_decode_body(const char *body, size_t len, json_t **events, char *detail,
                                      size_t detail_len);

/* One decoded event checked as amp_map_decode_body checks each (idx names
 * it in detail): 0, or -1 with detail, *field (static: the field at fault,
 * "event" for the event as a whole) and *missing (the field is absent
 * rather than invalid). For answers that list bad events by field, as
 * Amplitude's HTTP V2 API does. */
int amp_map_check_event(const json_t *ev, size_t idx, char *detail, size_t detail_len,
                        const char **field, bool *missing);

/* Dedupe key of an event: insert_id, else $insert_id, else uuid (non-empty
 * strings only). Borrowed from the event, or NULL. */
const char *amp_map_dedupe_key(const json_t *event);

/* ---- time ------------------------------------------------------------ */

/* Parse a calendar time. strict: Amplitude's event_time only —
 * "YYYY-MM-DD HH:MM:SS" with no fraction, or 3 or 6 fraction digits, UTC.
 * Not strict: also 'T' as separator, 1-9 fraction digits, and a trailing
 * "Z" or "+HH:MM"/"-HH:MM". 0 and *ms (Unix epoch milliseconds) on success. */
int amp_map_time_parse(const char *s, size_t len, bool strict, int64_t *ms);
/* RFC 3339 UTC with milliseconds, "2026-11-21T10:15:42.123Z". buf must
 * hold 25 bytes. -1 when the year is outside 0000-9999. */
int amp_map_time_format(int64_t ms, char *buf, size_t len);

/* ---- apps ------------------------------------------------------------ */

typedef enum {
    AMP_ENDPOINT_CHAT,       /* POST {base}/chat-messages */
    AMP_ENDPOINT_COMPLETION, /* POST {base}/completion-messages */
    AMP_ENDPOINT_WORKFLOW,   /* POST {base}/workflows/run */
} amp_endpoint;

/* "chat-messages", "completion-messages", "workflows/run" */
const char *amp_map_endpoint_path(amp_endpoint e);

/* The variable an app reads its key from when it names neither
 * api_key_env nor api_key_file: the default Dify app's key. */
#define AMP_DEFAULT_API_KEY_ENV "DIFY_API_KEY"

/* One entry of "apps", read-only, owned by the mapper. */
/* The destination of jobs sent back to Amplitude (reports, the SDK tee):
 * never an app of the config. */
#define AMP_MAP_AMPLITUDE_APP "@amplitude"

/* A route's or app's "report": after each of its deliveries reaches its
 * final state, an Amplitude event is sent back (forward/report.c). */
#define AMP_MAP_REPORT_EVENT_TYPE "dify_response"
typedef struct amp_map_props amp_map_props; /* compiled "properties" templates */
typedef struct amp_map_report {
    char *event_type;      /* the reported event's event_type */
    unsigned answer_chars; /* characters of Dify's answer kept, 0..4096 */
    amp_map_props *props;  /* NULL: the default event properties */
} amp_map_report;

/* The report's event_properties: each "properties" template rendered over
 * fields (borrowed: the delivery's result fields, the source event under
 * "event"). A template that is one lone {{field}} keeps the field's JSON
 * type (a number stays a number; missing: null, left out); any other
 * renders as a string. NULL when spec has no "properties". Caller owns. */
json_t *amp_map_report_properties(const amp_map_report *spec, const json_t *fields);

typedef struct amp_app {
    const char *name;
    const char *api_key_env;  /* NULL when api_key_file is used; see above */
    const char *api_key_file; /* NULL when api_key_env is used */
    amp_endpoint endpoint;
    bool streaming;      /* response_mode "streaming" */
    double rate_per_sec; /* 0 = unlimited */
    unsigned burst;
    unsigned max_in_flight;
    const char *workflow_id; /* a published version to run (workflow: POST
                                {base}/workflows/{id}/run; chat: the chatflow body's
                                "workflow_id"), or NULL for the latest */
    amp_map_report *report;  /* the app's "report", or NULL (a route's overrides it) */
} amp_app;

/* The path an app posts to under its base URL: its endpoint's, or
 * "workflows/<workflow_id>/run" for a workflow app pinned to a version.
 * Caller owns. */
char *amp_map_app_path(const amp_app *app);

/* The keys of one app (static table, ended by a NULL key), read into an
 * amp_app; amp_config_diff compares apps with it. */
const amp_json_schema_row *amp_map_app_schema(void);

/* What the config's "apps" and "routes" must be, for the error wording. */
#define AMP_MAP_APPS_EXPECT                                                                        \
    "an object of Dify apps, e.g. {\"support\": {\"api_key_env\": \"DIFY_API_KEY\"}}"
#define AMP_MAP_ROUTES_EXPECT "an array of routes (it may be empty)"

/* ---- mapper ---------------------------------------------------------- */

typedef struct amp_mapper amp_mapper;

/* Compile the "apps" object and "routes" array of a config (borrowed).
 * Every problem is appended to errs with its JSON path
 * ("routes[1].map[0].transform: unknown transform 'upper'; expected one of
 * ..."); returns NULL when there was any. */
amp_mapper *amp_mapper_compile(const json_t *apps, const json_t *routes, amp_errs *errs);
void amp_mapper_destroy(amp_mapper *m); /* accepts NULL */

/* The report of the route named route_name, else of the app named
 * app_name (a route's report overrides its app's), or NULL when neither
 * has one. Borrowed from m. */
const amp_map_report *amp_mapper_report(const amp_mapper *m, const char *route_name,
                                        const char *app_name);
/* Whether any route or app has a report. */
bool amp_mapper_any_report(const amp_mapper *m);

size_t amp_mapper_app_count(const amp_mapper *m);
const amp_app *amp_mapper_app(const amp_mapper *m, size_t i); /* borrowed */

/* Check app i's routes against what Dify says about the app: mode (GET
 * {base}/info "mode": completion, chat, agent-chat, advanced-chat, workflow,
 * agent) and form (GET {base}/parameters "user_input_form", each item
 * {"<type>": {"variable", "required", "options", "max_length", ...}}), both
 * borrowed; mode may be NULL (not known), form may be NULL (not known).
 * Appends to errs, with the JSON path of the config it is about: an
 * endpoint that does not fit the mode (apps.<name>.endpoint), a streaming
 * only app set to blocking, a mapped inputs key the app does not have
 * (routes[i].map[j].target), a required variable no mapping provides
 * (routes[i].map), and a constant ("value") that is not among a select's
 * options or is longer than max_length (routes[i].map[j].value). */
void amp_mapper_check_app(const amp_mapper *m, size_t i, const char *mode, const json_t *form,
                          amp_errs *errs);

/* One Dify request produced by a route. Everything is borrowed and valid
 * only during the emit callback; json_incref(body) to keep it. */
typedef struct amp_map_request {
    const char *route;
    const amp_app *app;
    const char *user;     /* the body's "user" */
    bool per_user;        /* route has "conversation": "per_user" */
    json_t *body;         /* {"inputs","query"(chat/completion),"user","response_mode"} */
    const json_t *source; /* the event, when the route or its app has a report (its
                             user_id, device_id and fields go into the report); else NULL */
} amp_map_request;

typedef void (*amp_map_emit_fn)(void *ctx, const amp_map_request *req);
/* Called for each route that did not produce a request, with the reason
 * ("filter all[0]: event_type equals "X" is false"). */
typedef void (*amp_map_explain_fn)(void *ctx, const char *route, const char *reason);

/* Apply every route to one event (borrowed). Returns the number of requests
 * emitted (0 = filtered), or -1 when a route declares the event invalid (a
 * "required" field missing): detail says which, and callers must reject the
 * whole HTTP request. explain may be NULL. */
int amp_mapper_apply(const amp_mapper *m, const json_t *event, amp_map_emit_fn emit, void *ctx,
                     amp_map_explain_fn explain, void *explain_ctx, char *detail,
                     size_t detail_len);

#endif
