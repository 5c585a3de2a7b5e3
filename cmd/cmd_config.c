/*
 * check-config — load the config the way serve does (secrets included, so a
 * missing key is caught before deployment) and report every error at once.
 * With queue.engine "redis" it also asks the Redis server for the settings
 * serve requires (durability) and says why one is refused: exit 2 for a
 * refused Redis, 1 for one that does not answer.
 */
#include <stdio.h>

#include "commands.h"
#include "../config/config.h"
#include "../redisq/redisq.h"

static int check_redis(const amp_config *c) {
    amp_redisq_opts ro = amp_cmd_redisq_opts(c);
    char found[512], expected[256];
    amp_redisq_check_result r = amp_redisq_check(&ro, found, sizeof found, expected, sizeof expected);
    if (r == AMP_REDISQ_CHECK_OK)
        return 0;
    fprintf(stderr, "%s: queue.url: found %s; expected %s\n", c->file, found, expected);
    return r == AMP_REDISQ_CHECK_REFUSED ? 2 : 1;
}

int amp_cmd_check_config(int argc, char **argv) {
    const char *cfile;
    if (amp_cmd_config_only(argc, argv, &cfile) != 0)
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
    printf("%s: ok (%zu app%s, auth %s)\n", c->file, napps, napps == 1 ? "" : "s",
           amp_sig_scheme_name(c->auth.scheme));
    amp_config_destroy(c);
    return 0;
}
