/*
 * Config loading: defaults, environment overrides, secrets from variables
 * and files, and the errors (every one, with its JSON path, never a secret).
 */
#include <check.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "../../config/config.h"
#include "../check_run.h"
#include "../../base/alloc.h"
#include "../../base/buf.h"
#include "../../base/errs.h"

static char dir[64];

static const char minimal_apps_routes[] = "\"apps\": {\"a\": {\"api_key_env\": \"TEST_APP_KEY\"}},"
                                          "\"routes\": [{\"name\": \"r\", \"app\": \"a\"}]";

static void clear_env(void) {
    static const char *const vars[] = {
        "AMP2DIFY_LISTEN", "AMP2DIFY_SECRETS",  "AMP2DIFY_SECRETS_FILE",
        "AMP2DIFY_SPOOL",  "DIFY_BASE_URL",     "AMP2DIFY_LOG_LEVEL",
        "TEST_APP_KEY",    "TEST_APP_KEY_FILE", NULL};
    for (const char *const *v = vars; *v; v++)
        unsetenv(*v);
}

static void setup(void) {
    clear_env();
    snprintf(dir, sizeof dir, "/tmp/amp2dify-config-XXXXXX");
    ck_assert_ptr_nonnull(mkdtemp(dir));
}

static void teardown(void) {
    char cmd[128];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    ck_assert_int_eq(system(cmd), 0);
    clear_env();
}

static char *write_file(const char *name, const char *text) {
    char *p = amp_xasprintf("%s/%s", dir, name);
    FILE *f = fopen(p, "w");
    ck_assert_ptr_nonnull(f);
    fputs(text, f);
    fclose(f);
    return p;
}

/* Load text as a config; returns the config or NULL, errors in *errs_out. */
static amp_config *load(const char *text, unsigned flags, amp_errs **errs_out) {
    char *p = write_file("c.json", text);
    *errs_out = amp_errs_create();
    amp_config *c = amp_config_load(p, flags, *errs_out);
    free(p);
    return c;
}

static int has_error(const amp_errs *e, const char *needle) {
    for (size_t i = 0; i < amp_errs_count(e); i++)
        if (strstr(amp_errs_get(e, i), needle))
            return 1;
    return 0;
}

static char *all_errors(const amp_errs *e) {
    amp_buf b;
    amp_buf_init(&b, 1 << 20);
    for (size_t i = 0; i < amp_errs_count(e); i++) {
        amp_buf_append(&b, amp_errs_get(e, i), strlen(amp_errs_get(e, i)));
        amp_buf_append(&b, "\n", 1);
    }
    return b.data ? b.data : amp_xstrdup("");
}

#define ASSERT_ERROR(errs, needle)                                                                 \
    do {                                                                                           \
        char *all_ = all_errors(errs);                                                             \
        ck_assert_msg(has_error(errs, needle), "expected an error containing '%s'; got:\n%s",      \
                      needle, all_);                                                               \
        free(all_);                                                                                \
    } while (0)

START_TEST(defaults_apply) {
    amp_errs *errs;
    char text[512];
    snprintf(text, sizeof text, "{%s}", minimal_apps_routes);
    amp_config *c = load(text, 0, &errs);
    ck_assert_ptr_nonnull(c);
    ck_assert_str_eq(c->listen.address, "0.0.0.0");
    ck_assert_int_eq(c->listen.port, 8080);
    ck_assert_str_eq(c->listen.path, "/webhooks/amplitude");
    ck_assert_uint_eq(c->listen.max_body_bytes, 1048576);
    ck_assert_uint_eq(c->listen.threads, 2);
    ck_assert_int_eq(c->listen.event_loop, AMP_CONFIG_EVENT_LOOP_EPOLL);
    ck_assert_int_eq(c->auth.scheme, AMP_AUTH_AMPLITUDE_HMAC);
    ck_assert_int_eq(c->auth.tolerance_s, 300);
    ck_assert_str_eq(c->spool.path, "amp2dify-spool.db");
    ck_assert_int_eq(c->spool.dedupe_window_s, 604800);
    ck_assert_str_eq(c->dify.base_url, "https://api.dify.ai/v1");
    ck_assert_uint_eq(c->dify.timeout_s, 120);
    ck_assert_int_eq(c->dify.retry_initial_ms, 1000);
    ck_assert_int_eq(c->dify.retry_max_ms, 300000);
    ck_assert_int_eq(c->dify.retry_max_age_s, 86400);
    ck_assert_ptr_null(c->auth.verifier); /* secrets not asked for */
    amp_config_destroy(c);
    amp_errs_destroy(errs);
}
END_TEST

