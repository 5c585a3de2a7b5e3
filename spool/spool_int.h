/*
 * spool_int.h — the SQLite engine's shared state, for the files of spool/
 * only. Who touches what:
 *
 *   spool.c       open (full or admin) and close, the engine's operation tables
 *   schema.c      the schema, its migrations, connections and statements
 *   submit.c      the committer's queue: batches, acknowledgements, flushes
 *   committer.c   the committer thread: group commit, held acks, recovery
 *   syncer.c      the syncer thread: one fdatasync answers many groups
 *   checkpoint.c  the checkpointer thread, and the WAL hook that wakes it
 *   upkeep.c      back-pressure limits, pending count, pruning
 *   claim.c       claims for delivery and the claimed-id set
 *   dedupe.c      dedupe keys: recent ones in memory, merged in key order
 *   keyfilter.c   a Bloom filter of dedupe hashes, so new keys skip the table
 *   walbuf.c      the spool's VFS: each connection's log writes gathered
 *   admin.c       statistics (on the reader); dead letters and the admin
 *                 API's lookups (on a connection of their own; an admin
 *                 handle: the reader)
 *
 * Each field's comment says which thread or lock owns it.
 */
#ifndef AMP_SPOOL_INT_H
#define AMP_SPOOL_INT_H

#include <pthread.h>
#include <sqlite3.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <time.h>

#include "spool.h"

#define SCHEMA_VERSION 8
#define AMP_STR_(x) #x
#define AMP_STR(x) AMP_STR_(x)
/* Background upkeep: expired dedupe keys, old delivered rows, the depth. */
#define MAINTENANCE_INTERVAL_MS 60000
/* After a failed commit: how often the committer retries the held
 * acknowledgements or probes with a one-page write, so readiness comes back
 * by itself once the cause (a full disk, say) is gone, even without traffic. */
#define PROBE_INTERVAL_MS 1000
/* Acknowledgements wait up to this long for company before a commit, unless
 * ACK_GROUP_MAX of them are queued or a request arrives. */
#define ACK_GATHER_MS 2
#define ACK_GROUP_MAX 256
/* Requests that arrive while the syncer is in fdatasync would wait for its
 * next sync whenever they commit, so they gather into one group (one
 * transaction's fixed cost instead of one per arrival: measured with
 * bench/spool_ingest, a group of one request costs ~90 us on the committer)
 * until the sync ends, GATHER_MAX requests are queued, or GATHER_MS pass. */
#define GATHER_MAX 128
#define GATHER_MS 10

enum { STATE_PENDING = 0, STATE_DELIVERED = 1, STATE_DEAD = 2 };

/* Claimed row ids: open addressing (claim.c); only touched under claim_mu. */
typedef struct idset {
    int64_t *slots;
    size_t cap; /* power of two */
    size_t n;
} idset;

/* A recent dedupe key (dedupe.c): its hash (0: an empty slot), check, last
 * sighting and the id of its event's first row (0: none), as in its latest
 * rows or dedupe_recent row. */
typedef struct key_entry {
    int64_t h, chk, seen, first_id;
} key_entry;
/* Recent dedupe keys by hash, open addressing. Committer thread only. */
typedef struct keymap {
    key_entry *slots;
    size_t cap; /* power of two */
    size_t n;
} keymap;
/* A change of the map inside the open transaction, for its rollback. */
typedef struct undo_rec {
    key_entry before; /* the entry before (its h is the key's hash) */
    bool had;         /* else the key was not there */
} undo_rec;
/* A Bloom filter of dedupe hashes (keyfilter.c); committer thread only. */
typedef struct amp_spool_keyfilter amp_spool_keyfilter;
/* A filter sized for capacity keys (10 bits each). Caller owns. */
amp_spool_keyfilter *amp_spool_keyfilter_new(size_t capacity);
void amp_spool_keyfilter_free(amp_spool_keyfilter *f); /* accepts NULL */
void amp_spool_keyfilter_add(amp_spool_keyfilter *f, int64_t h);
/* False only if h was never added. */
bool amp_spool_keyfilter_may_hold(const amp_spool_keyfilter *f, int64_t h);
/* Hashes added (one added twice counts twice), and what it was sized for. */
size_t amp_spool_keyfilter_count(const amp_spool_keyfilter *f);
size_t amp_spool_keyfilter_capacity(const amp_spool_keyfilter *f);

typedef enum { WORK_BATCH, WORK_ACK, WORK_FLUSH } work_kind;

