/*
 * cmd_map — `amp2dify map [-c FILE] [--explain] [EVENTS|-]`: a dry run of
 * the mapping. Reads events in any body format the server accepts, or as
 * JSON lines, and prints one compact line per Dify request:
 *   {"route":...,"app":...,"endpoint":"chat-messages","body":{...}}
 * With --explain, stderr says for each event which rule stopped each route.
 *
 * Exit 0 when every event mapped; 2 on usage, config or input errors (an
 * event a route declares invalid is reported and the others still print);
 * 1 when reading or writing fails.
 */
#include <errno.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "commands.h"
#include "../config/config.h"
#include "../base/buf.h"

/* A dry run reads a file a person points it at; still, never unbounded. */
#define MAP_INPUT_MAX ((size_t)256 * 1024 * 1024)

static void usage(FILE *f) {
    fputs("usage: amp2dify map [-c FILE] [--explain] [EVENTS|-]\n"
          "  Print the Dify requests the config's routes make from EVENTS (a file,\n"
          "  or stdin when '-' or absent): one event, an array of events,\n"
          "  {\"events\":[...]}, or JSON lines.\n"
          "  -c FILE     config file (default $AMP2DIFY_CONFIG, else ./amp2dify.json)\n"
          "  --explain   say on stderr why each event skipped each route\n",
          f);
}

/* 0 with the whole input in *out (caller owns), -1 after printing why. */
static int read_all(FILE *f, const char *name, amp_buf *out) {
    amp_buf_init(out, MAP_INPUT_MAX);
    amp_buf_append(out, "", 0);
    int rc = amp_buf_read(out, f);
    if (rc == -1)
        fprintf(stderr, "%s: input larger than %zu bytes\n", name, MAP_INPUT_MAX);
    else if (rc == -2)
        fprintf(stderr, "%s: read failed: %s\n", name, strerror(errno));
    return rc == 0 ? 0 : -1;
}

static bool blank_line(const char *s, size_t n) {
    for (size_t i = 0; i < n; i++)
        if (s[i] != ' ' && s[i] != '\t' && s[i] != '\r')
            return false;
    return true;
}

/* JSON lines: several non-blank lines, the first a JSON value on its own.
 * Returns 1 when the input has that shape. */
static int looks_like_json_lines(const char *data, size_t len) {
    size_t lines = 0, pos = 0;
    bool first_ok = false;
    while (pos < len && lines < 2) {
        const char *nl = memchr(data + pos, '\n', len - pos);
        size_t end = nl ? (size_t)(nl - data) : len;
        if (!blank_line(data + pos, end - pos)) {
            if (lines == 0) {
                json_error_t e;
                json_t *v = json_loadb(data + pos, end - pos, JSON_DECODE_ANY, &e);
                first_ok = v != NULL;
                json_decref(v);
            }
            lines++;
        }
        pos = end + 1;
    }
    return lines >= 2 && first_ok;
}

/* Decode every line into one array of events (caller owns). NULL after
 * printing each bad line. */
static json_t *decode_lines(const char *data, size_t len, const char *name) {
    json_t *all = json_array();
    if (!all)
        abort();
    bool bad = false;
    size_t pos = 0, lineno = 0;
    while (pos < len) {
        const char *nl = memchr(data + pos, '\n', len - pos);
        size_t end = nl ? (size_t)(nl - data) : len;
        lineno++;
        if (!blank_line(data + pos, end - pos)) {
            json_error_t e;
            json_t *v =
                json_loadb(data + pos, end - pos, JSON_DECODE_ANY | JSON_REJECT_DUPLICATES, &e);
            if (!v) {
                fprintf(stderr, "%s: line %zu, column %d: %s\n", name, lineno, e.column, e.text);
                bad = true;
            } else {
                json_decref(v);
                json_t *events;
                char detail[512];
                if (amp_map_decode_body(data + pos, end - pos, &events, detail, sizeof(detail)) !=
                    AMP_DECODE_OK) {
                    fprintf(stderr, "%s: line %zu: %s\n", name, lineno, detail);
                    bad = true;
                } else {
                    json_array_extend(all, events);
                    json_decref(events);
                }
            }
        }
        pos = end + 1;
    }
    if (bad) {
        json_decref(all);
        return NULL;
    }
    return all;
}

