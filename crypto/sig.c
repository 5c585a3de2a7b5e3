/*
 * sig — request authentication schemes; see sig.h for the contract.
 *
 * Choices the header leaves open, written down here:
 *
 * - Timestamps (X-Amplitude-Timestamp, webhook-timestamp) may carry
 *   surrounding spaces or tabs, which are trimmed; what remains must be
 *   plain decimal digits (no sign) no larger than TS_MAX, the last second of
 *   year 9999. A value above that is far more likely milliseconds or garbage
 *   than a time, so it is MALFORMED, not STALE. The MAC covers the trimmed
 *   digits exactly as sent (leading zeros included).
 * - The tolerance is inclusive: |timestamp - now| == tolerance is accepted.
 * - Signature headers are lists separated by spaces or tabs. Entries that
 *   are not well formed are skipped; a header without a single well-formed
 *   entry is MALFORMED.
 * - standard-webhooks: Svix's names (svix-id, svix-timestamp,
 *   svix-signature) are accepted as the Standard Webhooks libraries do, one
 *   family per request: a request with webhook-id is read by the webhook-*
 *   names only, one with svix-id and no webhook-id by the svix-* names only.
 * - standard-webhooks: entries "vN,<base64>" of a version other than v1 are
 *   ignored as the specification asks. A header whose well-formed entries
 *   are all of other versions is MISMATCH (it is valid, we just cannot check
 *   any of it); a header with no well-formed entry at all, or with a v1
 *   entry that is not base64 of 32 bytes and no good v1 entry, is
 *   MALFORMED. Secrets may omit the "whsec_" prefix; the rest must be
 *   standard base64 (padding optional).
 * - static-header: the header value is trimmed of surrounding spaces and
 *   tabs (HTTP does not count them as part of a field value), so secrets
 *   with such whitespace are refused at create time rather than never
 *   matching. Values and secrets are both run through HMAC-SHA256 under a
 *   random per-verifier key before CRYPTO_memcmp, so the comparison takes
 *   the same time whatever the lengths and contents.
 * - Secrets must be non-empty for every scheme that uses them.
 *
 * Every secret and every entry is compared and the results ORed, so timing
 * does not show which secret or entry matched.
 */
#include "sig.h"

#include "../base/alloc.h"
#include "../base/parse.h"

#include <inttypes.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/params.h>
#include <openssl/rand.h>

#define MAC_LEN 32
/* 9999-12-31T23:59:59Z: anything larger is not a time in seconds. */
#define TS_MAX INT64_C(253402300799)

/* Finished working contexts a key keeps for reuse. One per thread that
 * verifies at the same time is enough; more are freed. */
#define SPARES 8

/* An HMAC-SHA256 key, ready to use. keyed is never updated itself: each MAC
 * runs on a copy, which skips the digest lookup and the key schedule (about
 * half the cost of a MAC over a 600-byte body). A finished copy goes back
 * to spare and is taken again with EVP_MAC_init and no key (OpenSSL keeps
 * the key): measured with a 600-byte body, 0.67 us per MAC against 1.10 us
 * with a fresh copy each time (EVP_MAC_CTX_dup and its allocations). */
typedef struct {
    EVP_MAC_CTX *keyed;         /* owned */
    pthread_mutex_t mu;         /* guards spare and nspare */
    EVP_MAC_CTX *spare[SPARES]; /* owned */
    size_t nspare;
} hmac_key;

typedef struct {
    unsigned char *key; /* owned; raw HMAC key (decoded for standard-webhooks) */
    size_t len;
    hmac_key *mac;              /* owned; NULL for static-header */
    unsigned char cmp[MAC_LEN]; /* static-header: HMAC(cmp_key, secret) */
} sig_secret;

struct amp_sig {
    amp_auth_scheme scheme;
    int64_t tolerance_s;
    char *header_name; /* owned; static-header only */
    sig_secret *secrets;
    size_t nsecrets;
    unsigned char cmp_key[MAC_LEN]; /* static-header comparison key */
    hmac_key *cmp_mac;              /* owned; static-header: keyed with cmp_key */
    EVP_MAC *mac;                   /* fetched once; safe to share */
};

