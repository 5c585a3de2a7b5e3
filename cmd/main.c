/*
 * main — command dispatch. `amp2dify` without a command runs `serve`.
 */
#include <stdio.h>
#include <string.h>

#include "commands.h"
#include "../base/version.h"

static const char usage[] =
    "usage: amp2dify [command] [options]\n"
    "\n"
    "commands:\n"
    "  serve        [-c FILE]                         run the daemon (default command)\n"
    "  check-config [-c FILE] [--online]              validate (--online: against each Dify app\n"
    "                                                 too); print every error and exit 2\n"
    "  map          [-c FILE] [--explain] [EVENTS|-]  dry run: print the Dify requests\n"
    "  sign  --secret-env VAR [--timestamp T] [FILE|-]  print signature headers for a body\n"
    "  dlq list|replay|purge [-c FILE] [filters]      dead letters (amp2dify dlq for help)\n"
    "  export --start H --end H [-c FILE] [--restart] backfill hours (YYYY-MM-DDTHH, UTC)\n"
    "               from Amplitude's Export API into the spool\n"
    "  healthcheck  [-c FILE]                         exit 0 when the server's /healthz answers\n"
    "  version                                        print the version\n"
    "\n"
    "Config path: -c, else $AMP2DIFY_CONFIG, else ./amp2dify.json.\n"
    "Environment: AMP2DIFY_LISTEN, AMP2DIFY_SECRETS, AMP2DIFY_SPOOL, AMP2DIFY_LOG_LEVEL,\n"
    "DIFY_BASE_URL, DIFY_API_KEY, AMPLITUDE_API_KEY, AMPLITUDE_SECRET_KEY,\n"
    "AMP2DIFY_SDK_API_KEYS; secrets also as *_FILE.\n"
    "Exit codes: 0 ok, 1 runtime failure, 2 usage or config error.\n";

int main(int argc, char **argv) {
    if (argc < 2 || argv[1][0] == '-') {
        if (argc >= 2 && (strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0)) {
            fputs(usage, stdout);
            return 0;
        }
        if (argc >= 2 && strcmp(argv[1], "--version") == 0) {
            printf("amp2dify %s\n", AMP_VERSION);
            return 0;
        }
        /* Options without a command belong to serve. */
        argv[0] = "serve";
        return amp_cmd_serve(argc, argv);
    }
    const char *cmd = argv[1];
    if (strcmp(cmd, "serve") == 0)
        return amp_cmd_serve(argc - 1, argv + 1);
    if (strcmp(cmd, "check-config") == 0)
        return amp_cmd_check_config(argc - 1, argv + 1);
    if (strcmp(cmd, "map") == 0)
        return amp_cmd_map(argc - 1, argv + 1);
    if (strcmp(cmd, "sign") == 0)
        return amp_cmd_sign(argc - 1, argv + 1);
    if (strcmp(cmd, "healthcheck") == 0)
        return amp_cmd_healthcheck(argc - 1, argv + 1);
    if (strcmp(cmd, "export") == 0)
        return amp_cmd_export(argc - 1, argv + 1);
    if (strcmp(cmd, "dlq") == 0)
        return amp_cmd_dlq(argc - 1, argv + 1);
    if (strcmp(cmd, "version") == 0) {
        printf("amp2dify %s\n", AMP_VERSION);
        return 0;
    }
    if (strcmp(cmd, "help") == 0) {
        fputs(usage, stdout);
        return 0;
    }
    fprintf(stderr, "amp2dify: unknown command '%s'\n\n%s", cmd, usage);
    return 2;
}
