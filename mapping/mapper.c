/*
 * mapper — compiles the config's "apps" and "routes" into an immutable
 * amp_mapper and applies it to events: filter, field mappings, templates,
 * then one Dify request body per matching route.
 *
 * Compilation collects every problem with its JSON path; applying parses
 * nothing. amp_mapper_apply builds every route's body before emitting any,
 * so a "required" failure in a later route never leaves requests emitted.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "mapping.h"
#include "mapping_int.h"

typedef struct rule {
    amp_path source;
    amp_path target;
    amp_xform *xf; /* NULL: value copied as-is */
} rule;

typedef struct route {
    char *name;
    char *label;        /* "routes[0] (name)", for apply-time messages */
    amp_filter *filter; /* NULL: every event matches */
    rule *rules;
    size_t nrules;
    size_t app;
    amp_tmpl *query; /* NULL: no query (chat gets "{{event_type}}") */
    amp_tmpl *user;  /* NULL: user_id, else device_id */
    bool per_user;
} route;

struct amp_mapper {
    amp_app *apps;
    size_t napps;
    route *routes;
    size_t nroutes;
};

static const char *const endpoint_names[] = {"chat", "completion", "workflow"};

const char *amp_map_endpoint_path(amp_endpoint e) {
    switch (e) {
    case AMP_ENDPOINT_CHAT:
        return "chat-messages";
    case AMP_ENDPOINT_COMPLETION:
        return "completion-messages";
    case AMP_ENDPOINT_WORKFLOW:
        return "workflows/run";
    }
    return "chat-messages";
}

static void free_route(route *r) {
    free(r->name);
    free(r->label);
    amp_map_filter_free(r->filter);
    for (size_t i = 0; i < r->nrules; i++) {
        amp_map_path_free(&r->rules[i].source);
        amp_map_path_free(&r->rules[i].target);
        amp_map_xform_free(r->rules[i].xf);
    }
    free(r->rules);
    amp_map_tmpl_free(r->query);
    amp_map_tmpl_free(r->user);
}

void amp_mapper_destroy(amp_mapper *m) {
    if (!m)
        return;
    for (size_t i = 0; i < m->napps; i++) {
        free((char *)m->apps[i].name);
        free((char *)m->apps[i].api_key_env);
        free((char *)m->apps[i].api_key_file);
    }
    free(m->apps);
    for (size_t i = 0; i < m->nroutes; i++)
        free_route(&m->routes[i]);
    free(m->routes);
    free(m);
}

size_t amp_mapper_app_count(const amp_mapper *m) {
    return m->napps;
}

const amp_app *amp_mapper_app(const amp_mapper *m, size_t i) {
    return i < m->napps ? &m->apps[i] : NULL;
}

/* ---- compile helpers ------------------------------------------------- */

/* Report every key of obj not in allowed (NULL-terminated). */
static bool check_keys(const json_t *obj, const char *path, const char *const *allowed,
                       const char *expected, amp_errs *errs) {
    bool ok = true;
    const char *key;
    json_t *v;
    json_object_foreach((json_t *)obj, key, v) {
        bool found = false;
        for (size_t i = 0; allowed[i] && !found; i++)
            found = !strcmp(key, allowed[i]);
        if (!found) {
            char *p = amp_map_jpath_key(path, key);
            amp_errs_add(errs, p, "unknown key; expected one of %s", expected);
            free(p);
            ok = false;
        }
    }
    return ok;
}

/* A string member: NULL when absent (and not required); errors otherwise. */
static const char *get_string(const json_t *obj, const char *key, const char *path, bool required,
                              bool *ok, amp_errs *errs) {
    json_t *v = json_object_get(obj, key);
    char *p = amp_map_jpath_key(path, key);
    const char *s = NULL;
    if (!v) {
        if (required) {
            amp_errs_add(errs, p, "missing; expected a non-empty string");
            *ok = false;
        }
    } else if (!json_is_string(v)) {
        amp_errs_add(errs, p, "expected a string, found %s", amp_map_json_kind(v));
        *ok = false;
    } else if (json_string_length(v) == 0) {
        amp_errs_add(errs, p, "expected a non-empty string, found an empty string");
        *ok = false;
    } else {
        s = json_string_value(v);
    }
    free(p);
    return s;
}