typedef struct {
    const void *p;
    size_t len;
} part;

/* Names and results. */

static const struct {
    const char *name;
    amp_auth_scheme scheme;
} scheme_names[] = {
    {"amplitude-hmac", AMP_AUTH_AMPLITUDE_HMAC},
    {"static-header", AMP_AUTH_STATIC_HEADER},
    {"standard-webhooks", AMP_AUTH_STANDARD_WEBHOOKS},
    {"none", AMP_AUTH_NONE},
};

int amp_sig_parse_scheme(const char *name, amp_auth_scheme *out) {
    if (!name)
        return -1;
    for (size_t i = 0; i < sizeof(scheme_names) / sizeof(scheme_names[0]); i++) {
        if (strcmp(name, scheme_names[i].name) == 0) {
            *out = scheme_names[i].scheme;
            return 0;
        }
    }
    return -1;
}

const char *amp_sig_scheme_name(amp_auth_scheme scheme) {
    for (size_t i = 0; i < sizeof(scheme_names) / sizeof(scheme_names[0]); i++) {
        if (scheme_names[i].scheme == scheme)
            return scheme_names[i].name;
    }
    return "unknown";
}

static void hmac_key_free(hmac_key *k) {
    if (!k)
        return;
    for (size_t i = 0; i < k->nspare; i++)
        EVP_MAC_CTX_free(k->spare[i]);
    EVP_MAC_CTX_free(k->keyed);
    pthread_mutex_destroy(&k->mu);
    free(k);
}

/* An HMAC-SHA256 key (caller frees with hmac_key_free); NULL when OpenSSL
 * fails. */
static hmac_key *hmac_key_new(EVP_MAC *mac, const unsigned char *key, size_t keylen) {
    /* OpenSSL treats a NULL key as "keep the previous key"; an empty key
     * needs a real pointer. */
    static const unsigned char empty_key[1] = {0};
    char digest[] = "SHA256";
    OSSL_PARAM params[] = {
        OSSL_PARAM_construct_utf8_string(OSSL_MAC_PARAM_DIGEST, digest, 0),
        OSSL_PARAM_construct_end(),
    };
    hmac_key *k = amp_xcalloc(1, sizeof(*k));
    pthread_mutex_init(&k->mu, NULL);
    k->keyed = EVP_MAC_CTX_new(mac);
    if (!k->keyed || EVP_MAC_init(k->keyed, keylen ? key : empty_key, keylen, params) != 1) {
        hmac_key_free(k);
        return NULL;
    }
    return k;
}

/* The MAC of the concatenation of parts (no copy of the body) under k, on a
 * spare context or a new copy of k's keyed one. Safe from any thread. */
static int hmac_with(hmac_key *k, const part *parts, size_t nparts, unsigned char out[MAC_LEN]) {
    EVP_MAC_CTX *ctx = NULL;
    pthread_mutex_lock(&k->mu);
    if (k->nspare)
        ctx = k->spare[--k->nspare];
    pthread_mutex_unlock(&k->mu);
    int ok =
        ctx ? EVP_MAC_init(ctx, NULL, 0, NULL) == 1 : (ctx = EVP_MAC_CTX_dup(k->keyed)) != NULL;
    for (size_t i = 0; ok && i < nparts; i++)
        ok = !parts[i].len || EVP_MAC_update(ctx, parts[i].p, parts[i].len) == 1;
    size_t outlen = 0;
    ok = ok && EVP_MAC_final(ctx, out, &outlen, MAC_LEN) == 1 && outlen == MAC_LEN;
    if (ok) { /* a context that failed is not used again */
        pthread_mutex_lock(&k->mu);
        if (k->nspare < SPARES) {
            k->spare[k->nspare++] = ctx;
            ctx = NULL;
        }
        pthread_mutex_unlock(&k->mu);
    }
    EVP_MAC_CTX_free(ctx);
    return ok ? 0 : -1;
}

