#include "schema.h"
#include "../base/alloc.h"
#include "../base/buf.h"
#include "../base/errs.h"
#include "../base/parse.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- wording ----------------------------------------------------------- */

void amp_json_schema_error(amp_errs *errs, const char *path, const char *found,
                           const char *expected_fmt, ...) {
    va_list ap;
    va_start(ap, expected_fmt);
    char *expected = amp_xvasprintf(expected_fmt, ap);
    va_end(ap);
    amp_errs_add(errs, path, "found %s; expected %s", found, expected);
    free(expected);
}

const char *amp_json_schema_kind(const json_t *v) {
    switch (json_typeof(v)) {
    case JSON_OBJECT:
        return "an object";
    case JSON_ARRAY:
        return json_array_size(v) ? "an array" : "an empty array";
    case JSON_STRING:
        return json_string_length(v) ? "a string" : "an empty string";
    case JSON_INTEGER:
        return "an integer";
    case JSON_REAL:
        return "a number";
    case JSON_TRUE:
    case JSON_FALSE:
        return "a boolean";
    case JSON_NULL:
        return "null";
    }
    return "a value";
}

static bool plain_key(const char *k) {
    if (!*k || !((*k >= 'a' && *k <= 'z') || (*k >= 'A' && *k <= 'Z') || *k == '_'))
        return false;
    for (; *k; k++)
        if (!((*k >= 'a' && *k <= 'z') || (*k >= 'A' && *k <= 'Z') || (*k >= '0' && *k <= '9') ||
              *k == '_' || *k == '-'))
            return false;
    return true;
}

char *amp_json_path_key(const char *base, const char *key) {
    if (plain_key(key))
        return *base ? amp_xasprintf("%s.%s", base, key) : amp_xstrdup(key);
    json_t *s = json_string(key);
    char *q = s ? json_dumps(s, JSON_ENCODE_ANY) : NULL;
    json_decref(s);
    if (!q)
        abort();
    char *r = amp_xasprintf("%s[%s]", base, q);
    free(q);
    return r;
}

char *amp_json_path_index(const char *base, size_t i) {
    return amp_xasprintf("%s[%zu]", base, i);
}

/* What an error says row r expects; caller owns. */
static char *expect_of(const amp_json_schema_row *r) {
    if (r->expect)
        return amp_xstrdup(r->expect);
    switch (r->type) {
    case AMP_JSON_SCHEMA_STRING:
        return amp_xstrdup(r->allow_empty ? "a string" : "a non-empty string");
    case AMP_JSON_SCHEMA_INT:
        return amp_xasprintf("an integer from %lld to %lld", (long long)r->min, (long long)r->max);
    case AMP_JSON_SCHEMA_NUMBER:
        return amp_xasprintf("a number from %g to %g", r->dmin, r->dmax);
    case AMP_JSON_SCHEMA_BOOL:
        return amp_xstrdup("true or false");
    case AMP_JSON_SCHEMA_ENUM: {
        amp_buf b;
        amp_buf_init(&b, 4096);
        amp_buf_append(&b, "one of ", 7);
        for (size_t i = 0; r->names[i]; i++) {
            if (i)
                amp_buf_append(&b, ", ", 2);
            amp_buf_append(&b, r->names[i], strlen(r->names[i]));
        }
        return b.data;
    }
    case AMP_JSON_SCHEMA_STRLIST:
        return amp_xstrdup("an array of strings");
    case AMP_JSON_SCHEMA_OBJECT:
        return amp_xstrdup("an object");
    case AMP_JSON_SCHEMA_ARRAY:
        return amp_xstrdup("an array");
    case AMP_JSON_SCHEMA_ANY:
        break;
    }
    return amp_xstrdup("a value");
}

static void error_expect(const amp_json_schema_row *r, amp_errs *errs, const char *path,
                         const char *found) {
    char *e = expect_of(r);
    amp_json_schema_error(errs, path, found, "%s", e);
    free(e);
}

/* ---- fields -------------------------------------------------------------- */

