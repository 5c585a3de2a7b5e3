/*
 * config — the JSON config file (SPEC "Config file") plus the environment
 * overrides (SPEC "Environment"), parsed once into a read-only struct.
 *
 * Every key is a row of one table (amp_config_schema), read by the schema
 * walker of json/schema.h: unknown keys, wrong types and out-of-range values
 * are errors "json.path: found X; expected Y"; every error is collected, not
 * only the first. Secrets come only
 * from the environment or from files (*_FILE variables, api_key_file) and
 * never appear in error messages.
 *
 * Threading: an amp_config is immutable after amp_config_load; share it
 * freely, destroy it once nothing uses it.
 */
#ifndef AMP_CONFIG_H
#define AMP_CONFIG_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "../crypto/sig.h"
#include "../json/schema.h"
#include "../mapping/mapping.h"
#include "../spool/spool.h"
#include "../base/log.h"
#include "../base/errs.h"

/* queue.engine: where events wait for delivery. */
typedef enum {
    AMP_CONFIG_QUEUE_SQLITE, /* the embedded spool (spool/) */
    AMP_CONFIG_QUEUE_REDIS,  /* Redis Streams, shared by replicas (redisq/) */
} amp_config_queue_engine;

/* listen.event_loop: how the HTTP threads wait for their connections. epoll
 * costs two epoll_ctl calls per stored request (libmicrohttpd takes a
 * suspended connection out of the set and puts it back); poll costs a scan
 * of every open connection per wakeup. */
typedef enum {
    AMP_CONFIG_EVENT_LOOP_EPOLL,
    AMP_CONFIG_EVENT_LOOP_POLL,
} amp_config_event_loop;

/* dify.validate: what start and SIGHUP do when an app does not fit its
 * routes (GET /info, /parameters): log a warning, refuse, or not ask. An
 * unreachable Dify is a warning in every case. */
typedef enum {
    AMP_CONFIG_VALIDATE_WARN,
    AMP_CONFIG_VALIDATE_STRICT,
    AMP_CONFIG_VALIDATE_OFF,
} amp_config_validate;

typedef struct amp_config {
    char *file; /* the path it was loaded from */
    struct {
        char *address; /* numeric IPv4/IPv6, or "localhost"; see amp_config_listen_addr */
        uint16_t port;
        char *path;
        size_t max_body_bytes;
        size_t max_events; /* per request */
        unsigned threads;
        amp_config_event_loop event_loop;
        unsigned connection_limit;
        unsigned per_ip_connection_limit; /* 0 = unlimited */
        unsigned connection_timeout_s;
        unsigned header_timeout_s; /* a request's headers, from the connection's idle start */
        unsigned body_timeout_s;   /* its body, from the end of its headers */
        size_t max_header_bytes;
        char **trusted_proxies;
        size_t ntrusted_proxies;
    } listen;
    struct {
        amp_auth_scheme scheme;
        int64_t tolerance_s;
        char *header; /* static-header: header name */
        bool allow_unauthenticated;
        char **secrets; /* from AMP2DIFY_SECRETS / AMP2DIFY_SECRETS_FILE */
        size_t nsecrets;
        amp_sig *verifier; /* built when secrets are resolved, else NULL */
    } auth;
    struct {
        char *listen;  /* admin.listen: NULL or "" when the admin API is off */
        char *address; /* listen split: host (NULL when off) */
        uint16_t port; /* and port */
        char *token;   /* AMP2DIFY_ADMIN_TOKEN(_FILE), read with the secrets when listen is set */
        amp_sig *verifier; /* checks "Authorization: Bearer <token>"; built with the token */
    } admin;
    struct {
        amp_config_queue_engine engine;
        char *url;                  /* redis engine: redis://[:password@]host[:port][/db] */
        int64_t shards;             /* redis engine: hash(app, user) mod shards */
        int64_t lease_ms;           /* redis engine: a shard's lease */
        bool allow_weak_durability; /* redis engine: accept appendfsync other than always */
    } queue;
    struct {
        char *path;
        int64_t dedupe_window_s;
        int64_t max_pending;
        int64_t max_bytes; /* 0: no limit */
        int64_t retention_s;
        int64_t lock_timeout_ms;
        bool sync_normal;
    } spool;
    struct {
        char *base_url;
        unsigned timeout_s;
        unsigned connect_timeout_s;
        unsigned workers;
        unsigned nice; /* added to the delivery threads' niceness */
        int64_t retry_initial_ms;
        int64_t retry_max_ms;
        int64_t retry_max_age_s;
        amp_config_validate validate; /* dify.validate: the apps checked against Dify */
    } dify;
    struct {
        char *base_url;        /* Amplitude's HTTP V2 host: POST {base_url}/2/httpapi */
        unsigned batch_events; /* events per request, 1..2000 */
        unsigned linger_ms;    /* how long a batch waits to fill */
        unsigned throttle_ms;  /* how long a throttled user's or device's reports wait */
        char *api_key;         /* AMPLITUDE_API_KEY(_FILE), when resolved and a route reports */
    } reports;
    struct {
        struct {
            bool enabled; /* poll on a schedule in serve */
            char *base_url;
            char *project;    /* names the cursor file */
            char *cursor_dir; /* NULL or "": the spool's directory */
            char *start;      /* "YYYY-MM-DDTHH"; NULL or "": none */
            unsigned lag_hours;
            unsigned interval_s;
            unsigned hours_per_request;
            int64_t min_request_interval_ms;
            unsigned timeout_s;
            int64_t retry_initial_ms;
            unsigned max_attempts;
            unsigned batch_events;
            char *api_key;    /* AMPLITUDE_API_KEY(_FILE), when resolved */
            char *secret_key; /* AMPLITUDE_SECRET_KEY(_FILE), when resolved */
        } export;
        struct {
            bool enabled; /* the SDK-compatible endpoint */
            char *path;
            char **api_keys; /* AMP2DIFY_SDK_API_KEYS(_FILE), when resolved */
            size_t napi_keys;
            bool tee; /* accepted events are also sent on to Amplitude (reports.*) */
        } sdk;
    } sources;
    amp_log_level log_level;
    unsigned shutdown_timeout_s; /* SIGTERM to exit, at most */
    amp_mapper *mapper;
    char **api_keys; /* parallel to the mapper's apps; entries NULL unless secrets resolved */
} amp_config;

