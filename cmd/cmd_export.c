/*
 * export — backfill from Amplitude's Export API:
 *
 *   amp2dify export --start YYYY-MM-DDTHH --end YYYY-MM-DDTHH [-c FILE] [--restart]
 *
 * The hours start..end (inclusive, UTC; YYYYMMDDTHH works too) are fetched
 * and stored in the queue through the routes, like webhook events; `serve`
 * delivers them. The range has its own cursor file
 * (amp_config_export_cursor with suffix "<start>-<end>"): run again after a
 * failure or a kill, it resumes at the first hour not stored; --restart
 * ignores it and fetches the whole range again (events already stored are
 * duplicates and are not stored twice). Run it while no daemon has the
 * spool open: a daemon polls with sources.export instead.
 */
#include <curl/curl.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "../config/config.h"
#include "../queue/queue.h"
#include "../sources/export.h"
#include "../base/alloc.h"
#include "../base/log.h"
#include "commands.h"

#define EXPORT_USAGE                                                                               \
    "usage: amp2dify export --start YYYY-MM-DDTHH --end YYYY-MM-DDTHH [-c FILE] [--restart]\n"

amp_source_export_opts amp_cmd_export_opts(const amp_config *cfg, const char *cursor_path,
                                           amp_metrics *metrics) {
    return (amp_source_export_opts){
        .base_url = cfg->sources.export.base_url,
        .api_key = cfg->sources.export.api_key,
        .secret_key = cfg->sources.export.secret_key,
        .cursor_path = cursor_path,
        .mapper = cfg->mapper,
        .hours_per_request = cfg->sources.export.hours_per_request,
        .timeout_s = cfg->sources.export.timeout_s,
        .min_request_interval_ms = cfg->sources.export.min_request_interval_ms,
        .retry_initial_ms = cfg->sources.export.retry_initial_ms,
        .max_attempts = cfg->sources.export.max_attempts,
        .batch_events = cfg->sources.export.batch_events,
        .metrics = metrics,
    };
}

static atomic_bool stop_flag;

static void on_signal(int sig) {
    (void)sig;
    atomic_store(&stop_flag, true);
}

int amp_cmd_export(int argc, char **argv) {
    const char *cfile = NULL, *start = NULL, *end = NULL;
    bool restart = false;
    for (int i = 1; i < argc; i++) {
        if ((!strcmp(argv[i], "-c") || !strcmp(argv[i], "--config")) && i + 1 < argc)
            cfile = argv[++i];
        else if (!strcmp(argv[i], "--start") && i + 1 < argc)
            start = argv[++i];
        else if (!strcmp(argv[i], "--end") && i + 1 < argc)
            end = argv[++i];
        else if (!strcmp(argv[i], "--restart"))
            restart = true;
        else {
            fprintf(stderr, "amp2dify export: unexpected argument '%s'\n" EXPORT_USAGE, argv[i]);
            return 2;
        }
    }
    int64_t first, last;
    if (!start || !end) {
        fputs("amp2dify export: --start and --end are required\n" EXPORT_USAGE, stderr);
        return 2;
    }
    if (amp_source_export_parse_hour(start, &first) || amp_source_export_parse_hour(end, &last)) {
        fprintf(stderr,
                "amp2dify export: --start '%s' / --end '%s': expected hours like "
                "2026-11-01T00 (UTC)\n",
                start, end);
        return 2;
    }
    if (last < first) {
        fputs("amp2dify export: --end is before --start\n", stderr);
        return 2;
    }
    amp_config *cfg = amp_cmd_load_config(cfile, AMP_CONFIG_EXPORT_SECRETS);
    if (!cfg)
        return 2;
    amp_log_set_level(cfg->log_level);
    char a[16], b[16], suffix[40];
    amp_source_export_format_hour(first, a, sizeof a);
    amp_source_export_format_hour(last, b, sizeof b);
    snprintf(suffix, sizeof suffix, "%s-%s", a, b);
    char *cursor = amp_config_export_cursor(cfg, suffix);
    int rc = 1;
    char err[512] = "";
    if (restart && unlink(cursor) != 0 && access(cursor, F_OK) == 0) {
        fprintf(stderr, "amp2dify export: cannot remove the cursor '%s'\n", cursor);
        goto out_cfg;
    }
    curl_global_init(CURL_GLOBAL_DEFAULT);
    amp_queue *q = amp_cmd_open_queue(cfg, AMP_CMD_QUEUE_SERVE, err, sizeof err);
    if (!q) {
        fprintf(stderr, "amp2dify export: spool '%s': %s\n", cfg->spool.path, err);
        curl_global_cleanup();
        goto out_cfg;
    }
    atomic_init(&stop_flag, false);
    struct sigaction sa = {.sa_handler = on_signal};
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
    amp_source_export_opts o = amp_cmd_export_opts(cfg, cursor, NULL);
    o.progress = isatty(STDERR_FILENO);
    o.stop = &stop_flag;
    amp_log(AMP_LOG_INFO, "export started", "{s:s, s:s, s:s}", "start", a, "end", b, "cursor",
            cursor);
    amp_source_export_stats st = {0};
    amp_source_export_status s = amp_source_export_run(q, &o, first, last, &st, err, sizeof err);
    amp_queue_close(q);
    curl_global_cleanup();
    amp_log(s == AMP_SOURCE_EXPORT_OK ? AMP_LOG_INFO : AMP_LOG_ERROR,
            s == AMP_SOURCE_EXPORT_OK        ? "export done"
            : s == AMP_SOURCE_EXPORT_STOPPED ? "export stopped; run again to resume"
                                             : "export failed; run again to resume",
            "{s:I, s:I, s:I, s:I, s:I, s:I, s:I, s:I, s:s?}", "hours", (json_int_t)st.hours,
            "events", (json_int_t)st.events, "accepted", (json_int_t)st.accepted, "duplicates",
            (json_int_t)st.duplicates, "filtered", (json_int_t)st.filtered, "rejected",
            (json_int_t)st.rejected, "bytes", (json_int_t)st.bytes, "requests",
            (json_int_t)st.requests, "error", *err ? err : NULL);
    rc = s == AMP_SOURCE_EXPORT_OK ? 0 : 1;
out_cfg:
    free(cursor);
    amp_config_destroy(cfg);
    return rc;
}
