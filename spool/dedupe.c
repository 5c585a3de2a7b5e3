/* Dedupe keys (committer thread): recent keys in memory and in the rows
 * that store their events, merged into the hashed table in key order.
 *
 * A new key written straight into the dedupe table (schema v5: keyed by a
 * 64-bit hash) lands on a random page of it, and every commit writes each
 * page it changed to the log, each checkpoint back to the database: one
 * 4 KiB page per event, most of the spool's CPU per stored event. Instead a
 * new key is remembered in a hash map in memory, and on disk by the rows
 * that store its event (their dedupe_key and created_ms; schema v7): the
 * keys of the rows after dedupe_merged.upto (rows_merged) are the recent
 * ones, read again from those rows at open. A key with no such row (an
 * event without rows, or rows given ids at or below rows_merged) is
 * appended to dedupe_recent instead, in the same transaction; the map holds
 * both kinds. Once MERGE_KEYS have gathered (and at every maintenance, and
 * at open), they are merged into the dedupe table in key order, MERGE_SLICE
 * per transaction between groups, so a page of the table takes many keys at
 * a time; the last slice moves rows_merged to the last row there was when
 * the merge began, and the merged rows of dedupe_recent are deleted.
 * Appending each key to dedupe_recent as well, then deleting it after the
 * merge, cost the committer and checkpointer about a tenth of their CPU.
 *
 * A merge writes its keys as a run of their own (dedupe_runs, schema v8),
 * appended after the last run: merged straight into a table of millions of
 * keys, each of a merge's keys landed on a page of its own, a page in the
 * log and again in the checkpoint for every key. Once RUNS_MAX runs have
 * gathered (or, at a maintenance, the oldest is RUN_AGE_MS old), they are
 * compacted into the dedupe table: a range of hashes at a time, about
 * COMPACT_SLICE of the runs' keys per transaction between groups, so the
 * table's pages take many keys each; expired keys are left out. Every
 * step moves its keys in one transaction, so a key is always in the table
 * or in a run; a compaction cut short (a failure, a stop) starts again
 * over the runs that are left.
 *
 * A key is a duplicate while its last sighting (in the map, else in the
 * dedupe table or a run, where it is a page read each and no write) is
 * inside the window and its check (the digest's next 64 bits) matches too.
 * A different key with the same hash is stored, and its sighting replaces
 * the older key's in the map and the table: a later repeat of that one may
 * then be stored twice, never dropped.
 * The map follows the transaction: every change is logged for undo, and a
 * rolled back batch or group takes its changes back.
 *
 * Most keys are new, and a new key is in neither place: a look in the table
 * for it was a B-tree seek, about 3 us of the committer's CPU per event
 * (measured in the server under wrk). So a Bloom filter (keyfilter.c) holds
 * every hash of the table, the runs and the map, and a key it does not
 * hold is new without the look. It is filled between groups, FILTER_SLICE
 * hashes a step, the runs first (a compaction only moves keys from the
 * runs to the table, so none is missed), then the table in hash order,
 * from the first group that stores a key on; until that read is done every
 * miss is looked up as before. Hashes never leave it: a key pruned from the
 * table, or taken out of the map by a rollback, costs a look, never a lost
 * event. Once it has taken more hashes than it was sized for, another one
 * sized for twice as many is filled the same way and then replaces it. */
#include "spool_int.h"

#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "../base/alloc.h"
#include "../base/clock.h"
#include "../base/log.h"

/* Keys gathered before a merge starts, and keys merged per transaction
 * (one slice after each group). A slice holds the next group back:
 * measured with bench/spool_ingest, 1.8 ms median, 2.2 ms p90 (taking and
 * sorting the keys is a step of its own, ~1 ms); slices of 2,048 cost no
 * less CPU per key. A merge of more keys than MERGE_STEPS slices of
 * MERGE_SLICE takes bigger slices, so that it ends as soon. */
#define MERGE_KEYS 16384
#define MERGE_SLICE 512
#define MERGE_STEPS 32
/* Merged rows deleted from dedupe_recent per transaction (per slice of
 * MERGE_SLICE keys): all 16,384 in one took 3-5 ms. */
