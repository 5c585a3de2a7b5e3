/*
 * Pure helpers of the forward module: what an answer from Dify means, when
 * to try again, and what to keep of a delivered answer. No I/O, no state.
 */
#include "forward.h"
#include "forward_int.h"
#include "../base/alloc.h"
#include "../json/jsonr.h"
#include "../json/jsonw.h"

#include <math.h>
#include <openssl/sha.h>
#include <string.h>
#include <time.h>

/* ---- outcome ---------------------------------------------------------- */

static const char *str_member(const json_t *obj, const char *key) {
    const json_t *v = json_is_object(obj) ? json_object_get(obj, key) : NULL;
    return json_is_string(v) ? json_string_value(v) : NULL;
}

static int has_prefix(const char *s, const char *prefix) {
    return s && strncmp(s, prefix, strlen(prefix)) == 0;
}

void amp_forward_exchange_answer(amp_forward_exchange *ex, const json_t *body) {
    ex->code = str_member(body, "code");
    ex->message = str_member(body, "message");
    const json_t *data = json_is_object(body) ? json_object_get(body, "data") : NULL;
    ex->workflow_status = str_member(data, "status");
    ex->workflow_error = str_member(data, "error");
    ex->conversation_id = amp_forward_answer_conversation(body);
    /* A paused run: the folded stream says so (sse.c), or a blocking
     * answer's data.status does. */
    const char *event = str_member(body, "event");
    ex->waiting_input = event && (strcmp(event, "workflow_paused") == 0 ||
                                  strcmp(event, "human_input_required") == 0);
    const char *run = str_member(body, "workflow_run_id");
    if (run && *run)
        ex->run_id = run;
}

amp_outcome amp_forward_outcome(const amp_forward_exchange *in, const char **code,
                                const char **message) {
    const char *c = in->code;
    const char *m = in->message;
    long http_status = in->status;
    amp_outcome out;

    if (in->transport_error) {
        /* No answer at all: Dify may not have seen the request, or may have
         * and we lost the reply. Either way trying again is the only way to
         * keep at-least-once. */
        out = AMP_OUTCOME_RETRY;
    } else if (http_status >= 200 && http_status < 300) {
        out = AMP_OUTCOME_DELIVERED;
        /* A workflow run answers 200 even when it failed; the verdict is in
         * data.status. Trying it again would run the same failing graph. */
        if (in->workflow_status && strcmp(in->workflow_status, "failed") == 0) {
            out = AMP_OUTCOME_PERMANENT;
            c = "workflow_failed";
            m = in->workflow_error;
        } else if (in->waiting_input ||
                   (in->workflow_status && strcmp(in->workflow_status, "paused") == 0)) {
            /* Dify keeps the run until a person fills the form (or it times
             * out); posting again would start a second run. */
            out = AMP_OUTCOME_WAITING_INPUT;
            c = "waiting_input";
            m = "the workflow paused for human input";
        }
    } else if (http_status == 429 && c && strcmp(c, "rate_limit_error") == 0) {
        /* The workspace's plan quota is used up: no event will get through
         * until someone upgrades or the quota renews, so the app pauses
         * like a rejected key instead of burning every event's retries. */
        out = AMP_OUTCOME_PAUSE_APP;
    } else if (http_status == 408 || http_status == 429 || http_status >= 500) {
        out = AMP_OUTCOME_RETRY;
    } else if (http_status == 400 && c && strcmp(c, "invalid_param") == 0 &&
               has_prefix(m, "Too many requests")) {
        /* Dify reports its per-app concurrency limit this way on some
         * versions: a 429 in disguise. */
        out = AMP_OUTCOME_RETRY;
    } else if (http_status == 401 || http_status == 403) {
        out = AMP_OUTCOME_PAUSE_APP;
    } else if ((http_status == 404 && has_prefix(m, "Conversation Not Exists")) ||
               (http_status == 400 && c && strcmp(c, "conversation_completed") == 0)) {
        /* Dify forgot the conversation, or ended it: either way the next
         * event starts a new one. */
        out = AMP_OUTCOME_RESET_CONVERSATION;
    } else if (http_status >= 400 && http_status < 500) {
        out = AMP_OUTCOME_PERMANENT;
    } else {
        /* 1xx/3xx or nonsense: not Dify's Service API speaking (a proxy, a
         * redirect from a wrong base_url). Keep the event until someone
         * fixes the configuration or it expires. */
        out = AMP_OUTCOME_RETRY;
    }
    if (code)
        *code = c;
    if (message)
        *message = m;
    return out;
}

amp_outcome amp_forward_classify(int transport_error, long http_status, const json_t *body,
                                 const char **code, const char **message) {
    amp_forward_exchange ex = {.transport_error = transport_error, .status = http_status};
    amp_forward_exchange_answer(&ex, body);
    return amp_forward_outcome(&ex, code, message);
}

/* ---- backoff ---------------------------------------------------------- */

