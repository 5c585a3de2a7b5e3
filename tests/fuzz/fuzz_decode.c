/*
 * fuzz_decode — request body decoding and validation (amp_map_decode_body in
 * mapping/decode.c) and the calendar-time parser it uses.
 *
 * Input: a request body, verbatim.
 *
 * Properties checked:
 *  - success gives a non-empty array of objects, each with a non-empty
 *    string event_type and a user_id or device_id, nested at most
 *    AMP_EVENT_MAX_DEPTH levels, no string or key over MAX_STRING bytes,
 *    serialisable as JSON;
 *    failure gives no events and a non-empty reason;
 *  - decoding is deterministic;
 *  - time: whatever Amplitude's strict event_time format accepts, the
 *    lenient format accepts with the same value, and a formatted time reads
 *    back as the same instant.
 */
#include <jansson.h>
#include <string.h>

#include "../../mapping/mapping.h"
#include "../../mapping/mapping_int.h"
#include "fuzz.h"

/* decode.c's per-string cap (EVENT_MAX_STRING_BYTES). */
#define MAX_STRING 65536

static bool nonempty_string(const json_t *v) {
    return json_is_string(v) && json_string_length(v) > 0;
}

/* Depth of v (a scalar is 0, the event object 1) once every string and
 * key is known to be within MAX_STRING. */
static int check_shape(const json_t *v) {
    if (json_is_string(v)) {
        FUZZ_CHECK(json_string_length(v) <= MAX_STRING, "a string of %zu bytes",
                   json_string_length(v));
        return 0;
    }
    int deepest = 0;
    size_t i;
    const char *k;
    json_t *x;
    if (json_is_array(v)) {
        json_array_foreach(v, i, x) {
            int d = check_shape(x);
            deepest = d > deepest ? d : deepest;
        }
        return deepest + 1;
    }
    if (json_is_object(v)) {
        json_object_foreach((json_t *)v, k, x) {
            FUZZ_CHECK(strlen(k) <= MAX_STRING, "a key of %zu bytes", strlen(k));
            int d = check_shape(x);
            deepest = d > deepest ? d : deepest;
        }
        return deepest + 1;
    }
    return 0;
}

static void check_events(const json_t *events) {
    FUZZ_CHECK(json_is_array(events) && json_array_size(events) > 0, "no events on success");
    size_t i;
    json_t *ev;
    json_array_foreach(events, i, ev) {
        FUZZ_CHECK(json_is_object(ev), "events[%zu] is not an object", i);
        FUZZ_CHECK(nonempty_string(json_object_get(ev, "event_type")),
                   "events[%zu] has no event_type", i);
        FUZZ_CHECK(nonempty_string(json_object_get(ev, "user_id")) ||
                       nonempty_string(json_object_get(ev, "device_id")),
                   "events[%zu] has neither user_id nor device_id", i);
        FUZZ_CHECK(check_shape(ev) <= AMP_EVENT_MAX_DEPTH, "events[%zu] nested too deep", i);
        const char *key = amp_map_dedupe_key(ev);
        FUZZ_CHECK(!key || *key, "empty dedupe key");
    }
    char *text = json_dumps(events, JSON_COMPACT | JSON_PRESERVE_ORDER);
    FUZZ_CHECK(text != NULL, "decoded events do not serialise");
    free(text);
}

static void check_time(const char *s, size_t len) {
    int64_t strict_ms = 0, lenient_ms = 0;
    int strict = amp_map_time_parse(s, len, true, &strict_ms);
    int lenient = amp_map_time_parse(s, len, false, &lenient_ms);
    if (strict == 0)
        FUZZ_CHECK(lenient == 0 && lenient_ms == strict_ms,
                   "strict accepted (%lld) but lenient gave %d (%lld)", (long long)strict_ms,
                   lenient, (long long)lenient_ms);
    if (lenient != 0)
        return;
    char buf[32];
    if (amp_map_time_format(lenient_ms, buf, sizeof buf) != 0)
        return; /* outside 0000-9999 after a UTC offset: documented */
    int64_t back = 0;
    FUZZ_CHECK(amp_map_time_parse(buf, strlen(buf), false, &back) == 0 && back == lenient_ms,
               "'%s' does not read back as %lld", buf, (long long)lenient_ms);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    const char *body = (const char *)data;
    char detail[256];
    json_t *events = (json_t *)1; /* must be overwritten */
    amp_decode_result r = amp_map_decode_body(body, size, &events, detail, sizeof detail);
    FUZZ_CHECK(r == AMP_DECODE_OK || r == AMP_DECODE_INVALID_JSON || r == AMP_DECODE_INVALID_EVENT,
               "result %d", (int)r);
    if (r == AMP_DECODE_OK) {
        check_events(events);
    } else {
        FUZZ_CHECK(events == NULL, "events set on failure");
        FUZZ_CHECK(memchr(detail, '\0', sizeof detail) && detail[0], "no reason on failure");
    }

    char detail2[256];
    json_t *again = NULL;
    amp_decode_result r2 = amp_map_decode_body(body, size, &again, detail2, sizeof detail2);
    FUZZ_CHECK(r2 == r, "decoded twice: %d then %d", (int)r, (int)r2);
    FUZZ_CHECK(r != AMP_DECODE_OK || json_equal(events, again), "decoded twice differently");
    FUZZ_CHECK(r == AMP_DECODE_OK || strcmp(detail, detail2) == 0, "two reasons: '%s', '%s'",
               detail, detail2);
    json_decref(again);
    json_decref(events == (json_t *)1 ? NULL : events);

    /* Short inputs double as calendar times. */
    if (size <= 64)
        check_time(body, size);
    return 0;
}
