/*
 * fake_amplitude — Amplitude's Export API for tests (see fake_amplitude.h).
 */
#include "fake_amplitude.h"

#include <archive.h>
#include <archive_entry.h>
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <microhttpd.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#include <zlib.h>

#include "../../base/alloc.h"

#define MAX_STATUSES 64
#define MAX_HOURS 4096

typedef struct hour_data {
    int64_t hour;
    unsigned nevents, nparts, members;
    bool bad; /* two refused lines at the end of part 0 */
} hour_data;

struct fake_amplitude {
    struct MHD_Daemon *daemon;
    int listen_fd;
    uint16_t port;
    char *auth; /* "Basic base64(api:secret)" */
    pthread_mutex_t mu;
    hour_data hours[MAX_HOURS];
    size_t nhours;
    unsigned max_hours;
    int statuses[MAX_STATUSES];
    size_t nstatuses;
    unsigned delay_ms;
    char *file;
    json_t *requests;
    /* HTTP V2 side */
    char *api_key;
    unsigned http_max_events; /* more in one request: 413 */
    int http_statuses[MAX_STATUSES];
    size_t nhttp_statuses;
    json_t *throttled;     /* {"<user_id>": requests still throttled} */
    json_t *silenced;      /* {"<device_id>": true} */
    json_t *ingested;      /* events stored, one per insert_id */
    json_t *seen_ids;      /* {"<insert_id>": true} */
    json_t *http_requests; /* [{"status","events"}] */
    unsigned duplicates;   /* events dropped as repeats of an insert_id */
    bool count_only;       /* benchmarks: count 200s' events, store nothing */
    uint64_t counted;
};

/* One connection's request body (the HTTP V2 side posts one). */
typedef struct conn_body {
    char *data;
    size_t len;
    bool too_large;
} conn_body;

/* ---- the data ------------------------------------------------------------ */

char *fake_amplitude_event_line(int64_t hour, unsigned i) {
    time_t secs = (time_t)(hour * 3600 + (int64_t)(i * 37u % 3600u));
    struct tm tm;
    gmtime_r(&secs, &tm);
    char when[40], upload[40];
    unsigned micros = (i * 1013u) % 1000000u;
    strftime(when, sizeof when, "%Y-%m-%d %H:%M:%S", &tm);
    time_t up = secs + 2;
    struct tm tu;
    gmtime_r(&up, &tu);
    strftime(upload, sizeof upload, "%Y-%m-%d %H:%M:%S", &tu);
    bool anonymous = i % 10 == 9; /* some events have no user_id */
    char user[32];
    snprintf(user, sizeof user, "\"user-%u\"", i % 7);
    return amp_xasprintf(
        "{\"$insert_id\":\"exp-%lld-%u\",\"amplitude_attribution_ids\":%s,"
        "\"amplitude_event_type\":null,\"amplitude_id\":%llu,\"app\":" FAKE_AMPLITUDE_PROJECT ","
        "\"city\":\"Berlin\",\"client_event_time\":\"%s.%06u\",\"client_upload_time\":\"%s.%06u\","
        "\"country\":\"Germany\",\"data\":{\"group_first_event\":{},\"group_ids\":{}},"
        "\"data_type\":\"event\",\"device_carrier\":null,\"device_family\":\"Mac\","
        "\"device_id\":\"dev-%u-abcdef\",\"device_type\":\"Apple Mac\",\"dma\":null,"
        "\"event_id\":%u,\"event_properties\":{\"plan\":\"pro\",\"step\":%u},"
        "\"event_time\":\"%s.%06u\",\"event_type\":\"export_event_%u\","
        "\"global_user_properties\":{},\"group_properties\":{},\"groups\":{},\"idfa\":null,"
        "\"ip_address\":\"192.0.2.%u\",\"is_attribution_event\":false,\"language\":\"English\","
        "\"library\":\"http/2.0\",\"location_lat\":null,\"location_lng\":null,"
        "\"os_name\":\"Chrome\",\"os_version\":\"118\",\"partner_id\":null,\"paying\":null,"
        "\"platform\":\"Web\",\"processed_time\":\"%s.%06u\",\"region\":\"Berlin\","
        "\"sample_rate\":null,\"server_received_time\":\"%s.%06u\","
        "\"server_upload_time\":\"%s.%06u\",\"session_id\":%lld,\"source_id\":null,"
        "\"start_version\":null,\"user_creation_time\":null,\"user_id\":%s,"
        "\"user_properties\":{\"plan\":\"pro\"},\"uuid\":\"%08llx-%04x-4000-8000-%012x\","
        "\"version_name\":null}",
        (long long)hour, i, i % 3 == 0 ? "[\"attr-1\",\"attr-2\"]" : "null",
        (unsigned long long)(100000 + i % 7), when, micros, upload, micros, i % 7, i, i, when,
        micros, i % 3, i % 250, upload, micros, upload, micros, upload, micros,
        (long long)secs * 1000, anonymous ? "null" : user, (unsigned long long)hour, i % 65536, i);
}

