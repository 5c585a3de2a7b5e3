/*
 * fuzz_jsonr — the fast JSON reader (server/jsonr.c) against jansson.
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

#include "../../server/jsonr.h"
#include "fuzz.h"

/* Where two trees differ, or NULL. Not json_equal: that ignores key order
 * and treats 0.0 and -0.0 as equal. */
static const char *tree_diff(const json_t *a, const json_t *b) {
    if (json_typeof(a) != json_typeof(b))
        return "types differ";
    switch (json_typeof(a)) {
    case JSON_INTEGER:
        return json_integer_value(a) == json_integer_value(b) ? NULL : "integers differ";
    case JSON_REAL: {
        double x = json_real_value(a), y = json_real_value(b);
        return memcmp(&x, &y, sizeof x) == 0 ? NULL : "reals differ";
    }
    case JSON_STRING:
        if (json_string_length(a) != json_string_length(b) ||
            memcmp(json_string_value(a), json_string_value(b), json_string_length(a)) != 0)
            return "strings differ";
        return NULL;
    case JSON_ARRAY:
        if (json_array_size(a) != json_array_size(b))
            return "array sizes differ";
        for (size_t i = 0; i < json_array_size(a); i++) {
            const char *d = tree_diff(json_array_get(a, i), json_array_get(b, i));
            if (d)
                return d;
        }
        return NULL;
    case JSON_OBJECT: {
        json_t *oa = (json_t *)a, *ob = (json_t *)b;
        if (json_object_size(oa) != json_object_size(ob))
            return "object sizes differ";
        void *ia = json_object_iter(oa), *ib = json_object_iter(ob);
        for (; ia && ib; ia = json_object_iter_next(oa, ia), ib = json_object_iter_next(ob, ib)) {
            size_t ka = json_object_iter_key_len(ia), kb = json_object_iter_key_len(ib);
            if (ka != kb || memcmp(json_object_iter_key(ia), json_object_iter_key(ib), ka) != 0)
                return "keys or key order differ";
            const char *d = tree_diff(json_object_iter_value(ia), json_object_iter_value(ib));
            if (d)
                return d;
        }
        return ia || ib ? "object iteration lengths differ" : NULL;
    }
    default:
        return NULL;
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    const char *text = (const char *)data;
    json_error_t err;
    json_t *want = json_loadb(text, size, JSON_REJECT_DUPLICATES | JSON_DECODE_ANY, &err);
    json_t *got = amp_json_parse(text, size);
    if (got) {
        FUZZ_CHECK(want != NULL, "the reader accepted what jansson rejects: %s", err.text);
        const char *d = tree_diff(got, want);
        FUZZ_CHECK(d == NULL, "%s", d);
        json_t *again = amp_json_parse(text, size);
        FUZZ_CHECK(again && tree_diff(got, again) == NULL, "parsed twice differently");
        json_decref(again);
    } else {
        FUZZ_CHECK(want == NULL || memchr(text, '\0', size) != NULL,
                   "the reader declined what jansson accepts");
    }
    json_decref(got);
    json_decref(want);
    return 0;
}
