#include "queue.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "../base/alloc.h"
#include "../base/parse.h"

struct amp_queue {
    const amp_queue_ops *ops;
    void *e;
    int nshards;
};

static const char no_events[] = "this queue handle takes no events";

amp_queue *amp_queue_create(const amp_queue_ops *ops, void *e, int nshards) {
    amp_queue *q = amp_xcalloc(1, sizeof *q);
    q->ops = ops;
    q->e = e;
    q->nshards = nshards > 0 ? nshards : 1;
    return q;
}

void amp_queue_close(amp_queue *q) {
    if (!q)
        return;
    q->ops->close(q->e);
    free(q);
}

int amp_queue_shards(const amp_queue *q) {
    return q->nshards;
}

void amp_queue_set_notify(amp_queue *q, amp_queue_notify_fn fn, void *ctx) {
    if (q->ops->set_notify)
        q->ops->set_notify(q->e, fn, ctx);
}

void amp_queue_submit(amp_queue *q, amp_queue_batch *b, amp_queue_done_fn done, void *ctx) {
    if (q->ops->submit) {
        q->ops->submit(q->e, b, done, ctx);
        return;
    }
    amp_queue_result res = {.status = -1, .error = no_events};
    done(ctx, &res);
    amp_queue_batch_destroy(b);
}

int amp_queue_claim_shard(amp_queue *q, int shard, int64_t now_ms, amp_queue_job **jobs, size_t max,
                          int64_t *next_due_ms) {
    *next_due_ms = INT64_MAX;
    return q->ops->claim ? q->ops->claim(q->e, shard, now_ms, jobs, max, next_due_ms) : -1;
}

int amp_queue_claim(amp_queue *q, int64_t now_ms, amp_queue_job **jobs, size_t max,
                    int64_t *next_due_ms) {
    return amp_queue_claim_shard(q, AMP_QUEUE_SHARD_ANY, now_ms, jobs, max, next_due_ms);
}

amp_queue_ack_status amp_queue_acknowledge(amp_queue *q, const amp_queue_ack *ack) {
    return q->ops->acknowledge ? q->ops->acknowledge(q->e, ack) : AMP_QUEUE_ACK_FAILED;
}

void amp_queue_flush(amp_queue *q) {
    amp_queue_flush_until(q, INT64_MAX);
}

bool amp_queue_flush_until(amp_queue *q, int64_t deadline_ms) {
    return q->ops->flush_until ? q->ops->flush_until(q->e, deadline_ms) : true;
}

int amp_queue_stats_get(amp_queue *q, amp_queue_stats *out) {
    *out = (amp_queue_stats){0};
    return q->ops->stats_get ? q->ops->stats_get(q->e, out) : -1;
}

int64_t amp_queue_oldest_pending_ms(amp_queue *q) {
    return q->ops->oldest_pending_ms ? q->ops->oldest_pending_ms(q->e) : 0;
}

int64_t amp_queue_depth(amp_queue *q) {
    return q->ops->depth ? q->ops->depth(q->e) : 0;
}

int64_t amp_queue_bytes(amp_queue *q) {
    return q->ops->bytes ? q->ops->bytes(q->e) : 0;
}

bool amp_queue_writable(amp_queue *q) {
    return q->ops->writable ? q->ops->writable(q->e) : false;
}

const char *amp_queue_full(amp_queue *q) {
    return q->ops->full ? q->ops->full(q->e) : q->ops->submit ? NULL : no_events;
}

json_t *amp_queue_dlq_list(amp_queue *q, const amp_queue_dlq_filter *f, size_t limit) {
    return q->ops->dlq_list ? q->ops->dlq_list(q->e, f, limit) : NULL;
}

int64_t amp_queue_dlq_replay(amp_queue *q, const amp_queue_dlq_filter *f) {
    return q->ops->dlq_replay ? q->ops->dlq_replay(q->e, f) : -1;
}

int64_t amp_queue_dlq_purge(amp_queue *q, const amp_queue_dlq_filter *f) {
    return q->ops->dlq_purge ? q->ops->dlq_purge(q->e, f) : -1;
}

