/*
 * sig — request authentication schemes (SPEC "Authentication schemes").
 *
 *   amplitude-hmac     X-Amplitude-Timestamp + X-Amplitude-Sig: sha256=<64 hex>
 *                      (several space-separated entries), HMAC-SHA256 over
 *                      "<timestamp>.<body>", +/- tolerance seconds.
 *   static-header      a configured header's whole value equals a secret.
 *   standard-webhooks  webhook-id / webhook-timestamp / webhook-signature
 *                      "v1,<base64>" list over "id.timestamp.body";
 *                      whsec_ base64 secrets. Svix's svix-id /
 *                      svix-timestamp / svix-signature are read when
 *                      webhook-id is absent and svix-id present.
 *   none               always OK (config only allows it explicitly).
 *
 * Every comparison is constant time (CRYPTO_memcmp on equal-length decoded
 * bytes); parsing is strict (exact hex length, no overflow on timestamps).
 *
 * Threading: an amp_sig does not change after amp_sig_create (only its
 * spare MAC contexts, behind a mutex) and may be shared by any number of
 * threads.
 */
#ifndef AMP_SIG_H
#define AMP_SIG_H

#include <stddef.h>
#include <stdint.h>

typedef enum {
    AMP_AUTH_AMPLITUDE_HMAC,
    AMP_AUTH_STATIC_HEADER,
    AMP_AUTH_STANDARD_WEBHOOKS,
    AMP_AUTH_NONE,
} amp_auth_scheme;

typedef enum {
    AMP_SIG_OK,
    AMP_SIG_MISSING,   /* a required header is absent          -> 401 missing_signature */
    AMP_SIG_MALFORMED, /* a header does not parse               -> 401 invalid_signature */
    AMP_SIG_STALE,     /* timestamp outside the tolerance       -> 401 stale_timestamp */
    AMP_SIG_MISMATCH,  /* well-formed, but no secret matches    -> 401 invalid_signature */
} amp_sig_result;

/* 0 and *out set for "amplitude-hmac", "static-header", "standard-webhooks",
 * "none"; -1 otherwise. */
int amp_sig_parse_scheme(const char *name, amp_auth_scheme *out);
const char *amp_sig_scheme_name(amp_auth_scheme scheme); /* static string */

typedef struct amp_sig amp_sig;

/* Build a verifier. secrets are borrowed during the call and copied (for
 * standard-webhooks, "whsec_" prefixes are stripped and the rest base64
 * decoded; a secret that does not decode is an error). header_name is the
 * header static-header compares (ignored by other schemes; may be NULL).
 * Returns NULL and writes a message to err (never containing a secret) when
 * a secret is unusable or none is given for a scheme that needs one. */
amp_sig *amp_sig_create(amp_auth_scheme scheme, const char *const *secrets, size_t nsecrets,
                        int64_t tolerance_s, const char *header_name, char *err, size_t errlen);
void amp_sig_destroy(amp_sig *sig); /* accepts NULL */

/* Header lookup, case-insensitive name; returns a borrowed value or NULL. */
typedef const char *(*amp_sig_header_fn)(void *ctx, const char *name);

/* Verify one request. *detail (may be NULL) receives a static human-readable
 * reason on failure, e.g. "X-Amplitude-Sig: expected sha256=<64 hex>". */
amp_sig_result amp_sig_verify(const amp_sig *sig, amp_sig_header_fn header, void *ctx,
                              const char *body, size_t len, int64_t now_s, const char **detail);

/* standard-webhooks: the request's message id, webhook-id or else svix-id
 * (the name verification reads); borrowed from header, NULL when absent. */
const char *amp_sig_message_id(amp_sig_header_fn header, void *ctx);

/* HMAC-SHA256(secret, "<ts>.<body>") as 64 lowercase hex digits + NUL. */
void amp_sig_amplitude_hex(const char *secret, size_t secret_len, int64_t ts, const char *body,
                           size_t len, char out[65]);

#endif
