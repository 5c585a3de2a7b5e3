#include "checked.h"

#include <check.h>
#include <stdlib.h>
#include <string.h>

fake_dify *h_fake_start(void) {
    fake_dify *f = fake_dify_start(0, H_API_KEY);
    ck_assert_ptr_nonnull(f);
    return f;
}

h_server *h_server_start_with(const char *config_json, const fake_dify *f) {
    h_opts o = {.config_json = config_json, .dify_port = fake_dify_port(f)};
    h_server *s = h_server_start(&o);
    ck_assert_msg(s != NULL, "amp2dify did not start");
    return s;
}

double h_metric(const h_server *s, const char *series) {
    h_resp *r = h_get(s, "/metrics");
    ck_assert_int_eq(r->status, 200);
    double v = -1;
    size_t n = strlen(series);
    for (const char *line = r->body; line && *line;) {
        if (strncmp(line, series, n) == 0 && line[n] == ' ')
            v = strtod(line + n + 1, NULL);
        line = strchr(line, '\n');
        if (line)
            line++;
    }
    h_resp_free(r);
    return v;
}

double h_metric_wait(const h_server *s, const char *series, double min, unsigned timeout_ms) {
    int64_t end = h_mono_ms() + timeout_ms;
    double v = h_metric(s, series);
    while (v < min && h_mono_ms() < end) {
        h_sleep_ms(20);
        v = h_metric(s, series);
    }
    return v;
}

void h_server_stop_ok(h_server *s) {
    char *why = h_server_stop_clean(s);
    ck_assert_msg(why == NULL, "%s", why);
}
