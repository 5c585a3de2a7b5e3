/*
 * commands — the subcommands of the amp2dify binary (SPEC "Command line").
 * Each takes the arguments after the command name (argv[0] is the command)
 * and returns the process exit code: 0 ok, 1 runtime failure, 2 usage or
 * config error.
 */
#ifndef AMP_COMMANDS_H
#define AMP_COMMANDS_H

int amp_cmd_serve(int argc, char **argv);        /* cmd/serve.c */
int amp_cmd_check_config(int argc, char **argv); /* cmd/cmd_config.c */
int amp_cmd_map(int argc, char **argv);          /* cmd/cmd_map.c */
int amp_cmd_sign(int argc, char **argv);         /* cmd/cmd_sign.c */
int amp_cmd_dlq(int argc, char **argv);          /* cmd/cmd_dlq.c */
int amp_cmd_healthcheck(int argc, char **argv);  /* cmd/cmd_healthcheck.c */

/* ---- shared by the commands (cmd/cmd_common.c) ---------------------- */

#include "../base/util.h"

/* Parse argv for only "-c FILE" / "--config FILE". 0 and *config (borrowed
 * from argv, NULL when absent) on success; -1 after printing a usage error. */
int amp_cmd_config_only(int argc, char **argv, const char **config);

/* Print each error as "<file>: <error>" on stderr. */
void amp_cmd_print_errors(const char *file, const amp_errs *errs);

/* Load the config named by -c (cfile, may be NULL: $AMP2DIFY_CONFIG, else
 * ./amp2dify.json) with amp_config_load flags; on errors print them all and
 * return NULL (exit code 2 for the command). Caller owns the result. */
struct amp_config *amp_cmd_load_config(const char *cfile, unsigned flags);

#endif
