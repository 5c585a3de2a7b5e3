/* The committer thread: every write goes through it, grouped into one
 * transaction per round (group commit). */
#include "spool_int.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "../base/log.h"
#include "../base/clock.h"

/* True when another connection (another process: the daemon's own reader
 * only reads) committed since the last call. Called inside the group's
 * transaction, it reads that transaction's snapshot and costs one pragma;
 * after the commit it began and ended a read transaction of its own, two
 * lock calls on the -shm file: 5% of the committer's CPU under load. */
static bool external_write(amp_spool *s) {
    bool changed = false;
    if (sqlite3_step(s->st_data_version) == SQLITE_ROW) {
        int64_t v = sqlite3_column_int64(s->st_data_version, 0);
        changed = s->data_version != 0 && v != s->data_version;
        s->data_version = v;
    }
    sqlite3_reset(s->st_data_version);
    return changed;
}

int amp_spool_step_done(sqlite3_stmt *st) {
    int rc = sqlite3_step(st);
    sqlite3_reset(st);
    sqlite3_clear_bindings(st);
    return rc == SQLITE_DONE || rc == SQLITE_ROW ? 0 : -1;
}

void amp_spool_bind_text(sqlite3_stmt *st, int i, const char *v) {
    if (v)
        sqlite3_bind_text(st, i, v, -1, SQLITE_STATIC);
    else
        sqlite3_bind_null(st, i);
}

/* Store one batch inside the open transaction. Guarded, it runs under a
 * savepoint, so a failing batch is undone alone and the others stay; the
 * savepoint costs a copy of every page the batch touches that the group
 * already changed, so the first try of a group goes without (see
 * write_group). -1 when a statement failed; the batch's counts are then 0. */
static int write_batch(amp_spool *s, work *w, int64_t now, bool guarded) {
    amp_queue_batch *b = w->batch;
    size_t mark = amp_spool_dedupe_mark(s);
    if (guarded && amp_spool_step_done(s->st_savepoint))
        return -1;
    for (size_t e = 0, nevents = amp_queue_batch_events(b); e < nevents; e++) {
        const amp_queue_request *reqs;
        size_t nreqs;
        const char *key = amp_queue_batch_event_at(b, e, &reqs, &nreqs);
        dedupe_ticket ticket;
        bool fresh_key = false;
        if (key && s->dedupe_window_ms > 0) {
            int fresh = amp_spool_dedupe_check(s, key, now, &ticket);
            if (fresh < 0)
                goto fail;
            if (fresh == 0) {
                w->result.duplicates++;
                continue;
            }
            fresh_key = true;
        }
        int64_t first_id = 0;
        for (size_t r = 0; r < nreqs; r++) {
            const amp_queue_request *q = &reqs[r];
            sqlite3_bind_int64(s->st_insert, 1, now);
            amp_spool_bind_text(s->st_insert, 2, key);
            sqlite3_bind_text(s->st_insert, 3, q->route, -1, SQLITE_STATIC);
            sqlite3_bind_text(s->st_insert, 4, q->app, -1, SQLITE_STATIC);
            sqlite3_bind_text(s->st_insert, 5, q->user, -1, SQLITE_STATIC);
            sqlite3_bind_int(s->st_insert, 6, q->per_user);
            size_t body_len = strlen(q->body);
            sqlite3_bind_text(s->st_insert, 7, q->body, (int)body_len, SQLITE_STATIC);
            amp_spool_bind_text(s->st_insert, 8, q->source);
            if (amp_spool_step_done(s->st_insert))
                goto fail;
            s->grown += (int64_t)(body_len + (q->source ? strlen(q->source) : 0));
            w->rows++;
            w->last_id = sqlite3_last_insert_rowid(s->wdb);
            if (!first_id)
                first_id = w->last_id;
        }
        if (fresh_key && amp_spool_dedupe_record(s, &ticket, now, first_id))
            goto fail;
        w->result.accepted++;
    }
    if (guarded && amp_spool_step_done(s->st_release))
        goto fail;
    return 0;
fail:
    if (guarded) {
        amp_spool_step_done(s->st_rollback_to);
        amp_spool_step_done(s->st_release);
        amp_spool_dedupe_undo(s, mark);
    }
    w->result.accepted = w->result.duplicates = 0;
    w->rows = w->last_id = 0;
    return -1;
}

