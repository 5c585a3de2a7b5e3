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
    suite_add_tcase(su, tc);
    return amp_check_run(su);
}