/* Lines first..end-1 of an hour as gzip, in members members. Caller owns
 * *out (malloc). */
static void gzip_lines(int64_t hour, unsigned first, unsigned end, unsigned members, bool bad,
                       char **out, size_t *outlen) {
    size_t cap = 4096, len = 0;
    char *buf = amp_xmalloc(cap);
    unsigned n = end - first;
    if (members < 1)
        members = 1;
    for (unsigned m = 0; m < members; m++) {
        unsigned a = first + n * m / members, b = first + n * (m + 1) / members;
        if (m > 0 && a == b)
            continue;
        size_t tcap = 1024, tlen = 0;
        char *text = amp_xmalloc(tcap);
        for (unsigned i = a; i < b; i++) {
            char *line = fake_amplitude_event_line(hour, i);
            size_t l = strlen(line);
            while (tlen + l + 2 > tcap)
                text = amp_xrealloc(text, tcap *= 2);
            memcpy(text + tlen, line, l);
            tlen += l;
            text[tlen++] = '\n';
            free(line);
        }
        if (bad && m == members - 1) {
            static const char extra[] = "{not json\n{\"user_id\":\"u-bad\",\"uuid\":\"x\"}\n";
            while (tlen + sizeof extra > tcap)
                text = amp_xrealloc(text, tcap *= 2);
            memcpy(text + tlen, extra, sizeof extra - 1);
            tlen += sizeof extra - 1;
        }
        z_stream z = {0};
        if (deflateInit2(&z, 6, Z_DEFLATED, 15 + 16, 8, Z_DEFAULT_STRATEGY) != Z_OK)
            abort();
        size_t bound = deflateBound(&z, tlen) + 64;
        while (len + bound > cap)
            buf = amp_xrealloc(buf, cap *= 2);
        z.next_in = (Bytef *)text;
        z.avail_in = (uInt)tlen;
        z.next_out = (Bytef *)buf + len;
        z.avail_out = (uInt)bound;
        if (deflate(&z, Z_FINISH) != Z_STREAM_END)
            abort();
        len += bound - z.avail_out;
        deflateEnd(&z);
        free(text);
    }
    *out = buf;
    *outlen = len;
}