START_TEST(environment_overrides) {
    setenv("AMP2DIFY_LISTEN", "127.0.0.1:9090", 1);
    setenv("AMP2DIFY_SPOOL", "/var/lib/amp2dify/spool.db", 1);
    setenv("DIFY_BASE_URL", "http://127.0.0.1:5001/v1", 1);
    setenv("AMP2DIFY_SECRETS", " one , two,,", 1);
    setenv("TEST_APP_KEY", "app-key-123", 1);
    amp_errs *errs;
    char text[512];
    snprintf(text, sizeof text, "{\"listen\": {\"port\": 1}, %s}", minimal_apps_routes);
    amp_config *c = load(text, AMP_CONFIG_SECRETS, &errs);
    ck_assert_ptr_nonnull(c);
    ck_assert_str_eq(c->listen.address, "127.0.0.1");
    ck_assert_int_eq(c->listen.port, 9090);
    ck_assert_str_eq(c->spool.path, "/var/lib/amp2dify/spool.db");
    ck_assert_str_eq(c->dify.base_url, "http://127.0.0.1:5001/v1");
    ck_assert_uint_eq(c->auth.nsecrets, 2);
    ck_assert_str_eq(c->auth.secrets[0], "one");
    ck_assert_str_eq(c->auth.secrets[1], "two");
    ck_assert_ptr_nonnull(c->auth.verifier);
    ck_assert_str_eq(c->api_keys[0], "app-key-123");
    amp_config_destroy(c);
    amp_errs_destroy(errs);
}
END_TEST

/* AMP2DIFY_LISTEN is host:port: "localhost" and an empty host (":8080",
 * every IPv4 address) are taken; a name that would need a lookup is a
 * config error naming the variable, caught by check-config, not at start. */
START_TEST(listen_override_hosts) {
    static const struct {
        const char *env, *address;
    } good[] = {{"localhost:9090", "localhost"}, {":9091", "0.0.0.0"}};
    char text[512];
    snprintf(text, sizeof text, "{%s}", minimal_apps_routes);
    for (size_t i = 0; i < sizeof good / sizeof good[0]; i++) {
        setenv("AMP2DIFY_LISTEN", good[i].env, 1);
        amp_errs *errs;
        amp_config *c = load(text, 0, &errs);
        ck_assert_msg(c != NULL, "%s refused", good[i].env);
        ck_assert_str_eq(c->listen.address, good[i].address);
        amp_config_destroy(c);
        amp_errs_destroy(errs);
    }
    setenv("AMP2DIFY_LISTEN", "relay.internal:9092", 1);
    amp_errs *errs;
    ck_assert_ptr_null(load(text, 0, &errs));
    ASSERT_ERROR(errs,
                 "AMP2DIFY_LISTEN: found 'relay.internal'; expected a numeric IPv4 or IPv6 address "
                 "or localhost");
    amp_errs_destroy(errs);
}
END_TEST

START_TEST(ipv6_listen_override) {
    setenv("AMP2DIFY_LISTEN", "[::1]:8081", 1);
    amp_errs *errs;
    char text[512];
    snprintf(text, sizeof text, "{%s}", minimal_apps_routes);
    amp_config *c = load(text, 0, &errs);
    ck_assert_ptr_nonnull(c);
    ck_assert_str_eq(c->listen.address, "::1");
    ck_assert_int_eq(c->listen.port, 8081);
    amp_config_destroy(c);
    amp_errs_destroy(errs);
}
END_TEST

