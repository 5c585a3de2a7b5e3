#include "config.h"
#include "../base/alloc.h"
#include "../base/buf.h"
#include "../base/errs.h"
#include "../base/parse.h"

#include <arpa/inet.h>
#include <errno.h>
#include <jansson.h>
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

/* ---- checks attached to rows ------------------------------------------- */

/* "a.b.c.d/n" or "a:b::c/n"; a bare address means one host. */
static bool valid_cidr(const char *s) {
    char addr[INET6_ADDRSTRLEN + 1];
    const char *slash = strchr(s, '/');
    size_t alen = slash ? (size_t)(slash - s) : strlen(s);
    if (alen == 0 || alen >= sizeof addr)
        return false;
    memcpy(addr, s, alen);
    addr[alen] = '\0';
    unsigned char buf[16];
    int max_bits;
    if (inet_pton(AF_INET, addr, buf) == 1)
        max_bits = 32;
    else if (inet_pton(AF_INET6, addr, buf) == 1)
        max_bits = 128;
    else
        return false;
    if (!slash)
        return true;
    int64_t bits;
    return amp_parse_i64(slash + 1, strlen(slash + 1), 0, max_bits, &bits) == 0;
}

#define LISTEN_ADDRESS_EXPECT                                                                      \
    "a numeric IPv4 or IPv6 address or localhost (names are not looked up)"

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
        snprintf(err, errlen, "found '%s'; expected " LISTEN_ADDRESS_EXPECT, address);
        return -1;
    }
    memcpy(ss, ai->ai_addr, ai->ai_addrlen);
    freeaddrinfo(ai);
    return 0;
}

static bool valid_listen_address(const char *s) {
    struct sockaddr_storage ss;
    char err[256];
    return amp_config_listen_addr(s, 0, &ss, err, sizeof err) == 0;
}

static bool valid_url_path(const char *s) {
    return s[0] == '/';
}

static bool valid_base_url(const char *s) {
    return strncmp(s, "http://", 7) == 0 || strncmp(s, "https://", 8) == 0;
}

/* The URL is parsed when the queue opens; here only its form. */
static bool valid_redis_url(const char *s) {
    return strncmp(s, "redis://", 8) == 0 && s[8] != 0;
}

#define HOSTPORT_EXPECT "host:port, [v6]:port or :port"

/* "host:port", "[v6]:port" or ":port" (every IPv4 address) into *address
 * (caller owns) and *port. 0; -1 when it is not of that form; -2 when the
 * host is not an address listen.address accepts (*address then set). */
static int split_hostport(const char *v, char **address, uint16_t *port) {
    const char *colon = strrchr(v, ':');
    int64_t p;
    *address = NULL;
    if (!colon || amp_parse_i64(colon + 1, strlen(colon + 1), 0, 65535, &p))
        return -1;
    const char *host = v;
    size_t hlen = (size_t)(colon - v);
    if (host[0] == '[' && hlen >= 2 && host[hlen - 1] == ']') {
        host++;
        hlen -= 2;
    }
    *address = hlen ? amp_xstrndup(host, hlen) : amp_xstrdup("0.0.0.0");
    *port = (uint16_t)p;
    return valid_listen_address(*address) ? 0 : -2;
}

/* AMP2DIFY_LISTEN: listen.address and listen.port at once. */
static int listen_env(const amp_json_schema_at *at, const char *v) {
    amp_config *c = at->target;
    char *address;
    uint16_t port;
    int rc = split_hostport(v, &address, &port);
    if (rc != 0) {
        char *found = amp_xasprintf("'%s'", rc == -1 ? v : address);
        amp_json_schema_error(at->errs, at->path, found,
                              rc == -1 ? HOSTPORT_EXPECT : LISTEN_ADDRESS_EXPECT);
        free(found);
        free(address);
        return -1;
    }
    free(c->listen.address);
    c->listen.address = address;
    c->listen.port = port;
    return 0;
}

