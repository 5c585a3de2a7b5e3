/* Unit tests: amp_json_parse builds exactly the tree json_loadb(...,
 * JSON_REJECT_DUPLICATES | JSON_DECODE_ANY) builds — same types, numbers
 * (bit for bit), string bytes and key order — and gives NULL for every text
 * jansson rejects: hand-picked texts on both sides of each rule and limit,
 * every JSON file the other suites use, and random mutations of them.
 *
 * The reader is also expected to decline nothing jansson accepts except
 * texts with a NUL byte, so every comparison here checks both directions. */
#include <check.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "../../json/jsonr.h"
#include "../../base/alloc.h"
#include "../../base/buf.h"
#include "../../base/clock.h"
#include "../json_support.h"
#include "../check_run.h"

#define LOAD_FLAGS (JSON_REJECT_DUPLICATES | JSON_DECODE_ANY)
#define DEPTH 2048 /* JSON_PARSER_MAX_DEPTH */

static const char *shown(const char *s, size_t len) {
    static char out[512];
    size_t o = 0;
    for (size_t i = 0; i < len && i < 120 && o + 8 < sizeof out; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c >= 0x20 && c < 0x7F && c != '\\')
            out[o++] = (char)c;
        else
            o += (size_t)snprintf(out + o, sizeof out - o, "\\x%02X", c);
    }
    snprintf(out + o, sizeof out - o, "%s (%zu bytes)", len > 120 ? "..." : "", len);
    return out;
}

/* Compares the reader with jansson on s[0..len); returns whether jansson
 * accepted. The reader gets a heap copy of exactly len bytes so a read past
 * the end shows under AddressSanitizer. */
static bool compare(const char *s, size_t len) {
    char *copy = amp_xmalloc(len ? len : 1);
    if (len)
        memcpy(copy, s, len);
    json_error_t err;
    json_t *want = json_loadb(s, len, LOAD_FLAGS, &err);
    json_t *got = amp_json_parse(copy, len);
    free(copy);
    if (got) {
        ck_assert_msg(want != NULL, "reader accepted what jansson rejects (%s): %s", err.text,
                      shown(s, len));
        const char *d = json_tree_diff(got, want);
        ck_assert_msg(d == NULL, "%s: %s", d, shown(s, len));
    } else {
        /* jansson skips a NUL byte right after a number or literal ("1\0"
         * loads as 1); the reader leaves every text with a NUL to it. */
        ck_assert_msg(want == NULL || memchr(s, '\0', len) != NULL,
                      "reader declined what jansson accepts: %s", shown(s, len));
    }
    json_decref(got);
    json_decref(want);
    return want != NULL;
}

#define ACCEPT(lit) ck_assert_msg(compare(lit, sizeof(lit) - 1), "rejected: %s", #lit)
#define REJECT(lit) ck_assert_msg(!compare(lit, sizeof(lit) - 1), "accepted: %s", #lit)

/* The parsed value of a text both accept (caller owns). */
static json_t *parsed(const char *s) {
    ck_assert(compare(s, strlen(s)));
    json_t *v = amp_json_parse(s, strlen(s));
    ck_assert_ptr_nonnull(v);
    return v;
}

START_TEST(whitespace_and_framing) {
    ACCEPT("1");
    ACCEPT(" 1 ");
    ACCEPT("\t\n\r 1\r\n\t ");
    ACCEPT("[ 1 , 2 ]");
    ACCEPT(" { \"a\" : 1 , \"b\" : [ ] } ");
    ACCEPT("{\n\t\"a\":\r\n[\n]\n}\n");
    REJECT("");
    REJECT(" ");
    REJECT("\n\t\r ");
    REJECT("\f1");
    REJECT("\v1");
    REJECT("1\f");
    REJECT("\xC2\xA0 1");     /* no-break space */
    REJECT("\xEF\xBB\xBF{}"); /* a byte order mark */
    REJECT("[1,\f2]");
    /* NUL bytes anywhere */
    REJECT("\0");
    REJECT("1\0\0");
    REJECT("\"a\"\0");
    REJECT("\0 1");
    REJECT("[1,\0 2]");
    REJECT("{\"a\"\0:1}");
    /* trailing garbage */
    REJECT("1 x");
    REJECT("{} {}");
    REJECT("[]]");
    REJECT("\"a\"\"b\"");
    REJECT("1 2");
    REJECT("null null");
    REJECT("{}\xC3\xA9");
    REJECT("[1]//");
    /* jansson's quirk: one NUL right after a number or literal is
     * skipped. The reader declines; decode.c then gets jansson's answer. */
    ck_assert_ptr_null(amp_json_parse("1\0", 2));
    ck_assert_ptr_null(amp_json_parse("[true\0]", 7));
    ck_assert(compare("1\0", 2));
    ck_assert(compare("[true\0]", 7));
    ck_assert_ptr_null(amp_json_parse(NULL, 0));
    ck_assert_ptr_null(amp_json_parse("1", 0));
}
END_TEST

