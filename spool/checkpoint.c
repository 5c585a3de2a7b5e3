/* The checkpointer thread, and the WAL hook that asks it to run. */
#include "spool_int.h"

#include <stdio.h>

#include "../base/log.h"

/* WAL frames after which the checkpointer copies the log back into the
 * database. SQLite's own automatic checkpoint uses 1000; every commit
 * rewrites the last page of the table and of each index into the log, and
 * a checkpoint copies each page once however often it was rewritten, so a
 * longer log writes less. But a longer log is a bigger checkpoint, whose
 * burst of writes and final sync slow the syncer's next fdatasync, which
 * every answer waits for. Measured in the server under wrk (ingest only,
 * 64 connections, 4 alternating runs each, against 4000 frames, which an
 * earlier spool had chosen for ~12% more requests/s): 2000 frames, p99
 * 4.5-4.9 ms against 5.1-5.9 ms at the same requests/s and about 4% more
 * CPU on the spool threads; 12000 frames, p99 7.3-8.4 ms against 5.4-5.9
 * and no less CPU; 1000 frames, p99 4.2-5.0 ms at more CPU. make bench's
 * 10 s run against 4000 frames: p99 6.63 ms against 7.09, requests/s
 * x1.017, spool threads' CPU x1.014.
 * Under a steady stream of commits the checkpointer may never catch up with
 * the log's end, and only a checkpoint that does lets the next commit
 * restart the log from its start; past CHECKPOINT_FRAMES_MAX the committer
 * checkpoints itself, which bounds the log (~32 MiB of 4 KiB pages). */
#define CHECKPOINT_FRAMES 2000
#define CHECKPOINT_FRAMES_MAX 8000

/* After each commit of the committer's connection: frames is the size of the
 * log. Asks the checkpointer, unless the log outgrew the bound. */
static int wal_hook(void *ctx, sqlite3 *db, const char *name, int frames) {
    amp_spool *s = ctx;
    if (frames >= CHECKPOINT_FRAMES_MAX) {
        /* After the checkpointer's pass, if one is under way (a second
         * checkpoint would only get SQLITE_BUSY); no commit can come in
         * between, so this one reaches the log's end. */
        pthread_mutex_lock(&s->ck_run_mu);
        sqlite3_wal_checkpoint_v2(db, name, SQLITE_CHECKPOINT_PASSIVE, NULL, NULL);
        pthread_mutex_unlock(&s->ck_run_mu);
    } else if (frames >= CHECKPOINT_FRAMES) {
        pthread_mutex_lock(&s->ck_mu);
        if (!s->ck_due) {
            s->ck_due = true;
            pthread_cond_signal(&s->ck_cond);
        }
        pthread_mutex_unlock(&s->ck_mu);
    }
    return SQLITE_OK;
}

/* PASSIVE: copies what no reader still needs without blocking the
 * committer, which restarts the log from its start once all of it is in the
 * database. A failure (the disk is full, say) is retried at the next
 * request; the log only grows meanwhile. */
static void *checkpointer_main(void *arg) {
    amp_spool *s = arg;
    pthread_setname_np(pthread_self(), "amp-checkpoint");
    pthread_mutex_lock(&s->ck_mu);
    for (;;) {
        while (!s->ck_due && !s->ck_stop)
            pthread_cond_wait(&s->ck_cond, &s->ck_mu);
        if (s->ck_stop)
            break;
        s->ck_due = false;
        pthread_mutex_unlock(&s->ck_mu);
        pthread_mutex_lock(&s->ck_run_mu);
        int rc = sqlite3_wal_checkpoint_v2(s->cdb, NULL, SQLITE_CHECKPOINT_PASSIVE, NULL, NULL);
        pthread_mutex_unlock(&s->ck_run_mu);
        if (rc != SQLITE_OK && rc != SQLITE_BUSY)
            amp_log(AMP_LOG_WARN, "spool checkpoint failed", "{s:s}", "error",
                    sqlite3_errmsg(s->cdb));
        pthread_mutex_lock(&s->ck_mu);
    }
    pthread_mutex_unlock(&s->ck_mu);
    return NULL;
}

int amp_spool_start_checkpointer(amp_spool *s, const amp_spool_opts *opts, char *err,
                                 size_t errlen) {
    if (amp_spool_open_db(opts, true, &s->cdb, err, errlen))
        return -1;
    sqlite3_wal_hook(s->wdb, wal_hook, s); /* replaces the automatic checkpoint */
    if (pthread_create(&s->checkpointer, NULL, checkpointer_main, s) != 0) {
        snprintf(err, errlen, "spool: cannot start the checkpoint thread");
        return -1;
    }
    s->checkpointer_running = true;
    return 0;
}

/* Sets *stop under mu, wakes the thread waiting on cond and joins it;
 * nothing when it never started. */
void amp_spool_stop_thread(pthread_t t, bool *running, pthread_mutex_t *mu, pthread_cond_t *cond,
                           bool *stop) {
    if (!*running)
        return;
    pthread_mutex_lock(mu);
    *stop = true;
    pthread_cond_signal(cond);
    pthread_mutex_unlock(mu);
    pthread_join(t, NULL);
    *running = false;
}

void amp_spool_stop_checkpointer(amp_spool *s) {
    amp_spool_stop_thread(s->checkpointer, &s->checkpointer_running, &s->ck_mu, &s->ck_cond,
                          &s->ck_stop);
}
