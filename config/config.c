#include "config.h"

#include <arpa/inet.h>
#include <errno.h>
#include <jansson.h>
#include <math.h>
#include <netdb.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define DEFAULT_CONFIG_PATH "./amp2dify.json"
#define MAX_SECRET_FILE 65536

const char *amp_config_default_path(const char *from_cli) {
    if (from_cli && *from_cli)
        return from_cli;
    const char *env = getenv("AMP2DIFY_CONFIG");
    if (env && *env)
        return env;
    return DEFAULT_CONFIG_PATH;
}

/* ---- schema helpers ---------------------------------------------------- */

/* Each helper reads one optional key of obj. A missing key keeps *out (the
 * default); a present key of the wrong type or range is an error at
 * "<path>.<key>". */

static char *key_path(const char *path, const char *key) {
    return *path ? amp_xasprintf("%s.%s", path, key) : amp_xstrdup(key);
}

static void reject_unknown(const json_t *obj, const char *path, const char *const *allowed,
                           amp_errs *errs) {
    const char *key;
    json_t *val;
    json_object_foreach((json_t *)obj, key, val) {
        int known = 0;
        for (const char *const *a = allowed; *a; a++)
            known |= strcmp(*a, key) == 0;
        if (known)
            continue;
        char list[512] = "";
        size_t off = 0;
        for (const char *const *a = allowed; *a && off < sizeof list; a++)
            off += (size_t)snprintf(list + off, sizeof list - off, "%s%s", a == allowed ? "" : ", ",
                                    *a);
        char *kp = key_path(path, key);
        amp_errs_add(errs, kp, "unknown key; expected one of %s", list);
        free(kp);
    }
}

static const char *json_type_name(const json_t *v) {
    switch (json_typeof(v)) {
    case JSON_OBJECT:
        return "an object";
    case JSON_ARRAY:
        return "an array";
    case JSON_STRING:
        return "a string";
    case JSON_INTEGER:
        return "an integer";
    case JSON_REAL:
        return "a number";
    case JSON_TRUE:
    case JSON_FALSE:
        return "a boolean";
    case JSON_NULL:
        return "null";
    }
    return "a value";
}

/* Returns the section object (borrowed) or NULL when absent or invalid. */
static const json_t *get_object(const json_t *obj, const char *key, const char *path,
                                amp_errs *errs) {
    const json_t *v = json_object_get(obj, key);
    if (!v)
        return NULL;
    if (!json_is_object(v)) {
        char *kp = key_path(path, key);
        amp_errs_add(errs, kp, "found %s; expected an object", json_type_name(v));
        free(kp);
        return NULL;
    }
    return v;
}

static void get_string(const json_t *obj, const char *key, const char *path, amp_errs *errs,
                       char **out) {
    const json_t *v = json_object_get(obj, key);
    if (!v)
        return;
    if (!json_is_string(v) || json_string_length(v) == 0 ||
        strlen(json_string_value(v)) != json_string_length(v)) {
        char *kp = key_path(path, key);
        amp_errs_add(errs, kp, "found %s; expected a non-empty string",
                     json_is_string(v) ? "an empty string" : json_type_name(v));
        free(kp);
        return;
    }
    free(*out);
    *out = amp_xstrdup(json_string_value(v));
}

static void get_int(const json_t *obj, const char *key, const char *path, int64_t min, int64_t max,
                    amp_errs *errs, int64_t *out) {
    const json_t *v = json_object_get(obj, key);
    if (!v)
        return;
    if (!json_is_integer(v) || json_integer_value(v) < min || json_integer_value(v) > max) {
        char *kp = key_path(path, key);
        if (json_is_integer(v))
            amp_errs_add(errs, kp, "found %lld; expected an integer from %lld to %lld",
                         (long long)json_integer_value(v), (long long)min, (long long)max);
        else
            amp_errs_add(errs, kp, "found %s; expected an integer from %lld to %lld",
                         json_type_name(v), (long long)min, (long long)max);
        free(kp);
        return;
    }
    *out = json_integer_value(v);
}