/* The parts of one hour into the archive. 0, or -1. */
static int write_hour(struct archive *a, const hour_data *h) {
    time_t secs = (time_t)(h->hour * 3600);
    struct tm tm;
    gmtime_r(&secs, &tm);
    char day[16];
    strftime(day, sizeof day, "%Y-%m-%d", &tm);
    unsigned parts = h->nparts ? h->nparts : 1;
    for (unsigned p = 0; p < parts; p++) {
        unsigned a0 = h->nevents * p / parts, b0 = h->nevents * (p + 1) / parts;
        char *gz;
        size_t gzlen;
        gzip_lines(h->hour, a0, b0, h->members, h->bad && p == 0, &gz, &gzlen);
        char name[128];
        snprintf(name, sizeof name, "%s/%s_%s_%d#%u.json.gz", FAKE_AMPLITUDE_PROJECT,
                 FAKE_AMPLITUDE_PROJECT, day, tm.tm_hour, p);
        struct archive_entry *e = archive_entry_new();
        archive_entry_set_pathname(e, name);
        archive_entry_set_size(e, (la_int64_t)gzlen);
        archive_entry_set_filetype(e, AE_IFREG);
        archive_entry_set_perm(e, 0644);
        archive_entry_set_mtime(e, secs, 0);
        int rc = archive_write_header(a, e) == ARCHIVE_OK &&
                         archive_write_data(a, gz, gzlen) == (la_ssize_t)gzlen
                     ? 0
                     : -1;
        archive_entry_free(e);
        free(gz);
        if (rc != 0) {
            fprintf(stderr, "fake_amplitude: zip: %s\n", archive_error_string(a));
            return -1;
        }
    }
    return 0;
}

static struct archive *zip_writer(void) {
    struct archive *a = archive_write_new();
    archive_write_set_format_zip(a);
    archive_write_zip_set_compression_store(a);
    archive_write_set_bytes_in_last_block(a, 1);
    return a;
}

int fake_amplitude_write_zip(const char *path, int64_t first, unsigned nhours, unsigned nevents,
                             unsigned nparts, unsigned members) {
    struct archive *a = zip_writer();
    if (archive_write_open_filename(a, path) != ARCHIVE_OK) {
        fprintf(stderr, "fake_amplitude: %s: %s\n", path, archive_error_string(a));
        archive_write_free(a);
        return -1;
    }
    int rc = 0;
    for (unsigned i = 0; rc == 0 && i < nhours; i++) {
        hour_data h = {first + i, nevents, nparts, members, false};
        rc = write_hour(a, &h);
    }
    if (archive_write_close(a) != ARCHIVE_OK)
        rc = -1;
    archive_write_free(a);
    return rc;
}

typedef struct membuf {
    char *data;
    size_t len, cap;
} membuf;

static la_ssize_t mem_write(struct archive *a, void *ctx, const void *p, size_t n) {
    (void)a;
    membuf *m = ctx;
    while (m->len + n > m->cap)
        m->data = amp_xrealloc(m->data, m->cap = m->cap ? m->cap * 2 : 65536);
    memcpy(m->data + m->len, p, n);
    m->len += n;
    return (la_ssize_t)n;
}

/* ---- HTTP ---------------------------------------------------------------- */

static enum MHD_Result send_text(struct MHD_Connection *c, unsigned status, const char *text) {
    struct MHD_Response *r =
        MHD_create_response_from_buffer(strlen(text), (void *)text, MHD_RESPMEM_MUST_COPY);
    MHD_add_response_header(r, "Content-Type", "text/plain");
    enum MHD_Result ret = MHD_queue_response(c, status, r);
    MHD_destroy_response(r);
    return ret;
}

static int parse_req_hour(const char *s, int64_t *hour) {
    if (!s || strlen(s) != 11 || s[8] != 'T')
        return -1;
    struct tm tm = {0};
    if (sscanf(s, "%4d%2d%2dT%2d", &tm.tm_year, &tm.tm_mon, &tm.tm_mday, &tm.tm_hour) != 4)
        return -1;
    tm.tm_year -= 1900;
    tm.tm_mon -= 1;
    *hour = (int64_t)timegm(&tm) / 3600;
    return 0;
}

static void record(fake_amplitude *f, const char *start, const char *end, int status) {
    json_array_append_new(
        f->requests, json_pack("{s:s?, s:s?, s:i}", "start", start, "end", end, "status", status));
}

