/*
 * decode — a request body to a validated array of events (SPEC "Body
 * formats accepted"), plus the calendar-time parsing that event_time
 * validation and the iso8601 transform share.
 */
#include <stdio.h>
#include <string.h>

#include "../json/jsonr.h"
#include "mapping.h"
#include "mapping_int.h"

/* ---- time ------------------------------------------------------------ */

/* Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's
 * days_from_civil); exact for every year, no timegm or TZ needed. */
static int64_t days_from_civil(int64_t y, unsigned m, unsigned d) {
    y -= m <= 2;
    int64_t era = (y >= 0 ? y : y - 399) / 400;
    unsigned yoe = (unsigned)(y - era * 400);
    unsigned doy = (153 * (m + (m > 2 ? -3 : 9)) + 2) / 5 + d - 1;
    unsigned doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    return era * 146097 + (int64_t)doe - 719468;
}

static void civil_from_days(int64_t z, int64_t *y, unsigned *m, unsigned *d) {
    z += 719468;
    int64_t era = (z >= 0 ? z : z - 146096) / 146097;
    unsigned doe = (unsigned)(z - era * 146097);
    unsigned yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    unsigned doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    unsigned mp = (5 * doy + 2) / 153;
    *d = doy - (153 * mp + 2) / 5 + 1;
    *m = mp < 10 ? mp + 3 : mp - 9;
    *y = (int64_t)yoe + era * 400 + (*m <= 2);
}

