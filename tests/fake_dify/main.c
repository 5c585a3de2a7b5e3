/*
 * build/fake-dify — the fake Dify as a standalone process, for benchmarks:
 *
 *   fake-dify --port P --key K [--delay-ms D] [--fail-rate R] [--seed S]
 *             [--stream-chunk N] [--record]
 *
 * Prints "listening <port>" once it accepts connections, runs until SIGTERM
 * or SIGINT, then prints {"requests":N,"delivered":D} and exits 0.
 * Per-request recording is off unless --record, so memory stays flat.
 */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../fake_main.h"
#include "fake_dify.h"

static int usage(void) {
    fprintf(stderr, "usage: fake-dify --port P --key K [--delay-ms D] [--fail-rate R] "
                    "[--seed S] [--stream-chunk N] [--record]\n");
    return 2;
}

int main(int argc, char **argv) {
    int64_t port = 0, delay = 0, chunk = 0, seed = 1;
    double fail_rate = 0;
    const char *key = NULL;
    int record = 0;

    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (strcmp(a, "--record") == 0) {
            record = 1;
            continue;
        }
        if (!v)
            return usage();
        i++;
        if (strcmp(a, "--port") == 0) {
            if (fake_main_num("fake-dify", a, v, 65535, &port))
                return 2;
        } else if (strcmp(a, "--key") == 0) {
            key = v;
        } else if (strcmp(a, "--delay-ms") == 0) {
            if (fake_main_num("fake-dify", a, v, 3600 * 1000, &delay))
                return 2;
        } else if (strcmp(a, "--stream-chunk") == 0) {
            if (fake_main_num("fake-dify", a, v, 1 << 20, &chunk))
                return 2;
        } else if (strcmp(a, "--seed") == 0) {
            if (fake_main_num("fake-dify", a, v, INT64_MAX, &seed))
                return 2;
        } else if (strcmp(a, "--fail-rate") == 0) {
            char *end;
            errno = 0;
            fail_rate = strtod(v, &end);
            if (errno || end == v || *end || fail_rate < 0 || fail_rate > 1) {
                fprintf(stderr, "fake-dify: --fail-rate expects a number in [0, 1]\n");
                return 2;
            }
        } else {
            return usage();
        }
    }
    if (!key)
        return usage();

    sigset_t stop;
    fake_main_block_stop(&stop);

    fake_dify *f = fake_dify_start((uint16_t)port, key);
    if (!f)
        return 1;
    fake_dify_set_recording(f, record != 0);
    fake_dify_behaviour dflt;
    memset(&dflt, 0, sizeof(dflt));
    dflt.delay_ms = (unsigned)delay;
    dflt.stream_chunk = (size_t)chunk;
    fake_dify_set_default(f, &dflt);
    if (fail_rate > 0)
        fake_dify_set_fail_rate(f, fail_rate, (uint64_t)seed);

    printf("listening %u\n", fake_dify_port(f));
    fflush(stdout);

    int sig = 0;
    sigwait(&stop, &sig);
    size_t requests = fake_dify_count(f), delivered = fake_dify_delivered(f);
    fake_dify_stop(f);
    printf("{\"requests\":%zu,\"delivered\":%zu}\n", requests, delivered);
    fflush(stdout);
    return 0;
}
