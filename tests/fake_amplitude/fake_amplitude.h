/*
 * fake_amplitude — an in-process stand-in for Amplitude's APIs, for
 * end-to-end tests and benchmarks: a real HTTP server on 127.0.0.1
 * (libmicrohttpd, one thread per connection).
 *
 * Export side, GET /api/2/export?start=YYYYMMDDTHH&end=YYYYMMDDTHH with HTTP
 * Basic api_key:secret_key: a zip in Amplitude's layout,
 * <project>/<project>_<YYYY-MM-DD>_<H>#<n>.json.gz, each part gzip (one or
 * several members) of export-format JSON lines (event_time "YYYY-MM-DD
 * HH:MM:SS.ffffff", $insert_id, uuid, amplitude_attribution_ids...), for the
 * hours of the range that hold events; 404 when none does; 400 "too large"
 * for a range longer than the limit set; scripted statuses (504...) first;
 * 401 for other credentials. Every request is recorded.
 *
 * HTTP V2 side, POST /2/httpapi {"api_key","events":[...]}, with Amplitude's
 * answers: 200 {"code":200,"events_ingested","payload_size_bytes",
 * "server_upload_time"}; 400 with "missing_field" (no api_key, no events),
 * "Invalid API key", or per event "events_with_invalid_fields" (time not an
 * integer), "events_with_missing_fields" (event_type; user_id when neither
 * id is given) and "silenced_events"/"silenced_devices" (devices silenced);
 * 413 "Payload too large" (body over 1 MiB, more than 2,000 events or than
 * the limit set); 429 with "throttled_users" / "throttled_events" while a
 * user is throttled; scripted statuses (500, 503...) first. A 400, 413 or
 * 429 ingests nothing of the request (as Amplitude); a 200 stores each
 * event once per insert_id (repeats are counted and dropped). An unknown
 * path is 404.
 *
 * Threading: every function is safe from any thread while the server runs;
 * fake_amplitude_stop must not race with other calls.
 */
#ifndef FAKE_AMPLITUDE_H
#define FAKE_AMPLITUDE_H

#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define FAKE_AMPLITUDE_PROJECT "187520"

typedef struct fake_amplitude fake_amplitude;

/* Port 0: an ephemeral one. Keys copied. NULL on failure (reason on
 * stderr). Caller owns; release with fake_amplitude_stop. */
fake_amplitude *fake_amplitude_start(uint16_t port, const char *api_key, const char *secret_key);
void fake_amplitude_stop(fake_amplitude *f); /* accepts NULL */
uint16_t fake_amplitude_port(const fake_amplitude *f);

/* The events of one hour (hours count from the epoch: Unix seconds / 3600):
 * nevents generated events (deterministic: insert_id "exp-<hour>-<i>"),
 * spread over nparts parts, each part written as members gzip members.
 * Replaces what the hour held. */
void fake_amplitude_export_hour(fake_amplitude *f, int64_t hour, unsigned nevents, unsigned nparts,
                                unsigned members);
/* The first part of hour (already added) also holds two lines an ingest
 * must refuse: one not JSON, one event without event_type. */
void fake_amplitude_export_bad_lines(fake_amplitude *f, int64_t hour);
/* Ranges of more than max_hours hours get 400 "too large" (0: no limit). */
void fake_amplitude_export_max_hours(fake_amplitude *f, unsigned max_hours);
/* The next export request gets this status (504, 500, 429...), FIFO. */
void fake_amplitude_export_push_status(fake_amplitude *f, int status);
/* Each export answer waits this long first. */
void fake_amplitude_export_delay(fake_amplitude *f, unsigned ms);
/* Answer every 200 with this zip file instead (a bench's big export). */
void fake_amplitude_export_file(fake_amplitude *f, const char *path);
/* Export requests so far: [{"start","end","status"}...]; caller owns. */
json_t *fake_amplitude_export_requests(fake_amplitude *f);

/* The export-format line of event i of hour (what the server sends);
 * caller owns. */
char *fake_amplitude_event_line(int64_t hour, unsigned i);

/* Write a zip of the hours first..first+nhours-1, nevents each, in nparts
 * parts of members gzip members, to path, streaming (for big benches).
 * 0, or -1 with a message on stderr. */
int fake_amplitude_write_zip(const char *path, int64_t first, unsigned nhours, unsigned nevents,
                             unsigned nparts, unsigned members);

/* HTTP V2: requests of more than max_events events get 413 (0: 2,000). */
void fake_amplitude_http_max_events(fake_amplitude *f, unsigned max_events);
/* The next valid HTTP V2 request gets this status (500, 502, 503...), FIFO. */
void fake_amplitude_http_push_status(fake_amplitude *f, int status);
/* The next `requests` requests holding an event of user_id get 429 naming
 * it (and ingest nothing). user_id copied. */
void fake_amplitude_http_throttle_user(fake_amplitude *f, const char *user_id, unsigned requests);
/* Events of device_id are refused as silenced (400). Copied. */
void fake_amplitude_http_silence_device(fake_amplitude *f, const char *device_id);
/* Events stored so far (once per insert_id), as sent; caller owns. */
json_t *fake_amplitude_http_events(fake_amplitude *f);
/* HTTP V2 requests so far: [{"status","events" (count)}...]; caller owns. */
json_t *fake_amplitude_http_requests(fake_amplitude *f);
/* Benchmarks: a 200 only counts its events (no storage, no dedupe). */
void fake_amplitude_http_count_only(fake_amplitude *f, bool on);
/* Events counted by 200s while count_only was on. */
uint64_t fake_amplitude_http_counted(fake_amplitude *f);
/* Events dropped as repeats of an insert_id already stored. */
unsigned fake_amplitude_http_duplicates(fake_amplitude *f);

#endif
