/*
 * dlq — inspect and act on dead letters in the spool named by the config.
 *
 *   amp2dify dlq list   [-c FILE] [filters] [--json] [--limit N]
 *   amp2dify dlq replay [-c FILE] [--all | ID... | filters]
 *   amp2dify dlq purge  [-c FILE] [--all | ID... | filters]
 *
 * --waiting acts on the events whose workflow paused for human input
 * (state waiting_input: neither pending nor dead) instead of dead letters.
 *
 * Filters: --route R --app A --status N --code C --since T --until T (and
 * --id N, the same as a bare ID), read by amp_queue_dlq_filter_set, where
 * T is Unix seconds or UTC "YYYY-MM-DDTHH:MM:SSZ". Without IDs or filters
 * an action takes every dead letter (--all says so explicitly), as the
 * contract's "dlq list|replay|purge [filters]" reads. Safe beside a running
 * daemon: the spool is opened with amp_spool_open_admin (one connection, no
 * threads, no migrations), which refuses a missing spool or one of another
 * schema version (exit 1).
 */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "../queue/queue.h"
#include "commands.h"
#include "../config/config.h"
#include "../base/alloc.h"
#include "../base/parse.h"

#define DLQ_USAGE                                                                                  \
    "usage: amp2dify dlq list   [-c FILE] [filters] [--json] [--limit N]\n"                        \
    "       amp2dify dlq replay [-c FILE] [--all | ID... | filters]\n"                             \
    "       amp2dify dlq purge  [-c FILE] [--all | ID... | filters]\n"                             \
    "filters: --route R --app A --status N --code C --since T --until T\n"                         \
    "         --waiting: the events waiting for human input instead of dead letters\n"             \
    "         (T: unix seconds or YYYY-MM-DDTHH:MM:SSZ)\n"

typedef struct dlq_args {
    const char *config;
    amp_queue_dlq_filter f; /* its ids owned (amp_queue_dlq_filter_clear) */
    bool all, json;
    int64_t limit;
} dlq_args;

__attribute__((format(printf, 1, 2))) static int usage_error(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fputs("amp2dify dlq: ", stderr);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputs("\n" DLQ_USAGE, stderr);
    return -1;
}

/* Filters are --NAME VALUE with the names amp_queue_dlq_filter_set reads
 * (the admin API's query parameters), and bare IDs. */
static int parse_args(int argc, char **argv, dlq_args *a) {
    a->limit = 1000;
    for (int i = 2; i < argc; i++) {
        const char *o = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        char err[160];
        if (strcmp(o, "--all") == 0) {
            a->all = true;
        } else if (strcmp(o, "--json") == 0) {
            a->json = true;
        } else if (strcmp(o, "--waiting") == 0) {
            a->f.waiting = true;
        } else if (!v && o[0] == '-') {
            return usage_error("%s needs a value", o);
        } else if (strcmp(o, "-c") == 0 || strcmp(o, "--config") == 0) {
            a->config = argv[++i];
        } else if (strcmp(o, "--limit") == 0) {
            if (amp_parse_i64(v, strlen(v), 1, INT64_MAX, &a->limit) != 0)
                return usage_error("--limit '%s' is not a positive number", v);
            i++;
        } else if (strncmp(o, "--", 2) == 0) {
            int rc = amp_queue_dlq_filter_set(&a->f, o + 2, v, err, sizeof err);
            if (rc > 0)
                return usage_error("unexpected argument '%s'", o);
            if (rc < 0)
                return usage_error("%s: %s", o, err);
            i++;
        } else if (amp_queue_dlq_filter_set(&a->f, "id", o, err, sizeof err) != 0) {
            return usage_error("unexpected argument '%s'", o);
        }
    }
    if (a->all && amp_queue_dlq_filter_any(&a->f))
        return usage_error("--all takes no IDs or filters");
    return 0;
}

static void print_table(const json_t *rows, bool waiting) {
    printf("%-8s %-20s %-16s %-12s %-6s %-24s %-8s %s\n", "ID",
           waiting ? "WAITING_SINCE" : "DEAD_AT", "ROUTE", "APP", "STATUS", "CODE", "ATTEMPTS",
           waiting ? "WORKFLOW_RUN_ID" : "MESSAGE");
    size_t i;
    json_t *row;
    json_array_foreach(rows, i, row) {
        time_t t = (time_t)(json_integer_value(json_object_get(row, "dead_ms")) / 1000);
        struct tm tm;
        char when[32];
        gmtime_r(&t, &tm);
        strftime(when, sizeof when, "%Y-%m-%dT%H:%M:%SZ", &tm);
        const char *code = json_string_value(json_object_get(row, "code"));
        const char *msg = json_string_value(json_object_get(row, "message"));
        if (waiting)
            msg = json_string_value(
                json_object_get(json_object_get(row, "result"), "workflow_run_id"));
        printf("%-8lld %-20s %-16s %-12s %-6lld %-24s %-8lld %.80s\n",
               (long long)json_integer_value(json_object_get(row, "id")), when,
               json_string_value(json_object_get(row, "route")),
               json_string_value(json_object_get(row, "app")),
               (long long)json_integer_value(json_object_get(row, "status")), code ? code : "-",
               (long long)json_integer_value(json_object_get(row, "attempts")), msg ? msg : "");
    }
}

int amp_cmd_dlq(int argc, char **argv) {
    if (argc < 2) {
        fputs(DLQ_USAGE, stderr);
        return 2;
    }
    const char *action = argv[1];
    if (strcmp(action, "list") != 0 && strcmp(action, "replay") != 0 &&
        strcmp(action, "purge") != 0) {
        usage_error("unknown action '%s'", action);
        return 2;
    }
    dlq_args a = {0};
    if (parse_args(argc, argv, &a) != 0) {
        amp_queue_dlq_filter_clear(&a.f);
        return 2;
    }
    amp_config *cfg = amp_cmd_load_config(a.config, 0);
    if (!cfg) {
        amp_queue_dlq_filter_clear(&a.f);
        return 2;
    }

    char err[512];
    /* One connection and no spool threads: the daemon may own the spool. */
    amp_queue *s = amp_cmd_open_queue(cfg, AMP_CMD_QUEUE_ADMIN, err, sizeof err);
    int rc = 1;
    if (!s) {
        fprintf(stderr, "amp2dify dlq: %s\n", err);
    } else if (action[0] == 'l') {
        json_t *rows = amp_queue_dlq_list(s, &a.f, (size_t)a.limit);
        if (rows) {
            if (a.json) {
                size_t i;
                json_t *row;
                json_array_foreach(rows, i, row) {
                    char *line = json_dumps(row, JSON_COMPACT | JSON_PRESERVE_ORDER);
                    if (line)
                        puts(line);
                    free(line);
                }
            } else {
                print_table(rows, a.f.waiting);
            }
            json_decref(rows);
            rc = 0;
        }
    } else {
        int64_t n = action[0] == 'r' ? amp_queue_dlq_replay(s, &a.f) : amp_queue_dlq_purge(s, &a.f);
        if (n >= 0) {
            printf("%s %lld %s%s\n", action[0] == 'r' ? "replayed" : "purged", (long long)n,
                   a.f.waiting ? "waiting event" : "dead letter", n == 1 ? "" : "s");
            rc = 0;
        }
    }
    amp_queue_close(s);
    amp_config_destroy(cfg);
    amp_queue_dlq_filter_clear(&a.f);
    return rc;
}