typedef struct work {
    struct work *next;
    work_kind kind;
    /* WORK_BATCH */
    amp_queue_batch *batch;
    amp_queue_done_fn done;
    void *ctx;
    amp_queue_result result;
    int64_t rows;    /* deliveries inserted */
    int64_t last_id; /* the highest of their ids; 0: none */
    int64_t epoch;   /* s->epoch when committed (see recover()) */
    /* WORK_ACK: owned copies */
    amp_queue_ack ack;
    /* WORK_FLUSH: both under q_mu */
    bool flushed;
    bool abandoned; /* its flusher gave up waiting: whoever answers frees it */
} work;

typedef struct amp_spool amp_spool;

struct amp_spool {
    sqlite3 *wdb; /* committer thread only */
    sqlite3 *rdb; /* under claim_mu */
    int64_t dedupe_window_ms;
    int64_t retention_ms;
    int64_t max_pending, max_bytes;
    atomic_llong depth;
    atomic_llong bytes;          /* pages in use, measured by check_limits() */
    _Atomic(const char *) full;  /* amp_queue_full(); set by check_limits() */
    int64_t next_maintenance_ms; /* committer only */
    int64_t sweep_from;          /* committer only: the dedupe sweep's next hash (upkeep.c) */
    /* Committer only (upkeep.c): when the size is measured next, and the
     * bytes of rows and results written since it was last. */
    int64_t bytes_next_ms, grown;
    /* Committer only (dedupe.c): the keys not yet in the dedupe table
     * (dedupe_recent's and those of the rows after rows_merged, which is
     * dedupe_merged.upto), the undo log of the open transaction, and the
     * merge under way (sorted by key; merged: how many are in the dedupe
     * table; merge_upto: its last dedupe_recent row, dropped_upto: the last
     * one deleted so far; merge_rows_upto: the last row when it began). */
    keymap recent;
    undo_rec *undo;
    size_t nundo, capundo;
    key_entry *merge;
    size_t nmerge, merged;
    int64_t merge_upto, dropped_upto;
    int64_t rows_merged, merge_rows_upto;
    /* The map holds all of those keys (false after a failed load: the
     * next merge loads it again first). */
    bool recent_complete;
    int64_t merge_after_ms; /* after a failed merge or compaction: none before (mono) */
    /* Committer only (dedupe.c): the runs of merged keys (dedupe_segs):
     * how many, their keys, the oldest one's time (wall clock), the last
     * run number given and the merge's own; the compaction under way (of
     * the runs up to compact_upto; 0: none), its next range of hashes from
     * compact_next (counted from the lowest hash), compact_width wide (0:
     * all of them). */
    int64_t runs, run_keys, oldest_run_ms, last_seg, merge_seg;
    int64_t compact_upto;
    uint64_t compact_next, compact_width;
    /* Committer only (dedupe.c): filter holds every hash of the dedupe
     * table, the runs and the map, so a key it does not hold is new
     * without a look; NULL until its first scan is done. filter_next is
     * being filled, the runs and then the table read in order from
     * (filter_scan_seg,) filter_scan_from: the first filter, or a bigger
     * one that replaces filter when done. */
    amp_spool_keyfilter *filter, *filter_next;
    bool filter_scan_runs; /* the runs first, from (filter_scan_seg, filter_scan_from) */
    int64_t filter_scan_seg, filter_scan_from;
    int64_t filter_after_ms; /* no new filter_next before (mono) */
    /* Committer only: acknowledgements whose commit failed. Their rows stay
     * claimed (a worker must not deliver them again) until a later commit
     * stores them; retried with the next group or every PROBE_INTERVAL_MS. */
    work *held, *held_tail; /* in the order they were queued */
    int64_t next_probe_ms;
    bool closing; /* the last group: nothing is held any more */

    pthread_mutex_t q_mu;
    pthread_cond_t q_cond;    /* work queued or stop */
    pthread_cond_t q_flushed; /* a flush marker was processed */
    work *q_head, *q_tail;
    size_t q_len;    /* items queued */
    size_t q_urgent; /* of those, requests and flushes (never kept waiting) */
    bool gathering;  /* the committer waits for the sync to end (GATHER_MAX) */
    int stop;
    pthread_t committer;

    /* With spool.sync "full" the committer does not wait for the disk: it
     * commits with synchronous=NORMAL (the log is written, not yet synced)
     * and hands the group's requests to the syncer, which fdatasyncs the
     * log and only then answers them; meanwhile the committer writes the
     * next group. A sync covers every group committed before it started. */
    int wal_fd; /* the log, opened by us; -1 when nothing is synced here */
    pthread_t syncer;
    bool syncer_running;
    pthread_mutex_t sync_mu;
    pthread_cond_t sync_cond; /* work to sync, or stop */
    work *sync_head, *sync_tail;
    bool sync_stop;
    atomic_bool syncing; /* in fdatasync; cleared under q_mu, with q_cond signalled */