/* admin.listen: "" (off) or host:port, the address as listen.address. */
static bool valid_admin_listen(const char *v) {
    char *address;
    uint16_t port;
    int rc = v[0] ? split_hostport(v, &address, &port) : 0;
    if (v[0])
        free(address);
    return rc == 0;
}

/* auth.scheme none only with allow_unauthenticated (read after scheme). */
static void check_unauthenticated(const amp_json_schema_at *at) {
    const amp_config *c = at->target;
    if (c->auth.scheme == AMP_AUTH_NONE && !c->auth.allow_unauthenticated)
        amp_json_schema_error(at->errs, "auth.scheme", "'none', which accepts unsigned requests",
                              "it beside \"allow_unauthenticated\": true");
}

/* spool.max_bytes, when set: an empty spool's schema alone takes tens of
 * kilobytes, so a smaller limit would refuse everything from the start. */
#define SPOOL_MIN_BYTES (1 << 20)

static void check_max_bytes(const amp_json_schema_at *at) {
    const amp_config *c = at->target;
    if (c->spool.max_bytes > 0 && c->spool.max_bytes < SPOOL_MIN_BYTES) {
        char found[32];
        snprintf(found, sizeof found, "%lld", (long long)c->spool.max_bytes);
        amp_json_schema_error(at->errs, at->path, found, "0 (no limit) or at least %d",
                              SPOOL_MIN_BYTES);
    }
}

static void check_retry_max(const amp_json_schema_at *at) {
    const amp_config *c = at->target;
    if (c->dify.retry_max_ms < c->dify.retry_initial_ms) {
        char found[32];
        snprintf(found, sizeof found, "%lld", (long long)c->dify.retry_max_ms);
        amp_json_schema_error(at->errs, at->path, found, "at least initial_ms, %lld",
                              (long long)c->dify.retry_initial_ms);
    }
}

/* sources.sdk.path beside listen.path: one endpoint per path. */
static void check_sdk_path(const amp_json_schema_at *at) {
    const amp_config *c = at->target;
    if (c->sources.sdk.enabled && c->sources.sdk.path && c->listen.path &&
        strcmp(c->sources.sdk.path, c->listen.path) == 0) {
        char *found = amp_xasprintf("'%s', the webhook's listen.path", c->sources.sdk.path);
        amp_json_schema_error(at->errs, at->path, found, "a path of its own");
        free(found);
    }
}

/* sources.export.start: "" or an hour "YYYY-MM-DDTHH" (UTC). */
static bool valid_hour(const char *s) {
    if (!*s)
        return true;
    char iso[32];
    int64_t ms;
    if (strlen(s) != 13)
        return false;
    snprintf(iso, sizeof iso, "%s:00:00", s);
    return amp_map_time_parse(iso, strlen(iso), false, &ms) == 0 && ms >= 0;
}

/* sources.export.project: it names a file. */
static bool valid_project(const char *s) {
    if (!*s || strlen(s) > 64)
        return false;
    for (; *s; s++)
        if (!((*s >= 'a' && *s <= 'z') || (*s >= 'A' && *s <= 'Z') || (*s >= '0' && *s <= '9') ||
              *s == '-' || *s == '_'))
            return false;
    return true;
}

/* ---- the table ----------------------------------------------------------- */

/* Names in the order of their enums (the unit test checks them against
 * amp_sig_scheme_name and amp_log_parse_level). */
static const char *const scheme_names[] = {"amplitude-hmac", "static-header", "standard-webhooks",
                                           "none", NULL};
static const char *const sync_names[] = {"full", "normal", NULL};
static const char *const engine_names[] = {"sqlite", "redis", NULL};
static const char *const level_names[] = {"debug", "info", "warn", "error", NULL};
static const char *const validate_names[] = {"warn", "strict", "off", NULL};
static const char *const event_loop_names[] = {"epoll", "poll", NULL};

#define F(m) AMP_JSON_SCHEMA_FIELD(amp_config, m)
#define INT_ROW(k, lo, hi, d, cls, m)                                                              \
    .key = k, .type = AMP_JSON_SCHEMA_INT, .min = lo, .max = hi, .def = d, .reload = cls, F(m)
