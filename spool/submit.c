/* The committer's queue: batches, acknowledgements and flushes wait here for the
 * next group. */
#include "spool_int.h"

#include <stdlib.h>

#include "../base/alloc.h"
#include "../base/clock.h"

static void enqueue(amp_spool *s, work *w) {
    pthread_mutex_lock(&s->q_mu);
    if (s->q_tail)
        s->q_tail->next = w;
    else
        s->q_head = w;
    s->q_tail = w;
    s->q_len++;
    if (w->kind != WORK_ACK)
        s->q_urgent++;
    /* An acknowledgement only wakes the committer to start gathering, or
     * when the group is full; requests and flushes wake it at once, unless
     * it gathers them while the syncer syncs. */
    bool wake = w->kind != WORK_ACK ? !s->gathering || s->q_urgent >= GATHER_MAX
                                    : s->q_len == 1 || s->q_len >= ACK_GROUP_MAX;
    if (wake)
        pthread_cond_signal(&s->q_cond);
    pthread_mutex_unlock(&s->q_mu);
}

void amp_spool_submit(void *e, amp_queue_batch *b, amp_queue_done_fn done, void *ctx) {
    amp_spool *s = e;
    work *w = amp_xcalloc(1, sizeof *w);
    w->kind = WORK_BATCH;
    w->batch = b;
    w->done = done;
    w->ctx = ctx;
    enqueue(s, w);
}

/* Always taken: a commit that fails holds it and retries (committer.c). */
amp_queue_ack_status amp_spool_acknowledge(void *e, const amp_queue_ack *ack) {
    amp_spool *s = e;
    work *w = amp_xcalloc(1, sizeof *w);
    w->kind = WORK_ACK;
    w->ack = *ack;
    w->ack.code = amp_xstrdup(ack->code);
    w->ack.message = amp_xstrdup(ack->message);
    w->ack.result_json = amp_xstrdup(ack->result_json);
    w->ack.conversation_id = amp_xstrdup(ack->conversation_id);
    w->ack.run_id = amp_xstrdup(ack->run_id);
    enqueue(s, w);
    return AMP_QUEUE_ACK_TAKEN;
}

bool amp_spool_flush_until(void *e, int64_t deadline_ms) {
    amp_spool *s = e;
    work *w = amp_xcalloc(1, sizeof *w);
    w->kind = WORK_FLUSH;
    enqueue(s, w);
    pthread_mutex_lock(&s->q_mu);
    while (!w->flushed) {
        if (deadline_ms == INT64_MAX) {
            pthread_cond_wait(&s->q_flushed, &s->q_mu);
            continue;
        }
        int64_t left = deadline_ms - amp_mono_ms();
        if (left <= 0)
            break;
        struct timespec ts = amp_mono_deadline_in(left);
        pthread_cond_timedwait(&s->q_flushed, &s->q_mu, &ts);
    }
    bool flushed = w->flushed;
    w->abandoned = !flushed;
    pthread_mutex_unlock(&s->q_mu);
    if (flushed)
        free(w);
    return flushed;
}

void amp_spool_free_ack_strings(amp_queue_ack *a) {
    free((char *)a->code);
    free((char *)a->message);
    free((char *)a->result_json);
    free((char *)a->conversation_id);
    free((char *)a->run_id);
}

/* The notify callback may be swapped at any time: read it under the lock. */
void amp_spool_notify_waiter(amp_spool *s) {
    pthread_mutex_lock(&s->q_mu);
    void (*fn)(void *) = s->notify;
    void *ctx = s->notify_ctx;
    pthread_mutex_unlock(&s->q_mu);
    if (fn)
        fn(ctx);
}
