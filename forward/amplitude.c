/*
 * Results back to Amplitude: report events sent with the HTTP V2 API
 * (POST {base}/2/httpapi, {"api_key","events":[...]}), many per request,
 * and each event's fate read from the answer the way Amplitude's SDKs read
 * it (forward_int.h states the rules):
 *
 *   200  {"code":200,"events_ingested":N,...}          all ingested
 *   400  {"code":400,"error":...,"events_with_invalid_fields":{"time":[3]},
 *         "events_with_missing_fields":{"event_type":[0]},
 *         "silenced_events":[5]}                       those refused, the rest
 *                                                      were not ingested: again
 *   413  {"code":413,"error":"Payload too large"}      halve the request
 *   429  {"code":429,...,"throttled_users":{"u":31},
 *         "throttled_devices":{"d":31},"throttled_events":[2]}
 *                                                      those wait ~30 s, the
 *                                                      rest go again
 *   5xx, no answer                                     again after a backoff
 *
 * Sending again is safe: every report event carries an insert_id derived
 * from its source event's key, and Amplitude drops repeats of an insert_id.
 */
#include "forward_int.h"
#include "../base/alloc.h"
#include "../base/clock.h"

#include <string.h>

/* {"api_key":<key>,"events":[ ... ]} around the events and their commas. */
static size_t overhead(const char *key_json) {
    return strlen("{\"api_key\":,\"events\":[]}") + strlen(key_json);
}

static char *key_json(const char *api_key) {
    json_t *k = json_string(api_key ? api_key : "");
    char *s = k ? json_dumps(k, JSON_ENCODE_ANY) : NULL;
    json_decref(k);
    return s ? s : amp_xstrdup("\"\"");
}

size_t amp_forward_amplitude_fit(const amp_forward_amplitude_event *ev, size_t n, size_t max_events,
                                 size_t max_bytes) {
    /* A 40-byte allowance for the key: keys are 32 hex characters. */
    size_t bytes = strlen("{\"api_key\":,\"events\":[]}") + 40, k = 0;
    if (max_events == 0)
        max_events = 1;
    while (k < n && k < max_events) {
        size_t add = strlen(ev[k].json) + (k ? 1 : 0);
        if (k > 0 && bytes + add >= max_bytes)
            break;
        bytes += add;
        k++;
    }
    return k;
}

char *amp_forward_amplitude_body(const char *api_key, const amp_forward_amplitude_event *ev,
                                 size_t n) {
    char *key = key_json(api_key);
    size_t len = overhead(key);
    for (size_t i = 0; i < n; i++)
        len += strlen(ev[i].json) + 1;
    char *out = amp_xmalloc(len + 1), *p = out;
    p += sprintf(p, "{\"api_key\":%s,\"events\":[", key);
    for (size_t i = 0; i < n; i++) {
        if (i)
            *p++ = ',';
        size_t l = strlen(ev[i].json);
        memcpy(p, ev[i].json, l);
        p += l;
    }
    memcpy(p, "]}", 3);
    free(key);
    return out;
}

static void refuse(amp_forward_amplitude_event *e, const char *what, const char *field) {
    if (e->fate == AMP_FORWARD_AMPLITUDE_REFUSED)
        return; /* the first reason named is kept */
    e->fate = AMP_FORWARD_AMPLITUDE_REFUSED;
    snprintf(e->reason, sizeof e->reason, "%s%s%s", what, field ? ": " : "", field ? field : "");
}

/* {"<field>": [indices]} of a 400: refuse each named event. */
static bool refuse_fields(const json_t *obj, const char *what, amp_forward_amplitude_event *ev,
                          size_t n) {
    bool any = false;
    const char *field;
    json_t *list;
    if (!json_is_object(obj))
        return false;
    json_object_foreach((json_t *)obj, field, list) {
        size_t i;
        json_t *v;
        json_array_foreach(list, i, v) {
            json_int_t at = json_is_integer(v) ? json_integer_value(v) : -1;
            if (at >= 0 && (size_t)at < n) {
                refuse(&ev[at], what, field);
                any = true;
            }
        }
    }
    return any;
}

