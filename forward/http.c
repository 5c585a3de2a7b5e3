/*
 * One connection to Dify: a curl easy handle that lives as long as its
 * worker, so consecutive requests reuse the TCP/TLS connection. Options that
 * never change are set once; a request only sets URL, headers and body.
 *
 * The answer goes into a buffer with a hard maximum. A blocking answer is
 * parsed as JSON once complete; a streaming one (text/event-stream) is fed
 * to the SSE parser as it arrives and folded into the same JSON shape, so
 * classification does not care which mode the app uses.
 */
#include "forward_int.h"
#include "../base/alloc.h"
#include "../base/buf.h"
#include "../base/clock.h"
#include "../json/jsonr.h"

#include <string.h>
#include <strings.h>

struct amp_forward_http {
    CURL *curl;
    amp_buf body;
    amp_forward_sse *sse;
    /* Per request: */
    int mode; /* 0 undecided, 1 buffer, 2 stream */
    bool too_large;
    bool sse_broken;
    char retry_after[64];
};

enum { MODE_UNDECIDED, MODE_BUFFER, MODE_STREAM };

static size_t on_body(char *data, size_t size, size_t nmemb, void *ctx) {
    amp_forward_http *h = ctx;
    size_t n = size * nmemb;
    if (h->mode == MODE_UNDECIDED) {
        const char *ct = NULL;
        h->mode = MODE_BUFFER;
        if (curl_easy_getinfo(h->curl, CURLINFO_CONTENT_TYPE, &ct) == CURLE_OK && ct &&
            strncasecmp(ct, "text/event-stream", 17) == 0)
            h->mode = MODE_STREAM;
    }
    if (h->mode == MODE_STREAM) {
        if (amp_forward_sse_feed(h->sse, data, n) != 0) {
            h->sse_broken = true;
            return 0; /* a line over the cap: not Dify, stop reading */
        }
        return n;
    }
    /* Over the cap we keep reading and drop the rest instead of aborting:
     * the status line already arrived, and a 2xx means Dify did the work,
     * so the delivery must count as done (retrying would run the event
     * twice). Reading to the end also keeps the connection reusable. The
     * total is still bounded by CURLOPT_TIMEOUT. */
    if (!h->too_large && amp_buf_append(&h->body, data, n) != 0)
        h->too_large = true;
    return n;
}

static size_t on_header(char *data, size_t size, size_t nmemb, void *ctx) {
    amp_forward_http *h = ctx;
    size_t n = size * nmemb;
    static const char name[] = "retry-after:";
    if (n >= 5 && strncmp(data, "HTTP/", 5) == 0) {
        /* A new response (e.g. after 100 Continue): forget earlier headers. */
        h->retry_after[0] = '\0';
    } else if (n > sizeof name - 1 && strncasecmp(data, name, sizeof name - 1) == 0) {
        const char *v = data + sizeof name - 1;
        size_t len = n - (sizeof name - 1);
        while (len && (*v == ' ' || *v == '\t'))
            v++, len--;
        while (len && (v[len - 1] == '\r' || v[len - 1] == '\n' || v[len - 1] == ' '))
            len--;
        if (len >= sizeof h->retry_after)
            len = sizeof h->retry_after - 1; /* no valid value is this long */
        memcpy(h->retry_after, v, len);
        h->retry_after[len] = '\0';
    }
    return n;
}

/* Checked by libcurl about once a second and on every transfer step: a
 * stopping forwarder past its deadline ends requests still under way. */
static int on_progress(void *ctx, curl_off_t dltotal, curl_off_t dlnow, curl_off_t ultotal,
                       curl_off_t ulnow) {
    (void)dltotal, (void)dlnow, (void)ultotal, (void)ulnow;
    const atomic_bool *abort_flag = ctx;
    return abort_flag && atomic_load(abort_flag) ? 1 : 0;
}