#define DROP_SLICE 4096
/* While the map holds MERGE_BACKLOG merges' worth of keys, MERGE_CATCH_UP
 * steps follow each group instead of one. An export's groups hold
 * thousands of events: at one step per group the map grew with the whole
 * export (1M keys, ~64 MiB). */
#define MERGE_BACKLOG 4
#define MERGE_CATCH_UP 8
/* The filter: sized for at least FILTER_MIN_KEYS, at most FILTER_MAX_KEYS
 * (10 MiB, and as much again while its successor is filled; a bigger table
 * makes more keys looked up, never fewer found).
 * A full-size one is filled again at most every FILTER_REFILL_MS, which
 * sheds the hashes of pruned keys. */
#define FILTER_MIN_KEYS 16384
#define FILTER_MAX_KEYS ((size_t)8 << 20)
#define FILTER_SLICE 4096
#define FILTER_REFILL_MS (3600 * 1000)
/* Runs gathered before a compaction (a lookup that the filter lets through
 * seeks in each), the age at which a maintenance compacts them anyway, and
 * the runs' keys moved into the table per step (about 1 ms on a table of
 * two million keys). While twice RUNS_MAX runs wait, MERGE_CATCH_UP steps
 * follow each group. A maintenance runs steps for up to
 * COMPACT_MAINTENANCE_MS, so that idle runs are compacted too. */
#define RUNS_MAX 16
#define RUN_AGE_MS (3600 * 1000)
#define COMPACT_SLICE 1024
#define COMPACT_MAINTENANCE_MS 20

static atomic_long lookups_for_tests;

long amp_spool_dedupe_lookups_for_tests(void) {
    return atomic_load(&lookups_for_tests);
}

/* ---- the map: open addressing on h; h 0 marks an empty slot
 * (amp_spool_key_hash never returns 0). */

static size_t slot_of(int64_t h, size_t cap) {
    return (size_t)(((uint64_t)h * 0x9E3779B97F4A7C15ull) >> 20) & (cap - 1);
}

static void map_put(keymap *m, const key_entry *e);

static void map_free(keymap *m) {
    free(m->slots);
    *m = (keymap){0};
}

static void map_grow(keymap *m) {
    keymap old = *m;
    m->cap = old.cap ? old.cap * 2 : 1024;
    m->slots = amp_xcalloc(m->cap, sizeof *m->slots);
    m->n = 0;
    for (size_t i = 0; i < old.cap; i++)
        if (old.slots[i].h)
            map_put(m, &old.slots[i]);
    map_free(&old);
}

/* The entry for h, or NULL. */
static const key_entry *map_get(const keymap *m, int64_t h) {
    if (!m->cap)
        return NULL;
    for (size_t i = slot_of(h, m->cap); m->slots[i].h; i = (i + 1) & (m->cap - 1))
        if (m->slots[i].h == h)
            return &m->slots[i];
    return NULL;
}

static void map_put(keymap *m, const key_entry *e) {
    if ((m->n + 1) * 2 > m->cap)
        map_grow(m);
    size_t i = slot_of(e->h, m->cap);
    while (m->slots[i].h && m->slots[i].h != e->h)
        i = (i + 1) & (m->cap - 1);
    if (!m->slots[i].h)
        m->n++;
    m->slots[i] = *e;
}

/* Backward-shift deletion, so lookups stay correct. */
static void map_del(keymap *m, int64_t h) {
    if (!m->cap)
        return;
    size_t mask = m->cap - 1, i = slot_of(h, m->cap);
    while (m->slots[i].h && m->slots[i].h != h)
        i = (i + 1) & mask;
    if (!m->slots[i].h)
        return;
    m->slots[i].h = 0;
    m->n--;
    for (size_t j = (i + 1) & mask; m->slots[j].h; j = (j + 1) & mask) {
        size_t home = slot_of(m->slots[j].h, m->cap);
        if (((j - home) & mask) >= ((j - i) & mask)) {
            m->slots[i] = m->slots[j];
            m->slots[j].h = 0;
            i = j;
        }
    }
}

/* ---- the filter ---- */

static size_t filter_size_for(size_t keys) {
    size_t want = keys > FILTER_MAX_KEYS / 2 ? FILTER_MAX_KEYS : keys * 2;
    return want < FILTER_MIN_KEYS ? FILTER_MIN_KEYS : want;
}

