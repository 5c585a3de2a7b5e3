/*
 * What Dify says about one app, for checking the config against it before
 * the first event: GET {base}/info (the app's mode) and GET
 * {base}/parameters (its user_input_form), with the app's key. mapping/
 * (amp_mapper_check_app) compares them with the routes.
 */
#include "forward_int.h"
#include "../base/alloc.h"

#include <string.h>

/* One GET; the parsed 200 answer (caller owns), or NULL and err. */
static json_t *get_json(amp_forward_http *h, const char *base_url, const char *path,
                        const char *auth, char *err, size_t errlen) {
    char *url = amp_forward_join_url(base_url, path);
    const char *headers[] = {auth, NULL};
    amp_forward_reply r;
    amp_forward_http_get(h, url, headers, &r);
    json_t *out = NULL;
    if (r.transport_error) {
        snprintf(err, errlen, "GET %s: %s", url, r.error);
    } else if (r.status != 200 || !json_is_object(r.body)) {
        const json_t *m = json_is_object(r.body) ? json_object_get(r.body, "message") : NULL;
        snprintf(err, errlen, "GET %s: HTTP %ld%s%s", url, r.status, json_is_string(m) ? ": " : "",
                 json_is_string(m) ? json_string_value(m) : "");
    } else {
        out = json_incref(r.body);
    }
    amp_forward_reply_clear(&r);
    free(url);
    return out;
}

int amp_forward_app_describe(const char *base_url, const char *key, long connect_timeout_s,
                             long timeout_s, char **mode, json_t **form, char *err, size_t errlen) {
    *mode = NULL;
    *form = NULL;
    amp_forward_http *h = amp_forward_http_create(connect_timeout_s, timeout_s, NULL, err, errlen);
    if (!h)
        return -1;
    char *auth = amp_xasprintf("Authorization: Bearer %s", key ? key : "");
    int rc = -1;
    json_t *info = get_json(h, base_url, "info", auth, err, errlen);
    json_t *params = info ? get_json(h, base_url, "parameters", auth, err, errlen) : NULL;
    const json_t *m = info ? json_object_get(info, "mode") : NULL;
    const json_t *f = params ? json_object_get(params, "user_input_form") : NULL;
    if (info && params) {
        if (!json_is_string(m)) {
            snprintf(err, errlen, "GET info: the answer has no \"mode\"");
        } else {
            *mode = amp_xstrdup(json_string_value(m));
            *form = json_is_array(f) ? json_incref((json_t *)f) : json_array();
            rc = 0;
        }
    }
    json_decref(info);
    json_decref(params);
    memset(auth, 0, strlen(auth)); /* the key should not linger */
    free(auth);
    amp_forward_http_destroy(h);
    return rc;
}
