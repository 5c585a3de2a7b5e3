/*
 * build/fake-amplitude — the fake Amplitude's HTTP V2 side as a standalone
 * process, for script tests (tests/sdk/run.sh):
 *
 *   fake-amplitude --port P --key K [--push-status S]... [--throttle-user U]
 *                  [--throttle-requests N] [--events-out FILE]
 *
 * --push-status: the next valid request gets S (500, 503...), FIFO, one per
 * use. --throttle-user: the next N (default 1) requests holding an event of
 * U get 429. Prints "listening <port>" once it accepts connections, runs
 * until SIGTERM or SIGINT, then writes the stored events (once per
 * insert_id, as sent) as a JSON array to FILE, prints
 * {"events":N,"duplicates":D,"requests":R} and exits 0.
 */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../fake_main.h"
#include "fake_amplitude.h"

static int usage(void) {
    fprintf(stderr, "usage: fake-amplitude --port P --key K [--push-status S]... "
                    "[--throttle-user U] [--throttle-requests N] [--events-out FILE]\n");
    return 2;
}

int main(int argc, char **argv) {
    int64_t port = 0, throttle_n = 1, statuses[16];
    size_t nstatus = 0;
    const char *key = NULL, *throttle_user = NULL, *out = NULL;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!v)
            return usage();
        i++;
        if (strcmp(a, "--port") == 0) {
            if (fake_main_num("fake-amplitude", a, v, 65535, &port))
                return 2;
        } else if (strcmp(a, "--key") == 0) {
            key = v;
        } else if (strcmp(a, "--push-status") == 0) {
            if (nstatus == sizeof statuses / sizeof statuses[0] ||
                fake_main_num("fake-amplitude", a, v, 599, &statuses[nstatus]))
                return 2;
            nstatus++;
        } else if (strcmp(a, "--throttle-user") == 0) {
            throttle_user = v;
        } else if (strcmp(a, "--throttle-requests") == 0) {
            if (fake_main_num("fake-amplitude", a, v, 1000, &throttle_n))
                return 2;
        } else if (strcmp(a, "--events-out") == 0) {
            out = v;
        } else {
            return usage();
        }
    }
    if (!key)
        return usage();

    sigset_t stop;
    fake_main_block_stop(&stop);

    fake_amplitude *f = fake_amplitude_start((uint16_t)port, key, "unused-secret");
    if (!f)
        return 1;
    for (size_t i = 0; i < nstatus; i++)
        fake_amplitude_http_push_status(f, (int)statuses[i]);
    if (throttle_user)
        fake_amplitude_http_throttle_user(f, throttle_user, (unsigned)throttle_n);
    printf("listening %u\n", fake_amplitude_port(f));
    fflush(stdout);

    int sig = 0;
    sigwait(&stop, &sig);
    json_t *events = fake_amplitude_http_events(f);
    json_t *requests = fake_amplitude_http_requests(f);
    unsigned dups = fake_amplitude_http_duplicates(f);
    fake_amplitude_stop(f);
    int rc = 0;
    if (out && json_dump_file(events, out, JSON_COMPACT) != 0) {
        fprintf(stderr, "fake-amplitude: cannot write %s\n", out);
        rc = 1;
    }
    printf("{\"events\":%zu,\"duplicates\":%u,\"requests\":%zu}\n", json_array_size(events), dups,
           json_array_size(requests));
    fflush(stdout);
    json_decref(events);
    json_decref(requests);
    return rc;
}
