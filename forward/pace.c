/*
 * Pure pacing arithmetic of the forward module: the per-app token bucket,
 * the probe interval of a paused app, and the due time given to rows that
 * cannot wait in memory. No I/O, no state: forward.c keeps the state under
 * its lock and calls these.
 */
#include "forward_int.h"

#include <math.h>

/* ---- token bucket ------------------------------------------------------
 * Kept as GCRA ("virtual scheduling"): one number per app, the theoretical
 * arrival time (tat) of the next request when requests go out exactly at
 * the rate. A request may go when tat - (burst - 1) * T <= now, T = 1 / rate;
 * sending moves tat to max(tat, now) + T. This is the token bucket with
 * capacity burst refilled at rate, without a refill step to get wrong. */

static int64_t interval_us(double rate) {
    double t = 1e6 / rate;
    return t >= 9e15 ? (int64_t)9e15 : (int64_t)ceil(t);
}

int64_t amp_forward_pace_wait_us(int64_t tat_us, int64_t now_us, double rate, unsigned burst) {
    if (!(rate > 0))
        return 0; /* unlimited (also catches NaN) */
    /* In doubles: (burst - 1) * T can exceed int64 for tiny rates. */
    double earliest = (double)tat_us - (double)(burst ? burst - 1 : 0) * (double)interval_us(rate);
    double wait = earliest - (double)now_us;
    if (wait <= 0)
        return 0;
    return wait < 9e15 ? (int64_t)wait : (int64_t)9e15;
}

int64_t amp_forward_pace_take(int64_t tat_us, int64_t now_us, double rate) {
    if (!(rate > 0))
        return tat_us;
    int64_t t = interval_us(rate);
    /* Sent less than one interval after its slot (a late wake-up, a busy
     * CPU): stay on the schedule, or every late wake-up would lower the
     * rate for good. Later than that the app was idle: start afresh. */
    int64_t base = tat_us > now_us || now_us - tat_us < t ? tat_us : now_us;
    return base + t;
}

/* ---- pause ------------------------------------------------------------- */

int64_t amp_forward_pause_interval_ms(int strikes) {
    const int64_t cap = AMP_FORWARD_PAUSE_MAX_MS;
    int64_t v = AMP_FORWARD_PAUSE_FIRST_MS;
    for (int i = 1; i < strikes && v < cap; i++)
        v = v > cap / 2 ? cap : v * 2;
    return v < cap ? v : cap;
}

/* ---- deferral ---------------------------------------------------------- */

double amp_forward_effective_rate(double rate_per_sec, unsigned max_in_flight, double latency_ms) {
    /* Before the first answer, a rate-limited app is assumed to keep up
     * with its limit: guessing slower would space its rows out for good. */
    if (latency_ms <= 1.0 && rate_per_sec > 0)
        return rate_per_sec;
    double lat = latency_ms > 1.0 ? latency_ms : AMP_FORWARD_DEFAULT_LATENCY_MS;
    double r = (double)(max_in_flight ? max_in_flight : 1) * 1000.0 / lat;
    if (rate_per_sec > 0 && rate_per_sec < r)
        r = rate_per_sec;
    return r > 0.001 ? r : 0.001;
}

int64_t amp_forward_defer_due_ms(int64_t *next_ms, int64_t now_ms, double rate, unsigned queued,
                                 unsigned queue_cap) {
    if (!(rate > 0.001))
        rate = 0.001;
    /* Come back when the rows already waiting in memory are half gone, so
     * the queue never runs dry while these are still in the spool. */
    unsigned ahead = queued > queue_cap / 2 ? queued - queue_cap / 2 : 0;
    double lead = (double)ahead * 1000.0 / rate;
    int64_t base = now_ms + (lead > (double)AMP_FORWARD_DEFER_MIN_MS
                                 ? (lead < 864e5 ? (int64_t)lead : (int64_t)864e5)
                                 : AMP_FORWARD_DEFER_MIN_MS);
    if (*next_ms < base)
        *next_ms = base;
    int64_t due = *next_ms;
    double step = 1000.0 / rate;
    *next_ms += step < 864e5 ? (int64_t)step : (int64_t)864e5;
    return due;
}
