/*
 * log — one JSON object per line on stderr: {"ts","level","msg", fields...}.
 *
 * Fields are given as a jansson json_pack format and its arguments, so a call
 * reads like the line it writes:
 *     amp_log(AMP_LOG_INFO, "listening", "{s:s, s:i}", "address", a, "port", p);
 * Pass NULL as fmt for a line without fields. Never pass secrets or event
 * bodies above debug level.
 *
 * Threading: safe from any thread; each line is written with one write(2).
 */
#ifndef AMP_LOG_H
#define AMP_LOG_H

#include <stddef.h>

typedef enum { AMP_LOG_DEBUG, AMP_LOG_INFO, AMP_LOG_WARN, AMP_LOG_ERROR } amp_log_level;

void amp_log_set_level(amp_log_level level);
int amp_log_enabled(amp_log_level level);
/* 0 and *out set for "debug", "info", "warn", "error"; -1 otherwise. */
int amp_log_parse_level(const char *name, amp_log_level *out);

void amp_log(amp_log_level level, const char *msg, const char *fmt, ...);

/* The line amp_log writes, for fields already encoded: fields[0..len) is
 * the inside of a JSON object ("\"k\":v,..." without braces; len 0 for
 * none), written after ts, level and msg as they are. For hot paths (the
 * access log): no jansson values are built. The caller checks
 * amp_log_enabled first when encoding the fields costs anything. */
void amp_log_fields(amp_log_level level, const char *msg, const char *fields, size_t len);

#endif