static int write_ack(amp_spool *s, const amp_queue_ack *a, int64_t now) {
    sqlite3_stmt *st;
    switch (a->kind) {
    case AMP_QUEUE_ACK_DELIVERED:
        st = s->st_delivered;
        sqlite3_bind_int64(st, 1, a->id);
        sqlite3_bind_int(st, 2, a->http_status);
        amp_spool_bind_text(st, 3, a->result_json);
        sqlite3_bind_int64(st, 4, now);
        break;
    case AMP_QUEUE_ACK_RETRY:
        st = s->st_retry;
        sqlite3_bind_int64(st, 1, a->id);
        sqlite3_bind_int64(st, 2, a->due_ms);
        sqlite3_bind_int(st, 3, a->http_status);
        amp_spool_bind_text(st, 4, a->code);
        amp_spool_bind_text(st, 5, a->message);
        amp_spool_bind_text(st, 6, a->run_id);
        break;
    case AMP_QUEUE_ACK_WAITING:
        st = s->st_waiting;
        sqlite3_bind_int64(st, 1, a->id);
        sqlite3_bind_int(st, 2, a->http_status);
        amp_spool_bind_text(st, 3, a->code);
        amp_spool_bind_text(st, 4, a->message);
        amp_spool_bind_text(st, 5, a->result_json);
        sqlite3_bind_int64(st, 6, now);
        break;
    case AMP_QUEUE_ACK_DEAD:
        st = s->st_dead;
        sqlite3_bind_int64(st, 1, a->id);
        sqlite3_bind_int(st, 2, a->http_status);
        amp_spool_bind_text(st, 3, a->code);
        amp_spool_bind_text(st, 4, a->message);
        sqlite3_bind_int64(st, 5, now);
        break;
    case AMP_QUEUE_ACK_RELEASE:
    default:
        st = s->st_release_row;
        sqlite3_bind_int64(st, 1, a->id);
        sqlite3_bind_int64(st, 2, a->due_ms);
        amp_spool_bind_text(st, 3, a->run_id);
        break;
    }
    if (amp_spool_step_done(st))
        return -1;
    if (a->result_json)
        s->grown += (int64_t)strlen(a->result_json);
    if (a->conversation_id && a->conversation_id[0]) {
        sqlite3_bind_int64(s->st_conv_set, 1, a->id);
        sqlite3_bind_text(s->st_conv_set, 2, a->conversation_id, -1, SQLITE_STATIC);
        sqlite3_bind_int64(s->st_conv_set, 3, now);
        return amp_spool_step_done(s->st_conv_set);
    }
    if (a->conversation_id) {
        sqlite3_bind_int64(s->st_conv_clear, 1, a->id);
        return amp_spool_step_done(s->st_conv_clear);
    }
    return 0;
}

static void set_writable(amp_spool *s, bool ok) {
    /* Only when readiness is lost: a steady stream of failing groups must
     * not keep postponing the probe. */
    if (!ok && (atomic_load(&s->writable) || s->next_probe_ms <= amp_mono_ms()))
        s->next_probe_ms = amp_mono_ms() + PROBE_INTERVAL_MS;
    if (atomic_exchange(&s->writable, ok) != ok && ok)
        amp_log(AMP_LOG_INFO, "spool writable again", NULL);
}

/* What a group's writes change once committed. */
typedef struct group_tally {
    int64_t depth_change; /* pending rows added, minus rows finished */
    bool new_work;        /* something for the dispatcher to claim */
    bool batch_failed;    /* a request could not be stored */
} group_tally;

/* Every request and acknowledgement of the group, inside the open
 * transaction. Unguarded, the first failing request stops it: its earlier
 * statements are in the transaction, so the caller rolls back and writes
 * the group again guarded, where only that request is refused. Failed
 * acknowledgements are logged and left out either way. -1 only unguarded. */
