/*
 * transform — value helpers (type-aware equality, exact number comparison,
 * text rendering) and the transform chains of field mappings
 * ("trim|lowercase", "iso8601", "default:n/a", "truncate:80", ...).
 *
 * Chain semantics: a step sees the value the previous step produced; NULL
 * means the source is missing. Steps that do not apply to a value's type
 * pass it through unchanged (trim on a number), so values keep their JSON
 * type unless a step converts them. Conversions that fail (to_number on
 * "abc", iso8601 on "yesterday") give null, which a later default:<v> can
 * replace. null passes through every step but default and required.
 */
#include <ctype.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../base/digest.h"

#include "../json/jsonw.h"
#include "mapping.h"
#include "mapping_int.h"
#include "../base/alloc.h"
#include "../base/buf.h"
#include "../base/errs.h"
#include "../base/parse.h"

/* ---- values ---------------------------------------------------------- */

/* Exact comparison of an integer with a double, also beyond 2^53. */
static int cmp_int_real(json_int_t i, double r) {
    if (r >= 9223372036854775808.0)
        return -1;
    if (r < -9223372036854775808.0)
        return 1;
    double t = trunc(r);
    json_int_t ti = (json_int_t)t;
    if (i != ti)
        return i < ti ? -1 : 1;
    double frac = r - t;
    return frac > 0 ? -1 : frac < 0 ? 1 : 0;
}

int amp_map_number_cmp(const json_t *a, const json_t *b) {
    if (json_is_integer(a) && json_is_integer(b)) {
        json_int_t x = json_integer_value(a), y = json_integer_value(b);
        return x < y ? -1 : x > y;
    }
    if (json_is_integer(a))
        return cmp_int_real(json_integer_value(a), json_real_value(b));
    if (json_is_integer(b))
        return -cmp_int_real(json_integer_value(b), json_real_value(a));
    double x = json_real_value(a), y = json_real_value(b);
    return x < y ? -1 : x > y;
}

bool amp_map_value_equal(const json_t *a, const json_t *b) {
    if (json_is_number(a) && json_is_number(b))
        return amp_map_number_cmp(a, b) == 0;
    if (json_typeof(a) != json_typeof(b))
        return false;
    switch (json_typeof(a)) {
    case JSON_STRING:
        return json_string_length(a) == json_string_length(b) &&
               memcmp(json_string_value(a), json_string_value(b), json_string_length(a)) == 0;
    case JSON_ARRAY: {
        if (json_array_size(a) != json_array_size(b))
            return false;
        for (size_t i = 0; i < json_array_size(a); i++)
            if (!amp_map_value_equal(json_array_get(a, i), json_array_get(b, i)))
                return false;
        return true;
    }
    case JSON_OBJECT: {
        if (json_object_size(a) != json_object_size(b))
            return false;
        const char *k;
        json_t *x;
        json_object_foreach((json_t *)a, k, x) {
            json_t *y = json_object_get(b, k);
            if (!y || !amp_map_value_equal(x, y))
                return false;
        }
        return true;
    }
    default:
        return true; /* true, false, null: same type is equal */
    }
}

void amp_map_real_format(double d, char *buf, size_t len) {
    /* %.15g is exact for every decimal of up to 15 digits; only values that
     * need more take the 16- or 17-digit forms. */
    for (int prec = 15; prec <= 17; prec++) {
        snprintf(buf, len, "%.*g", prec, d);
        if (strtod(buf, NULL) == d)
            break;
    }
    /* Like jansson: "1e22" not "1e+22", "1e-7" not "1e-07", "100.0" not "100". */
    char *e = strchr(buf, 'e');
    if (e) {
        char *src = e + 1, *dst = e + 1;
        if (*src == '+')
            src++;
        else if (*src == '-')
            *dst++ = *src++;
        while (*src == '0' && src[1])
            src++;
        memmove(dst, src, strlen(src) + 1);
    } else if (!strchr(buf, '.') && !strchr(buf, 'n') && !strchr(buf, 'i')) {
        size_t n = strlen(buf);
        if (n + 3 <= len)
            memcpy(buf + n, ".0", 3);
    }
}

/* Append at most what fits, cut at a UTF-8 code point boundary. */
static int append_capped(amp_buf *out, const char *s, size_t n) {
    if (amp_buf_append(out, s, n) == 0)
        return 0;
    size_t room = out->max - out->len;
    while (room > 0 && ((unsigned char)s[room] & 0xC0) == 0x80)
        room--;
    amp_buf_append(out, s, room);
    return -1;
}