static void get_uint(const json_t *obj, const char *key, const char *path, unsigned min,
                     unsigned max, amp_errs *errs, unsigned *out) {
    int64_t v = *out;
    get_int(obj, key, path, min, max, errs, &v);
    *out = (unsigned)v;
}

static void get_bool(const json_t *obj, const char *key, const char *path, amp_errs *errs,
                     bool *out) {
    const json_t *v = json_object_get(obj, key);
    if (!v)
        return;
    if (!json_is_boolean(v)) {
        char *kp = key_path(path, key);
        amp_errs_add(errs, kp, "found %s; expected true or false", json_type_name(v));
        free(kp);
        return;
    }
    *out = json_is_true(v);
}

/* "a.b.c.d/n" or "a:b::c/n"; a bare address means one host. */
static int valid_cidr(const char *s) {
    char addr[INET6_ADDRSTRLEN + 1];
    const char *slash = strchr(s, '/');
    size_t alen = slash ? (size_t)(slash - s) : strlen(s);
    if (alen == 0 || alen >= sizeof addr)
        return 0;
    memcpy(addr, s, alen);
    addr[alen] = '\0';
    unsigned char buf[16];
    int max_bits;
    if (inet_pton(AF_INET, addr, buf) == 1)
        max_bits = 32;
    else if (inet_pton(AF_INET6, addr, buf) == 1)
        max_bits = 128;
    else
        return 0;
    if (!slash)
        return 1;
    int64_t bits;
    return amp_parse_i64(slash + 1, strlen(slash + 1), 0, max_bits, &bits) == 0;
}

int amp_config_listen_addr(const char *address, uint16_t port, struct sockaddr_storage *ss,
                           char *err, size_t errlen) {
    struct addrinfo hints = {.ai_flags = AI_NUMERICHOST | AI_NUMERICSERV | AI_PASSIVE,
                             .ai_socktype = SOCK_STREAM};
    struct addrinfo *ai = NULL;
    char service[8];
    snprintf(service, sizeof service, "%u", (unsigned)port);
    const char *host = strcmp(address, "localhost") == 0 ? "127.0.0.1" : address;
    int rc = getaddrinfo(host, service, &hints, &ai);
    if (rc != 0 || !ai) {
        snprintf(err, errlen,
                 "'%s' is not a numeric IPv4 or IPv6 address or localhost (names are not "
                 "looked up)",
                 address);
        return -1;
    }
    memcpy(ss, ai->ai_addr, ai->ai_addrlen);
    freeaddrinfo(ai);
    return 0;
}

/* path: the address was found in the config (listen.address) or in
 * AMP2DIFY_LISTEN. */
static void check_listen_addr(const amp_config *c, const char *path, amp_errs *errs) {
    struct sockaddr_storage ss;
    char err[256];
    if (amp_config_listen_addr(c->listen.address, c->listen.port, &ss, err, sizeof err) != 0)
        amp_errs_add(errs, path, "%s", err);
}

/* ---- sections ----------------------------------------------------------- */

