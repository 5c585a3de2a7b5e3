/*
 * filter — route filters: {"field","op","value"} rules composed with
 * {"all":[...]}, {"any":[...]} and {"not":{...}}. Compiled once (paths split,
 * regexes compiled); evaluation only looks values up and compares.
 *
 * Semantics worth knowing:
 *   - A missing field makes every op false, so not_equals (its negation) is
 *     true for a missing field.
 *   - Comparisons are type-aware: 1 equals 1.0, a number never equals the
 *     string of its digits; gt/gte/lt/lte are false unless both are numbers.
 *   - regex is a POSIX extended regex searched anywhere in the string (anchor
 *     with ^ and $); non-strings never match.
 */
#include <regex.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "mapping_int.h"
#include "../base/alloc.h"
#include "../base/buf.h"
#include "../base/errs.h"

typedef enum { F_ALL, F_ANY, F_NOT, F_RULE } fkind;

typedef enum {
    OP_EQUALS,
    OP_NOT_EQUALS,
    OP_IN,
    OP_REGEX,
    OP_EXISTS,
    OP_EXCLUDE_NULL,
    OP_GT,
    OP_GTE,
    OP_LT,
    OP_LTE,
    OP_PREFIX,
} fop;

static const char *const op_names[] = {
    "equals", "not_equals", "in", "regex", "exists", "exclude_null",
    "gt",     "gte",        "lt", "lte",   "prefix",
};
#define NOPS (sizeof(op_names) / sizeof(op_names[0]))
#define OPS_LIST "equals, not_equals, in, regex, exists, exclude_null, gt, gte, lt, lte, prefix"
#define FIELD_EXPECT "a field path such as \"event_type\""

struct amp_filter {
    fkind kind;
    /* all / any / not */
    amp_filter **kids;
    size_t nkids;
    /* rule */
    fop op;
    amp_path field;
    json_t *value;
    bool has_re;
    regex_t re;
};

void amp_map_filter_free(amp_filter *f) {
    if (!f)
        return;
    for (size_t i = 0; i < f->nkids; i++)
        amp_map_filter_free(f->kids[i]);
    free(f->kids);
    amp_map_path_free(&f->field);
    json_decref(f->value);
    if (f->has_re)
        regfree(&f->re);
    free(f);
}

static amp_filter *compile_node(const json_t *spec, const char *path, int depth, amp_errs *errs);

static amp_filter *compile_combinator(const json_t *spec, const char *path, int depth,
                                      amp_errs *errs) {
    const char *key;
    json_t *val;
    const char *which = NULL;
    bool ok = true;
    json_object_foreach((json_t *)spec, key, val) {
        if (!strcmp(key, "all") || !strcmp(key, "any") || !strcmp(key, "not")) {
            if (which) {
                char found[64];
                snprintf(found, sizeof found, "both '%s' and '%s'", which, key);
                amp_json_schema_error(errs, path, found, "one of all, any, not per object");
                ok = false;
            } else {
                which = key;
            }
        } else {
            char *p = amp_json_path_key(path, key);
            amp_json_schema_error(errs, p, "an unknown key",
                                  "no other key in an object with all, any or not");
            free(p);
            ok = false;
        }
    }
    if (!ok)
        return NULL;

    amp_filter *f = amp_xcalloc(1, sizeof(*f));
    char *cpath = amp_json_path_key(path, which);
    val = json_object_get(spec, which);
    if (!strcmp(which, "not")) {
        f->kind = F_NOT;
        f->kids = amp_xcalloc(1, sizeof(*f->kids));
        f->nkids = 1;
        f->kids[0] = compile_node(val, cpath, depth + 1, errs);
        ok = f->kids[0] != NULL;
    } else {
        f->kind = !strcmp(which, "all") ? F_ALL : F_ANY;
        if (!json_is_array(val) || json_array_size(val) == 0) {
            amp_json_schema_error(errs, cpath, amp_json_schema_kind(val),
                                  "a non-empty array of filters");
            ok = false;
        } else {
            f->nkids = json_array_size(val);
            f->kids = amp_xcalloc(f->nkids, sizeof(*f->kids));
            for (size_t i = 0; i < f->nkids; i++) {
                char *ip = amp_json_path_index(cpath, i);
                f->kids[i] = compile_node(json_array_get(val, i), ip, depth + 1, errs);
                ok = ok && f->kids[i];
                free(ip);
            }
        }
    }
    free(cpath);
    if (!ok) {
        amp_map_filter_free(f);
        return NULL;
    }
    return f;
}