START_TEST(scalars_and_literals) {
    ACCEPT("true");
    ACCEPT("false");
    ACCEPT("null");
    ACCEPT("\"x\"");
    ACCEPT("\"\"");
    ACCEPT("[true,false,null]");
    REJECT("tru");
    REJECT("True");
    REJECT("nul");
    REJECT("nulll");
    REJECT("truefalse");
    REJECT("[true1]");
    REJECT("[truex]");
    REJECT("[nan]");
    REJECT("undefined");
    REJECT("'x'");
    json_t *v = parsed("true");
    ck_assert(json_is_true(v));
    json_decref(v);
    v = parsed("null");
    ck_assert(json_is_null(v));
    json_decref(v);
}
END_TEST

START_TEST(numbers) {
    /* Space-separated texts. */
    static const char accepted[] =
        "0 -0 0.0 -0.0 1 -1 123 1e5 1E5 1e+5 1e-5 1.5e05 0e0 0E-0 -0e+7 0.000001 12.5 0.1 "
        "99.99 123456.789 1e22 1e23 9007199254740992 9007199254740993.0 9007199254740993e0 "
        "9223372036854775807 -9223372036854775808 9223372036854775807.0 9223372036854775808.0 "
        "-9223372036854775809e0 1e308 -1e308 1.7976931348623157e308 1.7976931348623158e308 "
        "2.2250738585072014e-308 5e-324 -5e-324 2e-324 1e-400 -1e-400 0e99999999999999999999 "
        "1e-99999999999999999999 3.14159265358979323846264338327950288 "
        "123456789012345678901234567890.5 0.30000000000000004 8.98846567431158e307 "
        "4.9406564584124654e-324 1234567890123456789e-10 12345678901234567890e-10 "
        "[1,-2,3.5,-4e2,0]";
    static const char rejected[] =
        "9223372036854775808 -9223372036854775809 99999999999999999999 100000000000000000000 "
        "-100000000000000000000 1e309 -1e309 1e400 1e99999999999999999999 01 -01 00 00.5 +1 .5 "
        "-.5 1. 1.e5 1e 1e+ 1e- 1E - --1 1.5.3 1e5.5 1e5e5 0x10 Infinity -Infinity NaN [1.] "
        "[-] [01] {\"a\":1.} 1, [1e]";
    for (const char *t = accepted; *t;) {
        size_t n = strcspn(t, " ");
        ck_assert_msg(compare(t, n), "rejected: %.*s", (int)n, t);
        t += n + (t[n] == ' ');
    }
    for (const char *t = rejected; *t;) {
        size_t n = strcspn(t, " ");
        ck_assert_msg(!compare(t, n), "accepted: %.*s", (int)n, t);
        t += n + (t[n] == ' ');
    }
    REJECT("- 1");
    REJECT("1 2");

    /* Long number texts (the conversion copies them to the heap). */
    char text[1200];
    memset(text, '0', sizeof text);
    text[0] = '1';
    text[300] = '.';
    text[sizeof text - 1] = '7';
    ck_assert(!compare(text, 301)); /* "1000...0." */
    ck_assert(compare(text, sizeof text));
    text[0] = '-';
    text[1] = '0';
    ck_assert(!compare(text, sizeof text)); /* leading zero */
    text[1] = '9';
    ck_assert(compare(text, sizeof text));
    ck_assert(!compare(text, 300));     /* an integer that overflows */
    ck_assert(!compare("1e999999", 8)); /* and reals that do */

    /* Types and values, not only agreement. */
    json_t *v = parsed("-0");
    ck_assert(json_is_integer(v) && json_integer_value(v) == 0);
    json_decref(v);
    v = parsed("-0.0");
    ck_assert(json_is_real(v) && json_real_value(v) == 0.0);
    double z = json_real_value(v);
    ck_assert(memcmp(&z, &(double){-0.0}, sizeof z) == 0);
    json_decref(v);
    v = parsed("1e0");
    ck_assert(json_is_real(v) && json_real_value(v) == 1.0);
    json_decref(v);
    v = parsed("-9223372036854775808");
    ck_assert(json_is_integer(v) && json_integer_value(v) == INT64_MIN);
    json_decref(v);
    v = parsed("9223372036854775807");
    ck_assert(json_is_integer(v) && json_integer_value(v) == INT64_MAX);
    json_decref(v);
    v = parsed("5e-324");
    ck_assert(json_is_real(v) && json_real_value(v) > 0.0);
    json_decref(v);
    v = parsed("0.1");
    ck_assert(json_is_real(v) && json_real_value(v) == 0.1);
    json_decref(v);

    /* Reals the quick path converts and ones it leaves to strtod, around
     * its edges: digits from 1 to 20, exponents from -30 to 30. */
    char buf[64];
    const char *digits = "98765432109876543210";
    for (int nd = 1; nd <= 20; nd++) {
        int dots[] = {nd, nd / 2 > 0 ? nd / 2 : 1, 1};
        for (int di = 0; di < 3; di++)
            for (int e = -30; e <= 30; e++) {
                int dot = dots[di], n;
                if (dot == nd)
                    n = snprintf(buf, sizeof buf, "%.*se%d", nd, digits, e);
                else
                    n = snprintf(buf, sizeof buf, "%.*s.%.*se%d", dot, digits, nd - dot,
                                 digits + dot, e);
                ck_assert(compare(buf, (size_t)n));
                buf[0] = '1'; /* a different leading digit, same shape */
                ck_assert(compare(buf, (size_t)n));
            }
    }
}
END_TEST