/* h is now in the map or the table. */
static void filter_note(amp_spool *s, int64_t h) {
    if (s->filter)
        amp_spool_keyfilter_add(s->filter, h);
    if (s->filter_next)
        amp_spool_keyfilter_add(s->filter_next, h);
}

/* A new filter_next for capacity keys, with the map's hashes; its read of
 * the runs, then of the table, starts at the lowest hash. */
static void filter_begin(amp_spool *s, size_t capacity) {
    amp_spool_keyfilter_free(s->filter_next);
    s->filter_next = amp_spool_keyfilter_new(capacity);
    for (size_t i = 0; i < s->recent.cap; i++)
        if (s->recent.slots[i].h)
            amp_spool_keyfilter_add(s->filter_next, s->recent.slots[i].h);
    s->filter_scan_runs = true;
    s->filter_scan_seg = 0;
    s->filter_scan_from = INT64_MIN;
}

/* One slice of filter_next's read of the runs or the table; after the
 * table's last one it replaces filter. Between groups only: hashes merged
 * since it began came from the map and were noted. */
static void filter_step(amp_spool *s) {
    amp_spool_keyfilter *f = s->filter_next;
    bool runs = s->filter_scan_runs;
    sqlite3_stmt *st = runs ? s->st_filter_runs : s->st_filter_scan;
    int arg = 1;
    if (runs)
        sqlite3_bind_int64(st, arg++, s->filter_scan_seg);
    sqlite3_bind_int64(st, arg++, s->filter_scan_from);
    sqlite3_bind_int64(st, arg, FILTER_SLICE);
    int rc, rows = 0;
    int64_t seg = 0, h = INT64_MIN;
    while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
        if (runs)
            seg = sqlite3_column_int64(st, 0);
        h = sqlite3_column_int64(st, runs ? 1 : 0);
        amp_spool_keyfilter_add(f, h);
        rows++;
    }
    sqlite3_reset(st);
    if (rc != SQLITE_DONE) {
        amp_log(AMP_LOG_WARN, "spool dedupe filter could not read the dedupe table", "{s:s}",
                "error", sqlite3_errmsg(s->wdb));
        amp_spool_keyfilter_free(f);
        s->filter_next = NULL;
        s->filter_after_ms = amp_mono_ms() + PROBE_INTERVAL_MS;
        return;
    }
    size_t n = amp_spool_keyfilter_count(f), cap = amp_spool_keyfilter_capacity(f);
    if (n > cap && cap < FILTER_MAX_KEYS) { /* the table outgrew it: again, bigger */
        filter_begin(s, filter_size_for(n));
        return;
    }
    if (runs) { /* (seg, h) > the last pair read */
        if (rows == FILTER_SLICE) {
            s->filter_scan_seg = seg;
            s->filter_scan_from = h;
        } else {
            s->filter_scan_runs = false;
            s->filter_scan_from = INT64_MIN;
        }
        return;
    }
    if (rows == FILTER_SLICE && h < INT64_MAX) {
        s->filter_scan_from = h + 1;
        return;
    }
    amp_spool_keyfilter_free(s->filter);
    s->filter = f;
    s->filter_next = NULL;
    if (cap == FILTER_MAX_KEYS)
        s->filter_after_ms = amp_mono_ms() + FILTER_REFILL_MS;
}

/* The keys of the dedupe table, estimated from where its FILTER_SLICE-th
 * lowest hash lies (hashes spread evenly over 64 bits); 0 when it holds
 * fewer or cannot be read (the filter then grows as it fills). */
static size_t table_keys_estimate(amp_spool *s) {
    sqlite3_bind_int64(s->st_filter_nth, 1, FILTER_SLICE - 1);
    double n = 0;
    if (sqlite3_step(s->st_filter_nth) == SQLITE_ROW) {
        uint64_t below = (uint64_t)sqlite3_column_int64(s->st_filter_nth, 0) ^ (1ull << 63);
        n = FILTER_SLICE * (18446744073709551616.0 / ((double)below + 1));
    }
    sqlite3_reset(s->st_filter_nth);
    return n < (double)FILTER_MAX_KEYS ? (size_t)n : FILTER_MAX_KEYS;
}

