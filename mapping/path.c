/*
 * path — field paths into events and mapped objects
 * (`user_properties.plan`, `user_properties["a.b"]`, `items[0]`), split once
 * at compile time, and the JSON paths that name config errors.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "mapping_int.h"
#include "../base/alloc.h"
#include "../base/buf.h"
#include "../base/parse.h"

const char *amp_map_json_kind(const json_t *v) {
    switch (json_typeof(v)) {
    case JSON_OBJECT:
        return "object";
    case JSON_ARRAY:
        return "array";
    case JSON_STRING:
        return "string";
    case JSON_INTEGER:
    case JSON_REAL:
        return "number";
    case JSON_TRUE:
    case JSON_FALSE:
        return "boolean";
    case JSON_NULL:
        return "null";
    }
    return "unknown";
}

/* ---- field paths ----------------------------------------------------- */

static void add_seg(amp_path *p, char *key, size_t index) {
    p->segs = amp_xrealloc(p->segs, (p->nsegs + 1) * sizeof(*p->segs));
    p->segs[p->nsegs].key = key;
    p->segs[p->nsegs].index = index;
    p->nsegs++;
}

/* A bracket step starting at text[*i] == '['. 0 on success. */
static int parse_bracket(amp_path *p, const char *text, size_t *i, bool allow_index, char *err,
                         size_t errlen) {
    size_t start = *i;
    size_t j = start + 1;
    if (text[j] == '"') {
        /* Quoted key: \" and \\ are the only escapes. */
        amp_buf key;
        amp_buf_init(&key, strlen(text));
        amp_buf_append(&key, "", 0);
        j++;
        while (text[j] && text[j] != '"') {
            if (text[j] == '\\' && (text[j + 1] == '"' || text[j + 1] == '\\'))
                j++;
            amp_buf_append(&key, &text[j], 1);
            j++;
        }
        if (text[j] != '"' || text[j + 1] != ']') {
            snprintf(err, errlen, "unclosed [\"...\"] at offset %zu", start);
            amp_buf_free(&key);
            return -1;
        }
        add_seg(p, key.data, 0);
        *i = j + 2;
        return 0;
    }
    if (text[j] >= '0' && text[j] <= '9') {
        size_t k = j;
        while (text[k] >= '0' && text[k] <= '9')
            k++;
        if (text[k] != ']') {
            snprintf(err, errlen, "expected ']' at offset %zu", k);
            return -1;
        }
        if (!allow_index) {
            snprintf(err, errlen, "array index at offset %zu; a target names object keys only",
                     start);
            return -1;
        }
        int64_t idx;
        if (amp_parse_i64(text + j, k - j, 0, INT32_MAX, &idx) != 0) {
            snprintf(err, errlen, "array index too large at offset %zu", j);
            return -1;
        }
        add_seg(p, NULL, (size_t)idx);
        *i = k + 1;
        return 0;
    }
    snprintf(err, errlen, "expected [\"key\"]%s at offset %zu", allow_index ? " or [index]" : "",
             start);
    return -1;
}

int amp_map_path_parse(amp_path *p, const char *text, bool allow_index, char *err, size_t errlen) {
    memset(p, 0, sizeof(*p));
    p->text = amp_xstrdup(text);
    size_t i = 0;
    if (!*text) {
        snprintf(err, errlen, "empty field path");
        goto fail;
    }
    bool first = true;
    while (text[i]) {
        if (text[i] == '[') {
            if (parse_bracket(p, text, &i, allow_index, err, errlen) != 0)
                goto fail;
        } else {
            if (!first) {
                if (text[i] != '.') {
                    snprintf(err, errlen, "expected '.' or '[' at offset %zu", i);
                    goto fail;
                }
                i++;
            }
            size_t start = i;
            while (text[i] && text[i] != '.' && text[i] != '[')
                i++;
            if (i == start) {
                snprintf(err, errlen, "empty key at offset %zu", start);
                goto fail;
            }
            add_seg(p, amp_xstrndup(text + start, i - start), 0);
        }
        first = false;
    }
    return 0;
fail:
    amp_map_path_free(p);
    return -1;
}

void amp_map_path_free(amp_path *p) {
    for (size_t i = 0; i < p->nsegs; i++)
        free(p->segs[i].key);
    free(p->segs);
    free(p->text);
    memset(p, 0, sizeof(*p));
}

json_t *amp_map_path_get(const amp_path *p, const json_t *root) {
    json_t *cur = (json_t *)root;
    for (size_t i = 0; i < p->nsegs && cur; i++) {
        const amp_path_seg *s = &p->segs[i];
        if (s->key)
            cur = json_is_object(cur) ? json_object_get(cur, s->key) : NULL;
        else
            cur = json_is_array(cur) ? json_array_get(cur, s->index) : NULL;
    }
    return cur;
}

int amp_map_path_set(const amp_path *p, json_t *root, json_t *value) {
    json_t *cur = root;
    for (size_t i = 0; i + 1 < p->nsegs; i++) {
        json_t *next = json_object_get(cur, p->segs[i].key);
        if (!next) {
            next = json_object();
            if (!next || json_object_set_new(cur, p->segs[i].key, next) != 0)
                abort();
        } else if (!json_is_object(next)) {
            json_decref(value);
            return -1;
        } else if (next->refcount > 1) {
            /* Shared (a mapped value is the event's own object): write into
             * a copy of this level instead; its members are shared in turn,
             * and copied the same way if the path goes deeper. */
            json_t *own = json_copy(next);
            if (!own || json_object_set_new(cur, p->segs[i].key, own) != 0)
                abort();
            next = own;
        }
        cur = next;
    }
    if (json_object_set_new(cur, p->segs[p->nsegs - 1].key, value) != 0)
        abort();
    return 0;
}
