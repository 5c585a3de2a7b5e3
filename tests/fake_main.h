/*
 * fake_main.h — what the fakes' standalone processes (tests/fake_dify/main.c,
 * tests/fake_amplitude/main.c) share: reading a numeric flag, and blocking
 * the stop signals so that only the main thread's sigwait sees them.
 */
#ifndef AMP_TESTS_FAKE_MAIN_H
#define AMP_TESTS_FAKE_MAIN_H

#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "../base/parse.h"

/* flag's value s as an integer in [0, max] into *out; 0, or -1 after
 * telling prog's user on stderr. */
static inline int fake_main_num(const char *prog, const char *flag, const char *s, int64_t max,
                                int64_t *out) {
    if (!s || amp_parse_i64(s, strlen(s), 0, max, out) != 0) {
        fprintf(stderr, "%s: %s expects an integer in [0, %lld]\n", prog, flag, (long long)max);
        return -1;
    }
    return 0;
}

/* Blocks SIGTERM and SIGINT (into *stop, for sigwait) and ignores SIGPIPE.
 * Call before any thread exists, so every thread inherits the mask. */
static inline void fake_main_block_stop(sigset_t *stop) {
    sigemptyset(stop);
    sigaddset(stop, SIGTERM);
    sigaddset(stop, SIGINT);
    pthread_sigmask(SIG_BLOCK, stop, NULL);
    signal(SIGPIPE, SIG_IGN);
}

#endif