/* Between groups: the next slice of a filter being filled, or a new one
 * begun. */
static void filter_upkeep(amp_spool *s) {
    if (s->filter_next) {
        filter_step(s);
        return;
    }
    /* The first one once keys are being stored, sized for the keys there
     * are (a filter that outgrows its size while filled starts again,
     * bigger: on a table of two million keys, from 16,384 that read about
     * twice the table, and every key was looked up meanwhile); a bigger
     * one when full. */
    bool due = s->filter
                   ? amp_spool_keyfilter_count(s->filter) > amp_spool_keyfilter_capacity(s->filter)
                   : s->recent.n > 0;
    if (!due || amp_mono_ms() < s->filter_after_ms)
        return;
    size_t n = s->filter ? amp_spool_keyfilter_count(s->filter)
                         : table_keys_estimate(s) + (size_t)s->run_keys + s->recent.n;
    filter_begin(s, filter_size_for(n));
}

void amp_spool_dedupe_free(amp_spool *s) {
    amp_spool_keyfilter_free(s->filter);
    amp_spool_keyfilter_free(s->filter_next);
    s->filter = s->filter_next = NULL;
    map_free(&s->recent);
    free(s->undo);
    free(s->merge);
    s->undo = NULL;
    s->merge = NULL;
    s->nundo = s->capundo = s->nmerge = s->merged = 0;
}

/* A sighting read back into the map. Of two keys with one hash, the later
 * sighting wins, as it did in the map; of one event's rows (one sighting),
 * the first. */
static void reload_put(amp_spool *s, const key_entry *e) {
    const key_entry *old = map_get(&s->recent, e->h);
    if (!old || e->seen > old->seen || (e->seen == old->seen && e->chk != old->chk))
        map_put(&s->recent, e);
    filter_note(s, e->h);
}

/* The map again from dedupe_recent and the rows after dedupe_merged.upto
 * (nothing uncommitted may be pending). -1 on a read error (the map is
 * then incomplete: the next merge loads it again first, and meanwhile a
 * repeat may be stored twice). */
static int reload(amp_spool *s) {
    map_free(&s->recent);
    s->nundo = 0;
    s->recent_complete = false;
    int rc = sqlite3_step(s->st_merged_get);
    if (rc == SQLITE_ROW)
        s->rows_merged = sqlite3_column_int64(s->st_merged_get, 0);
    sqlite3_reset(s->st_merged_get);
    if (rc != SQLITE_ROW)
        return -1;
    while ((rc = sqlite3_step(s->st_recent_all)) == SQLITE_ROW)
        reload_put(s, &(key_entry){.h = sqlite3_column_int64(s->st_recent_all, 0),
                                   .seen = sqlite3_column_int64(s->st_recent_all, 1),
                                   .chk = sqlite3_column_int64(s->st_recent_all, 2),
                                   .first_id = sqlite3_column_int64(s->st_recent_all, 3)});
    sqlite3_reset(s->st_recent_all);
    if (rc != SQLITE_DONE)
        return -1;
    /* Without dedupe no key was recorded, and none is wanted. */
    sqlite3_bind_int64(s->st_rows_keys, 1, s->dedupe_window_ms > 0 ? s->rows_merged : INT64_MAX);
    while ((rc = sqlite3_step(s->st_rows_keys)) == SQLITE_ROW) {
        key_entry e = {.first_id = sqlite3_column_int64(s->st_rows_keys, 0),
                       .seen = sqlite3_column_int64(s->st_rows_keys, 1)};
        e.h = amp_spool_key_digest((const char *)sqlite3_column_text(s->st_rows_keys, 2), &e.chk);
        reload_put(s, &e);
    }
    sqlite3_reset(s->st_rows_keys);
    s->recent_complete = rc == SQLITE_DONE;
    return rc == SQLITE_DONE ? 0 : -1;
}

/* ---- admission, inside the committer's transaction ---- */

