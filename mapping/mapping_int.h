/*
 * mapping_int — pieces shared between the files of the mapping module and
 * nothing else: field paths, value rendering, time parsing, compiled filters,
 * transform chains and templates. Everything here is compiled once at config
 * load; the *_eval / *_apply / *_render / *_get functions parse nothing and
 * are reentrant on the immutable compiled objects.
 */
#ifndef AMP_MAPPING_INT_H
#define AMP_MAPPING_INT_H

#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "../base/buf.h"
#include "../base/errs.h"
#include "../json/schema.h"

/* Deepest container nesting accepted inside one event (the event object
 * itself is level 1). Keeps every later recursive walk shallow. */
#define AMP_EVENT_MAX_DEPTH 64
/* Deepest all/any/not nesting accepted in a filter. */
#define AMP_FILTER_MAX_DEPTH 32
/* A rendered template never grows beyond this; longer output is cut at a
 * code point boundary. */
#define AMP_TEMPLATE_MAX_BYTES (1024 * 1024)

/* ---- messages -------------------------------------------------------- */

/* "object", "array", "string", "number", "boolean", "null". */
const char *amp_map_json_kind(const json_t *v);

/* ---- field paths ----------------------------------------------------- */

typedef struct amp_path_seg {
    char *key;    /* object key; NULL for an array index */
    size_t index; /* array index when key is NULL */
} amp_path_seg;

typedef struct amp_path {
    char *text; /* as written in the config, for messages */
    amp_path_seg *segs;
    size_t nsegs;
} amp_path;

/* Parse `a.b["c.d"][0]`. allow_index permits [N] array steps (sources);
 * targets only name object keys. 0 on success; -1 with a message in err. */
int amp_map_path_parse(amp_path *p, const char *text, bool allow_index, char *err, size_t errlen);
void amp_map_path_free(amp_path *p); /* accepts a zeroed path */
/* The value at p inside root (borrowed), or NULL when any step is missing. */
json_t *amp_map_path_get(const amp_path *p, const json_t *root);
/* Set root.<p> = value, creating intermediate objects (takes ownership of
 * value). An intermediate object that is shared (referenced more than once:
 * a mapped value is the event's own object) is replaced by a shallow copy
 * before it is written into, so no other tree changes. -1 when an
 * intermediate step exists and is not an object. */
int amp_map_path_set(const amp_path *p, json_t *root, json_t *value);

/* ---- values ---------------------------------------------------------- */

/* Type-aware equality: numbers compare by value (1 == 1.0), a number never
 * equals a string; arrays and objects compare element-wise. */
bool amp_map_value_equal(const json_t *a, const json_t *b);
/* Compare two numbers exactly (integers beyond 2^53 included): <0, 0, >0. */
int amp_map_number_cmp(const json_t *a, const json_t *b);
/* Append the text form of v to out: strings as-is, numbers and booleans as
 * JSON text, objects and arrays as compact JSON, null appends nothing.
 * -1 when out's maximum was reached (out then holds a prefix). */
int amp_map_value_render(const json_t *v, amp_buf *out);
/* Shortest text that reads back as the same double; JSON-style ("1.0",
 * "1e22"). buf must hold 32 bytes. */
void amp_map_real_format(double d, char *buf, size_t len);

/* ---- filters --------------------------------------------------------- */

typedef struct amp_filter amp_filter;

/* Compile spec (borrowed) found at JSON path `path`. NULL after adding
 * every problem to errs. */
amp_filter *amp_map_filter_compile(const json_t *spec, const char *path, amp_errs *errs);
void amp_map_filter_free(amp_filter *f); /* accepts NULL */
bool amp_map_filter_eval(const amp_filter *f, const json_t *event);
/* Why f is false for event: appends "filter all[0]: event_type equals "X"
 * is false" to out. Only meaningful when amp_map_filter_eval returned false. */
void amp_map_filter_explain(const amp_filter *f, const json_t *event, amp_buf *out);

/* ---- transforms ------------------------------------------------------ */

typedef struct amp_xform amp_xform;

/* Compile a "trim|lowercase" chain (a string, or an array of transform
 * strings) found at `path`. NULL after adding problems to errs. */
amp_xform *amp_map_xform_compile(const json_t *spec, const char *path, amp_errs *errs);
void amp_map_xform_free(amp_xform *x); /* accepts NULL */
/* Run the chain on v (takes ownership; NULL = the source is missing).
 * Returns the result (caller owns; NULL = missing, target left unset). When
 * a "required" step finds nothing, returns NULL and sets *required_failed to
 * "missing" or "null". */
json_t *amp_map_xform_apply(const amp_xform *x, json_t *v, const char **required_failed);

/* ---- templates ------------------------------------------------------- */

typedef struct amp_tmpl amp_tmpl;

/* Compile "{{event_type}} by {{inputs.username}}" found at `path`. NULL
 * after adding problems to errs. */
amp_tmpl *amp_map_tmpl_compile(const char *text, const char *path, amp_errs *errs);
void amp_map_tmpl_free(amp_tmpl *t); /* accepts NULL */
/* Append the rendering to out (reset by the caller). {{path}} reads event,
 * {{inputs.path}} reads inputs; missing or null values render as "". */
void amp_map_tmpl_render(const amp_tmpl *t, const json_t *event, const json_t *inputs,
                         amp_buf *out);
/* The value of t: when t is one lone field, that field's value (a new
 * reference; NULL when missing or null); else the rendering as a JSON
 * string (capped like a render). */
json_t *amp_map_tmpl_value(const amp_tmpl *t, const json_t *event, const json_t *inputs);

#endif