static void *field(const amp_json_schema_row *r, void *target) {
    return (char *)target + r->offset;
}

static void store_int(const amp_json_schema_row *r, void *target, int64_t v) {
    void *p = field(r, target);
    switch (r->size) {
    case 1: {
        uint8_t x = (uint8_t)v;
        memcpy(p, &x, 1);
        break;
    }
    case 2: {
        uint16_t x = (uint16_t)v;
        memcpy(p, &x, 2);
        break;
    }
    case 4: {
        uint32_t x = (uint32_t)v;
        memcpy(p, &x, 4);
        break;
    }
    default:
        memcpy(p, &v, 8);
        break;
    }
}

static void free_list(const amp_json_schema_row *r, void *target) {
    char ***list = field(r, target);
    size_t *n = (size_t *)((char *)target + r->offset2);
    for (size_t i = 0; *list && i < *n; i++)
        free((*list)[i]);
    free(*list);
    *list = NULL;
    *n = 0;
}

static void store_string(const amp_json_schema_row *r, void *target, const char *s) {
    char **p = field(r, target);
    free(*p);
    *p = amp_xstrdup(s);
}

static int enum_index(const amp_json_schema_row *r, const char *s) {
    for (int i = 0; r->names[i]; i++)
        if (!strcmp(r->names[i], s))
            return i;
    return -1;
}

int amp_json_schema_parse_text(const amp_json_schema_row *r, const char *text, void *target) {
    switch (r->type) {
    case AMP_JSON_SCHEMA_STRING:
        if (!*text && !r->allow_empty)
            return -1;
        store_string(r, target, text);
        return 0;
    case AMP_JSON_SCHEMA_INT: {
        int64_t v;
        if (amp_parse_i64(text, strlen(text), r->min, r->max, &v) != 0)
            return -1;
        store_int(r, target, v);
        return 0;
    }
    case AMP_JSON_SCHEMA_NUMBER: {
        char *end;
        double d = strtod(text, &end);
        if (!*text || *end || !(d >= r->dmin && d <= r->dmax))
            return -1;
        memcpy(field(r, target), &d, sizeof d);
        return 0;
    }
    case AMP_JSON_SCHEMA_BOOL: {
        if (strcmp(text, "true") && strcmp(text, "false"))
            return -1;
        bool b = !strcmp(text, "true");
        memcpy(field(r, target), &b, sizeof b);
        return 0;
    }
    case AMP_JSON_SCHEMA_ENUM: {
        int k = enum_index(r, text);
        if (k < 0)
            return -1;
        store_int(r, target, k);
        return 0;
    }
    case AMP_JSON_SCHEMA_STRLIST: {
        free_list(r, target);
        size_t cap = 1;
        for (const char *p = text; *p; p++)
            cap += *p == ',';
        char **list = amp_xcalloc(cap + 1, sizeof *list);
        size_t n = 0;
        for (const char *p = text; p;) {
            const char *comma = strchr(p, ',');
            size_t len = comma ? (size_t)(comma - p) : strlen(p);
            if (len)
                list[n++] = amp_xstrndup(p, len);
            p = comma ? comma + 1 : NULL;
        }
        *(char ***)field(r, target) = list;
        *(size_t *)((char *)target + r->offset2) = n;
        return 0;
    }
    case AMP_JSON_SCHEMA_OBJECT:
    case AMP_JSON_SCHEMA_ARRAY:
    case AMP_JSON_SCHEMA_ANY:
        break;
    }
    return -1;
}

void amp_json_schema_defaults(const amp_json_schema_row *rows, void *target) {
    for (const amp_json_schema_row *r = rows; r->key; r++)
        if (r->size && r->def && amp_json_schema_parse_text(r, r->def, target) != 0)
            abort(); /* a table bug; the unit test walks every default */
}

void amp_json_schema_free(const amp_json_schema_row *rows, void *target) {
    for (const amp_json_schema_row *r = rows; r->key; r++) {
        if (!r->size)
            continue;
        if (r->type == AMP_JSON_SCHEMA_STRING) {
            char **p = field(r, target);
            free(*p);
            *p = NULL;
        } else if (r->type == AMP_JSON_SCHEMA_STRLIST) {
            free_list(r, target);
        }
    }
}

