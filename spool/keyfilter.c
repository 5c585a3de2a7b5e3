/* A blocked Bloom filter of dedupe hashes (committer thread; dedupe.c
 * fills it and asks it). Each hash sets PROBES bits of one 64-byte block,
 * so adding or asking touches one cache line. It answers "not held" only
 * for a hash never added: a false "may hold" costs a look in the table,
 * never a lost event. */
#include "spool_int.h"

#include <stdlib.h>

#include "../base/alloc.h"

/* Ten bits a key and seven probes: at capacity 0.96% of new keys are
 * still looked up, with twice as many keys 14% (measured with random
 * hashes at 16 Ki to 8 Mi keys; a block holds 51 keys on average). */
#define BITS_PER_KEY 10
#define PROBES 7
#define BLOCK_WORDS 8 /* 512 bits */

struct amp_spool_keyfilter {
    uint64_t *words; /* nblocks blocks of BLOCK_WORDS */
    size_t nblocks, capacity, count;
};

amp_spool_keyfilter *amp_spool_keyfilter_new(size_t capacity) {
    amp_spool_keyfilter *f = amp_xcalloc(1, sizeof *f);
    size_t bits = capacity * BITS_PER_KEY;
    f->nblocks = bits / (BLOCK_WORDS * 64) + 1;
    f->capacity = capacity;
    f->words = amp_xcalloc(f->nblocks * BLOCK_WORDS, sizeof *f->words);
    return f;
}

void amp_spool_keyfilter_free(amp_spool_keyfilter *f) {
    if (f)
        free(f->words);
    free(f);
}

/* The hash picks the block; a second, independent mix of it the bits
 * (nine bits each: a bit of the block). */
static uint64_t *block_of(const amp_spool_keyfilter *f, int64_t h) {
    return &f->words[(size_t)((uint64_t)h % f->nblocks) * BLOCK_WORDS];
}

static uint64_t mix(int64_t h) {
    uint64_t z = (uint64_t)h + 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

void amp_spool_keyfilter_add(amp_spool_keyfilter *f, int64_t h) {
    uint64_t *b = block_of(f, h), m = mix(h);
    for (int i = 0; i < PROBES; i++, m >>= 9)
        b[(m >> 6) & 7] |= 1ull << (m & 63);
    f->count++;
}

bool amp_spool_keyfilter_may_hold(const amp_spool_keyfilter *f, int64_t h) {
    const uint64_t *b = block_of(f, h);
    uint64_t m = mix(h);
    for (int i = 0; i < PROBES; i++, m >>= 9)
        if (!(b[(m >> 6) & 7] & (1ull << (m & 63))))
            return false;
    return true;
}

size_t amp_spool_keyfilter_count(const amp_spool_keyfilter *f) {
    return f->count;
}

size_t amp_spool_keyfilter_capacity(const amp_spool_keyfilter *f) {
    return f->capacity;
}