static void load_listen(amp_config *c, const json_t *root, amp_errs *errs) {
    static const char *const keys[] = {"address",
                                       "port",
                                       "path",
                                       "max_body_bytes",
                                       "max_events_per_request",
                                       "threads",
                                       "connection_limit",
                                       "per_ip_connection_limit",
                                       "connection_timeout_seconds",
                                       "trusted_proxies",
                                       NULL};
    const json_t *o = get_object(root, "listen", "", errs);
    if (!o)
        return;
    reject_unknown(o, "listen", keys, errs);
    get_string(o, "address", "listen", errs, &c->listen.address);
    int64_t port = c->listen.port;
    get_int(o, "port", "listen", 0, 65535, errs, &port);
    c->listen.port = (uint16_t)port;
    check_listen_addr(c, "listen.address", errs);
    get_string(o, "path", "listen", errs, &c->listen.path);
    if (c->listen.path[0] != '/')
        amp_errs_add(errs, "listen.path", "'%s' must start with '/'", c->listen.path);
    int64_t max_body = (int64_t)c->listen.max_body_bytes;
    get_int(o, "max_body_bytes", "listen", 64, 64 * 1024 * 1024, errs, &max_body);
    c->listen.max_body_bytes = (size_t)max_body;
    int64_t max_events = (int64_t)c->listen.max_events;
    get_int(o, "max_events_per_request", "listen", 1, 100000, errs, &max_events);
    c->listen.max_events = (size_t)max_events;
    get_uint(o, "threads", "listen", 1, 64, errs, &c->listen.threads);
    get_uint(o, "connection_limit", "listen", 1, 65536, errs, &c->listen.connection_limit);
    get_uint(o, "per_ip_connection_limit", "listen", 0, 65536, errs,
             &c->listen.per_ip_connection_limit);
    get_uint(o, "connection_timeout_seconds", "listen", 1, 3600, errs,
             &c->listen.connection_timeout_s);

    const json_t *tp = json_object_get(o, "trusted_proxies");
    if (!tp)
        return;
    if (!json_is_array(tp)) {
        amp_errs_add(errs, "listen.trusted_proxies", "found %s; expected an array of CIDR strings",
                     json_type_name(tp));
        return;
    }
    for (size_t i = 0; i < c->listen.ntrusted_proxies; i++)
        free(c->listen.trusted_proxies[i]);
    free(c->listen.trusted_proxies);
    c->listen.trusted_proxies = amp_xcalloc(json_array_size(tp) + 1, sizeof(char *));
    c->listen.ntrusted_proxies = 0;
    size_t i;
    json_t *v;
    json_array_foreach(tp, i, v) {
        if (!json_is_string(v) || !valid_cidr(json_string_value(v))) {
            char p[64];
            snprintf(p, sizeof p, "listen.trusted_proxies[%zu]", i);
            amp_errs_add(errs, p, "found %s; expected an address or CIDR like \"10.0.0.0/8\"",
                         json_is_string(v) ? "an invalid address" : json_type_name(v));
            continue;
        }
        c->listen.trusted_proxies[c->listen.ntrusted_proxies++] = amp_xstrdup(json_string_value(v));
    }
}

static void load_auth(amp_config *c, const json_t *root, amp_errs *errs) {
    static const char *const keys[] = {"scheme", "tolerance_seconds", "header",
                                       "allow_unauthenticated", NULL};
    const json_t *o = get_object(root, "auth", "", errs);
    if (!o)
        return;
    reject_unknown(o, "auth", keys, errs);
    char *scheme = NULL;
    get_string(o, "scheme", "auth", errs, &scheme);
    if (scheme && amp_sig_parse_scheme(scheme, &c->auth.scheme) != 0)
        amp_errs_add(errs, "auth.scheme",
                     "unknown scheme '%s'; expected one of amplitude-hmac, static-header, "
                     "standard-webhooks, none",
                     scheme);
    free(scheme);
    get_int(o, "tolerance_seconds", "auth", 1, 86400, errs, &c->auth.tolerance_s);
    get_string(o, "header", "auth", errs, &c->auth.header);
    get_bool(o, "allow_unauthenticated", "auth", errs, &c->auth.allow_unauthenticated);
    if (c->auth.scheme == AMP_AUTH_NONE && !c->auth.allow_unauthenticated)
        amp_errs_add(errs, "auth.scheme",
                     "'none' accepts unsigned requests; it needs \"allow_unauthenticated\": true");
}

/* spool.max_bytes, when set: an empty spool's schema alone takes tens of
 * kilobytes, so a smaller limit would refuse everything from the start. */
#define SPOOL_MIN_BYTES (1 << 20)