START_TEST(escapes) {
    ACCEPT("\"\\\"\\\\\\/\\b\\f\\n\\r\\t\"");
    ACCEPT("\"a\\u0041b\"");
    ACCEPT("\"\\u00e9\\u00E9\"");
    ACCEPT("\"\\u20AC\\u20ac\"");
    ACCEPT("\"\\u007F\\u0080\\u07FF\\u0800\\uFFFF\\uFFFE\"");
    ACCEPT("\"\\u0001\\u001f\"");
    ACCEPT("\"\\uD83D\\uDE00\"");
    ACCEPT("\"\\ud83d\\ude00 \\uDBFF\\uDFFF \\uD800\\uDC00\"");
    ACCEPT("\"\\uD7FF\\uE000\"");
    REJECT("\"\\x\"");
    REJECT("\"\\'\"");
    REJECT("\"\\a\"");
    REJECT("\"\\U0041\"");
    REJECT("\"\\u12\"");
    REJECT("\"\\u123\"");
    REJECT("\"\\u12G4\"");
    REJECT("\"\\u\"");
    REJECT("\"\\");
    REJECT("\"\\u00");
    REJECT("\"\\uD800\"");
    REJECT("\"\\uD800x\"");
    REJECT("\"\\uD800\\n\"");
    REJECT("\"\\uD800\\uD800\"");
    REJECT("\"\\uD800\\u0041\"");
    REJECT("\"\\uD800\\uDBFF\"");
    REJECT("\"\\uD800\\uE000\"");
    REJECT("\"\\uD800\\u\"");
    REJECT("\"\\uD800\\uDC0");
    REJECT("\"\\uDC00\"");
    REJECT("\"\\uDFFF\"");
    REJECT("\"\\uDC00\\uD800\"");
    REJECT("\"\\u0000\"");
    REJECT("\"a\\u0000b\"");
    REJECT("[\"\\u0000\"]");
    REJECT("\"abc");
    REJECT("\"abc\\\"");
    REJECT("\"");
    json_t *v = parsed("\"\\uD83D\\uDE00\\u00e9\\n\"");
    ck_assert_uint_eq(json_string_length(v), 7);
    ck_assert(memcmp(json_string_value(v), "\xF0\x9F\x98\x80\xC3\xA9\n", 7) == 0);
    json_decref(v);
}
END_TEST