START_TEST(secrets_from_files) {
    char *sf = write_file("secrets", "from-file-secret\n");
    char *kf = write_file("key", "app-from-file\n");
    setenv("AMP2DIFY_SECRETS_FILE", sf, 1);
    setenv("TEST_APP_KEY_FILE", kf, 1);
    amp_errs *errs;
    char text[512];
    snprintf(text, sizeof text, "{%s}", minimal_apps_routes);
    amp_config *c = load(text, AMP_CONFIG_SECRETS, &errs);
    ck_assert_ptr_nonnull(c);
    ck_assert_str_eq(c->auth.secrets[0], "from-file-secret");
    ck_assert_str_eq(c->api_keys[0], "app-from-file");
    amp_config_destroy(c);
    amp_errs_destroy(errs);
    free(sf);
    free(kf);
}
END_TEST

START_TEST(missing_secrets_are_errors) {
    amp_errs *errs;
    char text[512];
    snprintf(text, sizeof text, "{%s}", minimal_apps_routes);
    amp_config *c = load(text, AMP_CONFIG_SECRETS, &errs);
    ck_assert_ptr_null(c);
    ASSERT_ERROR(errs, "AMP2DIFY_SECRETS: found nothing");
    ASSERT_ERROR(errs, "apps.a.api_key_env: found nothing in TEST_APP_KEY or TEST_APP_KEY_FILE");
    amp_errs_destroy(errs);
}
END_TEST

START_TEST(both_secret_sources_is_an_error) {
    char *sf = write_file("secrets", "s2\n");
    setenv("AMP2DIFY_SECRETS", "s1", 1);
    setenv("AMP2DIFY_SECRETS_FILE", sf, 1);
    setenv("TEST_APP_KEY", "k", 1);
    amp_errs *errs;
    char text[512];
    snprintf(text, sizeof text, "{%s}", minimal_apps_routes);
    ck_assert_ptr_null(load(text, AMP_CONFIG_SECRETS, &errs));
    ASSERT_ERROR(errs,
                 "found both AMP2DIFY_SECRETS and AMP2DIFY_SECRETS_FILE set; expected only one");
    amp_errs_destroy(errs);
    free(sf);
}
END_TEST

/* check-config prints every error: a missing signing secret is reported
 * even when the routes do not compile. */
START_TEST(missing_secret_reported_beside_route_errors) {
    amp_errs *errs;
    ck_assert_ptr_null(load("{\"apps\": {\"a\": {}}, \"routes\": [{\"name\": \"r\", "
                            "\"app\": \"nope\"}]}",
                            AMP_CONFIG_SECRETS, &errs));
    ASSERT_ERROR(errs, "routes[0].app: found 'nope'; expected one of a");
    ASSERT_ERROR(errs, "AMP2DIFY_SECRETS: found nothing");
    amp_errs_destroy(errs);
}
END_TEST

START_TEST(every_error_reported_with_path) {
    amp_errs *errs;
    char text[1024];
    snprintf(text, sizeof text,
             "{\"listen\": {\"port\": \"80\", \"path\": \"hooks\", \"colour\": 1},"
             " \"auth\": {\"scheme\": \"magic\", \"tolerance_seconds\": -5},"
             " \"dify\": {\"base_url\": \"ftp://x\", \"retry\": {\"initial_ms\": 0}},"
             " \"spool\": 3, \"extra\": true, %s}",
             minimal_apps_routes);
    ck_assert_ptr_null(load(text, 0, &errs));
    ASSERT_ERROR(errs, "listen.port: found a string; expected an integer from 0 to 65535");
    ASSERT_ERROR(errs, "listen.path: found 'hooks'; expected a path starting with '/'");
    ASSERT_ERROR(errs, "listen.colour: found an unknown key");
    ASSERT_ERROR(errs, "auth.scheme: found 'magic'; expected one of amplitude-hmac, static-header");
    ASSERT_ERROR(errs, "auth.tolerance_seconds: found -5");
    ASSERT_ERROR(errs, "dify.base_url: found 'ftp://x'; expected an http:// or https:// URL");
    ASSERT_ERROR(errs, "dify.retry.initial_ms: found 0");
    ASSERT_ERROR(errs, "spool: found an integer; expected an object");
    ASSERT_ERROR(errs, "extra: found an unknown key");
    ck_assert_uint_ge(amp_errs_count(errs), 9);
    amp_errs_destroy(errs);
}
END_TEST

