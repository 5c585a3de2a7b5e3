/*
 * sdk — POST {sources.sdk.path} (default /2/httpapi): an endpoint shaped
 * like Amplitude's HTTP V2 API, so Amplitude's SDKs (serverUrl) can send
 * here. A source beside the webhook: the same decode checks, routes, dedupe
 * (insert_id) and all-or-nothing storage, with Amplitude's answers, since
 * the SDKs read the JSON body's "code":
 *
 *   200 {"code":200,"events_ingested":N,"payload_size_bytes":B,
 *        "server_upload_time":T}           stored (or duplicates/filtered)
 *   400 {"code":400,"error":"Request missing required field",
 *        "missing_field":"api_key"}         no api_key / no events
 *   400 {"code":400,"error":"Invalid API key: ..."}   a key not configured
 *   400 {"code":400,"error":"Invalid JSON request body"}
 *   400 {"code":400,"error":"...","events_with_invalid_fields":{"time":[3]},
 *        "events_with_missing_fields":{"event_type":[0,2]}}  nothing stored;
 *        the SDK drops those events and sends the others again
 *   413 {"code":413,"error":"Payload too large"}  body or event count over
 *        listen.max_body_bytes / listen.max_events_per_request
 *   503 {"code":503,"error":"..."}         not stored (spool full or failing,
 *        shutting down): the SDK sends again
 *
 * With sources.sdk.tee, every accepted event is also stored as a job sent on
 * to Amplitude (the reports' sink, forward/report.c), in the same batch, so
 * amp2dify can sit in front of Amplitude.
 *
 * Authentication is the request's own api_key, checked against
 * AMP2DIFY_SDK_API_KEYS (a scheme of its own; the webhook's signature is not
 * asked for). The connection is suspended while the spool commits, as for
 * the webhook.
 */
#include <jansson.h>
#include <openssl/crypto.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../base/clock.h"
#include "../base/log.h"
#include "../mapping/mapping.h"
#include "../sources/source.h"
#include "handlers_int.h"

static enum MHD_Result answer(amp_req *r, unsigned status, const char *code_name,
                              json_t *body /* takes ownership */) {
    json_object_set_new(body, "code", json_integer(status));
    r->error = code_name;
    return amp_handlers_reply_json(r, status, body);
}

static enum MHD_Result fail(amp_req *r, unsigned status, const char *code_name, const char *error) {
    return answer(r, status, code_name, json_pack("{s:s}", "error", error));
}

static enum MHD_Result too_large(amp_req *r) {
    return fail(r, MHD_HTTP_CONTENT_TOO_LARGE, "body_too_large", "Payload too large");
}

enum MHD_Result amp_handlers_sdk_begin(amp_handlers *h, amp_req *r) {
    (void)h;
    if (amp_handlers_declares_too_large(r)) {
        r->endpoint = NULL;
        return too_large(r);
    }
    return MHD_YES;
}

static enum MHD_Result answer_stored(amp_req *r) {
    const amp_queue_result *res = &r->result;
    if (!amp_handlers_stored_ok(r))
        return fail(r, MHD_HTTP_SERVICE_UNAVAILABLE, "unavailable",
                    res->error ? res->error : "the spool is unavailable");
    return answer(r, MHD_HTTP_OK, NULL,
                  json_pack("{s:I, s:I, s:I}", "events_ingested", (json_int_t)r->nevents,
                            "payload_size_bytes", (json_int_t)r->body.len, "server_upload_time",
                            (json_int_t)amp_now_ms()));
}

static bool key_known(const amp_config *cfg, const char *key) {
    size_t n = strlen(key);
    bool ok = false;
    for (size_t i = 0; i < cfg->sources.sdk.napi_keys; i++) {
        const char *k = cfg->sources.sdk.api_keys[i];
        if (strlen(k) == n && CRYPTO_memcmp(k, key, n) == 0)
            ok = true;
    }
    return ok;
}

/* Add index i under field in the object set (field -> [indexes]). */
static void list_event(json_t *set, const char *field, size_t i) {
    json_t *arr = json_object_get(set, field);
    if (!arr) {
        arr = json_array();
        json_object_set_new(set, field, arr);
    }
    json_array_append_new(arr, json_integer((json_int_t)i));
}