static bool named_in(const json_t *obj, const char *id) {
    return id && json_is_object(obj) && json_object_get(obj, id);
}

static bool index_in(const json_t *arr, size_t i) {
    size_t k;
    json_t *v;
    json_array_foreach(arr, k, v) {
        if (json_is_integer(v) && json_integer_value(v) == (json_int_t)i)
            return true;
    }
    return false;
}

void amp_forward_amplitude_decide(int transport_error, long status, const json_t *body,
                                  amp_forward_amplitude_event *ev, size_t n, int64_t now_ms) {
    amp_forward_amplitude_fate all = AMP_FORWARD_AMPLITUDE_RETRY;
    for (size_t i = 0; i < n; i++) {
        ev[i].fate = AMP_FORWARD_AMPLITUDE_AGAIN;
        ev[i].due_ms = 0;
        ev[i].reason[0] = '\0';
    }
    const json_t *b = json_is_object(body) ? body : NULL;
    const char *error = json_string_value(json_object_get(b, "error"));
    if (transport_error || status <= 0) {
        all = AMP_FORWARD_AMPLITUDE_RETRY;
    } else if (status >= 200 && status < 300) {
        all = AMP_FORWARD_AMPLITUDE_INGESTED;
    } else if (status == 413) {
        if (n == 1) {
            refuse(&ev[0], "payload too large", NULL);
            return;
        }
        all = AMP_FORWARD_AMPLITUDE_SPLIT;
    } else if (status == 400) {
        bool any =
            refuse_fields(json_object_get(b, "events_with_invalid_fields"), "invalid field", ev, n);
        any |=
            refuse_fields(json_object_get(b, "events_with_missing_fields"), "missing field", ev, n);
        const json_t *silenced = json_object_get(b, "silenced_events");
        for (size_t i = 0; i < n; i++)
            if (index_in(silenced, i)) {
                refuse(&ev[i], "silenced device", ev[i].device_id);
                any = true;
            }
        if (any)
            return; /* the others stay AGAIN */
        /* Nothing named: the request as a whole (a bad key, no events). */
        for (size_t i = 0; i < n; i++)
            refuse(&ev[i], error ? error : "bad request", NULL);
        return;
    } else if (status == 429) {
        const json_t *users = json_object_get(b, "throttled_users");
        const json_t *devices = json_object_get(b, "throttled_devices");
        const json_t *qusers = json_object_get(b, "exceeded_daily_quota_users");
        const json_t *qdevices = json_object_get(b, "exceeded_daily_quota_devices");
        const json_t *events = json_object_get(b, "throttled_events");
        bool any = false;
        for (size_t i = 0; i < n; i++) {
            if (named_in(users, ev[i].user_id) || named_in(devices, ev[i].device_id) ||
                named_in(qusers, ev[i].user_id) || named_in(qdevices, ev[i].device_id) ||
                index_in(events, i)) {
                ev[i].fate = AMP_FORWARD_AMPLITUDE_HOLD;
                ev[i].due_ms = now_ms + AMP_FORWARD_AMPLITUDE_THROTTLE_MS;
                any = true;
            }
        }
        if (any)
            return;
        /* Throttled without saying whom: everything waits. */
        for (size_t i = 0; i < n; i++) {
            ev[i].fate = AMP_FORWARD_AMPLITUDE_HOLD;
            ev[i].due_ms = now_ms + AMP_FORWARD_AMPLITUDE_THROTTLE_MS;
        }
        return;
    } else {
        /* 500, 502, 503, 504 and anything unexpected: again later. */
        all = AMP_FORWARD_AMPLITUDE_RETRY;
    }
    for (size_t i = 0; i < n; i++)
        ev[i].fate = all;
}

