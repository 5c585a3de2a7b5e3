#include "jsonw.h"
#include "../base/alloc.h"
#include "../base/buf.h"

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* The write cursor. p and lim point into b->data; lim leaves room for the
 * NUL terminator and never passes b->data + b->max, so checking against lim
 * is checking the cap. */
typedef struct jw {
    amp_buf *b;
    char *p;
    char *lim;
} jw;

/* Capacity for the first allocation of an empty buffer: a typical Dify
 * request body fits without a second one. */
#define FIRST_CAP 1024

/* Bytes b->data can hold before its NUL without passing max. amp_buf_append
 * never makes cap larger than max + 1; the min keeps any other buffer
 * honest. */
static size_t usable(const amp_buf *b) {
    return b->cap - 1 < b->max ? b->cap - 1 : b->max;
}

/* Slow path of reserve(): grow b->data so n more bytes (and the NUL) fit. */
static int grow(jw *w, size_t n) {
    amp_buf *b = w->b;
    size_t len = (size_t)(w->p - b->data);
    if (n > b->max - len)
        return -1;
    size_t need = len + n + 1;
    size_t limit = b->max < SIZE_MAX ? b->max + 1 : SIZE_MAX;
    size_t cap = b->cap;
    while (cap < need)
        cap = cap > limit / 2 ? limit : cap * 2;
    b->data = amp_xrealloc(b->data, cap);
    b->cap = cap;
    w->p = b->data + len;
    w->lim = b->data + usable(b);
    return 0;
}

/* Makes room for n more bytes; -1 when out's max would be passed. */
static inline int reserve(jw *w, size_t n) {
    if ((size_t)(w->lim - w->p) >= n)
        return 0;
    return grow(w, n);
}

/* ---- strings --------------------------------------------------------- */

/* Bytes copied as they are without looking further: printable ASCII other
 * than '"' and '\\'. Bytes >= 0x80 are copied too, after their UTF-8
 * sequence is checked. */
static inline int plain(unsigned char c) {
    return c >= 0x20 && c < 0x80 && c != '"' && c != '\\';
}

#define ONES UINT64_C(0x0101010101010101)
#define HIGHS UINT64_C(0x8080808080808080)

/* Whether all 8 bytes of x are plain. Each test below is exact about
 * whether some byte matches (borrows only start at a matching byte), which
 * is all that is needed: a word with any other byte is looked at byte by
 * byte. */
static inline int word_plain(uint64_t x) {
    uint64_t ctl = (x - ONES * 0x20) & ~x;
    uint64_t q = x ^ (ONES * '"');
    uint64_t bs = x ^ (ONES * '\\');
    uint64_t hit = ctl | ((q - ONES) & ~q) | ((bs - ONES) & ~bs) | x;
    return (hit & HIGHS) == 0;
}

/* Length of the well-formed UTF-8 sequence at s (lead byte >= 0x80), or 0:
 * no overlong forms, no surrogates, nothing above U+10FFFF — the sequences
 * jansson accepts. */
static inline size_t utf8_seq(const unsigned char *s, size_t avail) {
    unsigned c = s[0];
    unsigned lo = 0x80, hi = 0xBF; /* range of the second byte */
    size_t k;
    if (c >= 0xC2 && c <= 0xDF) {
        k = 2;
    } else if (c >= 0xE0 && c <= 0xEF) {
        k = 3;
        if (c == 0xE0)
            lo = 0xA0;
        else if (c == 0xED)
            hi = 0x9F;
    } else if (c >= 0xF0 && c <= 0xF4) {
        k = 4;
        if (c == 0xF0)
            lo = 0x90;
        else if (c == 0xF4)
            hi = 0x8F;
    } else {
        return 0;
    }
    if (avail < k || s[1] < lo || s[1] > hi)
        return 0;
    for (size_t i = 2; i < k; i++)
        if ((s[i] & 0xC0) != 0x80)
            return 0;
    return k;
}

static const char hexdig[] = "0123456789ABCDEF";

/* The two-character escapes JSON has for control characters; 0 means
 * \u00XX. */
static const char short_esc[0x20] = {
    ['\b'] = 'b', ['\t'] = 't', ['\n'] = 'n', ['\f'] = 'f', ['\r'] = 'r',
};

