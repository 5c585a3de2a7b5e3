/*
 * Unit tests for crypto/sig: every case of tests/unit/data/sig_vectors.json
 * runs as one loop-test iteration, plus tests of amp_sig_create's errors,
 * the scheme names, the hex helper and sharing a verifier across threads.
 *
 * In the vectors, "{{sign:SECRET}}" inside a header value expands to
 * amp_sig_amplitude_hex(SECRET, <the case's X-Amplitude-Timestamp>, body);
 * the kat_* cases carry literal signatures computed with
 * `openssl dgst -sha256 -hmac` (or Python's hmac) so the MAC itself is
 * checked independently of that helper.
 */
#include "../../crypto/sig.h"
#include "../../base/alloc.h"
#include "../../base/buf.h"
#include "../../base/parse.h"
#include "../check_run.h"

#include <check.h>
#include <jansson.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#define VECTORS "tests/unit/data/sig_vectors.json"
#define MAX_HEADERS 16
#define MAX_SECRETS 8

static json_t *vectors; /* loaded once in main, before the forks */

/* Headers of one request; names are matched case-insensitively. */
typedef struct {
    size_t n;
    const char *name[MAX_HEADERS];
    char *value[MAX_HEADERS]; /* owned */
} hdrs;

static const char *hdr_get(void *ctx, const char *name) {
    hdrs *h = ctx;
    for (size_t i = 0; i < h->n; i++) {
        if (strcasecmp(h->name[i], name) == 0)
            return h->value[i];
    }
    return NULL;
}

static void hdrs_free(hdrs *h) {
    for (size_t i = 0; i < h->n; i++)
        free(h->value[i]);
    h->n = 0;
}

static const char *result_name(amp_sig_result r) {
    switch (r) {
    case AMP_SIG_OK:
        return "ok";
    case AMP_SIG_MISSING:
        return "missing";
    case AMP_SIG_MALFORMED:
        return "malformed";
    case AMP_SIG_STALE:
        return "stale";
    case AMP_SIG_MISMATCH:
        return "mismatch";
    }
    return "?";
}

static int parse_result(const char *s, amp_sig_result *out) {
    static const amp_sig_result all[] = {AMP_SIG_OK, AMP_SIG_MISSING, AMP_SIG_MALFORMED,
                                         AMP_SIG_STALE, AMP_SIG_MISMATCH};
    for (size_t i = 0; i < sizeof(all) / sizeof(all[0]); i++) {
        if (strcmp(s, result_name(all[i])) == 0) {
            *out = all[i];
            return 0;
        }
    }
    return -1;
}

/* The timestamp a {{sign:...}} placeholder signs: the case's
 * X-Amplitude-Timestamp, trimmed of spaces and tabs. */
static int case_ts(json_t *headers, int64_t *ts) {
    const char *key;
    json_t *v;
    json_object_foreach(headers, key, v) {
        if (strcasecmp(key, "X-Amplitude-Timestamp") != 0 || !json_is_string(v))
            continue;
        const char *s = json_string_value(v);
        size_t n = strlen(s);
        while (n && (*s == ' ' || *s == '\t')) {
            s++;
            n--;
        }
        while (n && (s[n - 1] == ' ' || s[n - 1] == '\t'))
            n--;
        return amp_parse_i64(s, n, INT64_MIN, INT64_MAX, ts);
    }
    return -1;
}

/* Expand every {{sign:SECRET}} in value; NULL (and *why) when it cannot. */
static char *expand(const char *value, json_t *headers, const char *body, size_t len,
                    const char **why) {
    amp_buf out;
    amp_buf_init(&out, 1 << 16);
    const char *p = value;
    for (;;) {
        const char *open = strstr(p, "{{sign:");
        if (!open) {
            amp_buf_append(&out, p, strlen(p));
            break;
        }
        const char *secret = open + strlen("{{sign:");
        const char *close = strstr(secret, "}}");
        int64_t ts;
        if (!close) {
            *why = "unterminated {{sign:";
            amp_buf_free(&out);
            return NULL;
        }
        if (case_ts(headers, &ts) != 0) {
            *why = "{{sign:}} needs a numeric X-Amplitude-Timestamp";
            amp_buf_free(&out);
            return NULL;
        }
        char hex[65];
        amp_sig_amplitude_hex(secret, (size_t)(close - secret), ts, body, len, hex);
        amp_buf_append(&out, p, (size_t)(open - p));
        amp_buf_append(&out, hex, 64);
        p = close + 2;
    }
    if (!out.data)
        amp_buf_append(&out, "", 0);
    return out.data;
}