#define LIVE AMP_JSON_SCHEMA_LIVE
#define DELIVERY AMP_JSON_SCHEMA_RESTART_DELIVERY
#define RESTART AMP_JSON_SCHEMA_RESTART
#define STR_(x) #x
#define STR(x) STR_(x)
#define TEN_YEARS (10LL * 365 * 86400)

/* Every key of the config file. A new key is one row here plus its use. */
static const amp_json_schema_row config_rows[] = {
    {.key = "listen.address",
     .type = AMP_JSON_SCHEMA_STRING,
     .def = "0.0.0.0",
     .env = "AMP2DIFY_LISTEN",
     .reload = RESTART,
     F(listen.address),
     .accept = valid_listen_address,
     .item_expect = LISTEN_ADDRESS_EXPECT,
     .env_set = listen_env},
    {INT_ROW("listen.port", 0, 65535, "8080", RESTART, listen.port)},
    {.key = "listen.path",
     .type = AMP_JSON_SCHEMA_STRING,
     .def = "/webhooks/amplitude",
     .reload = LIVE,
     F(listen.path),
     .accept = valid_url_path,
     .item_expect = "a path starting with '/'"},
    {INT_ROW("listen.max_body_bytes", 64, 64 * 1024 * 1024, "1048576", LIVE,
             listen.max_body_bytes)},
    {INT_ROW("listen.max_events_per_request", 1, 100000, "2000", LIVE, listen.max_events)},
    {INT_ROW("listen.threads", 1, 64, "2", RESTART, listen.threads)},
    {.key = "listen.event_loop",
     .type = AMP_JSON_SCHEMA_ENUM,
     .names = event_loop_names,
     .def = "epoll",
     .reload = RESTART,
     F(listen.event_loop)},
    {INT_ROW("listen.connection_limit", 1, 65536, "8192", RESTART, listen.connection_limit)},
    {INT_ROW("listen.per_ip_connection_limit", 0, 65536, "256", RESTART,
             listen.per_ip_connection_limit)},
    {INT_ROW("listen.connection_timeout_seconds", 1, 3600, "30", RESTART,
             listen.connection_timeout_s)},
    {INT_ROW("listen.header_timeout_seconds", 1, 3600, "10", RESTART, listen.header_timeout_s)},
    {INT_ROW("listen.body_timeout_seconds", 1, 3600, "30", RESTART, listen.body_timeout_s)},
    {INT_ROW("listen.max_header_bytes", 1024, 1024 * 1024, "16384", RESTART,
             listen.max_header_bytes)},
    {.key = "listen.trusted_proxies",
     .type = AMP_JSON_SCHEMA_STRLIST,
     .def = "127.0.0.1/32",
     .reload = LIVE,
     F(listen.trusted_proxies),
     .offset2 = offsetof(amp_config, listen.ntrusted_proxies),
     .expect = "an array of addresses or CIDRs",
     .accept = valid_cidr,
     .item_expect = "an address or CIDR like \"10.0.0.0/8\""},
    {.key = "auth.scheme",
     .type = AMP_JSON_SCHEMA_ENUM,
     .names = scheme_names,
     .def = "amplitude-hmac",
     .reload = LIVE,
     F(auth.scheme)},
    {INT_ROW("auth.tolerance_seconds", 1, 86400, "300", LIVE, auth.tolerance_s)},
    {.key = "auth.header",
     .type = AMP_JSON_SCHEMA_STRING,
     .def = "Authorization",
     .reload = LIVE,
     F(auth.header)},
    {.key = "auth.allow_unauthenticated",
     .type = AMP_JSON_SCHEMA_BOOL,
     .def = "false",
     .reload = LIVE,
     F(auth.allow_unauthenticated),
     .check = check_unauthenticated},
    {.key = "admin.listen", /* absent or "": off */
     .type = AMP_JSON_SCHEMA_STRING,
     .allow_empty = true,
     .env = "AMP2DIFY_ADMIN_LISTEN",
     .reload = RESTART,
     F(admin.listen),
     .accept = valid_admin_listen,
     .item_expect = "\"\" (off) or " HOSTPORT_EXPECT " with a numeric address"},
    {.key = "queue.engine",
     .type = AMP_JSON_SCHEMA_ENUM,
     .names = engine_names,
     .def = "sqlite",
     .reload = RESTART,
     F(queue.engine)},
    {.key = "queue.url",
     .type = AMP_JSON_SCHEMA_STRING,
     .def = "redis://127.0.0.1:6379",
     .env = "AMP2DIFY_QUEUE_URL",
     .reload = RESTART,
     F(queue.url),
     .accept = valid_redis_url,
     .item_expect = "a URL like redis://[:password@]host[:port][/db]"},
    {INT_ROW("queue.shards", 1, 1024, "64", RESTART, queue.shards)},
    {INT_ROW("queue.lease_ms", 200, 600000, "5000", RESTART, queue.lease_ms)},
    {.key = "queue.allow_weak_durability",
     .type = AMP_JSON_SCHEMA_BOOL,
     .def = "false",
     .reload = RESTART,
     F(queue.allow_weak_durability)},
    {.key = "spool.path",
     .type = AMP_JSON_SCHEMA_STRING,
     .def = "amp2dify-spool.db",
     .env = "AMP2DIFY_SPOOL",
     .reload = RESTART,
     F(spool.path)},
    {INT_ROW("spool.dedupe_window_seconds", 0, TEN_YEARS, "604800", RESTART,
             spool.dedupe_window_s)},
    {INT_ROW("spool.max_pending", 0, INT64_MAX, "1000000", RESTART, spool.max_pending)},
    {INT_ROW("spool.max_bytes", 0, INT64_MAX, "0", RESTART, spool.max_bytes),
     .check = check_max_bytes},
    {INT_ROW("spool.retention_seconds", 0, TEN_YEARS, "604800", RESTART, spool.retention_s)},
    {.key = "spool.sync",
     .type = AMP_JSON_SCHEMA_ENUM,
     .names = sync_names,
     .def = "full",
     .reload = RESTART,
     F(spool.sync_normal)},
    {INT_ROW("spool.lock_timeout_ms", 1, 600000, STR(AMP_SPOOL_LOCK_TIMEOUT_MS), RESTART,
             spool.lock_timeout_ms)},
    {.key = "dify.base_url",
     .type = AMP_JSON_SCHEMA_STRING,
     .def = "https://api.dify.ai/v1",
     .env = "DIFY_BASE_URL",
     .reload = DELIVERY,
     F(dify.base_url),
     .accept = valid_base_url,
     .item_expect = "an http:// or https:// URL"},
    {INT_ROW("dify.timeout_seconds", 1, 1200, "120", DELIVERY, dify.timeout_s)},
    {INT_ROW("dify.connect_timeout_seconds", 1, 300, "10", DELIVERY, dify.connect_timeout_s)},
    {INT_ROW("dify.workers", 1, 1024, "16", DELIVERY, dify.workers)},
    {INT_ROW("dify.nice", 0, 19, "15", DELIVERY, dify.nice)},
    {INT_ROW("dify.retry.initial_ms", 1, 3600000, "1000", DELIVERY, dify.retry_initial_ms)},
    {INT_ROW("dify.retry.max_ms", 1, 86400000, "300000", DELIVERY, dify.retry_max_ms),
     .check = check_retry_max},
    {INT_ROW("dify.retry.max_age_seconds", 1, 30LL * 86400, "86400", DELIVERY,
             dify.retry_max_age_s)},
    {.key = "dify.validate",
     .type = AMP_JSON_SCHEMA_ENUM,
     .names = validate_names,
     .def = "warn",
     .reload = LIVE,
     F(dify.validate)},
    /* Compiled by the mapper (its own tables); the reader only requires them. */
    {.key = "apps",
     .type = AMP_JSON_SCHEMA_ANY,
     .required = true,
     .reload = DELIVERY,
     .expect = AMP_MAP_APPS_EXPECT},
    {.key = "routes",
     .type = AMP_JSON_SCHEMA_ANY,
     .required = true,
     .reload = LIVE,
     .expect = AMP_MAP_ROUTES_EXPECT},
    {.key = "log.level",
     .type = AMP_JSON_SCHEMA_ENUM,
     .names = level_names,
     .def = "info",
     .env = "AMP2DIFY_LOG_LEVEL",
     .reload = LIVE,
     F(log_level)},
    {INT_ROW("shutdown_timeout_seconds", 2, 3600, "25", DELIVERY, shutdown_timeout_s)},
    {.key = "reports.base_url",
     .type = AMP_JSON_SCHEMA_STRING,
     .def = "https://api2.amplitude.com",
     .env = "AMPLITUDE_HTTP_BASE_URL",
     .reload = DELIVERY,
     F(reports.base_url),
     .accept = valid_base_url,
     .item_expect = "an http:// or https:// URL"},
    {INT_ROW("reports.batch_events", 1, 2000, "2000", DELIVERY, reports.batch_events)},
    {INT_ROW("reports.linger_ms", 0, 10000, "200", DELIVERY, reports.linger_ms)},
    {INT_ROW("reports.throttle_ms", 100, 600000, "30000", DELIVERY, reports.throttle_ms)},
    {.key = "sources.export.enabled",
     .type = AMP_JSON_SCHEMA_BOOL,
     .def = "false",
     .reload = RESTART,
     F(sources.export.enabled)},
    {.key = "sources.export.base_url",
     .type = AMP_JSON_SCHEMA_STRING,
     .def = "https://amplitude.com",
     .env = "AMPLITUDE_EXPORT_BASE_URL",
     .reload = RESTART,
     F(sources.export.base_url),
     .accept = valid_base_url,
     .item_expect = "an http:// or https:// URL"},
    {.key = "sources.export.project",
     .type = AMP_JSON_SCHEMA_STRING,
     .def = "default",
     .reload = RESTART,
     F(sources.export.project),
     .accept = valid_project,
     .item_expect = "1 to 64 letters, digits, '-' or '_'"},
    {.key = "sources.export.cursor_dir",
     .type = AMP_JSON_SCHEMA_STRING,
     .allow_empty = true,
     .reload = RESTART,
     F(sources.export.cursor_dir)},
    {.key = "sources.export.start",
     .type = AMP_JSON_SCHEMA_STRING,
     .allow_empty = true,
     .reload = RESTART,
     F(sources.export.start),
     .accept = valid_hour,
     .item_expect = "\"\" or an hour \"YYYY-MM-DDTHH\" (UTC)"},
    {INT_ROW("sources.export.lag_hours", 0, 720, "2", RESTART, sources.export.lag_hours)},
    {INT_ROW("sources.export.interval_seconds", 1, 86400, "3600", RESTART,
             sources.export.interval_s)},
    {INT_ROW("sources.export.hours_per_request", 1, 720, "24", RESTART,
             sources.export.hours_per_request)},
    {INT_ROW("sources.export.min_request_interval_ms", 0, 3600000, "30000", RESTART,
             sources.export.min_request_interval_ms)},
    {INT_ROW("sources.export.timeout_seconds", 1, 86400, "3600", RESTART,
             sources.export.timeout_s)},
    {INT_ROW("sources.export.retry_initial_ms", 1, 3600000, "10000", RESTART,
             sources.export.retry_initial_ms)},
    {INT_ROW("sources.export.max_attempts", 1, 100, "6", RESTART, sources.export.max_attempts)},
    {INT_ROW("sources.export.batch_events", 1, 100000, "1000", RESTART,
             sources.export.batch_events)},
    {.key = "sources.sdk.enabled",
     .type = AMP_JSON_SCHEMA_BOOL,
     .def = "false",
     .reload = LIVE,
     F(sources.sdk.enabled)},
    {.key = "sources.sdk.path",
     .type = AMP_JSON_SCHEMA_STRING,
     .def = "/2/httpapi",
     .reload = LIVE,
     F(sources.sdk.path),
     .check = check_sdk_path,
     .accept = valid_url_path,
     .item_expect = "a path starting with '/'"},
    {.key = "sources.sdk.tee",
     .type = AMP_JSON_SCHEMA_BOOL,
     .def = "false",
     .reload = DELIVERY,
     F(sources.sdk.tee)},
    {.key = NULL},
};