int amp_map_value_render(const json_t *v, amp_buf *out) {
    char num[40];
    switch (json_typeof(v)) {
    case JSON_STRING:
        return append_capped(out, json_string_value(v), json_string_length(v));
    case JSON_INTEGER:
        snprintf(num, sizeof(num), "%" JSON_INTEGER_FORMAT, json_integer_value(v));
        return append_capped(out, num, strlen(num));
    case JSON_REAL:
        amp_map_real_format(json_real_value(v), num, sizeof(num));
        return append_capped(out, num, strlen(num));
    case JSON_TRUE:
        return append_capped(out, "true", 4);
    case JSON_FALSE:
        return append_capped(out, "false", 5);
    case JSON_NULL:
        return 0;
    case JSON_OBJECT:
    case JSON_ARRAY: {
        /* Straight into out when the whole value fits (out is left as it
         * was when not); a longer one is cut at the cap like any text. */
        if (amp_json_write(out, v) == 0)
            return 0;
        char *s = amp_json_dumps(v);
        if (!s)
            abort();
        int rc = append_capped(out, s, strlen(s));
        free(s);
        return rc;
    }
    }
    return 0;
}

/* ---- transform chains ------------------------------------------------ */

typedef enum {
    X_TRIM,
    X_LOWERCASE,
    X_UPPERCASE,
    X_ISO8601,
    X_TO_STRING,
    X_TO_NUMBER,
    X_DEFAULT,
    X_TRUNCATE,
    X_SHA256,
    X_REQUIRED,
} xkind;

static const char *const xnames[] = {
    "trim",      "lowercase", "uppercase", "iso8601", "to_string",
    "to_number", "default",   "truncate",  "sha256",  "required",
};
#define NXNAMES (sizeof(xnames) / sizeof(xnames[0]))
#define XLIST                                                                                      \
    "trim, lowercase, uppercase, iso8601, to_string, to_number, default:<value>, truncate:<n>, "   \
    "sha256, required"

typedef struct xstep {
    xkind kind;
    json_t *dflt;   /* default: the replacement string */
    size_t max_cps; /* truncate: code points kept */
} xstep;

struct amp_xform {
    xstep *steps;
    size_t nsteps;
};

void amp_map_xform_free(amp_xform *x) {
    if (!x)
        return;
    for (size_t i = 0; i < x->nsteps; i++)
        json_decref(x->steps[i].dflt);
    free(x->steps);
    free(x);
}

static bool is_space(char c) {
    return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v';
}

/* One step "name" or "name:arg" (s[0..n), surrounding blanks already
 * removed). 0 on success. */
static int compile_step(amp_xform *x, const char *s, size_t n, const char *path, amp_errs *errs) {
    if (n == 0) {
        amp_json_schema_error(errs, path, "an empty transform", "one of " XLIST);
        return -1;
    }
    const char *colon = memchr(s, ':', n);
    size_t name_len = colon ? (size_t)(colon - s) : n;
    size_t k;
    for (k = 0; k < NXNAMES; k++)
        if (strlen(xnames[k]) == name_len && !memcmp(xnames[k], s, name_len))
            break;
    if (k == NXNAMES) {
        char *found = amp_xasprintf("'%.*s'", (int)name_len, s);
        amp_json_schema_error(errs, path, found, "one of " XLIST);
        free(found);
        return -1;
    }
    xstep st = {.kind = (xkind)k};
    if (st.kind == X_DEFAULT) {
        if (!colon) {
            amp_json_schema_error(errs, path, "'default' without a value", "default:<value>");
            return -1;
        }
        st.dflt = json_stringn(colon + 1, n - name_len - 1);
        if (!st.dflt) {
            amp_json_schema_error(errs, path, "a 'default' value that is not valid UTF-8",
                                  "default:<value> in UTF-8");
            return -1;
        }
    } else if (st.kind == X_TRUNCATE) {
        int64_t v;
        if (!colon || amp_parse_i64(colon + 1, n - name_len - 1, 0, 100000000, &v) != 0) {
            char *found = amp_xasprintf("'%.*s'", (int)n, s);
            amp_json_schema_error(errs, path, found,
                                  "truncate:<n>, n code points from 0 to 100000000");
            free(found);
            return -1;
        }
        st.max_cps = (size_t)v;
    } else if (colon) {
        char *found = amp_xasprintf("'%.*s'", (int)n, s);
        amp_json_schema_error(errs, path, found, "'%s' without an argument", xnames[k]);
        free(found);
        return -1;
    }
    x->steps = amp_xrealloc(x->steps, (x->nsteps + 1) * sizeof(*x->steps));
    x->steps[x->nsteps++] = st;
    return 0;
}

