/*
 * schema — config keys as a table, and one reader that walks it.
 *
 * A table is an array of amp_json_schema_row ended by a row whose key is
 * NULL. Each row names one key (a dotted path below the object walked:
 * "listen.port"), its type and range, its default, the environment variable
 * that overrides it, how a reload takes a change of it, and where it is
 * stored in the target struct (offsetof) or the setter that takes it.
 * Sections ("listen", "dify.retry") follow from the dotted keys.
 *
 * The reader fills defaults, checks types and ranges, rejects unknown keys,
 * applies environment overrides and runs the checks attached to rows. Every
 * error has one wording, "path: found X; expected Y" (amp_json_schema_error),
 * which the readers of other grammars in the config use too.
 *
 * Threading: tables are static and read-only; the functions are reentrant
 * and touch only the target and errs they are given.
 */
#ifndef AMP_JSON_SCHEMA_H
#define AMP_JSON_SCHEMA_H

#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "../base/errs.h"

typedef enum {
    AMP_JSON_SCHEMA_STRING,  /* char *, caller of amp_json_schema_free owns it */
    AMP_JSON_SCHEMA_INT,     /* any integer field (size 1, 2, 4 or 8) in [min, max] */
    AMP_JSON_SCHEMA_NUMBER,  /* double in [min, max] */
    AMP_JSON_SCHEMA_BOOL,    /* bool */
    AMP_JSON_SCHEMA_ENUM,    /* integer field (an enum or bool): the index of the name */
    AMP_JSON_SCHEMA_STRLIST, /* char ** NULL-terminated, its count in the size_t at offset2 */
    AMP_JSON_SCHEMA_OBJECT,  /* any object; no field: read by the row's setter or later */
    AMP_JSON_SCHEMA_ARRAY,   /* any array; as OBJECT */
    AMP_JSON_SCHEMA_ANY,     /* any JSON value, for the setter to judge */
} amp_json_schema_type;

/* How a running server takes a change of the key on reload. 0 is no class,
 * so a row that forgets it is caught by the unit test. */
typedef enum {
    AMP_JSON_SCHEMA_LIVE = 1,         /* new requests use it at once */
    AMP_JSON_SCHEMA_RESTART_DELIVERY, /* the delivery workers restart under it */
    AMP_JSON_SCHEMA_RESTART,          /* only a restart applies it; a reload is refused */
} amp_json_schema_reload;

/* Where a row is being read, for setters and checks. */
typedef struct amp_json_schema_at {
    void *target;         /* the struct being filled */
    void *ctx;            /* the reader's own context, passed through */
    const json_t *parent; /* the object holding the key; NULL for an environment value */
    const json_t *value;  /* the key's value; NULL when absent */
    const char *base;     /* JSON path of parent ("apps.support"); "" at the top */
    const char *path;     /* JSON path of the key, or the environment variable */
    amp_errs *errs;
} amp_json_schema_at;

typedef struct amp_json_schema_row {
    const char *key; /* dotted path below the object walked; NULL ends the table */
    amp_json_schema_type type;
    int64_t min, max;         /* INT */
    double dmin, dmax;        /* NUMBER */
    const char *const *names; /* ENUM: NULL-terminated, index = stored value */
    const char *def;          /* default as text (STRLIST: comma-separated); NULL: none */
    const char *env;          /* variable that overrides the file (its value is quoted in errors, so
                                 never a secret's); NULL: none */
    amp_json_schema_reload reload;
    size_t offset, size; /* the field in the target; size 0: no field */
    size_t offset2;      /* STRLIST: the size_t count */
    bool required;       /* absent is an error */
    bool allow_empty;    /* STRING: "" is accepted */
    const char *expect;  /* what the error says is expected, when not derived from the type */
    /* STRING and STRLIST items: is the text acceptable? item_expect says what is. */
    bool (*accept)(const char *s);
    const char *item_expect;
    /* Reads the variable's text instead of the type's parser (e.g. host:port
     * into two fields); 0, or -1 after it reported at at->path. */
    int (*env_set)(const amp_json_schema_at *at, const char *text);
    /* Takes the value (type already checked) instead of storing it; for keys
     * with a grammar of their own. Called only when the key is present. */
    void (*set)(const amp_json_schema_at *at);
    /* Runs after the row is read, present or not (rules across keys). */
    void (*check)(const amp_json_schema_at *at);
    const char *doc; /* def NULL and the reader computes the default: how */
} amp_json_schema_row;

/* offset and size of member m of struct type T, for a row. */
#define AMP_JSON_SCHEMA_FIELD(T, m) .offset = offsetof(T, m), .size = sizeof(((T *)0)->m)

/* The one wording: "path: found <found>; expected <expected...>". */
void amp_json_schema_error(amp_errs *errs, const char *path, const char *found,
                           const char *expected_fmt, ...) __attribute__((format(printf, 4, 5)));
/* "an object", "an array", "an empty array", "a string", "an empty string",
 * "an integer", "a number", "a boolean", "null": a value's kind for
 * "found ...". Static string. */
const char *amp_json_schema_kind(const json_t *v);

/* JSON paths for messages: "base.key" (base["key"] when key is not a plain
 * identifier) and "base[i]". Caller owns. */
char *amp_json_path_key(const char *base, const char *key);
char *amp_json_path_index(const char *base, size_t i);

/* Store every row's default in target (strings are copied). */
void amp_json_schema_defaults(const amp_json_schema_row *rows, void *target);
/* Read obj (borrowed; NULL: nothing present) found at path base into
 * target, after amp_json_schema_defaults. Every problem goes to errs. */
void amp_json_schema_read(const amp_json_schema_row *rows, const json_t *obj, const char *base,
                          void *target, void *ctx, amp_errs *errs);
/* Apply the environment variables of rows that are set and not empty;
 * errors name the variable. */
void amp_json_schema_env(const amp_json_schema_row *rows, void *target, void *ctx, amp_errs *errs);
/* Free what the rows stored in target (strings, lists); target itself is
 * the caller's. Accepts fields left NULL. */
void amp_json_schema_free(const amp_json_schema_row *rows, void *target);

/* Does row r hold the same value in a and b? true for rows without a field. */
bool amp_json_schema_equal(const amp_json_schema_row *r, const void *a, const void *b);
/* The strongest reload class among rows whose value differs between a and
 * b, 0 when none differs; *first_key (may be NULL) is the first such row's
 * key of that class, NULL when none. */
amp_json_schema_reload amp_json_schema_diff(const amp_json_schema_row *rows, const void *a,
                                            const void *b, const char **first_key);

/* Parse text as row r's type into target (defaults and environment values).
 * 0; -1 when it does not parse or is out of range (nothing stored). */
int amp_json_schema_parse_text(const amp_json_schema_row *r, const char *text, void *target);

#endif
