/*
 * jsonr — one pass over the bytes, building jansson values as it goes.
 *
 * The rules are json_loadb's (jansson 2.14, src/load.c) with
 * JSON_REJECT_DUPLICATES | JSON_DECODE_ANY: whitespace is space, tab, CR
 * and LF; strings hold no byte below 0x20, only well-formed UTF-8 (no
 * overlong forms, no encoded surrogates, nothing above U+10FFFF), the eight
 * short escapes and \uXXXX with surrogate pairs, and no U+0000; numbers
 * follow RFC 8259, integers must fit json_int_t and reals must not overflow
 * to infinity; a value may sit at most JSON_PARSER_MAX_DEPTH levels deep,
 * counting scalars as jansson does; nothing but whitespace may follow the
 * top value, and no NUL byte anywhere (jansson skips one after a number
 * or literal; that quirk stays its business). Anything outside those rules
 * gives NULL, and jansson has the last word (jsonr.h).
 *
 * Containers are attached to their parent as soon as they open, so the
 * root owns everything built so far and one json_decref undoes a failed
 * parse, and the explicit stack holds only borrowed pointers. That also
 * keeps the parser free of recursion: 2048 levels cost 16 KiB of heap, not
 * 2048 C stack frames on an HTTP thread.
 */
#include "jsonr.h"

#include <errno.h>
#include <float.h>
#include <limits.h>
#include <locale.h>
#include <math.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "../base/alloc.h"

#ifdef JSON_PARSER_MAX_DEPTH
#define MAX_DEPTH JSON_PARSER_MAX_DEPTH
#else
#define MAX_DEPTH 2048
#endif

#if JSON_INTEGER_IS_LONG_LONG
#define JINT_MAX LLONG_MAX
#else
#define JINT_MAX LONG_MAX
#endif

/* Containers open at once before the stack moves to the heap; webhook
 * events nest two or three levels. */
#define STACK_INLINE 32
/* Decoded bytes of an escaped string kept on the C stack before the
 * scratch buffer moves to the heap. */
#define SCRATCH_INLINE 256
/* Longest number text converted from a stack copy; longer ones (hundreds
 * of digits are valid JSON) get a heap copy. */
#define NUMBER_INLINE 64

/* ---- scratch buffer for strings with escapes -------------------------- */

/* Decoded text is never longer than its source, so the input length bounds
 * this buffer; amp_xrealloc aborts on out-of-memory. */
typedef struct scratch {
    char *data;
    size_t len;
    size_t cap;
    char inline_buf[SCRATCH_INLINE];
} scratch;

static void scratch_init(scratch *b) {
    b->data = b->inline_buf;
    b->len = 0;
    b->cap = sizeof b->inline_buf;
}

static void scratch_free(scratch *b) {
    if (b->data != b->inline_buf)
        free(b->data);
}

/* Room for n more bytes; returns where they go. */
static char *scratch_room(scratch *b, size_t n) {
    if (b->cap - b->len < n) {
        size_t cap = b->cap * 2;
        while (cap - b->len < n)
            cap *= 2;
        if (b->data == b->inline_buf) {
            char *heap = amp_xmalloc(cap);
            memcpy(heap, b->data, b->len);
            b->data = heap;
        } else {
            b->data = amp_xrealloc(b->data, cap);
        }
        b->cap = cap;
    }
    return b->data + b->len;
}

static void scratch_append(scratch *b, const unsigned char *p, size_t n) {
    memcpy(scratch_room(b, n), p, n);
    b->len += n;
}

/* ---- strings ---------------------------------------------------------- */

static bool is_special(unsigned c) {
    return c < 0x20 || c == '"' || c == '\\' || c >= 0x80;
}

/* The first byte in [p, end) that ends a plain run: '"', '\\', a control
 * character or a non-ASCII byte; end if none. Eight bytes per step: in
 * each mask the lowest flagged byte is exact (the borrow tricks only flag
 * spuriously above a true hit), so the lowest bit of the union is the
 * first special byte. */
static const unsigned char *find_special(const unsigned char *p, const unsigned char *end) {
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    const uint64_t ones = 0x0101010101010101ull, highs = 0x8080808080808080ull;
    while (end - p >= 8) {
        uint64_t x;
        memcpy(&x, p, 8);
        uint64_t q = x ^ (ones * '"');
        uint64_t bs = x ^ (ones * '\\');
        uint64_t m = ((q - ones) & ~q) | ((bs - ones) & ~bs) | ((x - ones * 0x20) & ~x) | x;
        m &= highs;
        if (m)
            return p + (__builtin_ctzll(m) >> 3);
        p += 8;
    }
#endif
    while (p < end && !is_special(*p))
        p++;
    return p;
}

