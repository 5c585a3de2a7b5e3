/* Unit tests: the compact JSON writer gives json_dumps(v, JSON_COMPACT |
 * JSON_ENCODE_ANY) byte for byte — on every JSON file the other suites use,
 * on hand-picked strings and numbers, and on random trees — fails where
 * json_dumps fails, and keeps within its buffer's cap. */
#include <check.h>
#include <limits.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../../json/jsonw.h"
#include "../json_support.h"
#include "../check_run.h"
#include "../../base/buf.h"

#define DUMP_FLAGS (JSON_COMPACT | JSON_ENCODE_ANY)

/* Whether some object key inside v is not valid UTF-8. jansson writes such a
 * key broken (it ignores the key's encoding error) where the writer fails. */
static int has_bad_key(const json_t *v) {
    if (json_is_array(v)) {
        for (size_t i = 0; i < json_array_size(v); i++)
            if (has_bad_key(json_array_get(v, i)))
                return 1;
    } else if (json_is_object(v)) {
        json_t *obj = (json_t *)v;
        for (void *it = json_object_iter(obj); it; it = json_object_iter_next(obj, it)) {
            json_t *k = json_stringn(json_object_iter_key(it), json_object_iter_key_len(it));
            json_decref(k);
            if (!k || has_bad_key(json_object_iter_value(it)))
                return 1;
        }
    }
    return 0;
}

/* amp_json_write behind a prefix, into a buffer capped at exactly the
 * expected length, and one byte short of it. */
static void check_caps(const json_t *v, const char *want) {
    static const char prefix[] = "x=";
    size_t plen = sizeof prefix - 1, wlen = strlen(want);
    amp_buf b;

    amp_buf_init(&b, plen + wlen);
    ck_assert_int_eq(amp_buf_append(&b, prefix, plen), 0);
    ck_assert_int_eq(amp_json_write(&b, v), 0);
    ck_assert_uint_eq(b.len, plen + wlen);
    ck_assert(memcmp(b.data, prefix, plen) == 0);
    ck_assert(memcmp(b.data + plen, want, wlen) == 0);
    ck_assert_int_eq(b.data[b.len], '\0');
    ck_assert_uint_le(b.cap, b.max + 1);
    amp_buf_free(&b);

    amp_buf_init(&b, plen + wlen - 1);
    ck_assert_int_eq(amp_buf_append(&b, prefix, plen), 0);
    ck_assert_int_eq(amp_json_write(&b, v), -1);
    ck_assert_uint_eq(b.len, plen);
    ck_assert_str_eq(b.data, prefix);
    ck_assert_uint_le(b.cap, b.max + 1);
    amp_buf_free(&b);
}

/* The writer against json_dumps for v. Returns 1 when both encoded it. */
static int same(const json_t *v) {
    char *want = json_dumps(v, DUMP_FLAGS);
    char *got = amp_json_dumps(v);
    int bad_key = has_bad_key(v);
    if (bad_key) {
        ck_assert_msg(got == NULL, "invalid key written: %s", got);
    } else if (!want) {
        ck_assert_msg(got == NULL, "json_dumps failed, writer gave %s", got);
    } else {
        ck_assert_msg(got != NULL, "writer failed where json_dumps gave %s", want);
        if (strcmp(want, got) != 0)
            ck_abort_msg("differs:\n  json_dumps: %s\n  writer:     %s", want, got);
        check_caps(v, want);
    }
    /* A failing write leaves an empty uncapped buffer empty. */
    if (!got) {
        amp_buf b;
        amp_buf_init(&b, 1 << 20);
        ck_assert_int_eq(amp_json_write(&b, v), -1);
        ck_assert_uint_eq(b.len, 0);
        amp_buf_free(&b);
    }
    int ok = got != NULL;
    free(want);
    free(got);
    return ok;
}

/* same() for v and every value inside it; counts the values encoded. */
static size_t same_all(const json_t *v) {
    size_t n = (size_t)same(v);
    if (json_is_array(v)) {
        for (size_t i = 0; i < json_array_size(v); i++)
            n += same_all(json_array_get(v, i));
    } else if (json_is_object(v)) {
        json_t *obj = (json_t *)v;
        for (void *it = json_object_iter(obj); it; it = json_object_iter_next(obj, it))
            n += same_all(json_object_iter_value(it));
    }
    return n;
}

