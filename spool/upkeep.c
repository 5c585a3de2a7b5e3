/* Back-pressure limits, the pending count, and pruning (committer thread). */
#include "spool_int.h"

#include "../base/log.h"
#include "../base/clock.h"

#define PRUNE_BATCH 10000
/* The dedupe sweep reads at most this many slices of PRUNE_BATCH keys per
 * maintenance: a table of up to 100,000 keys is walked whole every minute,
 * a bigger one over several (a week of 10 million keys in 100 minutes). */
#define SWEEP_SLICES 10
#define BYTES_INTERVAL_MS 100

static const char full_pending[] = "the spool holds spool.max_pending events";
static const char full_bytes[] = "the spool reached spool.max_bytes";

/* A limit reached holds until a tenth of it is free again, so that a
 * spool at its limit does not flip (and log) with every delivery. */
static bool over(int64_t value, int64_t limit, bool was_over) {
    return limit > 0 && value >= (was_over ? limit - limit / 10 : limit);
}

/* The single value st reads (a pragma, a count), or -1. */
static int64_t single_value(sqlite3_stmt *st) {
    int64_t v = sqlite3_step(st) == SQLITE_ROW ? sqlite3_column_int64(st, 0) : -1;
    sqlite3_reset(st);
    return v;
}

/* Back-pressure, checked again after anything that changes the depth or
 * the size: a commit, a recount. Logs each change. While the size limit
 * holds, amp_spool_maintain() runs every PROBE_INTERVAL_MS, as it is what frees room.
 * The size is measured when asked (measure), when the rows written since
 * the last measurement could have reached spool.max_bytes, and at least
 * every BYTES_INTERVAL_MS; measuring after every commit was a fifth of a
 * small group's CPU. Committer thread (or amp_spool_open, before it starts). */
void amp_spool_check_limits(amp_spool *s, bool measure) {
    int64_t now = amp_mono_ms(), bytes = atomic_load(&s->bytes);
    /* Twice what was written, for the pages and indexes around it. */
    bool near = s->max_bytes > 0 && bytes + 2 * s->grown >= s->max_bytes - s->max_bytes / 10;
    if (measure || near || now >= s->bytes_next_ms) {
        int64_t pages = single_value(s->st_page_count), free_pages = single_value(s->st_free_pages);
        if (pages >= 0 && free_pages >= 0)
            atomic_store(&s->bytes, (pages - free_pages) * s->page_size);
        s->grown = 0;
        s->bytes_next_ms = now + BYTES_INTERVAL_MS;
    }
    int64_t depth = atomic_load(&s->depth);
    bytes = atomic_load(&s->bytes);
    const char *was = atomic_load(&s->full);
    const char *why = over(depth, s->max_pending, was == full_pending) ? full_pending
                      : over(bytes, s->max_bytes, was == full_bytes)   ? full_bytes
                                                                       : NULL;
    atomic_store(&s->full, why);
    if (why && why != was)
        amp_log(AMP_LOG_WARN, "spool full: new events get 503", "{s:s, s:I, s:I}", "reason", why,
                "pending", (json_int_t)depth, "bytes", (json_int_t)bytes);
    else if (!why && was)
        amp_log(AMP_LOG_INFO, "spool takes new events again", "{s:I, s:I}", "pending",
                (json_int_t)depth, "bytes", (json_int_t)bytes);
    int64_t soon = amp_mono_ms() + PROBE_INTERVAL_MS;
    if (why == full_bytes && s->next_maintenance_ms > soon)
        s->next_maintenance_ms = soon;
}

void amp_spool_count_pending(amp_spool *s) {
    int64_t pending = single_value(s->st_count_pending);
    if (pending >= 0)
        atomic_store(&s->depth, pending);
    amp_spool_check_limits(s, true);
}

/* Delete one bounded slice of expired rows; returns rows deleted. Only
 * rows whose keys are merged: the others hold their recent keys (schema
 * v7), and a maintenance merges them first. */