/* Index of s in names, or -1 after reporting "unknown <what>". */
static int pick(const char *s, const char *const *names, size_t n, const char *what,
                const char *path, amp_errs *errs) {
    for (size_t i = 0; i < n; i++)
        if (!strcmp(s, names[i]))
            return (int)i;
    amp_buf list;
    amp_buf_init(&list, 4096);
    for (size_t i = 0; i < n; i++) {
        if (i)
            amp_buf_append(&list, ", ", 2);
        amp_buf_append(&list, names[i], strlen(names[i]));
    }
    amp_errs_add(errs, path, "unknown %s '%s'; expected one of %s", what, s, list.data);
    amp_buf_free(&list);
    return -1;
}

static bool env_name_ok(const char *s) {
    if (!((*s >= 'A' && *s <= 'Z') || (*s >= 'a' && *s <= 'z') || *s == '_'))
        return false;
    for (; *s; s++)
        if (!((*s >= 'A' && *s <= 'Z') || (*s >= 'a' && *s <= 'z') || (*s >= '0' && *s <= '9') ||
              *s == '_'))
            return false;
    return true;
}

/* An integer member in [min, max]; *out untouched when absent. */
static void get_uint(const json_t *obj, const char *key, const char *path, json_int_t min,
                     json_int_t max, unsigned *out, bool *ok, amp_errs *errs) {
    json_t *v = json_object_get(obj, key);
    if (!v)
        return;
    char *p = amp_map_jpath_key(path, key);
    if (!json_is_integer(v) || json_integer_value(v) < min || json_integer_value(v) > max) {
        amp_errs_add(errs, p,
                     "expected an integer from %" JSON_INTEGER_FORMAT " to %" JSON_INTEGER_FORMAT
                     ", found %s",
                     min, max,
                     json_is_integer(v) ? "an integer out of range" : amp_map_json_kind(v));
        *ok = false;
    } else {
        *out = (unsigned)json_integer_value(v);
    }
    free(p);
}

/* ---- apps ------------------------------------------------------------ */

#define APP_KEYS                                                                                   \
    "api_key_env, api_key_file, endpoint, response_mode, rate_per_sec, burst, max_in_flight"

static void compile_app(amp_app *a, const char *name, const json_t *spec, const char *path,
                        amp_errs *errs) {
    static const char *const keys[] = {
        "api_key_env",  "api_key_file", "endpoint",      "response_mode",
        "rate_per_sec", "burst",        "max_in_flight", NULL};
    static const char *const modes[] = {"blocking", "streaming"};
    bool ok = true;
    a->name = amp_xstrdup(name);
    a->endpoint = AMP_ENDPOINT_CHAT;
    a->max_in_flight = 8;
    if (!*name) {
        amp_errs_add(errs, path, "app names must not be empty");
        ok = false;
    }
    if (!json_is_object(spec)) {
        amp_errs_add(errs, path, "expected an app object, found %s", amp_map_json_kind(spec));
        return;
    }
    check_keys(spec, path, keys, APP_KEYS, errs);

    const char *env = get_string(spec, "api_key_env", path, false, &ok, errs);
    const char *file = get_string(spec, "api_key_file", path, false, &ok, errs);
    if (env && !env_name_ok(env)) {
        char *p = amp_map_jpath_key(path, "api_key_env");
        amp_errs_add(errs, p, "expected an environment variable name ([A-Za-z_][A-Za-z0-9_]*)");
        free(p);
    }
    bool has_env = json_object_get(spec, "api_key_env") != NULL;
    bool has_file = json_object_get(spec, "api_key_file") != NULL;
    if (has_env && has_file)
        amp_errs_add(errs, path, "set only one of api_key_env, api_key_file");
    /* Neither: the default app key, DIFY_API_KEY (or DIFY_API_KEY_FILE). */
    a->api_key_env = amp_xstrdup(has_env || has_file ? env : AMP_DEFAULT_API_KEY_ENV);
    a->api_key_file = amp_xstrdup(file);

    const char *s = get_string(spec, "endpoint", path, false, &ok, errs);
    if (s) {
        char *p = amp_map_jpath_key(path, "endpoint");
        int k = pick(s, endpoint_names, 3, "endpoint", p, errs);
        if (k >= 0)
            a->endpoint = (amp_endpoint)k;
        free(p);
    }
    s = get_string(spec, "response_mode", path, false, &ok, errs);
    if (s) {
        char *p = amp_map_jpath_key(path, "response_mode");
        a->streaming = pick(s, modes, 2, "response_mode", p, errs) == 1;
        free(p);
    }
    json_t *rate = json_object_get(spec, "rate_per_sec");
    if (rate) {
        double r = json_number_value(rate);
        if (!json_is_number(rate) || !(r >= 0 && r <= 1000000)) {
            char *p = amp_map_jpath_key(path, "rate_per_sec");
            amp_errs_add(errs, p, "expected a number from 0 (unlimited) to 1000000, found %s",
                         json_is_number(rate) ? "a number out of range" : amp_map_json_kind(rate));
            free(p);
        } else {
            a->rate_per_sec = r;
        }
    }
    /* Default burst: one second's worth of tokens, at least one. */
    a->burst = a->rate_per_sec > 1 ? (unsigned)ceil(a->rate_per_sec) : 1;
    get_uint(spec, "burst", path, 1, 1000000, &a->burst, &ok, errs);
    get_uint(spec, "max_in_flight", path, 1, 10000, &a->max_in_flight, &ok, errs);
}