static void load_spool(amp_config *c, const json_t *root, amp_errs *errs) {
    static const char *const keys[] = {
        "path", "dedupe_window_seconds", "max_pending", "max_bytes", "retention_seconds",
        "sync", "lock_timeout_ms",       NULL};
    const json_t *o = get_object(root, "spool", "", errs);
    if (!o)
        return;
    reject_unknown(o, "spool", keys, errs);
    get_string(o, "path", "spool", errs, &c->spool.path);
    get_int(o, "dedupe_window_seconds", "spool", 0, 10LL * 365 * 86400, errs,
            &c->spool.dedupe_window_s);
    get_int(o, "max_pending", "spool", 0, INT64_MAX, errs, &c->spool.max_pending);
    get_int(o, "max_bytes", "spool", 0, INT64_MAX, errs, &c->spool.max_bytes);
    if (c->spool.max_bytes > 0 && c->spool.max_bytes < SPOOL_MIN_BYTES)
        amp_errs_add(errs, "spool.max_bytes", "found %lld; expected 0 (no limit) or at least %d",
                     (long long)c->spool.max_bytes, SPOOL_MIN_BYTES);
    get_int(o, "retention_seconds", "spool", 0, 10LL * 365 * 86400, errs, &c->spool.retention_s);
    get_int(o, "lock_timeout_ms", "spool", 1, 600000, errs, &c->spool.lock_timeout_ms);
    char *sync = NULL;
    get_string(o, "sync", "spool", errs, &sync);
    if (sync && strcmp(sync, "full") != 0 && strcmp(sync, "normal") != 0)
        amp_errs_add(errs, "spool.sync", "found '%s'; expected \"full\" or \"normal\"", sync);
    c->spool.sync_normal = sync && strcmp(sync, "normal") == 0;
    free(sync);
}

static void load_dify(amp_config *c, const json_t *root, amp_errs *errs) {
    static const char *const keys[] = {"base_url", "timeout_seconds", "connect_timeout_seconds",
                                       "workers",  "retry",           NULL};
    static const char *const retry_keys[] = {"initial_ms", "max_ms", "max_age_seconds", NULL};
    const json_t *o = get_object(root, "dify", "", errs);
    if (!o)
        return;
    reject_unknown(o, "dify", keys, errs);
    get_string(o, "base_url", "dify", errs, &c->dify.base_url);
    get_uint(o, "timeout_seconds", "dify", 1, 1200, errs, &c->dify.timeout_s);
    get_uint(o, "connect_timeout_seconds", "dify", 1, 300, errs, &c->dify.connect_timeout_s);
    get_uint(o, "workers", "dify", 1, 1024, errs, &c->dify.workers);
    const json_t *r = get_object(o, "retry", "dify", errs);
    if (!r)
        return;
    reject_unknown(r, "dify.retry", retry_keys, errs);
    get_int(r, "initial_ms", "dify.retry", 1, 3600000, errs, &c->dify.retry_initial_ms);
    get_int(r, "max_ms", "dify.retry", 1, 86400000, errs, &c->dify.retry_max_ms);
    get_int(r, "max_age_seconds", "dify.retry", 1, 30LL * 86400, errs, &c->dify.retry_max_age_s);
}

static void load_log(amp_config *c, const json_t *root, amp_errs *errs) {
    static const char *const keys[] = {"level", NULL};
    const json_t *o = get_object(root, "log", "", errs);
    if (!o)
        return;
    reject_unknown(o, "log", keys, errs);
    char *level = NULL;
    get_string(o, "level", "log", errs, &level);
    if (level && amp_log_parse_level(level, &c->log_level) != 0)
        amp_errs_add(errs, "log.level", "unknown level '%s'; expected debug, info, warn or error",
                     level);
    free(level);
}

static void check_base_url(const char *url, const char *where, amp_errs *errs) {
    if (strncmp(url, "http://", 7) != 0 && strncmp(url, "https://", 8) != 0)
        amp_errs_add(errs, where, "'%s' is not an http:// or https:// URL", url);
}

/* ---- environment ------------------------------------------------------- */

