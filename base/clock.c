#include "clock.h"

#include <stdlib.h>

static int64_t clock_ms(clockid_t id) {
    struct timespec ts;
    clock_gettime(id, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

int64_t amp_now_ms(void) {
    return clock_ms(CLOCK_REALTIME);
}

int64_t amp_mono_ms(void) {
    return clock_ms(CLOCK_MONOTONIC);
}

int64_t amp_mono_us(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

void amp_cond_init_mono(pthread_cond_t *c) {
    pthread_condattr_t ca;
    if (pthread_condattr_init(&ca) != 0 || pthread_condattr_setclock(&ca, CLOCK_MONOTONIC) != 0 ||
        pthread_cond_init(c, &ca) != 0)
        abort();
    pthread_condattr_destroy(&ca);
}

struct timespec amp_mono_deadline_in(int64_t ms) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    if (ms > 0) {
        ts.tv_sec += (time_t)(ms / 1000);
        ts.tv_nsec += (long)(ms % 1000) * 1000000L;
        if (ts.tv_nsec >= 1000000000L) {
            ts.tv_sec++;
            ts.tv_nsec -= 1000000000L;
        }
    }
    return ts;
}

struct timespec amp_mono_deadline_at_us(int64_t at_us) {
    if (at_us < 0)
        at_us = 0;
    struct timespec ts = {.tv_sec = (time_t)(at_us / 1000000),
                          .tv_nsec = (long)(at_us % 1000000) * 1000L};
    return ts;
}