    /* Checkpoints run on their own thread and connection, so the committer
     * never copies the log into the database between two groups. */
    sqlite3 *cdb; /* checkpointer thread only */
    pthread_t checkpointer;
    bool checkpointer_running;
    pthread_mutex_t ck_mu;
    pthread_cond_t ck_cond;    /* a checkpoint is due, or stop */
    pthread_mutex_t ck_run_mu; /* held while either thread checkpoints */
    bool ck_due, ck_stop;

    pthread_mutex_t claim_mu;
    idset claimed;

    /* Dead letters and the admin API's lookups (admin.c): their own
     * connection, so a long scan never holds up claims. NULL on an admin
     * handle, which uses rdb. */
    sqlite3 *adb; /* under admin_mu */
    pthread_mutex_t admin_mu;

    void (*notify)(void *);
    void *notify_ctx;
    atomic_bool writable;

    /* A row is claimed only once it is on disk: synced_max is the highest
     * row id known to be synced, committed_max the highest committed. After
     * a failed sync the rows above synced_max are not trusted (their senders
     * got 503, and the kernel may have dropped the pages it could not
     * write): `failed` makes the committer delete them (recover()) before it
     * stores anything else, and `epoch`, which recover() advances, tells the
     * syncer which of the groups it still holds were undone. */
    atomic_llong synced_max, committed_max, epoch;
    atomic_bool failed;
    bool refusing;        /* committer only: failed, and recover() did not work */
    int64_t rows_dropped; /* committer only: by recover() attempts since the failure */

    /* committer statements */
    sqlite3_stmt *st_begin, *st_commit, *st_rollback;
    sqlite3_stmt *st_savepoint, *st_release, *st_rollback_to;
    sqlite3_stmt *st_dedupe_find, *st_recent_add, *st_recent_all, *st_recent_ids;
    sqlite3_stmt *st_dedupe_merge, *st_recent_drop, *st_drop_recent_keys, *st_filter_scan;
    sqlite3_stmt *st_merged_get, *st_merged_set, *st_rows_keys;
    sqlite3_stmt *st_seg_add, *st_segs_get, *st_compact_copy, *st_compact_drop, *st_compact_end;
    sqlite3_stmt *st_filter_runs, *st_filter_nth, *st_drop_run_keys;
    sqlite3_stmt *st_insert;
    sqlite3_stmt *st_delivered, *st_retry, *st_dead, *st_waiting, *st_release_row;
    sqlite3_stmt *st_conv_set, *st_conv_clear;
    sqlite3_stmt *st_sweep_end, *st_prune_dedupe, *st_prune_delivered, *st_count_pending, *st_probe;
    sqlite3_stmt *st_drop_keys, *st_drop_rows, *st_max_id, *st_page_count, *st_free_pages;
    int64_t page_size; /* of the database, read once */
    sqlite3_stmt *st_data_version;
    int64_t data_version; /* committer only; see external_write() */
    /* reader statements */
    sqlite3_stmt *st_claim, *st_next_due;
};

/* ---- schema.c ---- */
/* Tests only: the hash becomes hash(key) (NULL: SHA-256 again), so a test
 * can make keys collide; the check stays SHA-256's. Process-wide, not
 * thread-safe: set it before opening a spool and reset it after closing. */
void amp_spool_set_key_hash_for_tests(int64_t (*hash)(const char *key));
/* Tests only: how often a dedupe check has looked in the dedupe table,
 * by every spool of the process. */
long amp_spool_dedupe_lookups_for_tests(void);
/* Opens a connection with the spool's pragmas and amp_key_hash(key) (the
 * dedupe table's key, amp_spool_key_hash in spool.h) and amp_key_check(key)
 * (its chk, amp_spool_key_digest) as SQL functions;
 * create: also a new file. An
 * admin connection (create false) first checks the schema version and
 * refuses any other than SCHEMA_VERSION, changing nothing. */
int amp_spool_open_db(const amp_spool_opts *opts, bool create, sqlite3 **db, char *err,
                      size_t errlen);
/* The name of the spool's VFS (walbuf.c: a transaction's log frames in a
 * few writes), registered on first use; NULL when it could not be, and
 * SQLite's default then serves. */
const char *amp_spool_vfs(void);
int amp_spool_migrate(sqlite3 *db, char *err, size_t errlen);
/* Prepares the statements of each connection s has open. */
int amp_spool_prepare_all(amp_spool *s, char *err, size_t errlen);
void amp_spool_finalize_all(amp_spool *s);

/* ---- submit.c ---- */
void amp_spool_submit(void *e, amp_queue_batch *b, amp_queue_done_fn done, void *ctx);
amp_queue_ack_status amp_spool_acknowledge(void *e, const amp_queue_ack *ack);
bool amp_spool_flush_until(void *e, int64_t deadline_ms);
void amp_spool_free_ack_strings(amp_queue_ack *a);
void amp_spool_notify_waiter(amp_spool *s);

