#include "log.h"

#include <jansson.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
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

/* One write per line keeps lines whole. */
static void write_line(const char *text, size_t n) {
    size_t off = 0;
    while (off < n) {
        ssize_t w = write(STDERR_FILENO, text + off, n - off);
        if (w <= 0)
            break;
        off += (size_t)w;
    }
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
    text[n] = '\n'; /* overwrite the NUL */
    write_line(text, n + 1);
    free(text);
}

/* Whether s is written in JSON as it is: printable ASCII, no quote or
 * backslash (every message in the code). */
static int plain_ascii(const char *s) {
    for (; *s; s++)
        if ((unsigned char)*s < 0x20 || (unsigned char)*s >= 0x7f || *s == '"' || *s == '\\')
            return 0;
    return 1;
}

void amp_log_fields(amp_log_level level, const char *msg, const char *fields, size_t len) {
    if (!amp_log_enabled(level))
        return;
    /* A message that needs escapes is encoded by jansson, as amp_log does
     * (and, not being UTF-8, gives no line, as there). */
    char *encoded = NULL;
    const char *quote = "\"";
    if (!plain_ascii(msg)) {
        json_t *m = json_string(msg);
        encoded = m ? json_dumps(m, JSON_ENCODE_ANY) : NULL;
        json_decref(m);
        if (!encoded)
            return;
        msg = encoded;
        quote = "";
    }
    char ts[40];
    format_ts(ts, sizeof ts);
    char stack[1024];
    char *line = stack;
    size_t cap = sizeof stack;
    for (;;) {
        int hn = snprintf(line, cap, "{\"ts\":\"%s\",\"level\":\"%s\",\"msg\":%s%s%s%s", ts,
                          level_names[level], quote, msg, quote, len ? "," : "");
        if (hn < 0)
            break;
        size_t total = (size_t)hn + len + 2; /* the fields, '}' and '\n' */
        if (total <= cap) {
            memcpy(line + hn, fields, len);
            line[(size_t)hn + len] = '}';
            line[(size_t)hn + len + 1] = '\n';
            write_line(line, total);
            break;
        }
        if (line != stack) /* cannot happen: the second round has room */
            break;
        line = malloc(total);
        if (!line) {
            line = stack;
            break;
        }
        cap = total;
    }
    if (line != stack)
        free(line);
    free(encoded);
}