START_TEST(syntax_error_has_line_and_column) {
    amp_errs *errs;
    ck_assert_ptr_null(load("{\n  \"listen\": {,}\n}", 0, &errs));
    ASSERT_ERROR(errs, "line 2, column");
    amp_errs_destroy(errs);
}
END_TEST

START_TEST(missing_file_and_sections) {
    amp_errs *errs = amp_errs_create();
    ck_assert_ptr_null(amp_config_load("/nonexistent/amp2dify.json", 0, errs));
    ck_assert_uint_eq(amp_errs_count(errs), 1);
    amp_errs_destroy(errs);

    ck_assert_ptr_null(load("{}", 0, &errs));
    ASSERT_ERROR(errs, "apps: found nothing; expected an object of Dify apps");
    ASSERT_ERROR(errs, "routes: found nothing; expected an array of routes");
    amp_errs_destroy(errs);

    ck_assert_ptr_null(load("[]", 0, &errs));
    ASSERT_ERROR(errs, "expected an object");
    amp_errs_destroy(errs);
}
END_TEST

START_TEST(none_scheme_needs_explicit_opt_in) {
    amp_errs *errs;
    char text[512];
    snprintf(text, sizeof text, "{\"auth\": {\"scheme\": \"none\"}, %s}", minimal_apps_routes);
    ck_assert_ptr_null(load(text, 0, &errs));
    ASSERT_ERROR(errs, "allow_unauthenticated");
    amp_errs_destroy(errs);

    snprintf(text, sizeof text,
             "{\"auth\": {\"scheme\": \"none\", \"allow_unauthenticated\": true}, %s}",
             minimal_apps_routes);
    setenv("TEST_APP_KEY", "k", 1);
    amp_config *c = load(text, AMP_CONFIG_SECRETS, &errs);
    ck_assert_ptr_nonnull(c);
    ck_assert_ptr_null(c->auth.verifier);
    amp_config_destroy(c);
    amp_errs_destroy(errs);
}
END_TEST

START_TEST(bad_env_values) {
    setenv("AMP2DIFY_LISTEN", "nonsense", 1);
    setenv("DIFY_BASE_URL", "api.dify.ai", 1);
    setenv("AMP2DIFY_LOG_LEVEL", "loud", 1);
    amp_errs *errs;
    char text[512];
    snprintf(text, sizeof text, "{%s}", minimal_apps_routes);
    ck_assert_ptr_null(load(text, 0, &errs));
    ASSERT_ERROR(errs, "AMP2DIFY_LISTEN: found 'nonsense'; expected host:port");
    ASSERT_ERROR(errs, "DIFY_BASE_URL: found 'api.dify.ai'; expected an http");
    ASSERT_ERROR(errs,
                 "AMP2DIFY_LOG_LEVEL: found 'loud'; expected one of debug, info, warn, error");
    amp_errs_destroy(errs);
}
END_TEST

START_TEST(secrets_never_in_errors) {
    /* A standard-webhooks secret that is not base64: the error must not
     * repeat it. */
    setenv("AMP2DIFY_SECRETS", "whsec_%%%not-base64-SECRETVALUE%%%", 1);
    setenv("TEST_APP_KEY", "k", 1);
    amp_errs *errs;
    char text[512];
    snprintf(text, sizeof text, "{\"auth\": {\"scheme\": \"standard-webhooks\"}, %s}",
             minimal_apps_routes);
    ck_assert_ptr_null(load(text, AMP_CONFIG_SECRETS, &errs));
    char *all = all_errors(errs);
    ck_assert_msg(strstr(all, "SECRETVALUE") == NULL, "secret leaked: %s", all);
    ck_assert_msg(strstr(all, "AMP2DIFY_SECRETS") != NULL, "errors: %s", all);
    free(all);
    amp_errs_destroy(errs);
}
END_TEST