START_TEST(control_characters) {
    char buf[16];
    for (int c = 0; c < 0x20; c++) {
        int n = snprintf(buf, sizeof buf, "\"a%cb\"", c ? c : '?');
        buf[2] = (char)c;
        ck_assert_msg(!compare(buf, (size_t)n), "control 0x%02x accepted", c);
        /* and escaped, it is fine (except U+0000) */
        n = snprintf(buf, sizeof buf, "\"\\u%04x\"", c);
        ck_assert_msg(compare(buf, (size_t)n) == (c != 0), "escaped 0x%02x", c);
    }
    ACCEPT("\"a\x7F b\"");
    ACCEPT("\"\\t\"");
    REJECT("\"\t\"");
    REJECT("\"\n\"");
    REJECT("{\"a\tb\":1}");
}
END_TEST

START_TEST(utf8) {
    ACCEPT("\"A\"");
    ACCEPT("\"\xC3\xA9\"");
    ACCEPT("\"\xE2\x82\xAC\"");
    ACCEPT("\"\xF0\x9F\x98\x80\"");
    ACCEPT("\"\xC2\x80 \xDF\xBF\"");                 /* U+0080, U+07FF */
    ACCEPT("\"\xE0\xA0\x80 \xEF\xBF\xBF\"");         /* U+0800, U+FFFF */
    ACCEPT("\"\xED\x9F\xBF \xEE\x80\x80\"");         /* U+D7FF, U+E000 */
    ACCEPT("\"\xF0\x90\x80\x80 \xF4\x8F\xBF\xBF\""); /* U+10000, U+10FFFF */
    ACCEPT("{\"\xC3\xA9t\xC3\xA9\":\"\xE6\x97\xA5\xE6\x9C\xAC\xE8\xAA\x9E\"}");
    REJECT("\"\xC0\x80\"");                 /* overlong NUL */
    REJECT("\"\xC1\xBF\"");                 /* overlong ASCII */
    REJECT("\"\xE0\x80\x80\"");             /* overlong 3-byte */
    REJECT("\"\xE0\x9F\xBF\"");             /* overlong U+07FF */
    REJECT("\"\xF0\x80\x80\x80\"");         /* overlong 4-byte */
    REJECT("\"\xF0\x8F\xBF\xBF\"");         /* overlong U+FFFF */
    REJECT("\"\xED\xA0\x80\"");             /* U+D800 encoded */
    REJECT("\"\xED\xBF\xBF\"");             /* U+DFFF encoded */
    REJECT("\"\xED\xA0\xBD\xED\xB8\x80\""); /* a surrogate pair, encoded */
    REJECT("\"\xF4\x90\x80\x80\"");         /* U+110000 */
    REJECT("\"\xF5\x80\x80\x80\"");
    REJECT("\"\xF8\x88\x80\x80\x80\"");
    REJECT("\"\xFE\"");
    REJECT("\"\xFF\"");
    REJECT("\"\x80\""); /* stray continuation bytes */
    REJECT("\"\xBF\"");
    REJECT("\"a\xC3\""); /* cut short before the quote */
    REJECT("\"\xE2\x82\"");
    REJECT("\"\xF0\x9F\x98\"");
    REJECT("\"\xC3"); /* cut short by the end of input */
    REJECT("\"\xE2\x82");
    REJECT("\"\xF0\x9F\x98");
    REJECT("\"\xC3\x41\""); /* lead byte then ASCII */
    REJECT("\"\xE2\x28\xA1\"");
    REJECT("\"\xF0\x9F\x98\x41\"");
    REJECT("{\"\xC3\":1}"); /* in a key */
    REJECT("\xC3\xA9");     /* outside a string */
    REJECT("[\xE2\x82\xAC]");
}
END_TEST

/* Strings of every length up to 40 with the byte that ends a plain run at
 * every position, so the eight-bytes-at-a-time scan meets each case at each
 * offset, including the last bytes of the input. */