static enum MHD_Result export_answer(fake_amplitude *f, struct MHD_Connection *c) {
    const char *start = MHD_lookup_connection_value(c, MHD_GET_ARGUMENT_KIND, "start");
    const char *end = MHD_lookup_connection_value(c, MHD_GET_ARGUMENT_KIND, "end");
    const char *auth = MHD_lookup_connection_value(c, MHD_HEADER_KIND, "Authorization");
    pthread_mutex_lock(&f->mu);
    unsigned delay = f->delay_ms;
    pthread_mutex_unlock(&f->mu);
    if (delay)
        usleep(delay * 1000u);
    pthread_mutex_lock(&f->mu);
    int64_t s, e;
    int status = 200;
    if (!auth || strcmp(auth, f->auth) != 0)
        status = 401;
    else if (parse_req_hour(start, &s) || parse_req_hour(end, &e) || e < s)
        status = 400;
    else if (f->nstatuses > 0) {
        status = f->statuses[0];
        memmove(f->statuses, f->statuses + 1, --f->nstatuses * sizeof f->statuses[0]);
    } else if (f->max_hours && e - s + 1 > (int64_t)f->max_hours)
        status = 413; /* marker: 400 too large below */
    if (status == 200 && !f->file) {
        bool any = false;
        for (size_t i = 0; i < f->nhours; i++)
            any = any || (f->hours[i].hour >= s && f->hours[i].hour <= e && f->hours[i].nevents);
        if (!any)
            status = 404;
    }
    record(f, start, end, status == 413 ? 400 : status);
    if (status != 200) {
        pthread_mutex_unlock(&f->mu);
        switch (status) {
        case 401:
            return send_text(c, 401, "Invalid API key or secret key.");
        case 413:
            return send_text(c, 400,
                             "The file size of the exported data is too large. Shorten "
                             "the time ranges and try again. The limit size is 4GB.");
        case 400:
            return send_text(c, 400, "Invalid start or end time.");
        case 404:
            return send_text(c, 404, "Raw data files were not found.");
        case 504:
            return send_text(c, 504,
                             "The amount of data is large causing a timeout. For large "
                             "amounts of data, the Amazon S3 destination is recommended.");
        default:
            return send_text(c, (unsigned)status, "fault");
        }
    }
    if (f->file) {
        int fd = open(f->file, O_RDONLY | O_CLOEXEC);
        struct stat st;
        pthread_mutex_unlock(&f->mu);
        if (fd < 0 || fstat(fd, &st) != 0)
            return send_text(c, 500, "file");
        struct MHD_Response *r = MHD_create_response_from_fd((uint64_t)st.st_size, fd);
        MHD_add_response_header(r, "Content-Type", "application/zip");
        enum MHD_Result ret = MHD_queue_response(c, 200, r);
        MHD_destroy_response(r);
        return ret;
    }
    hour_data sel[MAX_HOURS];
    size_t n = 0;
    for (size_t i = 0; i < f->nhours; i++)
        if (f->hours[i].hour >= s && f->hours[i].hour <= e && f->hours[i].nevents)
            sel[n++] = f->hours[i];
    pthread_mutex_unlock(&f->mu);
    membuf m = {0};
    struct archive *a = zip_writer();
    archive_write_open(a, &m, NULL, mem_write, NULL);
    int rc = 0;
    for (size_t i = 0; rc == 0 && i < n; i++)
        rc = write_hour(a, &sel[i]);
    archive_write_close(a);
    archive_write_free(a);
    if (rc != 0) {
        free(m.data);
        return send_text(c, 500, "zip");
    }
    struct MHD_Response *r = MHD_create_response_from_buffer(m.len, m.data, MHD_RESPMEM_MUST_FREE);
    MHD_add_response_header(r, "Content-Type", "application/zip");
    enum MHD_Result ret = MHD_queue_response(c, 200, r);
    MHD_destroy_response(r);
    return ret;
}

/* ---- HTTP V2 ------------------------------------------------------------ */

/* Requests over this many bytes get 413, as Amplitude's do past 1 MB. */
#define HTTP_MAX_BODY ((size_t)1024 * 1024)