START_TEST(example_config_loads) {
    setenv("AMP2DIFY_SECRETS", "s", 1);
    setenv("DIFY_API_KEY", "app-x", 1);
    amp_errs *errs = amp_errs_create();
    amp_config *c = amp_config_load("examples/amp2dify.json", AMP_CONFIG_SECRETS, errs);
    ck_assert_msg(c != NULL, "examples/amp2dify.json: %s",
                  amp_errs_count(errs) ? amp_errs_get(errs, 0) : "?");
    amp_config_destroy(c);
    amp_errs_destroy(errs);
    unsetenv("DIFY_API_KEY");
}
END_TEST

/* ---- the schema table ---------------------------------------------------- */

static char *read_readme(void) {
    FILE *f = fopen("README.md", "rb");
    ck_assert_msg(f != NULL, "README.md not found (run from the repository root)");
    amp_buf b;
    amp_buf_init(&b, 1 << 20);
    ck_assert_int_eq(amp_buf_read(&b, f), 0);
    fclose(f);
    return b.data;
}

/* The README line of the configuration table for key (prefix + row key),
 * as a new string, or NULL. A row the mapper compiles (apps, routes) is
 * described by the lines of its parts: `apps.<name>...`, `routes[]`. */
static char *readme_line(const char *readme, const char *prefix, const amp_json_schema_row *r) {
    char *head = amp_xasprintf("\n| `%s%s", prefix, r->key);
    const char *at = readme;
    char *line = NULL;
    while (!line && (at = strstr(at, head))) {
        at += 1;
        char next = at[strlen(head) - 1];
        if (next == '`' || (r->type == AMP_JSON_SCHEMA_ANY && (next == '.' || next == '['))) {
            const char *end = strchr(at, '\n');
            line = amp_xstrndup(at, end ? (size_t)(end - at) : strlen(at));
        }
    }
    free(head);
    return line;
}

static const char *reload_word(amp_json_schema_reload r) {
    switch (r) {
    case AMP_JSON_SCHEMA_LIVE:
        return "| live |";
    case AMP_JSON_SCHEMA_RESTART_DELIVERY:
        return "| restarts delivery |";
    case AMP_JSON_SCHEMA_RESTART:
        return "| restart |";
    }
    return "?";
}

/* Every row: a reload class, a type whose range holds its default (the
 * default parses, and passes the row's own acceptance test), and a README
 * line with its range, default, variable and reload class. */
