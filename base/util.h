/*
 * util — small shared pieces every module uses: allocation that aborts on
 * failure, clocks, a growable buffer with a hard maximum, and an error list
 * that config loading fills with "json.path: what was wrong" lines.
 *
 * Threading: everything here is reentrant; an amp_buf or amp_errs belongs to
 * one thread at a time.
 */
#ifndef AMP_UTIL_H
#define AMP_UTIL_H

#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

/* Allocation failure is not recoverable in a relay: these abort. */
void *amp_xmalloc(size_t n);
void *amp_xcalloc(size_t count, size_t size);
void *amp_xrealloc(void *p, size_t n);
char *amp_xstrdup(const char *s);            /* caller owns; NULL in, NULL out */
char *amp_xstrndup(const char *s, size_t n); /* caller owns */
char *amp_xasprintf(const char *fmt, ...)    /* caller owns */
    __attribute__((format(printf, 1, 2)));
char *amp_xvasprintf(const char *fmt, va_list ap) /* caller owns; ap is consumed */
    __attribute__((format(printf, 1, 0)));

int64_t amp_now_ms(void);  /* wall clock, Unix epoch milliseconds */
int64_t amp_mono_ms(void); /* monotonic milliseconds, for intervals */

/* Parse a whole decimal string into [min, max]; 0 on success, -1 otherwise.
 * Rejects signs where min >= 0, empty strings, trailing bytes and overflow. */
int amp_parse_i64(const char *s, size_t len, int64_t min, int64_t max, int64_t *out);

/* Growable byte buffer with a hard maximum fixed at init (curl's dynbuf).
 * data is always NUL-terminated after a successful append. */
typedef struct amp_buf {
    char *data;
    size_t len;
    size_t cap;
    size_t max;
} amp_buf;

void amp_buf_init(amp_buf *b, size_t max);
/* 0 on success; -1 when the result would exceed max (buffer unchanged). */
int amp_buf_append(amp_buf *b, const void *p, size_t n);
/* Append everything f holds until end of file. 0; -1 when it would exceed
 * max (b keeps what fitted); -2 on a read error (errno says which). */
int amp_buf_read(amp_buf *b, FILE *f);
void amp_buf_reset(amp_buf *b);
void amp_buf_free(amp_buf *b);

/* Error list: each entry "path: message" (path may be empty). */
typedef struct amp_errs amp_errs;

amp_errs *amp_errs_create(void);
void amp_errs_destroy(amp_errs *e); /* accepts NULL */
void amp_errs_add(amp_errs *e, const char *path, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
size_t amp_errs_count(const amp_errs *e);
const char *amp_errs_get(const amp_errs *e, size_t i); /* borrowed */

#endif