const amp_json_schema_row *amp_config_schema(void) {
    return config_rows;
}

/* ---- environment ------------------------------------------------------- */

static void unreadable(amp_errs *errs, const char *path, const char *what, const char *file,
                       const char *why) {
    char *found = amp_xasprintf("%s file '%s' unreadable (%s)", what, file, why);
    amp_json_schema_error(errs, path, found, "a readable file holding the secret");
    free(found);
}

static char *read_secret_file(const char *file, const char *what, const char *path,
                              amp_errs *errs) {
    FILE *f = fopen(file, "rb");
    if (!f) {
        unreadable(errs, path, what, file, strerror(errno));
        return NULL;
    }
    amp_buf b;
    amp_buf_init(&b, MAX_SECRET_FILE);
    int rc = amp_buf_read(&b, f);
    fclose(f);
    if (rc != 0) {
        unreadable(errs, path, what, file, rc == -1 ? "larger than 64 KiB" : "read error");
        amp_buf_free(&b);
        return NULL;
    }
    if (b.len > 0 && b.data[b.len - 1] == '\n')
        b.data[--b.len] = '\0';
    if (b.len > 0 && b.data[b.len - 1] == '\r')
        b.data[--b.len] = '\0';
    if (b.len == 0) {
        char *found = amp_xasprintf("%s file '%s' empty", what, file);
        amp_json_schema_error(errs, path, found, "a file holding the secret");
        free(found);
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
        char *found = amp_xasprintf("both %s and %s set", name, file_var);
        amp_json_schema_error(errs, path, found, "only one of them");
        free(found);
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
        amp_json_schema_error(
            errs, "AMP2DIFY_SECRETS", "nothing in AMP2DIFY_SECRETS or AMP2DIFY_SECRETS_FILE",
            "at least one secret for the %s scheme", amp_sig_scheme_name(c->auth.scheme));
        return;
    }
    c->auth.secrets = amp_config_split_secrets(all, &c->auth.nsecrets);
    free(all);
    if (c->auth.nsecrets == 0) {
        amp_json_schema_error(errs, "AMP2DIFY_SECRETS", "no secret", "comma-separated secrets");
        return;
    }
    char err[256];
    c->auth.verifier =
        amp_sig_create(c->auth.scheme, (const char *const *)c->auth.secrets, c->auth.nsecrets,
                       c->auth.tolerance_s, c->auth.header, err, sizeof err);
    if (!c->auth.verifier)
        amp_json_schema_error(errs, "AMP2DIFY_SECRETS", err, "secrets the %s scheme accepts",
                              amp_sig_scheme_name(c->auth.scheme));
}