static void check_table(const amp_json_schema_row *rows, const char *prefix, size_t target_size,
                        const char *readme) {
    void *scratch = amp_xcalloc(1, target_size);
    for (const amp_json_schema_row *r = rows; r->key; r++) {
        ck_assert_msg(*r->key, "a row without a key");
        ck_assert_msg(r->reload >= AMP_JSON_SCHEMA_LIVE && r->reload <= AMP_JSON_SCHEMA_RESTART,
                      "%s: no reload class", r->key);
        ck_assert_msg(r->size == 0 || r->offset + r->size <= target_size, "%s: field outside",
                      r->key);
        ck_assert_msg(r->size || r->set || r->required, "%s: neither stored, set nor required",
                      r->key);
        if (r->type == AMP_JSON_SCHEMA_INT)
            ck_assert_msg(r->min <= r->max, "%s: empty range", r->key);
        if (r->type == AMP_JSON_SCHEMA_NUMBER)
            ck_assert_msg(r->dmin <= r->dmax, "%s: empty range", r->key);
        if (r->type == AMP_JSON_SCHEMA_ENUM)
            ck_assert_msg(r->names && r->names[0], "%s: an enum without names", r->key);
        if (r->def) {
            ck_assert_msg(r->size, "%s: a default but no field", r->key);
            ck_assert_msg(amp_json_schema_parse_text(r, r->def, scratch) == 0,
                          "%s: default '%s' is not a valid value", r->key, r->def);
            if (r->accept && r->type == AMP_JSON_SCHEMA_STRING)
                ck_assert_msg(r->accept(r->def), "%s: default refused by its own check", r->key);
        } else {
            /* No default: absent stays absent (a string), it is computed
             * (doc says how), or the key is required. */
            ck_assert_msg(r->type == AMP_JSON_SCHEMA_STRING || r->doc || r->required || !r->size,
                          "%s: no default", r->key);
        }

        char *line = readme_line(readme, prefix, r);
        ck_assert_msg(line != NULL, "README.md has no configuration line for %s%s", prefix, r->key);
        ck_assert_msg(strstr(line, reload_word(r->reload)) != NULL, "README.md: %s%s should say %s",
                      prefix, r->key, reload_word(r->reload));
        if (r->env)
            ck_assert_msg(strstr(line, r->env) != NULL, "README.md: %s%s should name %s", prefix,
                          r->key, r->env);
        if (r->def && r->type != AMP_JSON_SCHEMA_STRLIST) {
            char *def = amp_xasprintf("`%s`", r->def);
            ck_assert_msg(strstr(line, def) != NULL, "README.md: %s%s should give default %s",
                          prefix, r->key, def);
            free(def);
        } else if (r->def) {
            ck_assert_msg(strstr(line, r->def) != NULL, "README.md: %s%s should give default %s",
                          prefix, r->key, r->def);
        }
        if (r->type == AMP_JSON_SCHEMA_INT) {
            char *range = r->max == INT64_MAX ? amp_xasprintf("integer %lld..", (long long)r->min)
                                              : amp_xasprintf("integer %lld..%lld",
                                                              (long long)r->min, (long long)r->max);
            const char *at = strstr(line, range);
            ck_assert_msg(at && !(at[strlen(range)] >= '0' && at[strlen(range)] <= '9'),
                          "README.md: %s%s should say %s", prefix, r->key, range);
            free(range);
        }
        for (size_t i = 0; r->type == AMP_JSON_SCHEMA_ENUM && r->names[i]; i++) {
            char *name = amp_xasprintf("`%s`", r->names[i]);
            ck_assert_msg(strstr(line, name) != NULL, "README.md: %s%s should list %s", prefix,
                          r->key, name);
            free(name);
        }
        free(line);
    }
    amp_json_schema_free(rows, scratch);
    free(scratch);
}

START_TEST(schema_table_is_complete) {
    char *readme = read_readme();
    check_table(amp_config_schema(), "", sizeof(amp_config), readme);
    check_table(amp_map_app_schema(), "apps.<name>.", sizeof(amp_app), readme);
    free(readme);
}
END_TEST

static const amp_json_schema_row *row(const char *key) {
    for (const amp_json_schema_row *r = amp_config_schema(); r->key; r++)
        if (!strcmp(r->key, key))
            return r;
    ck_abort_msg("no row %s", key);
    return NULL;
}

/* Enum rows store the index of the name: the names must follow the enums. */
START_TEST(schema_enums_follow_their_types) {
    const amp_json_schema_row *r = row("auth.scheme");
    for (int i = 0; r->names[i]; i++)
        ck_assert_str_eq(r->names[i], amp_sig_scheme_name((amp_auth_scheme)i));
    r = row("log.level");
    for (int i = 0; r->names[i]; i++) {
        amp_log_level l;
        ck_assert_int_eq(amp_log_parse_level(r->names[i], &l), 0);
        ck_assert_int_eq((int)l, i);
    }
    r = row("listen.event_loop");
    ck_assert_str_eq(r->names[AMP_CONFIG_EVENT_LOOP_EPOLL], "epoll");
    ck_assert_str_eq(r->names[AMP_CONFIG_EVENT_LOOP_POLL], "poll");
    ck_assert_ptr_null(r->names[AMP_CONFIG_EVENT_LOOP_POLL + 1]);
}
END_TEST

/* The reload class of a change comes from the table: the strongest among
 * the keys changed, named by the first such key. */
