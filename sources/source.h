/*
 * source — where events come from, and the one step every source shares:
 * from decoded events to one all-or-nothing batch for the queue.
 *
 * A source is whatever turns the outside world into decoded events: the
 * webhook endpoint (handlers/webhook.c: a signed HTTP POST) is the first.
 * Each source decodes its own framing (mapping's decode for JSON bodies),
 * then hands the events here: every route is applied to every event (the
 * mapper's filters, mappings and templates), each event's dedupe key is
 * chosen, and the Dify requests are gathered into a batch the caller submits
 * to the queue. A new source (a poller of Amplitude's Export API, an
 * SDK-compatible endpoint) is a sibling that calls amp_source_batch, not a
 * branch inside the webhook handler, so every source dedupes, filters and
 * stores alike.
 *
 * Threading: reentrant; the mapper is shared read-only.
 */
#ifndef AMP_SOURCE_H
#define AMP_SOURCE_H

#include <jansson.h>
#include <stddef.h>

#include "../mapping/mapping.h"
#include "../queue/queue.h"

typedef struct amp_source_input {
    const json_t *events;     /* array of decoded events; borrowed */
    const amp_mapper *mapper; /* borrowed */
    size_t max_events;        /* more events than this: the whole input is refused */
    /* Dedupe key stem for events without their own key (insert_id,
     * $insert_id, uuid): "<stem>#<index>", e.g. a sender's message id
     * ("webhook-id:msg_1"). NULL or "": such events are never duplicates.
     * Borrowed. */
    const char *message_key;
    /* Non-NULL: every event (taken by a route or not) is also stored, in
     * the same event of the batch (one dedupe key: a repeat stores neither),
     * as a job of this app (AMP_MAP_AMPLITUDE_APP: sent on to Amplitude),
     * route AMP_SOURCE_TEE_ROUTE, user its user_id else device_id, body the
     * event itself with its insert_id (one is added to an event without:
     * "amp2dify-" and 32 random hex digits, so resends are one event).
     * Borrowed. */
    const char *tee_app;
} amp_source_input;

#define AMP_SOURCE_TEE_ROUTE "@tee"

/* Every route applied to every event, into one batch (caller owns: submit it
 * to the queue or destroy it). *filtered receives the number of events no
 * route took (a tee still stores them: amp_queue_batch_events tells whether
 * the batch holds anything). NULL, with detail naming the event ("events[3]: ...") when
 * there are too many events or a route finds one invalid: the caller then
 * refuses the whole input, so nothing is half stored. */
amp_queue_batch *amp_source_batch(const amp_source_input *in, unsigned *filtered, char *detail,
                                  size_t detail_len);

#endif