static bool op_takes_value(fop op) {
    return op != OP_EXISTS && op != OP_EXCLUDE_NULL;
}

/* Check the value against the op and prepare it (regex). */
static bool compile_value(amp_filter *f, const json_t *value, const char *vpath, amp_errs *errs) {
    switch (f->op) {
    case OP_EQUALS:
    case OP_NOT_EQUALS:
        return true;
    case OP_IN:
        if (!json_is_array(value) || json_array_size(value) == 0) {
            amp_json_schema_error(errs, vpath, amp_json_schema_kind(value),
                                  "a non-empty array for op 'in'");
            return false;
        }
        return true;
    case OP_REGEX: {
        if (!json_is_string(value)) {
            amp_json_schema_error(errs, vpath, amp_json_schema_kind(value),
                                  "a string for op 'regex'");
            return false;
        }
        int rc = regcomp(&f->re, json_string_value(value), REG_EXTENDED | REG_NOSUB);
        if (rc != 0) {
            char msg[256];
            regerror(rc, &f->re, msg, sizeof(msg));
            char *found = amp_xasprintf("'%s' (%s)", json_string_value(value), msg);
            amp_json_schema_error(errs, vpath, found, "a POSIX extended regular expression");
            free(found);
            return false;
        }
        f->has_re = true;
        return true;
    }
    case OP_GT:
    case OP_GTE:
    case OP_LT:
    case OP_LTE:
        if (!json_is_number(value)) {
            amp_json_schema_error(errs, vpath, amp_json_schema_kind(value), "a number for op '%s'",
                                  op_names[f->op]);
            return false;
        }
        return true;
    case OP_PREFIX:
        if (!json_is_string(value)) {
            amp_json_schema_error(errs, vpath, amp_json_schema_kind(value),
                                  "a string for op 'prefix'");
            return false;
        }
        return true;
    case OP_EXISTS:
    case OP_EXCLUDE_NULL:
        break;
    }
    return true;
}

static amp_filter *compile_rule(const json_t *spec, const char *path, amp_errs *errs) {
    bool ok = true;
    const char *key;
    json_t *val;
    json_object_foreach((json_t *)spec, key, val) {
        if (strcmp(key, "field") && strcmp(key, "op") && strcmp(key, "value")) {
            char *p = amp_json_path_key(path, key);
            amp_json_schema_error(errs, p, "an unknown key",
                                  "one of field, op, value, all, any, not");
            free(p);
            ok = false;
        }
    }

    amp_filter *f = amp_xcalloc(1, sizeof(*f));
    f->kind = F_RULE;
    char *fpath = amp_json_path_key(path, "field");
    char *opath = amp_json_path_key(path, "op");
    char *vpath = amp_json_path_key(path, "value");

    json_t *field = json_object_get(spec, "field");
    if (!field) {
        amp_json_schema_error(errs, fpath, "nothing", FIELD_EXPECT);
        ok = false;
    } else if (!json_is_string(field)) {
        amp_json_schema_error(errs, fpath, amp_json_schema_kind(field), FIELD_EXPECT);
        ok = false;
    } else {
        char err[160];
        if (amp_map_path_parse(&f->field, json_string_value(field), true, err, sizeof(err)) != 0) {
            char *found = amp_xasprintf("'%s' (%s)", json_string_value(field), err);
            amp_json_schema_error(errs, fpath, found, FIELD_EXPECT);
            free(found);
            ok = false;
        }
    }

    json_t *op = json_object_get(spec, "op");
    bool op_ok = false;
    if (!op) {
        amp_json_schema_error(errs, opath, "nothing", "one of " OPS_LIST);
    } else if (!json_is_string(op)) {
        amp_json_schema_error(errs, opath, amp_json_schema_kind(op), "one of " OPS_LIST);
    } else {
        for (size_t i = 0; i < NOPS; i++) {
            if (!strcmp(json_string_value(op), op_names[i])) {
                f->op = (fop)i;
                op_ok = true;
            }
        }
        if (!op_ok) {
            char *found = amp_xasprintf("'%s'", json_string_value(op));
            amp_json_schema_error(errs, opath, found, "one of " OPS_LIST);
            free(found);
        }
    }
    ok = ok && op_ok;

    json_t *value = json_object_get(spec, "value");
    if (op_ok) {
        if (op_takes_value(f->op) && !value) {
            amp_json_schema_error(errs, vpath, "nothing", "a value for op '%s'", op_names[f->op]);
            ok = false;
        } else if (!op_takes_value(f->op) && value) {
            amp_json_schema_error(errs, vpath, "a value", "none for op '%s'", op_names[f->op]);
            ok = false;
        } else if (value) {
            ok = compile_value(f, value, vpath, errs) && ok;
            f->value = json_incref(value);
        }
    }
    free(fpath);
    free(opath);
    free(vpath);
    if (!ok) {
        amp_map_filter_free(f);
        return NULL;
    }
    return f;
}