START_TEST(diff_takes_the_strongest_class) {
    static const char *const variants[][3] = {
        /* config fragment, class, first key */
        {"", "0", NULL},
        {"\"listen\": {\"path\": \"/other\"},", "1", "listen.path"},
        {"\"log\": {\"level\": \"debug\"},", "1", "log.level"},
        {"\"dify\": {\"workers\": 3},", "2", "dify.workers"},
        {"\"shutdown_timeout_seconds\": 9,", "2", "shutdown_timeout_seconds"},
        {"\"dify\": {\"workers\": 3}, \"listen\": {\"threads\": 3},", "3", "listen.threads"},
        {"\"spool\": {\"sync\": \"normal\"},", "3", "spool.sync"},
        {"\"listen\": {\"event_loop\": \"poll\"},", "3", "listen.event_loop"},
    };
    amp_errs *errs;
    char text[512];
    snprintf(text, sizeof text, "{%s}", minimal_apps_routes);
    amp_config *base = load(text, 0, &errs);
    ck_assert_ptr_nonnull(base);
    amp_errs_destroy(errs);
    for (size_t i = 0; i < sizeof variants / sizeof variants[0]; i++) {
        snprintf(text, sizeof text, "{%s %s}", variants[i][0], minimal_apps_routes);
        amp_config *next = load(text, 0, &errs);
        ck_assert_msg(next != NULL, "%s", text);
        const char *first = "unset";
        int cls = (int)amp_config_diff(base, next, &first);
        ck_assert_msg(cls == atoi(variants[i][1]), "%s: class %d", text, cls);
        if (variants[i][2])
            ck_assert_str_eq(first, variants[i][2]);
        else
            ck_assert_ptr_null(first);
        amp_config_destroy(next);
        amp_errs_destroy(errs);
    }
    /* An app changed, added or with another key restarts delivery. */
    static const char *const apps[] = {
        "{\"apps\": {\"a\": {\"api_key_env\": \"TEST_APP_KEY\", \"burst\": 3}},"
        " \"routes\": [{\"name\": \"r\", \"app\": \"a\"}]}",
        "{\"apps\": {\"a\": {\"api_key_env\": \"TEST_APP_KEY\"}, \"b\": {}},"
        " \"routes\": [{\"name\": \"r\", \"app\": \"a\"}]}",
    };
    for (size_t i = 0; i < 2; i++) {
        amp_config *next = load(apps[i], 0, &errs);
        ck_assert_ptr_nonnull(next);
        const char *first = NULL;
        ck_assert_int_eq(amp_config_diff(base, next, &first), AMP_JSON_SCHEMA_RESTART_DELIVERY);
        ck_assert_str_eq(first, "apps");
        amp_config_destroy(next);
        amp_errs_destroy(errs);
    }
    /* A route change is live: nothing in the tables differs. */
    amp_config *next = load("{\"apps\": {\"a\": {\"api_key_env\": \"TEST_APP_KEY\"}},"
                            " \"routes\": [{\"name\": \"r2\", \"app\": \"a\", \"query\": \"q\"}]}",
                            0, &errs);
    ck_assert_ptr_nonnull(next);
    ck_assert_int_eq(amp_config_diff(base, next, NULL), 0);
    amp_config_destroy(next);
    amp_errs_destroy(errs);
    amp_config_destroy(base);
}
END_TEST

int main(void) {
    Suite *su = suite_create("config");
    TCase *tc = tcase_create("config");
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_add_test(tc, defaults_apply);
    tcase_add_test(tc, environment_overrides);
    tcase_add_test(tc, ipv6_listen_override);
    tcase_add_test(tc, listen_override_hosts);
    tcase_add_test(tc, missing_secret_reported_beside_route_errors);
    tcase_add_test(tc, secrets_from_files);
    tcase_add_test(tc, missing_secrets_are_errors);
    tcase_add_test(tc, both_secret_sources_is_an_error);
    tcase_add_test(tc, every_error_reported_with_path);
    tcase_add_test(tc, syntax_error_has_line_and_column);
    tcase_add_test(tc, missing_file_and_sections);
    tcase_add_test(tc, none_scheme_needs_explicit_opt_in);
    tcase_add_test(tc, bad_env_values);
    tcase_add_test(tc, secrets_never_in_errors);
    tcase_add_test(tc, example_config_loads);
    tcase_add_test(tc, schema_table_is_complete);
    tcase_add_test(tc, schema_enums_follow_their_types);
    tcase_add_test(tc, diff_takes_the_strongest_class);
    suite_add_tcase(su, tc);
    return amp_check_run(su);
}
