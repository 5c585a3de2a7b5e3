/*
 * fuzz_jsonr — the fast JSON reader (json/jsonr.c) against jansson.
 *
 * Input: any bytes, read as one JSON text.
 *
 * Properties checked:
 *  - whenever amp_json_parse returns a value, json_loadb(JSON_REJECT_DUPLICATES
 *    | JSON_DECODE_ANY) accepts the text too and builds the same tree: same
 *    types (integer vs real), integers, reals bit for bit, string bytes,
 *    object keys in the same order, arrays element by element;
 *  - the reader declines nothing jansson accepts, except texts with a NUL
 *    byte (jansson skips one right after a number or literal; the reader
 *    leaves those to it);
 *  - parsing is deterministic.
 */
#include <jansson.h>
#include <string.h>

#include "../../json/jsonr.h"
#include "../json_support.h"
#include "fuzz.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    const char *text = (const char *)data;
    json_error_t err;
    json_t *want = json_loadb(text, size, JSON_REJECT_DUPLICATES | JSON_DECODE_ANY, &err);
    json_t *got = amp_json_parse(text, size);
    if (got) {
        FUZZ_CHECK(want != NULL, "the reader accepted what jansson rejects: %s", err.text);
        const char *d = json_tree_diff(got, want);
        FUZZ_CHECK(d == NULL, "%s", d);
        json_t *again = amp_json_parse(text, size);
        FUZZ_CHECK(again && json_tree_diff(got, again) == NULL, "parsed twice differently");
        json_decref(again);
    } else {
        FUZZ_CHECK(want == NULL || memchr(text, '\0', size) != NULL,
                   "the reader declined what jansson accepts");
    }
    json_decref(got);
    json_decref(want);
    return 0;
}