static int write_string(jw *w, const char *str, size_t n) {
    const unsigned char *s = (const unsigned char *)str;
    /* Room for the string without escapes; each escape reserves the bytes
     * it adds, so the scan itself never checks the cap. */
    if (n > SIZE_MAX - 2 || reserve(w, n + 2) != 0)
        return -1;
    *w->p++ = '"';
    size_t i = 0, run = 0;
    for (;;) {
        uint64_t x;
        while (n - i >= 8) {
            memcpy(&x, s + i, sizeof x);
            if (!word_plain(x))
                break;
            i += 8;
        }
        /* A tail shorter than a word: the last 8 bytes of the string, the
         * ones before the tail looked at again. */
        if (i < n && n - i < 8 && n >= 8) {
            memcpy(&x, s + n - 8, sizeof x);
            if (word_plain(x))
                i = n;
        }
        while (i < n && plain(s[i]))
            i++;
        if (i == n)
            break;
        unsigned c = s[i];
        if (c >= 0x80) {
            size_t k = utf8_seq(s + i, n - i);
            if (k == 0)
                return -1;
            i += k;
            continue;
        }
        /* c needs an escape: copy the run before it, then the escape. */
        size_t len = i - run;
        memcpy(w->p, s + run, len);
        w->p += len;
        /* Exactly the escape's bytes, the rest of the string and the
         * closing quote: a value that just fits the cap must not fail.
         * c is '"', '\\' or below 0x20 here, so short_esc[c] is in range. */
        int two = c == '"' || c == '\\' || short_esc[c];
        if (reserve(w, (two ? 2 : 6) + (n - i - 1) + 1) != 0)
            return -1;
        char *p = w->p;
        p[0] = '\\';
        if (two) {
            p[1] = c < 0x20 ? short_esc[c] : (char)c;
            p += 2;
        } else {
            p[1] = 'u';
            p[2] = '0';
            p[3] = '0';
            p[4] = hexdig[c >> 4];
            p[5] = hexdig[c & 0xF];
            p += 6;
        }
        w->p = p;
        run = ++i;
    }
    size_t len = n - run;
    memcpy(w->p, s + run, len);
    w->p += len;
    *w->p++ = '"';
    return 0;
}

/* ---- numbers --------------------------------------------------------- */

static const char digit_pairs[] = "00010203040506070809"
                                  "10111213141516171819"
                                  "20212223242526272829"
                                  "30313233343536373839"
                                  "40414243444546474849"
                                  "50515253545556575859"
                                  "60616263646566676869"
                                  "70717273747576777879"
                                  "80818283848586878889"
                                  "90919293949596979899";

/* Not inlined (nor write_real): their digit buffers would otherwise sit in
 * every frame of write_value's recursion. */
__attribute__((noinline)) static int write_integer(jw *w, json_int_t v) {
    /* 20 digits for 2^64 and a sign. */
    char tmp[21];
    char *e = tmp + sizeof tmp, *d = e;
    /* The magnitude in unsigned arithmetic, so the most negative value
     * works. */
    uint64_t u = v < 0 ? 0 - (uint64_t)v : (uint64_t)v;
    while (u >= 100) {
        unsigned r = (unsigned)(u % 100);
        u /= 100;
        d -= 2;
        memcpy(d, digit_pairs + 2 * r, 2);
    }
    if (u >= 10) {
        d -= 2;
        memcpy(d, digit_pairs + 2 * u, 2);
    } else {
        *--d = (char)('0' + u);
    }
    if (v < 0)
        *--d = '-';
    size_t len = (size_t)(e - d);
    if (reserve(w, len) != 0)
        return -1;
    memcpy(w->p, d, len);
    w->p += len;
    return 0;
}

/* jansson's real format: 17 significant digits, so every double reads back
 * exactly (not the shortest form; amp_map_real_format is that). */
__attribute__((noinline)) static int write_real(jw *w, double d) {
    if (!isfinite(d))
        return -1; /* JSON has no spelling; jansson cannot hold one either */
    char buf[48];
    int n = snprintf(buf, sizeof buf, "%.17g", d);
    if (n < 0 || (size_t)n >= sizeof buf)
        return -1;
    /* Normalise what printf varies: the locale's decimal point becomes '.';
     * the exponent loses its '+' and leading zeros ("1e22", "1e-7"). */
    char out[48];
    size_t len = 0;
    int frac_or_exp = 0;
    for (int i = 0; i < n; i++) {
        char c = buf[i];
        if (c == 'e') {
            frac_or_exp = 1;
            out[len++] = 'e';
            i++;
            if (buf[i] == '-')
                out[len++] = '-';
            else if (buf[i] != '+')
                i--;
            while (i + 2 < n && buf[i + 1] == '0')
                i++;
        } else if ((c >= '0' && c <= '9') || c == '-') {
            out[len++] = c;
        } else {
            frac_or_exp = 1;
            out[len++] = '.';
        }
    }
    /* A whole number keeps a fraction so it reads back as a real. */
    if (!frac_or_exp) {
        out[len++] = '.';
        out[len++] = '0';
    }
    if (reserve(w, len) != 0)
        return -1;
    memcpy(w->p, out, len);
    w->p += len;
    return 0;
}