static enum MHD_Result send_json(struct MHD_Connection *c, unsigned status, json_t *body) {
    char *text = json_dumps(body, JSON_COMPACT | JSON_PRESERVE_ORDER);
    json_decref(body);
    struct MHD_Response *r =
        MHD_create_response_from_buffer(strlen(text), text, MHD_RESPMEM_MUST_FREE);
    MHD_add_response_header(r, "Content-Type", "application/json");
    enum MHD_Result ret = MHD_queue_response(c, status, r);
    MHD_destroy_response(r);
    return ret;
}

static void add_index(json_t *obj, const char *field, size_t i) {
    json_t *list = json_object_get(obj, field);
    if (!list) {
        list = json_array();
        json_object_set_new(obj, field, list);
    }
    json_array_append_new(list, json_integer((json_int_t)i));
}

static const char *str_field(const json_t *ev, const char *name) {
    const char *s = json_string_value(json_object_get(ev, name));
    return s && *s ? s : NULL;
}

/* Under f->mu: the answer to one POST /2/httpapi, as Amplitude gives it. */
static unsigned httpapi_answer(fake_amplitude *f, const conn_body *cb, json_t **out) {
    json_error_t jerr;
    json_t *req = cb->too_large ? NULL : json_loadb(cb->data ? cb->data : "", cb->len, 0, &jerr);
    json_t *events = json_object_get(req, "events");
    const char *key = json_string_value(json_object_get(req, "api_key"));
    unsigned status;
    size_t n = json_is_array(events) ? json_array_size(events) : 0;
    if (cb->too_large || (f->http_max_events && n > f->http_max_events) || n > 2000) {
        status = 413;
        *out = json_pack("{s:i, s:s}", "code", 413, "error", "Payload too large");
    } else if (!json_is_object(req)) {
        status = 400;
        *out = json_pack("{s:i, s:s}", "code", 400, "error", "Invalid JSON request body");
    } else if (!key || !*key) {
        status = 400;
        *out = json_pack("{s:i, s:s, s:s}", "code", 400, "error", "Request missing required field",
                         "missing_field", "api_key");
    } else if (!json_is_array(events) || n == 0) {
        status = 400;
        *out = json_pack("{s:i, s:s, s:s}", "code", 400, "error", "Request missing required field",
                         "missing_field", "events");
    } else if (strcmp(key, f->api_key) != 0) {
        status = 400;
        *out = json_pack("{s:i, s:s}", "code", 400, "error", "Invalid API key");
    } else if (f->nhttp_statuses > 0) {
        status = (unsigned)f->http_statuses[0];
        memmove(f->http_statuses, f->http_statuses + 1,
                --f->nhttp_statuses * sizeof f->http_statuses[0]);
        *out = json_pack("{s:i, s:s}", "code", (int)status, "error",
                         status == 503 ? "Service Unavailable" : "Internal Server Error");
    } else {
        json_t *invalid = json_object(), *missing = json_object();
        json_t *silenced = json_array(), *sdevices = json_array();
        json_t *tusers = json_object(), *tevents = json_array();
        size_t i;
        json_t *ev;
        json_array_foreach(events, i, ev) {
            const char *user = str_field(ev, "user_id"), *device = str_field(ev, "device_id");
            if (!json_is_object(ev) || !str_field(ev, "event_type"))
                add_index(missing, "event_type", i);
            if (!user && !device)
                add_index(missing, "user_id", i); /* "device_id or user_id" */
            json_t *t = json_object_get(ev, "time");
            if (t && !json_is_integer(t))
                add_index(invalid, "time", i);
            if (device && json_object_get(f->silenced, device)) {
                json_array_append_new(silenced, json_integer((json_int_t)i));
                json_array_append_new(sdevices, json_string(device));
            }
            json_t *left = user ? json_object_get(f->throttled, user) : NULL;
            if (left && json_integer_value(left) > 0) {
                json_object_set_new(tusers, user, json_integer(31));
                json_array_append_new(tevents, json_integer((json_int_t)i));
            }
        }
        if (json_object_size(invalid) || json_object_size(missing) || json_array_size(silenced)) {
            status = 400;
            *out = json_pack("{s:i, s:s, s:o, s:o, s:o, s:o}", "code", 400, "error",
                             "Request missing required field", "events_with_invalid_fields",
                             invalid, "events_with_missing_fields", missing, "silenced_devices",
                             sdevices, "silenced_events", silenced);
            json_decref(tusers);
            json_decref(tevents);
        } else if (json_object_size(tusers)) {
            status = 429;
            const char *user;
            json_t *v;
            json_object_foreach(tusers, user, v) {
                json_t *left = json_object_get(f->throttled, user);
                json_integer_set(left, json_integer_value(left) - 1);
            }
            *out = json_pack("{s:i, s:s, s:i, s:{}, s:o, s:o, s:{}, s:{}}", "code", 429, "error",
                             "Too many requests for some devices and users", "eps_threshold", 30,
                             "throttled_devices", "throttled_users", tusers, "throttled_events",
                             tevents, "exceeded_daily_quota_users", "exceeded_daily_quota_devices");
            json_decref(invalid);
            json_decref(missing);
            json_decref(silenced);
            json_decref(sdevices);
        } else {
            status = 200;
            if (f->count_only)
                f->counted += n;
            json_array_foreach(events, i, ev) {
                if (f->count_only)
                    break;
                const char *id = str_field(ev, "insert_id");
                if (id && json_object_get(f->seen_ids, id)) {
                    f->duplicates++;
                    continue;
                }
                if (id)
                    json_object_set_new(f->seen_ids, id, json_true());
                json_array_append(f->ingested, ev);
            }
            *out = json_pack("{s:i, s:I, s:I, s:I}", "code", 200, "events_ingested", (json_int_t)n,
                             "payload_size_bytes", (json_int_t)cb->len, "server_upload_time",
                             (json_int_t)time(NULL) * 1000);
            json_decref(invalid);
            json_decref(missing);
            json_decref(silenced);
            json_decref(sdevices);
            json_decref(tusers);
            json_decref(tevents);
        }
    }
    json_array_append_new(f->http_requests,
                          json_pack("{s:i, s:I}", "status", (int)status, "events", (json_int_t)n));
    json_decref(req);
    return status;
}