int64_t amp_forward_backoff_ms(int64_t initial_ms, int64_t max_ms, int attempt, double rnd) {
    if (initial_ms <= 0 || max_ms <= 0)
        return 0;
    /* Doubling stops at max_ms, so this never overflows and runs at most
     * ~63 times whatever attempt is. */
    int64_t cap = initial_ms < max_ms ? initial_ms : max_ms;
    for (int i = 0; i < attempt && cap < max_ms; i++)
        cap = cap > max_ms / 2 ? max_ms : cap * 2;
    if (!(rnd > 0.0)) /* also catches NaN */
        return 0;
    if (rnd >= 1.0)
        return cap;
    /* (cap + 1) so that cap itself is reachable; doubles hold every int64
     * cap up to 2^53 exactly, and the clamp covers rounding above that. */
    double v = floor(rnd * ((double)cap + 1.0));
    if (v >= (double)cap)
        return cap;
    return (int64_t)v;
}

/* ---- Retry-After ------------------------------------------------------ */

int64_t amp_forward_retry_after_ms(const char *value, int64_t now_ms) {
    if (!value)
        return -1;
    const char *s = value;
    size_t n = strlen(s);
    while (n && (*s == ' ' || *s == '\t'))
        s++, n--;
    while (n && (s[n - 1] == ' ' || s[n - 1] == '\t' || s[n - 1] == '\r' || s[n - 1] == '\n'))
        n--;
    if (n == 0)
        return -1;

    if (s[0] >= '0' && s[0] <= '9') {
        /* delta-seconds: 1*DIGIT. Saturate instead of overflowing; anything
         * past the cap is the cap. */
        int64_t secs = 0;
        for (size_t i = 0; i < n; i++) {
            if (s[i] < '0' || s[i] > '9')
                return -1;
            if (secs <= AMP_FORWARD_RETRY_AFTER_CAP_MS / 1000)
                secs = secs * 10 + (s[i] - '0');
        }
        int64_t ms = secs * 1000;
        return ms > AMP_FORWARD_RETRY_AFTER_CAP_MS ? AMP_FORWARD_RETRY_AFTER_CAP_MS : ms;
    }

    /* An HTTP date: IMF-fixdate, or the obsolete RFC 850 and asctime forms
     * that RFC 9110 5.6.7 says a recipient must accept. curl_getdate reads
     * all three without the process locale; it wants a terminated copy. */
    char date[64];
    if (n >= sizeof date)
        return -1;
    memcpy(date, s, n);
    date[n] = '\0';
    time_t t = curl_getdate(date, NULL);
    if (t == (time_t)-1)
        return -1;
    /* Compare in seconds first: a date far in the future must not overflow
     * when scaled to milliseconds. */
    int64_t now_s = now_ms / 1000;
    if ((int64_t)t - now_s > AMP_FORWARD_RETRY_AFTER_CAP_MS / 1000)
        return AMP_FORWARD_RETRY_AFTER_CAP_MS;
    int64_t delta = (int64_t)t * 1000 - now_ms;
    if (delta < 0)
        return 0; /* already past: retry as soon as the backoff allows */
    return delta > AMP_FORWARD_RETRY_AFTER_CAP_MS ? AMP_FORWARD_RETRY_AFTER_CAP_MS : delta;
}

/* ---- requests and results --------------------------------------------- */

size_t amp_forward_utf8_cut(const char *s, size_t len, size_t max) {
    if (len <= max)
        return len;
    /* s[max] is the first byte left out; while it continues a sequence,
     * the sequence began inside the kept part, so cut before its lead. */
    size_t n = max;
    while (n > 0 && ((unsigned char)s[n] & 0xC0) == 0x80)
        n--;
    return n;
}

char *amp_forward_join_url(const char *base, const char *path) {
    size_t n = strlen(base);
    while (n > 0 && base[n - 1] == '/')
        n--;
    while (*path == '/')
        path++;
    return amp_xasprintf("%.*s/%s", (int)n, base, path);
}

char *amp_forward_request_body(const char *body_json, const char *conversation_id,
                               const char *workflow_id) {
    bool has_conv = conversation_id && *conversation_id;
    bool has_wf = workflow_id && *workflow_id;
    if (!has_conv && !has_wf) {
        /* Nothing to add: send the stored bytes untouched, but still refuse
         * what is not an object so a corrupt row is dead-lettered once
         * instead of being rejected by Dify forever. */
        size_t n = strlen(body_json);
        while (n && (*body_json == ' ' || *body_json == '\n' || *body_json == '\t'))
            body_json++, n--;
        return n && *body_json == '{' ? amp_xstrdup(body_json) : NULL;
    }
    json_error_t jerr;
    json_t *obj = amp_json_loadb(body_json, strlen(body_json), JSON_REJECT_DUPLICATES, &jerr);
    if (!json_is_object(obj)) {
        json_decref(obj);
        return NULL;
    }
    const char *keys[] = {"conversation_id", "workflow_id"};
    const char *vals[] = {has_conv ? conversation_id : NULL, has_wf ? workflow_id : NULL};
    for (size_t i = 0; i < 2; i++) {
        json_t *v = vals[i] ? json_string(vals[i]) : NULL;
        if (vals[i] && (!v || json_object_set_new(obj, keys[i], v) != 0)) {
            json_decref(obj);
            return NULL;
        }
    }
    char *text = amp_json_dumps(obj); /* amp_x allocated, like the copy above */
    json_decref(obj);
    return text;
}

