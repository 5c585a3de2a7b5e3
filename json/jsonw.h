/*
 * jsonw — compact JSON text for jansson values, written straight into an
 * amp_buf. The output is byte for byte what json_dumps(v, JSON_COMPACT |
 * JSON_ENCODE_ANY) gives (objects in insertion order, reals as "%.17g" with
 * ".0" added to whole numbers and the exponent's '+' and leading zeros
 * dropped), without jansson's per-fragment callbacks: the ingest path dumps
 * every Dify request body, and the dumper was a tenth of the HTTP threads'
 * CPU.
 *
 * One deliberate difference: an object key that is not valid UTF-8 (only
 * json_object_set*_nocheck can make one) fails here, where jansson writes a
 * broken key and carries on.
 *
 * Threading: reentrant; no shared state. The value must not change while it
 * is written.
 */
#ifndef AMP_JSONW_H
#define AMP_JSONW_H

#include <jansson.h>

#include "../base/buf.h"

/* Deepest container nesting written; deeper values (and values that contain
 * themselves) fail. The same as jansson's parser limit, so anything
 * json_loadb accepts can be written back. */
#define AMP_JSON_MAX_DEPTH 2048

/* Appends v as compact JSON to out. 0; -1 when out would grow beyond its max
 * or v cannot be encoded (NULL, a string that is not valid UTF-8, nesting
 * deeper than AMP_JSON_MAX_DEPTH). On -1 out keeps its previous length and
 * NUL terminator; bytes past them, inside out's allocation, may have been
 * overwritten. v is borrowed. */
int amp_json_write(amp_buf *out, const json_t *v);

/* Appends s[0..n) as a JSON string, quoted and escaped exactly as
 * amp_json_write writes a string value. 0; -1 when s is not valid UTF-8 or
 * out would grow beyond its max (out then keeps its length, as above). */
int amp_json_write_string(amp_buf *out, const char *s, size_t n);

/* Appends v as a JSON integer, the digits amp_json_write writes for it
 * (no printf). 0; -1 when out would grow beyond its max (out then keeps
 * its length, as above). */
int amp_json_write_int(amp_buf *out, long long v);

/* The same as a NUL-terminated string; caller owns (free()). NULL when v
 * cannot be encoded. Aborts on out-of-memory (amp_x* allocators). v is
 * borrowed. */
char *amp_json_dumps(const json_t *v);

#endif