enum MHD_Result amp_handlers_sdk_finish(amp_handlers *h, amp_req *r) {
    switch (atomic_load(&r->state)) {
    case REQ_WAITING:
        return MHD_YES;
    case REQ_DONE:
        return answer_stored(r);
    case REQ_READING:
        break;
    }
    const amp_config *cfg = r->gen->cfg;
    if (r->too_large)
        return too_large(r);
    if (!r->admitted)
        return fail(r, MHD_HTTP_SERVICE_UNAVAILABLE, "unavailable", "shutting down");
    const char *full = amp_queue_full(h->queue);
    if (full)
        return fail(r, MHD_HTTP_SERVICE_UNAVAILABLE, "unavailable", full);

    json_t *root =
        r->body.len ? json_loadb(r->body.data, r->body.len, JSON_REJECT_DUPLICATES, NULL) : NULL;
    if (!json_is_object(root)) {
        json_decref(root);
        amp_series_inc(h->events_rejected);
        return fail(r, MHD_HTTP_BAD_REQUEST, "invalid_json", "Invalid JSON request body");
    }
    json_t *key = json_object_get(root, "api_key");
    if (!json_is_string(key) || json_string_length(key) == 0) {
        json_decref(root);
        return answer(r, MHD_HTTP_BAD_REQUEST, "missing_api_key",
                      json_pack("{s:s, s:s}", "error", "Request missing required field",
                                "missing_field", "api_key"));
    }
    if (!key_known(cfg, json_string_value(key))) {
        json_decref(root);
        amp_series_inc(amp_metrics_series(h->metrics, "amp2dify_auth_failures_total", "reason",
                                          "invalid_api_key", NULL));
        return fail(r, MHD_HTTP_BAD_REQUEST, "invalid_api_key",
                    "Invalid API key: the api_key is not one of AMP2DIFY_SDK_API_KEYS");
    }
    json_t *events = json_object_get(root, "events");
    if (!json_is_array(events) || json_array_size(events) == 0) {
        json_decref(root);
        return answer(r, MHD_HTTP_BAD_REQUEST, "missing_events",
                      json_pack("{s:s, s:s}", "error", "Request missing required field",
                                "missing_field", "events"));
    }
    size_t n = json_array_size(events);
    if (n > cfg->listen.max_events) {
        json_decref(root);
        return too_large(r);
    }
    /* Every bad event named, by field, as Amplitude lists them. */
    json_t *invalid = json_object(), *missing = json_object();
    char detail[256] = "", first[256] = "";
    size_t i;
    json_t *ev;
    json_array_foreach(events, i, ev) {
        const char *field;
        bool absent;
        if (amp_map_check_event(ev, i, detail, sizeof detail, &field, &absent) != 0) {
            list_event(absent ? missing : invalid, field, i);
            if (!*first)
                snprintf(first, sizeof first, "%s", detail);
        }
    }
    amp_queue_batch *batch = NULL;
    if (!*first) {
        amp_source_input in = {.events = events,
                               .mapper = cfg->mapper,
                               .max_events = cfg->listen.max_events,
                               .message_key = NULL,
                               .tee_app = cfg->sources.sdk.tee ? AMP_MAP_AMPLITUDE_APP : NULL};
        batch = amp_source_batch(&in, &r->filtered, detail, sizeof detail);
        size_t idx;
        if (!batch) {
            snprintf(first, sizeof first, "%s", detail);
            if (sscanf(detail, "events[%zu]", &idx) == 1)
                list_event(invalid, "event", idx);
        }
    }
    if (!batch) {
        amp_series_add(h->events_rejected, (double)n);
        json_decref(root);
        return answer(r, MHD_HTTP_BAD_REQUEST, "invalid_event",
                      json_pack("{s:s, s:o, s:o}", "error", first, "events_with_invalid_fields",
                                invalid, "events_with_missing_fields", missing));
    }
    json_decref(invalid);
    json_decref(missing);
    json_decref(root);
    r->nevents = n;
    if (cfg->sources.sdk.tee)
        r->filtered = 0;                      /* stored all the same, sent on to Amplitude */
    if (amp_queue_batch_events(batch) == 0) { /* every event filtered, no tee */
        amp_queue_batch_destroy(batch);
        r->result = (amp_queue_result){0};
        return answer_stored(r);
    }
    return amp_handlers_submit(r, batch);
}
