/*
 * check-config — load the config the way serve does (secrets included, so a
 * missing key is caught before deployment) and report every error at once.
 */
#include <stdio.h>

#include "commands.h"
#include "config.h"

int amp_cmd_check_config(int argc, char **argv) {
    const char *cfile;
    if (amp_cmd_config_only(argc, argv, &cfile) != 0)
        return 2;
    const char *path = amp_config_default_path(cfile);
    amp_errs *errs = amp_errs_create();
    amp_config *c = amp_config_load(path, AMP_CONFIG_SECRETS, errs);
    int rc = 0;
    if (!c) {
        amp_cmd_print_errors(path, errs);
        rc = 2;
    } else {
        size_t napps = amp_mapper_app_count(c->mapper);
        printf("%s: ok (%zu app%s, auth %s)\n", path, napps, napps == 1 ? "" : "s",
               amp_sig_scheme_name(c->auth.scheme));
    }
    amp_config_destroy(c);
    amp_errs_destroy(errs);
    return rc;
}