static int64_t prune(amp_spool *s, sqlite3_stmt *st, int64_t before_ms) {
    sqlite3_bind_int64(st, 1, before_ms);
    sqlite3_bind_int(st, 2, PRUNE_BATCH);
    sqlite3_bind_int64(st, 3, s->rows_merged);
    int64_t n = amp_spool_step_done(st) == 0 ? sqlite3_changes(s->wdb) : -1;
    if (n < 0)
        amp_log(AMP_LOG_WARN, "spool pruning failed", "{s:s}", "error", sqlite3_errmsg(s->wdb));
    return n;
}

/* Expired dedupe keys. The table has no index by time (schema v6): it is
 * walked in hash order, SWEEP_SLICES slices of PRUNE_BATCH keys per
 * maintenance, each slice's expired keys deleted in a transaction of its
 * own, from where the last maintenance stopped; a walk that reaches the end
 * of the table starts over at the next maintenance. An expired key thus
 * stays for at most one walk of the table, and a lookup compares its
 * sighting with the window anyway. Returns keys deleted, or -1. */
static int64_t sweep_dedupe(amp_spool *s, int64_t before_ms) {
    int64_t deleted = 0;
    for (int i = 0; i < SWEEP_SLICES; i++) {
        sqlite3_bind_int64(s->st_sweep_end, 1, s->sweep_from);
        sqlite3_bind_int(s->st_sweep_end, 2, PRUNE_BATCH);
        int rc = sqlite3_step(s->st_sweep_end);
        bool any = rc == SQLITE_ROW && sqlite3_column_type(s->st_sweep_end, 0) != SQLITE_NULL;
        int64_t end = any ? sqlite3_column_int64(s->st_sweep_end, 0) : 0;
        sqlite3_reset(s->st_sweep_end);
        if (rc != SQLITE_ROW)
            goto fail;
        if (!any) { /* past the last key */
            s->sweep_from = INT64_MIN;
            break;
        }
        sqlite3_bind_int64(s->st_prune_dedupe, 1, s->sweep_from);
        sqlite3_bind_int64(s->st_prune_dedupe, 2, end);
        sqlite3_bind_int64(s->st_prune_dedupe, 3, before_ms);
        if (amp_spool_step_done(s->st_prune_dedupe))
            goto fail;
        deleted += sqlite3_changes(s->wdb);
        if (end == INT64_MAX) {
            s->sweep_from = INT64_MIN;
            break;
        }
        s->sweep_from = end + 1;
    }
    return deleted;
fail:
    amp_log(AMP_LOG_WARN, "spool pruning failed", "{s:s}", "error", sqlite3_errmsg(s->wdb));
    return -1;
}

static int64_t maintenance_ms_for_tests;

void amp_spool_set_maintenance_ms_for_tests(int64_t ms) {
    maintenance_ms_for_tests = ms;
}

int64_t amp_spool_next_maintenance_ms(void) {
    return amp_mono_ms() +
           (maintenance_ms_for_tests > 0 ? maintenance_ms_for_tests : MAINTENANCE_INTERVAL_MS);
}

/* Runs between groups on the committer thread; each slice is its own short
 * transaction so ingest never waits long behind it. */
void amp_spool_maintain(amp_spool *s) {
    int64_t now = amp_now_ms(), deduped = 0, delivered = 0, n;
    if (!atomic_load(&s->failed)) {
        amp_spool_dedupe_merge_all(s);
        amp_spool_dedupe_compact_some(s);
    }
    if (s->dedupe_window_ms > 0 && (n = sweep_dedupe(s, now - s->dedupe_window_ms)) > 0)
        deduped = n;
    /* Over spool.max_bytes, delivered rows go before their retention. */
    bool pressed = atomic_load(&s->full) == full_bytes;
    if (s->retention_ms > 0 || pressed)
        while ((n = prune(s, s->st_prune_delivered, pressed ? now + 1 : now - s->retention_ms)) >
                   0 &&
               (delivered += n) < 100 * PRUNE_BATCH)
            ;
    amp_spool_count_pending(s);
    if (deduped || delivered)
        amp_log(AMP_LOG_INFO, "spool pruned", "{s:I, s:I, s:I, s:b}", "dedupe_keys",
                (json_int_t)deduped, "delivered", (json_int_t)delivered, "pending",
                (json_int_t)atomic_load(&s->depth), "before_retention", pressed);
}