/* Length of the well-formed UTF-8 sequence starting with the non-ASCII
 * byte at p, or 0 (stray continuation byte, C0/C1 or F5..FF lead,
 * overlong form, encoded surrogate, above U+10FFFF, cut short). */
static size_t utf8_seq(const unsigned char *p, const unsigned char *end) {
    unsigned c = p[0];
    size_t avail = (size_t)(end - p);
    if (c >= 0xC2 && c <= 0xDF)
        return avail >= 2 && (p[1] & 0xC0) == 0x80 ? 2 : 0;
    if (c >= 0xE0 && c <= 0xEF) {
        unsigned lo = c == 0xE0 ? 0xA0 : 0x80; /* E0 80..9F: overlong */
        unsigned hi = c == 0xED ? 0x9F : 0xBF; /* ED A0..BF: surrogates */
        return avail >= 3 && p[1] >= lo && p[1] <= hi && (p[2] & 0xC0) == 0x80 ? 3 : 0;
    }
    if (c >= 0xF0 && c <= 0xF4) {
        unsigned lo = c == 0xF0 ? 0x90 : 0x80; /* F0 80..8F: overlong */
        unsigned hi = c == 0xF4 ? 0x8F : 0xBF; /* F4 90..: above U+10FFFF */
        return avail >= 4 && p[1] >= lo && p[1] <= hi && (p[2] & 0xC0) == 0x80 &&
                       (p[3] & 0xC0) == 0x80
                   ? 4
                   : 0;
    }
    return 0;
}

/* Four hex digits at p into *out; -1 if there are not four. */
static int hex4(const unsigned char *p, const unsigned char *end, unsigned *out) {
    if (end - p < 4)
        return -1;
    unsigned v = 0;
    for (int i = 0; i < 4; i++) {
        unsigned c = p[i], d;
        if (c - '0' < 10u)
            d = c - '0';
        else if ((c | 0x20) - 'a' < 6u)
            d = (c | 0x20) - 'a' + 10;
        else
            return -1;
        v = v << 4 | d;
    }
    *out = v;
    return 0;
}

/* Decodes the escape whose backslash is at *pp into b and moves *pp past
 * it; -1 when it is not one jansson accepts without JSON_ALLOW_NUL. */
static int read_escape(const unsigned char **pp, const unsigned char *end, scratch *b) {
    const unsigned char *p = *pp + 1;
    if (p == end)
        return -1;
    char c;
    switch (*p++) {
    case '"':
        c = '"';
        break;
    case '\\':
        c = '\\';
        break;
    case '/':
        c = '/';
        break;
    case 'b':
        c = '\b';
        break;
    case 'f':
        c = '\f';
        break;
    case 'n':
        c = '\n';
        break;
    case 'r':
        c = '\r';
        break;
    case 't':
        c = '\t';
        break;
    case 'u': {
        unsigned cp, lo;
        if (hex4(p, end, &cp) != 0)
            return -1;
        p += 4;
        if (cp >= 0xD800 && cp <= 0xDBFF) {
            /* A high surrogate needs a low one right after it. */
            if (end - p < 6 || p[0] != '\\' || p[1] != 'u' || hex4(p + 2, end, &lo) != 0 ||
                lo < 0xDC00 || lo > 0xDFFF)
                return -1;
            p += 6;
            cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
        } else if ((cp >= 0xDC00 && cp <= 0xDFFF) || cp == 0) {
            return -1; /* a lone low surrogate; U+0000 needs JSON_ALLOW_NUL */
        }
        char *o = scratch_room(b, 4);
        if (cp < 0x80) {
            o[0] = (char)cp;
            b->len += 1;
        } else if (cp < 0x800) {
            o[0] = (char)(0xC0 | cp >> 6);
            o[1] = (char)(0x80 | (cp & 0x3F));
            b->len += 2;
        } else if (cp < 0x10000) {
            o[0] = (char)(0xE0 | cp >> 12);
            o[1] = (char)(0x80 | (cp >> 6 & 0x3F));
            o[2] = (char)(0x80 | (cp & 0x3F));
            b->len += 3;
        } else {
            o[0] = (char)(0xF0 | cp >> 18);
            o[1] = (char)(0x80 | (cp >> 12 & 0x3F));
            o[2] = (char)(0x80 | (cp >> 6 & 0x3F));
            o[3] = (char)(0x80 | (cp & 0x3F));
            b->len += 4;
        }
        *pp = p;
        return 0;
    }
    default:
        return -1;
    }
    *scratch_room(b, 1) = c;
    b->len++;
    *pp = p;
    return 0;
}