static enum MHD_Result on_request(void *cls, struct MHD_Connection *c, const char *url,
                                  const char *method, const char *version, const char *upload,
                                  size_t *upload_size, void **con_cls) {
    (void)version;
    fake_amplitude *f = cls;
    if (!*con_cls) {
        *con_cls = amp_xcalloc(1, sizeof(conn_body));
        return MHD_YES;
    }
    conn_body *cb = *con_cls;
    if (*upload_size) {
        if (cb->len + *upload_size > HTTP_MAX_BODY) {
            cb->too_large = true;
        } else {
            cb->data = amp_xrealloc(cb->data, cb->len + *upload_size + 1);
            memcpy(cb->data + cb->len, upload, *upload_size);
            cb->len += *upload_size;
            cb->data[cb->len] = '\0';
        }
        *upload_size = 0;
        return MHD_YES;
    }
    if (strcmp(url, "/api/2/export") == 0 && strcmp(method, "GET") == 0)
        return export_answer(f, c);
    if (strcmp(url, "/2/httpapi") == 0 && strcmp(method, "POST") == 0) {
        json_t *body = NULL;
        pthread_mutex_lock(&f->mu);
        unsigned status = httpapi_answer(f, cb, &body);
        pthread_mutex_unlock(&f->mu);
        return send_json(c, status, body);
    }
    return send_text(c, 404, "Not found");
}

static void on_completed(void *cls, struct MHD_Connection *c, void **con_cls,
                         enum MHD_RequestTerminationCode toe) {
    (void)cls;
    (void)c;
    (void)toe;
    conn_body *cb = *con_cls;
    if (cb) {
        free(cb->data);
        free(cb);
        *con_cls = NULL;
    }
}