int amp_spool_dedupe_check(amp_spool *s, const char *key, int64_t now, dedupe_ticket *t) {
    int64_t chk, h = amp_spool_key_digest(key, &chk), since = now - s->dedupe_window_ms;
    const key_entry *had = map_get(&s->recent, h);
    if (had) {
        if (had->seen >= since && had->chk == chk)
            return 0;
    } else if (!s->filter || amp_spool_keyfilter_may_hold(s->filter, h)) {
        atomic_fetch_add_explicit(&lookups_for_tests, 1, memory_order_relaxed);
        sqlite3_bind_int64(s->st_dedupe_find, 1, h);
        sqlite3_bind_int64(s->st_dedupe_find, 2, chk);
        sqlite3_bind_int64(s->st_dedupe_find, 3, since);
        int rc = sqlite3_step(s->st_dedupe_find);
        bool found = rc == SQLITE_ROW && sqlite3_column_int(s->st_dedupe_find, 0);
        sqlite3_reset(s->st_dedupe_find);
        if (rc != SQLITE_ROW)
            return -1;
        if (found)
            return 0;
    }
    *t = (dedupe_ticket){.h = h, .chk = chk};
    return 1;
}

int amp_spool_dedupe_record(amp_spool *s, const dedupe_ticket *t, int64_t now, int64_t first_id) {
    /* Rows after rows_merged hold the key; any other goes to dedupe_recent. */
    if (first_id <= s->rows_merged) {
        sqlite3_bind_int64(s->st_recent_add, 1, t->h);
        sqlite3_bind_int64(s->st_recent_add, 2, now);
        if (first_id > 0)
            sqlite3_bind_int64(s->st_recent_add, 3, first_id);
        else
            sqlite3_bind_null(s->st_recent_add, 3);
        sqlite3_bind_int64(s->st_recent_add, 4, t->chk);
        if (amp_spool_step_done(s->st_recent_add))
            return -1;
    }
    if (s->nundo == s->capundo) {
        s->capundo = s->capundo ? s->capundo * 2 : 256;
        s->undo = amp_xrealloc(s->undo, s->capundo * sizeof *s->undo);
    }
    const key_entry *had = map_get(&s->recent, t->h);
    s->undo[s->nundo++] = had ? (undo_rec){.before = *had, .had = true}
                              : (undo_rec){.before = {.h = t->h}, .had = false};
    map_put(&s->recent, &(key_entry){.h = t->h, .chk = t->chk, .seen = now, .first_id = first_id});
    filter_note(s, t->h);
    return 0;
}

size_t amp_spool_dedupe_mark(const amp_spool *s) {
    return s->nundo;
}

void amp_spool_dedupe_undo(amp_spool *s, size_t mark) {
    while (s->nundo > mark) {
        undo_rec *u = &s->undo[--s->nundo];
        if (u->had)
            map_put(&s->recent, &u->before);
        else
            map_del(&s->recent, u->before.h);
    }
}

void amp_spool_dedupe_keep(amp_spool *s) {
    s->nundo = 0;
}

/* ---- merging ---- */

/* Sorts r[0..n) by the top 24 bits of the key (signed, as SQLite orders
 * rowids): keys that share those bits sit on one page of the dedupe table,
 * or on neighbouring ones, until it holds millions of pages. An LSD radix sort, 8
 * bits a pass, through a copy; qsort took ~2.5 ms for 16,384 keys, between
 * two groups. */
static unsigned key_digit(const key_entry *r, unsigned shift) {
    return (unsigned)((((uint64_t)r->h) ^ (1ull << 63)) >> shift & 0xff);
}

static void sort_by_key(key_entry *r, size_t n) {
    if (n < 2)
        return;
    key_entry *tmp = amp_xmalloc(n * sizeof *tmp), *from = r, *to = tmp;
    for (unsigned shift = 40; shift < 64; shift += 8) {
        size_t count[257] = {0};
        for (size_t i = 0; i < n; i++)
            count[key_digit(&from[i], shift) + 1]++;
        if (count[key_digit(&from[0], shift) + 1] == n)
            continue; /* one digit for all: nothing moves */
        for (size_t d = 1; d < 257; d++)
            count[d] += count[d - 1];
        for (size_t i = 0; i < n; i++)
            to[count[key_digit(&from[i], shift)]++] = from[i];
        key_entry *t = from;
        from = to;
        to = t;
    }
    if (from != r)
        memcpy(r, from, n * sizeof *r);
    free(tmp);
}