amp_forward_http *amp_forward_http_create(long connect_timeout_s, long timeout_s,
                                          const atomic_bool *abort_flag, char *err, size_t errlen) {
    amp_forward_http *h = amp_xcalloc(1, sizeof *h);
    amp_buf_init(&h->body, AMP_FORWARD_MAX_RESPONSE);
    h->sse = amp_forward_sse_create();
    h->curl = curl_easy_init();
    if (!h->curl) {
        snprintf(err, errlen, "curl_easy_init failed");
        goto fail;
    }
    CURL *c = h->curl;
    /* Every option is checked: a libcurl built without one of these would
     * silently run without the timeout or protocol limit. */
    if (curl_easy_setopt(c, CURLOPT_NOSIGNAL, 1L) != CURLE_OK ||
        curl_easy_setopt(c, CURLOPT_CONNECTTIMEOUT, connect_timeout_s) != CURLE_OK ||
        curl_easy_setopt(c, CURLOPT_TIMEOUT, timeout_s) != CURLE_OK ||
        curl_easy_setopt(c, CURLOPT_PROTOCOLS_STR, "http,https") != CURLE_OK ||
        curl_easy_setopt(c, CURLOPT_FOLLOWLOCATION, 0L) != CURLE_OK ||
        curl_easy_setopt(c, CURLOPT_TCP_KEEPALIVE, 1L) != CURLE_OK ||
        curl_easy_setopt(c, CURLOPT_USERAGENT, "amp2dify/" AMP_VERSION) != CURLE_OK ||
        curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, on_body) != CURLE_OK ||
        curl_easy_setopt(c, CURLOPT_WRITEDATA, h) != CURLE_OK ||
        curl_easy_setopt(c, CURLOPT_HEADERFUNCTION, on_header) != CURLE_OK ||
        curl_easy_setopt(c, CURLOPT_HEADERDATA, h) != CURLE_OK ||
        curl_easy_setopt(c, CURLOPT_NOPROGRESS, 0L) != CURLE_OK ||
        curl_easy_setopt(c, CURLOPT_XFERINFOFUNCTION, on_progress) != CURLE_OK ||
        curl_easy_setopt(c, CURLOPT_XFERINFODATA, (void *)abort_flag) != CURLE_OK) {
        snprintf(err, errlen, "libcurl rejected a required option");
        goto fail;
    }
    /* Compressed answers are welcome; the cap applies to decoded bytes. A
     * libcurl without zlib just does not offer it. */
    curl_easy_setopt(c, CURLOPT_ACCEPT_ENCODING, "");
    return h;
fail:
    amp_forward_http_destroy(h);
    return NULL;
}

void amp_forward_http_destroy(amp_forward_http *h) {
    if (!h)
        return;
    if (h->curl)
        curl_easy_cleanup(h->curl);
    amp_buf_free(&h->body);
    amp_forward_sse_destroy(h->sse);
    free(h);
}

static const char *transport_code(CURLcode rc) {
    switch (rc) {
    case CURLE_OPERATION_TIMEDOUT:
        return "timeout";
    case CURLE_COULDNT_CONNECT:
        return "connect_failed";
    case CURLE_COULDNT_RESOLVE_HOST:
    case CURLE_COULDNT_RESOLVE_PROXY:
        return "resolve_failed";
    case CURLE_GOT_NOTHING:
    case CURLE_RECV_ERROR:
    case CURLE_SEND_ERROR:
    case CURLE_PARTIAL_FILE:
        return "connection_dropped";
    case CURLE_SSL_CONNECT_ERROR:
    case CURLE_PEER_FAILED_VERIFICATION:
        return "tls_failed";
    default:
        return "transport_error";
    }
}

void amp_forward_reply_clear(amp_forward_reply *r) {
    json_decref(r->body);
    memset(r, 0, sizeof *r);
}

static void set_transport(amp_forward_reply *r, int rc, const char *code, const char *text) {
    r->transport_error = rc ? rc : -1;
    r->transport_code = code;
    snprintf(r->error, sizeof r->error, "%s", text);
}

/* Fold a finished stream into the reply. */
static void finish_stream(amp_forward_http *h, amp_forward_reply *r) {
    bool complete = false;
    r->streamed = true;
    r->body = amp_forward_sse_finish(h->sse, &complete);
    const json_t *ev = json_is_object(r->body) ? json_object_get(r->body, "event") : NULL;
    if (json_is_string(ev) && strcmp(json_string_value(ev), "error") == 0) {
        /* Dify reports failures inside a 200 stream; its "status" is what
         * a blocking request would have answered. */
        const json_t *st = json_object_get(r->body, "status");
        json_int_t s = json_is_integer(st) ? json_integer_value(st) : 500;
        r->status = (s >= 100 && s <= 599) ? (long)s : 500;
    } else if (!complete && r->status >= 200 && r->status < 300) {
        set_transport(r, CURLE_PARTIAL_FILE, "stream_incomplete",
                      "stream ended before its closing event");
    }
}

