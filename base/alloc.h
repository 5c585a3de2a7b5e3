/*
 * alloc — allocation that aborts on failure (Redis's zmalloc, curl's
 * Curl_cmalloc): a relay that cannot allocate cannot do anything useful, so
 * callers never check for NULL.
 *
 * Threading: reentrant.
 */
#ifndef AMP_ALLOC_H
#define AMP_ALLOC_H

#include <stdarg.h>
#include <stddef.h>

void *amp_xmalloc(size_t n);
void *amp_xcalloc(size_t count, size_t size);
void *amp_xrealloc(void *p, size_t n);
char *amp_xstrdup(const char *s);            /* caller owns; NULL in, NULL out */
char *amp_xstrndup(const char *s, size_t n); /* caller owns */
char *amp_xasprintf(const char *fmt, ...)    /* caller owns */
    __attribute__((format(printf, 1, 2)));
char *amp_xvasprintf(const char *fmt, va_list ap) /* caller owns; ap is consumed */
    __attribute__((format(printf, 1, 0)));

#endif