typedef struct map_ctx {
    size_t event;
    bool write_failed;
} map_ctx;

static void on_request(void *arg, const amp_map_request *req) {
    map_ctx *c = arg;
    json_t *line = json_object();
    if (!line)
        abort();
    json_object_set_new(line, "route", json_string(req->route));
    json_object_set_new(line, "app", json_string(req->app->name));
    char *path = amp_map_app_path(req->app);
    json_object_set_new(line, "endpoint", json_string(path));
    free(path);
    json_object_set(line, "body", req->body);
    char *s = json_dumps(line, JSON_COMPACT | JSON_PRESERVE_ORDER);
    json_decref(line);
    if (!s)
        abort();
    if (fputs(s, stdout) == EOF || fputc('\n', stdout) == EOF)
        c->write_failed = true;
    free(s);
}

static void on_explain(void *arg, const char *route, const char *reason) {
    map_ctx *c = arg;
    fprintf(stderr, "event %zu route %s: %s\n", c->event, route, reason);
}

int amp_cmd_map(int argc, char **argv) {
    const char *cfile = NULL, *input = NULL;
    bool explain = false, opts_done = false;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!opts_done && (!strcmp(a, "-c") || !strcmp(a, "--config"))) {
            if (i + 1 >= argc) {
                fprintf(stderr, "amp2dify map: %s needs a file\n", a);
                usage(stderr);
                return 2;
            }
            cfile = argv[++i];
        } else if (!opts_done && !strcmp(a, "--explain")) {
            explain = true;
        } else if (!opts_done && (!strcmp(a, "-h") || !strcmp(a, "--help"))) {
            usage(stdout);
            return 0;
        } else if (!opts_done && !strcmp(a, "--")) {
            opts_done = true;
        } else if (!opts_done && a[0] == '-' && a[1]) {
            fprintf(stderr, "amp2dify map: unknown option '%s'\n", a);
            usage(stderr);
            return 2;
        } else if (input) {
            fprintf(stderr, "amp2dify map: more than one input ('%s', '%s')\n", input, a);
            usage(stderr);
            return 2;
        } else {
            input = a;
        }
    }

    amp_config *cfg = amp_cmd_load_config(cfile, 0);
    if (!cfg)
        return 2;

    bool from_stdin = !input || !strcmp(input, "-");
    const char *name = from_stdin ? "stdin" : input;
    FILE *f = from_stdin ? stdin : fopen(input, "rb");
    if (!f) {
        fprintf(stderr, "%s: cannot open: %s\n", name, strerror(errno));
        amp_config_destroy(cfg);
        return 2;
    }
    amp_buf data;
    int rc = read_all(f, name, &data);
    if (!from_stdin)
        fclose(f);
    if (rc != 0) {
        amp_buf_free(&data);
        amp_config_destroy(cfg);
        return 1;
    }

    json_t *events = NULL;
    char detail[512];
    amp_decode_result dr =
        amp_map_decode_body(data.data, data.len, &events, detail, sizeof(detail));
    if (dr == AMP_DECODE_INVALID_JSON && looks_like_json_lines(data.data, data.len)) {
        events = decode_lines(data.data, data.len, name);
        dr = events ? AMP_DECODE_OK : AMP_DECODE_INVALID_EVENT;
    } else if (dr != AMP_DECODE_OK) {
        fprintf(stderr, "%s: %s\n", name, detail);
    }
    amp_buf_free(&data);
    if (dr != AMP_DECODE_OK) {
        amp_config_destroy(cfg);
        return 2;
    }

    int status = 0;
    map_ctx ctx = {0};
    size_t i;
    json_t *ev;
    json_array_foreach(events, i, ev) {
        ctx.event = i;
        int n = amp_mapper_apply(cfg->mapper, ev, on_request, &ctx, explain ? on_explain : NULL,
                                 &ctx, detail, sizeof(detail));
        if (n < 0) {
            fprintf(stderr, "%s: event %zu: %s\n", name, i, detail);
            status = 2;
        }
    }
    json_decref(events);
    amp_config_destroy(cfg);
    if (fflush(stdout) != 0 || ctx.write_failed) {
        fprintf(stderr, "amp2dify map: write failed: %s\n", strerror(errno));
        return 1;
    }
    return status;
}