static const char *str_field(json_t *c, const char *key) {
    json_t *v = json_object_get(c, key);
    return json_is_string(v) ? json_string_value(v) : NULL;
}

START_TEST(test_vector) {
    json_t *c = json_array_get(vectors, (size_t)_i);
    ck_assert_ptr_nonnull(c);
    const char *name = str_field(c, "name");
    ck_assert_msg(name != NULL, "vector %d: no name", _i);

    static const char *const known[] = {"name",    "scheme",      "secrets", "tolerance", "now",
                                        "headers", "header_name", "body",    "expect",    "note"};
    const char *key;
    json_t *val;
    json_object_foreach(c, key, val) {
        int ok = 0;
        for (size_t k = 0; k < sizeof(known) / sizeof(known[0]); k++)
            ok |= strcmp(key, known[k]) == 0;
        ck_assert_msg(ok, "case %s: unknown key \"%s\"", name, key);
    }

    amp_auth_scheme scheme;
    const char *scheme_s = str_field(c, "scheme");
    ck_assert_msg(scheme_s && amp_sig_parse_scheme(scheme_s, &scheme) == 0, "case %s: bad scheme",
                  name);
    amp_sig_result want;
    const char *expect_s = str_field(c, "expect");
    ck_assert_msg(expect_s && parse_result(expect_s, &want) == 0, "case %s: bad expect", name);
    json_t *body_j = json_object_get(c, "body");
    ck_assert_msg(json_is_string(body_j), "case %s: body must be a string", name);
    const char *body = json_string_value(body_j);
    size_t len = json_string_length(body_j);
    json_t *now_j = json_object_get(c, "now"), *tol_j = json_object_get(c, "tolerance");
    ck_assert_msg(json_is_integer(now_j) && json_is_integer(tol_j),
                  "case %s: now and tolerance must be integers", name);

    const char *secrets[MAX_SECRETS];
    size_t nsecrets = 0;
    json_t *secrets_j = json_object_get(c, "secrets");
    if (secrets_j) {
        ck_assert_msg(json_is_array(secrets_j) && json_array_size(secrets_j) <= MAX_SECRETS,
                      "case %s: secrets must be an array of at most %d", name, MAX_SECRETS);
        size_t k;
        json_t *s;
        json_array_foreach(secrets_j, k, s) {
            ck_assert_msg(json_is_string(s), "case %s: secret %zu not a string", name, k);
            secrets[nsecrets++] = json_string_value(s);
        }
    }

    json_t *headers = json_object_get(c, "headers");
    ck_assert_msg(json_is_object(headers), "case %s: headers must be an object", name);
    ck_assert_msg(json_object_size(headers) <= MAX_HEADERS, "case %s: too many headers", name);
    hdrs h = {0};
    json_object_foreach(headers, key, val) {
        ck_assert_msg(json_is_string(val), "case %s: header %s not a string", name, key);
        const char *why = "";
        char *v = expand(json_string_value(val), headers, body, len, &why);
        ck_assert_msg(v != NULL, "case %s: header %s: %s", name, key, why);
        h.name[h.n] = key;
        h.value[h.n++] = v;
    }

    char err[256] = "";
    amp_sig *sig = amp_sig_create(scheme, secrets, nsecrets, json_integer_value(tol_j),
                                  str_field(c, "header_name"), err, sizeof(err));
    ck_assert_msg(sig != NULL, "case %s: amp_sig_create failed: %s", name, err);

    const char *detail = "unset";
    amp_sig_result got =
        amp_sig_verify(sig, hdr_get, &h, body, len, json_integer_value(now_j), &detail);
    ck_assert_msg(got == want, "case %s: got %s, want %s (detail: %s)", name, result_name(got),
                  result_name(want), detail ? detail : "(null)");
    if (got == AMP_SIG_OK) {
        ck_assert_msg(detail == NULL, "case %s: detail set on success", name);
    } else {
        ck_assert_msg(detail && *detail && strcmp(detail, "unset") != 0,
                      "case %s: no detail on failure", name);
        for (size_t k = 0; k < nsecrets; k++)
            ck_assert_msg(strstr(detail, secrets[k]) == NULL, "case %s: detail leaks a secret",
                          name);
    }
    /* A NULL detail pointer is allowed and must not change the answer. */
    ck_assert_int_eq(amp_sig_verify(sig, hdr_get, &h, body, len, json_integer_value(now_j), NULL),
                     got);

    amp_sig_destroy(sig);
    hdrs_free(&h);
}
END_TEST

