#include "checked.h"

#include <check.h>

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

void h_server_stop_ok(h_server *s) {
    char *why = h_server_stop_clean(s);
    ck_assert_msg(why == NULL, "%s", why);
}