static void compile_apps(amp_mapper *m, const json_t *apps, amp_errs *errs) {
    if (!apps) {
        amp_errs_add(errs, "apps",
                     "missing; expected an object of Dify apps, e.g. "
                     "{\"support\": {\"api_key_env\": \"DIFY_API_KEY\"}}");
        return;
    }
    if (!json_is_object(apps)) {
        amp_errs_add(errs, "apps", "expected an object of Dify apps, found %s",
                     amp_map_json_kind(apps));
        return;
    }
    m->apps = amp_xcalloc(json_object_size(apps), sizeof(*m->apps));
    const char *name;
    json_t *spec;
    json_object_foreach((json_t *)apps, name, spec) {
        char *p = amp_map_jpath_key("apps", name);
        compile_app(&m->apps[m->napps++], name, spec, p, errs);
        free(p);
    }
}

static int find_app(const amp_mapper *m, const char *name) {
    for (size_t i = 0; i < m->napps; i++)
        if (!strcmp(m->apps[i].name, name))
            return (int)i;
    return -1;
}

/* ---- routes ---------------------------------------------------------- */

/* Segment-wise: is a a prefix of (or equal to) b? */
static bool path_prefix(const amp_path *a, const amp_path *b) {
    if (a->nsegs > b->nsegs)
        return false;
    for (size_t i = 0; i < a->nsegs; i++)
        if (strcmp(a->segs[i].key, b->segs[i].key))
            return false;
    return true;
}

