#include <stdio.h>
#include <string.h>

#include "commands.h"
#include "../config/config.h"
#include "../spool/spool.h"
#include "../redisq/redisq.h"
#include "../base/errs.h"
#include "../forward/forward.h"
#include "../json/schema.h"

#include <stdlib.h>

int amp_cmd_config_only(int argc, char **argv, const char **config) {
    *config = NULL;
    for (int i = 1; i < argc; i++) {
        if ((strcmp(argv[i], "-c") == 0 || strcmp(argv[i], "--config") == 0) && i + 1 < argc) {
            *config = argv[++i];
            continue;
        }
        fprintf(stderr, "amp2dify %s: unexpected argument '%s' (usage: amp2dify %s [-c FILE])\n",
                argv[0], argv[i], argv[0]);
        return -1;
    }
    return 0;
}

void amp_cmd_print_errors(const char *file, const amp_errs *errs) {
    for (size_t i = 0; i < amp_errs_count(errs); i++)
        fprintf(stderr, "%s: %s\n", file, amp_errs_get(errs, i));
}

amp_config *amp_cmd_load_config(const char *cfile, unsigned flags) {
    const char *path = amp_config_default_path(cfile);
    amp_errs *errs = amp_errs_create();
    amp_config *c = amp_config_load(path, flags, errs);
    if (!c)
        amp_cmd_print_errors(path, errs);
    amp_errs_destroy(errs);
    return c;
}

void amp_cmd_check_apps(const amp_config *cfg, amp_errs *findings, amp_errs *unreachable) {
    size_t napps = amp_mapper_app_count(cfg->mapper);
    for (size_t i = 0; i < napps; i++) {
        const amp_app *app = amp_mapper_app(cfg->mapper, i);
        char err[512], *mode;
        json_t *form;
        /* Short timeouts: this runs before the first event, and an
         * unreachable Dify must not hold up a start. */
        long connect_s = cfg->dify.connect_timeout_s < 5 ? (long)cfg->dify.connect_timeout_s : 5;
        long total_s = cfg->dify.timeout_s < 10 ? (long)cfg->dify.timeout_s : 10;
        if (amp_forward_app_describe(cfg->dify.base_url, cfg->api_keys ? cfg->api_keys[i] : NULL,
                                     connect_s, total_s, &mode, &form, err, sizeof err) != 0) {
            char *path = amp_json_path_key("apps", app->name);
            amp_errs_add(unreachable, path, "%s", err);
            free(path);
            continue;
        }
        amp_mapper_check_app(cfg->mapper, i, mode, form, findings);
        free(mode);
        json_decref(form);
    }
}

static amp_queue *open_sqlite(const amp_config *cfg, int how, char *err, size_t errlen) {
    amp_spool_opts so = amp_config_spool_opts(cfg);
    return how == AMP_CMD_QUEUE_ADMIN ? amp_spool_open_admin(&so, err, errlen)
                                      : amp_spool_open(&so, err, errlen);
}

amp_redisq_opts amp_cmd_redisq_opts(const amp_config *cfg) {
    return (amp_redisq_opts){.url = cfg->queue.url,
                             .shards = (int)cfg->queue.shards,
                             .lease_ms = cfg->queue.lease_ms,
                             .dedupe_window_s = cfg->spool.dedupe_window_s,
                             .max_pending = cfg->spool.max_pending,
                             .allow_weak_durability = cfg->queue.allow_weak_durability};
}

static amp_queue *open_redis(const amp_config *cfg, int how, char *err, size_t errlen) {
    amp_redisq_opts ro = amp_cmd_redisq_opts(cfg);
    return how == AMP_CMD_QUEUE_ADMIN ? amp_redisq_open_admin(&ro, err, errlen)
                                      : amp_redisq_open(&ro, err, errlen);
}

const char *amp_cmd_queue_target(const amp_config *cfg, const char **engine, char *buf,
                                 size_t len) {
    if (cfg->queue.engine != AMP_CONFIG_QUEUE_REDIS) {
        *engine = "sqlite";
        snprintf(buf, len, "%s", cfg->spool.path ? cfg->spool.path : "");
        return buf;
    }
    *engine = "redis";
    const char *url = cfg->queue.url ? cfg->queue.url : "";
    /* redis://[user][:password]@host...: the password (or, without a colon,
     * all the user information) becomes "***". */
    const char *auth = strstr(url, "://");
    auth = auth ? auth + 3 : url;
    size_t alen = strcspn(auth, "/");
    const char *at = memrchr(auth, '@', alen);
    if (!at) {
        snprintf(buf, len, "%s", url);
        return buf;
    }
    const char *colon = memchr(auth, ':', (size_t)(at - auth));
    const char *keep = colon ? colon + 1 : auth;
    snprintf(buf, len, "%.*s***%s", (int)(keep - url), url, at);
    return buf;
}

/* One entry per queue.engine value, in the order of amp_config_queue_engine. */
static amp_queue *(*const engines[])(const amp_config *, int, char *, size_t) = {
    [AMP_CONFIG_QUEUE_SQLITE] = open_sqlite,
    [AMP_CONFIG_QUEUE_REDIS] = open_redis,
};

amp_queue *amp_cmd_open_queue(const amp_config *cfg, int how, char *err, size_t errlen) {
    return engines[cfg->queue.engine](cfg, how, err, errlen);
}
