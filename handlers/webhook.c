/*
 * webhook — POST {listen.path}: authenticate, decode, map, store.
 *
 * The request is all or nothing: every event is decoded and mapped before
 * anything is handed to the spool. The connection is then suspended and the
 * spool's committer resumes it once the transaction holding the events has
 * committed (202) or failed (503); the MHD thread never waits on disk.
 */
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

#include "../mapping/mapping.h"
#include "../sources/source.h"
#include "../base/alloc.h"
#include "../base/buf.h"
#include "../json/jsonw.h"
#include "../base/log.h"
#include "handlers_int.h"

/* application/json, with optional parameters (charset). */
static bool is_json_type(const char *ct) {
    if (!ct)
        return false;
    while (*ct == ' ')
        ct++;
    size_t n = strlen("application/json");
    if (strncasecmp(ct, "application/json", n) != 0)
        return false;
    ct += n;
    while (*ct == ' ' || *ct == '\t')
        ct++;
    return *ct == '\0' || *ct == ';';
}

enum MHD_Result amp_handlers_webhook_begin(amp_handlers *h, amp_req *r) {
    (void)h; /* the config comes with the request (r->gen) */
    const char *ct =
        MHD_lookup_connection_value(r->conn, MHD_HEADER_KIND, MHD_HTTP_HEADER_CONTENT_TYPE);
    if (!is_json_type(ct)) {
        r->endpoint = NULL;
        return amp_handlers_reply_error(r, MHD_HTTP_UNSUPPORTED_MEDIA_TYPE,
                                        "unsupported_media_type",
                                        "Content-Type must be application/json");
    }
    /* Refuse a declared oversize body before reading any of it. */
    if (amp_handlers_declares_too_large(r)) {
        r->endpoint = NULL;
        char detail[96];
        snprintf(detail, sizeof detail, "the body is larger than %zu bytes",
                 r->gen->cfg->listen.max_body_bytes);
        return amp_handlers_reply_error(r, MHD_HTTP_CONTENT_TOO_LARGE, "body_too_large", detail);
    }
    return MHD_YES;
}

static const char *header_lookup(void *ctx, const char *name) {
    return MHD_lookup_connection_value(ctx, MHD_HEADER_KIND, name);
}

static enum MHD_Result reject_auth(amp_handlers *h, amp_req *r, amp_sig_result res,
                                   const char *detail) {
    static const char *const codes[] = {
        [AMP_SIG_MISSING] = "missing_signature",
        [AMP_SIG_MALFORMED] = "invalid_signature",
        [AMP_SIG_STALE] = "stale_timestamp",
        [AMP_SIG_MISMATCH] = "invalid_signature",
    };
    static const char *const reasons[] = {
        [AMP_SIG_MISSING] = "missing",
        [AMP_SIG_MALFORMED] = "malformed",
        [AMP_SIG_STALE] = "stale",
        [AMP_SIG_MISMATCH] = "mismatch",
    };
    amp_series_inc(amp_metrics_series(h->metrics, "amp2dify_auth_failures_total", "reason",
                                      reasons[res], NULL));
    return amp_handlers_reply_error(r, MHD_HTTP_UNAUTHORIZED, codes[res], detail);
}

static enum MHD_Result answer_stored(amp_req *r) {
    const amp_queue_result *res = &r->result;
    if (!amp_handlers_stored_ok(r))
        return amp_handlers_reply_unavailable(
            r, res->error ? res->error : "the spool is unavailable", RETRY_SOON_S);
    /* Written directly: the same bytes as the compact dump of these three
     * integers, without building them as jansson values on every request. */
    amp_buf b;
    amp_buf_init(&b, 128); /* three ints of at most 11 characters and the keys */
    if (amp_buf_append(&b, "{\"accepted\":", 12) != 0 ||
        amp_json_write_int(&b, (int)res->accepted) != 0 ||
        amp_buf_append(&b, ",\"duplicates\":", 14) != 0 ||
        amp_json_write_int(&b, (int)res->duplicates) != 0 ||
        amp_buf_append(&b, ",\"filtered\":", 12) != 0 ||
        amp_json_write_int(&b, (int)r->filtered) != 0 || amp_buf_append(&b, "}", 1) != 0)
        abort(); /* cannot exceed 128 bytes */
    return amp_handlers_reply_text(r, MHD_HTTP_ACCEPTED, b.data);
}

