/* Claims for delivery, and the set of claimed row ids. */
#include "spool_int.h"

#include <stdlib.h>

#include "../base/log.h"
#include "../base/alloc.h"

/* ---- claimed-id set ------------------------------------------------------
 * Open addressing with linear probing and backward-shift deletion; ids are
 * positive, 0 marks an empty slot. Only touched under claim_mu. */

static size_t idset_hash(int64_t id, size_t cap) {
    uint64_t x = (uint64_t)id * 0x9E3779B97F4A7C15ull;
    return (size_t)(x >> 17) & (cap - 1);
}

static void idset_grow(idset *s) {
    idset old = *s;
    s->cap = old.cap ? old.cap * 2 : 256;
    s->slots = amp_xcalloc(s->cap, sizeof(int64_t));
    s->n = 0;
    for (size_t i = 0; i < old.cap; i++)
        if (old.slots[i])
            amp_spool_idset_add(s, old.slots[i]);
    free(old.slots);
}

void amp_spool_idset_add(idset *s, int64_t id) {
    if ((s->n + 1) * 2 > s->cap)
        idset_grow(s);
    size_t i = idset_hash(id, s->cap);
    while (s->slots[i] && s->slots[i] != id)
        i = (i + 1) & (s->cap - 1);
    if (!s->slots[i]) {
        s->slots[i] = id;
        s->n++;
    }
}

static int idset_has(const idset *s, int64_t id) {
    if (!s->cap)
        return 0;
    size_t i = idset_hash(id, s->cap);
    while (s->slots[i]) {
        if (s->slots[i] == id)
            return 1;
        i = (i + 1) & (s->cap - 1);
    }
    return 0;
}

void amp_spool_idset_del(idset *s, int64_t id) {
    if (!s->cap)
        return;
    size_t mask = s->cap - 1, i = idset_hash(id, s->cap);
    while (s->slots[i] && s->slots[i] != id)
        i = (i + 1) & mask;
    if (!s->slots[i])
        return;
    s->slots[i] = 0;
    s->n--;
    /* Shift back the entries of the same probe run so lookups stay correct. */
    for (size_t j = (i + 1) & mask; s->slots[j]; j = (j + 1) & mask) {
        size_t h = idset_hash(s->slots[j], s->cap);
        if (((j - h) & mask) >= ((j - i) & mask)) {
            s->slots[i] = s->slots[j];
            s->slots[j] = 0;
            i = j;
        }
    }
}

/* amp_claimed(id) in the claim query: true for a row handed out and not yet
 * acknowledged. The claim query tests it on its index's entries, before it
 * reads a row, so claimed rows (all of them still pending in the database,
 * and the oldest due) cost an index entry each, not a row. Called while
 * the claim steps, under claim_mu. */
void amp_spool_sql_claimed(sqlite3_context *ctx, int argc, sqlite3_value **argv) {
    (void)argc;
    amp_spool *s = sqlite3_user_data(ctx);
    sqlite3_result_int(ctx, idset_has(&s->claimed, sqlite3_value_int64(argv[0])));
}

static char *col_text(sqlite3_stmt *st, int i) {
    const unsigned char *t = sqlite3_column_text(st, i);
    return t ? amp_xstrdup((const char *)t) : NULL;
}

/* One shard: the hint changes nothing. */
int amp_spool_claim(void *e, int shard, int64_t now_ms, amp_queue_job **jobs, size_t max,
                    int64_t *next_due_ms) {
    (void)shard;
    amp_spool *s = e;
    size_t n = 0;
    int rc = 0;
    *next_due_ms = INT64_MAX;
    pthread_mutex_lock(&s->claim_mu);
    /* Claimed rows are still pending in the database; the query skips them
     * (amp_claimed()). */
    sqlite3_bind_int64(s->st_claim, 1, now_ms);
    sqlite3_bind_int64(s->st_claim, 2, (sqlite3_int64)max);
    sqlite3_bind_int64(s->st_claim, 3, atomic_load(&s->synced_max));
    int step = SQLITE_DONE;
    while (n < max && (step = sqlite3_step(s->st_claim)) == SQLITE_ROW) {
        int64_t id = sqlite3_column_int64(s->st_claim, 0);
        if (idset_has(&s->claimed, id))
            continue;
        amp_queue_job *j = amp_xcalloc(1, sizeof *j);
        j->id = id;
        j->route = col_text(s->st_claim, 1);
        j->app = col_text(s->st_claim, 2);
        j->user = col_text(s->st_claim, 3);
        j->body = col_text(s->st_claim, 4);
        j->dedupe_key = col_text(s->st_claim, 5);
        j->conversation_id = col_text(s->st_claim, 6);
        j->per_user = sqlite3_column_int(s->st_claim, 7) != 0;
        j->attempts = sqlite3_column_int(s->st_claim, 8);
        j->created_ms = sqlite3_column_int64(s->st_claim, 9);
        j->run_id = col_text(s->st_claim, 10);
        j->source = col_text(s->st_claim, 11);
        amp_spool_idset_add(&s->claimed, id);
        jobs[n++] = j;
    }
    if (n < max && step != SQLITE_DONE) {
        amp_log(AMP_LOG_ERROR, "spool claim failed", "{s:s}", "error", sqlite3_errmsg(s->rdb));
        rc = -1;
    }
    sqlite3_reset(s->st_claim);

    if (n == max) {
        *next_due_ms = now_ms; /* there may be more due right now */
    } else if (rc == 0) {
        sqlite3_bind_int64(s->st_next_due, 1, now_ms);
        if (sqlite3_step(s->st_next_due) == SQLITE_ROW &&
            sqlite3_column_type(s->st_next_due, 0) != SQLITE_NULL)
            *next_due_ms = sqlite3_column_int64(s->st_next_due, 0);
        sqlite3_reset(s->st_next_due);
    }
    pthread_mutex_unlock(&s->claim_mu);
    return rc < 0 && n == 0 ? -1 : (int)n;
}