static amp_filter *compile_node(const json_t *spec, const char *path, int depth, amp_errs *errs) {
    if (!json_is_object(spec)) {
        amp_json_schema_error(errs, path, amp_json_schema_kind(spec), "a filter object");
        return NULL;
    }
    if (depth > AMP_FILTER_MAX_DEPTH) {
        amp_json_schema_error(errs, path, "a filter nested deeper", "at most %d levels",
                              AMP_FILTER_MAX_DEPTH);
        return NULL;
    }
    if (json_object_get(spec, "all") || json_object_get(spec, "any") ||
        json_object_get(spec, "not"))
        return compile_combinator(spec, path, depth, errs);
    return compile_rule(spec, path, errs);
}

amp_filter *amp_map_filter_compile(const json_t *spec, const char *path, amp_errs *errs) {
    return compile_node(spec, path, 1, errs);
}

/* ---- evaluation ------------------------------------------------------ */

static bool eval_rule(const amp_filter *f, const json_t *event) {
    const json_t *v = amp_map_path_get(&f->field, event);
    if (f->op == OP_NOT_EQUALS)
        return !(v && amp_map_value_equal(v, f->value));
    if (!v)
        return false;
    switch (f->op) {
    case OP_EQUALS:
        return amp_map_value_equal(v, f->value);
    case OP_IN: {
        size_t i;
        json_t *x;
        json_array_foreach(f->value, i, x) if (amp_map_value_equal(v, x)) return true;
        return false;
    }
    case OP_REGEX:
        return json_is_string(v) && regexec(&f->re, json_string_value(v), 0, NULL, 0) == 0;
    case OP_EXISTS:
        return true;
    case OP_EXCLUDE_NULL:
        return !json_is_null(v);
    case OP_GT:
        return json_is_number(v) && amp_map_number_cmp(v, f->value) > 0;
    case OP_GTE:
        return json_is_number(v) && amp_map_number_cmp(v, f->value) >= 0;
    case OP_LT:
        return json_is_number(v) && amp_map_number_cmp(v, f->value) < 0;
    case OP_LTE:
        return json_is_number(v) && amp_map_number_cmp(v, f->value) <= 0;
    case OP_PREFIX: {
        size_t n = json_string_length(f->value);
        return json_is_string(v) && json_string_length(v) >= n &&
               memcmp(json_string_value(v), json_string_value(f->value), n) == 0;
    }
    case OP_NOT_EQUALS:
        break;
    }
    return false;
}