/* A one-off MAC under key. */
static int hmac_parts(EVP_MAC *mac, const unsigned char *key, size_t keylen, const part *parts,
                      size_t nparts, unsigned char out[MAC_LEN]) {
    hmac_key *k = hmac_key_new(mac, key, keylen);
    int rc = k ? hmac_with(k, parts, nparts, out) : -1;
    hmac_key_free(k);
    return rc;
}

void amp_sig_amplitude_hex(const char *secret, size_t secret_len, int64_t ts, const char *body,
                           size_t len, char out[65]) {
    static const char hex[] = "0123456789abcdef";
    char tsbuf[32];
    int n = snprintf(tsbuf, sizeof(tsbuf), "%" PRId64, ts);
    part parts[] = {{tsbuf, (size_t)n}, {".", 1}, {body, len}};
    unsigned char mac[MAC_LEN];
    EVP_MAC *m = EVP_MAC_fetch(NULL, OSSL_MAC_NAME_HMAC, NULL);
    int rc = m ? hmac_parts(m, (const unsigned char *)secret, secret_len, parts, 3, mac) : -1;
    EVP_MAC_free(m);
    if (rc != 0) {
        /* Only reachable when OpenSSL cannot allocate or lacks HMAC; there
         * is no way to report it through this signature, and printing a
         * wrong signature would be worse than stopping. */
        fprintf(stderr, "{\"level\":\"error\",\"msg\":\"HMAC-SHA256 unavailable\"}\n");
        abort();
    }
    for (size_t i = 0; i < MAC_LEN; i++) {
        out[2 * i] = hex[mac[i] >> 4];
        out[2 * i + 1] = hex[mac[i] & 0xf];
    }
    out[64] = '\0';
    OPENSSL_cleanse(mac, sizeof(mac));
}

/* Parsing helpers. */

static int is_ows(char c) {
    return c == ' ' || c == '\t';
}

/* Trim surrounding spaces and tabs: *start and *len describe the rest. */
static void trim(const char *s, const char **start, size_t *len) {
    size_t n = strlen(s);
    while (n && is_ows(*s)) {
        s++;
        n--;
    }
    while (n && is_ows(s[n - 1]))
        n--;
    *start = s;
    *len = n;
}

/* Next token of a space/tab separated list; 0 when the list is exhausted. */
static int next_token(const char **cursor, const char **tok, size_t *toklen) {
    const char *p = *cursor;
    while (*p && is_ows(*p))
        p++;
    if (!*p)
        return 0;
    const char *start = p;
    while (*p && !is_ows(*p))
        p++;
    *tok = start;
    *toklen = (size_t)(p - start);
    *cursor = p;
    return 1;
}

static int parse_ts(const char *s, size_t len, int64_t *out) {
    /* amp_parse_i64 with min 0 already rejects signs, spaces and overflow. */
    return amp_parse_i64(s, len, 0, TS_MAX, out);
}

/* |ts - now| <= tol, without overflow for any now. */
static int within_tolerance(int64_t ts, int64_t now, int64_t tol) {
    int64_t diff;
    if (__builtin_sub_overflow(ts, now, &diff))
        return 0;
    if (diff < 0) {
        if (diff == INT64_MIN)
            return 0;
        diff = -diff;
    }
    return diff <= tol;
}