static int write_group(amp_spool *s, work *head, int64_t now, bool guarded, group_tally *t) {
    *t = (group_tally){0};
    for (work *w = head; w; w = w->next) {
        if (w->kind == WORK_BATCH) {
            w->result = (amp_queue_result){0};
            w->rows = w->last_id = 0;
            if (s->refusing) { /* nothing new until recover() works */
                w->result.status = -1;
                w->result.error = "the spool is recovering from a failed sync";
                t->batch_failed = true;
                continue;
            }
            w->result.status = write_batch(s, w, now, guarded);
            if (w->result.status != 0 && !guarded)
                return -1;
            t->batch_failed |= w->result.status != 0;
            t->new_work |= w->result.status == 0 && w->result.accepted > 0;
            t->depth_change += w->rows;
        } else if (w->kind == WORK_ACK) {
            if (write_ack(s, &w->ack, now) != 0)
                amp_log(AMP_LOG_ERROR, "spool ack failed", "{s:I, s:s}", "id",
                        (json_int_t)w->ack.id, "error", sqlite3_errmsg(s->wdb));
            else if (w->ack.kind == AMP_QUEUE_ACK_DELIVERED || w->ack.kind == AMP_QUEUE_ACK_DEAD ||
                     w->ack.kind == AMP_QUEUE_ACK_WAITING)
                t->depth_change--;
            t->new_work |= w->ack.kind != AMP_QUEUE_ACK_DEAD;
        }
    }
    return 0;
}

/* After a commit: the group's rows are in the log. Without a syncer that is
 * all the spool waits for, so they are claimable at once. */
static void committed(amp_spool *s, work *head) {
    int64_t epoch = atomic_load(&s->epoch), top = atomic_load(&s->committed_max);
    for (work *w = head; w; w = w->next) {
        w->epoch = epoch;
        if (w->kind == WORK_BATCH && w->result.status == 0 && w->last_id > top)
            top = w->last_id;
    }
    atomic_store(&s->committed_max, top);
    if (s->wal_fd < 0)
        atomic_store(&s->synced_max, top);
}

/* After a failed sync (the syncer set s->failed): the rows committed since
 * the last good sync were answered 503 and may not be on disk, the kernel
 * having perhaps dropped the pages it could not write. Delete them and
 * their dedupe keys, so that their senders' retries are stored as new,
 * then copy the whole log into the database with a TRUNCATE checkpoint,
 * which syncs the database file: once that works, everything the spool
 * holds is on disk again. False (and retried by the next group or probe)
 * while the disk still fails. Committer thread. */
static bool recover(amp_spool *s) {
    int64_t synced = atomic_load(&s->synced_max);
    sqlite3_bind_int64(s->st_drop_keys, 1, synced);
    sqlite3_bind_int64(s->st_drop_run_keys, 1, synced);
    sqlite3_bind_int64(s->st_drop_rows, 1, synced);
    sqlite3_bind_int64(s->st_drop_recent_keys, 1, synced);
    bool ok = amp_spool_step_done(s->st_begin) == 0 && amp_spool_step_done(s->st_drop_keys) == 0 &&
              amp_spool_step_done(s->st_drop_run_keys) == 0 &&
              amp_spool_step_done(s->st_drop_recent_keys) == 0 &&
              amp_spool_step_done(s->st_drop_rows) == 0;
    int64_t dropped = ok ? sqlite3_changes(s->wdb) : 0;
    ok = ok && amp_spool_step_done(s->st_commit) == 0;
    if (ok)
        s->rows_dropped += dropped; /* gone even if the checkpoint fails below */
    if (!ok && sqlite3_get_autocommit(s->wdb) == 0)
        amp_spool_step_done(s->st_rollback);
    if (ok) {
        pthread_mutex_lock(&s->ck_run_mu);
        ok = sqlite3_wal_checkpoint_v2(s->wdb, NULL, SQLITE_CHECKPOINT_TRUNCATE, NULL, NULL) ==
             SQLITE_OK;
        pthread_mutex_unlock(&s->ck_run_mu);
    }
    if (!ok) {
        amp_log(AMP_LOG_WARN, "spool recovery after a failed sync did not work yet", "{s:s}",
                "error", sqlite3_errmsg(s->wdb));
        return false;
    }
    /* A merge under way may hold keys of the rows just dropped. */
    amp_spool_dedupe_cancel_merge(s);
    if (amp_spool_dedupe_load(s))
        amp_log(AMP_LOG_WARN, "spool could not read its recent dedupe keys", "{s:s}", "error",
                sqlite3_errmsg(s->wdb));
    atomic_store(&s->committed_max, synced);
    atomic_fetch_add(&s->epoch, 1);
    atomic_store(&s->failed, false);
    amp_spool_count_pending(s);
    amp_log(AMP_LOG_INFO, "spool recovered from a failed sync", "{s:I}", "rows_dropped",
            (json_int_t)s->rows_dropped);
    s->rows_dropped = 0;
    return true;
}