/* Entry idx of "map" into r->rules[idx] (zeroed by the caller). */
static void compile_rule(route *r, size_t idx, const json_t *spec, const char *path,
                         amp_errs *errs) {
    static const char *const keys[] = {"source",       "target",      "transform", "source_field",
                                       "target_field", "transformer", NULL};
    static const char *const std[] = {"source", "target", "transform"};
    static const char *const alt[] = {"source_field", "target_field", "transformer"};
    if (!json_is_object(spec)) {
        amp_errs_add(errs, path,
                     "expected a mapping object {\"source\", \"target\", "
                     "\"transform\"}, found %s",
                     amp_map_json_kind(spec));
        return;
    }
    bool ok =
        check_keys(spec, path, keys,
                   "source, target, transform (or source_field, target_field, transformer)", errs);
    bool has_std = false, has_alt = false;
    for (size_t k = 0; k < 3; k++) {
        has_std = has_std || json_object_get(spec, std[k]);
        has_alt = has_alt || json_object_get(spec, alt[k]);
    }
    if (has_std && has_alt) {
        amp_errs_add(errs, path,
                     "mixes source/target/transform with "
                     "source_field/target_field/transformer; use one spelling");
        return;
    }
    const char *const *names = has_alt ? alt : std;

    rule *ru = &r->rules[idx];
    char err[160];
    const char *src = get_string(spec, names[0], path, true, &ok, errs);
    const char *dst = get_string(spec, names[1], path, true, &ok, errs);
    char *sp = amp_map_jpath_key(path, names[0]);
    char *tp = amp_map_jpath_key(path, names[1]);
    char *xp = amp_map_jpath_key(path, names[2]);
    if (src && amp_map_path_parse(&ru->source, src, true, err, sizeof(err)) != 0) {
        amp_errs_add(errs, sp, "bad field path '%s': %s", src, err);
        ok = false;
    }
    if (dst && amp_map_path_parse(&ru->target, dst, false, err, sizeof(err)) != 0) {
        amp_errs_add(errs, tp, "bad field path '%s': %s", dst, err);
        ok = false;
        dst = NULL;
    }
    /* Two targets where one contains the other would overwrite each other
     * depending on order; refuse them. */
    for (size_t i = 0; dst && i < idx; i++) {
        const amp_path *o = &r->rules[i].target;
        if (!o->nsegs)
            continue;
        if (path_prefix(o, &ru->target) || path_prefix(&ru->target, o)) {
            amp_errs_add(errs, tp,
                         "target '%s' collides with target '%s' of map[%zu]; each target "
                         "must be distinct and not inside another",
                         dst, o->text, i);
            ok = false;
        }
    }
    json_t *xf = json_object_get(spec, names[2]);
    if (xf) {
        ru->xf = amp_map_xform_compile(xf, xp, errs);
        ok = ok && ru->xf;
    }
    free(sp);
    free(tp);
    free(xp);
    (void)ok;
}

static amp_tmpl *get_template(const json_t *spec, const char *key, const char *path,
                              amp_errs *errs) {
    bool ok = true;
    json_t *v = json_object_get(spec, key);
    if (!v)
        return NULL;
    char *p = amp_map_jpath_key(path, key);
    amp_tmpl *t = NULL;
    if (!json_is_string(v)) {
        amp_errs_add(errs, p, "expected a template string such as \"{{event_type}}\", found %s",
                     amp_map_json_kind(v));
        ok = false;
    }
    if (ok)
        t = amp_map_tmpl_compile(json_string_value(v), p, errs);
    free(p);
    return t;
}

#define ROUTE_KEYS "name, filter, map, app, query, user, conversation"