/* ---- 1. the JSON files of the other suites --------------------------- */

typedef struct tally {
    size_t docs;   /* documents json_loadb accepted */
    size_t values; /* values (documents and what is inside them) compared */
} tally;

static void check_text(const char *s, size_t n, tally *t) {
    static const size_t flags[] = {0, JSON_DECODE_ANY, JSON_DECODE_ANY | JSON_ALLOW_NUL};
    for (size_t i = 0; i < sizeof flags / sizeof flags[0]; i++) {
        json_error_t err;
        json_t *v = json_loadb(s, n, flags[i], &err);
        if (!v)
            continue;
        t->docs++;
        t->values += same_all(v);
        json_decref(v);
    }
}

/* The whole file, then each line of it (JSON Lines files, expected.jsonl). */
static void check_file(const char *path, tally *t) {
    FILE *f = fopen(path, "rb");
    ck_assert_msg(f != NULL, "cannot open %s", path);
    amp_buf b;
    amp_buf_init(&b, 64 << 20);
    ck_assert_int_eq(amp_buf_read(&b, f), 0);
    fclose(f);
    if (!b.data) {
        amp_buf_free(&b);
        return;
    }
    check_text(b.data, b.len, t);
    size_t start = 0;
    for (size_t i = 0; i <= b.len; i++) {
        if (i == b.len || b.data[i] == '\n') {
            if (i > start && !(start == 0 && i == b.len))
                check_text(b.data + start, i - start, t);
            start = i + 1;
        }
    }
    amp_buf_free(&b);
}

static void check_one(const char *path, void *ctx) {
    check_file(path, ctx);
}

/* Every case file under dir (see json_case_files); returns the file count. */
static size_t check_tree(const char *dir, tally *t) {
    long files = json_case_files(dir, check_one, t);
    ck_assert_msg(files >= 0, "cannot open %s (run from the repo root)", dir);
    return (size_t)files;
}

START_TEST(mapping_files) {
    tally t = {0, 0};
    size_t files = check_tree("tests/mapping", &t);
    /* The suite has dozens of cases of three files each: a missing tree
     * must not pass as "nothing differed". */
    ck_assert_uint_ge(files, 100);
    ck_assert_uint_ge(t.docs, 300);
    ck_assert_uint_ge(t.values, 5000);
}
END_TEST

START_TEST(fuzz_corpus) {
    tally t = {0, 0};
    size_t files = check_tree("tests/fuzz/corpus", &t);
    ck_assert_uint_ge(files, 300);
    ck_assert_uint_ge(t.docs, 200);
    ck_assert_uint_ge(t.values, 5000);
}
END_TEST

/* ---- 2. hand cases --------------------------------------------------- */

/* same() on a string of n bytes, made unchecked so invalid UTF-8 gets in. */
static int same_str(const char *s, size_t n) {
    json_t *v = json_stringn_nocheck(s, n);
    ck_assert_ptr_nonnull(v);
    int ok = same(v);
    json_decref(v);
    return ok;
}

/* The writer's text for v equals want (and json_dumps agrees). */
static void is(json_t *v, const char *want) {
    ck_assert_ptr_nonnull(v);
    ck_assert(same(v));
    char *got = amp_json_dumps(v);
    ck_assert_str_eq(got, want);
    free(got);
    json_decref(v);
}

START_TEST(control_characters) {
    for (int c = 0; c < 0x20; c++) {
        char s[3] = {'a', (char)c, 'b'};
        ck_assert(same_str(s, 3));
        ck_assert(same_str(s + 1, 1));
        /* At each position of an 8-byte step of the scan. */
        char w[17] = "0123456789abcdef";
        for (size_t pos = 0; pos < 16; pos++) {
            w[pos] = (char)c;
            ck_assert(same_str(w, 16));
            w[pos] = 'x';
        }
    }
    is(json_stringn("\0", 1), "\"\\u0000\"");
    is(json_string("\x01\x1f"), "\"\\u0001\\u001F\"");
    is(json_string("\b\f\n\r\t"), "\"\\b\\f\\n\\r\\t\"");
    is(json_string("\x0b"), "\"\\u000B\"");
}
END_TEST