START_TEST(test_scheme_names) {
    static const amp_auth_scheme all[] = {AMP_AUTH_AMPLITUDE_HMAC, AMP_AUTH_STATIC_HEADER,
                                          AMP_AUTH_STANDARD_WEBHOOKS, AMP_AUTH_NONE};
    static const char *const names[] = {"amplitude-hmac", "static-header", "standard-webhooks",
                                        "none"};
    for (size_t i = 0; i < 4; i++) {
        amp_auth_scheme s = AMP_AUTH_NONE;
        ck_assert_str_eq(amp_sig_scheme_name(all[i]), names[i]);
        ck_assert_int_eq(amp_sig_parse_scheme(names[i], &s), 0);
        ck_assert_int_eq(s, all[i]);
    }
    static const char *const bad[] = {"",     "Amplitude-HMAC", "amplitude-hmac ",
                                      "hmac", "None",           "standard-webhook"};
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        amp_auth_scheme s = AMP_AUTH_STATIC_HEADER;
        ck_assert_msg(amp_sig_parse_scheme(bad[i], &s) == -1, "accepted \"%s\"", bad[i]);
        ck_assert_int_eq(s, AMP_AUTH_STATIC_HEADER);
    }
    amp_auth_scheme s;
    ck_assert_int_eq(amp_sig_parse_scheme(NULL, &s), -1);
}
END_TEST

/* amp_sig_create must fail with a message that never repeats the secret. */
static void expect_create_error(amp_auth_scheme scheme, const char *secret, const char *header,
                                int64_t tol, const char *must_mention) {
    /* A usable first secret, so the message must point at the second. */
    const char *first = scheme == AMP_AUTH_STANDARD_WEBHOOKS ? "whsec_ZmluZS1maXJzdC1zZWNyZXQ="
                                                             : "fine-first-secret";
    const char *secrets[] = {first, secret};
    char err[512];
    memset(err, 'X', sizeof(err));
    err[sizeof(err) - 1] = '\0';
    amp_sig *s = amp_sig_create(scheme, secrets, 2, tol, header, err, sizeof(err));
    ck_assert_msg(s == NULL, "accepted a bad config (scheme %s)", amp_sig_scheme_name(scheme));
    ck_assert_msg(err[0] != 'X' && strlen(err) > 0, "no error message");
    /* The "whsec_" prefix is not secret; what follows it is. */
    const char *material = secret;
    if (material && strncmp(material, "whsec_", 6) == 0)
        material += 6;
    if (material && strlen(material) >= 4) {
        ck_assert_msg(strstr(err, material) == NULL, "error leaks the secret: %s", err);
        /* Not even a recognisable piece of it. */
        const char *tail = material + strlen(material) - 4;
        ck_assert_msg(strstr(err, tail) == NULL, "error leaks part of the secret: %s", err);
    }
    ck_assert_msg(strstr(err, first) == NULL && strstr(err, "ZmluZS1") == NULL,
                  "error leaks a secret: %s", err);
    if (must_mention)
        ck_assert_msg(strstr(err, must_mention) != NULL, "error \"%s\" lacks \"%s\"", err,
                      must_mention);
}