/* ---- reading ------------------------------------------------------------- */

/* A string the config may hold: no NUL byte inside. */
static bool clean_string(const json_t *v) {
    return strlen(json_string_value(v)) == json_string_length(v);
}

static bool accepted(const amp_json_schema_row *r, const char *s, const char *path,
                     amp_errs *errs) {
    if (!r->accept || r->accept(s))
        return true;
    char *found = amp_xasprintf("'%s'", s);
    amp_json_schema_error(errs, path, found, "%s",
                          r->item_expect ? r->item_expect : "an acceptable value");
    free(found);
    return false;
}

static void read_list(const amp_json_schema_row *r, const amp_json_schema_at *at) {
    const json_t *v = at->value;
    char **list = amp_xcalloc(json_array_size(v) + 1, sizeof *list);
    size_t n = 0, i;
    bool ok = true;
    json_t *item;
    json_array_foreach(v, i, item) {
        char *ip = amp_json_path_index(at->path, i);
        if (!json_is_string(item) || !clean_string(item)) {
            amp_json_schema_error(at->errs, ip, amp_json_schema_kind(item), "%s",
                                  r->item_expect ? r->item_expect : "a string");
            ok = false;
        } else if (accepted(r, json_string_value(item), ip, at->errs)) {
            list[n++] = amp_xstrdup(json_string_value(item));
        } else {
            ok = false;
        }
        free(ip);
    }
    if (!ok) {
        for (size_t k = 0; k < n; k++)
            free(list[k]);
        free(list);
        return;
    }
    free_list(r, at->target);
    *(char ***)field(r, at->target) = list;
    *(size_t *)((char *)at->target + r->offset2) = n;
}

/* Type-check the present value; false after reporting. */
static bool type_ok(const amp_json_schema_row *r, const json_t *v, const char *path,
                    amp_errs *errs) {
    char found[128];
    switch (r->type) {
    case AMP_JSON_SCHEMA_STRING:
        if (json_is_string(v) && !clean_string(v)) {
            error_expect(r, errs, path, "a string holding a NUL byte");
            return false;
        }
        if (json_is_string(v) && json_string_length(v) == 0 && !r->allow_empty) {
            error_expect(r, errs, path, "an empty string");
            return false;
        }
        if (!json_is_string(v))
            break;
        return accepted(r, json_string_value(v), path, errs);
    case AMP_JSON_SCHEMA_INT:
        if (!json_is_integer(v))
            break;
        if (json_integer_value(v) < r->min || json_integer_value(v) > r->max) {
            snprintf(found, sizeof found, "%lld", (long long)json_integer_value(v));
            error_expect(r, errs, path, found);
            return false;
        }
        return true;
    case AMP_JSON_SCHEMA_NUMBER:
        if (!json_is_number(v))
            break;
        if (!(json_number_value(v) >= r->dmin && json_number_value(v) <= r->dmax)) {
            snprintf(found, sizeof found, "%g", json_number_value(v));
            error_expect(r, errs, path, found);
            return false;
        }
        return true;
    case AMP_JSON_SCHEMA_BOOL:
        if (!json_is_boolean(v))
            break;
        return true;
    case AMP_JSON_SCHEMA_ENUM:
        if (!json_is_string(v))
            break;
        if (!clean_string(v) || enum_index(r, json_string_value(v)) < 0) {
            char *q = amp_xasprintf("'%s'", json_string_value(v));
            error_expect(r, errs, path, q);
            free(q);
            return false;
        }
        return true;
    case AMP_JSON_SCHEMA_STRLIST:
    case AMP_JSON_SCHEMA_ARRAY:
        if (!json_is_array(v))
            break;
        return true;
    case AMP_JSON_SCHEMA_OBJECT:
        if (!json_is_object(v))
            break;
        return true;
    case AMP_JSON_SCHEMA_ANY:
        return true;
    }
    error_expect(r, errs, path, amp_json_schema_kind(v));
    return false;
}