bool amp_queue_offers(const amp_queue *q, amp_queue_offer what) {
    switch (what) {
    case AMP_QUEUE_OFFERS_EVENT:
        return q->ops->event != NULL;
    case AMP_QUEUE_OFFERS_APP_DEPTHS:
        return q->ops->app_depths != NULL;
    case AMP_QUEUE_OFFERS_DLQ:
        return q->ops->dlq_list && q->ops->dlq_replay && q->ops->dlq_purge;
    }
    return false;
}

json_t *amp_queue_event(amp_queue *q, const char *dedupe_key, size_t answer_chars) {
    return q->ops->event ? q->ops->event(q->e, dedupe_key, answer_chars) : NULL;
}

json_t *amp_queue_app_depths(amp_queue *q) {
    return q->ops->app_depths ? q->ops->app_depths(q->e) : NULL;
}

/* ---- dead-letter filters --------------------------------------------------- */

/* Unix seconds, or UTC "YYYY-MM-DDTHH:MM:SSZ", into milliseconds. */
static int parse_time(const char *s, int64_t *ms) {
    int64_t secs;
    if (amp_parse_i64(s, strlen(s), 0, 253402300799LL, &secs) == 0) {
        *ms = secs * 1000;
        return 0;
    }
    struct tm tm = {0};
    const char *end = strptime(s, "%Y-%m-%dT%H:%M:%SZ", &tm);
    if (!end || *end)
        return -1;
    *ms = (int64_t)timegm(&tm) * 1000;
    return 0;
}

int amp_queue_dlq_filter_set(amp_queue_dlq_filter *f, const char *name, const char *value,
                             char *err, size_t errlen) {
    int64_t n;
    const char *expect = NULL;
    if (strcmp(name, "route") == 0) {
        f->route = value;
    } else if (strcmp(name, "app") == 0) {
        f->app = value;
    } else if (strcmp(name, "code") == 0) {
        f->code = value;
    } else if (strcmp(name, "status") == 0) {
        if (amp_parse_i64(value, strlen(value), 100, 599, &n) == 0)
            f->status = (int)n;
        else
            expect = "an HTTP status 100..599";
    } else if (strcmp(name, "since") == 0 || strcmp(name, "until") == 0) {
        if (parse_time(value, name[0] == 's' ? &f->since_ms : &f->until_ms) != 0)
            expect = "Unix seconds or YYYY-MM-DDTHH:MM:SSZ";
    } else if (strcmp(name, "id") == 0) {
        if (amp_parse_i64(value, strlen(value), 1, INT64_MAX, &n) == 0) {
            f->ids = amp_xrealloc(f->ids, (f->nids + 1) * sizeof *f->ids);
            f->ids[f->nids++] = n;
        } else {
            expect = "a positive job id";
        }
    } else {
        return 1;
    }
    if (!expect)
        return 0;
    snprintf(err, errlen, "found '%.64s'; expected %s", value, expect);
    return -1;
}

bool amp_queue_dlq_filter_any(const amp_queue_dlq_filter *f) {
    return f->route || f->app || f->code || f->status || f->since_ms || f->until_ms || f->nids;
}

void amp_queue_dlq_filter_clear(amp_queue_dlq_filter *f) {
    free(f->ids);
    *f = (amp_queue_dlq_filter){0};
}

/* ---- jobs ----------------------------------------------------------------- */

void amp_queue_job_free(amp_queue_job *j) {
    if (!j)
        return;
    free(j->route);
    free(j->app);
    free(j->user);
    free(j->body);
    free(j->dedupe_key);
    free(j->conversation_id);
    free(j->run_id);
    free(j->source);
    free(j);
}

/* ---- batches --------------------------------------------------------------
 * A batch is built on an HTTP thread and destroyed on an engine thread (the
 * spool's syncer): every allocation it makes is a free from another
 * thread's arena. So a typical one-event request (key, route, app, user
 * and a Dify body of ~1 KiB) fits in the batch itself: its first event and
 * request are inline, and its strings go into an inline buffer while they
 * fit; a string that does not is allocated on its own. A typical batch is
 * one allocation. */

#define TEXT_INLINE 2048

typedef struct event_item {
    char *dedupe_key;
    size_t first_req, nreq;
} event_item;

