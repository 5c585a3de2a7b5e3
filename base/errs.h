/*
 * errs — an error list that config loading fills with "json.path: what was
 * wrong" lines, so that every problem of a file is reported, not only the
 * first.
 *
 * Threading: an amp_errs belongs to one thread at a time.
 */
#ifndef AMP_ERRS_H
#define AMP_ERRS_H

#include <stddef.h>

/* Each entry "path: message" (path may be empty). */
typedef struct amp_errs amp_errs;

amp_errs *amp_errs_create(void);    /* caller owns */
void amp_errs_destroy(amp_errs *e); /* accepts NULL */
void amp_errs_add(amp_errs *e, const char *path, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
size_t amp_errs_count(const amp_errs *e);
const char *amp_errs_get(const amp_errs *e, size_t i); /* borrowed */

#endif