/* The admin API's bearer token, needed once admin.listen is set. */
#define ADMIN_TOKEN_MIN 16

static void load_admin_token(amp_config *c, amp_errs *errs) {
    if (!c->admin.listen || !c->admin.listen[0])
        return;
    int rc = amp_config_secret_from_env("AMP2DIFY_ADMIN_TOKEN", &c->admin.token,
                                        "AMP2DIFY_ADMIN_TOKEN", errs);
    if (rc > 0)
        amp_json_schema_error(errs, "AMP2DIFY_ADMIN_TOKEN",
                              "nothing in AMP2DIFY_ADMIN_TOKEN or AMP2DIFY_ADMIN_TOKEN_FILE",
                              "a bearer token of at least %d characters, since admin.listen is set",
                              ADMIN_TOKEN_MIN);
    if (rc != 0)
        return;
    if (strlen(c->admin.token) < ADMIN_TOKEN_MIN) {
        amp_json_schema_error(errs, "AMP2DIFY_ADMIN_TOKEN", "a shorter token",
                              "a bearer token of at least %d characters", ADMIN_TOKEN_MIN);
        return;
    }
    /* "Authorization: Bearer <token>", compared as static-header compares
     * (keyed HMAC, then CRYPTO_memcmp: the time does not depend on the
     * value sent). */
    char *expected = amp_xasprintf("Bearer %s", c->admin.token);
    char err[256];
    c->admin.verifier = amp_sig_create(AMP_AUTH_STATIC_HEADER, (const char *const *)&expected, 1, 0,
                                       "Authorization", err, sizeof err);
    free(expected);
    if (!c->admin.verifier)
        amp_json_schema_error(errs, "AMP2DIFY_ADMIN_TOKEN", err, "a usable bearer token");
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
            if (rc > 0) {
                char *found =
                    amp_xasprintf("nothing in %s or %s_FILE", app->api_key_env, app->api_key_env);
                amp_json_schema_error(errs, path, found, "the app's Dify API key");
                free(found);
            }
        }
        free(path);
    }
}

