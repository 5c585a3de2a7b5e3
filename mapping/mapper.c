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
#include "../base/alloc.h"
#include "../base/buf.h"
#include "../base/errs.h"

typedef struct rule {
    json_t *value; /* a constant ("value" instead of "source"), or NULL */
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
    amp_map_report report; /* event_type NULL: no report */
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

char *amp_map_app_path(const amp_app *app) {
    if (app->endpoint == AMP_ENDPOINT_WORKFLOW && app->workflow_id)
        return amp_xasprintf("workflows/%s/run", app->workflow_id);
    return amp_xstrdup(amp_map_endpoint_path(app->endpoint));
}

/* ---- reports ---------------------------------------------------------- */

struct amp_map_props {
    char **names;
    amp_tmpl **tmpls;
    size_t n;
};

static void props_free(amp_map_props *p) {
    if (!p)
        return;
    for (size_t i = 0; i < p->n; i++) {
        free(p->names[i]);
        amp_map_tmpl_free(p->tmpls[i]);
    }
    free(p->names);
    free(p->tmpls);
    free(p);
}

static void report_clear(amp_map_report *r) {
    free(r->event_type);
    props_free(r->props);
    memset(r, 0, sizeof *r);
}

json_t *amp_map_report_properties(const amp_map_report *spec, const json_t *fields) {
    if (!spec->props)
        return NULL;
    json_t *out = json_object();
    for (size_t i = 0; i < spec->props->n; i++) {
        json_t *v = amp_map_tmpl_value(spec->props->tmpls[i], fields, NULL);
        if (v)
            json_object_set_new(out, spec->props->names[i], v);
    }
    return out;
}

static void free_route(route *r) {
    free(r->name);
    free(r->label);
    amp_map_filter_free(r->filter);
    for (size_t i = 0; i < r->nrules; i++) {
        json_decref(r->rules[i].value);
        amp_map_path_free(&r->rules[i].source);
        amp_map_path_free(&r->rules[i].target);
        amp_map_xform_free(r->rules[i].xf);
    }
    free(r->rules);
    amp_map_tmpl_free(r->query);
    amp_map_tmpl_free(r->user);
    report_clear(&r->report);
}

void amp_mapper_destroy(amp_mapper *m) {
    if (!m)
        return;
    for (size_t i = 0; i < m->napps; i++) {
        free((char *)m->apps[i].name);
        free((char *)m->apps[i].api_key_env);
        free((char *)m->apps[i].api_key_file);
        free((char *)m->apps[i].workflow_id);
        if (m->apps[i].report) {
            report_clear(m->apps[i].report);
            free(m->apps[i].report);
        }
    }
    free(m->apps);
    for (size_t i = 0; i < m->nroutes; i++)
        free_route(&m->routes[i]);
    free(m->routes);
    free(m);
}

const amp_map_report *amp_mapper_report(const amp_mapper *m, const char *route_name,
                                        const char *app_name) {
    for (size_t i = 0; m && route_name && i < m->nroutes; i++)
        if (m->routes[i].report.event_type && strcmp(m->routes[i].name, route_name) == 0)
            return &m->routes[i].report;
    for (size_t i = 0; m && app_name && i < m->napps; i++)
        if (m->apps[i].report && strcmp(m->apps[i].name, app_name) == 0)
            return m->apps[i].report;
    return NULL;
}

bool amp_mapper_any_report(const amp_mapper *m) {
    for (size_t i = 0; m && i < m->nroutes; i++)
        if (m->routes[i].report.event_type)
            return true;
    for (size_t i = 0; m && i < m->napps; i++)
        if (m->apps[i].report)
            return true;
    return false;
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
            char *p = amp_json_path_key(path, key);
            amp_json_schema_error(errs, p, "an unknown key", "one of %s", expected);
            free(p);
            ok = false;
        }
    }
    return ok;
}

