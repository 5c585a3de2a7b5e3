/*
 * bench_mapping — single-threaded throughput of the mapping engine: one
 * route with 10 rules (a 3-rule filter and 7 field mappings with
 * transforms, plus query and user templates) applied to a ~600-byte event.
 *
 *   bench_mapping [SECONDS]     default 2; prints events/s for
 *                               apply alone and for decode + apply
 *
 * Link with libamp.a (or the mapping, json and base sources), jansson and
 * libcrypto.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../mapping/mapping.h"
#include "../base/clock.h"
#include "../base/errs.h"

static const char CONFIG[] =
    "{\"apps\": {\"support\": {\"api_key_env\": \"DIFY_API_KEY\"}},"
    " \"routes\": [{"
    "  \"name\": \"ai-usage\", \"app\": \"support\", \"conversation\": \"per_user\","
    "  \"filter\": {\"all\": ["
    "    {\"field\": \"event_type\", \"op\": \"equals\", \"value\": \"AI_Generation_Executed\"},"
    "    {\"field\": \"user_id\", \"op\": \"exclude_null\"},"
    "    {\"field\": \"user_properties.plan\", \"op\": \"in\", \"value\": [\"pro\", \"team\"]}]},"
    "  \"map\": ["
    "    {\"source\": \"user_properties.user_name\", \"target\": \"username\","
    "     \"transform\": \"trim|lowercase\"},"
    "    {\"source\": \"user_properties.plan\", \"target\": \"plan\"},"
    "    {\"source\": \"event_time\", \"target\": \"at\", \"transform\": \"iso8601\"},"
    "    {\"source\": \"event_properties.model\", \"target\": \"model.name\"},"
    "    {\"source\": \"event_properties.tokens\", \"target\": \"model.tokens\","
    "     \"transform\": \"to_number\"},"
    "    {\"source\": \"event_properties.prompt\", \"target\": \"prompt\","
    "     \"transform\": \"truncate:40\"},"
    "    {\"source\": \"country\", \"target\": \"country\", \"transform\": \"default:unknown\"}],"
    "  \"query\": \"{{event_type}} by {{inputs.username}} on plan {{inputs.plan}}\","
    "  \"user\": \"{{user_id}}\"}]}";

static const char EVENT[] =
    "{\"event_type\": \"AI_Generation_Executed\", \"user_id\": \"user-000123456\","
    " \"device_id\": \"c2f1a7e0-9d7b-4b51-9a55-0f4c1f3e2a11\", \"insert_id\":"
    " \"5f0c6a2e-1b7d-4a11-8c3e-7b9d2f4e6a80\", \"event_time\": \"2026-11-21 10:15:42.123000\","
    " \"time\": 1795256142123, \"platform\": \"Web\", \"os_name\": \"Chrome\", \"country\":"
    " \"Germany\", \"city\": \"Berlin\", \"language\": \"German\", \"user_properties\":"
    " {\"user_name\": \"  Ada Lovelace  \", \"plan\": \"pro\", \"signup\": \"2025-01-02\","
    " \"seats\": 12}, \"event_properties\": {\"model\": \"gpt-4o-mini\", \"tokens\": \"1532\","
    " \"latency_ms\": 842, \"prompt\": \"Summarise the quarterly usage report for the board\","
    " \"success\": true, \"temperature\": 0.2}}";

static size_t emitted;

static void on_request(void *ctx, const amp_map_request *req) {
    (void)ctx;
    (void)req;
    emitted++;
}

static double run(const amp_mapper *m, const json_t *event, bool decode, double seconds) {
    char detail[256];
    size_t n = 0;
    int64_t start = amp_mono_ms(), deadline = start + (int64_t)(seconds * 1000);
    int64_t now = start;
    while (now < deadline) {
        /* Check the clock every 1024 events; the loop is bounded by time. */
        for (int i = 0; i < 1024; i++) {
            json_t *evs = NULL;
            const json_t *ev = event;
            if (decode) {
                if (amp_map_decode_body(EVENT, sizeof(EVENT) - 1, &evs, detail, sizeof(detail)) !=
                    AMP_DECODE_OK) {
                    fprintf(stderr, "decode failed: %s\n", detail);
                    exit(1);
                }
                ev = json_array_get(evs, 0);
            }
            if (amp_mapper_apply(m, ev, on_request, NULL, NULL, NULL, detail, sizeof(detail)) !=
                1) {
                fprintf(stderr, "event did not map to one request: %s\n", detail);
                exit(1);
            }
            json_decref(evs);
        }
        n += 1024;
        now = amp_mono_ms();
    }
    return (double)n * 1000.0 / (double)(now - start);
}

int main(int argc, char **argv) {
    double seconds = argc > 1 ? strtod(argv[1], NULL) : 2.0;
    if (!(seconds > 0 && seconds <= 60)) {
        fprintf(stderr, "usage: bench_mapping [SECONDS (0-60]]\n");
        return 2;
    }
    json_error_t jerr;
    json_t *cfg = json_loads(CONFIG, 0, &jerr);
    if (!cfg) {
        fprintf(stderr, "config: %s\n", jerr.text);
        return 1;
    }
    amp_errs *errs = amp_errs_create();
    amp_mapper *m =
        amp_mapper_compile(json_object_get(cfg, "apps"), json_object_get(cfg, "routes"), errs);
    if (!m) {
        for (size_t i = 0; i < amp_errs_count(errs); i++)
            fprintf(stderr, "config: %s\n", amp_errs_get(errs, i));
        return 1;
    }
    json_t *event = json_loads(EVENT, 0, &jerr);
    if (!event) {
        fprintf(stderr, "event: %s\n", jerr.text);
        return 1;
    }

    double apply_rate = run(m, event, false, seconds / 2);
    double full_rate = run(m, event, true, seconds / 2);
    printf("mapping: event %zu bytes, 1 route, 10 rules\n", sizeof(EVENT) - 1);
    printf("mapping apply:          %.0f events/s\n", apply_rate);
    printf("mapping decode + apply: %.0f events/s\n", full_rate);

    json_decref(event);
    json_decref(cfg);
    amp_mapper_destroy(m);
    amp_errs_destroy(errs);
    return emitted > 0 ? 0 : 1;
}
