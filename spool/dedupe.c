/* Dedupe keys (committer thread): recent keys in memory and in an
 * append-only table, merged into the hashed table in key order.
 *
 * A new key written straight into the dedupe table (schema v5: keyed by a
 * 64-bit hash) lands on a random page of it, and every commit writes each
 * page it changed to the log, each checkpoint back to the database: one
 * 4 KiB page per event, most of the spool's CPU per stored event. Instead a
 * new key is appended to dedupe_recent (the page at its end, shared by the
 * group's keys) in the transaction that stores its rows, and remembered in
 * a hash map in memory that holds exactly dedupe_recent's keys. Once
 * MERGE_KEYS have gathered (and at every maintenance, and at open), they
 * are merged into the dedupe table in key order, MERGE_SLICE per
 * transaction between groups, so a page of the table takes many keys at a
 * time; the merged rows then leave dedupe_recent.
 *
 * A key is a duplicate while its last sighting (in the map, else in the
 * dedupe table, where it is a page read and no write) is inside the window
 * and its check (the digest's next 64 bits) matches too. A different key
 * with the same hash is stored, and its sighting replaces the older key's:
 * a later repeat of that one may then be stored twice, never dropped.
 * The map follows the transaction: every change is logged for undo, and a
 * rolled back batch or group takes its changes back. */
#include "spool_int.h"

#include <stdlib.h>
#include <string.h>

#include "../base/alloc.h"
#include "../base/clock.h"
#include "../base/log.h"

/* Keys gathered before a merge starts, and keys merged per transaction
 * (one slice after each group). A slice holds the next group back:
 * measured with bench/spool_ingest, 1.8 ms median, 2.2 ms p90, at most
 * 9 ms (reading and sorting the keys is a step of its own; the last one
 * also reloads the map); slices of 2,048 cost no less CPU per key. */
#define MERGE_KEYS 16384
#define MERGE_SLICE 512

/* ---- the map: h -> chk, seen_ms, open addressing; h 0 marks an empty slot
 * (amp_spool_key_hash never returns 0). */

static size_t slot_of(int64_t h, size_t cap) {
    return (size_t)(((uint64_t)h * 0x9E3779B97F4A7C15ull) >> 20) & (cap - 1);
}

static void map_put(keymap *m, int64_t h, int64_t chk, int64_t seen);

static void map_free(keymap *m) {
    free(m->keys);
    free(m->chk);
    free(m->seen);
    *m = (keymap){0};
}

static void map_grow(keymap *m) {
    keymap old = *m;
    m->cap = old.cap ? old.cap * 2 : 1024;
    m->keys = amp_xcalloc(m->cap, sizeof *m->keys);
    m->chk = amp_xcalloc(m->cap, sizeof *m->chk);
    m->seen = amp_xcalloc(m->cap, sizeof *m->seen);
    m->n = 0;
    for (size_t i = 0; i < old.cap; i++)
        if (old.keys[i])
            map_put(m, old.keys[i], old.chk[i], old.seen[i]);
    map_free(&old);
}

static bool map_get(const keymap *m, int64_t h, int64_t *chk, int64_t *seen) {
    if (!m->cap)
        return false;
    for (size_t i = slot_of(h, m->cap); m->keys[i]; i = (i + 1) & (m->cap - 1))
        if (m->keys[i] == h) {
            *chk = m->chk[i];
            *seen = m->seen[i];
            return true;
        }
    return false;
}

static void map_put(keymap *m, int64_t h, int64_t chk, int64_t seen) {
    if ((m->n + 1) * 2 > m->cap)
        map_grow(m);
    size_t i = slot_of(h, m->cap);
    while (m->keys[i] && m->keys[i] != h)
        i = (i + 1) & (m->cap - 1);
    if (!m->keys[i])
        m->n++;
    m->keys[i] = h;
    m->chk[i] = chk;
    m->seen[i] = seen;
}

/* Backward-shift deletion, so lookups stay correct. */
static void map_del(keymap *m, int64_t h) {
    if (!m->cap)
        return;
    size_t mask = m->cap - 1, i = slot_of(h, m->cap);
    while (m->keys[i] && m->keys[i] != h)
        i = (i + 1) & mask;
    if (!m->keys[i])
        return;
    m->keys[i] = 0;
    m->n--;
    for (size_t j = (i + 1) & mask; m->keys[j]; j = (j + 1) & mask) {
        size_t home = slot_of(m->keys[j], m->cap);
        if (((j - home) & mask) >= ((j - i) & mask)) {
            m->keys[i] = m->keys[j];
            m->chk[i] = m->chk[j];
            m->seen[i] = m->seen[j];
            m->keys[j] = 0;
            i = j;
        }
    }
}

