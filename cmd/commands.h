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
int amp_cmd_export(int argc, char **argv);       /* cmd/cmd_export.c */

/* ---- shared by the commands (cmd/cmd_common.c) ---------------------- */

#include <stddef.h>

#include "../base/errs.h"

/* Parse argv for only "-c FILE" / "--config FILE". 0 and *config (borrowed
 * from argv, NULL when absent) on success; -1 after printing a usage error. */
int amp_cmd_config_only(int argc, char **argv, const char **config);

/* Print each error as "<file>: <error>" on stderr. */
void amp_cmd_print_errors(const char *file, const amp_errs *errs);

/* Load the config named by -c (cfile, may be NULL: $AMP2DIFY_CONFIG, else
 * ./amp2dify.json) with amp_config_load flags; on errors print them all and
 * return NULL (exit code 2 for the command). Caller owns the result. */
struct amp_config *amp_cmd_load_config(const char *cfile, unsigned flags);

/* Check every app of cfg (borrowed; its keys resolved) against the live
 * Dify: GET {base}/info and /parameters, compared with the routes
 * (amp_mapper_check_app). What does not fit goes to findings, with its JSON
 * path; an app Dify did not describe (unreachable, key rejected) is one
 * entry of unreachable, "apps.<name>: <why>". curl_global_init must have
 * run. */
void amp_cmd_check_apps(const struct amp_config *cfg, amp_errs *findings, amp_errs *unreachable);

/* How the commands open the queue named by queue.engine. */
enum {
    AMP_CMD_QUEUE_SERVE, /* the engine with its threads: serve */
    AMP_CMD_QUEUE_ADMIN, /* inspection and dead letters only, beside a running daemon: dlq */
};

/* Open cfg's queue engine (cfg borrowed; the handle does not keep it).
 * Caller owns the handle (amp_queue_close); NULL and err on failure. */
struct amp_queue *amp_cmd_open_queue(const struct amp_config *cfg, int how, char *err,
                                     size_t errlen);

/* What cfg's queue engine stores into, for logs: its name in *engine
 * ("sqlite", "redis"; static) and in buf the spool path or the Redis URL
 * with its password hidden. Returns buf. */
const char *amp_cmd_queue_target(const struct amp_config *cfg, const char **engine, char *buf,
                                 size_t len);

/* The Redis engine's options from cfg (strings borrowed from cfg); the
 * dedupe window and the pending limit are the spool's keys. */
struct amp_redisq_opts;
struct amp_redisq_opts amp_cmd_redisq_opts(const struct amp_config *cfg);
/* The Export API options of cfg (borrowed strings), cursor at cursor_path
 * (borrowed); metrics may be NULL (cmd/cmd_export.c). */
#include "../sources/export.h"
struct amp_config;
amp_source_export_opts amp_cmd_export_opts(const struct amp_config *cfg, const char *cursor_path,
                                           amp_metrics *metrics);

#endif
