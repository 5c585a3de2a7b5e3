/* Opening and closing the engine, and its operation tables. */
#include "spool_int.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "../base/alloc.h"
#include "../base/clock.h"

static void engine_close(void *e);

static void set_notify(void *e, amp_queue_notify_fn fn, void *ctx) {
    amp_spool *s = e;
    pthread_mutex_lock(&s->q_mu);
    s->notify = fn;
    s->notify_ctx = ctx;
    pthread_mutex_unlock(&s->q_mu);
}

static bool writable(void *e) {
    return atomic_load(&((amp_spool *)e)->writable);
}

static int64_t depth(void *e) {
    return atomic_load(&((amp_spool *)e)->depth);
}

static int64_t bytes(void *e) {
    return atomic_load(&((amp_spool *)e)->bytes);
}

static const char *full(void *e) {
    return atomic_load(&((amp_spool *)e)->full);
}

static const amp_queue_ops spool_ops = {
    .close = engine_close,
    .set_notify = set_notify,
    .submit = amp_spool_submit,
    .claim = amp_spool_claim,
    .acknowledge = amp_spool_acknowledge,
    .flush_until = amp_spool_flush_until,
    .stats_get = amp_spool_stats_get,
    .oldest_pending_ms = amp_spool_oldest_pending_ms,
    .depth = depth,
    .bytes = bytes,
    .writable = writable,
    .full = full,
    .dlq_list = amp_spool_dlq_list,
    .dlq_replay = amp_spool_dlq_replay,
    .dlq_purge = amp_spool_dlq_purge,
    .event = amp_spool_event,
    .app_depths = amp_spool_app_depths,
};

/* Inspection and dead letters only: nothing here needs a spool thread. */
static const amp_queue_ops admin_ops = {
    .close = engine_close,
    .stats_get = amp_spool_stats_get,
    .oldest_pending_ms = amp_spool_oldest_pending_ms,
    .dlq_list = amp_spool_dlq_list,
    .dlq_replay = amp_spool_dlq_replay,
    .dlq_purge = amp_spool_dlq_purge,
    .event = amp_spool_event,
    .app_depths = amp_spool_app_depths,
};

/* The state before any connection or thread; engine_close undoes it. */
static amp_spool *spool_new(const amp_spool_opts *opts) {
    amp_spool *s = amp_xcalloc(1, sizeof *s);
    s->dedupe_window_ms = opts->dedupe_window_s * 1000;
    s->retention_ms = opts->retention_s * 1000;
    s->max_pending = opts->max_pending;
    s->max_bytes = opts->max_bytes;
    atomic_init(&s->depth, 0);
    atomic_init(&s->bytes, 0);
    atomic_init(&s->full, NULL);
    pthread_mutex_init(&s->q_mu, NULL);
    amp_cond_init_mono(&s->q_cond); /* both wait with amp_mono_deadline_in() */
    amp_cond_init_mono(&s->q_flushed);
    pthread_mutex_init(&s->claim_mu, NULL);
    pthread_mutex_init(&s->admin_mu, NULL);
    pthread_mutex_init(&s->ck_mu, NULL);
    pthread_cond_init(&s->ck_cond, NULL);
    pthread_mutex_init(&s->ck_run_mu, NULL);
    pthread_mutex_init(&s->sync_mu, NULL);
    pthread_cond_init(&s->sync_cond, NULL);
    s->wal_fd = -1;
    s->stop = 1; /* no committer yet */
    atomic_init(&s->writable, true);
    atomic_init(&s->synced_max, 0);
    atomic_init(&s->committed_max, 0);
    atomic_init(&s->epoch, 0);
    atomic_init(&s->failed, false);
    atomic_init(&s->syncing, false);
    return s;
}

amp_queue *amp_spool_open(const amp_spool_opts *opts, char *err, size_t errlen) {
    amp_spool *s = spool_new(opts);
    if (amp_spool_open_db(opts, true, &s->wdb, err, errlen) ||
        amp_spool_migrate(s->wdb, err, errlen) ||
        amp_spool_open_db(opts, true, &s->rdb, err, errlen) ||
        amp_spool_open_db(opts, true, &s->adb, err, errlen) ||
        amp_spool_prepare_all(s, err, errlen) ||
        amp_spool_start_checkpointer(s, opts, err, errlen) ||
        (!opts->sync_normal && amp_spool_start_syncer(s, err, errlen)))
        goto fail;
    /* The recent dedupe keys a previous run left, merged (a failed merge
     * is logged; its keys stay recent and count all the same). */
    if (amp_spool_dedupe_load(s)) {
        snprintf(err, errlen, "spool: cannot read its dedupe keys: %s", sqlite3_errmsg(s->wdb));
        goto fail;
    }
    amp_spool_dedupe_merge_all(s);
    s->next_maintenance_ms = amp_spool_next_maintenance_ms();
    amp_spool_count_pending(s);
    /* What a previous run left is on disk as far as anyone can know. */
    if (sqlite3_step(s->st_max_id) == SQLITE_ROW) {
        atomic_store(&s->synced_max, sqlite3_column_int64(s->st_max_id, 0));
        atomic_store(&s->committed_max, atomic_load(&s->synced_max));
    }
    sqlite3_reset(s->st_max_id);
    s->stop = 0; /* before the committer reads it */
    if (pthread_create(&s->committer, NULL, amp_spool_committer_main, s) != 0) {
        s->stop = 1;
        snprintf(err, errlen, "spool: cannot start the committer thread");
        goto fail;
    }
    return amp_queue_create(&spool_ops, s, 1);
fail:
    engine_close(s);
    return NULL;
}

amp_queue *amp_spool_open_admin(const amp_spool_opts *opts, char *err, size_t errlen) {
    struct stat st;
    if (stat(opts->path, &st) != 0) {
        snprintf(err, errlen, "cannot open spool '%s': %s", opts->path, strerror(errno));
        return NULL;
    }
    amp_spool *s = spool_new(opts);
    if (amp_spool_open_db(opts, false, &s->rdb, err, errlen) ||
        amp_spool_prepare_all(s, err, errlen)) {
        engine_close(s);
        return NULL;
    }
    return amp_queue_create(&admin_ops, s, 1);
}

static void engine_close(void *e) {
    amp_spool *s = e;
    pthread_mutex_lock(&s->q_mu);
    int running = !s->stop;
    s->stop = 1;
    pthread_cond_broadcast(&s->q_cond);
    pthread_mutex_unlock(&s->q_mu);
    if (running)
        pthread_join(s->committer, NULL);
    amp_spool_stop_syncer(s); /* after the committer: it answers the last groups */
    amp_spool_stop_checkpointer(s);
    amp_spool_finalize_all(s);
    sqlite3_close(s->cdb);
    sqlite3_close(s->adb);
    sqlite3_close(s->rdb);
    sqlite3_close(s->wdb); /* the last one: checkpoints and removes the log */
    free(s->claimed.slots);
    amp_spool_dedupe_free(s);
    pthread_mutex_destroy(&s->q_mu);
    pthread_cond_destroy(&s->q_cond);
    pthread_cond_destroy(&s->q_flushed);
    pthread_mutex_destroy(&s->claim_mu);
    pthread_mutex_destroy(&s->admin_mu);
    pthread_mutex_destroy(&s->ck_mu);
    pthread_cond_destroy(&s->ck_cond);
    pthread_mutex_destroy(&s->ck_run_mu);
    pthread_mutex_destroy(&s->sync_mu);
    pthread_cond_destroy(&s->sync_cond);
    if (s->wal_fd >= 0)
        close(s->wal_fd);
    free(s);
}
