/*
 * fuzz_sig — the signature header parsers and verification of every
 * authentication scheme (crypto/sig.c), with fixed secrets and clocks.
 *
 * Input (text, so corpus files stay readable):
 *
 *   <scheme>\n                 amplitude-hmac | static-header |
 *                              standard-webhooks | none (anything else:
 *                              amplitude-hmac)
 *   Name: value\n ...          request headers, up to MAX_HEADERS; leading
 *                              blanks of a value are dropped as
 *                              libmicrohttpd does
 *   \n
 *   body bytes                 the rest, verbatim
 *
 * Beyond "no crash, no leak, no undefined behaviour", each run checks:
 *  - the result is one of the five documented values, with a reason on
 *    failure, and verifying twice gives the same answer;
 *  - the scheme's own correct signature over the fuzzed body (and the fuzzed
 *    webhook-id, when usable) verifies, also as the last of several
 *    entries, and stops verifying when one body byte changes. The expected
 *    MACs are computed here with OpenSSL's HMAC(), not with the product.
 */
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <stdbool.h>
#include <string.h>
#include <strings.h>

#include "../../crypto/sig.h"
#include "../../base/alloc.h"
#include "fuzz.h"

#define MAX_HEADERS 16
#define TOLERANCE 300
/* The clocks the corpus files are signed for. */
#define NOW_AMPLITUDE INT64_C(1700000000)
#define NOW_STANDARD INT64_C(1614265330)

static const char *const amp_secrets[] = {"amp-secret-1", "old-secret"};
static const char *const static_secrets[] = {"Bearer tok-9f8e7d6c", "second"};
/* The first is the Standard Webhooks reference secret. */
static const char *const sw_secrets[] = {"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
                                         "whsec_c2Vjb25kLXNlY3JldC1mb3ItZnV6emluZw=="};
/* Base64 decodings of sw_secrets, for the independent MAC. */
static const char sw_key0_b64[] = "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

typedef struct {
    size_t n;
    char *name[MAX_HEADERS];
    char *value[MAX_HEADERS];
} hdrs;

static const char *hdr_get(void *ctx, const char *name) {
    const hdrs *h = ctx;
    for (size_t i = 0; i < h->n; i++)
        if (strcasecmp(h->name[i], name) == 0)
            return h->value[i];
    return NULL;
}

static void hdr_add(hdrs *h, const char *name, size_t nlen, const char *value, size_t vlen) {
    if (h->n == MAX_HEADERS)
        return;
    h->name[h->n] = amp_xstrndup(name, nlen);
    h->value[h->n] = amp_xstrndup(value, vlen);
    h->n++;
}

static void hdrs_free(hdrs *h) {
    for (size_t i = 0; i < h->n; i++) {
        free(h->name[i]);
        free(h->value[i]);
    }
    h->n = 0;
}

typedef struct {
    amp_sig *amplitude, *stat, *standard, *none;
    unsigned char sw_key[64];
    int sw_keylen;
} verifiers;

static const verifiers *get_verifiers(void) {
    static verifiers v;
    static bool ready;
    if (ready)
        return &v;
    char err[256];
    v.amplitude =
        amp_sig_create(AMP_AUTH_AMPLITUDE_HMAC, amp_secrets, 2, TOLERANCE, NULL, err, sizeof err);
    v.stat = amp_sig_create(AMP_AUTH_STATIC_HEADER, static_secrets, 2, TOLERANCE, "Authorization",
                            err, sizeof err);
    v.standard =
        amp_sig_create(AMP_AUTH_STANDARD_WEBHOOKS, sw_secrets, 2, TOLERANCE, NULL, err, sizeof err);
    v.none = amp_sig_create(AMP_AUTH_NONE, NULL, 0, TOLERANCE, NULL, err, sizeof err);
    FUZZ_CHECK(v.amplitude && v.stat && v.standard && v.none, "amp_sig_create: %s", err);
    v.sw_keylen =
        EVP_DecodeBlock(v.sw_key, (const unsigned char *)sw_key0_b64, (int)strlen(sw_key0_b64));
    FUZZ_CHECK(v.sw_keylen == 24, "reference secret decodes to %d bytes", v.sw_keylen);
    ready = true;
    return &v;
}

static bool known_result(amp_sig_result r) {
    return r == AMP_SIG_OK || r == AMP_SIG_MISSING || r == AMP_SIG_MALFORMED ||
           r == AMP_SIG_STALE || r == AMP_SIG_MISMATCH;
}

