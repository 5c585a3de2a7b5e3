/*
 * check-config — load the config the way serve does (secrets included, so a
 * missing key is caught before deployment) and report every error at once.
 * With --online it also asks Dify about every app (GET {base}/info and
 * /parameters) and reports, with the config's JSON path, what does not fit:
 * an endpoint for another app mode, an input the app does not have, a
 * required variable nothing maps, a constant outside a select's options.
 * Then a finding, or an app Dify did not describe, is an error (exit 2).
 * With queue.engine "redis" it also asks the Redis server for the settings
 * serve requires (durability) and says why one is refused: exit 2 for a
 * refused Redis, 1 for one that does not answer.
 */
#include <curl/curl.h>
#include <stdbool.h>
#include <stdio.h>
#include <string.h>

#include "commands.h"
#include "../config/config.h"
#include "../redisq/redisq.h"

static int check_redis(const amp_config *c) {
    amp_redisq_opts ro = amp_cmd_redisq_opts(c);
    char found[512], expected[256];
    amp_redisq_check_result r =
        amp_redisq_check(&ro, found, sizeof found, expected, sizeof expected);
    if (r == AMP_REDISQ_CHECK_OK)
        return 0;
    fprintf(stderr, "%s: queue.url: found %s; expected %s\n", c->file, found, expected);
    return r == AMP_REDISQ_CHECK_REFUSED ? 2 : 1;
}

int amp_cmd_check_config(int argc, char **argv) {
    /* --online anywhere; the rest is -c FILE. */
    bool online = false;
    char *args[8];
    int n = 0;
    for (int i = 0; i < argc; i++) {
        if (i > 0 && strcmp(argv[i], "--online") == 0)
            online = true;
        else if (n < (int)(sizeof args / sizeof args[0]))
            args[n++] = argv[i];
        else
            n = (int)(sizeof args / sizeof args[0]) + 1;
    }
    const char *cfile;
    if (n > (int)(sizeof args / sizeof args[0]) || amp_cmd_config_only(n, args, &cfile) != 0)
        return 2;
    amp_config *c = amp_cmd_load_config(cfile, AMP_CONFIG_SECRETS);
    if (!c)
        return 2;
    int rc = c->queue.engine == AMP_CONFIG_QUEUE_REDIS ? check_redis(c) : 0;
    if (rc != 0) {
        amp_config_destroy(c);
        return rc;
    }
    size_t napps = amp_mapper_app_count(c->mapper);
    if (online) {
        if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK) {
            fprintf(stderr, "%s: curl initialisation failed\n", c->file);
            amp_config_destroy(c);
            return 1;
        }
        amp_errs *findings = amp_errs_create(), *unreachable = amp_errs_create();
        amp_cmd_check_apps(c, findings, unreachable);
        amp_cmd_print_errors(c->file, unreachable);
        amp_cmd_print_errors(c->file, findings);
        if (amp_errs_count(findings) || amp_errs_count(unreachable))
            rc = 2;
        amp_errs_destroy(findings);
        amp_errs_destroy(unreachable);
        curl_global_cleanup();
    }
    if (rc == 0)
        printf("%s: ok (%zu app%s, auth %s%s)\n", c->file, napps, napps == 1 ? "" : "s",
               amp_sig_scheme_name(c->auth.scheme), online ? ", checked against Dify" : "");
    amp_config_destroy(c);
    return rc;
}