static int hexval(char c) {
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

/* Exactly 64 hex digits to 32 bytes. */
static int hex32(const char *s, size_t len, unsigned char out[MAC_LEN]) {
    if (len != 2 * MAC_LEN)
        return -1;
    for (size_t i = 0; i < MAC_LEN; i++) {
        int hi = hexval(s[2 * i]), lo = hexval(s[2 * i + 1]);
        if (hi < 0 || lo < 0)
            return -1;
        out[i] = (unsigned char)(hi << 4 | lo);
    }
    return 0;
}

static int b64val(char c) {
    if (c >= 'A' && c <= 'Z')
        return c - 'A';
    if (c >= 'a' && c <= 'z')
        return c - 'a' + 26;
    if (c >= '0' && c <= '9')
        return c - '0' + 52;
    if (c == '+')
        return 62;
    if (c == '/')
        return 63;
    return -1;
}

/* Standard base64, padding optional but correct when present. Writes at
 * most cap bytes; returns the decoded length or -1. */
static long b64decode(const char *s, size_t len, unsigned char *out, size_t cap) {
    size_t pad = 0;
    if (len % 4 == 0 && len >= 4) {
        if (s[len - 1] == '=')
            pad = s[len - 2] == '=' ? 2 : 1;
    }
    len -= pad;
    if (len % 4 == 1)
        return -1;
    size_t outlen = len / 4 * 3 + (len % 4 ? len % 4 - 1 : 0);
    if (outlen > cap)
        return -1;
    uint32_t acc = 0;
    int bits = 0;
    size_t o = 0;
    for (size_t i = 0; i < len; i++) {
        int v = b64val(s[i]);
        if (v < 0)
            return -1;
        acc = (acc << 6 | (uint32_t)v) & 0xffffff;
        bits += 6;
        if (bits >= 8) {
            bits -= 8;
            out[o++] = (unsigned char)(acc >> bits);
        }
    }
    return (long)o;
}

/* Building. */

static void set_err(char *err, size_t errlen, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static void set_err(char *err, size_t errlen, const char *fmt, ...) {
    if (!err || errlen == 0)
        return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
}

/* Decode a standard-webhooks secret into key (owned by the caller). */
static int whsec_decode(const char *secret, unsigned char **key, size_t *keylen) {
    static const char prefix[] = "whsec_";
    size_t n = strlen(secret);
    if (n >= sizeof(prefix) - 1 && memcmp(secret, prefix, sizeof(prefix) - 1) == 0) {
        secret += sizeof(prefix) - 1;
        n -= sizeof(prefix) - 1;
    }
    if (n == 0)
        return -1;
    unsigned char *buf = amp_xmalloc(n);
    long got = b64decode(secret, n, buf, n);
    if (got <= 0) {
        OPENSSL_cleanse(buf, n);
        free(buf);
        return -1;
    }
    *key = buf;
    *keylen = (size_t)got;
    return 0;
}

amp_sig *amp_sig_create(amp_auth_scheme scheme, const char *const *secrets, size_t nsecrets,
                        int64_t tolerance_s, const char *header_name, char *err, size_t errlen) {
    const char *name = amp_sig_scheme_name(scheme);
    amp_auth_scheme check;
    if (amp_sig_parse_scheme(name, &check) != 0) {
        set_err(err, errlen, "unknown authentication scheme %d", (int)scheme);
        return NULL;
    }
    amp_sig *s = amp_xcalloc(1, sizeof(*s));
    s->scheme = scheme;
    s->tolerance_s = tolerance_s;
    if (scheme == AMP_AUTH_NONE)
        return s;

    if (nsecrets == 0 || !secrets) {
        set_err(err, errlen, "auth scheme %s needs at least one secret", name);
        goto fail;
    }
    if ((scheme == AMP_AUTH_AMPLITUDE_HMAC || scheme == AMP_AUTH_STANDARD_WEBHOOKS) &&
        tolerance_s < 0) {
        set_err(err, errlen, "tolerance must be 0 or more seconds");
        goto fail;
    }
    if (scheme == AMP_AUTH_STATIC_HEADER && (!header_name || !*header_name)) {
        set_err(err, errlen, "auth scheme static-header needs a header name");
        goto fail;
    }
    s->mac = EVP_MAC_fetch(NULL, OSSL_MAC_NAME_HMAC, NULL);
    if (!s->mac) {
        set_err(err, errlen, "OpenSSL has no HMAC implementation");
        goto fail;
    }
    if (scheme == AMP_AUTH_STATIC_HEADER) {
        s->header_name = amp_xstrdup(header_name);
        if (RAND_bytes(s->cmp_key, sizeof(s->cmp_key)) != 1) {
            set_err(err, errlen, "OpenSSL could not generate random bytes");
            goto fail;
        }
        s->cmp_mac = hmac_key_new(s->mac, s->cmp_key, sizeof(s->cmp_key));
        if (!s->cmp_mac) {
            set_err(err, errlen, "HMAC-SHA256 failed");
            goto fail;
        }
    }

    s->secrets = amp_xcalloc(nsecrets, sizeof(*s->secrets));
    for (size_t i = 0; i < nsecrets; i++) {
        const char *sec = secrets[i];
        sig_secret *out = &s->secrets[i];
        /* Messages name the position only: the value must never leak. */
        if (!sec || !*sec) {
            set_err(err, errlen, "secret %zu of %zu is empty", i + 1, nsecrets);
            goto fail;
        }
        if (scheme == AMP_AUTH_STANDARD_WEBHOOKS) {
            if (whsec_decode(sec, &out->key, &out->len) != 0) {
                set_err(err, errlen,
                        "secret %zu of %zu is not a whsec_ secret: expected base64 after the "
                        "optional whsec_ prefix",
                        i + 1, nsecrets);
                goto fail;
            }
        } else {
            out->len = strlen(sec);
            out->key = amp_xmalloc(out->len);
            memcpy(out->key, sec, out->len);
        }
        s->nsecrets = i + 1; /* from here on destroy cleans this one */
        if (scheme != AMP_AUTH_STATIC_HEADER &&
            !(out->mac = hmac_key_new(s->mac, out->key, out->len))) {
            set_err(err, errlen, "HMAC-SHA256 failed");
            goto fail;
        }
        if (scheme == AMP_AUTH_STATIC_HEADER) {
            if (is_ows(sec[0]) || is_ows(sec[out->len - 1])) {
                set_err(err, errlen,
                        "secret %zu of %zu starts or ends with whitespace, which HTTP strips "
                        "from header values",
                        i + 1, nsecrets);
                goto fail;
            }
            part p = {out->key, out->len};
            if (hmac_with(s->cmp_mac, &p, 1, out->cmp) != 0) {
                set_err(err, errlen, "HMAC-SHA256 failed");
                goto fail;
            }
        }
    }
    return s;
fail:
    amp_sig_destroy(s);
    return NULL;
}

void amp_sig_destroy(amp_sig *sig) {
    if (!sig)
        return;
    for (size_t i = 0; i < sig->nsecrets; i++) {
        if (sig->secrets[i].key) {
            OPENSSL_cleanse(sig->secrets[i].key, sig->secrets[i].len);
            free(sig->secrets[i].key);
        }
        hmac_key_free(sig->secrets[i].mac);
    }
    free(sig->secrets);
    free(sig->header_name);
    hmac_key_free(sig->cmp_mac);
    EVP_MAC_free(sig->mac);
    OPENSSL_cleanse(sig, sizeof(*sig));
    free(sig);
}

/* Verifying. */

/* 1 when any candidate equals the MAC of parts under any secret. Every pair
 * is compared: the time depends on the counts, not on which one matched.
 * -1 when OpenSSL fails. */
static int any_match(const amp_sig *s, const part *parts, size_t nparts,
                     const unsigned char (*cand)[MAC_LEN], size_t ncand) {
    unsigned char mac[MAC_LEN];
    int match = 0;
    for (size_t i = 0; i < s->nsecrets; i++) {
        if (hmac_with(s->secrets[i].mac, parts, nparts, mac) != 0) {
            OPENSSL_cleanse(mac, sizeof(mac));
            return -1;
        }
        for (size_t j = 0; j < ncand; j++)
            match |= CRYPTO_memcmp(mac, cand[j], MAC_LEN) == 0;
    }
    OPENSSL_cleanse(mac, sizeof(mac));
    return match;
}

/* A well-formed entry plus its separator takes far more than 8 bytes, so
 * this bounds the number of candidates a header value can yield. */
static size_t max_entries(const char *value) {
    return strlen(value) / 8 + 1;
}

static amp_sig_result fail_with(const char **detail, amp_sig_result r, const char *why) {
    if (detail)
        *detail = why;
    return r;
}

static amp_sig_result finish(int matched, const char **detail) {
    if (matched < 0)
        return fail_with(detail, AMP_SIG_MISMATCH, "signature could not be computed");
    if (!matched)
        return fail_with(detail, AMP_SIG_MISMATCH, "no signature matches a configured secret");
    if (detail)
        *detail = NULL;
    return AMP_SIG_OK;
}

static amp_sig_result verify_amplitude(const amp_sig *s, amp_sig_header_fn header, void *ctx,
                                       const char *body, size_t len, int64_t now_s,
                                       const char **detail) {
    const char *tsv = header(ctx, "X-Amplitude-Timestamp");
    const char *sigv = header(ctx, "X-Amplitude-Sig");
    if (!tsv)
        return fail_with(detail, AMP_SIG_MISSING, "X-Amplitude-Timestamp header is missing");
    if (!sigv)
        return fail_with(detail, AMP_SIG_MISSING, "X-Amplitude-Sig header is missing");

    const char *ts;
    size_t tslen;
    int64_t tsval;
    trim(tsv, &ts, &tslen);
    if (parse_ts(ts, tslen, &tsval) != 0)
        return fail_with(detail, AMP_SIG_MALFORMED,
                         "X-Amplitude-Timestamp: not a unix time in seconds");

    static const char prefix[] = "sha256=";
    const size_t plen = sizeof(prefix) - 1;
    unsigned char(*cand)[MAC_LEN] = amp_xmalloc(max_entries(sigv) * MAC_LEN);
    size_t ncand = 0;
    const char *cur = sigv, *tok;
    size_t toklen;
    while (next_token(&cur, &tok, &toklen)) {
        if (toklen > plen && memcmp(tok, prefix, plen) == 0 &&
            hex32(tok + plen, toklen - plen, cand[ncand]) == 0)
            ncand++;
    }
    amp_sig_result r;
    if (ncand == 0) {
        r = fail_with(detail, AMP_SIG_MALFORMED,
                      "X-Amplitude-Sig: expected one or more sha256=<64 hex> entries");
    } else if (!within_tolerance(tsval, now_s, s->tolerance_s)) {
        r = fail_with(detail, AMP_SIG_STALE,
                      "X-Amplitude-Timestamp: outside the accepted tolerance");
    } else {
        part parts[] = {{ts, tslen}, {".", 1}, {body, len}};
        r = finish(any_match(s, parts, 3, (const unsigned char(*)[MAC_LEN])cand, ncand), detail);
    }
    free(cand);
    return r;
}

const char *amp_sig_message_id(amp_sig_header_fn header, void *ctx) {
    const char *id = header(ctx, "webhook-id");
    return id ? id : header(ctx, "svix-id");
}

static amp_sig_result verify_standard(const amp_sig *s, amp_sig_header_fn header, void *ctx,
                                      const char *body, size_t len, int64_t now_s,
                                      const char **detail) {
    /* One family of names for all three headers, chosen by the id. */
    bool svix = !header(ctx, "webhook-id") && header(ctx, "svix-id");
    const char *idv = header(ctx, svix ? "svix-id" : "webhook-id");
    const char *tsv = header(ctx, svix ? "svix-timestamp" : "webhook-timestamp");
    const char *sigv = header(ctx, svix ? "svix-signature" : "webhook-signature");
    if (!idv)
        return fail_with(detail, AMP_SIG_MISSING, "webhook-id (or svix-id) header is missing");
    if (!tsv)
        return fail_with(detail, AMP_SIG_MISSING,
                         svix ? "svix-timestamp header is missing (svix-id was sent)"
                              : "webhook-timestamp header is missing");
    if (!sigv)
        return fail_with(detail, AMP_SIG_MISSING,
                         svix ? "svix-signature header is missing (svix-id was sent)"
                              : "webhook-signature header is missing");

    const char *id, *ts;
    size_t idlen, tslen;
    int64_t tsval;
    trim(idv, &id, &idlen);
    if (idlen == 0)
        return fail_with(detail, AMP_SIG_MALFORMED, svix ? "svix-id: empty" : "webhook-id: empty");
    trim(tsv, &ts, &tslen);
    if (parse_ts(ts, tslen, &tsval) != 0)
        return fail_with(detail, AMP_SIG_MALFORMED,
                         svix ? "svix-timestamp: not a unix time in seconds"
                              : "webhook-timestamp: not a unix time in seconds");

    unsigned char(*cand)[MAC_LEN] = amp_xmalloc(max_entries(sigv) * MAC_LEN);
    size_t ncand = 0, nother = 0, nbad = 0;
    const char *cur = sigv, *tok;
    size_t toklen;
    while (next_token(&cur, &tok, &toklen)) {
        const char *comma = memchr(tok, ',', toklen);
        if (!comma || comma == tok || comma + 1 == tok + toklen) {
            nbad++;
        } else if (comma - tok == 2 && memcmp(tok, "v1", 2) == 0) {
            /* Room for one spare byte so an over-long value is refused. */
            unsigned char buf[MAC_LEN + 1];
            const char *b64 = comma + 1;
            size_t b64len = toklen - (size_t)(b64 - tok);
            if (b64decode(b64, b64len, buf, sizeof(buf)) == MAC_LEN)
                memcpy(cand[ncand++], buf, MAC_LEN);
            else
                nbad++;
        } else {
            nother++;
        }
    }
    amp_sig_result r;
    if (ncand == 0 && (nbad > 0 || nother == 0)) {
        r = fail_with(detail, AMP_SIG_MALFORMED,
                      svix ? "svix-signature: expected one or more v1,<base64> entries"
                           : "webhook-signature: expected one or more v1,<base64> entries");
    } else if (!within_tolerance(tsval, now_s, s->tolerance_s)) {
        r = fail_with(detail, AMP_SIG_STALE,
                      svix ? "svix-timestamp: outside the accepted tolerance"
                           : "webhook-timestamp: outside the accepted tolerance");
    } else if (ncand == 0) {
        r = fail_with(detail, AMP_SIG_MISMATCH,
                      svix ? "svix-signature: no v1 entry to check"
                           : "webhook-signature: no v1 entry to check");
    } else {
        part parts[] = {{id, idlen}, {".", 1}, {ts, tslen}, {".", 1}, {body, len}};
        r = finish(any_match(s, parts, 5, (const unsigned char(*)[MAC_LEN])cand, ncand), detail);
    }
    free(cand);
    return r;
}

static amp_sig_result verify_static(const amp_sig *s, amp_sig_header_fn header, void *ctx,
                                    const char **detail) {
    const char *v = header(ctx, s->header_name);
    if (!v)
        return fail_with(detail, AMP_SIG_MISSING, "the configured auth header is missing");
    const char *val;
    size_t vlen;
    trim(v, &val, &vlen);
    unsigned char mac[MAC_LEN];
    part p = {val, vlen};
    int match = 0;
    if (hmac_with(s->cmp_mac, &p, 1, mac) != 0)
        return finish(-1, detail);
    for (size_t i = 0; i < s->nsecrets; i++)
        match |= CRYPTO_memcmp(mac, s->secrets[i].cmp, MAC_LEN) == 0;
    OPENSSL_cleanse(mac, sizeof(mac));
    if (!match)
        return fail_with(detail, AMP_SIG_MISMATCH,
                         "the configured auth header does not match a configured secret");
    return finish(1, detail);
}

amp_sig_result amp_sig_verify(const amp_sig *sig, amp_sig_header_fn header, void *ctx,
                              const char *body, size_t len, int64_t now_s, const char **detail) {
    if (len == 0)
        body = "";
    switch (sig->scheme) {
    case AMP_AUTH_AMPLITUDE_HMAC:
        return verify_amplitude(sig, header, ctx, body, len, now_s, detail);
    case AMP_AUTH_STANDARD_WEBHOOKS:
        return verify_standard(sig, header, ctx, body, len, now_s, detail);
    case AMP_AUTH_STATIC_HEADER:
        return verify_static(sig, header, ctx, detail);
    case AMP_AUTH_NONE:
        if (detail)
            *detail = NULL;
        return AMP_SIG_OK;
    }
    return fail_with(detail, AMP_SIG_MISMATCH, "unknown authentication scheme");
}