/* One group: everything queued so far, in one transaction. */
static void commit_group(amp_spool *s, work *head) {
    int64_t now = amp_now_ms();
    int nbatches = 0, nacks = 0, ok = 1;
    group_tally t = {0};
    char why[256] = "";

    for (work *w = head; w; w = w->next)
        nbatches += w->kind == WORK_BATCH, nacks += w->kind == WORK_ACK;

    /* After a failed sync nothing new is stored before recover() worked. */
    s->refusing = nbatches > 0 && atomic_load(&s->failed) && !recover(s);
    if (nbatches + nacks > 0) {
        ok = amp_spool_step_done(s->st_begin) == 0;
        bool outside = ok && external_write(s);
        if (ok && write_group(s, head, now, false, &t) != 0) {
            /* A failure may already have ended the transaction. */
            if (sqlite3_get_autocommit(s->wdb) == 0)
                amp_spool_step_done(s->st_rollback);
            amp_spool_dedupe_undo(s, 0);
            ok = amp_spool_step_done(s->st_begin) == 0;
            if (ok)
                write_group(s, head, now, true, &t);
        }
        if (ok && amp_spool_step_done(s->st_commit)) {
            ok = 0;
            /* Before ROLLBACK replaces it with its own message. */
            snprintf(why, sizeof why, "%s", sqlite3_errmsg(s->wdb));
            amp_spool_step_done(s->st_rollback);
        } else if (!ok) {
            snprintf(why, sizeof why, "%s", sqlite3_errmsg(s->wdb));
        }
        if (ok)
            amp_spool_dedupe_keep(s);
        else
            amp_spool_dedupe_undo(s, 0);
        if (!ok)
            amp_log(AMP_LOG_ERROR, "spool commit failed", "{s:s, s:i, s:i}", "error", why,
                    "requests", nbatches, "acks", nacks);
        set_writable(s, ok && !t.batch_failed && !atomic_load(&s->failed));
        if (ok) {
            atomic_fetch_add(&s->depth, t.depth_change);
            amp_spool_check_limits(s, false);
            committed(s, head);
        }
        if (ok && outside)
            amp_spool_count_pending(s); /* e.g. `amp2dify dlq replay` from another process */
    }

    /* Unclaim acknowledged rows once committed. Acknowledgements that
     * failed are held and their rows stay claimed: unclaimed, a row still
     * due would be delivered again at once, over and over while the disk
     * stays full. */
    if (nacks && (ok || s->closing)) {
        pthread_mutex_lock(&s->claim_mu);
        for (work *w = head; w; w = w->next)
            if (w->kind == WORK_ACK)
                amp_spool_idset_del(&s->claimed, w->ack.id);
        pthread_mutex_unlock(&s->claim_mu);
    }

    /* Requests and flush markers are answered here, or, when the syncer
     * makes commits durable, by the syncer after its next fdatasync (in
     * order, so a flush still follows everything queued before it). */
    work *to_sync = NULL, *sync_last = NULL;
    for (work *w = head; w;) {
        work *next = w->next;
        if (w->kind == WORK_BATCH && !ok) {
            w->result.status = -1;
            w->result.accepted = w->result.duplicates = 0;
        }
        if (w->kind == WORK_ACK && !ok && !s->closing) {
            w->next = NULL;
            if (s->held_tail)
                s->held_tail->next = w;
            else
                s->held = w;
            s->held_tail = w;
        } else if (w->kind == WORK_ACK) {
            amp_spool_free_ack_strings(&w->ack);
            free(w);
        } else if (s->wal_fd >= 0) {
            w->next = NULL;
            if (sync_last)
                sync_last->next = w;
            else
                to_sync = w;
            sync_last = w;
        } else {
            amp_spool_answer(s, w);
        }
        w = next;
    }
    if (to_sync)
        amp_spool_hand_to_syncer(s, to_sync, sync_last);

    /* New rows are claimable once synced: with a syncer, it tells. */
    if (ok && (nacks || (t.new_work && s->wal_fd < 0)))
        amp_spool_notify_waiter(s);
}

