/*
 * harness — helpers for end-to-end tests that run the real amp2dify binary
 * ($AMP2DIFY_BIN, default build/amp2dify) as a child process on 127.0.0.1.
 *
 * h_server_start makes a fresh directory under /tmp, writes the config there
 * (the default one, or the test's own with @PORT@, @DIR@ and @DIFY_PORT@
 * replaced), sets the environment (AMP2DIFY_SECRETS, DIFY_BASE_URL,
 * DIFY_API_KEY, AMP2DIFY_SPOOL, AMP2DIFY_LISTEN), runs `amp2dify serve -c
 * FILE` with stderr and stdout in DIR/server.log, and waits until GET
 * /healthz answers 200. The child dies with the test process
 * (PR_SET_PDEATHSIG). A test that ends without h_server_stop (a failed
 * assertion) leaves the directory behind: its path is printed at start.
 *
 * The HTTP helpers use libcurl; signatures are computed here with OpenSSL's
 * HMAC, independently of the product's crypto code, so tests check it.
 *
 * Threading: one test thread drives the harness; it is not thread-safe.
 */
#ifndef E2E_HARNESS_H
#define E2E_HARNESS_H

#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define H_SECRET "e2e-signing-secret"
#define H_API_KEY "app-e2e-test-key"
#define H_WEBHOOK "/webhooks/amplitude"

typedef struct h_server h_server;

typedef struct h_opts {
    /* Config file text; NULL: h_default_config(). "@PORT@", "@DIR@" and
     * "@DIFY_PORT@" are replaced by the listen port, the temp directory and
     * the Dify port. */
    const char *config_json;
    /* Port of the fake Dify for DIFY_BASE_URL. 0: pick a free port where
     * nothing listens (h_server_dify_port tells which, so a test can start
     * the fake there later). */
    uint16_t dify_port;
    const char *secret;  /* AMP2DIFY_SECRETS; NULL: H_SECRET */
    const char *api_key; /* DIFY_API_KEY; NULL: H_API_KEY */
    /* Extra environment, "NAME=value" entries, NULL-terminated; an entry
     * "NAME" alone removes NAME. May be NULL. */
    const char *const *env;
    /* Extra arguments after `serve -c FILE`, NULL-terminated; may be NULL. */
    const char *const *args;
    unsigned ready_timeout_ms; /* 0: 10000 */
    bool no_wait;              /* do not wait for /healthz (for start-up failures) */
} h_opts;

/* The default config (with placeholders): listen 127.0.0.1:@PORT@, spool
 * @DIR@/spool.db, Dify at 127.0.0.1:@DIFY_PORT@/v1 with fast retries
 * (initial 50 ms, max 200 ms), one chat app "support" keyed by DIFY_API_KEY,
 * one route "all" sending every event with query "{{event_type}} by
 * {{user_id}}" and user "{{user_id}}". Static string. */
const char *h_default_config(void);

/* The binary under test: $AMP2DIFY_BIN, or build/amp2dify. */
const char *h_bin(void);

/* A port on 127.0.0.1 that was free a moment ago (never the same one twice
 * in a process). 0 on failure. */
uint16_t h_free_port(void);

/* NULL on failure, after printing why and the server log on stderr. Caller
 * owns; release with h_server_stop. opts may be NULL. */
h_server *h_server_start(const h_opts *opts);
/* SIGTERM, wait (bounded, then SIGKILL), remove the directory (kept when
 * $AMP2DIFY_E2E_KEEP is set and not "0"), free.
 * Returns the child's wait status (as waitpid), or -1 when it was not
 * running. Accepts NULL. */
int h_server_stop(h_server *s);
/* Stop the way operators do (SIGTERM, when it still runs) and check what a
 * clean stop means: exit status 0 and no sanitizer report in the log. NULL
 * when so, after h_server_stop; otherwise a message naming the problem and
 * the log (caller owns), and the directory is kept for a look. */
char *h_server_stop_clean(h_server *s);
/* Send sig (e.g. SIGKILL or SIGTERM) and wait for the exit, bounded by
 * timeout_ms (0: 15000; then SIGKILL). Returns the wait status, or -1. The
 * directory and config stay for h_server_restart. */
int h_server_kill(h_server *s, int sig, unsigned timeout_ms);
/* Start the binary again with the same config, environment, directory and
 * spool. 0 once /healthz answers, -1 otherwise. */
int h_server_restart(h_server *s);
/* Wait up to timeout_ms for the child to exit by itself; the wait status,
 * or -1 on timeout (it keeps running). */
int h_server_wait_exit(h_server *s, unsigned timeout_ms);
bool h_server_running(h_server *s);

uint16_t h_server_port(const h_server *s);
uint16_t h_server_dify_port(const h_server *s);
const char *h_server_dir(const h_server *s);    /* borrowed */
const char *h_server_secret(const h_server *s); /* borrowed */
int h_server_pid(const h_server *s);