/* ---- lifecycle ----------------------------------------------------------- */

static char *basic_auth(const char *user, const char *pass) {
    static const char b64[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    char *plain = amp_xasprintf("%s:%s", user, pass);
    size_t n = strlen(plain);
    char *out = amp_xmalloc(6 + 4 * ((n + 2) / 3) + 1);
    char *o = out + sprintf(out, "Basic ");
    for (size_t i = 0; i < n; i += 3) {
        unsigned v = (unsigned char)plain[i] << 16;
        if (i + 1 < n)
            v |= (unsigned char)plain[i + 1] << 8;
        if (i + 2 < n)
            v |= (unsigned char)plain[i + 2];
        *o++ = b64[v >> 18 & 63];
        *o++ = b64[v >> 12 & 63];
        *o++ = i + 1 < n ? b64[v >> 6 & 63] : '=';
        *o++ = i + 2 < n ? b64[v & 63] : '=';
    }
    *o = '\0';
    free(plain);
    return out;
}

fake_amplitude *fake_amplitude_start(uint16_t port, const char *api_key, const char *secret_key) {
    fake_amplitude *f = amp_xcalloc(1, sizeof *f);
    f->auth = basic_auth(api_key, secret_key);
    pthread_mutex_init(&f->mu, NULL);
    f->requests = json_array();
    f->api_key = amp_xstrdup(api_key);
    f->throttled = json_object();
    f->silenced = json_object();
    f->ingested = json_array();
    f->seen_ids = json_object();
    f->http_requests = json_array();
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons(port)};
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t sl = sizeof sa;
    if (fd < 0 || bind(fd, (struct sockaddr *)&sa, sizeof sa) != 0 || listen(fd, 64) != 0 ||
        getsockname(fd, (struct sockaddr *)&sa, &sl) != 0) {
        fprintf(stderr, "fake_amplitude: cannot listen on 127.0.0.1:%u: %s\n", port,
                strerror(errno));
        if (fd >= 0)
            close(fd);
        fake_amplitude_stop(f);
        return NULL;
    }
    f->listen_fd = fd;
    f->port = ntohs(sa.sin_port);
    f->daemon = MHD_start_daemon(MHD_USE_THREAD_PER_CONNECTION | MHD_USE_POLL_INTERNAL_THREAD, 0,
                                 NULL, NULL, on_request, f, MHD_OPTION_LISTEN_SOCKET, fd,
                                 MHD_OPTION_CONNECTION_TIMEOUT, (unsigned)120,
                                 MHD_OPTION_NOTIFY_COMPLETED, on_completed, NULL, MHD_OPTION_END);
    if (!f->daemon) {
        fprintf(stderr, "fake_amplitude: cannot start the HTTP daemon\n");
        close(fd);
        fake_amplitude_stop(f);
        return NULL;
    }
    return f;
}

void fake_amplitude_stop(fake_amplitude *f) {
    if (!f)
        return;
    if (f->daemon) {
        MHD_stop_daemon(f->daemon);
        close(f->listen_fd);
    }
    pthread_mutex_destroy(&f->mu);
    json_decref(f->requests);
    json_decref(f->throttled);
    json_decref(f->silenced);
    json_decref(f->ingested);
    json_decref(f->seen_ids);
    json_decref(f->http_requests);
    free(f->api_key);
    free(f->auth);
    free(f->file);
    free(f);
}

uint16_t fake_amplitude_port(const fake_amplitude *f) {
    return f->port;
}

void fake_amplitude_export_hour(fake_amplitude *f, int64_t hour, unsigned nevents, unsigned nparts,
                                unsigned members) {
    pthread_mutex_lock(&f->mu);
    size_t i = 0;
    while (i < f->nhours && f->hours[i].hour != hour)
        i++;
    if (i == f->nhours && f->nhours < MAX_HOURS)
        f->nhours++;
    if (i < MAX_HOURS)
        f->hours[i] = (hour_data){hour, nevents, nparts, members, false};
    pthread_mutex_unlock(&f->mu);
}