START_TEST(string_scan_offsets) {
    static const char *const inserts[] = {
        "\\n",  "\\u00e9", "\xC3\xA9", "\xE2\x82\xAC", "\xF0\x9F\x98\x80",
        "\x01", "\x1F",    "\xC3",     "\xED\xA0\x80", "\x80",
        "\\\"", "\x7F"};
    char buf[128];
    for (size_t k = 0; k < sizeof inserts / sizeof *inserts; k++)
        for (size_t len = 0; len <= 40; len++)
            for (size_t at = 0; at <= len; at++) {
                size_t il = strlen(inserts[k]), o = 0;
                buf[o++] = '"';
                memset(buf + o, 'a', at);
                o += at;
                memcpy(buf + o, inserts[k], il);
                o += il;
                memset(buf + o, 'b', len - at);
                o += len - at;
                buf[o++] = '"';
                compare(buf, o);
                compare(buf, o - 1); /* unterminated */
            }
    /* A long string with an escape every few bytes: the scratch buffer
     * outgrows its stack part. */
    char big[5000];
    size_t o = 0;
    big[o++] = '"';
    while (o < sizeof big - 16) {
        memcpy(big + o, "abcdefg\\u00e9\\t", 15);
        o += 15;
    }
    big[o++] = '"';
    ck_assert(compare(big, o));
    /* and as a key */
    char obj[10100];
    int n = snprintf(obj, sizeof obj, "{%.*s:1,%.*s:2}", (int)o, big, (int)o, big);
    ck_assert((size_t)n < sizeof obj);
    ck_assert(!compare(obj, (size_t)n));
    n = snprintf(obj, sizeof obj, "{%.*s:1,\"x\":%.*s}", (int)o, big, (int)o, big);
    ck_assert(compare(obj, (size_t)n));
}
END_TEST

START_TEST(objects_and_keys) {
    ACCEPT("{}");
    ACCEPT("{\"a\":1}");
    ACCEPT("{\"\":1}");
    ACCEPT("{\"a\":1,\"b\":{\"a\":2}}");
    ACCEPT("{\"a\":1,\"A\":2,\"a \":3}");
    ACCEPT("{\"z\":1,\"a\":2,\"m\":3,\"b\":[],\"y\":{}}");
    REJECT("{\"a\":1,\"a\":2}");
    REJECT("{\"a\":1,\"\\u0061\":2}");
    REJECT("{\"\\u00e9\":1,\"\xC3\xA9\":2}");
    REJECT("{\"\":1,\"\":2}");
    REJECT("{\"a\":[1,2],\"a\":3}");
    REJECT("{\"a\":1,\"a\":{\"b\":1}}");
    REJECT("{\"a\":{},\"b\":2,\"a\":{}}");
    REJECT("{\"a\\u0000\":1}");
    REJECT("{\"\\u0000\":1}");
    REJECT("{\"a\":1,}");
    REJECT("{,}");
    REJECT("{,\"a\":1}");
    REJECT("{\"a\"}");
    REJECT("{\"a\" 1}");
    REJECT("{\"a\":}");
    REJECT("{\"a\"::1}");
    REJECT("{1:2}");
    REJECT("{a:1}");
    REJECT("{'a':1}");
    REJECT("{\"a\",1}");
    REJECT("{\"a\":1 \"b\":2}");
    REJECT("{\"a\":1}}");
    REJECT("{");
    REJECT("{\"a\"");
    REJECT("{\"a\":");
    REJECT("{\"a\":1");
    REJECT("{\"a\":1,");
    REJECT("}");

    /* Key order survives growth of the hash table. */
    char text[4096];
    size_t o = 0;
    text[o++] = '{';
    for (int i = 0; i < 300; i++)
        o += (size_t)snprintf(text + o, sizeof text - o, "%s\"k%d\":%d", i ? "," : "",
                              (i * 7919) % 1000, i);
    text[o++] = '}';
    ck_assert(o < sizeof text);
    ck_assert(compare(text, o));
    json_t *v = parsed("{\"z\":1,\"a\":2,\"m\":3}");
    const char *want[] = {"z", "a", "m"};
    size_t i = 0;
    for (void *it = json_object_iter(v); it; it = json_object_iter_next(v, it), i++)
        ck_assert_str_eq(json_object_iter_key(it), want[i]);
    ck_assert_uint_eq(i, 3);
    json_decref(v);
    /* duplicates among many keys, the second at the end */
    text[o - 1] = ',';
    o += (size_t)snprintf(text + o, sizeof text - o, "\"k%d\":0}", (150 * 7919) % 1000);
    ck_assert(!compare(text, o));
}
END_TEST