static char *read_secret_file(const char *file, const char *what, const char *path,
                              amp_errs *errs) {
    FILE *f = fopen(file, "rb");
    if (!f) {
        amp_errs_add(errs, path, "cannot read %s file '%s': %s", what, file, strerror(errno));
        return NULL;
    }
    amp_buf b;
    amp_buf_init(&b, MAX_SECRET_FILE);
    int rc = amp_buf_read(&b, f);
    fclose(f);
    if (rc != 0) {
        amp_errs_add(errs, path, "cannot read %s file '%s': %s", what, file,
                     rc == -1 ? "larger than 64 KiB" : "read error");
        amp_buf_free(&b);
        return NULL;
    }
    if (b.len > 0 && b.data[b.len - 1] == '\n')
        b.data[--b.len] = '\0';
    if (b.len > 0 && b.data[b.len - 1] == '\r')
        b.data[--b.len] = '\0';
    if (b.len == 0) {
        amp_errs_add(errs, path, "%s file '%s' is empty", what, file);
        amp_buf_free(&b);
        return NULL;
    }
    return b.data;
}

int amp_config_secret_from_env(const char *name, char **out, const char *path, amp_errs *errs) {
    char file_var[256];
    snprintf(file_var, sizeof file_var, "%s_FILE", name);
    const char *direct = getenv(name);
    const char *file = getenv(file_var);
    if (direct && !*direct)
        direct = NULL;
    if (file && !*file)
        file = NULL;
    if (direct && file) {
        amp_errs_add(errs, path, "both %s and %s are set; set only one", name, file_var);
        return -1;
    }
    if (direct) {
        *out = amp_xstrdup(direct);
        return 0;
    }
    if (!file)
        return 1;
    *out = read_secret_file(file, file_var, path, errs);
    return *out ? 0 : -1;
}

/* "host:port", "[v6]:port" */
static void apply_listen_env(amp_config *c, amp_errs *errs) {
    const char *v = getenv("AMP2DIFY_LISTEN");
    if (!v || !*v)
        return;
    const char *colon = strrchr(v, ':');
    int64_t port;
    if (!colon || amp_parse_i64(colon + 1, strlen(colon + 1), 0, 65535, &port)) {
        amp_errs_add(errs, "AMP2DIFY_LISTEN", "'%s' is not host:port", v);
        return;
    }
    const char *host = v;
    size_t hlen = (size_t)(colon - v);
    if (host[0] == '[' && hlen >= 2 && host[hlen - 1] == ']') {
        host++;
        hlen -= 2;
    }
    free(c->listen.address);
    c->listen.address = hlen ? amp_xstrndup(host, hlen) : amp_xstrdup("0.0.0.0"); /* ":8080" */
    c->listen.port = (uint16_t)port;
    check_listen_addr(c, "AMP2DIFY_LISTEN", errs);
}

static void apply_env(amp_config *c, amp_errs *errs) {
    apply_listen_env(c, errs);
    const char *v;
    if ((v = getenv("AMP2DIFY_SPOOL")) && *v) {
        free(c->spool.path);
        c->spool.path = amp_xstrdup(v);
    }
    if ((v = getenv("DIFY_BASE_URL")) && *v) {
        free(c->dify.base_url);
        c->dify.base_url = amp_xstrdup(v);
        check_base_url(v, "DIFY_BASE_URL", errs);
    }
    if ((v = getenv("AMP2DIFY_LOG_LEVEL")) && *v && amp_log_parse_level(v, &c->log_level) != 0)
        amp_errs_add(errs, "AMP2DIFY_LOG_LEVEL",
                     "unknown level '%s'; expected debug, info, warn or error", v);
}

static bool is_blank(char ch) {
    return ch == ' ' || ch == '\t' || ch == '\n' || ch == '\r';
}

char **amp_config_split_secrets(const char *all, size_t *n) {
    size_t cap = 1;
    for (const char *p = all; *p; p++)
        cap += *p == ',';
    char **out = amp_xcalloc(cap + 1, sizeof(char *));
    *n = 0;
    for (const char *p = all; p;) {
        const char *comma = strchr(p, ',');
        const char *end = comma ? comma : p + strlen(p);
        while (p < end && is_blank(*p))
            p++;
        while (end > p && is_blank(end[-1]))
            end--;
        if (end > p)
            out[(*n)++] = amp_xstrndup(p, (size_t)(end - p));
        p = comma ? comma + 1 : NULL;
    }
    return out;
}

