/*
 * One connection to Dify: a curl easy handle that lives as long as its
 * worker, so consecutive requests reuse the TCP/TLS connection. Options that
 * never change are set once; a request only sets URL, headers and body. The
 * handle runs in a multi handle of its own, driven by run_transfer() with
 * curl_multi_socket_action; the multi keeps the connection between requests.
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

#include <errno.h>
#include <poll.h>
#include <string.h>
#include <strings.h>

/* Sockets a transfer waits on at once: the connection, or while connecting
 * one per address family tried and the resolver's. */
#define MAX_SOCKETS 8

struct amp_forward_http {
    CURL *curl;
    CURLM *multi; /* drives curl alone; holds the connection between requests */
    const atomic_bool *abort_flag;
    /* What libcurl asked to wait for (socket and timer callbacks): */
    struct pollfd wait[MAX_SOCKETS];
    unsigned nwait;
    bool wait_overflow;
    int64_t timer_at_ms; /* monotonic; -1: no timer */
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

/* CURLMOPT_SOCKETFUNCTION: keeps h->wait as libcurl's list of sockets to
 * wait on. */
static int on_socket(CURL *easy, curl_socket_t fd, int what, void *ctx, void *socketp) {
    (void)easy, (void)socketp;
    amp_forward_http *h = ctx;
    unsigned i = 0;
    while (i < h->nwait && h->wait[i].fd != fd)
        i++;
    if (what == CURL_POLL_REMOVE) {
        if (i < h->nwait)
            h->wait[i] = h->wait[--h->nwait];
        return 0;
    }
    if (i == h->nwait) {
        if (h->nwait == MAX_SOCKETS) {
            h->wait_overflow = true;
            return 0;
        }
        h->nwait++;
    }
    h->wait[i] = (struct pollfd){
        .fd = fd,
        .events =
            (short)(((what & CURL_POLL_IN) ? POLLIN : 0) | ((what & CURL_POLL_OUT) ? POLLOUT : 0)),
    };
    return 0;
}

/* CURLMOPT_TIMERFUNCTION: when libcurl wants to be called with
 * CURL_SOCKET_TIMEOUT. */
static int on_timer(CURLM *multi, long timeout_ms, void *ctx) {
    (void)multi;
    amp_forward_http *h = ctx;
    h->timer_at_ms = timeout_ms < 0 ? -1 : amp_mono_ms() + timeout_ms;
    return 0;
}

amp_forward_http *amp_forward_http_create(long connect_timeout_s, long timeout_s,
                                          const atomic_bool *abort_flag, char *err, size_t errlen) {
    amp_forward_http *h = amp_xcalloc(1, sizeof *h);
    amp_buf_init(&h->body, AMP_FORWARD_MAX_RESPONSE);
    h->sse = amp_forward_sse_create();
    h->abort_flag = abort_flag;
    h->timer_at_ms = -1;
    h->curl = curl_easy_init();
    h->multi = curl_multi_init();
    if (!h->curl || !h->multi) {
        snprintf(err, errlen, "curl_easy_init failed");
        goto fail;
    }
    if (curl_multi_setopt(h->multi, CURLMOPT_SOCKETFUNCTION, on_socket) != CURLM_OK ||
        curl_multi_setopt(h->multi, CURLMOPT_SOCKETDATA, h) != CURLM_OK ||
        curl_multi_setopt(h->multi, CURLMOPT_TIMERFUNCTION, on_timer) != CURLM_OK ||
        curl_multi_setopt(h->multi, CURLMOPT_TIMERDATA, h) != CURLM_OK) {
        snprintf(err, errlen, "libcurl rejected a required option");
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
    if (h->multi)
        curl_multi_cleanup(h->multi); /* after the easy handle: it was removed from it */
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

/* How often a transfer that waits (for a slow Dify) checks *abort_flag. */
#define ABORT_CHECK_MS 1000

/* libcurl's events on a ready socket. */
static int select_bits(short revents) {
    int bits = 0;
    if (revents & (POLLIN | POLLHUP))
        bits |= CURL_CSELECT_IN;
    if (revents & POLLOUT)
        bits |= CURL_CSELECT_OUT;
    if (revents & (POLLERR | POLLNVAL))
        bits |= CURL_CSELECT_ERR;
    return bits;
}

/* The transfer set up on h->curl, to its end: what curl_easy_perform does,
 * driven through the handle's own multi with curl_multi_socket_action. The
 * thread waits in poll() on the sockets libcurl names and tells it which
 * one is ready, so libcurl reads at once instead of polling the socket
 * again first: an easy perform made 4.2 poll calls per delivery on a
 * reused connection, this 2.6 (the check that the idle connection is still
 * alive and one look before the answer is awaited remain). The connection
 * stays in h->multi's cache between requests. A failure of this loop
 * itself (not of the transfer) sets *why to its text. */
static CURLcode run_transfer(amp_forward_http *h, const char **why) {
    *why = NULL;
    if (curl_multi_add_handle(h->multi, h->curl) != CURLM_OK) {
        *why = "libcurl refused to start the request";
        return CURLE_FAILED_INIT;
    }
    h->wait_overflow = false;
    int running = 1;
    CURLMcode mc = curl_multi_socket_action(h->multi, CURL_SOCKET_TIMEOUT, 0, &running);
    CURLcode rc = CURLE_FAILED_INIT; /* unless libcurl reports the end below */
    bool aborted = false;
    while (mc == CURLM_OK && running > 0 && !h->wait_overflow) {
        if (h->abort_flag && atomic_load(h->abort_flag)) {
            aborted = true;
            break;
        }
        int64_t wait_ms = ABORT_CHECK_MS;
        if (h->timer_at_ms >= 0) {
            int64_t left = h->timer_at_ms - amp_mono_ms();
            wait_ms = left < 0 ? 0 : left < wait_ms ? left : wait_ms;
        }
        /* A copy: the callbacks change h->wait during socket_action. */
        struct pollfd fds[MAX_SOCKETS];
        nfds_t n = h->nwait;
        memcpy(fds, h->wait, n * sizeof *fds);
        int ready = poll(fds, n, (int)wait_ms);
        if (ready < 0 && errno != EINTR) {
            *why = "poll failed while waiting for the answer";
            rc = CURLE_RECV_ERROR;
            break;
        }
        if (ready <= 0) { /* libcurl's timer (timeouts, connect steps) */
            mc = curl_multi_socket_action(h->multi, CURL_SOCKET_TIMEOUT, 0, &running);
            continue;
        }
        for (nfds_t i = 0; i < n && mc == CURLM_OK; i++)
            if (fds[i].revents)
                mc = curl_multi_socket_action(h->multi, fds[i].fd, select_bits(fds[i].revents),
                                              &running);
    }
    if (aborted) {
        rc = CURLE_ABORTED_BY_CALLBACK;
    } else if (h->wait_overflow) {
        *why = "libcurl asked to wait on more sockets than a request can use";
    } else if (mc != CURLM_OK) {
        *why = curl_multi_strerror(mc);
        rc = mc == CURLM_OUT_OF_MEMORY ? CURLE_OUT_OF_MEMORY : CURLE_FAILED_INIT;
    } else if (!*why) {
        CURLMsg *m;
        int left;
        while ((m = curl_multi_info_read(h->multi, &left)))
            if (m->msg == CURLMSG_DONE && m->easy_handle == h->curl)
                rc = m->data.result;
    }
    /* Unfinished (aborted), this also closes the connection. */
    curl_multi_remove_handle(h->multi, h->curl);
    return rc;
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
    const char *why;
    CURLcode rc = run_transfer(h, &why);
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
                          why         ? why
                          : errbuf[0] ? errbuf
                                      : curl_easy_strerror(rc));
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