START_TEST(arrays) {
    ACCEPT("[]");
    ACCEPT("[[]]");
    ACCEPT("[[],[[]],{}]");
    ACCEPT("[1,\"a\",true,false,null,{},[],-1.5]");
    REJECT("[1,]");
    REJECT("[,1]");
    REJECT("[,]");
    REJECT("[1 2]");
    REJECT("[");
    REJECT("[1");
    REJECT("[1,");
    REJECT("]");
    REJECT("[1]]");
    REJECT("[[1]");
    REJECT("[\"a\":1]");
    REJECT("[}");
    REJECT("{]");
    REJECT(":");
    REJECT(",");
}
END_TEST

/* n levels of containers, the innermost holding inner (may be ""). */
static size_t nest(char *out, int n, bool objects, const char *inner) {
    size_t o = 0;
    for (int i = 0; i < n; i++) {
        if (objects) {
            memcpy(out + o, "{\"k\":", 5);
            o += 5;
        } else {
            out[o++] = '[';
        }
    }
    if (objects && !*inner) { /* the innermost object has no member */
        o -= 5;
        out[o++] = '{';
    }
    memcpy(out + o, inner, strlen(inner));
    o += strlen(inner);
    for (int i = 0; i < n; i++)
        out[o++] = objects ? '}' : ']';
    return o;
}

START_TEST(nesting_limit) {
    char *buf = amp_xmalloc(8 * (DEPTH + 8) + 64);
    for (int objects = 0; objects <= 1; objects++) {
        /* Containers alone: DEPTH levels pass, one more fails. */
        ck_assert(compare(buf, nest(buf, DEPTH, objects, "")));
        ck_assert(!compare(buf, nest(buf, DEPTH + 1, objects, "")));
        /* A scalar counts as a level too, as it does for jansson. */
        ck_assert(compare(buf, nest(buf, DEPTH - 1, objects, "1")));
        ck_assert(!compare(buf, nest(buf, DEPTH, objects, "1")));
        ck_assert(compare(buf, nest(buf, DEPTH - 1, objects, "\"s\"")));
        ck_assert(!compare(buf, nest(buf, DEPTH, objects, "\"s\"")));
        ck_assert(compare(buf, nest(buf, DEPTH - 1, objects, objects ? "{}" : "[]")));
        ck_assert(!compare(buf, nest(buf, DEPTH, objects, objects ? "{}" : "[]")));
        /* unclosed */
        ck_assert(!compare(buf, nest(buf, 100, objects, "1") - 1));
    }
    /* Mixed, and siblings after deep branches (the stack shrinks and grows
     * again). */
    size_t o = 0;
    buf[o++] = '[';
    for (int r = 0; r < 3; r++) {
        for (int i = 0; i < 1000; i++)
            o += (size_t)snprintf(buf + o, 16, i % 2 ? "[" : "{\"a\":");
        for (int i = 999; i >= 0; i--)
            buf[o++] = i % 2 ? ']' : '}';
        buf[o++] = ',';
    }
    buf[o - 1] = ']';
    ck_assert(compare(buf, o));
    buf[o - 1] = ',';
    buf[o++] = ']';
    ck_assert(!compare(buf, o)); /* a trailing comma after the last branch */
    free(buf);
}
END_TEST

/* ---- files and mutations --------------------------------------------- */

typedef struct file_set {
    char **data;
    size_t *len;
    size_t count;
    size_t cap;
} file_set;

static void add_file(file_set *fs, const char *path) {
    FILE *f = fopen(path, "rb");
    ck_assert_msg(f != NULL, "cannot open %s", path);
    amp_buf b;
    amp_buf_init(&b, 1 << 20);
    ck_assert_msg(amp_buf_read(&b, f) == 0, "cannot read %s", path);
    fclose(f);
    if (fs->count == fs->cap) {
        fs->cap = fs->cap ? fs->cap * 2 : 64;
        fs->data = amp_xrealloc(fs->data, fs->cap * sizeof *fs->data);
        fs->len = amp_xrealloc(fs->len, fs->cap * sizeof *fs->len);
    }
    fs->data[fs->count] = amp_xmalloc(b.len ? b.len : 1);
    if (b.len)
        memcpy(fs->data[fs->count], b.data, b.len);
    fs->len[fs->count++] = b.len;
    amp_buf_free(&b);
}