/* The last row's id, or -1 on a read error. */
static int64_t last_row(amp_spool *s) {
    int rc = sqlite3_step(s->st_max_id);
    int64_t id = rc == SQLITE_ROW ? sqlite3_column_int64(s->st_max_id, 0) : -1;
    sqlite3_reset(s->st_max_id);
    return id;
}

/* The keys to merge, sorted by key, into s->merge: from the map, which
 * holds each recent key with its latest sighting, the one the merge keeps
 * (reading and sorting dedupe_recent's rows stalled the committer 5-9 ms);
 * loaded again first if it may lack some. Between groups, so every row up
 * to the last one has its key in the map. */
static int merge_start(amp_spool *s) {
    int rc = !s->recent_complete && reload(s) ? SQLITE_ERROR : sqlite3_step(s->st_recent_ids);
    if (rc == SQLITE_ROW) {
        s->dropped_upto = sqlite3_column_int64(s->st_recent_ids, 0) - 1;
        s->merge_upto = sqlite3_column_int64(s->st_recent_ids, 1);
    }
    sqlite3_reset(s->st_recent_ids);
    s->merge_rows_upto = rc == SQLITE_ROW ? last_row(s) : -1;
    if (s->merge_rows_upto < 0) {
        amp_log(AMP_LOG_WARN, "spool dedupe merge failed", "{s:s}", "error",
                sqlite3_errmsg(s->wdb));
        s->merge_after_ms = amp_mono_ms() + PROBE_INTERVAL_MS;
        return -1;
    }
    s->merge = amp_xmalloc((s->recent.n + 1) * sizeof *s->merge);
    s->nmerge = s->merged = 0;
    s->merge_seg = ++s->last_seg;
    for (size_t i = 0; i < s->recent.cap; i++)
        if (s->recent.slots[i].h)
            s->merge[s->nmerge++] = s->recent.slots[i];
    sort_by_key(s->merge, s->nmerge);
    return 0;
}

void amp_spool_dedupe_cancel_merge(amp_spool *s) {
    free(s->merge);
    s->merge = NULL;
    s->nmerge = s->merged = 0;
}

/* After the last slice: the merged keys leave the map, unless sighted
 * again since (their new row is still in dedupe_recent, and the next merge
 * takes it); reloading the map from the table took 3-7 ms. */
static void forget_merged(amp_spool *s) {
    for (size_t i = 0; i < s->nmerge; i++) {
        const key_entry *k = &s->merge[i], *now = map_get(&s->recent, k->h);
        if (now && now->seen == k->seen && now->chk == k->chk)
            map_del(&s->recent, k->h);
    }
}

/* Commits a merge's or compaction's step if ok. Otherwise, or if the
 * commit fails, logs why (what_failed), rolls back and holds merges and
 * compactions back for PROBE_INTERVAL_MS, not again with every group while
 * the disk fails. Whether the step is committed. */
static bool step_commit(amp_spool *s, bool ok, const char *what_failed) {
    if (ok && amp_spool_step_done(s->st_commit) == 0)
        return true;
    amp_log(AMP_LOG_WARN, what_failed, "{s:s}", "error", sqlite3_errmsg(s->wdb));
    if (sqlite3_get_autocommit(s->wdb) == 0)
        amp_spool_step_done(s->st_rollback);
    s->merge_after_ms = amp_mono_ms() + PROBE_INTERVAL_MS;
    return false;
}

/* The runs' count, keys and oldest time again from dedupe_segs (a few
 * rows); the last run number only grows. -1 on a read error (the counts
 * stay as they were). */
static int runs_count(amp_spool *s) {
    int rc = sqlite3_step(s->st_segs_get);
    if (rc == SQLITE_ROW) {
        s->runs = sqlite3_column_int64(s->st_segs_get, 0);
        s->run_keys = sqlite3_column_int64(s->st_segs_get, 1);
        s->oldest_run_ms = sqlite3_column_int64(s->st_segs_get, 2);
        int64_t last = sqlite3_column_int64(s->st_segs_get, 3);
        if (last > s->last_seg)
            s->last_seg = last;
    }
    sqlite3_reset(s->st_segs_get);
    return rc == SQLITE_ROW ? 0 : -1;
}