START_TEST(test_create_errors) {
    char err[256] = "";
    /* No secrets for schemes that need them. */
    ck_assert_ptr_null(
        amp_sig_create(AMP_AUTH_AMPLITUDE_HMAC, NULL, 0, 300, NULL, err, sizeof(err)));
    ck_assert_msg(strstr(err, "secret") != NULL, "unhelpful: %s", err);
    ck_assert_ptr_null(
        amp_sig_create(AMP_AUTH_STANDARD_WEBHOOKS, NULL, 0, 300, NULL, err, sizeof(err)));
    ck_assert_ptr_null(
        amp_sig_create(AMP_AUTH_STATIC_HEADER, NULL, 0, 0, "Authorization", err, sizeof(err)));

    /* Bad whsec base64, with and without the prefix, and a bare prefix. */
    expect_create_error(AMP_AUTH_STANDARD_WEBHOOKS, "whsec_NOT!BASE64*SECRETvalue", NULL, 300,
                        "secret 2");
    expect_create_error(AMP_AUTH_STANDARD_WEBHOOKS, "plain text secret here", NULL, 300, "whsec_");
    expect_create_error(AMP_AUTH_STANDARD_WEBHOOKS, "whsec_", NULL, 300, "secret 2");
    expect_create_error(AMP_AUTH_STANDARD_WEBHOOKS, "whsec_QUJDRA=A", NULL, 300, NULL);
    /* Empty or NULL secrets. */
    expect_create_error(AMP_AUTH_AMPLITUDE_HMAC, "", NULL, 300, "empty");
    expect_create_error(AMP_AUTH_AMPLITUDE_HMAC, NULL, NULL, 300, "empty");
    expect_create_error(AMP_AUTH_STATIC_HEADER, "", "Authorization", 0, "empty");
    /* static-header without a header name, or with a secret HTTP would trim. */
    expect_create_error(AMP_AUTH_STATIC_HEADER, "Bearer abcdefgh", NULL, 0, "header");
    expect_create_error(AMP_AUTH_STATIC_HEADER, "Bearer abcdefgh", "", 0, "header");
    expect_create_error(AMP_AUTH_STATIC_HEADER, "Bearer abcdefgh ", "Authorization", 0,
                        "whitespace");
    /* Negative tolerance. */
    expect_create_error(AMP_AUTH_AMPLITUDE_HMAC, "good-secret-value", NULL, -1, "tolerance");
    expect_create_error(AMP_AUTH_STANDARD_WEBHOOKS, "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", NULL,
                        -5, "tolerance");

    /* A tiny or absent error buffer is fine. */
    char tiny[6];
    ck_assert_ptr_null(
        amp_sig_create(AMP_AUTH_AMPLITUDE_HMAC, NULL, 0, 300, NULL, tiny, sizeof(tiny)));
    ck_assert_uint_eq(strlen(tiny), sizeof(tiny) - 1);
    ck_assert_ptr_null(amp_sig_create(AMP_AUTH_AMPLITUDE_HMAC, NULL, 0, 300, NULL, NULL, 0));
    ck_assert_ptr_null(amp_sig_create((amp_auth_scheme)42, NULL, 0, 300, NULL, err, sizeof(err)));

    /* none needs nothing. */
    amp_sig *s = amp_sig_create(AMP_AUTH_NONE, NULL, 0, 0, NULL, err, sizeof(err));
    ck_assert_ptr_nonnull(s);
    amp_sig_destroy(s);
    amp_sig_destroy(NULL);
}
END_TEST