bool amp_map_filter_eval(const amp_filter *f, const json_t *event) {
    switch (f->kind) {
    case F_ALL:
        for (size_t i = 0; i < f->nkids; i++)
            if (!amp_map_filter_eval(f->kids[i], event))
                return false;
        return true;
    case F_ANY:
        for (size_t i = 0; i < f->nkids; i++)
            if (amp_map_filter_eval(f->kids[i], event))
                return true;
        return false;
    case F_NOT:
        return !amp_map_filter_eval(f->kids[0], event);
    case F_RULE:
        return eval_rule(f, event);
    }
    return false;
}

/* ---- explanation ----------------------------------------------------- */

static void put(amp_buf *out, const char *s) {
    amp_buf_append(out, s, strlen(s));
}

/* `event_type equals "X"` — the rule as a reader would say it. */
static void describe_rule(const amp_filter *f, amp_buf *out) {
    put(out, f->field.text);
    put(out, " ");
    put(out, op_names[f->op]);
    if (f->value) {
        char *v = json_dumps(f->value, JSON_ENCODE_ANY | JSON_COMPACT);
        if (!v)
            abort();
        put(out, " ");
        /* Long "in" lists stay readable. */
        if (strlen(v) > 200) {
            amp_buf_append(out, v, 197);
            put(out, "...");
        } else {
            put(out, v);
        }
        free(v);
    }
}

static void describe_node(const amp_filter *f, amp_buf *out) {
    char n[64];
    switch (f->kind) {
    case F_ALL:
        snprintf(n, sizeof(n), "all of %zu rules", f->nkids);
        put(out, n);
        break;
    case F_ANY:
        snprintf(n, sizeof(n), "any of %zu rules", f->nkids);
        put(out, n);
        break;
    case F_NOT:
        put(out, "not (...)");
        break;
    case F_RULE:
        describe_rule(f, out);
        break;
    }
}

/* "filter", then " <where>[.<what>]" when either is set, then ": ". */
static void head(amp_buf *out, const char *where, const char *what) {
    put(out, "filter");
    if (*where || *what)
        put(out, " ");
    put(out, where);
    if (*where && *what)
        put(out, ".");
    put(out, what);
    put(out, ": ");
}

static void explain_node(const amp_filter *f, const json_t *event, const char *where,
                         amp_buf *out) {
    char n[32];
    switch (f->kind) {
    case F_ALL:
        for (size_t i = 0; i < f->nkids; i++) {
            if (!amp_map_filter_eval(f->kids[i], event)) {
                char *child = amp_xasprintf("%s%sall[%zu]", where, *where ? "." : "", i);
                explain_node(f->kids[i], event, child, out);
                free(child);
                return;
            }
        }
        head(out, where, "all");
        put(out, "matched");
        return;
    case F_ANY:
        head(out, where, "any");
        snprintf(n, sizeof(n), "%zu", f->nkids);
        put(out, "none of ");
        put(out, n);
        put(out, " rules matched");
        return;
    case F_NOT:
        head(out, where, "not");
        describe_node(f->kids[0], out);
        put(out, f->kids[0]->kind == F_RULE ? " is true" : " matched");
        return;
    case F_RULE: {
        head(out, where, "");
        describe_rule(f, out);
        put(out, " is false");
        const json_t *v = amp_map_path_get(&f->field, event);
        if (!v) {
            put(out, " (field is missing)");
        } else if (f->op == OP_REGEX || f->op == OP_PREFIX || f->op == OP_GT || f->op == OP_GTE ||
                   f->op == OP_LT || f->op == OP_LTE) {
            /* Type mismatches are the usual surprise for these ops. */
            bool typed =
                f->op == OP_REGEX || f->op == OP_PREFIX ? json_is_string(v) : json_is_number(v);
            if (!typed) {
                put(out, " (field is ");
                put(out, amp_map_json_kind(v));
                put(out, ")");
            }
        }
        return;
    }
    }
}

void amp_map_filter_explain(const amp_filter *f, const json_t *event, amp_buf *out) {
    explain_node(f, event, "", out);
}
