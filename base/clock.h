/*
 * clock — milliseconds: the wall clock for what is stored and compared
 * with senders' timestamps, the monotonic clock for intervals and deadlines.
 *
 * Threading: reentrant.
 */
#ifndef AMP_CLOCK_H
#define AMP_CLOCK_H

#include <stdint.h>

int64_t amp_now_ms(void);  /* wall clock, Unix epoch milliseconds */
int64_t amp_mono_ms(void); /* monotonic milliseconds, for intervals */

#endif