static void compile_route(amp_mapper *m, route *r, size_t idx, const json_t *spec,
                          const json_t *all_routes, const json_t *apps, const char *path,
                          amp_errs *errs) {
    static const char *const keys[] = {"name",  "filter", "map",          "app",
                                       "query", "user",   "conversation", NULL};
    static const char *const convs[] = {"none", "per_user"};
    bool ok = true;
    r->app = SIZE_MAX;
    if (!json_is_object(spec)) {
        amp_errs_add(errs, path, "expected a route object, found %s", amp_map_json_kind(spec));
        return;
    }
    check_keys(spec, path, keys, ROUTE_KEYS, errs);

    const char *name = get_string(spec, "name", path, true, &ok, errs);
    if (name) {
        for (size_t j = 0; j < idx; j++) {
            json_t *other = json_object_get(json_array_get(all_routes, j), "name");
            if (json_is_string(other) && !strcmp(json_string_value(other), name)) {
                char *p = amp_map_jpath_key(path, "name");
                amp_errs_add(errs, p, "duplicate route name '%s' (also routes[%zu].name)", name, j);
                free(p);
                break;
            }
        }
    }
    r->name = amp_xstrdup(name ? name : "");
    r->label = amp_xasprintf("%s (%s)", path, r->name);

    json_t *filter = json_object_get(spec, "filter");
    if (filter) {
        char *p = amp_map_jpath_key(path, "filter");
        r->filter = amp_map_filter_compile(filter, p, errs);
        free(p);
    }

    json_t *map = json_object_get(spec, "map");
    if (map) {
        char *p = amp_map_jpath_key(path, "map");
        if (!json_is_array(map)) {
            amp_errs_add(errs, p, "expected an array of mappings, found %s",
                         amp_map_json_kind(map));
        } else {
            size_t i;
            json_t *e;
            r->nrules = json_array_size(map);
            r->rules = amp_xcalloc(r->nrules, sizeof(*r->rules));
            json_array_foreach(map, i, e) {
                char *ep = amp_map_jpath_index(p, i);
                compile_rule(r, i, e, ep, errs);
                free(ep);
            }
        }
        free(p);
    }

    const amp_app *app = NULL;
    const char *app_name = get_string(spec, "app", path, true, &ok, errs);
    if (app_name) {
        int k = find_app(m, app_name);
        if (k >= 0) {
            r->app = (size_t)k;
            app = &m->apps[k];
        } else {
            char *p = amp_map_jpath_key(path, "app");
            amp_buf list;
            amp_buf_init(&list, 4096);
            amp_buf_append(&list, "", 0);
            const char *an;
            json_t *av;
            if (json_is_object(apps)) {
                json_object_foreach((json_t *)apps, an, av) {
                    if (list.len)
                        amp_buf_append(&list, ", ", 2);
                    amp_buf_append(&list, an, strlen(an));
                }
            }
            if (list.len)
                amp_errs_add(errs, p, "unknown app '%s'; expected one of %s", app_name, list.data);
            else
                amp_errs_add(errs, p, "unknown app '%s'; \"apps\" defines none", app_name);
            amp_buf_free(&list);
            free(p);
        }
    }

    r->query = get_template(spec, "query", path, errs);
    if (app && app->endpoint == AMP_ENDPOINT_WORKFLOW && json_object_get(spec, "query")) {
        char *p = amp_map_jpath_key(path, "query");
        amp_errs_add(errs, p,
                     "app '%s' is a workflow, which takes no query; map the text into "
                     "inputs instead",
                     app->name);
        free(p);
    }
    r->user = get_template(spec, "user", path, errs);

    const char *conv = get_string(spec, "conversation", path, false, &ok, errs);
    if (conv) {
        char *p = amp_map_jpath_key(path, "conversation");
        r->per_user = pick(conv, convs, 2, "conversation mode", p, errs) == 1;
        if (r->per_user && app && app->endpoint != AMP_ENDPOINT_CHAT)
            amp_errs_add(errs, p, "per_user needs a chat app; app '%s' has endpoint '%s'",
                         app->name, endpoint_names[app->endpoint]);
        free(p);
    }
    /* Chat requires a query; without a template the event type is the
     * message. Completion only sends one when the route asks for it. */
    if (!r->query && app && app->endpoint == AMP_ENDPOINT_CHAT)
        r->query = amp_map_tmpl_compile("{{event_type}}", path, errs);
}

static void compile_routes(amp_mapper *m, const json_t *routes, const json_t *apps,
                           amp_errs *errs) {
    if (!routes) {
        amp_errs_add(errs, "routes", "missing; expected an array of routes (it may be empty)");
        return;
    }
    if (!json_is_array(routes)) {
        amp_errs_add(errs, "routes", "expected an array of routes, found %s",
                     amp_map_json_kind(routes));
        return;
    }
    m->routes = amp_xcalloc(json_array_size(routes), sizeof(*m->routes));
    size_t i;
    json_t *spec;
    json_array_foreach(routes, i, spec) {
        char *p = amp_map_jpath_index("routes", i);
        compile_route(m, &m->routes[m->nroutes++], i, spec, routes, apps, p, errs);
        free(p);
    }
}

amp_mapper *amp_mapper_compile(const json_t *apps, const json_t *routes, amp_errs *errs) {
    size_t before = amp_errs_count(errs);
    amp_mapper *m = amp_xcalloc(1, sizeof(*m));
    compile_apps(m, apps, errs);
    compile_routes(m, routes, apps, errs);
    if (amp_errs_count(errs) != before) {
        amp_mapper_destroy(m);
        return NULL;
    }
    return m;
}

/* ---- apply ----------------------------------------------------------- */