struct amp_queue_batch {
    event_item *events; /* &event0, or owned */
    size_t nevents, cap_events;
    amp_queue_request *reqs; /* &req0, or owned; strings in text0 or owned */
    size_t nreqs, cap_reqs;
    size_t text_used; /* of text0 */
    event_item event0;
    amp_queue_request req0;
    char text0[TEXT_INLINE];
};

amp_queue_batch *amp_queue_batch_create(void) {
    amp_queue_batch *b = amp_xmalloc(sizeof *b); /* text0 needs no clearing */
    b->events = &b->event0;
    b->nevents = 0;
    b->cap_events = 1;
    b->reqs = &b->req0;
    b->nreqs = 0;
    b->cap_reqs = 1;
    b->text_used = 0;
    return b;
}

/* Frees v unless it lives in b->text0. */
static void batch_free_string(amp_queue_batch *b, const char *v) {
    if (v && (v < b->text0 || v >= b->text0 + sizeof b->text0))
        free((char *)v);
}

void amp_queue_batch_destroy(amp_queue_batch *b) {
    if (!b)
        return;
    for (size_t i = 0; i < b->nevents; i++)
        batch_free_string(b, b->events[i].dedupe_key);
    for (size_t i = 0; i < b->nreqs; i++) {
        const amp_queue_request *q = &b->reqs[i];
        batch_free_string(b, q->route);
        batch_free_string(b, q->app);
        batch_free_string(b, q->user);
        batch_free_string(b, q->body);
        batch_free_string(b, q->source);
    }
    if (b->events != &b->event0)
        free(b->events);
    if (b->reqs != &b->req0)
        free(b->reqs);
    free(b);
}

/* A copy of v owned by b: in text0 while it fits, else allocated. NULL for
 * NULL. */
static char *batch_copy(amp_queue_batch *b, const char *v) {
    if (!v)
        return NULL;
    size_t n = strlen(v) + 1;
    if (n > sizeof b->text0 - b->text_used)
        return amp_xstrndup(v, n - 1);
    char *copy = memcpy(b->text0 + b->text_used, v, n);
    b->text_used += n;
    return copy;
}

/* Room for one more of an array that starts inline: *items is inline or
 * owned, *cap its capacity. */
static void *batch_grow(void *items, void *inline_items, size_t *cap, size_t size) {
    void *grown = items == inline_items ? memcpy(amp_xmalloc(*cap * 2 * size), items, *cap * size)
                                        : amp_xrealloc(items, *cap * 2 * size);
    *cap *= 2;
    return grown;
}

void amp_queue_batch_event(amp_queue_batch *b, const char *dedupe_key) {
    if (b->nevents == b->cap_events)
        b->events = batch_grow(b->events, &b->event0, &b->cap_events, sizeof *b->events);
    b->events[b->nevents++] =
        (event_item){.dedupe_key = batch_copy(b, dedupe_key), .first_req = b->nreqs, .nreq = 0};
}

void amp_queue_batch_request(amp_queue_batch *b, const char *route, const char *app,
                             const char *user, bool per_user, const char *body_json) {
    if (b->nevents == 0)
        amp_queue_batch_event(b, NULL);
    if (b->nreqs == b->cap_reqs)
        b->reqs = batch_grow(b->reqs, &b->req0, &b->cap_reqs, sizeof *b->reqs);
    b->reqs[b->nreqs++] = (amp_queue_request){.route = batch_copy(b, route),
                                              .app = batch_copy(b, app),
                                              .user = batch_copy(b, user),
                                              .body = batch_copy(b, body_json),
                                              .per_user = per_user};
    b->events[b->nevents - 1].nreq++;
}

void amp_queue_batch_source(amp_queue_batch *b, const char *source_json) {
    if (b->nreqs == 0)
        return;
    amp_queue_request *q = &b->reqs[b->nreqs - 1];
    batch_free_string(b, q->source); /* in text0, it stays there unused */
    q->source = batch_copy(b, source_json);
}

size_t amp_queue_batch_events(const amp_queue_batch *b) {
    return b->nevents;
}

const char *amp_queue_batch_event_at(const amp_queue_batch *b, size_t i,
                                     const amp_queue_request **reqs, size_t *nreqs) {
    const event_item *ev = &b->events[i];
    *reqs = b->reqs + ev->first_req;
    *nreqs = ev->nreq;
    return ev->dedupe_key;
}