/* One request: POST body, or GET when body is NULL. */
static void perform(amp_forward_http *h, const char *url, const char *const *headers,
                    const char *body, size_t body_len, amp_forward_reply *reply) {
    memset(reply, 0, sizeof *reply);
    amp_buf_reset(&h->body);
    amp_forward_sse_reset(h->sse);
    h->mode = MODE_UNDECIDED;
    h->too_large = false;
    h->sse_broken = false;
    h->retry_after[0] = '\0';

    struct curl_slist *list = NULL;
    for (size_t i = 0; headers && headers[i]; i++) {
        struct curl_slist *next = curl_slist_append(list, headers[i]);
        if (!next) {
            curl_slist_free_all(list);
            set_transport(reply, CURLE_OUT_OF_MEMORY, "transport_error", "out of memory");
            return;
        }
        list = next;
    }
    /* No "Expect: 100-continue" round trip for bodies over 1 KiB. */
    struct curl_slist *next = curl_slist_append(list, "Expect:");
    if (!next) {
        curl_slist_free_all(list);
        set_transport(reply, CURLE_OUT_OF_MEMORY, "transport_error", "out of memory");
        return;
    }
    list = next;

    char errbuf[CURL_ERROR_SIZE];
    errbuf[0] = '\0';
    CURL *c = h->curl;
    curl_easy_setopt(c, CURLOPT_ERRORBUFFER, errbuf);
    curl_easy_setopt(c, CURLOPT_URL, url);
    curl_easy_setopt(c, CURLOPT_HTTPHEADER, list);
    if (body) {
        curl_easy_setopt(c, CURLOPT_POST, 1L);
        curl_easy_setopt(c, CURLOPT_POSTFIELDS, body);
        curl_easy_setopt(c, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)body_len);
    } else {
        curl_easy_setopt(c, CURLOPT_HTTPGET, 1L);
    }

    int64_t t0 = amp_mono_ms();
    CURLcode rc = curl_easy_perform(c);
    reply->latency_ms = amp_mono_ms() - t0;

    long status = 0;
    curl_easy_getinfo(c, CURLINFO_RESPONSE_CODE, &status);
    reply->status = status;
    memcpy(reply->retry_after, h->retry_after, sizeof reply->retry_after);

    /* The handle outlives these: do not leave pointers to them behind. */
    curl_easy_setopt(c, CURLOPT_HTTPHEADER, NULL);
    curl_easy_setopt(c, CURLOPT_POSTFIELDS, NULL);
    curl_easy_setopt(c, CURLOPT_ERRORBUFFER, NULL);
    curl_slist_free_all(list);

    if (rc != CURLE_OK) {
        if (h->sse_broken)
            set_transport(reply, rc, "response_too_large", "stream line over the size cap");
        else
            set_transport(reply, rc, transport_code(rc),
                          errbuf[0] ? errbuf : curl_easy_strerror(rc));
        if (h->mode == MODE_STREAM && !h->sse_broken) {
            /* What the stream showed before it broke: the workflow run id
             * lets the next request resume the run instead of posting the
             * event again. */
            bool complete;
            reply->streamed = true;
            reply->body = amp_forward_sse_finish(h->sse, &complete);
        }
        return;
    }
    if (h->mode == MODE_STREAM) {
        finish_stream(h, reply);
        return;
    }
    reply->too_large = h->too_large;
    if (!h->too_large && h->body.len > 0) {
        json_error_t jerr;
        reply->body = amp_json_loadb(h->body.data, h->body.len, 0, &jerr);
    }
    /* A big buffer from one odd answer should not stay with the worker. */
    if (h->body.cap > 64 * 1024)
        amp_buf_free(&h->body);
}

void amp_forward_http_post(amp_forward_http *h, const char *url, const char *const *headers,
                           const char *body, size_t body_len, amp_forward_reply *reply) {
    perform(h, url, headers, body ? body : "", body_len, reply);
}

void amp_forward_http_get(amp_forward_http *h, const char *url, const char *const *headers,
                          amp_forward_reply *reply) {
    perform(h, url, headers, NULL, 0, reply);
}

char *amp_forward_http_escape(amp_forward_http *h, const char *s) {
    char *e = curl_easy_escape(h->curl, s, 0);
    if (!e)
        return NULL;
    char *out = amp_xstrdup(e);
    curl_free(e);
    return out;
}