void amp_forward_trace_id(const char *key, char out[AMP_FORWARD_TRACE_ID_MAX + 1]) {
    out[0] = '\0';
    if (!key || !*key)
        return;
    size_t n = 0;
    bool plain = true;
    for (; key[n] && plain; n++) {
        char c = key[n];
        plain = n < AMP_FORWARD_TRACE_ID_MAX && ((c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') ||
                                                 (c >= '0' && c <= '9') || c == '_' || c == '-');
    }
    if (plain) {
        memcpy(out, key, n);
        out[n] = '\0';
        return;
    }
    unsigned char md[SHA256_DIGEST_LENGTH];
    SHA256((const unsigned char *)key, strlen(key), md);
    static const char hex[] = "0123456789abcdef";
    for (size_t i = 0; i < sizeof md; i++) {
        out[2 * i] = hex[md[i] >> 4];
        out[2 * i + 1] = hex[md[i] & 15];
    }
    out[2 * sizeof md] = '\0';
}

const char *amp_forward_answer_conversation(const json_t *body) {
    const char *c = str_member(body, "conversation_id");
    return c && *c ? c : NULL;
}

static void copy_member(json_t *dst, const json_t *src, const char *key) {
    const json_t *v = json_is_object(src) ? json_object_get(src, key) : NULL;
    if (v && !json_is_null(v))
        json_object_set(dst, key, (json_t *)v);
}

static void set_capped_string(json_t *dst, const char *key, const char *s, size_t len) {
    size_t n = amp_forward_utf8_cut(s, len, AMP_FORWARD_ANSWER_CAP);
    json_t *v = json_stringn(s, n);
    if (v)
        json_object_set_new(dst, key, v);
    if (n < len)
        json_object_set_new(dst, "answer_truncated", json_true());
}

json_t *amp_forward_result(amp_endpoint endpoint, long http_status, const json_t *body,
                           int64_t latency_ms) {
    json_t *r = json_object();
    if (!r)
        return NULL;
    json_object_set_new(r, "status", json_integer(http_status));

    if (endpoint == AMP_ENDPOINT_WORKFLOW) {
        copy_member(r, body, "workflow_run_id");
        const json_t *data = json_is_object(body) ? json_object_get(body, "data") : NULL;
        const char *status = str_member(data, "status");
        if (status)
            json_object_set_new(r, "workflow_status", json_string(status));
        const json_t *tokens = json_is_object(data) ? json_object_get(data, "total_tokens") : NULL;
        if (json_is_integer(tokens))
            json_object_set_new(r, "usage", json_pack("{s:O}", "total_tokens", tokens));
    } else {
        copy_member(r, body, "message_id");
        copy_member(r, body, "conversation_id");
        const json_t *meta = json_is_object(body) ? json_object_get(body, "metadata") : NULL;
        const json_t *usage = json_is_object(meta) ? json_object_get(meta, "usage") : NULL;
        if (json_is_object(usage)) {
            /* Token counts only: prices and currencies are Dify's billing
             * view, not needed to inspect a delivery. */
            json_t *u = json_object();
            if (u) {
                copy_member(u, usage, "prompt_tokens");
                copy_member(u, usage, "completion_tokens");
                copy_member(u, usage, "total_tokens");
                json_object_set_new(r, "usage", u);
            }
        }
    }
    json_object_set_new(r, "latency_ms", json_integer(latency_ms));

    if (endpoint == AMP_ENDPOINT_WORKFLOW) {
        const json_t *data = json_is_object(body) ? json_object_get(body, "data") : NULL;
        const json_t *outputs = json_is_object(data) ? json_object_get(data, "outputs") : NULL;
        if (json_is_object(outputs)) {
            /* Outputs are structured; keep them whole when small, else a
             * capped text rendering so the row stays bounded. */
            char *text = amp_json_dumps(outputs);
            if (text) {
                size_t len = strlen(text);
                if (len <= AMP_FORWARD_ANSWER_CAP)
                    json_object_set(r, "outputs", (json_t *)outputs);
                else
                    set_capped_string(r, "answer", text, len);
                free(text);
            }
        }
    } else {
        const json_t *answer = json_is_object(body) ? json_object_get(body, "answer") : NULL;
        if (json_is_string(answer))
            set_capped_string(r, "answer", json_string_value(answer), json_string_length(answer));
    }
    return r;
}