void amp_spool_dedupe_free(amp_spool *s) {
    map_free(&s->recent);
    free(s->undo);
    free(s->merge);
    s->undo = NULL;
    s->merge = NULL;
    s->nundo = s->capundo = s->nmerge = s->merged = 0;
}

/* The map again from dedupe_recent (nothing uncommitted may be pending).
 * -1 on a read error (the map is then empty: keys are still found in the
 * table by the next load, and meanwhile a repeat may be stored twice). */
static int reload(amp_spool *s) {
    map_free(&s->recent);
    s->nundo = 0;
    int rc;
    /* In row order: of two keys with one hash, the later sighting wins, as
     * it did in the map. */
    while ((rc = sqlite3_step(s->st_recent_all)) == SQLITE_ROW) {
        int64_t h = sqlite3_column_int64(s->st_recent_all, 0),
                seen = sqlite3_column_int64(s->st_recent_all, 1),
                chk = sqlite3_column_int64(s->st_recent_all, 2), old_chk, old;
        if (!map_get(&s->recent, h, &old_chk, &old) || seen >= old)
            map_put(&s->recent, h, chk, seen);
    }
    sqlite3_reset(s->st_recent_all);
    return rc == SQLITE_DONE ? 0 : -1;
}

/* ---- admission, inside the committer's transaction ---- */

int amp_spool_dedupe_check(amp_spool *s, const char *key, int64_t now, dedupe_ticket *t) {
    int64_t chk, h = amp_spool_key_digest(key, &chk), since = now - s->dedupe_window_ms;
    int64_t seen = 0, had_chk = 0;
    bool had = map_get(&s->recent, h, &had_chk, &seen);
    if (had) {
        if (seen >= since && had_chk == chk)
            return 0;
    } else {
        sqlite3_bind_int64(s->st_dedupe_find, 1, h);
        int rc = sqlite3_step(s->st_dedupe_find);
        bool found = rc == SQLITE_ROW;
        int64_t merged_seen = found ? sqlite3_column_int64(s->st_dedupe_find, 0) : 0;
        int64_t merged_chk = found ? sqlite3_column_int64(s->st_dedupe_find, 1) : 0;
        sqlite3_reset(s->st_dedupe_find);
        if (rc != SQLITE_ROW && rc != SQLITE_DONE)
            return -1;
        if (found && merged_seen >= since && merged_chk == chk)
            return 0;
    }
    *t = (dedupe_ticket){.h = h, .chk = chk, .had = had, .had_chk = had_chk, .had_seen = seen};
    return 1;
}

int amp_spool_dedupe_record(amp_spool *s, const dedupe_ticket *t, int64_t now, int64_t first_id) {
    sqlite3_bind_int64(s->st_recent_add, 1, t->h);
    sqlite3_bind_int64(s->st_recent_add, 2, now);
    if (first_id > 0)
        sqlite3_bind_int64(s->st_recent_add, 3, first_id);
    else
        sqlite3_bind_null(s->st_recent_add, 3);
    sqlite3_bind_int64(s->st_recent_add, 4, t->chk);
    if (amp_spool_step_done(s->st_recent_add))
        return -1;
    if (s->nundo == s->capundo) {
        s->capundo = s->capundo ? s->capundo * 2 : 256;
        s->undo = amp_xrealloc(s->undo, s->capundo * sizeof *s->undo);
    }
    s->undo[s->nundo++] =
        (undo_rec){.h = t->h, .chk = t->had_chk, .seen = t->had_seen, .had = t->had};
    map_put(&s->recent, t->h, t->chk, now);
    return 0;
}

size_t amp_spool_dedupe_mark(const amp_spool *s) {
    return s->nundo;
}

void amp_spool_dedupe_undo(amp_spool *s, size_t mark) {
    while (s->nundo > mark) {
        undo_rec *u = &s->undo[--s->nundo];
        if (u->had)
            map_put(&s->recent, u->h, u->chk, u->seen);
        else
            map_del(&s->recent, u->h);
    }
}

void amp_spool_dedupe_keep(amp_spool *s) {
    s->nundo = 0;
}

/* ---- merging ---- */

/* By key, then row order: of two keys with one hash, the later wins. */
static int by_h(const void *a, const void *b) {
    const merge_rec *x = a, *y = b;
    if (x->h != y->h)
        return x->h < y->h ? -1 : 1;
    return x->id < y->id ? -1 : x->id > y->id;
}