static void load_auth_secrets(amp_config *c, amp_errs *errs) {
    if (c->auth.scheme == AMP_AUTH_NONE)
        return;
    char *all = NULL;
    int rc = amp_config_secret_from_env("AMP2DIFY_SECRETS", &all, "AMP2DIFY_SECRETS", errs);
    if (rc < 0)
        return;
    if (rc > 0) {
        amp_errs_add(errs, "AMP2DIFY_SECRETS",
                     "not set; the %s scheme needs at least one secret "
                     "(AMP2DIFY_SECRETS or AMP2DIFY_SECRETS_FILE)",
                     amp_sig_scheme_name(c->auth.scheme));
        return;
    }
    c->auth.secrets = amp_config_split_secrets(all, &c->auth.nsecrets);
    free(all);
    if (c->auth.nsecrets == 0) {
        amp_errs_add(errs, "AMP2DIFY_SECRETS", "holds no secret");
        return;
    }
    char err[256];
    c->auth.verifier =
        amp_sig_create(c->auth.scheme, (const char *const *)c->auth.secrets, c->auth.nsecrets,
                       c->auth.tolerance_s, c->auth.header, err, sizeof err);
    if (!c->auth.verifier)
        amp_errs_add(errs, "AMP2DIFY_SECRETS", "%s", err);
}

static void load_app_keys(amp_config *c, amp_errs *errs) {
    size_t n = amp_mapper_app_count(c->mapper);
    c->api_keys = amp_xcalloc(n + 1, sizeof(char *));
    for (size_t i = 0; i < n; i++) {
        const amp_app *app = amp_mapper_app(c->mapper, i);
        char *path;
        if (app->api_key_file) {
            path = amp_xasprintf("apps.%s.api_key_file", app->name);
            c->api_keys[i] = read_secret_file(app->api_key_file, "api key", path, errs);
        } else {
            path = amp_xasprintf("apps.%s.api_key_env", app->name);
            int rc = amp_config_secret_from_env(app->api_key_env, &c->api_keys[i], path, errs);
            if (rc > 0)
                amp_errs_add(errs, path, "environment variable %s (or %s_FILE) is not set",
                             app->api_key_env, app->api_key_env);
        }
        free(path);
    }
}

/* ---- load --------------------------------------------------------------- */

static amp_config *config_defaults(const char *path) {
    amp_config *c = amp_xcalloc(1, sizeof *c);
    c->file = amp_xstrdup(path);
    c->listen.address = amp_xstrdup("0.0.0.0");
    c->listen.port = 8080;
    c->listen.path = amp_xstrdup("/webhooks/amplitude");
    c->listen.max_body_bytes = 1048576;
    c->listen.max_events = 2000;
    c->listen.threads = 2;
    c->listen.connection_limit = 1024;
    c->listen.per_ip_connection_limit = 256;
    c->listen.connection_timeout_s = 30;
    c->listen.trusted_proxies = amp_xcalloc(2, sizeof(char *));
    c->listen.trusted_proxies[0] = amp_xstrdup("127.0.0.1/32");
    c->listen.ntrusted_proxies = 1;
    c->auth.scheme = AMP_AUTH_AMPLITUDE_HMAC;
    c->auth.tolerance_s = 300;
    c->auth.header = amp_xstrdup("Authorization");
    c->spool.path = amp_xstrdup("amp2dify-spool.db");
    c->spool.dedupe_window_s = 604800;
    c->spool.max_pending = 1000000;
    c->spool.retention_s = 604800;
    c->spool.lock_timeout_ms = AMP_SPOOL_LOCK_TIMEOUT_MS;
    c->dify.base_url = amp_xstrdup("https://api.dify.ai/v1");
    c->dify.timeout_s = 120;
    c->dify.connect_timeout_s = 10;
    c->dify.workers = 16;
    c->dify.retry_initial_ms = 1000;
    c->dify.retry_max_ms = 300000;
    c->dify.retry_max_age_s = 86400;
    c->log_level = AMP_LOG_INFO;
    c->shutdown_timeout_s = 25;
    return c;
}