START_TEST(plain_and_escaped_ascii) {
    is(json_string(""), "\"\"");
    is(json_string("\"\\/\x7f"), "\"\\\"\\\\/\x7f\"");
    /* Every printable ASCII byte, across the 8-byte steps of the scan. */
    char all[96];
    for (int c = 0x20; c < 0x80; c++)
        all[c - 0x20] = (char)c;
    for (size_t start = 0; start < 16; start++)
        for (size_t len = 0; start + len <= sizeof all; len += 7)
            ck_assert(same_str(all + start, len));
    /* An escape at each position of a long plain string. */
    char s[40];
    for (size_t i = 0; i < sizeof s; i++) {
        memset(s, 'x', sizeof s);
        s[i] = '"';
        ck_assert(same_str(s, sizeof s));
        s[i] = '\n';
        ck_assert(same_str(s, sizeof s));
        s[i] = (char)0xff; /* invalid anywhere */
        ck_assert(!same_str(s, sizeof s));
    }
}
END_TEST

START_TEST(utf8) {
    /* U+2028/2029 go out as they are (jansson does not escape them). */
    is(json_string("a\xe2\x80\xa8\xe2\x80\xa9z"), "\"a\xe2\x80\xa8\xe2\x80\xa9z\"");
    is(json_string("\xc3\xa9\xe6\x97\xa5\xf0\x9f\x98\x80"),
       "\"\xc3\xa9\xe6\x97\xa5\xf0\x9f\x98\x80\"");
    /* The edges of each sequence length. */
    static const char *const valid[] = {
        "\xc2\x80",
        "\xdf\xbf",
        "\xe0\xa0\x80",
        "\xed\x9f\xbf",
        "\xee\x80\x80",
        "\xef\xbf\xbf",
        "\xf0\x90\x80\x80",
        "\xf4\x8f\xbf\xbf",
        "\xf3\xbf\xbf\xbf",
        "\xe1\x80\x80"
        "abc",
    };
    for (size_t i = 0; i < sizeof valid / sizeof valid[0]; i++)
        ck_assert_msg(same_str(valid[i], strlen(valid[i])), "valid case %zu", i);
    /* Overlong forms, surrogates, beyond U+10FFFF, stray and missing
     * continuation bytes: json_dumps fails on each, so must the writer. */
    static const char *const invalid[] = {
        "\x80",
        "\xbf",
        "\xc0\x80",
        "\xc1\xbf",
        "\xc2",
        "\xc2\x41",
        "\xe0\x80\x80",
        "\xe0\x9f\xbf",
        "\xed\xa0\x80",
        "\xed\xbf\xbf",
        "\xe1\x80",
        "\xe1\x80\x41",
        "\xf0\x80\x80",
        "\xf0\x8f\xbf\xbf",
        "\xf4\x90\x80\x80",
        "\xf5\x80\x80",
        "\xf8\x88\x80",
        "\xff",
        "\xfe",
        "abc\xf0\x9f\x98",
    };
    for (size_t i = 0; i < sizeof invalid / sizeof invalid[0]; i++)
        ck_assert_msg(!same_str(invalid[i], strlen(invalid[i])), "invalid case %zu", i);
    /* Inside a container the whole write fails. */
    json_t *a = json_pack("[s, s]", "ok", "fine");
    json_array_append_new(a, json_stringn_nocheck("\xff", 1));
    ck_assert(!same(a));
    json_decref(a);
}
END_TEST

START_TEST(reals) {
    is(json_real(0.1), "0.10000000000000001");
    is(json_real(1e22), "1e22");
    is(json_real(1e-7), "9.9999999999999995e-8");
    is(json_real(-0.0), "-0.0");
    is(json_real(5e-324), "4.9406564584124654e-324");
    is(json_real(1.7976931348623157e308), "1.7976931348623157e308");
    is(json_real(100.0), "100.0");
    is(json_real(123456789012345680000.0), "1.2345678901234568e20");
    is(json_real(3.0), "3.0");
    is(json_real(-2.5e-300), "-2.5e-300");
    is(json_real(0.0), "0.0");
    is(json_real(1e16), "10000000000000000.0");
    is(json_real(1e17), "1e17");
    static const double more[] = {
        2.5, 1e-5, 1e-4, 123.456, -1e300, 1e100, 2.2250738585072014e-308, 0.5, 1.0 / 3, 6.02e23,
    };
    for (size_t i = 0; i < sizeof more / sizeof more[0]; i++) {
        json_t *v = json_real(more[i]);
        ck_assert(same(v));
        json_decref(v);
    }
}
END_TEST