typedef struct pending {
    const route *r;
    json_t *body;
} pending;

static const char *default_user(const json_t *event) {
    json_t *u = json_object_get(event, "user_id");
    if (json_is_string(u) && json_string_length(u) > 0)
        return json_string_value(u);
    u = json_object_get(event, "device_id");
    if (json_is_string(u) && json_string_length(u) > 0)
        return json_string_value(u);
    return "";
}

static void set_new(json_t *obj, const char *key, json_t *v) {
    if (!v || json_object_set_new(obj, key, v) != 0)
        abort();
}

/* The body for one matching route; NULL with detail set on a required miss. */
static json_t *build(const amp_mapper *m, const route *r, const json_t *event, amp_buf *buf,
                     char *detail, size_t dlen) {
    const amp_app *app = &m->apps[r->app];
    json_t *inputs = json_object();
    if (!inputs)
        abort();
    for (size_t i = 0; i < r->nrules; i++) {
        const rule *ru = &r->rules[i];
        json_t *v = amp_map_path_get(&ru->source, event);
        /* Containers are copied so a body never shares state with the event. */
        if (v)
            v = json_is_object(v) || json_is_array(v) ? json_deep_copy(v) : json_incref(v);
        if (ru->xf) {
            const char *why;
            v = amp_map_xform_apply(ru->xf, v, &why);
            if (why) {
                snprintf(detail, dlen, "%s: required field %s is %s", r->label, ru->source.text,
                         why);
                json_decref(inputs);
                return NULL;
            }
        }
        if (v)
            amp_map_path_set(&ru->target, inputs, v);
    }

    json_t *body = json_object();
    if (!body)
        abort();
    set_new(body, "inputs", inputs);
    if (r->query) {
        amp_buf_reset(buf);
        amp_buf_append(buf, "", 0);
        amp_map_tmpl_render(r->query, event, inputs, buf);
        set_new(body, "query", json_stringn(buf->data, buf->len));
    }
    const char *user = "";
    if (r->user) {
        amp_buf_reset(buf);
        amp_buf_append(buf, "", 0);
        amp_map_tmpl_render(r->user, event, inputs, buf);
        user = buf->data;
    }
    /* An explicit template that renders empty falls back like no template. */
    set_new(body, "user", json_string(*user ? user : default_user(event)));
    set_new(body, "response_mode", json_string(app->streaming ? "streaming" : "blocking"));
    return body;
}

int amp_mapper_apply(const amp_mapper *m, const json_t *event, amp_map_emit_fn emit, void *ctx,
                     amp_map_explain_fn explain, void *explain_ctx, char *detail,
                     size_t detail_len) {
    pending local[16];
    pending *p = m->nroutes <= 16 ? local : amp_xcalloc(m->nroutes, sizeof(*p));
    size_t n = 0;
    int rc = 0;
    amp_buf buf;
    amp_buf_init(&buf, AMP_TEMPLATE_MAX_BYTES);
    if (detail_len)
        detail[0] = '\0';

    for (size_t i = 0; i < m->nroutes; i++) {
        const route *r = &m->routes[i];
        if (r->filter && !amp_map_filter_eval(r->filter, event)) {
            if (explain) {
                amp_buf_reset(&buf);
                amp_map_filter_explain(r->filter, event, &buf);
                explain(explain_ctx, r->name, buf.data ? buf.data : "filter");
            }
            continue;
        }
        json_t *body = build(m, r, event, &buf, detail, detail_len);
        if (!body) {
            rc = -1;
            break;
        }
        p[n].r = r;
        p[n].body = body;
        n++;
    }

    for (size_t i = 0; i < n; i++) {
        if (rc == 0) {
            const route *r = p[i].r;
            amp_map_request req = {
                .route = r->name,
                .app = &m->apps[r->app],
                .user = json_string_value(json_object_get(p[i].body, "user")),
                .per_user = r->per_user,
                .body = p[i].body,
            };
            emit(ctx, &req);
        }
        json_decref(p[i].body);
    }
    if (p != local)
        free(p);
    amp_buf_free(&buf);
    return rc == 0 ? (int)n : -1;
}
