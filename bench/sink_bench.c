/*
 * sink_bench — throughput of the Amplitude sink (forward/amplitude.c):
 * report-sized events sent at batch 2,000 to the tests' fake Amplitude on
 * 127.0.0.1 (in this process; it parses every request and counts events).
 *
 *   baseline  the same request bodies, built beforehand, POSTed with a bare
 *             libcurl handle: the floor of the HTTP and the fake's parsing
 *   sink      amp_forward_amplitude_send over the same events: fitting the
 *             batches (2,000 events, under 1 MB), building each body,
 *             reading each answer into every event's fate
 *
 * Prints one JSON line: {"events","batch","baseline_eps","sink_eps","ratio"}.
 * Usage: sink_bench [EVENTS] (default 200000). Exit 1 when an event is not
 * ingested or the fake counted a different number.
 */
#include <curl/curl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../base/alloc.h"
#include "../base/clock.h"
#include "../forward/forward_int.h"
#include "../tests/fake_amplitude/fake_amplitude.h"

#define KEY "bench-amplitude-key"
#define BATCH 2000

static size_t discard(char *p, size_t s, size_t n, void *u) {
    (void)p;
    (void)u;
    return s * n;
}

int main(int argc, char **argv) {
    size_t n = argc > 1 ? strtoul(argv[1], NULL, 10) : 200000;
    if (n == 0)
        n = 200000;
    curl_global_init(CURL_GLOBAL_DEFAULT);
    fake_amplitude *fa = fake_amplitude_start(0, KEY, "unused");
    if (!fa)
        return 1;
    fake_amplitude_http_count_only(fa, true);
    char url[64];
    snprintf(url, sizeof url, "http://127.0.0.1:%u/2/httpapi", fake_amplitude_port(fa));

    char **json = amp_xcalloc(n, sizeof *json);
    char(*users)[16] = amp_xcalloc(n, sizeof *users);
    amp_forward_amplitude_event *ev = amp_xcalloc(n, sizeof *ev);
    for (size_t i = 0; i < n; i++) {
        snprintf(users[i], sizeof users[i], "user-%zu", i % 5000);
        json[i] = amp_xasprintf(
            "{\"event_type\":\"dify_response\",\"user_id\":\"%s\",\"insert_id\":"
            "\"amp2dify-all-evt-%zu\",\"time\":1793491200000,\"event_properties\":{\"status\":"
            "\"delivered\",\"dify_app\":\"support\",\"route\":\"all\",\"endpoint\":"
            "\"chat-messages\",\"attempts\":1,\"http_status\":200,\"latency_ms\":812,"
            "\"tokens\":311,\"conversation_id\":\"c-%zu\",\"message_id\":\"m-%zu\","
            "\"answer\":\"Thanks for reaching out, here is what I found\"}}",
            users[i], i, i % 5000, i);
        ev[i].json = json[i];
        ev[i].user_id = users[i];
    }

    /* Baseline: the same bodies, built beforehand. */
    size_t nbodies = (n + BATCH - 1) / BATCH;
    char **bodies = amp_xcalloc(nbodies, sizeof *bodies);
    for (size_t b = 0; b < nbodies; b++) {
        size_t k = n - b * BATCH < BATCH ? n - b * BATCH : BATCH;
        bodies[b] = amp_forward_amplitude_body(KEY, ev + b * BATCH, k);
    }
    CURL *c = curl_easy_init();
    struct curl_slist *h = curl_slist_append(NULL, "Content-Type: application/json");
    curl_easy_setopt(c, CURLOPT_URL, url);
    curl_easy_setopt(c, CURLOPT_HTTPHEADER, h);
    curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, discard);
    int64_t t0 = amp_mono_ms();
    for (size_t b = 0; b < nbodies; b++) {
        curl_easy_setopt(c, CURLOPT_POSTFIELDS, bodies[b]);
        if (curl_easy_perform(c) != CURLE_OK) {
            fprintf(stderr, "sink_bench: baseline POST failed\n");
            return 1;
        }
    }
    int64_t base_ms = amp_mono_ms() - t0;
    curl_slist_free_all(h);
    curl_easy_cleanup(c);
    uint64_t base_counted = fake_amplitude_http_counted(fa);

    char err[256];
    amp_forward_http *http = amp_forward_http_create(5, 60, NULL, err, sizeof err);
    if (!http) {
        fprintf(stderr, "sink_bench: %s\n", err);
        return 1;
    }
    t0 = amp_mono_ms();
    amp_forward_amplitude_stats st;
    amp_forward_amplitude_send(http, url, KEY, ev, n, BATCH, &st);
    int64_t sink_ms = amp_mono_ms() - t0;
    uint64_t sink_counted = fake_amplitude_http_counted(fa) - base_counted;
    size_t ingested = 0;
    for (size_t i = 0; i < n; i++)
        ingested += ev[i].fate == AMP_FORWARD_AMPLITUDE_INGESTED;

    double base_eps = (double)n * 1000.0 / (double)(base_ms > 0 ? base_ms : 1);
    double sink_eps = (double)n * 1000.0 / (double)(sink_ms > 0 ? sink_ms : 1);
    printf("{\"events\":%zu,\"batch\":%d,\"requests\":%u,\"baseline_ms\":%lld,\"sink_ms\":%lld,"
           "\"baseline_eps\":%.0f,\"sink_eps\":%.0f,\"ratio\":%.3f}\n",
           n, BATCH, st.requests, (long long)base_ms, (long long)sink_ms, base_eps, sink_eps,
           sink_eps / base_eps);
    int rc = ingested == n && sink_counted == n && base_counted == n ? 0 : 1;
    if (rc)
        fprintf(stderr, "sink_bench: ingested %zu, counted %llu / %llu of %zu\n", ingested,
                (unsigned long long)sink_counted, (unsigned long long)base_counted, n);
    amp_forward_http_destroy(http);
    for (size_t b = 0; b < nbodies; b++)
        free(bodies[b]);
    free(bodies);
    for (size_t i = 0; i < n; i++)
        free(json[i]);
    free(json);
    free(users);
    free(ev);
    fake_amplitude_stop(fa);
    curl_global_cleanup();
    return rc;
}