static int compile_item(amp_xform *x, const char *s, size_t n, const char *path, amp_errs *errs) {
    while (n > 0 && is_space(*s)) {
        s++;
        n--;
    }
    while (n > 0 && is_space(s[n - 1]))
        n--;
    return compile_step(x, s, n, path, errs);
}

amp_xform *amp_map_xform_compile(const json_t *spec, const char *path, amp_errs *errs) {
    amp_xform *x = amp_xcalloc(1, sizeof(*x));
    int bad = 0;
    if (json_is_string(spec)) {
        /* "a|b|c": every '|' separates steps, so a default value cannot hold
         * one; the array form ["default:a|b"] can. */
        const char *s = json_string_value(spec);
        size_t len = json_string_length(spec);
        size_t start = 0;
        for (size_t i = 0; i <= len; i++) {
            if (i == len || s[i] == '|') {
                bad |= compile_item(x, s + start, i - start, path, errs);
                start = i + 1;
            }
        }
    } else if (json_is_array(spec) && json_array_size(spec) > 0) {
        size_t i;
        json_t *item;
        json_array_foreach(spec, i, item) {
            char *ip = amp_json_path_index(path, i);
            if (!json_is_string(item)) {
                amp_json_schema_error(errs, ip, amp_json_schema_kind(item), "a transform string");
                bad = -1;
            } else {
                bad |= compile_item(x, json_string_value(item), json_string_length(item), ip, errs);
            }
            free(ip);
        }
    } else {
        amp_json_schema_error(errs, path, amp_json_schema_kind(spec),
                              "a string such as \"trim|lowercase\" or a non-empty array of "
                              "transform strings");
        bad = -1;
    }
    if (bad) {
        amp_map_xform_free(x);
        return NULL;
    }
    return x;
}

/* ---- steps ----------------------------------------------------------- */

/* Replace v by a new string of s[0..n) (takes ownership of v). */
static json_t *restring(json_t *v, const char *s, size_t n) {
    json_t *r = json_stringn(s, n);
    json_decref(v);
    if (!r)
        abort();
    return r;
}

static json_t *do_trim(json_t *v) {
    const char *s = json_string_value(v);
    size_t n = json_string_length(v), a = 0;
    while (a < n && is_space(s[a]))
        a++;
    while (n > a && is_space(s[n - 1]))
        n--;
    if (a == 0 && n == json_string_length(v))
        return v;
    return restring(v, s + a, n - a);
}

/* ASCII-only case mapping; other bytes (UTF-8 sequences) are kept as-is. */
static json_t *do_case(json_t *v, bool upper) {
    size_t n = json_string_length(v);
    char *c = amp_xstrndup(json_string_value(v), n);
    for (size_t i = 0; i < n; i++) {
        unsigned char b = (unsigned char)c[i];
        if (b < 0x80)
            c[i] = (char)(upper ? toupper(b) : tolower(b));
    }
    json_t *r = restring(v, c, n);
    free(c);
    return r;
}

static json_t *do_truncate(json_t *v, size_t max_cps) {
    const char *s = json_string_value(v);
    size_t n = json_string_length(v), cps = 0, i;
    for (i = 0; i < n; i++) {
        if (((unsigned char)s[i] & 0xC0) != 0x80) {
            if (cps == max_cps)
                break;
            cps++;
        }
    }
    return i == n ? v : restring(v, s, i);
}

static json_t *do_iso8601(json_t *v) {
    int64_t ms;
    bool ok = false;
    if (json_is_string(v)) {
        ok = amp_map_time_parse(json_string_value(v), json_string_length(v), false, &ms) == 0;
    } else if (json_is_integer(v)) {
        ms = json_integer_value(v);
        ok = true;
    } else if (json_is_real(v)) {
        double r = floor(json_real_value(v));
        ok = r > -1e17 && r < 1e17;
        ms = ok ? (int64_t)r : 0;
    }
    char buf[32];
    /* Only years 0000-9999 have an RFC 3339 form; |ms| < 1e15 keeps the
     * date arithmetic far from overflow before that check. */
    if (ok && ms > -1000000000000000LL && ms < 1000000000000000LL &&
        amp_map_time_format(ms, buf, sizeof(buf)) == 0) {
        json_decref(v);
        json_t *r = json_string(buf);
        if (!r)
            abort();
        return r;
    }
    json_decref(v);
    return json_null();
}