static amp_sig_result verify(const amp_sig *s, hdrs *h, const char *body, size_t len, int64_t now) {
    const char *detail = NULL;
    amp_sig_result r = amp_sig_verify(s, hdr_get, h, body, len, now, &detail);
    FUZZ_CHECK(known_result(r), "result %d", (int)r);
    FUZZ_CHECK(r == AMP_SIG_OK || (detail && *detail), "no reason for result %d", (int)r);
    const char *detail2 = NULL;
    amp_sig_result r2 = amp_sig_verify(s, hdr_get, h, body, len, now, &detail2);
    FUZZ_CHECK(r == r2, "verified twice: %d then %d", (int)r, (int)r2);
    return r;
}

static void to_hex(const unsigned char *mac, char out[65]) {
    static const char hex[] = "0123456789abcdef";
    for (size_t i = 0; i < 32; i++) {
        out[2 * i] = hex[mac[i] >> 4];
        out[2 * i + 1] = hex[mac[i] & 0xf];
    }
    out[64] = '\0';
}

/* HMAC-SHA256 over a || b || body. */
static void mac3(const void *key, int keylen, const char *a, size_t alen, const char *b,
                 size_t blen, const char *body, size_t len, unsigned char out[32]) {
    size_t total = alen + blen + len;
    char *msg = amp_xmalloc(total ? total : 1);
    memcpy(msg, a, alen);
    memcpy(msg + alen, b, blen);
    if (len)
        memcpy(msg + alen + blen, body, len);
    unsigned int outlen = 0;
    unsigned char *r =
        HMAC(EVP_sha256(), key, keylen, (const unsigned char *)msg, total, out, &outlen);
    FUZZ_CHECK(r && outlen == 32, "HMAC failed");
    free(msg);
}

/* The amplitude-hmac signature of the body, from the second (rotated)
 * secret, verifies; alone and after junk entries; and not once tampered. */
static void amplitude_roundtrip(const amp_sig *s, char *body, size_t len) {
    int64_t ts = NOW_AMPLITUDE - TOLERANCE + (int64_t)(len % (2 * TOLERANCE + 1));
    char tsbuf[24];
    int tslen = snprintf(tsbuf, sizeof tsbuf, "%lld", (long long)ts);
    unsigned char mac[32];
    mac3(amp_secrets[1], (int)strlen(amp_secrets[1]), tsbuf, (size_t)tslen, ".", 1, body, len, mac);
    char hex[65];
    to_hex(mac, hex);
    char product_hex[65];
    amp_sig_amplitude_hex(amp_secrets[1], strlen(amp_secrets[1]), ts, body, len, product_hex);
    FUZZ_CHECK(strcmp(hex, product_hex) == 0, "amp_sig_amplitude_hex differs from HMAC()");

    char sig[256];
    hdrs h = {0};
    snprintf(sig, sizeof sig, "sha256=%s", hex);
    hdr_add(&h, "X-Amplitude-Timestamp", 21, tsbuf, (size_t)tslen);
    hdr_add(&h, "X-Amplitude-Sig", 15, sig, strlen(sig));
    FUZZ_CHECK(verify(s, &h, body, len, NOW_AMPLITUDE) == AMP_SIG_OK, "own signature rejected");
    hdrs_free(&h);

    snprintf(sig, sizeof sig,
             "sha256=zz v1,abc \tsha256=0123456789abcdef0123456789abcdef0123456789abcdef"
             "0123456789abcdef sha256=%s",
             hex);
    hdr_add(&h, "X-Amplitude-Timestamp", 21, tsbuf, (size_t)tslen);
    hdr_add(&h, "X-Amplitude-Sig", 15, sig, strlen(sig));
    FUZZ_CHECK(verify(s, &h, body, len, NOW_AMPLITUDE) == AMP_SIG_OK,
               "own signature as the last entry rejected");
    if (len) {
        body[len / 2] ^= 0x01;
        FUZZ_CHECK(verify(s, &h, body, len, NOW_AMPLITUDE) == AMP_SIG_MISMATCH,
                   "tampered body accepted");
        body[len / 2] ^= 0x01;
    }
    hdrs_free(&h);
}

/* A usable webhook-id from the input (as the verifier would trim it), or
 * a fixed one. */
static void pick_id(hdrs *in, const char **id, size_t *idlen) {
    const char *v = hdr_get(in, "webhook-id");
    *id = "msg_fuzz";
    *idlen = 8;
    if (!v)
        return;
    size_t n = strlen(v);
    while (n && (v[n - 1] == ' ' || v[n - 1] == '\t'))
        n--;
    if (n && n < 200 && v[0] != ' ' && v[0] != '\t') {
        *id = v;
        *idlen = n;
    }
}