/* ---- values ---------------------------------------------------------- */

static int put(jw *w, const char *s, size_t n) {
    if (reserve(w, n) != 0)
        return -1;
    memcpy(w->p, s, n);
    w->p += n;
    return 0;
}

static inline int put1(jw *w, char c) {
    if (reserve(w, 1) != 0)
        return -1;
    *w->p++ = c;
    return 0;
}

/* depth: containers open around v. */
static int write_value(jw *w, const json_t *v, int depth) {
    if (!v)
        return -1;
    switch (json_typeof(v)) {
    case JSON_STRING:
        return write_string(w, json_string_value(v), json_string_length(v));
    case JSON_INTEGER:
        return write_integer(w, json_integer_value(v));
    case JSON_REAL:
        return write_real(w, json_real_value(v));
    case JSON_TRUE:
        return put(w, "true", 4);
    case JSON_FALSE:
        return put(w, "false", 5);
    case JSON_NULL:
        return put(w, "null", 4);
    case JSON_ARRAY: {
        /* Also what stops a value that contains itself. */
        if (depth >= AMP_JSON_MAX_DEPTH)
            return -1;
        size_t n = json_array_size(v);
        if (put1(w, '[') != 0)
            return -1;
        for (size_t i = 0; i < n; i++) {
            if (i > 0 && put1(w, ',') != 0)
                return -1;
            if (write_value(w, json_array_get(v, i), depth + 1) != 0)
                return -1;
        }
        return put1(w, ']');
    }
    case JSON_OBJECT: {
        if (depth >= AMP_JSON_MAX_DEPTH)
            return -1;
        /* json_object_iter takes a non-const object but does not change it. */
        json_t *obj = (json_t *)v;
        if (put1(w, '{') != 0)
            return -1;
        int first = 1;
        for (void *it = json_object_iter(obj); it; it = json_object_iter_next(obj, it)) {
            if (!first && put1(w, ',') != 0)
                return -1;
            first = 0;
            if (write_string(w, json_object_iter_key(it), json_object_iter_key_len(it)) != 0 ||
                put1(w, ':') != 0 || write_value(w, json_object_iter_value(it), depth + 1) != 0)
                return -1;
        }
        return put1(w, '}');
    }
    }
    return -1;
}

/* The cursor at the end of out; an empty buffer gets its first allocation
 * here so the cursor always points into one. */
static jw cursor(amp_buf *out) {
    if (!out->data) {
        size_t limit = out->max < SIZE_MAX ? out->max + 1 : SIZE_MAX;
        out->cap = FIRST_CAP < limit ? FIRST_CAP : limit;
        out->data = amp_xmalloc(out->cap);
        out->len = 0;
        out->data[0] = '\0';
    }
    return (jw){out, out->data + out->len, out->data + usable(out)};
}

int amp_json_write_string(amp_buf *out, const char *s, size_t n) {
    jw w = cursor(out);
    if (write_string(&w, s, n) != 0) {
        out->data[out->len] = '\0';
        return -1;
    }
    out->len = (size_t)(w.p - out->data);
    *w.p = '\0';
    return 0;
}

int amp_json_write_int(amp_buf *out, long long v) {
    jw w = cursor(out);
    if (write_integer(&w, (json_int_t)v) != 0) {
        out->data[out->len] = '\0';
        return -1;
    }
    out->len = (size_t)(w.p - out->data);
    *w.p = '\0';
    return 0;
}

int amp_json_write(amp_buf *out, const json_t *v) {
    jw w = cursor(out);
    if (write_value(&w, v, 0) != 0) {
        out->data[out->len] = '\0';
        return -1;
    }
    out->len = (size_t)(w.p - out->data);
    *w.p = '\0';
    return 0;
}

char *amp_json_dumps(const json_t *v) {
    amp_buf b;
    /* No cap of its own: json_dumps has none either. Half the address
     * space keeps the capacity arithmetic clear of overflow. */
    amp_buf_init(&b, SIZE_MAX / 2);
    if (amp_json_write(&b, v) != 0) {
        amp_buf_free(&b);
        return NULL;
    }
    return b.data;
}
