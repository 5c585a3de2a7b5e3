/*
 * metrics — counters, gauges and histograms, rendered in the Prometheus text
 * exposition format 0.0.4 for GET /metrics.
 *
 * Every family is declared once in metrics.c's table (name, type, help).
 * A series is a family plus a label set; amp_metrics_series returns a stable
 * handle that callers keep for fixed label sets, and looks it up again for
 * label values known only at run time (Dify's status and code).
 *
 * Threading: every function is safe from any thread; updates of a held
 * handle are lock-free atomics.
 */
#ifndef AMP_METRICS_H
#define AMP_METRICS_H

#include <stddef.h>
#include <stdint.h>

typedef struct amp_metrics amp_metrics;
typedef struct amp_series amp_series;

amp_metrics *amp_metrics_create(void);    /* caller owns */
void amp_metrics_destroy(amp_metrics *m); /* accepts NULL */

/* The series of family with the given labels: pairs of name and value,
 * NULL-terminated ("app", "support", "status", "429", NULL). Values are
 * escaped when rendered. Aborts on a family missing from the table (a
 * programming error). The handle lives as long as m. */
amp_series *amp_metrics_series(amp_metrics *m, const char *family, ...) __attribute__((sentinel));

void amp_series_inc(amp_series *s);               /* counter += 1 */
void amp_series_add(amp_series *s, double v);     /* counter or gauge += v */
void amp_series_set(amp_series *s, double v);     /* gauge = v */
void amp_series_observe(amp_series *s, double v); /* histogram sample, in seconds */
double amp_series_value(const amp_series *s);     /* counter/gauge value (tests) */

/* Called at the start of each render, to refresh gauges read from elsewhere
 * (spool depth, oldest pending age). */
void amp_metrics_set_collector(amp_metrics *m, void (*fn)(void *ctx, amp_metrics *m), void *ctx);

/* The whole exposition, caller owns. */
char *amp_metrics_render(amp_metrics *m);

#endif