static void add_one(const char *path, void *ctx) {
    add_file(ctx, path);
}

static void add_tree(file_set *fs, const char *root) {
    ck_assert_msg(json_case_files(root, add_one, fs) >= 0,
                  "cannot open %s (run from the repository root)", root);
}

static void free_files(file_set *fs) {
    for (size_t i = 0; i < fs->count; i++)
        free(fs->data[i]);
    free(fs->data);
    free(fs->len);
}

static void load_all(file_set *fs) {
    memset(fs, 0, sizeof *fs);
    add_tree(fs, "tests/mapping");
    add_tree(fs, "tests/fuzz/corpus");
    ck_assert_uint_gt(fs->count, 300);
}

START_TEST(project_files) {
    file_set fs;
    load_all(&fs);
    size_t accepted = 0;
    for (size_t i = 0; i < fs.count; i++)
        accepted += compare(fs.data[i], fs.len[i]);
    /* Both outcomes must be exercised for the comparison to mean much. */
    ck_assert_uint_gt(accepted, 150);
    ck_assert_uint_gt(fs.count - accepted, 50);
    free_files(&fs);
}
END_TEST

/* amp_json_loadb against json_loadb with the same flags: the same value,
 * or NULL from both with the same error text. */
static void compare_loadb(const char *s, size_t len, size_t flags) {
    json_error_t want_err, got_err;
    json_t *want = json_loadb(s, len, flags, &want_err);
    json_t *got = amp_json_loadb(s, len, flags, &got_err);
    if (want) {
        ck_assert_msg(got != NULL, "flags %zu: declined what json_loadb accepts: %s", flags,
                      shown(s, len));
        const char *d = json_tree_diff(got, want);
        ck_assert_msg(d == NULL, "flags %zu: %s: %s", flags, d, shown(s, len));
    } else {
        ck_assert_msg(got == NULL, "flags %zu: accepted what json_loadb rejects: %s", flags,
                      shown(s, len));
        ck_assert_str_eq(got_err.text, want_err.text);
    }
    json_decref(got);
    json_decref(want);
}

START_TEST(loadb_matches_jansson_for_each_flag) {
    static const size_t flag_sets[] = {0, JSON_REJECT_DUPLICATES, JSON_DECODE_ANY, LOAD_FLAGS,
                                       JSON_DISABLE_EOF_CHECK};
    static const char *const texts[] = {
        "{\"a\":1,\"a\":2}", /* duplicates: accepted (last wins) unless rejected */
        "\"bare\"",          "17", "null", "[1,2]", "{\"a\":{\"b\":[true,1.5]}}", "{", "[1] x", "",
    };
    for (size_t f = 0; f < sizeof flag_sets / sizeof flag_sets[0]; f++)
        for (size_t i = 0; i < sizeof texts / sizeof texts[0]; i++)
            compare_loadb(texts[i], strlen(texts[i]), flag_sets[f]);
    /* Duplicates: jansson keeps the last value, and so must the fallback. */
    json_error_t err;
    const char *dup = "{\"a\":1,\"a\":2}";
    json_t *v = amp_json_loadb(dup, strlen(dup), 0, &err);
    ck_assert_ptr_nonnull(v);
    ck_assert_int_eq(json_integer_value(json_object_get(v, "a")), 2);
    json_decref(v);
    ck_assert_ptr_null(amp_json_loadb("\"bare\"", 6, 0, &err));
    file_set fs;
    load_all(&fs);
    for (size_t i = 0; i < fs.count; i++)
        for (size_t f = 0; f < 2; f++)
            compare_loadb(fs.data[i], fs.len[i], flag_sets[f]);
    free_files(&fs);
}
END_TEST

static uint64_t rng_state = 0x9E3779B97F4A7C15ull;

static uint64_t rng(void) {
    uint64_t x = rng_state;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    return rng_state = x;
}

static size_t below(size_t n) {
    return n ? (size_t)(rng() % n) : 0;
}

