#include "log.h"

#include <jansson.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static atomic_int min_level = AMP_LOG_INFO;

static const char *const level_names[] = {"debug", "info", "warn", "error"};

void amp_log_set_level(amp_log_level level) {
    atomic_store(&min_level, (int)level);
}

int amp_log_enabled(amp_log_level level) {
    return (int)level >= atomic_load(&min_level);
}

int amp_log_parse_level(const char *name, amp_log_level *out) {
    for (int i = 0; i < 4; i++) {
        if (strcmp(name, level_names[i]) == 0) {
            *out = (amp_log_level)i;
            return 0;
        }
    }
    return -1;
}

static void format_ts(char *out, size_t len) {
    struct timespec ts;
    struct tm tm;
    clock_gettime(CLOCK_REALTIME, &ts);
    gmtime_r(&ts.tv_sec, &tm);
    char base[24];
    strftime(base, sizeof base, "%Y-%m-%dT%H:%M:%S", &tm);
    snprintf(out, len, "%s.%03dZ", base, (int)(ts.tv_nsec / 1000000) % 1000);
}

void amp_log(amp_log_level level, const char *msg, const char *fmt, ...) {
    if (!amp_log_enabled(level))
        return;

    char ts[40];
    format_ts(ts, sizeof ts);
    json_t *line = json_pack("{s:s, s:s, s:s}", "ts", ts, "level", level_names[level], "msg", msg);
    if (!line)
        return;
    if (fmt) {
        va_list ap;
        va_start(ap, fmt);
        json_error_t err;
        json_t *fields = json_vpack_ex(&err, 0, fmt, ap);
        va_end(ap);
        if (fields) {
            json_object_update_missing(line, fields);
            json_decref(fields);
        } else {
            json_object_set_new(line, "log_error", json_string(err.text));
        }
    }
    char *text = json_dumps(line, JSON_COMPACT | JSON_PRESERVE_ORDER);
    json_decref(line);
    if (!text)
        return;
    size_t n = strlen(text);
    text[n] = '\n'; /* overwrite the NUL: one write per line keeps lines whole */
    ssize_t off = 0;
    while ((size_t)off < n + 1) {
        ssize_t w = write(STDERR_FILENO, text + off, n + 1 - (size_t)off);
        if (w <= 0)
            break;
        off += w;
    }
    free(text);
}