static void store_value(const amp_json_schema_row *r, const amp_json_schema_at *at) {
    const json_t *v = at->value;
    switch (r->type) {
    case AMP_JSON_SCHEMA_STRING:
        store_string(r, at->target, json_string_value(v));
        break;
    case AMP_JSON_SCHEMA_INT:
        store_int(r, at->target, json_integer_value(v));
        break;
    case AMP_JSON_SCHEMA_NUMBER: {
        double d = json_number_value(v);
        memcpy(field(r, at->target), &d, sizeof d);
        break;
    }
    case AMP_JSON_SCHEMA_BOOL: {
        bool b = json_is_true(v);
        memcpy(field(r, at->target), &b, sizeof b);
        break;
    }
    case AMP_JSON_SCHEMA_ENUM:
        store_int(r, at->target, enum_index(r, json_string_value(v)));
        break;
    case AMP_JSON_SCHEMA_STRLIST:
        read_list(r, at);
        break;
    case AMP_JSON_SCHEMA_OBJECT:
    case AMP_JSON_SCHEMA_ARRAY:
    case AMP_JSON_SCHEMA_ANY:
        break;
    }
}

/* The segment of key after prefix (plen bytes, the dot included): its
 * length, and whether it is the last one. */
static size_t next_seg(const char *key, size_t plen, bool *leaf) {
    const char *s = key + plen;
    const char *dot = strchr(s, '.');
    *leaf = !dot;
    return dot ? (size_t)(dot - s) : strlen(s);
}

static bool under(const char *key, const char *prefix, size_t plen) {
    return plen == 0 || (!strncmp(key, prefix, plen - 1) && key[plen - 1] == '.');
}

static void read_row(const amp_json_schema_row *r, const json_t *obj, const char *seg,
                     const char *base, void *target, void *ctx, amp_errs *errs) {
    char *path = amp_json_path_key(base, seg);
    const json_t *v = obj ? json_object_get(obj, seg) : NULL;
    amp_json_schema_at at = {.target = target,
                             .ctx = ctx,
                             .parent = obj,
                             .value = v,
                             .base = base,
                             .path = path,
                             .errs = errs};
    if (!v && r->required)
        error_expect(r, errs, path, "nothing");
    if (v && type_ok(r, v, path, errs)) {
        if (r->set)
            r->set(&at);
        else if (r->size)
            store_value(r, &at);
    }
    if (r->check)
        r->check(&at);
    free(path);
}

/* Walk the rows under prefix (plen: its length plus the dot, 0 at the
 * top) against obj, the object at JSON path base (NULL: absent). */