static bool pending(amp_forward_amplitude_fate f) {
    return f == AMP_FORWARD_AMPLITUDE_AGAIN || f == AMP_FORWARD_AMPLITUDE_SPLIT;
}

void amp_forward_amplitude_send(amp_forward_http *h, const char *url, const char *api_key,
                                amp_forward_amplitude_event *ev, size_t n, size_t max_events,
                                amp_forward_amplitude_stats *stats) {
    amp_forward_amplitude_stats local;
    if (!stats)
        stats = &local;
    memset(stats, 0, sizeof *stats);
    if (max_events == 0 || max_events > AMP_FORWARD_AMPLITUDE_MAX_EVENTS)
        max_events = AMP_FORWARD_AMPLITUDE_MAX_EVENTS;
    for (size_t i = 0; i < n; i++) {
        ev[i].fate = AMP_FORWARD_AMPLITUDE_AGAIN;
        ev[i].due_ms = 0;
        ev[i].reason[0] = '\0';
    }
    amp_forward_amplitude_event *part = amp_xcalloc(n ? n : 1, sizeof *part);
    size_t *at = amp_xcalloc(n ? n : 1, sizeof *at);
    static const char *const headers[] = {"Content-Type: application/json", "Accept: */*", NULL};
    size_t size = max_events, first = 0;
    /* One request per full batch, plus the rounds that answers may add. */
    size_t rounds = (n + max_events - 1) / max_events + AMP_FORWARD_AMPLITUDE_ROUNDS;
    for (size_t round = 0; round < rounds; round++) {
        /* The next request: the first pending events that fit. */
        size_t k = 0;
        for (size_t i = first; i < n && k < size; i++)
            if (pending(ev[i].fate)) {
                if (k == 0)
                    first = i; /* everything before is settled */
                at[k] = i;
                part[k++] = ev[i];
            }
        if (k == 0)
            break;
        k = amp_forward_amplitude_fit(part, k, size, AMP_FORWARD_AMPLITUDE_MAX_BYTES);
        char *body = amp_forward_amplitude_body(api_key, part, k);
        amp_forward_reply reply;
        amp_forward_http_post(h, url, headers, body, strlen(body), &reply);
        free(body);
        stats->requests++;
        stats->last_status = reply.status;
        amp_forward_amplitude_decide(reply.transport_error, reply.status, reply.body, part, k,
                                     amp_now_ms());
        if (reply.transport_error)
            snprintf(stats->last_error, sizeof stats->last_error, "%s: %.100s",
                     reply.transport_code ? reply.transport_code : "transport", reply.error);
        else if (reply.status < 200 || reply.status >= 300) {
            const char *e = json_string_value(json_object_get(reply.body, "error"));
            snprintf(stats->last_error, sizeof stats->last_error, "%ld %.100s", reply.status,
                     e ? e : "");
        }
        amp_forward_reply_clear(&reply);
        bool split = false;
        for (size_t j = 0; j < k; j++) {
            split = split || part[j].fate == AMP_FORWARD_AMPLITUDE_SPLIT;
            ev[at[j]].fate = part[j].fate;
            ev[at[j]].due_ms = part[j].due_ms;
            memcpy(ev[at[j]].reason, part[j].reason, sizeof ev[at[j]].reason);
        }
        if (split)
            size = k / 2 ? k / 2 : 1;
        else if (part[0].fate == AMP_FORWARD_AMPLITUDE_RETRY)
            /* Amplitude is down or unreachable: the rest waits as well. */
            for (size_t i = 0; i < n; i++)
                if (pending(ev[i].fate))
                    ev[i].fate = AMP_FORWARD_AMPLITUDE_RETRY;
    }
    for (size_t i = 0; i < n; i++)
        if (pending(ev[i].fate))
            ev[i].fate = AMP_FORWARD_AMPLITUDE_RETRY;
    free(part);
    free(at);
}