amp_config *amp_config_load(const char *path, unsigned flags, amp_errs *errs) {
    size_t errs_before = amp_errs_count(errs);
    json_error_t jerr;
    json_t *root = json_load_file(path, JSON_REJECT_DUPLICATES, &jerr);
    if (!root) {
        if (jerr.line <= 0)
            amp_errs_add(errs, "", "%s", jerr.text);
        else
            amp_errs_add(errs, "", "line %d, column %d: %s", jerr.line, jerr.column, jerr.text);
        return NULL;
    }
    if (!json_is_object(root)) {
        amp_errs_add(errs, "", "found %s at the top level; expected an object",
                     json_type_name(root));
        json_decref(root);
        return NULL;
    }

    static const char *const keys[] = {"listen", "auth",   "spool", "dify",
                                       "apps",   "routes", "log",   "shutdown_timeout_seconds",
                                       NULL};
    amp_config *c = config_defaults(path);
    reject_unknown(root, "", keys, errs);
    load_listen(c, root, errs);
    load_auth(c, root, errs);
    load_spool(c, root, errs);
    load_dify(c, root, errs);
    load_log(c, root, errs);
    get_uint(root, "shutdown_timeout_seconds", "", 2, 3600, errs, &c->shutdown_timeout_s);
    check_base_url(c->dify.base_url, "dify.base_url", errs);
    if (c->dify.retry_max_ms < c->dify.retry_initial_ms)
        amp_errs_add(errs, "dify.retry.max_ms", "%lld is below initial_ms %lld",
                     (long long)c->dify.retry_max_ms, (long long)c->dify.retry_initial_ms);

    const json_t *apps = json_object_get(root, "apps");
    const json_t *routes = json_object_get(root, "routes");
    if (!apps)
        amp_errs_add(errs, "apps", "missing; expected an object of Dify apps");
    if (!routes)
        amp_errs_add(errs, "routes", "missing; expected an array of routes");
    if (apps && routes)
        c->mapper = amp_mapper_compile(apps, routes, errs);
    json_decref(root);

    apply_env(c, errs);
    /* The auth secrets are checked even when the routes did not compile,
     * so that check-config prints every error at once. */
    if (flags & AMP_CONFIG_SECRETS) {
        load_auth_secrets(c, errs);
        if (c->mapper)
            load_app_keys(c, errs);
    }

    if (amp_errs_count(errs) > errs_before) {
        amp_config_destroy(c);
        return NULL;
    }
    return c;
}

amp_spool_opts amp_config_spool_opts(const amp_config *c) {
    return (amp_spool_opts){.path = c->spool.path,
                            .dedupe_window_s = c->spool.dedupe_window_s,
                            .max_pending = c->spool.max_pending,
                            .max_bytes = c->spool.max_bytes,
                            .retention_s = c->spool.retention_s,
                            .sync_normal = c->spool.sync_normal,
                            .lock_timeout_ms = c->spool.lock_timeout_ms};
}

static void free_strv(char **v, size_t n) {
    if (!v)
        return;
    for (size_t i = 0; i < n; i++)
        free(v[i]);
    free(v);
}

void amp_config_destroy(amp_config *c) {
    if (!c)
        return;
    free(c->file);
    free(c->listen.address);
    free(c->listen.path);
    free_strv(c->listen.trusted_proxies, c->listen.ntrusted_proxies);
    free(c->auth.header);
    free_strv(c->auth.secrets, c->auth.nsecrets);
    amp_sig_destroy(c->auth.verifier);
    free(c->spool.path);
    free(c->dify.base_url);
    if (c->api_keys) {
        size_t n = c->mapper ? amp_mapper_app_count(c->mapper) : 0;
        free_strv(c->api_keys, n);
    }
    amp_mapper_destroy(c->mapper);
    free(c);
}