START_TEST(test_secrets_are_copied) {
    char secret[] = "rotating-secret-1";
    char header[] = "X-Token";
    const char *secrets[] = {secret};
    char err[128];
    amp_sig *a = amp_sig_create(AMP_AUTH_AMPLITUDE_HMAC, secrets, 1, 300, NULL, err, sizeof(err));
    amp_sig *st = amp_sig_create(AMP_AUTH_STATIC_HEADER, secrets, 1, 0, header, err, sizeof(err));
    ck_assert_ptr_nonnull(a);
    ck_assert_ptr_nonnull(st);

    const char *body = "{\"event_type\":\"x\"}";
    char hex[65];
    amp_sig_amplitude_hex("rotating-secret-1", 17, 1700000000, body, strlen(body), hex);
    memset(secret, 'Z', sizeof(secret) - 1);
    memset(header, 'Q', sizeof(header) - 1);

    hdrs h = {0};
    h.name[0] = "X-Amplitude-Timestamp";
    h.value[0] = amp_xstrdup("1700000000");
    h.name[1] = "X-Amplitude-Sig";
    h.value[1] = amp_xasprintf("sha256=%s", hex);
    h.name[2] = "x-token";
    h.value[2] = amp_xstrdup("rotating-secret-1");
    h.n = 3;
    ck_assert_int_eq(amp_sig_verify(a, hdr_get, &h, body, strlen(body), 1700000000, NULL),
                     AMP_SIG_OK);
    ck_assert_int_eq(amp_sig_verify(st, hdr_get, &h, body, strlen(body), 1700000000, NULL),
                     AMP_SIG_OK);
    hdrs_free(&h);
    amp_sig_destroy(a);
    amp_sig_destroy(st);
}
END_TEST

START_TEST(test_amplitude_hex) {
    char hex[65];
    memset(hex, 'X', sizeof(hex));
    /* openssl dgst -sha256 -hmac k <<< '1614265330.{"test": 2432232314}' (no newline) */
    const char *body = "{\"test\": 2432232314}";
    amp_sig_amplitude_hex("k", 1, 1614265330, body, strlen(body), hex);
    ck_assert_str_eq(hex, "354dcf2fd87eb0b74fe8995faab111cc4854472757a261cd10e56fdea167f1bb");
    /* openssl dgst -sha256 -hmac k over "-5.x": negative times format with a sign. */
    amp_sig_amplitude_hex("k", 1, -5, "x", 1, hex);
    ck_assert_str_eq(hex, "bb37629728762e2c6ee7834ab2032390a78036f097a83c7e352a333cc28f5c2a");
    /* Python hmac.new(b"", b"1700000000.", sha256): an empty key and body work. */
    amp_sig_amplitude_hex("", 0, 1700000000, NULL, 0, hex);
    ck_assert_str_eq(hex, "c1da1b6c6b8e9da7f4bbb90f7cab0820f271ad19ccbf80c88479c4e14f37d1c6");
    /* secret_len, not strlen, decides the key. */
    amp_sig_amplitude_hex("kXYZ", 1, 1614265330, body, strlen(body), hex);
    ck_assert_str_eq(hex, "354dcf2fd87eb0b74fe8995faab111cc4854472757a261cd10e56fdea167f1bb");
}
END_TEST

/* A header with many entries: the valid one is found wherever it sits and
 * nothing overflows. */
START_TEST(test_many_entries) {
    const char *secrets[] = {"s1", "s2", "s3"};
    amp_sig *s = amp_sig_create(AMP_AUTH_AMPLITUDE_HMAC, secrets, 3, 300, NULL, NULL, 0);
    ck_assert_ptr_nonnull(s);
    const char *body = "[]";
    char hex[65];
    amp_sig_amplitude_hex("s3", 2, 1700000000, body, 2, hex);
    amp_buf b;
    amp_buf_init(&b, 1 << 20);
    for (int i = 0; i < 2000; i++) {
        const char *e =
            (i % 3) ? "sha256=0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef "
                    : "x ";
        ck_assert_int_eq(amp_buf_append(&b, e, strlen(e)), 0);
    }
    size_t before = b.len;
    ck_assert_int_eq(amp_buf_append(&b, "sha256=", 7), 0);
    ck_assert_int_eq(amp_buf_append(&b, hex, 64), 0);

    hdrs h = {0};
    h.name[0] = "X-Amplitude-Timestamp";
    h.value[0] = amp_xstrdup("1700000000");
    h.name[1] = "X-Amplitude-Sig";
    h.value[1] = amp_xstrdup(b.data);
    h.n = 2;
    ck_assert_int_eq(amp_sig_verify(s, hdr_get, &h, body, 2, 1700000000, NULL), AMP_SIG_OK);
    free(h.value[1]);
    h.value[1] = amp_xstrndup(b.data, before);
    ck_assert_int_eq(amp_sig_verify(s, hdr_get, &h, body, 2, 1700000000, NULL), AMP_SIG_MISMATCH);
    hdrs_free(&h);
    amp_buf_free(&b);
    amp_sig_destroy(s);
}
END_TEST