/* Reads dedupe_recent, sorted by key, into s->merge. */
static int merge_start(amp_spool *s) {
    size_t cap = s->recent.n + 64;
    s->merge = amp_xmalloc(cap * sizeof *s->merge);
    s->nmerge = s->merged = 0;
    s->merge_upto = 0;
    int rc;
    while ((rc = sqlite3_step(s->st_recent_rows)) == SQLITE_ROW) {
        if (s->nmerge == cap) {
            cap *= 2;
            s->merge = amp_xrealloc(s->merge, cap * sizeof *s->merge);
        }
        merge_rec *r = &s->merge[s->nmerge++];
        r->id = sqlite3_column_int64(s->st_recent_rows, 0);
        r->h = sqlite3_column_int64(s->st_recent_rows, 1);
        r->seen = sqlite3_column_int64(s->st_recent_rows, 2);
        r->first_id = sqlite3_column_int64(s->st_recent_rows, 3);
        r->chk = sqlite3_column_int64(s->st_recent_rows, 4);
        if (r->id > s->merge_upto)
            s->merge_upto = r->id;
    }
    sqlite3_reset(s->st_recent_rows);
    if (rc != SQLITE_DONE) {
        amp_log(AMP_LOG_WARN, "spool dedupe merge failed", "{s:s}", "error",
                sqlite3_errmsg(s->wdb));
        amp_spool_dedupe_cancel_merge(s);
        s->merge_after_ms = amp_mono_ms() + PROBE_INTERVAL_MS;
        return -1;
    }
    qsort(s->merge, s->nmerge, sizeof *s->merge, by_h);
    return 0;
}

void amp_spool_dedupe_cancel_merge(amp_spool *s) {
    free(s->merge);
    s->merge = NULL;
    s->nmerge = s->merged = 0;
}

/* One step: reading the keys to merge; then one transaction each: the
 * next slice, or, after the last one, the merged rows out of
 * dedupe_recent. Returns 1 while more is to do, 0 when done, -1 on
 * a failure (the merge is dropped; its rows stay in dedupe_recent and are
 * merged again next time). Between groups only: nothing uncommitted. */
static int merge_step(amp_spool *s) {
    if (!s->merge) /* reading and sorting the keys: a step of its own */
        return merge_start(s) ? -1 : 1;
    bool last = s->merged == s->nmerge;
    int ok = amp_spool_step_done(s->st_begin) == 0;
    size_t end = s->merged + MERGE_SLICE < s->nmerge ? s->merged + MERGE_SLICE : s->nmerge;
    for (; ok && !last && s->merged < end; s->merged++) {
        const merge_rec *r = &s->merge[s->merged];
        sqlite3_bind_int64(s->st_dedupe_merge, 1, r->h);
        sqlite3_bind_int64(s->st_dedupe_merge, 2, r->seen);
        sqlite3_bind_int64(s->st_dedupe_merge, 3, r->first_id);
        sqlite3_bind_int64(s->st_dedupe_merge, 4, r->chk);
        ok = amp_spool_step_done(s->st_dedupe_merge) == 0;
    }
    if (ok && last) {
        sqlite3_bind_int64(s->st_recent_drop, 1, s->merge_upto);
        ok = amp_spool_step_done(s->st_recent_drop) == 0;
    }
    ok = ok && amp_spool_step_done(s->st_commit) == 0;
    if (!ok) {
        amp_log(AMP_LOG_WARN, "spool dedupe merge failed", "{s:s}", "error",
                sqlite3_errmsg(s->wdb));
        if (sqlite3_get_autocommit(s->wdb) == 0)
            amp_spool_step_done(s->st_rollback);
        amp_spool_dedupe_cancel_merge(s);
        /* Not again with every group while the disk fails. */
        s->merge_after_ms = amp_mono_ms() + PROBE_INTERVAL_MS;
        return -1;
    }
    if (!last)
        return 1;
    amp_spool_dedupe_cancel_merge(s);
    return reload(s) == 0 ? 0 : -1;
}

void amp_spool_dedupe_after_group(amp_spool *s) {
    if (s->merge || (s->recent.n >= MERGE_KEYS && amp_mono_ms() >= s->merge_after_ms))
        merge_step(s);
}

int amp_spool_dedupe_merge_all(amp_spool *s) {
    if (!s->merge && s->recent.n == 0)
        return 0;
    int rc;
    while ((rc = merge_step(s)) == 1)
        ;
    return rc;
}

int amp_spool_dedupe_load(amp_spool *s) {
    return reload(s);
}