/* A compaction of every run there is, if none is under way and one is
 * due: RUNS_MAX runs, or at a maintenance the oldest RUN_AGE_MS old. Its
 * ranges of hashes hold about COMPACT_SLICE of the runs' keys each. */
static void compact_start_if_due(amp_spool *s, bool maintenance) {
    if (s->compact_upto || s->runs == 0 || amp_mono_ms() < s->merge_after_ms)
        return;
    if (s->runs < RUNS_MAX && !(maintenance && s->oldest_run_ms <= amp_now_ms() - RUN_AGE_MS))
        return;
    uint64_t ranges = (uint64_t)(s->run_keys > 0 ? s->run_keys : 0) / COMPACT_SLICE + 1;
    s->compact_upto = s->last_seg;
    s->compact_next = 0;
    s->compact_width = ranges == 1 ? 0 : UINT64_MAX / ranges + 1;
}

/* A hash counted from the lowest one, as SQLite orders it. */
static int64_t hash_at(uint64_t offset) {
    return (int64_t)(offset ^ (1ull << 63));
}

/* One transaction: the next range's keys from the runs into the table;
 * with the last range, the runs go. Returns 1 while more is to do, 0 when
 * done, -1 on a failure (logged; the compaction starts again later over
 * what is left). Between groups only: nothing uncommitted. */
static int compact_step(amp_spool *s) {
    uint64_t lo = s->compact_next, w = s->compact_width;
    uint64_t hi = w == 0 || w - 1 > UINT64_MAX - lo ? UINT64_MAX : lo + w - 1;
    bool last = hi == UINT64_MAX;
    int64_t since = s->dedupe_window_ms > 0 ? amp_now_ms() - s->dedupe_window_ms : INT64_MIN;
    sqlite3_stmt *moves[] = {s->st_compact_copy, s->st_compact_drop};
    for (size_t i = 0; i < sizeof moves / sizeof moves[0]; i++) {
        sqlite3_bind_int64(moves[i], 1, hash_at(lo));
        sqlite3_bind_int64(moves[i], 2, hash_at(hi));
        sqlite3_bind_int64(moves[i], 3, s->compact_upto);
    }
    sqlite3_bind_int64(s->st_compact_copy, 4, since);
    bool ok = amp_spool_step_done(s->st_begin) == 0 &&
              amp_spool_step_done(s->st_compact_copy) == 0 &&
              amp_spool_step_done(s->st_compact_drop) == 0;
    if (ok && last) {
        sqlite3_bind_int64(s->st_compact_end, 1, s->compact_upto);
        ok = amp_spool_step_done(s->st_compact_end) == 0;
    }
    if (!step_commit(s, ok, "spool dedupe compaction failed")) {
        s->compact_upto = 0;
        return -1;
    }
    if (!last) {
        s->compact_next = hi + 1;
        return 1;
    }
    s->compact_upto = 0;
    runs_count(s);
    return 0;
}

/* One step: reading the keys to merge; then one transaction each: the
 * next slice (the last one also moves dedupe_merged.upto), or, after the
 * last one, the next DROP_SLICE merged rows out of dedupe_recent. Returns 1
 * while more is to do, 0 when done, -1 on a failure (the merge is dropped;
 * its keys are still in the map, and rows not yet dropped stay in
 * dedupe_recent: the next merge takes them, or drops them if they are
 * merged already). Between groups only: nothing uncommitted. */