void fake_amplitude_export_bad_lines(fake_amplitude *f, int64_t hour) {
    pthread_mutex_lock(&f->mu);
    for (size_t i = 0; i < f->nhours; i++)
        if (f->hours[i].hour == hour)
            f->hours[i].bad = true;
    pthread_mutex_unlock(&f->mu);
}

void fake_amplitude_export_max_hours(fake_amplitude *f, unsigned max_hours) {
    pthread_mutex_lock(&f->mu);
    f->max_hours = max_hours;
    pthread_mutex_unlock(&f->mu);
}

void fake_amplitude_export_push_status(fake_amplitude *f, int status) {
    pthread_mutex_lock(&f->mu);
    if (f->nstatuses < MAX_STATUSES)
        f->statuses[f->nstatuses++] = status;
    pthread_mutex_unlock(&f->mu);
}

void fake_amplitude_export_delay(fake_amplitude *f, unsigned ms) {
    pthread_mutex_lock(&f->mu);
    f->delay_ms = ms;
    pthread_mutex_unlock(&f->mu);
}

void fake_amplitude_export_file(fake_amplitude *f, const char *path) {
    pthread_mutex_lock(&f->mu);
    free(f->file);
    f->file = path ? amp_xstrdup(path) : NULL;
    pthread_mutex_unlock(&f->mu);
}

json_t *fake_amplitude_export_requests(fake_amplitude *f) {
    pthread_mutex_lock(&f->mu);
    json_t *r = json_deep_copy(f->requests);
    pthread_mutex_unlock(&f->mu);
    return r;
}

/* ---- HTTP V2 controls ---------------------------------------------------- */

void fake_amplitude_http_max_events(fake_amplitude *f, unsigned max_events) {
    pthread_mutex_lock(&f->mu);
    f->http_max_events = max_events;
    pthread_mutex_unlock(&f->mu);
}

void fake_amplitude_http_push_status(fake_amplitude *f, int status) {
    pthread_mutex_lock(&f->mu);
    if (f->nhttp_statuses < MAX_STATUSES)
        f->http_statuses[f->nhttp_statuses++] = status;
    pthread_mutex_unlock(&f->mu);
}

void fake_amplitude_http_throttle_user(fake_amplitude *f, const char *user_id, unsigned requests) {
    pthread_mutex_lock(&f->mu);
    json_object_set_new(f->throttled, user_id, json_integer(requests));
    pthread_mutex_unlock(&f->mu);
}

void fake_amplitude_http_silence_device(fake_amplitude *f, const char *device_id) {
    pthread_mutex_lock(&f->mu);
    json_object_set_new(f->silenced, device_id, json_true());
    pthread_mutex_unlock(&f->mu);
}

json_t *fake_amplitude_http_events(fake_amplitude *f) {
    pthread_mutex_lock(&f->mu);
    json_t *r = json_deep_copy(f->ingested);
    pthread_mutex_unlock(&f->mu);
    return r;
}

json_t *fake_amplitude_http_requests(fake_amplitude *f) {
    pthread_mutex_lock(&f->mu);
    json_t *r = json_deep_copy(f->http_requests);
    pthread_mutex_unlock(&f->mu);
    return r;
}

unsigned fake_amplitude_http_duplicates(fake_amplitude *f) {
    pthread_mutex_lock(&f->mu);
    unsigned d = f->duplicates;
    pthread_mutex_unlock(&f->mu);
    return d;
}

void fake_amplitude_http_count_only(fake_amplitude *f, bool on) {
    pthread_mutex_lock(&f->mu);
    f->count_only = on;
    pthread_mutex_unlock(&f->mu);
}

uint64_t fake_amplitude_http_counted(fake_amplitude *f) {
    pthread_mutex_lock(&f->mu);
    uint64_t n = f->counted;
    pthread_mutex_unlock(&f->mu);
    return n;
}