START_TEST(integers_and_literals) {
    /* jansson.h names no limits; json_int_t is long long here. */
    is(json_integer(LLONG_MIN), "-9223372036854775808");
    is(json_integer(LLONG_MAX), "9223372036854775807");
    is(json_integer(0), "0");
    is(json_integer(-1), "-1");
    /* Every digit count, both signs. */
    json_int_t p = 1;
    for (int d = 1; d <= 18; d++, p *= 10) {
        json_int_t vals[] = {p, p - 1, p + 1, -p, 9 * p + (p - 1), -(9 * p + (p - 1))};
        for (size_t i = 0; i < sizeof vals / sizeof vals[0]; i++) {
            json_t *v = json_integer(vals[i]);
            ck_assert(same(v));
            json_decref(v);
        }
    }
    is(json_true(), "true");
    is(json_false(), "false");
    is(json_null(), "null");
}
END_TEST

START_TEST(containers) {
    is(json_object(), "{}");
    is(json_array(), "[]");
    is(json_pack("{s:[], s:{}, s:[i, s, n, b]}", "a", "b", "c", 1, "x", 0),
       "{\"a\":[],\"b\":{},\"c\":[1,\"x\",null,false]}");
    /* Insertion order, not key order. */
    is(json_pack("{s:i, s:i, s:i}", "z", 1, "a", 2, "m", 3), "{\"z\":1,\"a\":2,\"m\":3}");
    /* Keys that need escapes, and one with a NUL inside. */
    json_t *o = json_object();
    json_object_set_new(o, "q\"\\\n\x01/", json_integer(1));
    json_object_setn_new(o, "n\0ul", 4, json_integer(2));
    json_object_set_new(o, "\xc3\xa9", json_integer(3));
    json_object_set_new(o, "", json_integer(4));
    is(o, "{\"q\\\"\\\\\\n\\u0001/\":1,\"n\\u0000ul\":2,\"\xc3\xa9\":3,\"\":4}");
    /* A key that is not valid UTF-8 fails (jansson writes it broken). */
    o = json_pack("{s:i}", "a", 1);
    json_object_setn_new_nocheck(o, "b\xff", 2, json_integer(2));
    char *s = amp_json_dumps(o);
    ck_assert_ptr_null(s);
    ck_assert(!same(o));
    json_decref(o);
}
END_TEST

/* depth containers, alternating arrays and objects, around a 1. */
static json_t *nest(int depth) {
    json_t *v = json_integer(1);
    for (int i = 0; i < depth; i++) {
        json_t *c;
        if (i % 2) {
            c = json_array();
            json_array_append_new(c, v);
        } else {
            c = json_object();
            json_object_set_new(c, "k", v);
        }
        v = c;
    }
    return v;
}

START_TEST(nesting) {
    json_t *v = nest(100);
    ck_assert(same(v));
    json_decref(v);
    v = nest(AMP_JSON_MAX_DEPTH);
    ck_assert(same(v));
    json_decref(v);
    /* One deeper fails here; jansson's dumper has no limit. */
    v = nest(AMP_JSON_MAX_DEPTH + 1);
    ck_assert_ptr_null(amp_json_dumps(v));
    json_decref(v);
    /* A value that contains itself fails in both. */
    json_t *a = json_array(), *b = json_array();
    json_array_append(a, b);
    json_array_append(b, a);
    char *want = json_dumps(a, DUMP_FLAGS);
    ck_assert_ptr_null(want);
    ck_assert_ptr_null(amp_json_dumps(a));
    json_array_clear(b);
    json_decref(a);
    json_decref(b);
    ck_assert_ptr_null(amp_json_dumps(NULL));
}
END_TEST