/* The Export API's keys. */
static void load_export_keys(amp_config *c, amp_errs *errs) {
    static const char *const names[] = {"AMPLITUDE_API_KEY", "AMPLITUDE_SECRET_KEY"};
    char **slots[] = {&c->sources.export.api_key, &c->sources.export.secret_key};
    for (size_t i = 0; i < 2; i++) {
        if (amp_config_secret_from_env(names[i], slots[i], names[i], errs) > 0) {
            char *found = amp_xasprintf("nothing in %s or %s_FILE", names[i], names[i]);
            amp_json_schema_error(errs, names[i], found,
                                  "the Amplitude project's %s for the "
                                  "Export API",
                                  i == 0 ? "API key" : "secret key");
            free(found);
        }
    }
}

/* The HTTP V2 API key that route reports are sent with. */
static void load_report_key(amp_config *c, amp_errs *errs) {
    if (amp_config_secret_from_env("AMPLITUDE_API_KEY", &c->reports.api_key, "AMPLITUDE_API_KEY",
                                   errs) > 0)
        amp_json_schema_error(errs, "AMPLITUDE_API_KEY",
                              "nothing in AMPLITUDE_API_KEY or AMPLITUDE_API_KEY_FILE",
                              "the Amplitude project's API key for the routes' reports");
}