static void walk(const amp_json_schema_row *rows, const char *prefix, size_t plen,
                 const json_t *obj, const char *base, void *target, void *ctx, amp_errs *errs) {
    if (obj) {
        const char *k;
        json_t *v;
        json_object_foreach((json_t *)obj, k, v) {
            bool known = false, leaf;
            for (const amp_json_schema_row *r = rows; r->key && !known; r++) {
                if (!under(r->key, prefix, plen))
                    continue;
                size_t n = next_seg(r->key, plen, &leaf);
                known = n == strlen(k) && !strncmp(r->key + plen, k, n);
            }
            if (known)
                continue;
            amp_buf list;
            amp_buf_init(&list, 4096);
            amp_buf_append(&list, "", 0);
            for (const amp_json_schema_row *r = rows; r->key; r++) {
                if (!under(r->key, prefix, plen))
                    continue;
                size_t n = next_seg(r->key, plen, &leaf);
                bool seen = false;
                for (const amp_json_schema_row *q = rows; q < r && !seen; q++)
                    seen = under(q->key, prefix, plen) && !strncmp(q->key, r->key, plen + n) &&
                           (q->key[plen + n] == '.' || q->key[plen + n] == '\0');
                if (seen)
                    continue;
                if (list.len)
                    amp_buf_append(&list, ", ", 2);
                amp_buf_append(&list, r->key + plen, n);
            }
            char *kp = amp_json_path_key(base, k);
            amp_json_schema_error(errs, kp, "an unknown key", "one of %s", list.data);
            free(kp);
            amp_buf_free(&list);
        }
    }
    for (const amp_json_schema_row *r = rows; r->key; r++) {
        if (!under(r->key, prefix, plen))
            continue;
        bool leaf;
        size_t n = next_seg(r->key, plen, &leaf);
        char *seg = amp_xstrndup(r->key + plen, n);
        if (leaf) {
            read_row(r, obj, seg, base, target, ctx, errs);
            free(seg);
            continue;
        }
        bool seen = false;
        for (const amp_json_schema_row *q = rows; q < r && !seen; q++)
            seen = under(q->key, prefix, plen) && !strncmp(q->key, r->key, plen + n + 1);
        if (!seen) {
            char *path = amp_json_path_key(base, seg);
            const json_t *sub = obj ? json_object_get(obj, seg) : NULL;
            if (sub && !json_is_object(sub)) {
                amp_json_schema_error(errs, path, amp_json_schema_kind(sub), "an object");
                sub = NULL;
            }
            char *sub_prefix = amp_xstrndup(r->key, plen + n + 1);
            walk(rows, sub_prefix, plen + n + 1, sub, path, target, ctx, errs);
            free(sub_prefix);
            free(path);
        }
        free(seg);
    }
}

void amp_json_schema_read(const amp_json_schema_row *rows, const json_t *obj, const char *base,
                          void *target, void *ctx, amp_errs *errs) {
    walk(rows, "", 0, obj, base, target, ctx, errs);
}

void amp_json_schema_env(const amp_json_schema_row *rows, void *target, void *ctx, amp_errs *errs) {
    for (const amp_json_schema_row *r = rows; r->key; r++) {
        const char *text = r->env ? getenv(r->env) : NULL;
        if (!text || !*text)
            continue;
        amp_json_schema_at at = {
            .target = target, .ctx = ctx, .base = "", .path = r->env, .errs = errs};
        if (r->env_set) {
            r->env_set(&at, text);
            continue;
        }
        if (r->type == AMP_JSON_SCHEMA_STRING && !accepted(r, text, r->env, errs))
            continue;
        if (amp_json_schema_parse_text(r, text, target) != 0) {
            char *found = amp_xasprintf("'%s'", text);
            error_expect(r, errs, r->env, found);
            free(found);
        }
    }
}

/* ---- comparing ----------------------------------------------------------- */

static bool same_string(const char *a, const char *b) {
    return a == b || (a && b && !strcmp(a, b));
}

bool amp_json_schema_equal(const amp_json_schema_row *r, const void *a, const void *b) {
    if (!r->size)
        return true;
    const void *fa = (const char *)a + r->offset, *fb = (const char *)b + r->offset;
    if (r->type == AMP_JSON_SCHEMA_STRING)
        return same_string(*(char *const *)fa, *(char *const *)fb);
    if (r->type == AMP_JSON_SCHEMA_STRLIST) {
        size_t na = *(const size_t *)((const char *)a + r->offset2);
        size_t nb = *(const size_t *)((const char *)b + r->offset2);
        if (na != nb)
            return false;
        for (size_t i = 0; i < na; i++)
            if (!same_string((*(char **const *)fa)[i], (*(char **const *)fb)[i]))
                return false;
        return true;
    }
    return !memcmp(fa, fb, r->size);
}

amp_json_schema_reload amp_json_schema_diff(const amp_json_schema_row *rows, const void *a,
                                            const void *b, const char **first_key) {
    amp_json_schema_reload best = 0;
    const char *first = NULL;
    for (const amp_json_schema_row *r = rows; r->key; r++) {
        if (r->reload > best && !amp_json_schema_equal(r, a, b)) {
            best = r->reload;
            first = r->key;
        }
    }
    if (first_key)
        *first_key = first;
    return best;
}
