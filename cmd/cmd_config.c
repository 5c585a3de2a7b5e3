/*
 * check-config — load the config the way serve does (secrets included, so a
 * missing key is caught before deployment) and report every error at once.
 */
#include <stdio.h>

#include "commands.h"
#include "../config/config.h"

int amp_cmd_check_config(int argc, char **argv) {
    const char *cfile;
    if (amp_cmd_config_only(argc, argv, &cfile) != 0)
        return 2;
    amp_config *c = amp_cmd_load_config(cfile, AMP_CONFIG_SECRETS);
    if (!c)
        return 2;
    size_t napps = amp_mapper_app_count(c->mapper);
    printf("%s: ok (%zu app%s, auth %s)\n", c->file, napps, napps == 1 ? "" : "s",
           amp_sig_scheme_name(c->auth.scheme));
    amp_config_destroy(c);
    return 0;
}