/* The api_key values the SDK endpoint accepts. */
static void load_sdk_keys(amp_config *c, amp_errs *errs) {
    char *all = NULL;
    int rc =
        amp_config_secret_from_env("AMP2DIFY_SDK_API_KEYS", &all, "AMP2DIFY_SDK_API_KEYS", errs);
    if (rc < 0)
        return;
    if (rc == 0)
        c->sources.sdk.api_keys = amp_config_split_secrets(all, &c->sources.sdk.napi_keys);
    free(all);
    if (c->sources.sdk.napi_keys == 0)
        amp_json_schema_error(errs, "AMP2DIFY_SDK_API_KEYS",
                              "nothing in AMP2DIFY_SDK_API_KEYS or AMP2DIFY_SDK_API_KEYS_FILE",
                              "the comma-separated api_key values sources.sdk accepts");
}

char *amp_config_export_cursor(const amp_config *c, const char *suffix) {
    const char *spool = c->spool.path;
    const char *slash = strrchr(spool, '/');
    const char *name = slash ? slash + 1 : spool;
    const char *cdir = c->sources.export.cursor_dir;
    char *dir = cdir && *cdir ? amp_xstrdup(c->sources.export.cursor_dir)
                : slash       ? amp_xstrndup(spool, (size_t)(slash - spool) + (slash == spool))
                              : amp_xstrdup(".");
    char *out = amp_xasprintf("%s/%s.export-%s%s%s.cursor", dir, name, c->sources.export.project,
                              suffix ? "-" : "", suffix ? suffix : "");
    free(dir);
    return out;
}

