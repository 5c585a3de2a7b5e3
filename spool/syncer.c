/* The syncer thread: with spool.sync "full" it makes committed groups durable
 * with one fdatasync of the log, then answers them. */
#include "spool_int.h"

#include <errno.h>
#include <fcntl.h>
#include <libgen.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "../base/log.h"
#include "../base/alloc.h"

/* Answers a request batch (and frees it), or releases a flush marker (its
 * flusher frees it, unless it gave up waiting). */
void amp_spool_answer(amp_spool *s, work *w) {
    if (w->kind == WORK_FLUSH) {
        pthread_mutex_lock(&s->q_mu);
        bool abandoned = w->abandoned;
        w->flushed = true;
        pthread_cond_broadcast(&s->q_flushed);
        pthread_mutex_unlock(&s->q_mu);
        if (abandoned)
            free(w);
        return;
    }
    if (w->result.status != 0 && !w->result.error)
        w->result.error = "the spool could not store the events";
    w->done(w->ctx, &w->result);
    amp_queue_batch_destroy(w->batch);
    free(w);
}

void amp_spool_hand_to_syncer(amp_spool *s, work *head, work *tail) {
    pthread_mutex_lock(&s->sync_mu);
    if (s->sync_tail)
        s->sync_tail->next = head;
    else
        s->sync_head = head;
    s->sync_tail = tail;
    pthread_cond_signal(&s->sync_cond);
    pthread_mutex_unlock(&s->sync_mu);
}

/* One fdatasync of the log. Meanwhile the committer gathers the requests
 * that arrive into one group (GATHER_MAX); it is told when the sync ends. */
static bool sync_log(amp_spool *s) {
    atomic_store(&s->syncing, true);
    bool ok = fdatasync(s->wal_fd) == 0;
    int e = errno;
    pthread_mutex_lock(&s->q_mu);
    atomic_store(&s->syncing, false);
    if (s->gathering)
        pthread_cond_signal(&s->q_cond);
    pthread_mutex_unlock(&s->q_mu);
    errno = e;
    return ok;
}

/* Takes everything committed so far, makes it durable with one fdatasync of
 * the log (which covers every write before it, whichever descriptor made
 * it), then answers it. Groups committed during a sync wait for the next
 * one, so under load each sync serves several groups. */
static void *syncer_main(void *arg) {
    amp_spool *s = arg;
    pthread_setname_np(pthread_self(), "amp-sync");
    pthread_mutex_lock(&s->sync_mu);
    for (;;) {
        while (!s->sync_head && !s->sync_stop)
            pthread_cond_wait(&s->sync_cond, &s->sync_mu);
        if (!s->sync_head)
            break; /* stopping, and nothing left */
        work *head = s->sync_head;
        s->sync_head = s->sync_tail = NULL;
        pthread_mutex_unlock(&s->sync_mu);

        bool stored = false;
        for (work *w = head; w; w = w->next)
            stored |= w->kind == WORK_BATCH && w->result.status == 0;
        /* Read before the sync, which covers every commit made before it. */
        int64_t upto = atomic_load(&s->committed_max), epoch = atomic_load(&s->epoch);
        bool synced = !stored || sync_log(s);
        if (!synced) {
            amp_log(AMP_LOG_ERROR, "spool sync failed", "{s:s}", "error", strerror(errno));
            atomic_store(&s->failed, true); /* the committer recovers, see recover() */
            atomic_store(&s->writable, false);
        }
        /* A group is answered 202 only if it was synced and no failed sync
         * since has made the committer undo it (failed first, then epoch:
         * recover() advances the epoch before it clears failed). */
        bool trusted = synced && !atomic_load(&s->failed);
        int64_t epoch_now = atomic_load(&s->epoch);
        if (stored && trusted && epoch_now == epoch && upto > atomic_load(&s->synced_max)) {
            atomic_store(&s->synced_max, upto);
            amp_spool_notify_waiter(s); /* the new rows are claimable now */
        }
        for (work *w = head; w; w = w->next) {
            if (w->kind == WORK_BATCH && w->result.status == 0 &&
                (!trusted || w->epoch != epoch_now)) {
                w->result.status = -1;
                w->result.accepted = w->result.duplicates = 0;
                w->result.error = "the spool could not sync its log to disk";
            }
        }
        for (work *w = head, *next; w; w = next) {
            next = w->next;
            amp_spool_answer(s, w);
        }
        pthread_mutex_lock(&s->sync_mu);
    }
    pthread_mutex_unlock(&s->sync_mu);
    return NULL;
}

/* Opens the log for the syncer and makes the spool's directory entries
 * durable once (SQLite itself would only at its first checkpoint). */
int amp_spool_start_syncer(amp_spool *s, char *err, size_t errlen) {
    const char *db = sqlite3_db_filename(s->wdb, "main");
    char *wal = amp_xasprintf("%s-wal", db ? db : "");
    s->wal_fd = open(wal, O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    if (s->wal_fd < 0) {
        snprintf(err, errlen, "spool: cannot open '%s': %s", wal, strerror(errno));
        free(wal);
        return -1;
    }
    char *dir = amp_xstrdup(wal);
    int dfd = open(dirname(dir), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    int synced = dfd >= 0 && fsync(dfd) == 0;
    if (dfd >= 0)
        close(dfd);
    free(dir);
    free(wal);
    if (!synced || fdatasync(s->wal_fd) != 0) {
        snprintf(err, errlen, "spool: cannot sync the spool's directory or log: %s",
                 strerror(errno));
        return -1;
    }
    if (pthread_create(&s->syncer, NULL, syncer_main, s) != 0) {
        snprintf(err, errlen, "spool: cannot start the sync thread");
        return -1;
    }
    s->syncer_running = true;
    return 0;
}

/* Answers what is still waiting for a sync, then stops the thread. */
void amp_spool_stop_syncer(amp_spool *s) {
    amp_spool_stop_thread(s->syncer, &s->syncer_running, &s->sync_mu, &s->sync_cond, &s->sync_stop);
}
