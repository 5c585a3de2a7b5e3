/*
 * export — Amplitude's Export API as a source: hours of events fetched as
 * a zip, through the same decode, routes and dedupe as every source, into
 * the queue, with a durable cursor.
 *
 * One request asks for a range of hours (GET {base}/api/2/export?start=
 * YYYYMMDDTHH&end=YYYYMMDDTHH, both inclusive, UTC, by server upload time,
 * HTTP Basic api_key:secret_key). The answer is streamed to a file beside
 * the cursor (never held in memory) and read with libarchive: a zip of
 * <project>/<project>_<YYYY-MM-DD>_<H>#<n>.json.gz parts, each gzip (one
 * member or several) of JSON lines in the export format. The hours of the
 * range are stored in order; after each hour's batches are durable (the
 * queue's done callback said so) the cursor file is rewritten (temporary
 * file, fsync, rename, fsync of the directory), so a process killed in the
 * middle starts again at the first hour not stored. Events stored twice
 * (an hour begun before the kill) are duplicates by $insert_id (else uuid).
 *
 * Answers: 404 is an empty range; 400 naming a too large export splits
 * the range in halves; 429, 5xx, timeouts and other transport errors are
 * retried with a doubling backoff (max_attempts); 401/403 stop
 * (AMP_SOURCE_EXPORT_AUTH). Requests are spaced by min_request_interval_ms.
 *
 * An event that decode or a route refuses is logged with its part and line
 * and counted as rejected (metrics: outcome="rejected"); the rest of the
 * hour is stored.
 *
 * Threading: amp_source_export_run blocks the calling thread. The poller
 * (amp_source_export_start) runs it on its own thread.
 */
#ifndef AMP_SOURCE_EXPORT_H
#define AMP_SOURCE_EXPORT_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "../base/metrics.h"
#include "../mapping/mapping.h"
#include "../queue/queue.h"

typedef struct amp_source_export_opts {
    const char *base_url;    /* "https://amplitude.com", no trailing slash needed */
    const char *api_key;     /* HTTP Basic user */
    const char *secret_key;  /* HTTP Basic password */
    const char *cursor_path; /* the cursor file; the zip is downloaded to "<cursor_path>.zip" */
    const amp_mapper *mapper;
    unsigned hours_per_request; /* >= 1 */
    unsigned timeout_s;         /* one request, download included */
    int64_t min_request_interval_ms;
    int64_t retry_initial_ms;
    unsigned max_attempts;   /* per request, >= 1 */
    unsigned batch_events;   /* events per queue batch, >= 1 */
    amp_metrics *metrics;    /* may be NULL */
    bool progress;           /* a progress line on stderr (a terminal); else log lines */
    const atomic_bool *stop; /* may be NULL; set: return at the next step */
} amp_source_export_opts;

typedef struct amp_source_export_stats {
    int64_t hours;      /* hours passed by the cursor */
    int64_t events;     /* lines read */
    int64_t accepted;   /* events stored */
    int64_t duplicates; /* events already stored */
    int64_t filtered;   /* events no route took */
    int64_t rejected;   /* events decode or a route refused */
    int64_t bytes;      /* zip bytes downloaded */
    int64_t requests;   /* Export API requests made */
} amp_source_export_stats;

typedef enum {
    AMP_SOURCE_EXPORT_OK = 0,
    AMP_SOURCE_EXPORT_FAILED = 1,  /* gave up for now (err says why); the cursor holds */
    AMP_SOURCE_EXPORT_AUTH = 2,    /* 401/403: the keys are wrong; retrying will not help */
    AMP_SOURCE_EXPORT_STOPPED = 3, /* opts->stop was set */
} amp_source_export_status;

/* Hours are counted from the epoch (Unix seconds / 3600). */

/* "YYYYMMDDTHH" (also "YYYY-MM-DDTHH") to an hour: 0, or -1. */
int amp_source_export_parse_hour(const char *s, int64_t *hour);
/* An hour as "YYYY-MM-DDTHH" (buf of at least 16 bytes). */
void amp_source_export_format_hour(int64_t hour, char *buf, size_t len);

/* The cursor at path: 1 and *hour (the last hour stored); 0 when there is
 * no cursor file; -1 with err when it cannot be read or is not an hour. */
int amp_source_export_cursor_read(const char *path, int64_t *hour, char *err, size_t errlen);

/* Store hours first..last (inclusive) into q, starting after the cursor
 * when it is inside the range. stats (may be NULL) are added to. */
amp_source_export_status amp_source_export_run(amp_queue *q, const amp_source_export_opts *o,
                                               int64_t first, int64_t last,
                                               amp_source_export_stats *stats, char *err,
                                               size_t errlen);

/* ---- the poller of `serve` ---------------------------------------------- */

typedef struct amp_source_export_poller amp_source_export_poller;

/* Every interval_s, store the hours after the cursor up to the last hour at
 * least lag_hours old (an hour is that old lag_hours after it ends). With
 * no cursor the first hour is start_hour (-1: that last hour alone). o and
 * its strings are copied; q and the mapper are borrowed until
 * amp_source_export_stop. NULL when the thread cannot start. */
amp_source_export_poller *amp_source_export_start(amp_queue *q, const amp_source_export_opts *o,
                                                  unsigned interval_s, unsigned lag_hours,
                                                  int64_t start_hour);
/* Stop (a run under way ends at its next step) and free. Accepts NULL. */
void amp_source_export_stop(amp_source_export_poller *p);

#endif