/* Reads the string whose opening quote is at *pp and moves *pp past its
 * closing quote. The bytes go to *out / *out_len: borrowed from the input
 * when the string has no escape (the common case: no copy at all), else
 * from b, valid until b's next use. -1 on any error. */
static int read_string(const unsigned char **pp, const unsigned char *end, scratch *b,
                       const char **out, size_t *out_len) {
    const unsigned char *p = *pp + 1, *run = p;
    bool escaped = false;
    b->len = 0;
    for (;;) {
        p = find_special(p, end);
        if (p == end)
            return -1;
        unsigned c = *p;
        if (c == '"')
            break;
        if (c >= 0x80) {
            size_t n = utf8_seq(p, end);
            if (n == 0)
                return -1;
            p += n;
            continue;
        }
        if (c != '\\')
            return -1; /* a control character */
        scratch_append(b, run, (size_t)(p - run));
        escaped = true;
        if (read_escape(&p, end, b) != 0)
            return -1;
        run = p;
    }
    if (escaped) {
        scratch_append(b, run, (size_t)(p - run));
        *out = b->data;
        *out_len = b->len;
    } else {
        *out = (const char *)run;
        *out_len = (size_t)(p - run);
    }
    *pp = p + 1;
    return 0;
}

/* ---- numbers ---------------------------------------------------------- */

static bool is_digit(unsigned c) {
    return c - '0' < 10u;
}

static pthread_once_t c_numeric_once = PTHREAD_ONCE_INIT;
static locale_t c_numeric;

/* jansson converts in the process locale after swapping '.' for its
 * decimal point; converting in the C locale gives the same value whatever
 * locale the process runs in. Made once and kept for the process. */
static void make_c_numeric(void) {
    c_numeric = newlocale(LC_NUMERIC_MASK, "C", (locale_t)0);
}

/* strtod's value for the number text s[0..n), which the caller has checked
 * against the JSON grammar; -1 when it overflows to infinity (jansson's
 * "real number overflow") or cannot be converted here. */
static int text_to_double(const unsigned char *s, size_t n, double *out) {
    pthread_once(&c_numeric_once, make_c_numeric);
    if (c_numeric == (locale_t)0)
        return -1;
    char stack_copy[NUMBER_INLINE];
    char *copy = n < sizeof stack_copy ? stack_copy : amp_xmalloc(n + 1);
    memcpy(copy, s, n);
    copy[n] = '\0';
    errno = 0;
    char *stop;
    double v = strtod_l(copy, &stop, c_numeric);
    bool whole = stop == copy + n;
    bool overflow = errno == ERANGE && (v == HUGE_VAL || v == -HUGE_VAL);
    if (copy != stack_copy)
        free(copy);
    if (!whole || overflow)
        return -1;
    *out = v;
    return 0;
}

/* Powers of ten a double holds exactly (5^22 < 2^53). */
static const double exact_pow10[] = {1e0,  1e1,  1e2,  1e3,  1e4,  1e5,  1e6,  1e7,
                                     1e8,  1e9,  1e10, 1e11, 1e12, 1e13, 1e14, 1e15,
                                     1e16, 1e17, 1e18, 1e19, 1e20, 1e21, 1e22};

/* The common short reals (12.5, 0.25, 3e-3) without strtod: when the
 * digits form an integer below 2^53 and the decimal exponent is within
 * +-22, both are exact doubles and one IEEE multiply or divide rounds
 * correctly, so the result is bit for bit strtod's (Clinger's fast path).
 * int_digits/frac_digits are the digit runs, exp the exponent after 'e'
 * (already clamped). false when the fast path does not apply. */
static bool fast_real(const unsigned char *int_digits, size_t n_int,
                      const unsigned char *frac_digits, size_t n_frac, long exp, bool neg,
                      double *out) {
#if defined(FLT_EVAL_METHOD) && FLT_EVAL_METHOD == 0
    uint64_t mant = 0;
    size_t significant = 0;
    for (size_t i = 0; i < n_int + n_frac; i++) {
        unsigned d = (i < n_int ? int_digits[i] : frac_digits[i - n_int]) - '0';
        if (mant == 0 && d == 0)
            continue;
        if (++significant > 19)
            return false;
        mant = mant * 10 + d;
    }
    double v;
    if (mant == 0) {
        v = 0.0;
    } else {
        long e = exp - (long)n_frac;
        if (mant > (1ull << 53) || e < -22 || e > 22)
            return false;
        v = (double)mant;
        v = e < 0 ? v / exact_pow10[-e] : v * exact_pow10[e];
    }
    *out = neg ? -v : v;
    return true;
#else
    (void)int_digits, (void)n_int, (void)frac_digits, (void)n_frac, (void)exp, (void)neg;
    (void)out;
    return false;
#endif
}

