/*
 * template — request templates such as "{{event_type}} by {{inputs.username}}",
 * split at compile time into literal text and field paths.
 *
 * {{path}} reads the event; {{inputs}} / {{inputs.path}} read the mapped
 * object (write {{["inputs"].x}} to read an event key named "inputs").
 * Blanks inside the braces are ignored. Strings render as-is, numbers and
 * booleans as JSON text, objects and arrays as compact JSON, missing or null
 * values as "". A lone "}}" is literal text; an unclosed "{{" is an error.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "mapping_int.h"
#include "../base/alloc.h"
#include "../base/buf.h"
#include "../base/errs.h"

/* What every template error says is expected. */
#define TEMPLATE_EXPECT "a template of text and {{field.path}} or {{inputs.path}} fields"

typedef struct tseg {
    char *lit; /* literal text, or NULL for a field */
    size_t lit_len;
    bool from_inputs; /* the path reads the mapped object */
    amp_path path;    /* zero segments with from_inputs: the whole object */
} tseg;

struct amp_tmpl {
    tseg *segs;
    size_t nsegs;
};

void amp_map_tmpl_free(amp_tmpl *t) {
    if (!t)
        return;
    for (size_t i = 0; i < t->nsegs; i++) {
        free(t->segs[i].lit);
        amp_map_path_free(&t->segs[i].path);
    }
    free(t->segs);
    free(t);
}

static tseg *add(amp_tmpl *t) {
    t->segs = amp_xrealloc(t->segs, (t->nsegs + 1) * sizeof(*t->segs));
    tseg *s = &t->segs[t->nsegs++];
    memset(s, 0, sizeof(*s));
    return s;
}

static bool blank(char c) {
    return c == ' ' || c == '\t';
}

/* The field inside {{...}} at offset `at`: inner[0..n). 0 on success. */
static int add_field(amp_tmpl *t, const char *inner, size_t n, size_t at, const char *path,
                     amp_errs *errs) {
    while (n > 0 && blank(*inner)) {
        inner++;
        n--;
    }
    while (n > 0 && blank(inner[n - 1]))
        n--;
    if (n == 0) {
        char found[64];
        snprintf(found, sizeof found, "an empty {{}} at offset %zu", at);
        amp_json_schema_error(errs, path, found, TEMPLATE_EXPECT);
        return -1;
    }
    char *text = amp_xstrndup(inner, n);
    tseg *s = add(t);
    if (!strcmp(text, "inputs")) {
        s->from_inputs = true;
        s->path.text = text;
        return 0;
    }
    char err[160];
    if (amp_map_path_parse(&s->path, text, true, err, sizeof(err)) != 0) {
        char *found = amp_xasprintf("field path '%s' at offset %zu (%s)", text, at, err);
        amp_json_schema_error(errs, path, found, TEMPLATE_EXPECT);
        free(found);
        free(text);
        return -1;
    }
    /* Written as inputs.x or inputs[...]: drop the "inputs" step and read
     * the mapped object. ["inputs"] stays a key of the event. */
    if (!strncmp(text, "inputs.", 7) || !strncmp(text, "inputs[", 7)) {
        s->from_inputs = true;
        free(s->path.segs[0].key);
        memmove(s->path.segs, s->path.segs + 1, (s->path.nsegs - 1) * sizeof(*s->path.segs));
        s->path.nsegs--;
    }
    free(text);
    return 0;
}

amp_tmpl *amp_map_tmpl_compile(const char *text, const char *path, amp_errs *errs) {
    amp_tmpl *t = amp_xcalloc(1, sizeof(*t));
    size_t len = strlen(text), i = 0, lit = 0;
    int bad = 0;
    while (i < len) {
        const char *open = strstr(text + i, "{{");
        if (!open)
            break;
        size_t at = (size_t)(open - text);
        const char *close = strstr(open + 2, "}}");
        if (!close) {
            char found[64];
            snprintf(found, sizeof found, "an unclosed '{{' at offset %zu", at);
            amp_json_schema_error(errs, path, found, TEMPLATE_EXPECT);
            bad = -1;
            break;
        }
        if (at > lit) {
            tseg *s = add(t);
            s->lit = amp_xstrndup(text + lit, at - lit);
            s->lit_len = at - lit;
        }
        bad |= add_field(t, open + 2, (size_t)(close - open - 2), at, path, errs);
        i = lit = (size_t)(close - text) + 2;
    }
    if (!bad && lit < len) {
        tseg *s = add(t);
        s->lit = amp_xstrndup(text + lit, len - lit);
        s->lit_len = len - lit;
    }
    if (bad) {
        amp_map_tmpl_free(t);
        return NULL;
    }
    return t;
}

void amp_map_tmpl_render(const amp_tmpl *t, const json_t *event, const json_t *inputs,
                         amp_buf *out) {
    for (size_t i = 0; i < t->nsegs; i++) {
        const tseg *s = &t->segs[i];
        if (s->lit) {
            if (amp_buf_append(out, s->lit, s->lit_len) != 0)
                return; /* at the cap: the rest is dropped */
            continue;
        }
        const json_t *v = s->from_inputs && s->path.nsegs == 0
                              ? inputs
                              : amp_map_path_get(&s->path, s->from_inputs ? inputs : event);
        if (v && amp_map_value_render(v, out) != 0)
            return;
    }
}

json_t *amp_map_tmpl_value(const amp_tmpl *t, const json_t *event, const json_t *inputs) {
    if (t->nsegs == 1 && !t->segs[0].lit) {
        const tseg *s = &t->segs[0];
        json_t *v = s->from_inputs && s->path.nsegs == 0
                        ? (json_t *)inputs
                        : amp_map_path_get(&s->path, s->from_inputs ? inputs : event);
        return v && !json_is_null(v) ? json_incref(v) : NULL;
    }
    amp_buf out;
    amp_buf_init(&out, AMP_TEMPLATE_MAX_BYTES);
    amp_buf_append(&out, "", 0);
    amp_map_tmpl_render(t, event, inputs, &out);
    json_t *v = json_stringn(out.data ? out.data : "", out.len);
    amp_buf_free(&out);
    return v;
}