/* ---- load --------------------------------------------------------------- */

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
        amp_json_schema_error(errs, "", amp_json_schema_kind(root), "an object at the top level");
        json_decref(root);
        return NULL;
    }

    amp_config *c = amp_xcalloc(1, sizeof *c);
    c->file = amp_xstrdup(path);
    amp_json_schema_defaults(config_rows, c);
    amp_json_schema_read(config_rows, root, "", c, NULL, errs);
    const json_t *apps = json_object_get(root, "apps");
    const json_t *routes = json_object_get(root, "routes");
    if (apps && routes)
        c->mapper = amp_mapper_compile(apps, routes, errs);
    json_decref(root);

    amp_json_schema_env(config_rows, c, NULL, errs);
    /* The auth secrets are checked even when the routes did not compile,
     * so that check-config prints every error at once. */
    if (c->admin.listen && c->admin.listen[0])
        split_hostport(c->admin.listen, &c->admin.address, &c->admin.port); /* accepted above */
    if (flags & AMP_CONFIG_SECRETS) {
        load_auth_secrets(c, errs);
        load_admin_token(c, errs);
        if (c->mapper)
            load_app_keys(c, errs);
        if (c->sources.sdk.enabled)
            load_sdk_keys(c, errs);
        if ((c->mapper && amp_mapper_any_report(c->mapper)) ||
            (c->sources.sdk.enabled && c->sources.sdk.tee))
            load_report_key(c, errs);
    }
    if ((flags & AMP_CONFIG_EXPORT_SECRETS) ||
        ((flags & AMP_CONFIG_SECRETS) && c->sources.export.enabled))
        load_export_keys(c, errs);

    if (amp_errs_count(errs) > errs_before) {
        amp_config_destroy(c);
        return NULL;
    }
    return c;
}

/* The apps, their settings (the mapper's table) and their keys. */
static bool same_apps(const amp_config *a, const amp_config *b) {
    size_t n = amp_mapper_app_count(a->mapper);
    if (n != amp_mapper_app_count(b->mapper))
        return false;
    const amp_json_schema_row *rows = amp_map_app_schema();
    for (size_t i = 0; i < n; i++) {
        const amp_app *x = amp_mapper_app(a->mapper, i), *y = amp_mapper_app(b->mapper, i);
        if (strcmp(x->name, y->name) || amp_json_schema_diff(rows, x, y, NULL) != 0)
            return false;
        const char *kx = a->api_keys ? a->api_keys[i] : NULL;
        const char *ky = b->api_keys ? b->api_keys[i] : NULL;
        if (kx != ky && (!kx || !ky || strcmp(kx, ky)))
            return false;
    }
    return true;
}

amp_json_schema_reload amp_config_diff(const amp_config *a, const amp_config *b,
                                       const char **first_key) {
    const char *first;
    amp_json_schema_reload how = amp_json_schema_diff(config_rows, a, b, &first);
    /* The "apps" row has no field of its own: its class covers every app. */
    const amp_json_schema_row *apps = config_rows;
    while (strcmp(apps->key, "apps"))
        apps++;
    if (apps->reload > how && !same_apps(a, b)) {
        how = apps->reload;
        first = apps->key;
    }
    if (first_key)
        *first_key = first;
    return how;
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
    amp_json_schema_free(config_rows, c);
    free_strv(c->auth.secrets, c->auth.nsecrets);
    amp_sig_destroy(c->auth.verifier);
    free(c->admin.address);
    free(c->admin.token);
    amp_sig_destroy(c->admin.verifier);
    free(c->sources.export.api_key);
    free(c->reports.api_key);
    free(c->sources.export.secret_key);
    free_strv(c->sources.sdk.api_keys, c->sources.sdk.napi_keys);
    if (c->api_keys) {
        size_t n = c->mapper ? amp_mapper_app_count(c->mapper) : 0;
        free_strv(c->api_keys, n);
    }
    amp_mapper_destroy(c->mapper);
    free(c);
}