enum {
    /* Resolve and require secrets: AMP2DIFY_SECRETS for the auth scheme and
     * every app's key. Without it (e.g. `map`), secrets are not read. */
    AMP_CONFIG_SECRETS = 1 << 0,
    /* Resolve and require the Export API keys (AMPLITUDE_API_KEY and
     * AMPLITUDE_SECRET_KEY) even when sources.export.enabled is false: the
     * export command. (With AMP_CONFIG_SECRETS they are read when it is
     * true.) */
    AMP_CONFIG_EXPORT_SECRETS = 1 << 1,
};

/* Config path from -c, else $AMP2DIFY_CONFIG, else "./amp2dify.json". */
const char *amp_config_default_path(const char *from_cli);

/* Load, validate and apply the environment. NULL when errs got any entry
 * (caller owns errs). Caller owns the result. */
amp_config *amp_config_load(const char *path, unsigned flags, amp_errs *errs);
void amp_config_destroy(amp_config *c); /* accepts NULL */

/* The table of every config file key (static, ended by a NULL key): type,
 * range, default, environment variable and reload class. apps and routes
 * are compiled by the mapper from its own tables. */
const amp_json_schema_row *amp_config_schema(void);

/* How a running server takes b in place of a: the strongest reload class
 * among the keys that differ (apps compared app by app, keys included), 0
 * when none does. *first_key (may be NULL) is the first such key of that
 * class ("listen.threads", "apps"), static, NULL when none. */
amp_json_schema_reload amp_config_diff(const amp_config *a, const amp_config *b,
                                       const char **first_key);

/* The export cursor file of a loaded config (caller owns):
 * "<dir>/<spool file name>.export-<project>[-<suffix>].cursor", dir being
 * sources.export.cursor_dir or the spool's directory. suffix may be NULL. */
char *amp_config_export_cursor(const amp_config *c, const char *suffix);

/* The spool options of a loaded config (strings borrowed from c). */
amp_spool_opts amp_config_spool_opts(const amp_config *c);

/* Read a secret from $name, else from the file named by $name_FILE (one
 * trailing newline stripped). 0 and *out (caller owns) on success; 1 when
 * neither is set; -1 with a message in errs (under path) when the file
 * cannot be read or both are set. */
int amp_config_secret_from_env(const char *name, char **out, const char *path, amp_errs *errs);

/* The socket address to listen on: listen.address, a numeric IPv4 or IPv6
 * address (no name lookups at start), or "localhost" for 127.0.0.1, with
 * listen.port. 0; -1 with a message in err (naming neither path nor
 * variable: the caller knows which). */
struct sockaddr_storage;
int amp_config_listen_addr(const char *address, uint16_t port, struct sockaddr_storage *ss,
                           char *err, size_t errlen);

/* A secrets list as AMP2DIFY_SECRETS holds it: comma-separated, blanks
 * around each entry trimmed, empty entries skipped. A NULL-terminated
 * array of *n strings; caller owns the array and each string. */
char **amp_config_split_secrets(const char *all, size_t *n);

#endif