/* The held acknowledgements go first in the next group. */
static work *with_held(amp_spool *s, work *head) {
    if (!s->held)
        return head;
    work *first = s->held;
    s->held_tail->next = head;
    s->held = s->held_tail = NULL;
    return first;
}

/* Nothing queued, yet the spool is not known to be writable: retry the held
 * acknowledgements, or write one page. */
static void probe(amp_spool *s) {
    if (atomic_load(&s->failed)) {
        set_writable(s, recover(s));
        return;
    }
    if (s->held) {
        commit_group(s, with_held(s, NULL));
        return;
    }
    int ok = amp_spool_step_done(s->st_begin) == 0;
    ok = ok && amp_spool_step_done(s->st_probe) == 0;
    ok = ok && amp_spool_step_done(s->st_commit) == 0;
    if (!ok)
        amp_spool_step_done(s->st_rollback);
    if (ok && s->wal_fd >= 0)
        ok = fdatasync(s->wal_fd) == 0;
    set_writable(s, ok);
}

void *amp_spool_committer_main(void *arg) {
    amp_spool *s = arg;
    pthread_setname_np(pthread_self(), "amp-commit");
    pthread_mutex_lock(&s->q_mu);
    for (;;) {
        while (!s->q_head && !s->stop) {
            int64_t now = amp_mono_ms();
            bool stalled = s->held || !atomic_load(&s->writable) || atomic_load(&s->failed);
            if (stalled && now >= s->next_probe_ms) {
                pthread_mutex_unlock(&s->q_mu);
                probe(s);
                pthread_mutex_lock(&s->q_mu);
                continue;
            }
            int64_t wait = s->next_maintenance_ms - now;
            if (stalled && s->next_probe_ms - now < wait)
                wait = s->next_probe_ms - now;
            if (wait <= 0) {
                pthread_mutex_unlock(&s->q_mu);
                amp_spool_maintain(s);
                pthread_mutex_lock(&s->q_mu);
                s->next_maintenance_ms = amp_spool_next_maintenance_ms();
                continue;
            }
            struct timespec ts = amp_mono_deadline_in(wait);
            pthread_cond_timedwait(&s->q_cond, &s->q_mu, &ts);
        }
        if (!s->q_head && s->stop)
            break;
        /* Only acknowledgements so far: let more gather for a moment, so a
         * high delivery rate costs one commit (and fsync) per group, not
         * per delivery. */
        if (!s->q_urgent && !s->stop && s->q_len < ACK_GROUP_MAX) {
            struct timespec ts = amp_mono_deadline_in(ACK_GATHER_MS);
            while (!s->q_urgent && !s->stop && s->q_len < ACK_GROUP_MAX &&
                   pthread_cond_timedwait(&s->q_cond, &s->q_mu, &ts) == 0)
                ;
        }
        if (s->q_urgent && s->q_urgent < GATHER_MAX && atomic_load(&s->syncing) && !s->stop) {
            struct timespec ts = amp_mono_deadline_in(GATHER_MS);
            s->gathering = true;
            while (s->q_urgent < GATHER_MAX && atomic_load(&s->syncing) && !s->stop &&
                   pthread_cond_timedwait(&s->q_cond, &s->q_mu, &ts) == 0)
                ;
            s->gathering = false;
        }
        work *head = s->q_head;
        s->q_head = s->q_tail = NULL;
        s->q_len = s->q_urgent = 0;
        pthread_mutex_unlock(&s->q_mu);
        commit_group(s, with_held(s, head));
        if (!atomic_load(&s->failed))
            amp_spool_dedupe_after_group(s);
        pthread_mutex_lock(&s->q_mu);
    }
    pthread_mutex_unlock(&s->q_mu);
    /* A last try for held acknowledgements; if it fails too, their rows
     * are simply delivered again after the next start (at-least-once). */
    s->closing = true;
    if (s->held)
        commit_group(s, with_held(s, NULL));
    return NULL;
}
