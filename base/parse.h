/*
 * parse — whole-string number parsing for headers, arguments and the
 * environment, where strtoll's partial acceptance would let "12abc" or
 * " 5" through.
 *
 * Threading: reentrant.
 */
#ifndef AMP_PARSE_H
#define AMP_PARSE_H

#include <stddef.h>
#include <stdint.h>

/* Parse a whole decimal string into [min, max]; 0 on success, -1 otherwise.
 * Rejects signs where min >= 0, empty strings, trailing bytes and overflow. */
int amp_parse_i64(const char *s, size_t len, int64_t min, int64_t max, int64_t *out);

#endif