static bool is_leap(int64_t y) {
    return (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
}

static unsigned days_in_month(int64_t y, unsigned m) {
    static const unsigned dim[] = {31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31};
    return m == 2 && is_leap(y) ? 29 : dim[m - 1];
}

/* Read exactly n digits at s[*i]. */
static bool digits(const char *s, size_t len, size_t *i, size_t n, unsigned *out) {
    unsigned v = 0;
    if (len - *i < n)
        return false;
    for (size_t k = 0; k < n; k++) {
        char c = s[*i + k];
        if (c < '0' || c > '9')
            return false;
        v = v * 10 + (unsigned)(c - '0');
    }
    *i += n;
    *out = v;
    return true;
}

static bool expect(const char *s, size_t len, size_t *i, char c) {
    if (*i >= len || s[*i] != c)
        return false;
    (*i)++;
    return true;
}

int amp_map_time_parse(const char *s, size_t len, bool strict, int64_t *ms) {
    size_t i = 0;
    unsigned y, mo, d, h, mi, sec, frac_ms = 0;
    if (!digits(s, len, &i, 4, &y) || !expect(s, len, &i, '-') || !digits(s, len, &i, 2, &mo) ||
        !expect(s, len, &i, '-') || !digits(s, len, &i, 2, &d))
        return -1;
    if (i >= len || !(s[i] == ' ' || (!strict && s[i] == 'T')))
        return -1;
    i++;
    if (!digits(s, len, &i, 2, &h) || !expect(s, len, &i, ':') || !digits(s, len, &i, 2, &mi) ||
        !expect(s, len, &i, ':') || !digits(s, len, &i, 2, &sec))
        return -1;
    if (mo < 1 || mo > 12 || d < 1 || d > days_in_month(y, mo) || h > 23 || mi > 59 || sec > 59)
        return -1;
    if (i < len && s[i] == '.') {
        size_t start = ++i;
        while (i < len && s[i] >= '0' && s[i] <= '9')
            i++;
        size_t n = i - start;
        if (strict ? (n != 3 && n != 6) : (n < 1 || n > 9))
            return -1;
        /* Milliseconds: the first three digits, later ones truncated. */
        for (size_t k = 0; k < 3; k++)
            frac_ms = frac_ms * 10 + (k < n ? (unsigned)(s[start + k] - '0') : 0);
    }
    int64_t offset_min = 0;
    if (!strict && i < len) {
        if (s[i] == 'Z') {
            i++;
        } else if (s[i] == '+' || s[i] == '-') {
            int sign = s[i] == '-' ? -1 : 1;
            unsigned oh, om;
            i++;
            if (!digits(s, len, &i, 2, &oh) || !expect(s, len, &i, ':') ||
                !digits(s, len, &i, 2, &om) || oh > 23 || om > 59)
                return -1;
            offset_min = sign * (int64_t)(oh * 60 + om);
        }
    }
    if (i != len)
        return -1;
    int64_t secs = days_from_civil(y, mo, d) * 86400 + h * 3600 + mi * 60 + sec - offset_min * 60;
    *ms = secs * 1000 + frac_ms;
    return 0;
}

int amp_map_time_format(int64_t ms, char *buf, size_t len) {
    /* Floor division so times before 1970 keep a positive millisecond part. */
    int64_t secs = ms / 1000, rem = ms % 1000;
    if (rem < 0) {
        rem += 1000;
        secs -= 1;
    }
    int64_t days = secs / 86400, sod = secs % 86400;
    if (sod < 0) {
        sod += 86400;
        days -= 1;
    }
    int64_t y;
    unsigned m, d;
    civil_from_days(days, &y, &m, &d);
    if (y < 0 || y > 9999)
        return -1;
    /* "YYYY-MM-DDTHH:MM:SS.mmmZ", written digit by digit: snprintf was
     * about 7% of decoding and mapping an event (bench_mapping). */
    static const char shape[] = "0000-00-00T00:00:00.000Z";
    if (len < sizeof shape)
        return -1;
    memcpy(buf, shape, sizeof shape);
    const struct {
        size_t at, width;
        int64_t v;
    } fields[] = {
        {0, 4, y},         {5, 2, m},   {8, 2, d}, {11, 2, sod / 3600}, {14, 2, sod / 60 % 60},
        {17, 2, sod % 60}, {20, 3, rem}};
    for (size_t f = 0; f < sizeof fields / sizeof fields[0]; f++) {
        int64_t v = fields[f].v;
        for (size_t i = fields[f].width; i-- > 0; v /= 10)
            buf[fields[f].at + i] = (char)('0' + v % 10);
    }
    return 0;
}

/* ---- body ------------------------------------------------------------ */

/* Longest string value or object key accepted inside an event. A webhook
 * body is capped as a whole (listen.max_body_bytes), but one string near
 * that size would then flow whole into templates, the spool and every Dify
 * request; Amplitude's own property values are far shorter. */
#define EVENT_MAX_STRING_BYTES 65536

typedef enum { SHAPE_OK, SHAPE_TOO_DEEP, SHAPE_TOO_LONG } shape_result;

/* Where a walk stands, for naming an over-long string: ".key" and "[i]"
 * segments, cut short (with "...") when the path itself is long. */
typedef struct {
    char text[160];
    size_t len;
} shape_path;

static size_t path_push_key(shape_path *p, const char *key, size_t klen) {
    size_t before = p->len;
    size_t room = sizeof p->text - 1 - p->len;
    if (room > 0) {
        size_t n = klen > 32 ? 32 : klen;
        int w = snprintf(p->text + p->len, room + 1, ".%.*s%s", (int)n, key, klen > n ? "..." : "");
        p->len += w < 0 ? 0 : (size_t)w > room ? room : (size_t)w;
    }
    return before;
}

static size_t path_push_index(shape_path *p, size_t i) {
    size_t before = p->len;
    size_t room = sizeof p->text - 1 - p->len;
    if (room > 0) {
        int w = snprintf(p->text + p->len, room + 1, "[%zu]", i);
        p->len += w < 0 ? 0 : (size_t)w > room ? room : (size_t)w;
    }
    return before;
}

static void path_pop(shape_path *p, size_t len) {
    p->len = len;
    p->text[len] = '\0';
}

/* Nesting within AMP_EVENT_MAX_DEPTH and every string and key within
 * EVENT_MAX_STRING_BYTES. Bounded recursion: never deeper than
 * AMP_EVENT_MAX_DEPTH + 1 frames. */
static shape_result shape_ok(const json_t *v, int depth) {
    if (json_is_string(v))
        return json_string_length(v) > EVENT_MAX_STRING_BYTES ? SHAPE_TOO_LONG : SHAPE_OK;
    if (!json_is_object(v) && !json_is_array(v))
        return SHAPE_OK;
    if (depth > AMP_EVENT_MAX_DEPTH)
        return SHAPE_TOO_DEEP;
    shape_result r;
    if (json_is_array(v)) {
        size_t i;
        json_t *x;
        json_array_foreach(v, i, x) if ((r = shape_ok(x, depth + 1)) != SHAPE_OK) return r;
    } else {
        const char *k;
        json_t *x;
        json_object_foreach((json_t *)v, k, x) {
            if (strlen(k) > EVENT_MAX_STRING_BYTES)
                return SHAPE_TOO_LONG;
            if ((r = shape_ok(x, depth + 1)) != SHAPE_OK)
                return r;
        }
    }
    return SHAPE_OK;
}

/* After shape_ok found SHAPE_TOO_LONG in v (so the nesting is known to be
 * bounded): the path of the first over-long string, or of the object
 * holding the over-long key. Only runs on that error, so the common path
 * builds no text. true when found. */
static bool long_string_path(const json_t *v, shape_path *path) {
    if (json_is_string(v))
        return json_string_length(v) > EVENT_MAX_STRING_BYTES;
    size_t mark;
    if (json_is_array(v)) {
        size_t i;
        json_t *x;
        json_array_foreach(v, i, x) {
            mark = path_push_index(path, i);
            if (long_string_path(x, path))
                return true;
            path_pop(path, mark);
        }
    } else if (json_is_object(v)) {
        const char *k;
        json_t *x;
        json_object_foreach((json_t *)v, k, x) {
            size_t klen = strlen(k);
            if (klen > EVENT_MAX_STRING_BYTES)
                return true;
            mark = path_push_key(path, k, klen);
            if (long_string_path(x, path))
                return true;
            path_pop(path, mark);
        }
    }
    return false;
}

static bool nonempty_string(const json_t *v) {
    return json_is_string(v) && json_string_length(v) > 0;
}

/* 0, or -1 with detail set, and *field (static: "event_type", "time"...,
 * "event" for the event as a whole) with *missing (absent rather than
 * invalid). */
static int check_event(const json_t *ev, size_t idx, char *detail, size_t dlen, const char **field,
                       bool *missing) {
    *field = "event";
    *missing = false;
    if (!json_is_object(ev)) {
        snprintf(detail, dlen, "events[%zu]: expected an object, found %s", idx,
                 amp_map_json_kind(ev));
        return -1;
    }
    json_t *et = json_object_get(ev, "event_type");
    *field = "event_type";
    if (!et) {
        snprintf(detail, dlen, "events[%zu]: needs event_type", idx);
        *missing = true;
        return -1;
    }
    if (!nonempty_string(et)) {
        snprintf(detail, dlen, "events[%zu].event_type: expected a non-empty string, found %s", idx,
                 json_is_string(et) ? "an empty string" : amp_map_json_kind(et));
        return -1;
    }
    /* user_id / device_id: absent, null or a string. Amplitude sends strings;
     * a number is rejected rather than silently stringified. */
    static const char *const ids[] = {"user_id", "device_id"};
    bool have_id = false;
    for (size_t k = 0; k < 2; k++) {
        json_t *v = json_object_get(ev, ids[k]);
        if (v && !json_is_null(v) && !json_is_string(v)) {
            *field = ids[k];
            snprintf(detail, dlen, "events[%zu].%s: expected a string or null, found %s", idx,
                     ids[k], amp_map_json_kind(v));
            return -1;
        }
        have_id = have_id || nonempty_string(v);
    }
    if (!have_id) {
        *field = "device_id";
        *missing = true;
        snprintf(detail, dlen, "events[%zu]: needs user_id or device_id", idx);
        return -1;
    }
    json_t *t = json_object_get(ev, "event_time");
    int64_t ms;
    if (t && !json_is_null(t) &&
        (!json_is_string(t) ||
         amp_map_time_parse(json_string_value(t), json_string_length(t), true, &ms) != 0)) {
        *field = "event_time";
        snprintf(detail, dlen,
                 "events[%zu].event_time: expected \"YYYY-MM-DD HH:MM:SS\" with 0, 3 or 6 "
                 "fraction digits (UTC), found %s",
                 idx, json_is_string(t) ? "another format" : amp_map_json_kind(t));
        return -1;
    }
    t = json_object_get(ev, "time");
    if (t && !json_is_null(t) && (!json_is_integer(t) || json_integer_value(t) < 0)) {
        *field = "time";
        snprintf(detail, dlen,
                 "events[%zu].time: expected an integer >= 0 (epoch milliseconds), found %s", idx,
                 json_is_integer(t) ? "a negative number" : amp_map_json_kind(t));
        return -1;
    }
    *field = "event";
    shape_path path = {.len = 0};
    path.text[0] = '\0';
    switch (shape_ok(ev, 1)) {
    case SHAPE_OK:
        break;
    case SHAPE_TOO_DEEP:
        snprintf(detail, dlen, "events[%zu]: nested deeper than %d levels", idx,
                 AMP_EVENT_MAX_DEPTH);
        return -1;
    case SHAPE_TOO_LONG:
        long_string_path(ev, &path);
        snprintf(detail, dlen, "events[%zu]%s: a string or key longer than %d bytes", idx,
                 path.text, EVENT_MAX_STRING_BYTES);
        return -1;
    }
    return 0;
}

amp_decode_result amp_map_decode_body(const char *body, size_t len, json_t **events, char *detail,
                                      size_t detail_len) {
    json_error_t jerr;
    *events = NULL;
    if (detail_len)
        detail[0] = '\0';
    /* The fast reader first; when it declines, jansson decides and gives
     * the error message. JSON_DECODE_ANY so a bare scalar is reported as
     * "not an event" rather than as a syntax error. */
    json_t *root = amp_json_parse(body, len);
    if (!root)
        root = json_loadb(body, len, JSON_REJECT_DUPLICATES | JSON_DECODE_ANY, &jerr);
    if (!root) {
        snprintf(detail, detail_len, "line %d, column %d: %s", jerr.line, jerr.column, jerr.text);
        return AMP_DECODE_INVALID_JSON;
    }

    json_t *list;
    if (json_is_array(root)) {
        list = json_incref(root);
    } else if (json_is_object(root) && json_object_get(root, "events")) {
        list = json_object_get(root, "events");
        if (!json_is_array(list)) {
            snprintf(detail, detail_len, "events: expected an array, found %s",
                     amp_map_json_kind(list));
            json_decref(root);
            return AMP_DECODE_INVALID_EVENT;
        }
        json_incref(list);
    } else if (json_is_object(root)) {
        list = json_array();
        if (!list || json_array_append(list, root) != 0)
            abort();
    } else {
        snprintf(detail, detail_len,
                 "body: expected an event object, an array of events or {\"events\":[...]}, "
                 "found %s",
                 amp_map_json_kind(root));
        json_decref(root);
        return AMP_DECODE_INVALID_EVENT;
    }
    json_decref(root);

    if (json_array_size(list) == 0) {
        snprintf(detail, detail_len, "no events");
        json_decref(list);
        return AMP_DECODE_INVALID_EVENT;
    }
    size_t i;
    json_t *ev;
    json_array_foreach(list, i, ev) {
        const char *field;
        bool missing;
        if (check_event(ev, i, detail, detail_len, &field, &missing) != 0) {
            json_decref(list);
            return AMP_DECODE_INVALID_EVENT;
        }
    }
    *events = list;
    return AMP_DECODE_OK;
}

int amp_map_check_event(const json_t *ev, size_t idx, char *detail, size_t detail_len,
                        const char **field, bool *missing) {
    return check_event(ev, idx, detail, detail_len, field, missing);
}

const char *amp_map_dedupe_key(const json_t *event) {
    static const char *const keys[] = {"insert_id", "$insert_id", "uuid"};
    for (size_t k = 0; k < 3; k++) {
        json_t *v = json_object_get(event, keys[k]);
        if (nonempty_string(v))
            return json_string_value(v);
    }
    return NULL;
}
