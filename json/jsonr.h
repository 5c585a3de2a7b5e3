/*
 * jsonr — a strict JSON reader that builds jansson values in one pass over
 * the bytes. Every webhook body is decoded on the request path, and
 * jansson's own loader (a per-character stream with a growing buffer) was
 * most of that cost.
 *
 * It accepts a subset of what json_loadb(s, len, JSON_REJECT_DUPLICATES |
 * JSON_DECODE_ANY) accepts and builds the same value for it: same types
 * (a number with '.', 'e' or 'E' is a real, otherwise an integer), same
 * numbers, same string bytes, same object key order. Everything else gives
 * NULL, and the caller falls back to json_loadb, which then either rejects
 * the text with its usual error message or accepts what this reader chose
 * not to handle. So NULL never means "invalid" on its own. The one kind of
 * text jansson accepts and this reader declines holds a NUL byte: jansson
 * skips one right after a number or literal ("1\0" loads as 1), and such
 * texts are left to it.
 *
 * Threading: reentrant; no shared state apart from a C numeric locale made
 * once on first use.
 */
#ifndef AMP_JSONR_H
#define AMP_JSONR_H

#include <stddef.h>

#include <jansson.h>

/* Parses the whole of s[0..len) as one JSON value (any type at the top)
 * into jansson values, rejecting duplicate object keys. Returns the value
 * (caller owns; json_decref it), or NULL when the text is not one this
 * reader accepts: then ask json_loadb with JSON_REJECT_DUPLICATES |
 * JSON_DECODE_ANY for the verdict and the error message. s need not be
 * NUL-terminated and is borrowed; NULL or len 0 give NULL. */
json_t *amp_json_parse(const char *s, size_t len);

/* json_loadb(s, len, flags, err), with amp_json_parse tried first: the same
 * value or the same failure (and error message), for flags made of
 * JSON_REJECT_DUPLICATES and JSON_DECODE_ANY (any other flag goes straight
 * to json_loadb). err is written only on failure. Caller owns the result. */
json_t *amp_json_loadb(const char *s, size_t len, size_t flags, json_error_t *err);

#endif