static void standard_roundtrip(const verifiers *v, hdrs *in, char *body, size_t len) {
    const char *id;
    size_t idlen;
    pick_id(in, &id, &idlen);
    int64_t ts = NOW_STANDARD + TOLERANCE - (int64_t)(len % (2 * TOLERANCE + 1));
    char tsbuf[24];
    int tslen = snprintf(tsbuf, sizeof tsbuf, "%lld", (long long)ts);
    /* id "." ts "." body */
    char *prefix = amp_xasprintf("%.*s.%s.", (int)idlen, id, tsbuf);
    unsigned char mac[32];
    mac3(v->sw_key, v->sw_keylen, prefix, strlen(prefix), "", 0, body, len, mac);
    free(prefix);
    unsigned char b64[48];
    EVP_EncodeBlock(b64, mac, 32);

    char sig[256];
    snprintf(sig, sizeof sig, "v2,AAAA v1,!!! v1,%s", (const char *)b64);
    hdrs h = {0};
    hdr_add(&h, "webhook-id", 10, id, idlen);
    hdr_add(&h, "webhook-timestamp", 17, tsbuf, (size_t)tslen);
    hdr_add(&h, "webhook-signature", 17, sig, strlen(sig));
    FUZZ_CHECK(verify(v->standard, &h, body, len, NOW_STANDARD) == AMP_SIG_OK,
               "own standard-webhooks signature rejected (id '%.*s')", (int)idlen, id);
    if (len) {
        body[0] ^= 0x20;
        FUZZ_CHECK(verify(v->standard, &h, body, len, NOW_STANDARD) == AMP_SIG_MISMATCH,
                   "tampered body accepted");
        body[0] ^= 0x20;
    }
    hdrs_free(&h);
}

static void static_roundtrip(const amp_sig *s, const char *body, size_t len) {
    hdrs h = {0};
    hdr_add(&h, "authorization", 13, static_secrets[1], strlen(static_secrets[1]));
    FUZZ_CHECK(verify(s, &h, body, len, 0) == AMP_SIG_OK, "static secret rejected");
    hdrs_free(&h);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    const verifiers *v = get_verifiers();
    const char *p = (const char *)data, *end = p + size;

    /* Line 1: the scheme. */
    const char *nl = memchr(p, '\n', size);
    size_t l1 = nl ? (size_t)(nl - p) : size;
    const amp_sig *s = v->amplitude;
    int64_t now = NOW_AMPLITUDE;
    if (l1 == 13 && memcmp(p, "static-header", 13) == 0) {
        s = v->stat;
    } else if (l1 == 17 && memcmp(p, "standard-webhooks", 17) == 0) {
        s = v->standard;
        now = NOW_STANDARD;
    } else if (l1 == 4 && memcmp(p, "none", 4) == 0) {
        s = v->none;
    }
    p = nl ? nl + 1 : end;

    /* Headers up to an empty line. */
    hdrs h = {0};
    while (p < end) {
        nl = memchr(p, '\n', (size_t)(end - p));
        const char *eol = nl ? nl : end;
        if (eol == p) {
            p++;
            break;
        }
        const char *colon = memchr(p, ':', (size_t)(eol - p));
        if (colon && colon > p) {
            const char *val = colon + 1;
            while (val < eol && (*val == ' ' || *val == '\t'))
                val++;
            hdr_add(&h, p, (size_t)(colon - p), val, (size_t)(eol - val));
        }
        p = nl ? nl + 1 : end;
    }

    /* The body in its own exact-size block, writable for tampering. */
    size_t len = (size_t)(end - p);
    char *body = amp_xmalloc(len ? len : 1);
    if (len)
        memcpy(body, p, len);

    amp_sig_result r = verify(s, &h, body, len, now);
#ifdef FUZZ_DEBUG /* cc -DFUZZ_DEBUG: show what each corpus file yields */
    fprintf(stderr, "result %d\n", (int)r);
#endif
    if (s == v->none)
        FUZZ_CHECK(r == AMP_SIG_OK, "scheme none refused a request");
    /* Every scheme sees the same request too: none of them may crash. */
    verify(v->amplitude, &h, body, len, NOW_AMPLITUDE);
    verify(v->standard, &h, body, len, NOW_STANDARD);
    verify(v->stat, &h, body, len, 0);

    amplitude_roundtrip(v->amplitude, body, len);
    standard_roundtrip(v, &h, body, len);
    static_roundtrip(v->stat, body, len);

    free(body);
    hdrs_free(&h);
    return 0;
}
