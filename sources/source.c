/*
 * source — decoded events to one queue batch (see source.h).
 */
#include "source.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>

#include "../json/jsonw.h"

/* Longest message_key stem used; a longer one is ignored (no sender's
 * message id is that long: the webhook passes ids under 256 bytes). */
#define MESSAGE_KEY_MAX 288

/* Collects the requests one event produces into the batch; the event is
 * added on its first request, so a filtered event leaves no trace. */
typedef struct emit_ctx {
    amp_queue_batch *batch;
    const char *dedupe_key;
    unsigned nreq;
} emit_ctx;

static void emit(void *ctx, const amp_map_request *req) {
    emit_ctx *e = ctx;
    char *body = amp_json_dumps(req->body);
    if (!body)
        abort(); /* only allocation can fail here */
    if (e->nreq++ == 0)
        amp_queue_batch_event(e->batch, e->dedupe_key);
    amp_queue_batch_request(e->batch, req->route, req->app->name, req->user, req->per_user, body);
    free(body);
    if (req->source) {
        char *src = amp_json_dumps(req->source);
        if (!src)
            abort();
        amp_queue_batch_source(e->batch, src);
        free(src);
    }
}

/* The tee's job of one event: the event as it came, with an insert_id. */
static void tee(amp_queue_batch *batch, const amp_source_input *in, const json_t *ev,
                const char *key, bool event_added) {
    if (!event_added)
        amp_queue_batch_event(batch, key);
    json_t *copy = json_copy((json_t *)ev);
    if (!copy)
        abort();
    const char *iid = json_string_value(json_object_get(copy, "insert_id"));
    if (!iid || !*iid) {
        unsigned char r[16];
        if (getrandom(r, sizeof r, 0) != (ssize_t)sizeof r)
            abort(); /* the kernel's generator does not fail for 16 bytes */
        char id[9 + 33] = "amp2dify-";
        for (size_t i = 0; i < sizeof r; i++)
            snprintf(id + 9 + 2 * i, 3, "%02x", r[i]);
        json_object_set_new(copy, "insert_id", json_string(id));
    }
    const char *user = json_string_value(json_object_get(copy, "user_id"));
    if (!user || !*user)
        user = json_string_value(json_object_get(copy, "device_id"));
    char *body = amp_json_dumps(copy);
    if (!body)
        abort();
    amp_queue_batch_request(batch, AMP_SOURCE_TEE_ROUTE, in->tee_app, user ? user : "", false,
                            body);
    free(body);
    json_decref(copy);
}

amp_queue_batch *amp_source_batch(const amp_source_input *in, unsigned *filtered, char *detail,
                                  size_t detail_len) {
    size_t n = json_array_size(in->events);
    *filtered = 0;
    if (n > in->max_events) {
        snprintf(detail, detail_len, "%zu events; at most %zu per request", n, in->max_events);
        return NULL;
    }
    const char *stem =
        in->message_key && *in->message_key && strlen(in->message_key) <= MESSAGE_KEY_MAX
            ? in->message_key
            : NULL;
    amp_queue_batch *batch = amp_queue_batch_create();
    size_t i;
    json_t *ev;
    json_array_foreach(in->events, i, ev) {
        char msg_key[MESSAGE_KEY_MAX + 32];
        const char *key = amp_map_dedupe_key(ev);
        if (!key && stem) {
            snprintf(msg_key, sizeof msg_key, "%s#%zu", stem, i);
            key = msg_key;
        }
        emit_ctx e = {.batch = batch, .dedupe_key = key, .nreq = 0};
        char why[200];
        if (amp_mapper_apply(in->mapper, ev, emit, &e, NULL, NULL, why, sizeof why) < 0) {
            snprintf(detail, detail_len, "events[%zu]: %s", i, why);
            amp_queue_batch_destroy(batch);
            return NULL;
        }
        *filtered += e.nreq == 0;
        if (in->tee_app)
            tee(batch, in, ev, key, e.nreq > 0);
    }
    return batch;
}