/* A required non-empty string member of a mapping entry; NULL after an error. */
static const char *get_string(const json_t *obj, const char *key, const char *path,
                              amp_errs *errs) {
    json_t *v = json_object_get(obj, key);
    char *p = amp_json_path_key(path, key);
    const char *s = NULL;
    if (!v)
        amp_json_schema_error(errs, p, "nothing", "a non-empty string");
    else if (!json_is_string(v))
        amp_json_schema_error(errs, p, amp_json_schema_kind(v), "a non-empty string");
    else if (json_string_length(v) == 0)
        amp_json_schema_error(errs, p, "an empty string", "a non-empty string");
    else
        s = json_string_value(v);
    free(p);
    return s;
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

/* ---- apps ------------------------------------------------------------ */

static void check_one_key_source(const amp_json_schema_at *at) {
    if (json_object_get(at->parent, "api_key_env") && json_object_get(at->parent, "api_key_file"))
        amp_json_schema_error(at->errs, at->base, "both api_key_env and api_key_file",
                              "only one of them");
}

static const char *const endpoint_enum[] = {"chat", "completion", "workflow", NULL};

/* Dify's workflow ids are UUIDs; anything else is its 400 bad_request. */
static bool uuid_ok(const char *s) {
    size_t n = 0;
    for (; s[n]; n++) {
        char c = s[n];
        bool dash = n == 8 || n == 13 || n == 18 || n == 23;
        if (dash ? c != '-'
                 : !((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F')))
            return false;
    }
    return n == 36;
}

/* A version can be pinned for workflows and chatflows only. */
static void check_workflow_id(const amp_json_schema_at *at) {
    if (!at->value)
        return;
    const json_t *ep = json_object_get(at->parent, "endpoint");
    const char *e = json_is_string(ep) ? json_string_value(ep) : "chat";
    if (strcmp(e, "completion") == 0)
        amp_json_schema_error(at->errs, at->path, "a workflow_id for endpoint 'completion'",
                              "workflow_id only with endpoint 'workflow' or 'chat' (a chatflow)");
}

static const char *const mode_names[] = {"blocking", "streaming", NULL};

static void set_app_report(const amp_json_schema_at *at);

#define APP_FIELD(m) AMP_JSON_SCHEMA_FIELD(amp_app, m)
#define DELIVERY AMP_JSON_SCHEMA_RESTART_DELIVERY

/* The keys of one app. A new key is one row here plus its use. */
static const amp_json_schema_row app_rows[] = {
    {.key = "api_key_env",
     .type = AMP_JSON_SCHEMA_STRING,
     .reload = DELIVERY,
     APP_FIELD(api_key_env),
     .accept = env_name_ok,
     .item_expect = "an environment variable name ([A-Za-z_][A-Za-z0-9_]*)",
     .doc = "neither this nor api_key_file: " AMP_DEFAULT_API_KEY_ENV},
    {.key = "api_key_file",
     .type = AMP_JSON_SCHEMA_STRING,
     .reload = DELIVERY,
     APP_FIELD(api_key_file),
     .check = check_one_key_source},
    {.key = "endpoint",
     .type = AMP_JSON_SCHEMA_ENUM,
     .names = endpoint_enum,
     .def = "chat",
     .reload = DELIVERY,
     APP_FIELD(endpoint)},
    {.key = "response_mode",
     .type = AMP_JSON_SCHEMA_ENUM,
     .names = mode_names,
     .def = "blocking",
     .reload = DELIVERY,
     APP_FIELD(streaming)},
    {.key = "rate_per_sec",
     .type = AMP_JSON_SCHEMA_NUMBER,
     .dmin = 0,
     .dmax = 1000000,
     .def = "0",
     .reload = DELIVERY,
     APP_FIELD(rate_per_sec),
     .expect = "a number from 0 (unlimited) to 1000000"},
    {.key = "burst",
     .type = AMP_JSON_SCHEMA_INT,
     .min = 1,
     .max = 1000000,
     .reload = DELIVERY,
     APP_FIELD(burst),
     .doc = "default max(1, rate_per_sec)"},
    {.key = "max_in_flight",
     .type = AMP_JSON_SCHEMA_INT,
     .min = 1,
     .max = 10000,
     .def = "8",
     .reload = DELIVERY,
     APP_FIELD(max_in_flight)},
    {.key = "workflow_id",
     .type = AMP_JSON_SCHEMA_STRING,
     .reload = DELIVERY,
     APP_FIELD(workflow_id),
     .accept = uuid_ok,
     .item_expect = "a workflow version id (a UUID, from the app's published versions)",
     .check = check_workflow_id,
     .doc = "none: the latest published version"},
    {.key = "report",
     .type = AMP_JSON_SCHEMA_OBJECT,
     .reload = AMP_JSON_SCHEMA_LIVE,
     .expect = "an object such as {\"event_type\": \"dify_response\"}",
     .set = set_app_report},
    {.key = NULL},
};

const amp_json_schema_row *amp_map_app_schema(void) {
    return app_rows;
}

static void compile_app(amp_app *a, const char *name, const json_t *spec, const char *path,
                        amp_errs *errs) {
    a->name = amp_xstrdup(name);
    amp_json_schema_defaults(app_rows, a);
    if (!*name)
        amp_json_schema_error(errs, path, "an empty name", "a non-empty app name");
    else if (*name == '@')
        amp_json_schema_error(errs, path, "a name starting with '@'",
                              "an app name without a leading '@' (kept for amp2dify's own "
                              "destinations, such as " AMP_MAP_AMPLITUDE_APP ")");
    if (!json_is_object(spec)) {
        amp_json_schema_error(errs, path, amp_json_schema_kind(spec), "an app object");
        return;
    }
    amp_json_schema_read(app_rows, spec, path, a, NULL, errs);
    /* Neither key source: the default app key, DIFY_API_KEY (or _FILE). */
    if (!json_object_get(spec, "api_key_env") && !json_object_get(spec, "api_key_file"))
        a->api_key_env = amp_xstrdup(AMP_DEFAULT_API_KEY_ENV);
    /* Default burst: one second's worth of tokens, at least one. */
    if (!json_object_get(spec, "burst"))
        a->burst = a->rate_per_sec > 1 ? (unsigned)ceil(a->rate_per_sec) : 1;
}

static void compile_apps(amp_mapper *m, const json_t *apps, amp_errs *errs) {
    if (!apps || !json_is_object(apps)) {
        amp_json_schema_error(errs, "apps", apps ? amp_json_schema_kind(apps) : "nothing",
                              AMP_MAP_APPS_EXPECT);
        return;
    }
    m->apps = amp_xcalloc(json_object_size(apps), sizeof(*m->apps));
    const char *name;
    json_t *spec;
    json_object_foreach((json_t *)apps, name, spec) {
        char *p = amp_json_path_key("apps", name);
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

/* A field path that did not parse: "found 'a..b' (empty key at offset 2)". */
static void bad_path(amp_errs *errs, const char *path, const char *text, const char *why) {
    char *found = amp_xasprintf("'%s' (%s)", text, why);
    amp_json_schema_error(errs, path, found, "a field path such as \"user_properties.plan\"");
    free(found);
}

/* Entry idx of "map" into r->rules[idx] (zeroed by the caller). */
static void compile_rule(route *r, size_t idx, const json_t *spec, const char *path,
                         amp_errs *errs) {
    static const char *const keys[] = {"source",       "target",      "transform", "source_field",
                                       "target_field", "transformer", "value",     NULL};
    static const char *const std[] = {"source", "target", "transform"};
    static const char *const alt[] = {"source_field", "target_field", "transformer"};
    if (!json_is_object(spec)) {
        amp_json_schema_error(errs, path, amp_json_schema_kind(spec),
                              "a mapping object {\"source\", \"target\", \"transform\"}");
        return;
    }
    check_keys(spec, path, keys,
               "source or value, target, transform (or source_field, target_field, transformer)",
               errs);
    bool has_std = false, has_alt = false;
    for (size_t k = 0; k < 3; k++) {
        has_std = has_std || json_object_get(spec, std[k]);
        has_alt = has_alt || json_object_get(spec, alt[k]);
    }
    if (has_std && has_alt) {
        amp_json_schema_error(errs, path,
                              "both source/target/transform and "
                              "source_field/target_field/transformer",
                              "one spelling");
        return;
    }
    const char *const *names = has_alt ? alt : std;

    rule *ru = &r->rules[idx];
    char err[160];
    /* "value": a constant instead of a field of the event. */
    const json_t *value = json_object_get(spec, "value");
    if (value && json_object_get(spec, names[0])) {
        char *vp = amp_json_path_key(path, "value");
        amp_json_schema_error(errs, vp, "both value and source", "one of them");
        free(vp);
        return;
    }
    if (value)
        ru->value = json_deep_copy(value);
    const char *src = value ? NULL : get_string(spec, names[0], path, errs);
    const char *dst = get_string(spec, names[1], path, errs);
    char *sp = amp_json_path_key(path, names[0]);
    char *tp = amp_json_path_key(path, names[1]);
    char *xp = amp_json_path_key(path, names[2]);
    if (src && amp_map_path_parse(&ru->source, src, true, err, sizeof(err)) != 0)
        bad_path(errs, sp, src, err);
    if (dst && amp_map_path_parse(&ru->target, dst, false, err, sizeof(err)) != 0) {
        bad_path(errs, tp, dst, err);
        dst = NULL;
    }
    /* Two targets where one contains the other would overwrite each other
     * depending on order; refuse them. */
    for (size_t i = 0; dst && i < idx; i++) {
        const amp_path *o = &r->rules[i].target;
        if (!o->nsegs)
            continue;
        if (path_prefix(o, &ru->target) || path_prefix(&ru->target, o)) {
            char *found =
                amp_xasprintf("'%s', which collides with target '%s' of map[%zu]", dst, o->text, i);
            amp_json_schema_error(errs, tp, found,
                                  "a distinct target, not inside another nor holding one");
            free(found);
        }
    }
    json_t *xf = json_object_get(spec, names[2]);
    if (xf)
        ru->xf = amp_map_xform_compile(xf, xp, errs);
    free(sp);
    free(tp);
    free(xp);
}

/* ---- route keys -------------------------------------------------------- */

/* What the route rows' setters and checks need besides the route. */
typedef struct route_ctx {
    amp_mapper *m;
    const json_t *routes; /* every route, for duplicate names */
    const json_t *apps;
    size_t idx;
} route_ctx;

static void check_unique_name(const amp_json_schema_at *at) {
    const route_ctx *rc = at->ctx;
    const route *r = at->target;
    for (size_t j = 0; r->name && j < rc->idx; j++) {
        json_t *other = json_object_get(json_array_get(rc->routes, j), "name");
        if (json_is_string(other) && !strcmp(json_string_value(other), r->name)) {
            char *found = amp_xasprintf("'%s', also routes[%zu].name", r->name, j);
            amp_json_schema_error(at->errs, at->path, found, "a route name used once");
            free(found);
            break;
        }
    }
}

static void set_filter(const amp_json_schema_at *at) {
    route *r = at->target;
    r->filter = amp_map_filter_compile(at->value, at->path, at->errs);
}

static void set_map(const amp_json_schema_at *at) {
    route *r = at->target;
    size_t i;
    json_t *e;
    r->nrules = json_array_size(at->value);
    r->rules = amp_xcalloc(r->nrules, sizeof(*r->rules));
    json_array_foreach(at->value, i, e) {
        char *ep = amp_json_path_index(at->path, i);
        compile_rule(r, i, e, ep, at->errs);
        free(ep);
    }
}

static void set_app(const amp_json_schema_at *at) {
    const route_ctx *rc = at->ctx;
    route *r = at->target;
    const char *name = json_string_value(at->value);
    int k = find_app(rc->m, name);
    if (k >= 0) {
        r->app = (size_t)k;
        return;
    }
    amp_buf list;
    amp_buf_init(&list, 4096);
    amp_buf_append(&list, "", 0);
    const char *an;
    json_t *av;
    if (json_is_object(rc->apps)) {
        json_object_foreach((json_t *)rc->apps, an, av) {
            if (list.len)
                amp_buf_append(&list, ", ", 2);
            amp_buf_append(&list, an, strlen(an));
        }
    }
    char *found = amp_xasprintf("'%s'", name);
    if (list.len)
        amp_json_schema_error(at->errs, at->path, found, "one of %s", list.data);
    else
        amp_json_schema_error(at->errs, at->path, found, "an app of \"apps\", which has none");
    free(found);
    amp_buf_free(&list);
}

static void set_query(const amp_json_schema_at *at) {
    route *r = at->target;
    r->query = amp_map_tmpl_compile(json_string_value(at->value), at->path, at->errs);
}

static void set_user(const amp_json_schema_at *at) {
    route *r = at->target;
    r->user = amp_map_tmpl_compile(json_string_value(at->value), at->path, at->errs);
}

static const amp_app *route_app(const amp_json_schema_at *at) {
    const route_ctx *rc = at->ctx;
    const route *r = at->target;
    return r->app < rc->m->napps ? &rc->m->apps[r->app] : NULL;
}

static void check_query(const amp_json_schema_at *at) {
    const amp_app *app = route_app(at);
    if (at->value && app && app->endpoint == AMP_ENDPOINT_WORKFLOW) {
        char *found = amp_xasprintf("a query for app '%s', a workflow", app->name);
        amp_json_schema_error(at->errs, at->path, found,
                              "no query (a workflow takes none; map the text into inputs)");
        free(found);
    }
}

static void check_conversation(const amp_json_schema_at *at) {
    const amp_app *app = route_app(at);
    const route *r = at->target;
    if (r->per_user && app && app->endpoint != AMP_ENDPOINT_CHAT) {
        char *found = amp_xasprintf("per_user for app '%s' (endpoint '%s')", app->name,
                                    endpoint_names[app->endpoint]);
        amp_json_schema_error(at->errs, at->path, found, "a chat app for per_user");
        free(found);
    }
}

static const char *const conv_names[] = {"none", "per_user", NULL};

#define REPORT_FIELD(m) AMP_JSON_SCHEMA_FIELD(amp_map_report, m)

#define REPORT_PROP_EXPECT                                                                         \
    "a template string such as \"{{status}}\" or \"{{event.user_properties.plan}}\""

/* "properties": {name: template}, compiled with the routes' templates. */
static void set_report_props(const amp_json_schema_at *at) {
    amp_map_report *r = at->target;
    amp_map_props *p = amp_xcalloc(1, sizeof *p);
    size_t n = json_object_size(at->value);
    p->names = amp_xcalloc(n ? n : 1, sizeof *p->names);
    p->tmpls = amp_xcalloc(n ? n : 1, sizeof *p->tmpls);
    const char *name;
    json_t *v;
    json_object_foreach((json_t *)at->value, name, v) {
        char *path = amp_json_path_key(at->path, name);
        if (!*name) {
            amp_json_schema_error(at->errs, path, "an empty name", "a non-empty property name");
        } else if (!json_is_string(v)) {
            amp_json_schema_error(at->errs, path, amp_json_schema_kind(v), REPORT_PROP_EXPECT);
        } else {
            amp_tmpl *t = amp_map_tmpl_compile(json_string_value(v), path, at->errs);
            if (t) {
                p->names[p->n] = amp_xstrdup(name);
                p->tmpls[p->n++] = t;
            }
        }
        free(path);
    }
    r->props = p;
}

/* The keys of a route's or app's "report". */
static const amp_json_schema_row report_rows[] = {
    {.key = "event_type",
     .type = AMP_JSON_SCHEMA_STRING,
     .def = AMP_MAP_REPORT_EVENT_TYPE,
     .reload = AMP_JSON_SCHEMA_LIVE,
     REPORT_FIELD(event_type)},
    {.key = "answer_chars",
     .type = AMP_JSON_SCHEMA_INT,
     .min = 0,
     .max = 4096,
     .def = "200",
     .reload = AMP_JSON_SCHEMA_LIVE,
     REPORT_FIELD(answer_chars)},
    {.key = "properties",
     .type = AMP_JSON_SCHEMA_OBJECT,
     .reload = AMP_JSON_SCHEMA_LIVE,
     .expect = "an object of property names and templates, e.g. {\"ai_status\": \"{{status}}\"}",
     .set = set_report_props},
    {.key = NULL},
};

static void read_report(amp_map_report *r, const amp_json_schema_at *at) {
    amp_json_schema_defaults(report_rows, r);
    amp_json_schema_read(report_rows, at->value, at->path, r, NULL, at->errs);
    if (!r->event_type)
        r->event_type = amp_xstrdup(AMP_MAP_REPORT_EVENT_TYPE);
}

static void set_report(const amp_json_schema_at *at) {
    route *r = at->target;
    read_report(&r->report, at);
}

static void set_app_report(const amp_json_schema_at *at) {
    amp_app *a = at->target;
    a->report = amp_xcalloc(1, sizeof *a->report);
    read_report(a->report, at);
}

#define ROUTE_FIELD(m) AMP_JSON_SCHEMA_FIELD(route, m)
#define TEMPLATE_EXPECT "a template string such as \"{{event_type}}\""
#define LIVE AMP_JSON_SCHEMA_LIVE

/* The keys of one route, in the order they are read (app before the
 * templates and conversation, which depend on its endpoint). */
static const amp_json_schema_row route_rows[] = {
    {.key = "name",
     .type = AMP_JSON_SCHEMA_STRING,
     .required = true,
     .reload = LIVE,
     ROUTE_FIELD(name),
     .check = check_unique_name},
    {.key = "filter", .type = AMP_JSON_SCHEMA_ANY, .reload = LIVE, .set = set_filter},
    {.key = "map",
     .type = AMP_JSON_SCHEMA_ARRAY,
     .reload = LIVE,
     .expect = "an array of mappings",
     .set = set_map},
    {.key = "app",
     .type = AMP_JSON_SCHEMA_STRING,
     .required = true,
     .reload = LIVE,
     .set = set_app},
    {.key = "query",
     .type = AMP_JSON_SCHEMA_STRING,
     .allow_empty = true,
     .reload = LIVE,
     .expect = TEMPLATE_EXPECT,
     .set = set_query,
     .check = check_query},
    {.key = "user",
     .type = AMP_JSON_SCHEMA_STRING,
     .allow_empty = true,
     .reload = LIVE,
     .expect = TEMPLATE_EXPECT,
     .set = set_user},
    {.key = "conversation",
     .type = AMP_JSON_SCHEMA_ENUM,
     .names = conv_names,
     .def = "none",
     .reload = LIVE,
     ROUTE_FIELD(per_user),
     .check = check_conversation},
    {.key = "report",
     .type = AMP_JSON_SCHEMA_OBJECT,
     .reload = LIVE,
     .expect = "an object such as {\"event_type\": \"dify_response\"}",
     .set = set_report},
    {.key = NULL},
};

static void compile_route(amp_mapper *m, route *r, size_t idx, const json_t *spec,
                          const json_t *all_routes, const json_t *apps, const char *path,
                          amp_errs *errs) {
    r->app = SIZE_MAX;
    if (!json_is_object(spec)) {
        amp_json_schema_error(errs, path, amp_json_schema_kind(spec), "a route object");
        r->name = amp_xstrdup("");
        r->label = amp_xasprintf("%s ()", path);
        return;
    }
    route_ctx rc = {.m = m, .routes = all_routes, .apps = apps, .idx = idx};
    amp_json_schema_defaults(route_rows, r);
    amp_json_schema_read(route_rows, spec, path, r, &rc, errs);
    if (!r->name)
        r->name = amp_xstrdup("");
    r->label = amp_xasprintf("%s (%s)", path, r->name);
    /* Chat requires a query; without a template the event type is the
     * message. Completion only sends one when the route asks for it. */
    const amp_app *app = r->app < m->napps ? &m->apps[r->app] : NULL;
    if (!r->query && app && app->endpoint == AMP_ENDPOINT_CHAT)
        r->query = amp_map_tmpl_compile("{{event_type}}", path, errs);
}

static void compile_routes(amp_mapper *m, const json_t *routes, const json_t *apps,
                           amp_errs *errs) {
    if (!routes || !json_is_array(routes)) {
        amp_json_schema_error(errs, "routes", routes ? amp_json_schema_kind(routes) : "nothing",
                              AMP_MAP_ROUTES_EXPECT);
        return;
    }
    m->routes = amp_xcalloc(json_array_size(routes), sizeof(*m->routes));
    size_t i;
    json_t *spec;
    json_array_foreach(routes, i, spec) {
        char *p = amp_json_path_index("routes", i);
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

/* ---- checks against the live app ------------------------------------- */

/* Which Dify app modes each endpoint serves (Service API routes). */
static bool mode_fits(amp_endpoint e, const char *mode) {
    switch (e) {
    case AMP_ENDPOINT_CHAT:
        return !strcmp(mode, "chat") || !strcmp(mode, "agent-chat") ||
               !strcmp(mode, "advanced-chat") || !strcmp(mode, "agent");
    case AMP_ENDPOINT_COMPLETION:
        return !strcmp(mode, "completion");
    case AMP_ENDPOINT_WORKFLOW:
        return !strcmp(mode, "workflow");
    }
    return false;
}

static bool mode_known(const char *mode) {
    static const char *const modes[] = {"completion",    "chat",     "agent-chat",
                                        "advanced-chat", "workflow", "agent"};
    for (size_t i = 0; i < sizeof modes / sizeof modes[0]; i++)
        if (!strcmp(mode, modes[i]))
            return true;
    return false;
}

/* The settings of one user_input_form item ({"<type>": {...}}), or NULL. */
static const json_t *form_item(const json_t *item) {
    if (!json_is_object(item) || json_object_size(item) != 1)
        return NULL;
    const char *k;
    json_t *v;
    json_object_foreach((json_t *)item, k, v) return json_is_object(v) ? v : NULL;
    return NULL;
}

static const char *form_var(const json_t *item) {
    const json_t *v = json_object_get(form_item(item), "variable");
    return json_is_string(v) ? json_string_value(v) : NULL;
}

/* Form item of variable name, or NULL. */
static const json_t *form_find(const json_t *form, const char *name) {
    size_t i;
    json_t *item;
    json_array_foreach((json_t *)form, i, item) {
        const char *v = form_var(item);
        if (v && !strcmp(v, name))
            return form_item(item);
    }
    return NULL;
}

/* "a, b, c" of strings from an array of them (or of form variables). */
static void join_names(amp_buf *b, const json_t *arr, bool vars) {
    amp_buf_append(b, "", 0);
    size_t i;
    json_t *item;
    json_array_foreach((json_t *)arr, i, item) {
        const char *n = vars ? form_var(item) : json_string_value(item);
        if (!n)
            continue;
        if (b->len)
            amp_buf_append(b, ", ", 2);
        amp_buf_append(b, n, strlen(n));
    }
}

static void check_route(const route *r, size_t ri, const json_t *form, amp_errs *errs) {
    char *rp = amp_json_path_index("routes", ri);
    char *mp = amp_json_path_key(rp, "map");
    amp_buf names;
    amp_buf_init(&names, 1 << 16);
    join_names(&names, form, true);
    for (size_t j = 0; j < r->nrules; j++) {
        const rule *ru = &r->rules[j];
        if (!ru->target.nsegs || !ru->target.segs[0].key)
            continue;
        const char *key = ru->target.segs[0].key;
        char *jp = amp_json_path_index(mp, j);
        const json_t *item = form_find(form, key);
        if (!item) {
            char *tp = amp_json_path_key(jp, "target");
            char *found = amp_xasprintf("'%s', an input the app does not have", key);
            if (names.len)
                amp_json_schema_error(errs, tp, found, "one of the app's variables: %s",
                                      names.data);
            else
                amp_json_schema_error(errs, tp, found, "no inputs: the app's form has none");
            free(found);
            free(tp);
        } else if (json_is_string(ru->value) && ru->target.nsegs == 1 && !ru->xf) {
            /* A constant is known now: check it as Dify will. */
            const char *v = json_string_value(ru->value);
            const json_t *opts = json_object_get(item, "options");
            const json_t *maxl = json_object_get(item, "max_length");
            char *vp = amp_json_path_key(jp, "value");
            bool listed = !json_is_array(opts) || json_array_size(opts) == 0;
            size_t k;
            json_t *o;
            json_array_foreach((json_t *)opts, k, o) listed |=
                json_is_string(o) && !strcmp(json_string_value(o), v);
            if (!listed) {
                amp_buf ob;
                amp_buf_init(&ob, 1 << 16);
                join_names(&ob, opts, false);
                char *found = amp_xasprintf("'%s'", v);
                amp_json_schema_error(errs, vp, found, "one of the options of '%s': %s", key,
                                      ob.data ? ob.data : "");
                free(found);
                amp_buf_free(&ob);
            } else if (json_is_integer(maxl) && json_integer_value(maxl) > 0) {
                size_t cps = 0;
                for (const char *c = v; *c; c++)
                    cps += ((unsigned char)*c & 0xC0) != 0x80;
                if ((json_int_t)cps > json_integer_value(maxl)) {
                    char *found = amp_xasprintf("%zu characters", cps);
                    amp_json_schema_error(errs, vp, found, "at most %lld (max_length of '%s')",
                                          (long long)json_integer_value(maxl), key);
                    free(found);
                }
            }
            free(vp);
        }
        free(jp);
    }
    /* Required variables every request of the route must carry. */
    size_t i;
    json_t *item;
    json_array_foreach((json_t *)form, i, item) {
        const char *var = form_var(item);
        const json_t *req = json_object_get(form_item(item), "required");
        if (!var || !json_is_true(req))
            continue;
        bool mapped = false;
        for (size_t j = 0; j < r->nrules && !mapped; j++)
            mapped = r->rules[j].target.nsegs && r->rules[j].target.segs[0].key &&
                     !strcmp(r->rules[j].target.segs[0].key, var);
        if (!mapped) {
            char *found = amp_xasprintf("no mapping for the required variable '%s'", var);
            amp_json_schema_error(errs, mp, found, "a mapping with target '%s'", var);
            free(found);
        }
    }
    amp_buf_free(&names);
    free(mp);
    free(rp);
}

void amp_mapper_check_app(const amp_mapper *m, size_t i, const char *mode, const json_t *form,
                          amp_errs *errs) {
    if (i >= m->napps)
        return;
    const amp_app *app = &m->apps[i];
    char *ap = amp_json_path_key("apps", app->name);
    if (mode && mode_known(mode)) {
        if (!mode_fits(app->endpoint, mode)) {
            char *ep = amp_json_path_key(ap, "endpoint");
            char *found = amp_xasprintf("'%s' for a Dify app of mode '%s'",
                                        endpoint_names[app->endpoint], mode);
            amp_json_schema_error(errs, ep, found, "'%s'",
                                  !strcmp(mode, "completion") ? "completion"
                                  : !strcmp(mode, "workflow") ? "workflow"
                                                              : "chat");
            free(found);
            free(ep);
        } else if (!app->streaming && (!strcmp(mode, "agent-chat") || !strcmp(mode, "agent"))) {
            /* Agent apps answer in streaming mode only. */
            char *rp = amp_json_path_key(ap, "response_mode");
            char *found = amp_xasprintf("'blocking' for a Dify app of mode '%s'", mode);
            amp_json_schema_error(errs, rp, found, "'streaming'");
            free(found);
            free(rp);
        }
    }
    if (json_is_array(form))
        for (size_t r = 0; r < m->nroutes; r++)
            if (m->routes[r].app == i)
                check_route(&m->routes[r], r, form, errs);
    free(ap);
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
        json_t *v;
        if (ru->value) {
            /* A copy per body: the mapper is shared by every HTTP thread. */
            v = json_deep_copy(ru->value);
        } else {
            v = amp_map_path_get(&ru->source, event);
            /* Shared with the event, not copied: amp_map_path_set copies a
             * shared object before writing into it, so the event (and any
             * other body) never changes. */
            if (v)
                v = json_incref(v);
        }
        if (ru->xf) {
            const char *why;
            v = amp_map_xform_apply(ru->xf, v, &why);
            if (why) {
                snprintf(detail, dlen, "%s: required field %s is %s", r->label,
                         ru->source.text ? ru->source.text : "value", why);
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
                .source = r->report.event_type || m->apps[r->app].report ? event : NULL,
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