/* ---- committer.c ---- */
void *amp_spool_committer_main(void *arg);
/* Steps st to its end and resets it: 0, or -1 on error. */
int amp_spool_step_done(sqlite3_stmt *st);
/* Binds v, or NULL; v borrowed until the statement is reset. */
void amp_spool_bind_text(sqlite3_stmt *st, int i, const char *v);

/* ---- syncer.c ---- */
int amp_spool_start_syncer(amp_spool *s, char *err, size_t errlen);
void amp_spool_stop_syncer(amp_spool *s);
void amp_spool_hand_to_syncer(amp_spool *s, work *head, work *tail);
void amp_spool_answer(amp_spool *s, work *w);

/* ---- checkpoint.c ---- */
int amp_spool_start_checkpointer(amp_spool *s, const amp_spool_opts *opts, char *err,
                                 size_t errlen);
void amp_spool_stop_checkpointer(amp_spool *s);
void amp_spool_stop_thread(pthread_t t, bool *running, pthread_mutex_t *mu, pthread_cond_t *cond,
                           bool *stop);

/* ---- upkeep.c ---- */
void amp_spool_check_limits(amp_spool *s, bool measure);
void amp_spool_count_pending(amp_spool *s);
void amp_spool_maintain(amp_spool *s);
/* When the next maintenance is due (monotonic ms): MAINTENANCE_INTERVAL_MS
 * from now, or what a test set. */
int64_t amp_spool_next_maintenance_ms(void);
/* Tests only: maintenance every ms instead (0: MAINTENANCE_INTERVAL_MS
 * again). Process-wide: set it before opening a spool. */
void amp_spool_set_maintenance_ms_for_tests(int64_t ms);

/* ---- claim.c ---- */
int amp_spool_claim(void *e, int shard, int64_t now_ms, amp_queue_job **jobs, size_t max,
                    int64_t *next_due_ms);
void amp_spool_idset_add(idset *s, int64_t id);
void amp_spool_sql_claimed(sqlite3_context *ctx, int argc, sqlite3_value **argv);
void amp_spool_idset_del(idset *s, int64_t id);

/* ---- dedupe.c ---- */
/* A new key between its check and its record: its hash and check. */
typedef struct dedupe_ticket {
    int64_t h, chk;
} dedupe_ticket;
/* Inside the committer's transaction: 1 when key is new (*t filled for
 * amp_spool_dedupe_record), 0 a duplicate, -1 on a failed statement. */
int amp_spool_dedupe_check(amp_spool *s, const char *key, int64_t now, dedupe_ticket *t);
/* Records a new key, once its event's rows are stored: first_id is the
 * first one's id (0: the event has none). 0, or -1 on a failed statement. */
int amp_spool_dedupe_record(amp_spool *s, const dedupe_ticket *t, int64_t now, int64_t first_id);
/* The undo log: mark before a savepoint, undo to the mark after its
 * rollback (0: the whole transaction), keep after a commit. */
size_t amp_spool_dedupe_mark(const amp_spool *s);
void amp_spool_dedupe_undo(amp_spool *s, size_t mark);
void amp_spool_dedupe_keep(amp_spool *s);
/* Between groups: a step of the merge (several while it lags), if one is
 * due or under way, and one of filling the key filter, if one is. */
void amp_spool_dedupe_after_group(amp_spool *s);
/* Maintenance: compaction steps for a moment, of the runs once they are
 * many or old (dedupe.c). */
void amp_spool_dedupe_compact_some(amp_spool *s);
/* The whole merge now (open, maintenance): 0, or -1 (logged). */
int amp_spool_dedupe_merge_all(amp_spool *s);
void amp_spool_dedupe_cancel_merge(amp_spool *s);
/* The map from dedupe_recent and the rows after dedupe_merged.upto: at
 * open, and after recover(). 0 or -1. */
int amp_spool_dedupe_load(amp_spool *s);
void amp_spool_dedupe_free(amp_spool *s);

/* ---- admin.c ---- */
int amp_spool_stats_get(void *e, amp_queue_stats *out);
int64_t amp_spool_oldest_pending_ms(void *e);
json_t *amp_spool_dlq_list(void *e, const amp_queue_dlq_filter *f, size_t limit);
int64_t amp_spool_dlq_replay(void *e, const amp_queue_dlq_filter *f);
int64_t amp_spool_dlq_purge(void *e, const amp_queue_dlq_filter *f);
json_t *amp_spool_event(void *e, const char *dedupe_key, size_t answer_chars);
json_t *amp_spool_app_depths(void *e);

#endif
