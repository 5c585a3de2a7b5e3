/*
 * clock — milliseconds: the wall clock for what is stored and compared
 * with senders' timestamps, the monotonic clock for intervals and deadlines.
 *
 * Timed waits: a condition variable made with amp_cond_init_mono times out
 * on the monotonic clock, so a step of the wall clock (NTP, an operator
 * setting the date) neither stretches a wait nor cuts it short; give its
 * pthread_cond_timedwait a deadline from amp_mono_deadline_in or
 * amp_mono_deadline_at_us. (A deadline on the wall clock, with a condition
 * variable on it, would wait an hour longer after the clock is set back an
 * hour.)
 *
 * Threading: reentrant.
 */
#ifndef AMP_CLOCK_H
#define AMP_CLOCK_H

#include <pthread.h>
#include <stdint.h>
#include <time.h>

int64_t amp_now_ms(void);  /* wall clock, Unix epoch milliseconds */
int64_t amp_mono_ms(void); /* monotonic milliseconds, for intervals */
int64_t amp_mono_us(void); /* monotonic microseconds, the same clock */

/* pthread_cond_init with the monotonic clock; aborts if the system cannot
 * (Linux always can). Destroy it with pthread_cond_destroy. */
void amp_cond_init_mono(pthread_cond_t *c);

/* Deadlines on the monotonic clock for such a condition variable: ms
 * milliseconds from now (negative counts as 0), or the instant at_us of
 * amp_mono_us. */
struct timespec amp_mono_deadline_in(int64_t ms);
struct timespec amp_mono_deadline_at_us(int64_t at_us);

#endif