/* One verifier shared by several threads gives the same answers as one. */
typedef struct {
    const amp_sig *sig;
    const char *hex;
    int failures;
} thread_arg;

static void *verify_many(void *p) {
    thread_arg *a = p;
    const char *body = "{\"n\":1}";
    for (int i = 0; i < 300; i++) {
        hdrs h = {0};
        h.name[0] = "X-Amplitude-Timestamp";
        h.value[0] = amp_xstrdup("1700000000");
        h.name[1] = "X-Amplitude-Sig";
        h.value[1] = (i % 2) ? amp_xasprintf("sha256=%s", a->hex)
                             : amp_xstrdup("sha256=00000000000000000000000000000000"
                                           "00000000000000000000000000000000");
        h.n = 2;
        amp_sig_result want = (i % 2) ? AMP_SIG_OK : AMP_SIG_MISMATCH;
        if (amp_sig_verify(a->sig, hdr_get, &h, body, strlen(body), 1700000000, NULL) != want)
            a->failures++;
        hdrs_free(&h);
    }
    return NULL;
}

START_TEST(test_shared_between_threads) {
    const char *secrets[] = {"old", "new"};
    amp_sig *s = amp_sig_create(AMP_AUTH_AMPLITUDE_HMAC, secrets, 2, 300, NULL, NULL, 0);
    ck_assert_ptr_nonnull(s);
    char hex[65];
    amp_sig_amplitude_hex("new", 3, 1700000000, "{\"n\":1}", 7, hex);
    pthread_t t[4];
    thread_arg args[4];
    for (int i = 0; i < 4; i++) {
        args[i] = (thread_arg){s, hex, 0};
        ck_assert_int_eq(pthread_create(&t[i], NULL, verify_many, &args[i]), 0);
    }
    for (int i = 0; i < 4; i++) {
        pthread_join(t[i], NULL);
        ck_assert_int_eq(args[i].failures, 0);
    }
    amp_sig_destroy(s);
}
END_TEST

/* The dedupe key's message id comes from the same header verification
 * reads: webhook-id, else Svix's svix-id. */
START_TEST(test_message_id) {
    hdrs h = {0};
    ck_assert_ptr_null(amp_sig_message_id(hdr_get, &h));
    h.name[h.n] = "Svix-Id";
    h.value[h.n++] = strdup("msg_svix");
    ck_assert_str_eq(amp_sig_message_id(hdr_get, &h), "msg_svix");
    h.name[h.n] = "webhook-id";
    h.value[h.n++] = strdup("msg_std");
    ck_assert_str_eq(amp_sig_message_id(hdr_get, &h), "msg_std");
    hdrs_free(&h);
}
END_TEST

static Suite *sig_suite(size_t ncases) {
    Suite *s = suite_create("sig");
    TCase *tc = tcase_create("vectors");
    tcase_add_loop_test(tc, test_vector, 0, (int)ncases);
    suite_add_tcase(s, tc);
    tc = tcase_create("api");
    tcase_add_test(tc, test_scheme_names);
    tcase_add_test(tc, test_create_errors);
    tcase_add_test(tc, test_message_id);
    tcase_add_test(tc, test_secrets_are_copied);
    tcase_add_test(tc, test_amplitude_hex);
    tcase_add_test(tc, test_many_entries);
    tcase_add_test(tc, test_shared_between_threads);
    tcase_set_timeout(tc, 30);
    suite_add_tcase(s, tc);
    return s;
}

int main(void) {
    json_error_t jerr;
    vectors = json_load_file(VECTORS, JSON_REJECT_DUPLICATES | JSON_ALLOW_NUL, &jerr);
    if (!vectors || !json_is_array(vectors) || json_array_size(vectors) == 0) {
        fprintf(stderr, "%s:%d:%d: %s\n", VECTORS, jerr.line, jerr.column,
                vectors ? "expected a non-empty array of cases" : jerr.text);
        json_decref(vectors);
        return 1;
    }
    int rc = amp_check_run(sig_suite(json_array_size(vectors)));
    json_decref(vectors);
    return rc;
}