/* Reads the number at *pp (a '-' or a digit) and moves *pp past it. NULL
 * on a grammar error, an integer outside json_int_t or a real that
 * overflows. */
static json_t *read_number(const unsigned char **pp, const unsigned char *end) {
    const unsigned char *start = *pp, *p = start;
    bool neg = *p == '-';
    if (neg)
        p++;
    const unsigned char *int_digits = p;
    if (p == end)
        return NULL;
    if (*p == '0') {
        p++;
        if (p < end && is_digit(*p))
            return NULL; /* leading zero */
    } else if (is_digit(*p)) {
        do
            p++;
        while (p < end && is_digit(*p));
    } else {
        return NULL;
    }
    size_t n_int = (size_t)(p - int_digits);

    if (p == end || (*p != '.' && *p != 'e' && *p != 'E')) {
        /* An integer: no leading zeros, so 19 digits or fewer fit uint64_t
         * and more overflow json_int_t. */
        if (n_int > 19)
            return NULL;
        uint64_t mag = 0;
        for (size_t i = 0; i < n_int; i++)
            mag = mag * 10 + (unsigned)(int_digits[i] - '0');
        json_int_t v;
        if (neg) {
            if (mag > (uint64_t)JINT_MAX + 1)
                return NULL;
            v = mag == (uint64_t)JINT_MAX + 1 ? -JINT_MAX - 1 : -(json_int_t)mag;
        } else {
            if (mag > (uint64_t)JINT_MAX)
                return NULL;
            v = (json_int_t)mag;
        }
        *pp = p;
        return json_integer(v);
    }

    const unsigned char *frac_digits = p;
    size_t n_frac = 0;
    if (*p == '.') {
        p++;
        frac_digits = p;
        while (p < end && is_digit(*p))
            p++;
        n_frac = (size_t)(p - frac_digits);
        if (n_frac == 0)
            return NULL; /* "1." */
    }
    long exp = 0;
    if (p < end && (*p == 'e' || *p == 'E')) {
        p++;
        bool exp_neg = false;
        if (p < end && (*p == '+' || *p == '-'))
            exp_neg = *p++ == '-';
        if (p == end || !is_digit(*p))
            return NULL; /* "1e", "1e+" */
        do {
            /* Clamped: far beyond any double, and no overflow of long. */
            if (exp < 100000)
                exp = exp * 10 + (*p - '0');
            p++;
        } while (p < end && is_digit(*p));
        if (exp_neg)
            exp = -exp;
    }
    double v;
    if (!fast_real(int_digits, n_int, frac_digits, n_frac, exp, neg, &v) &&
        text_to_double(start, (size_t)(p - start), &v) != 0)
        return NULL;
    *pp = p;
    return json_real(v);
}

/* ---- the parser ------------------------------------------------------- */

typedef struct parser {
    json_t *root;
    json_t **stack; /* open containers, innermost last; borrowed from root */
    size_t depth;
    size_t cap;
    json_t *inline_stack[STACK_INLINE];
    scratch key;
    scratch val;
} parser;

static const unsigned char *skip_ws(const unsigned char *p, const unsigned char *end) {
    while (p < end && *p <= ' ' && (*p == ' ' || *p == '\n' || *p == '\r' || *p == '\t'))
        p++;
    return p;
}

/* Hands v (may be NULL after a failed constructor) to the innermost open
 * container, under key when that is an object, or makes it the root.
 * -1 on failure, including a duplicate key. v is taken over either way. */
static int attach(parser *ps, json_t *top, bool top_is_object, const char *key, size_t key_len,
                  json_t *v) {
    if (!v)
        return -1;
    if (!top) {
        ps->root = v;
        return 0;
    }
    if (!top_is_object)
        return json_array_append_new(top, v);
    /* One hash lookup instead of two: a key already present is replaced
     * and leaves the size as it was, which is the duplicate. */
    size_t before = json_object_size(top);
    if (json_object_setn_new_nocheck(top, key, key_len, v) != 0)
        return -1;
    return json_object_size(top) == before + 1 ? 0 : -1;
}

