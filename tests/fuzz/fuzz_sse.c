/*
 * fuzz_sse — the reader of Dify's streaming answers (forward/sse.c):
 * text/event-stream bytes in any split, folded into the JSON a blocking
 * answer would have been.
 *
 * Input: byte 0 seeds the chunk sizes; the rest is the stream.
 *
 * Properties checked:
 *  - the folded result does not depend on how the stream is split: fed in
 *    one piece and fed in chunks of 1 to 64 bytes (never empty, as curl
 *    never delivers an empty chunk) give equal JSON and the same
 *    "complete" flag;
 *  - the result is NULL or an object that serialises; an "answer" is
 *    valid UTF-8 (jansson refuses anything else) of at most
 *    AMP_FORWARD_ANSWER_CAP bytes;
 *  - a parser reset after a stream behaves like a new one.
 */
#include <jansson.h>
#include <string.h>

#include "../../forward/forward_int.h"
#include "fuzz.h"

typedef struct {
    json_t *result;
    bool complete;
    int rc;
} outcome;

static outcome run(amp_forward_sse *p, const char *s, size_t len, unsigned seed) {
    outcome o = {0};
    size_t off = 0;
    uint32_t x = seed * 2654435761u + 1;
    while (off < len && o.rc == 0) {
        size_t n = len - off;
        if (seed) {
            x = x * 1103515245u + 12345u;
            size_t want = 1 + (x >> 16) % 64;
            if (want < n)
                n = want;
        }
        o.rc = amp_forward_sse_feed(p, s + off, n);
        off += n;
    }
    o.result = amp_forward_sse_finish(p, &o.complete);
    return o;
}

static void check(const outcome *o) {
    if (!o->result)
        return;
    FUZZ_CHECK(json_is_object(o->result), "result is not an object");
    const json_t *answer = json_object_get(o->result, "answer");
    if (answer) {
        FUZZ_CHECK(json_is_string(answer), "answer is not a string");
        FUZZ_CHECK(json_string_length(answer) <= AMP_FORWARD_ANSWER_CAP, "answer of %zu bytes",
                   json_string_length(answer));
    }
    char *text = json_dumps(o->result, JSON_COMPACT);
    FUZZ_CHECK(text, "result does not serialise");
    free(text);
}

static bool same(const outcome *a, const outcome *b) {
    if (a->complete != b->complete)
        return false;
    if (!a->result || !b->result)
        return a->result == b->result;
    return json_equal(a->result, b->result);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size == 0)
        return 0;
    unsigned seed = data[0] | 1u; /* never 0: 0 means one piece */
    const char *s = (const char *)data + 1;
    size_t len = size - 1;

    amp_forward_sse *p = amp_forward_sse_create();
    outcome whole = run(p, s, len, 0);
    check(&whole);

    amp_forward_sse_reset(p);
    outcome split = run(p, s, len, seed);
    check(&split);
    if (whole.rc == 0 && split.rc == 0) {
        char *a = whole.result ? json_dumps(whole.result, JSON_COMPACT) : NULL;
        char *b = split.result ? json_dumps(split.result, JSON_COMPACT) : NULL;
        FUZZ_CHECK(same(&whole, &split), "split changes the result: %s (complete %d) vs %s (%d)",
                   a ? a : "NULL", whole.complete, b ? b : "NULL", split.complete);
        free(a);
        free(b);
    }

    amp_forward_sse *fresh = amp_forward_sse_create();
    outcome again = run(fresh, s, len, seed);
    FUZZ_CHECK(again.rc == split.rc && same(&again, &split), "reset parser differs from new");

    json_decref(whole.result);
    json_decref(split.result);
    json_decref(again.result);
    amp_forward_sse_destroy(fresh);
    amp_forward_sse_destroy(p);
    return 0;
}