/* One random edit of buf[0..*len) within cap bytes. */
static void mutate(char *buf, size_t *len, size_t cap) {
    static const char bytes[] = "\\\"{}[],:0123456789-+.eEu \t\n\r\x00\x01\x1f\x7f\x80\xbf\xc3"
                                "\xe2\xed\xf0\xf4\xff";
    /* Space-separated. */
    static const char tokens[] =
        "\\u0000 \\uD800 \\uDC00 \\uD83D\\uDE00 \\u00e9 1e309 -0 -0.0 9223372036854775807 "
        "9223372036854775808 -9223372036854775809 5e-324 {} [] \"a\":1, , \"\" \xED\xA0\x80 "
        "\xF4\x90\x80\x80 \xC0\x80 null true \"k\": 1. 01 \\ [[[[ ]]]]";
    size_t n = *len;
    switch (below(7)) {
    case 0: /* replace a byte with an interesting one */
        if (n)
            buf[below(n)] = bytes[below(sizeof bytes - 1)];
        break;
    case 1: /* flip a bit */
        if (n)
            buf[below(n)] ^= (char)(1u << below(8));
        break;
    case 2: { /* delete a span */
        if (!n)
            break;
        size_t at = below(n), k = 1 + below(n - at < 8 ? n - at : 8);
        memmove(buf + at, buf + at + k, n - at - k);
        *len = n - k;
        break;
    }
    case 3: { /* insert a token */
        size_t t = below(sizeof tokens - 1), at = below(n + 1);
        while (t > 0 && tokens[t - 1] != ' ')
            t--;
        size_t tl = strcspn(tokens + t, " ");
        if (n + tl > cap)
            break;
        memmove(buf + at + tl, buf + at, n - at);
        memcpy(buf + at, tokens + t, tl);
        *len = n + tl;
        break;
    }
    case 4: { /* duplicate a span */
        if (!n)
            break;
        size_t at = below(n), k = 1 + below(n - at < 32 ? n - at : 32), to = below(n + 1);
        if (n + k > cap)
            break;
        char tmp[32];
        memcpy(tmp, buf + at, k);
        memmove(buf + to + k, buf + to, n - to);
        memcpy(buf + to, tmp, k);
        *len = n + k;
        break;
    }
    case 5: /* truncate */
        *len = below(n + 1);
        break;
    default: /* replace a byte with any byte */
        if (n)
            buf[below(n)] = (char)below(256);
        break;
    }
}

START_TEST(random_mutations) {
    file_set fs;
    load_all(&fs);
    enum { ROUNDS = 5000, MAX_BASE = 16384, SLACK = 512 };
    char *buf = amp_xmalloc(MAX_BASE + SLACK);
    int64_t deadline = amp_mono_ms() + 40000;
    size_t done = 0, accepted = 0;
    while (done < ROUNDS && amp_mono_ms() < deadline) {
        size_t f = below(fs.count);
        if (fs.len[f] > MAX_BASE)
            continue;
        size_t len = fs.len[f];
        memcpy(buf, fs.data[f], len);
        int edits = 1 + (int)below(4);
        for (int e = 0; e < edits; e++)
            mutate(buf, &len, MAX_BASE + SLACK);
        accepted += compare(buf, len);
        done++;
    }
    ck_assert_uint_eq(done, ROUNDS);
    ck_assert_uint_gt(accepted, 100);
    ck_assert_uint_gt(done - accepted, 100);
    free(buf);
    free_files(&fs);
}
END_TEST

int main(void) {
    Suite *s = suite_create("jsonr");
    TCase *tc = tcase_create("jsonr");
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, whitespace_and_framing);
    tcase_add_test(tc, scalars_and_literals);
    tcase_add_test(tc, numbers);
    tcase_add_test(tc, escapes);
    tcase_add_test(tc, control_characters);
    tcase_add_test(tc, utf8);
    tcase_add_test(tc, string_scan_offsets);
    tcase_add_test(tc, objects_and_keys);
    tcase_add_test(tc, arrays);
    tcase_add_test(tc, nesting_limit);
    tcase_add_test(tc, project_files);
    tcase_add_test(tc, random_mutations);
    tcase_add_test(tc, loadb_matches_jansson_for_each_flag);
    suite_add_tcase(s, tc);
    return amp_check_run(s);
}