static int merge_step(amp_spool *s) {
    if (!s->merge) /* reading and sorting the keys: a step of its own */
        return merge_start(s) ? -1 : 1;
    bool slicing = s->merged < s->nmerge;
    /* A merge has at most about MERGE_STEPS slices and as many deletes. */
    size_t slice = s->nmerge / MERGE_STEPS > MERGE_SLICE ? s->nmerge / MERGE_STEPS : MERGE_SLICE;
    int64_t drop = (int64_t)(slice * (DROP_SLICE / MERGE_SLICE));
    int64_t drop_upto =
        s->dropped_upto + drop < s->merge_upto ? s->dropped_upto + drop : s->merge_upto;
    int ok = amp_spool_step_done(s->st_begin) == 0;
    if (ok && slicing && s->merged == 0) { /* the run, with the first slice */
        sqlite3_bind_int64(s->st_seg_add, 1, s->merge_seg);
        sqlite3_bind_int64(s->st_seg_add, 2, (int64_t)s->nmerge);
        sqlite3_bind_int64(s->st_seg_add, 3, amp_now_ms());
        ok = amp_spool_step_done(s->st_seg_add) == 0;
    }
    size_t end = s->merged + slice < s->nmerge ? s->merged + slice : s->nmerge;
    for (; ok && slicing && s->merged < end; s->merged++) {
        const key_entry *k = &s->merge[s->merged];
        sqlite3_bind_int64(s->st_dedupe_merge, 1, k->h);
        sqlite3_bind_int64(s->st_dedupe_merge, 2, k->seen);
        if (k->first_id > 0)
            sqlite3_bind_int64(s->st_dedupe_merge, 3, k->first_id);
        else
            sqlite3_bind_null(s->st_dedupe_merge, 3);
        sqlite3_bind_int64(s->st_dedupe_merge, 4, k->chk);
        sqlite3_bind_int64(s->st_dedupe_merge, 5, s->merge_seg);
        ok = amp_spool_step_done(s->st_dedupe_merge) == 0;
    }
    bool last = slicing && end == s->nmerge;
    if (ok && last) {
        sqlite3_bind_int64(s->st_merged_set, 1, s->merge_rows_upto);
        ok = amp_spool_step_done(s->st_merged_set) == 0;
    }
    if (ok && !slicing) {
        sqlite3_bind_int64(s->st_recent_drop, 1, drop_upto);
        ok = amp_spool_step_done(s->st_recent_drop) == 0;
    }
    if (!step_commit(s, ok, "spool dedupe merge failed")) {
        amp_spool_dedupe_cancel_merge(s);
        return -1;
    }
    if (last) {
        s->rows_merged = s->merge_rows_upto;
        forget_merged(s);
        runs_count(s);
    }
    if (slicing)
        return 1;
    s->dropped_upto = drop_upto;
    if (drop_upto < s->merge_upto)
        return 1;
    amp_spool_dedupe_cancel_merge(s);
    return 0;
}

void amp_spool_dedupe_after_group(amp_spool *s) {
    /* One step after each group; several while the map holds many merges'
     * worth of keys (an export's groups are thousands of events each), so
     * that it stays bounded. */
    int steps = s->recent.n >= MERGE_BACKLOG * MERGE_KEYS ? MERGE_CATCH_UP : 1;
    for (int i = 0; i < steps; i++) {
        if (!s->merge && (s->recent.n < MERGE_KEYS || amp_mono_ms() < s->merge_after_ms))
            break;
        if (merge_step(s) < 0)
            break;
    }
    /* Compaction when no merge is under way; faster while runs pile up. */
    if (!s->merge)
        compact_start_if_due(s, false);
    steps = s->runs >= 2 * RUNS_MAX ? MERGE_CATCH_UP : 1;
    for (int i = 0; !s->merge && s->compact_upto && i < steps; i++)
        if (compact_step(s) <= 0)
            break;
    /* Even during a merge: big groups keep one under way most of the time. */
    filter_upkeep(s);
}

void amp_spool_dedupe_compact_some(amp_spool *s) {
    compact_start_if_due(s, true);
    int64_t until = amp_mono_ms() + COMPACT_MAINTENANCE_MS;
    while (s->compact_upto && amp_mono_ms() < until && compact_step(s) > 0)
        ;
}

int amp_spool_dedupe_merge_all(amp_spool *s) {
    /* No key to merge: rows_merged still follows the rows (those without
     * keys, or stored without dedupe), so that pruning can reach them. */
    if (!s->merge && s->recent.n == 0 && s->recent_complete) {
        int64_t last = last_row(s);
        if (last <= s->rows_merged)
            return last < 0 ? -1 : 0;
        sqlite3_bind_int64(s->st_merged_set, 1, last);
        if (amp_spool_step_done(s->st_merged_set))
            return -1;
        s->rows_merged = last;
        return 0;
    }
    int rc;
    while ((rc = merge_step(s)) == 1)
        ;
    return rc;
}

int amp_spool_dedupe_load(amp_spool *s) {
    return reload(s) || runs_count(s) ? -1 : 0;
}