static void push(parser *ps, json_t *container) {
    if (ps->depth == ps->cap) {
        size_t cap = ps->cap * 2 > MAX_DEPTH ? MAX_DEPTH : ps->cap * 2;
        if (ps->stack == ps->inline_stack) {
            json_t **heap = amp_xmalloc(cap * sizeof *heap);
            memcpy(heap, ps->stack, ps->depth * sizeof *heap);
            ps->stack = heap;
        } else {
            ps->stack = amp_xrealloc(ps->stack, cap * sizeof *ps->stack);
        }
        ps->cap = cap;
    }
    ps->stack[ps->depth++] = container;
}

static void parser_free(parser *ps) {
    if (ps->stack != ps->inline_stack)
        free(ps->stack);
    scratch_free(&ps->key);
    scratch_free(&ps->val);
}

json_t *amp_json_parse(const char *s, size_t len) {
    if (!s || len == 0)
        return NULL;
    const unsigned char *p = (const unsigned char *)s, *end = p + len;
    parser ps;
    ps.root = NULL;
    ps.stack = ps.inline_stack;
    ps.depth = 0;
    ps.cap = STACK_INLINE;
    scratch_init(&ps.key);
    scratch_init(&ps.val);

    json_t *top = NULL; /* innermost open container; NULL before the root */
    bool top_is_object = false;
    const char *key = NULL; /* the member's key while its value is read */
    size_t key_len = 0;
    json_t *v;

    p = skip_ws(p, end);
value:
    /* The new value sits at depth ps.depth + 1 (the root at 1). */
    if (p == end || ps.depth >= MAX_DEPTH)
        goto fail;
    switch (*p) {
    case '{':
    case '[': {
        bool is_object = *p == '{';
        v = is_object ? json_object() : json_array();
        if (attach(&ps, top, top_is_object, key, key_len, v) != 0)
            goto fail;
        push(&ps, v);
        top = v;
        top_is_object = is_object;
        p = skip_ws(p + 1, end);
        if (p < end && *p == (is_object ? '}' : ']')) {
            p++;
            goto close;
        }
        if (is_object)
            goto member;
        goto value;
    }
    case '"': {
        const char *str;
        size_t n;
        if (read_string(&p, end, &ps.val, &str, &n) != 0)
            goto fail;
        v = json_stringn_nocheck(str, n);
        break;
    }
    case 't':
        if (end - p < 4 || memcmp(p, "true", 4) != 0)
            goto fail;
        p += 4;
        v = json_true();
        break;
    case 'f':
        if (end - p < 5 || memcmp(p, "false", 5) != 0)
            goto fail;
        p += 5;
        v = json_false();
        break;
    case 'n':
        if (end - p < 4 || memcmp(p, "null", 4) != 0)
            goto fail;
        p += 4;
        v = json_null();
        break;
    default:
        if (*p != '-' && !is_digit(*p))
            goto fail;
        v = read_number(&p, end);
        break;
    }
    if (attach(&ps, top, top_is_object, key, key_len, v) != 0)
        goto fail;

next:
    p = skip_ws(p, end);
    if (!top) {
        if (p != end)
            goto fail; /* trailing bytes after the top value */
        parser_free(&ps);
        return ps.root;
    }
    if (p == end)
        goto fail;
    if (*p == ',') {
        p = skip_ws(p + 1, end);
        if (top_is_object)
            goto member;
        goto value;
    }
    if (*p != (top_is_object ? '}' : ']'))
        goto fail;
    p++;
close:
    ps.depth--;
    top = ps.depth ? ps.stack[ps.depth - 1] : NULL;
    top_is_object = top && json_is_object(top);
    goto next;

member:
    if (p == end || *p != '"')
        goto fail;
    if (read_string(&p, end, &ps.key, &key, &key_len) != 0)
        goto fail;
    p = skip_ws(p, end);
    if (p == end || *p != ':')
        goto fail;
    p = skip_ws(p + 1, end);
    goto value;

fail:
    json_decref(ps.root);
    parser_free(&ps);
    return NULL;
}

json_t *amp_json_loadb(const char *s, size_t len, size_t flags, json_error_t *err) {
    if ((flags & ~(size_t)(JSON_REJECT_DUPLICATES | JSON_DECODE_ANY)) == 0) {
        json_t *v = amp_json_parse(s, len);
        /* This reader takes any value at the top and refuses duplicate keys;
         * jansson without JSON_DECODE_ANY refuses a bare scalar (it then
         * says why), and without JSON_REJECT_DUPLICATES takes duplicates
         * (the reader's NULL sends those texts to it). */
        if (v && ((flags & JSON_DECODE_ANY) || json_is_object(v) || json_is_array(v)))
            return v;
        json_decref(v);
    }
    return json_loadb(s, len, flags, err);
}
