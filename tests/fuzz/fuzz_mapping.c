/*
 * fuzz_mapping — the mapping engine (mapping/mapper.c, filter.c, path.c,
 * transform.c, template.c) applied to fuzzed events against one fixed
 * config, compiled once: routes with every filter op and combinator, every
 * transform, nested and quoted paths, templates reading the event and the
 * mapped inputs, the three endpoints and per-user conversations.
 *
 * Input: a request body. As in the webhook handler it is decoded and
 * validated first (amp_map_decode_body), so the mapper only ever sees events
 * the server would hand it.
 *
 * Properties checked per event:
 *  - apply returns -1 (with a reason) or the number of requests emitted;
 *  - every request body is an object with an "inputs" object, a non-empty
 *    string "user" and a "response_mode", serialisable as JSON, and names a
 *    known route and app;
 *  - applying with and without the explain callback gives the same answer,
 *    and explain is called once per route that produced nothing.
 */
#include <jansson.h>
#include <string.h>

#include "../../mapping/mapping.h"
#include "fuzz.h"
#include "../../base/errs.h"

static const char config_apps[] =
    "{\"chat\": {\"api_key_env\": \"K1\", \"endpoint\": \"chat\", \"response_mode\": "
    "\"streaming\"},"
    " \"comp\": {\"api_key_env\": \"K2\", \"endpoint\": \"completion\"},"
    " \"flow\": {\"api_key_env\": \"K3\", \"endpoint\": \"workflow\"}}";

static const char config_routes[] =
    "["
    /* The SPEC's example route. */
    "{\"name\": \"ai-usage\","
    " \"filter\": {\"all\": ["
    "   {\"field\": \"event_type\", \"op\": \"equals\", \"value\": \"AI_Generation_Executed\"},"
    "   {\"field\": \"user_id\", \"op\": \"exclude_null\"}]},"
    " \"map\": ["
    "   {\"source\": \"user_properties.user_name\", \"target\": \"username\","
    "    \"transform\": \"trim|lowercase\"},"
    "   {\"source\": \"event_properties.plan\", \"target\": \"plan\"}],"
    " \"app\": \"chat\","
    " \"query\": \"{{event_type}} by {{inputs.username}} on plan {{inputs.plan}}\","
    " \"user\": \"{{user_id}}\", \"conversation\": \"per_user\"},"
    /* Every op, nested combinators. */
    "{\"name\": \"ops\","
    " \"filter\": {\"any\": ["
    "   {\"all\": [{\"field\": \"event_properties.amount\", \"op\": \"gt\", \"value\": 10},"
    "             {\"field\": \"event_properties.amount\", \"op\": \"lte\", \"value\": "
    "1e300}]},"
    "   {\"field\": \"event_type\", \"op\": \"in\", \"value\": [\"Purchase\", \"Refund\", 1, "
    "null]},"
    "   {\"field\": \"event_type\", \"op\": \"regex\", \"value\": \"^(Sub|Plan)_[A-Za-z]+$\"},"
    "   {\"field\": \"user_properties[\\\"a.b\\\"]\", \"op\": \"exists\"},"
    "   {\"field\": \"event_properties.items[0].sku\", \"op\": \"prefix\", \"value\": \"SKU-\"},"
    "   {\"field\": \"time\", \"op\": \"gte\", \"value\": 9223372036854775807},"
    "   {\"field\": \"event_properties.score\", \"op\": \"lt\", \"value\": -0.5},"
    "   {\"not\": {\"any\": [{\"field\": \"device_id\", \"op\": \"not_equals\", \"value\": "
    "\"d1\"},"
    "                     {\"field\": \"platform\", \"op\": \"equals\", \"value\": {\"a\": [1]}}]}}"
    " ]},"
    " \"map\": ["
    "   {\"source\": \"event_properties.amount\", \"target\": \"money.amount\","
    "    \"transform\": \"to_string|truncate:8\"},"
    "   {\"source_field\": \"event_properties.amount\", \"target_field\": \"money.num\","
    "    \"transformer\": \"to_number|default:0|to_number\"},"
    "   {\"source\": \"event_time\", \"target\": \"when\", \"transform\": \"iso8601\"},"
    "   {\"source\": \"time\", \"target\": \"when_ms\", \"transform\": [\"iso8601\", "
    "\"default:never\"]},"
    "   {\"source\": \"user_properties.email\", \"target\": \"email_hash\","
    "    \"transform\": \"trim|lowercase|sha256\"},"
    "   {\"source\": \"user_properties\", \"target\": \"profile\"},"
    "   {\"source\": \"event_properties.items[1]\", \"target\": \"second_item\","
    "    \"transform\": \"to_string|uppercase|truncate:3\"},"
    "   {\"source\": \"user_properties[\\\"a.b\\\"]\", \"target\": \"dotted\"}],"
    " \"app\": \"comp\","
    " \"query\": \"{{inputs}} / {{event_properties}} / {{[\\\"inputs\\\"].x}} / "
    "{{user_properties[\\\"a.b\\\"]}}\"},"
    /* A required field: events without it make the request invalid. */
    "{\"name\": \"needs-order\","
    " \"filter\": {\"field\": \"event_type\", \"op\": \"equals\", \"value\": \"Order\"},"
    " \"map\": [{\"source\": \"event_properties.order_id\", \"target\": \"order\","
    "            \"transform\": \"to_string|required\"}],"
    " \"app\": \"flow\"},"
    /* No filter: every event; user from a template that may render empty. */
    "{\"name\": \"everything\","
    " \"map\": [{\"source\": \"event_type\", \"target\": \"type\"},"
    "          {\"source\": \"insert_id\", \"target\": \"id\", \"transform\": \"default:none\"}],"
    " \"app\": \"chat\", \"user\": \"{{user_properties.account}}\","
    " \"query\": \"{{event_type}} {{event_properties.items}} {{inputs.type}}\"}"
    "]";