static json_t *do_to_string(json_t *v) {
    if (json_is_string(v) || json_is_null(v))
        return v;
    amp_buf b;
    amp_buf_init(&b, SIZE_MAX / 2);
    amp_map_value_render(v, &b);
    json_t *r = restring(v, b.data ? b.data : "", b.len);
    amp_buf_free(&b);
    return r;
}

/* JSON number syntax after trimming blanks: "42", "-1.5", "2e3". */
static json_t *parse_number(const char *s, size_t n) {
    while (n > 0 && is_space(*s)) {
        s++;
        n--;
    }
    while (n > 0 && is_space(s[n - 1]))
        n--;
    size_t i = 0;
    bool integral = true;
    if (i < n && s[i] == '-')
        i++;
    size_t d0 = i;
    while (i < n && s[i] >= '0' && s[i] <= '9')
        i++;
    if (i == d0)
        return NULL;
    if (i < n && s[i] == '.') {
        integral = false;
        size_t f0 = ++i;
        while (i < n && s[i] >= '0' && s[i] <= '9')
            i++;
        if (i == f0)
            return NULL;
    }
    if (i < n && (s[i] == 'e' || s[i] == 'E')) {
        integral = false;
        i++;
        if (i < n && (s[i] == '+' || s[i] == '-'))
            i++;
        size_t e0 = i;
        while (i < n && s[i] >= '0' && s[i] <= '9')
            i++;
        if (i == e0)
            return NULL;
    }
    if (i != n)
        return NULL;
    int64_t iv;
    if (integral && amp_parse_i64(s, n, INT64_MIN, INT64_MAX, &iv) == 0)
        return json_integer(iv);
    char *t = amp_xstrndup(s, n);
    double d = strtod(t, NULL);
    free(t);
    return isfinite(d) ? json_real(d) : NULL;
}

static json_t *do_to_number(json_t *v) {
    json_t *r = NULL;
    if (json_is_number(v) || json_is_null(v))
        return v;
    if (json_is_string(v))
        r = parse_number(json_string_value(v), json_string_length(v));
    else if (json_is_boolean(v))
        r = json_integer(json_is_true(v) ? 1 : 0);
    json_decref(v);
    return r ? r : json_null();
}

static json_t *do_sha256(json_t *v) {
    if (json_is_null(v))
        return v;
    amp_buf b;
    amp_buf_init(&b, SIZE_MAX / 2);
    amp_buf_append(&b, "", 0);
    amp_map_value_render(v, &b);
    unsigned char md[AMP_SHA256_LEN];
    amp_sha256(b.data, b.len, md);
    amp_buf_free(&b);
    static const char hex[] = "0123456789abcdef";
    char out[65];
    for (unsigned i = 0; i < 32; i++) {
        out[2 * i] = hex[md[i] >> 4];
        out[2 * i + 1] = hex[md[i] & 15];
    }
    return restring(v, out, 64);
}

json_t *amp_map_xform_apply(const amp_xform *x, json_t *v, const char **required_failed) {
    *required_failed = NULL;
    for (size_t i = 0; i < x->nsteps; i++) {
        const xstep *st = &x->steps[i];
        if (st->kind == X_DEFAULT) {
            if (!v || json_is_null(v)) {
                json_decref(v);
                v = json_incref(st->dflt);
            }
            continue;
        }
        if (st->kind == X_REQUIRED) {
            if (!v || json_is_null(v)) {
                *required_failed = v ? "null" : "missing";
                json_decref(v);
                return NULL;
            }
            continue;
        }
        if (!v || json_is_null(v))
            continue;
        switch (st->kind) {
        case X_TRIM:
            if (json_is_string(v))
                v = do_trim(v);
            break;
        case X_LOWERCASE:
        case X_UPPERCASE:
            if (json_is_string(v))
                v = do_case(v, st->kind == X_UPPERCASE);
            break;
        case X_TRUNCATE:
            if (json_is_string(v))
                v = do_truncate(v, st->max_cps);
            break;
        case X_ISO8601:
            v = do_iso8601(v);
            break;
        case X_TO_STRING:
            v = do_to_string(v);
            break;
        case X_TO_NUMBER:
            v = do_to_number(v);
            break;
        case X_SHA256:
            v = do_sha256(v);
            break;
        case X_DEFAULT:
        case X_REQUIRED:
            break;
        }
    }
    return v;
}