/* The whole server log (stderr + stdout of every run); caller owns. */
char *h_server_log(const h_server *s);
/* Wait until the log contains needle; true if it did within timeout_ms. */
bool h_server_log_wait(const h_server *s, const char *needle, unsigned timeout_ms);
/* The first sanitizer report in the log (AddressSanitizer, LeakSanitizer,
 * UndefinedBehaviorSanitizer "runtime error:"), up to 2000 bytes from where
 * it starts; NULL when there is none. Caller owns. */
char *h_server_sanitizer_report(const h_server *s);
/* Log lines (JSON objects) whose "msg" equals msg, as a new array; lines
 * that are not JSON are skipped. Caller owns. */
json_t *h_server_log_lines(const h_server *s, const char *msg);

/* ---- HTTP ----------------------------------------------------------------- */

typedef struct h_resp {
    long status; /* 0 when no HTTP answer arrived */
    char *body;  /* NUL-terminated; never NULL */
    size_t len;
    json_t *json;      /* body parsed, or NULL when it is not JSON */
    const char *error; /* libcurl's message when the exchange failed, else NULL */
    char **headers;    /* "Name: value" of the final response */
    size_t nheaders;
    size_t pieces; /* body writes libcurl made: shows how a stream arrived */
} h_resp;

typedef struct h_req {
    const char *method; /* NULL: POST when body is set, else GET */
    const char *path;
    const char *body; /* may be NULL */
    size_t body_len;  /* 0: strlen(body) */
    /* "Name: value" entries, NULL-terminated. A body is sent as
     * application/json unless a Content-Type entry is given; "Name:" with
     * no value removes a header libcurl would add (e.g. "Expect:"). */
    const char *const *headers;
    bool chunked;        /* Transfer-Encoding: chunked instead of Content-Length */
    unsigned timeout_ms; /* 0: 10000 */
} h_req;

/* Always returns a response (status 0 on transport failure); caller owns. */
h_resp *h_request(const h_server *s, const h_req *req);
/* Same against any port on 127.0.0.1 (the fake Dify, a proxy...). */
h_resp *h_request_port(uint16_t port, const h_req *req);
h_resp *h_get(const h_server *s, const char *path);
/* POST body (a C string) with extra headers, NULL-terminated. */
h_resp *h_post(const h_server *s, const char *path, const char *body, ...)
    __attribute__((sentinel));
/* POST to H_WEBHOOK, application/json, signed now with the server's secret. */
h_resp *h_post_signed(const h_server *s, const char *body);
/* Same with a chosen timestamp and secret. */
h_resp *h_post_signed_at(const h_server *s, const char *body, int64_t ts, const char *secret);
void h_resp_free(h_resp *r); /* accepts NULL */

/* Value of a response header (case-insensitive name), borrowed, or NULL. */
const char *h_resp_header(const h_resp *r, const char *name);
/* The "error" member of a JSON error body, borrowed, or NULL. */
const char *h_resp_error(const h_resp *r);

/* A raw TCP connection to 127.0.0.1:port, for requests sent in pieces:
 * the descriptor (caller closes), or -1. Reads time out after timeout_ms. */
int h_connect(uint16_t port, unsigned timeout_ms);
/* Writes all len bytes of data: 0, or -1. */
int h_send_all(int fd, const char *data, size_t len);
/* Everything read until the peer closes, or up to the read timeout; caller
 * owns, NUL-terminated, never NULL. */
char *h_recv_all(int fd);
/* One response head: read up to its blank line (or the read timeout), and
 * no further; caller owns, never NULL. For interim answers (100 Continue). */
char *h_recv_head(int fd);

/* "sha256=<64 hex>" = HMAC-SHA256(secret, "<ts>.<body>"); caller owns. */
char *h_sign(const char *body, size_t len, int64_t ts, const char *secret);

/* ---- events and waiting ------------------------------------------------- */

/* One Amplitude event as a JSON string: event_type, user_id (may be NULL:
 * then a device_id is set), insert_id (may be NULL), time = now in ms, a
 * small event_properties object. Caller owns. */
char *h_event(const char *event_type, const char *user_id, const char *insert_id);

/* The niceness of process pid (getpriority); INT_MIN when it cannot be
 * read. */
int h_nice(int pid);

/* Waits (at most 5 s: threads name themselves and set their priority as
 * they start) until process pid has count threads named name (comm; any
 * number, but at least one, when count is 0) and every one has niceness
 * want. false when it did not happen; why then says what was found. */
bool h_wait_nice(int pid, const char *name, size_t count, int want, char *why, size_t whylen);

void h_sleep_ms(unsigned ms);
int64_t h_mono_ms(void);

#endif
