/* Unit tests: the monotonic deadlines and condition variables of
 * base/clock.h. A timed wait must run on the monotonic clock: a condition
 * variable on the wall clock would take these deadlines (seconds since
 * boot) as long past and return at once, and a wall-clock step would
 * stretch or cut its waits. */
#include <check.h>
#include <errno.h>
#include <pthread.h>
#include <time.h>

#include "../../base/clock.h"
#include "../check_run.h"

static int64_t ts_us(struct timespec ts) {
    return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

START_TEST(deadline_in_adds_and_normalizes) {
    static const int64_t ms[] = {0, 1, 999, 1000, 1500, 123456};
    for (size_t i = 0; i < sizeof ms / sizeof *ms; i++) {
        int64_t before = amp_mono_us();
        struct timespec ts = amp_mono_deadline_in(ms[i]);
        int64_t after = amp_mono_us();
        ck_assert_int_ge(ts.tv_nsec, 0);
        ck_assert_int_lt(ts.tv_nsec, 1000000000L);
        ck_assert_int_ge(ts_us(ts), before + ms[i] * 1000);
        ck_assert_int_le(ts_us(ts), after + ms[i] * 1000);
    }
    /* A deadline already past is now, not some time in the past. */
    int64_t before = amp_mono_us();
    ck_assert_int_ge(ts_us(amp_mono_deadline_in(-5000)), before);
}
END_TEST

START_TEST(deadline_at_is_the_instant) {
    static const int64_t at[] = {0, 1, 999999, 1000000, 1234567891};
    for (size_t i = 0; i < sizeof at / sizeof *at; i++) {
        struct timespec ts = amp_mono_deadline_at_us(at[i]);
        ck_assert_int_lt(ts.tv_nsec, 1000000000L);
        ck_assert_int_eq(ts_us(ts), at[i]);
    }
    ck_assert_int_eq(ts_us(amp_mono_deadline_at_us(-1)), 0);
    /* The same clock as amp_mono_ms. */
    int64_t ms = amp_mono_ms(), us = amp_mono_us();
    ck_assert_int_ge(us / 1000, ms);
    ck_assert_int_lt(us / 1000 - ms, 1000);
}
END_TEST

/* Milliseconds a timed wait on cv with deadline ts (taken just before)
 * lasted; spurious wake-ups wait again. */
static int64_t timed_wait_ms(pthread_cond_t *cv, struct timespec ts, int64_t t0) {
    pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
    pthread_mutex_lock(&mu);
    while (pthread_cond_timedwait(cv, &mu, &ts) != ETIMEDOUT)
        ;
    pthread_mutex_unlock(&mu);
    return amp_mono_ms() - t0;
}

START_TEST(timed_wait_runs_on_the_monotonic_clock) {
    pthread_cond_t cv;
    amp_cond_init_mono(&cv);
    int64_t t0 = amp_mono_ms();
    int64_t waited = timed_wait_ms(&cv, amp_mono_deadline_in(60), t0);
    ck_assert_int_ge(waited, 59);
    ck_assert_int_lt(waited, 5000);
    /* At an instant of amp_mono_us, the same. */
    t0 = amp_mono_ms();
    waited = timed_wait_ms(&cv, amp_mono_deadline_at_us(amp_mono_us() + 40000), t0);
    ck_assert_int_ge(waited, 39);
    ck_assert_int_lt(waited, 5000);
    pthread_cond_destroy(&cv);
}
END_TEST

int main(void) {
    Suite *s = suite_create("clock");
    TCase *tc = tcase_create("clock");
    tcase_add_test(tc, deadline_in_adds_and_normalizes);
    tcase_add_test(tc, deadline_at_is_the_instant);
    tcase_add_test(tc, timed_wait_runs_on_the_monotonic_clock);
    suite_add_tcase(s, tc);
    return amp_check_run(s);
}