START_TEST(cap) {
    json_t *v = json_pack("{s:s, s:[i, f, b], s:s}", "k\n", "v\"\xc3\xa9\x01", "n", -12345, 0.5, 1,
                          "tail", "abcdefghijklmnopqrstuvwxyz");
    char *want = json_dumps(v, DUMP_FLAGS);
    ck_assert_ptr_nonnull(want);
    size_t wlen = strlen(want);
    /* Every cap below the length fails and leaves the buffer as it was;
     * the exact length and above succeed. */
    for (size_t max = 0; max <= wlen + 2; max++) {
        amp_buf b;
        amp_buf_init(&b, max);
        int rc = amp_json_write(&b, v);
        ck_assert_uint_le(b.cap, max + 1);
        if (max < wlen) {
            ck_assert_int_eq(rc, -1);
            ck_assert_uint_eq(b.len, 0);
            ck_assert_str_eq(b.data, "");
        } else {
            ck_assert_int_eq(rc, 0);
            ck_assert_str_eq(b.data, want);
        }
        amp_buf_free(&b);
    }
    /* Appending twice to one buffer, the second time over its cap. */
    amp_buf b;
    amp_buf_init(&b, wlen * 2 - 1);
    ck_assert_int_eq(amp_json_write(&b, v), 0);
    ck_assert_int_eq(amp_json_write(&b, v), -1);
    ck_assert_uint_eq(b.len, wlen);
    ck_assert_str_eq(b.data, want);
    amp_buf_free(&b);
    /* Growing from a small allocation many times over. */
    json_t *big = json_array();
    for (int i = 0; i < 2000; i++)
        json_array_append_new(big, json_string("some text \"quoted\" \xe2\x82\xac"));
    ck_assert(same(big));
    json_decref(big);
    free(want);
    json_decref(v);
}
END_TEST

/* ---- 3. random trees ------------------------------------------------- */

static uint64_t rng_state;

static uint64_t rnd(void) {
    /* xorshift64*: fixed seed, same trees on every run. */
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return rng_state * UINT64_C(2685821657736338717);
}

static unsigned below(unsigned n) {
    return (unsigned)(rnd() % n);
}

/* Encodes cp as UTF-8 into p; returns the byte count. */
static size_t put_utf8(char *p, uint32_t cp) {
    if (cp < 0x80) {
        p[0] = (char)cp;
        return 1;
    }
    if (cp < 0x800) {
        p[0] = (char)(0xC0 | cp >> 6);
        p[1] = (char)(0x80 | (cp & 0x3F));
        return 2;
    }
    if (cp < 0x10000) {
        p[0] = (char)(0xE0 | cp >> 12);
        p[1] = (char)(0x80 | (cp >> 6 & 0x3F));
        p[2] = (char)(0x80 | (cp & 0x3F));
        return 3;
    }
    p[0] = (char)(0xF0 | cp >> 18);
    p[1] = (char)(0x80 | (cp >> 12 & 0x3F));
    p[2] = (char)(0x80 | (cp >> 6 & 0x3F));
    p[3] = (char)(0x80 | (cp & 0x3F));
    return 4;
}

/* Random text into buf (at least 4 * 48 bytes); valid UTF-8 unless raw, in
 * which case any bytes (often invalid, sometimes not). */
static size_t rand_text(char *buf, int raw) {
    size_t n = 0, chars = below(49);
    for (size_t i = 0; i < chars; i++) {
        if (raw) {
            buf[n++] = (char)below(256);
            continue;
        }
        uint32_t cp;
        switch (below(8)) {
        case 0:
            cp = below(0x20); /* control */
            break;
        case 1: {
            static const char special[] = "\"\\/\x7f";
            cp = (unsigned char)special[below(4)];
            break;
        }
        case 2:
            cp = 0x80 + below(0x800 - 0x80);
            break;
        case 3:
            cp = 0x800 + below(0x10000 - 0x800);
            if (cp >= 0xD800 && cp <= 0xDFFF)
                cp = 0x2028 + below(2);
            break;
        case 4:
            cp = 0x10000 + below(0x110000 - 0x10000);
            break;
        default:
            cp = 0x20 + below(0x5F);
            break;
        }
        n += put_utf8(buf + n, cp);
    }
    return n;
}

static json_t *rand_real(void) {
    double d;
    switch (below(4)) {
    case 0: {
        uint64_t bits = rnd();
        memcpy(&d, &bits, sizeof d);
        if (!isfinite(d))
            d = 1.5;
        break;
    }
    case 1:
        d = (double)(int64_t)(rnd() >> below(64)) / 10.0;
        break;
    case 2:
        d = (double)((int)below(2000001) - 1000000);
        break;
    default:
        d = ldexp((double)below(1000) + 0.5, (int)below(200) - 100);
        break;
    }
    return json_real(d);
}