static amp_mapper *get_mapper(void) {
    static amp_mapper *m;
    if (m)
        return m;
    json_error_t jerr;
    json_t *apps = json_loads(config_apps, JSON_REJECT_DUPLICATES, &jerr);
    FUZZ_CHECK(apps, "apps: %s", jerr.text);
    json_t *routes = json_loads(config_routes, JSON_REJECT_DUPLICATES, &jerr);
    FUZZ_CHECK(routes, "routes: line %d column %d: %s", jerr.line, jerr.column, jerr.text);
    amp_errs *errs = amp_errs_create();
    m = amp_mapper_compile(apps, routes, errs);
    FUZZ_CHECK(m, "config does not compile: %s", amp_errs_get(errs, 0));
    amp_errs_destroy(errs);
    json_decref(apps);
    json_decref(routes);
    return m;
}

static const char *const route_names[] = {"ai-usage", "ops", "needs-order", "everything"};
#define NROUTES (sizeof route_names / sizeof route_names[0])

typedef struct {
    const amp_mapper *m;
    int emitted;
    int explained;
} ctx;

static void emit(void *c, const amp_map_request *req) {
    ctx *x = c;
    x->emitted++;
    bool known = false;
    for (size_t i = 0; i < NROUTES; i++)
        known |= strcmp(req->route, route_names[i]) == 0;
    FUZZ_CHECK(known, "unknown route '%s'", req->route);
    bool app_known = false;
    for (size_t i = 0; i < amp_mapper_app_count(x->m); i++)
        app_known |= req->app == amp_mapper_app(x->m, i);
    FUZZ_CHECK(app_known, "app not from the mapper");
    FUZZ_CHECK(json_is_object(req->body), "body is not an object");
    FUZZ_CHECK(json_is_object(json_object_get(req->body, "inputs")), "no inputs object");
    const json_t *user = json_object_get(req->body, "user");
    FUZZ_CHECK(json_is_string(user) && json_string_length(user) > 0, "no user");
    FUZZ_CHECK(req->user && strcmp(req->user, json_string_value(user)) == 0, "user differs");
    FUZZ_CHECK(json_is_string(json_object_get(req->body, "response_mode")), "no response_mode");
    char *text = json_dumps(req->body, JSON_COMPACT | JSON_PRESERVE_ORDER);
    FUZZ_CHECK(text, "body does not serialise");
    free(text);
}

static void explain(void *c, const char *route, const char *reason) {
    ctx *x = c;
    FUZZ_CHECK(route && reason && *reason, "explain without a reason");
    x->explained++;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    const amp_mapper *m = get_mapper();
    char detail[256];
    json_t *events = NULL;
    if (amp_map_decode_body((const char *)data, size, &events, detail, sizeof detail) !=
        AMP_DECODE_OK)
        return 0;
    size_t i;
    json_t *ev;
    json_array_foreach(events, i, ev) {
        ctx plain = {.m = m}, verbose = {.m = m};
        char why[200] = "", why2[200] = "";
        int n = amp_mapper_apply(m, ev, emit, &plain, NULL, NULL, why, sizeof why);
        int n2 = amp_mapper_apply(m, ev, emit, &verbose, explain, &verbose, why2, sizeof why2);
        FUZZ_CHECK(n == n2, "with explain %d, without %d", n2, n);
        if (n < 0) {
            FUZZ_CHECK(why[0] && strcmp(why, why2) == 0, "reasons '%s' and '%s'", why, why2);
            continue;
        }
        FUZZ_CHECK(n == plain.emitted, "returned %d, emitted %d", n, plain.emitted);
        FUZZ_CHECK(n + verbose.explained == (int)NROUTES, "%d emitted + %d explained != %zu", n,
                   verbose.explained, NROUTES);
    }
    json_decref(events);
    return 0;
}