/* The webhook as a source: its events through every route into one batch
 * (caller owns); events no route takes are counted in r->filtered. NULL and
 * detail when there are too many events or a route finds one invalid: the
 * whole request is then rejected. */
static amp_queue_batch *map_events(amp_req *r, const amp_config *cfg, const json_t *events,
                                   char *detail, size_t detail_len) {
    /* standard-webhooks: the message id dedupes a resent message; an
     * event's own insert_id, when it has one, still comes first. */
    const char *msg_id = cfg->auth.scheme == AMP_AUTH_STANDARD_WEBHOOKS
                             ? amp_sig_message_id(header_lookup, r->conn)
                             : NULL;
    char stem[300] = "";
    if (msg_id && *msg_id && strlen(msg_id) < 256)
        snprintf(stem, sizeof stem, "webhook-id:%s", msg_id);
    amp_source_input in = {
        .events = events,
        .mapper = cfg->mapper,
        .max_events = cfg->listen.max_events,
        .message_key = stem,
    };
    return amp_source_batch(&in, &r->filtered, detail, detail_len);
}

enum MHD_Result amp_handlers_webhook_finish(amp_handlers *h, amp_req *r) {
    switch (atomic_load(&r->state)) {
    case REQ_WAITING:
        return MHD_YES; /* resumed before the answer: keep waiting */
    case REQ_DONE:
        return answer_stored(r);
    case REQ_READING:
        break;
    }

    const amp_config *cfg = r->gen->cfg;
    if (r->too_large) {
        char detail[96];
        snprintf(detail, sizeof detail, "the body is larger than %zu bytes",
                 cfg->listen.max_body_bytes);
        return amp_handlers_reply_error(r, MHD_HTTP_CONTENT_TOO_LARGE, "body_too_large", detail);
    }
    if (!r->admitted) /* begun after shutdown started */
        return amp_handlers_reply_unavailable(r, "shutting down", RETRY_SOON_S);

    const char *full = amp_queue_full(h->queue);
    if (full)
        return amp_handlers_reply_unavailable(r, full, RETRY_FULL_S);

    const char *body = r->body.data ? r->body.data : "";
    if (cfg->auth.verifier) {
        const char *detail = "signature rejected";
        amp_sig_result res = amp_sig_verify(cfg->auth.verifier, header_lookup, r->conn, body,
                                            r->body.len, (int64_t)time(NULL), &detail);
        if (res != AMP_SIG_OK)
            return reject_auth(h, r, res, detail);
    }

    char detail[256];
    json_t *events = NULL;
    amp_decode_result dr = amp_map_decode_body(body, r->body.len, &events, detail, sizeof detail);
    if (dr != AMP_DECODE_OK) {
        const char *code = dr == AMP_DECODE_INVALID_JSON ? "invalid_json" : "invalid_event";
        amp_series_inc(h->events_rejected);
        return amp_handlers_reply_error(r, MHD_HTTP_BAD_REQUEST, code, detail);
    }

    amp_queue_batch *batch = map_events(r, cfg, events, detail, sizeof detail);
    if (!batch) {
        amp_series_add(h->events_rejected, (double)json_array_size(events));
        json_decref(events);
        return amp_handlers_reply_error(r, MHD_HTTP_BAD_REQUEST, "invalid_event", detail);
    }
    size_t nevents = json_array_size(events);
    json_decref(events);

    if (r->filtered == nevents) { /* nothing to store */
        amp_queue_batch_destroy(batch);
        r->result = (amp_queue_result){0};
        return answer_stored(r);
    }
    return amp_handlers_submit(r, batch);
}