static json_t *rand_tree(int depth) {
    char buf[4 * 48 + 4];
    unsigned kind = below(depth >= 5 ? 6 : 9);
    switch (kind) {
    case 0:
        return json_null();
    case 1:
        return json_boolean(below(2));
    case 2: {
        json_int_t i = (json_int_t)rnd();
        if (below(2))
            i >>= below(64);
        return json_integer(i);
    }
    case 3:
        return rand_real();
    case 4:
    case 5: {
        /* One string in twenty from raw bytes, unchecked. */
        if (below(20) == 0) {
            size_t n = rand_text(buf, 1);
            return json_stringn_nocheck(buf, n);
        }
        size_t n = rand_text(buf, 0);
        json_t *s = json_stringn(buf, n);
        ck_assert_ptr_nonnull(s);
        return s;
    }
    case 6:
    case 7: {
        json_t *a = json_array();
        for (unsigned i = below(7); i > 0; i--)
            json_array_append_new(a, rand_tree(depth + 1));
        return a;
    }
    default: {
        json_t *o = json_object();
        for (unsigned i = below(7); i > 0; i--) {
            /* One key in fifty from raw bytes, unchecked. */
            int raw = below(50) == 0;
            size_t n = rand_text(buf, raw);
            json_t *val = rand_tree(depth + 1);
            if (raw)
                json_object_setn_new_nocheck(o, buf, n, val);
            else
                ck_assert_int_eq(json_object_setn_new(o, buf, n, val), 0);
        }
        return o;
    }
    }
}

START_TEST(random_trees) {
    rng_state = UINT64_C(0x9E3779B97F4A7C15);
    size_t encoded = 0, failed = 0;
    for (int i = 0; i < 2000; i++) {
        json_t *v = rand_tree(0);
        if (same(v))
            encoded++;
        else
            failed++;
        json_decref(v);
    }
    /* Both outcomes must be exercised by the fixed seed. */
    ck_assert_uint_ge(encoded, 1000);
    ck_assert_uint_ge(failed, 50);
}
END_TEST

/* amp_json_write_int: the digits json_dumps gives for the same integer,
 * appended after what the buffer holds; one byte short of room, it fails
 * and leaves the buffer as it was. */
START_TEST(write_int) {
    const long long vals[] = {0,    1,     -1,         9,       10,      99,        100,
                              -100, 12345, -987654321, INT_MAX, INT_MIN, LLONG_MAX, LLONG_MIN};
    for (size_t i = 0; i < sizeof vals / sizeof vals[0]; i++) {
        json_t *v = json_integer(vals[i]);
        char *want = json_dumps(v, DUMP_FLAGS);
        json_decref(v);
        size_t n = strlen(want);
        amp_buf b;
        amp_buf_init(&b, 2 + n);
        ck_assert_int_eq(amp_buf_append(&b, "x:", 2), 0);
        ck_assert_int_eq(amp_json_write_int(&b, vals[i]), 0);
        ck_assert_uint_eq(b.len, 2 + n);
        ck_assert_str_eq(b.data + 2, want);
        amp_buf_free(&b);
        amp_buf_init(&b, 1 + n);
        ck_assert_int_eq(amp_buf_append(&b, "x:", 2), 0);
        ck_assert_int_eq(amp_json_write_int(&b, vals[i]), -1);
        ck_assert_uint_eq(b.len, 2);
        ck_assert_str_eq(b.data, "x:");
        amp_buf_free(&b);
        free(want);
    }
}
END_TEST

int main(void) {
    Suite *s = suite_create("jsonw");
    TCase *tc = tcase_create("jsonw");
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, mapping_files);
    tcase_add_test(tc, fuzz_corpus);
    tcase_add_test(tc, control_characters);
    tcase_add_test(tc, plain_and_escaped_ascii);
    tcase_add_test(tc, utf8);
    tcase_add_test(tc, reals);
    tcase_add_test(tc, integers_and_literals);
    tcase_add_test(tc, write_int);
    tcase_add_test(tc, containers);
    tcase_add_test(tc, nesting);
    tcase_add_test(tc, cap);
    tcase_add_test(tc, random_trees);
    suite_add_tcase(s, tc);
    return amp_check_run(s);
}
