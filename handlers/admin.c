/*
 * The admin API's daemon and endpoints (admin.h). Every request is answered
 * on its first call, once its headers are in: the endpoints take their
 * input from the path and the query string, never from a body.
 */
#include "admin.h"

#include <arpa/inet.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "../base/alloc.h"
#include "../base/clock.h"
#include "../base/log.h"
#include "../base/parse.h"
#include "handlers_int.h"

/* Admin connections at once, and their idle timeout. */
#define ADMIN_CONNECTIONS 64
#define ADMIN_TIMEOUT_S 30
/* Dead letters one list answers at most, and by default. */
#define ADMIN_LIST_MAX 1000
#define ADMIN_LIST_DEFAULT 100
/* Characters of a stored answer an event lookup shows. */
#define ADMIN_ANSWER_CHARS 500
/* Query parameters one request may carry. */
#define ADMIN_MAX_PARAMS 32

struct amp_http_admin {
    struct MHD_Daemon *daemon;
    uint16_t port;
    amp_handlers *h;
    const amp_http_admin_ops *ops;
    void *ctx;
};

/* The query string, as libmicrohttpd decoded it (borrowed from it). */
typedef struct params {
    const char *name[ADMIN_MAX_PARAMS];
    const char *value[ADMIN_MAX_PARAMS];
    size_t n;
    bool too_many;
} params;

static enum MHD_Result collect(void *cls, enum MHD_ValueKind kind, const char *key,
                               const char *value) {
    (void)kind;
    params *p = cls;
    if (p->n == ADMIN_MAX_PARAMS) {
        p->too_many = true;
        return MHD_NO;
    }
    p->name[p->n] = key;
    p->value[p->n++] = value;
    return MHD_YES;
}

__attribute__((format(printf, 3, 4))) static enum MHD_Result
bad_request(amp_req *r, const char *code, const char *fmt, ...) {
    char detail[256];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(detail, sizeof detail, fmt, ap);
    va_end(ap);
    return amp_handlers_reply_error(r, MHD_HTTP_BAD_REQUEST, code, detail);
}

static enum MHD_Result not_offered(amp_req *r) {
    return amp_handlers_reply_error(r, MHD_HTTP_NOT_IMPLEMENTED, "not_implemented",
                                    "the queue engine does not offer this operation");
}

static enum MHD_Result queue_failed(amp_req *r) {
    return amp_handlers_reply_error(r, MHD_HTTP_INTERNAL_SERVER_ERROR, "queue_error",
                                    "the queue could not be read or changed; see the log");
}

/* "true"/"1" and "false"/"0". */
static int parse_bool(const char *v, bool *out) {
    if (strcmp(v, "true") == 0 || strcmp(v, "1") == 0)
        return *out = true, 0;
    if (strcmp(v, "false") == 0 || strcmp(v, "0") == 0)
        return *out = false, 0;
    return -1;
}

/* ---- where is my event ----------------------------------------------------- */

static enum MHD_Result get_event(amp_http_admin *a, amp_req *r, const params *p) {
    const char *id = NULL;
    for (size_t i = 0; i < p->n; i++) {
        if (strcmp(p->name[i], "insert_id") != 0)
            return bad_request(r, "invalid_parameter",
                               "unknown parameter '%.64s'; expected insert_id", p->name[i]);
        id = p->value[i];
    }
    if (!id || !*id)
        return bad_request(r, "invalid_parameter", "insert_id: found %s; expected the event's id",
                           id ? "an empty value" : "nothing");
    if (!amp_queue_offers(a->h->queue, AMP_QUEUE_OFFERS_EVENT))
        return not_offered(r);
    json_t *ev = amp_queue_event(a->h->queue, id, ADMIN_ANSWER_CHARS);
    if (!ev)
        return queue_failed(r);
    json_t *jobs = json_object_get(ev, "jobs");
    if (json_array_size(jobs) == 0 && json_is_null(json_object_get(ev, "seen_ms"))) {
        json_decref(ev);
        char detail[256];
        snprintf(detail, sizeof detail, "no stored event has insert_id '%.100s'%s", id,
                 r->gen->cfg->spool.dedupe_window_s == 0
                     ? " (events are found through dedupe, which spool.dedupe_window_seconds 0 "
                       "turns off)"
                     : "");
        return amp_handlers_reply_error(r, MHD_HTTP_NOT_FOUND, "not_found", detail);
    }
    /* Known to dedupe without jobs: stored, delivered and pruned since. */
    json_object_set_new(ev, "insert_id", json_string(id));
    json_object_set_new(ev, "stored", json_true());
    return amp_handlers_reply_json(r, MHD_HTTP_OK, ev);
}

/* ---- dead letters ---------------------------------------------------------- */

typedef enum { DLQ_LIST, DLQ_REPLAY, DLQ_PURGE } dlq_action;

static enum MHD_Result dlq(amp_http_admin *a, amp_req *r, const params *p, dlq_action act) {
    amp_queue_dlq_filter f = {0};
    bool all = false;
    int64_t limit = ADMIN_LIST_DEFAULT;
    enum MHD_Result ret;
    for (size_t i = 0; i < p->n; i++) {
        const char *name = p->name[i], *v = p->value[i] ? p->value[i] : "";
        char err[160];
        if (act == DLQ_LIST && strcmp(name, "limit") == 0) {
            if (amp_parse_i64(v, strlen(v), 1, ADMIN_LIST_MAX, &limit) != 0) {
                ret = bad_request(r, "invalid_parameter", "limit: found '%.32s'; expected 1..%d", v,
                                  ADMIN_LIST_MAX);
                goto out;
            }
        } else if (act != DLQ_LIST && strcmp(name, "all") == 0) {
            if (parse_bool(v, &all) != 0) {
                ret = bad_request(r, "invalid_parameter",
                                  "all: found '%.32s'; expected true or false", v);
                goto out;
            }
        } else {
            int rc = amp_queue_dlq_filter_set(&f, name, v, err, sizeof err);
            if (rc > 0) {
                ret = bad_request(r, "invalid_parameter",
                                  "unknown parameter '%.64s'; expected route, app, code, status, "
                                  "since, until, id%s",
                                  name, act == DLQ_LIST ? ", limit" : ", all");
                goto out;
            }
            if (rc < 0) {
                ret = bad_request(r, "invalid_parameter", "%s: %s", name, err);
                goto out;
            }
        }
    }
    /* Unlike `dlq`, no filter does not mean every dead letter: an HTTP
     * call acts on all of them only when it says so. */
    if (act != DLQ_LIST && all == amp_queue_dlq_filter_any(&f)) {
        ret = bad_request(r, "invalid_parameter",
                          all ? "all=true takes no filters"
                              : "no filter; expected filters or all=true to act on every dead "
                                "letter");
        goto out;
    }
    if (!amp_queue_offers(a->h->queue, AMP_QUEUE_OFFERS_DLQ)) {
        ret = not_offered(r);
        goto out;
    }
    if (act == DLQ_LIST) {
        json_t *rows = amp_queue_dlq_list(a->h->queue, &f, (size_t)limit);
        ret = rows ? amp_handlers_reply_json(r, MHD_HTTP_OK,
                                             json_pack("{s:I, s:I, s:o}", "count",
                                                       (json_int_t)json_array_size(rows), "limit",
                                                       (json_int_t)limit, "dead_letters", rows))
                   : queue_failed(r);
    } else {
        int64_t n = act == DLQ_REPLAY ? amp_queue_dlq_replay(a->h->queue, &f)
                                      : amp_queue_dlq_purge(a->h->queue, &f);
        if (n >= 0)
            amp_log(AMP_LOG_INFO,
                    act == DLQ_REPLAY ? "dead letters replayed" : "dead letters purged",
                    "{s:s, s:I}", "request_id", r->request_id, "count", (json_int_t)n);
        ret =
            n < 0
                ? queue_failed(r)
                : amp_handlers_reply_json(
                      r, MHD_HTTP_OK,
                      json_pack("{s:I}", act == DLQ_REPLAY ? "replayed" : "purged", (json_int_t)n));
    }
out:
    amp_queue_dlq_filter_clear(&f);
    return ret;
}

/* ---- apps ------------------------------------------------------------------ */

static bool configured(const amp_config *cfg, const char *app) {
    size_t n = amp_mapper_app_count(cfg->mapper);
    for (size_t i = 0; i < n; i++)
        if (strcmp(amp_mapper_app(cfg->mapper, i)->name, app) == 0)
            return true;
    return false;
}

/* Every configured app, and every app the queue still holds jobs of:
 * {"apps": {"<app>": {"configured", "pending", "dead", "oldest_pending_ms",
 * then the delivery state of amp_http_admin_ops.apps}}}. */
static enum MHD_Result get_apps(amp_http_admin *a, amp_req *r, const params *p) {
    if (p->n > 0)
        return bad_request(r, "invalid_parameter", "unknown parameter '%.64s'; expected none",
                           p->name[0]);
    if (!amp_queue_offers(a->h->queue, AMP_QUEUE_OFFERS_APP_DEPTHS))
        return not_offered(r);
    json_t *depths = amp_queue_app_depths(a->h->queue);
    if (!depths)
        return queue_failed(r);
    json_t *states = a->ops->apps(a->ctx);
    const amp_config *cfg = r->gen->cfg;
    json_t *apps = json_object();
    size_t n = amp_mapper_app_count(cfg->mapper);
    for (size_t i = 0; i < n; i++)
        json_object_set_new(apps, amp_mapper_app(cfg->mapper, i)->name,
                            json_pack("{s:b, s:i, s:i, s:i}", "configured", 1, "pending", 0, "dead",
                                      0, "oldest_pending_ms", 0));
    const char *name;
    json_t *d;
    json_object_foreach(depths, name, d) {
        json_t *app = json_object_get(apps, name);
        if (!app) {
            app = json_pack("{s:b}", "configured", 0);
            json_object_set_new(apps, name, app);
        }
        json_object_update(app, d);
    }
    json_t *st;
    json_object_foreach(apps, name, d) {
        if ((st = json_object_get(states, name)))
            json_object_update(d, st);
    }
    json_decref(depths);
    json_decref(states);
    return amp_handlers_reply_json(r, MHD_HTTP_OK, json_pack("{s:o}", "apps", apps));
}

static enum MHD_Result pause_app(amp_http_admin *a, amp_req *r, const params *p, const char *app,
                                 bool paused) {
    if (p->n > 0)
        return bad_request(r, "invalid_parameter", "unknown parameter '%.64s'; expected none",
                           p->name[0]);
    if (!configured(r->gen->cfg, app) || a->ops->set_paused(a->ctx, app, paused) != 0) {
        char detail[160];
        snprintf(detail, sizeof detail, "no app named '%.64s' in the configuration", app);
        return amp_handlers_reply_error(r, MHD_HTTP_NOT_FOUND, "not_found", detail);
    }
    return amp_handlers_reply_json(r, MHD_HTTP_OK,
                                   json_pack("{s:s, s:b}", "app", app, "paused", paused));
}

/* ---- routing --------------------------------------------------------------- */

#define APPS_PREFIX "/admin/apps/"

static const char *header_lookup(void *ctx, const char *name) {
    return MHD_lookup_connection_value(ctx, MHD_HEADER_KIND, name);
}

static enum MHD_Result wrong_method(amp_req *r, const char *allow) {
    char detail[64];
    snprintf(detail, sizeof detail, "this path only accepts %s", allow);
    return amp_handlers_reply_error_hdr(r, MHD_HTTP_METHOD_NOT_ALLOWED, "method_not_allowed",
                                        detail, MHD_HTTP_HEADER_ALLOW, allow);
}

static bool has_body(struct MHD_Connection *conn) {
    const char *cl =
        MHD_lookup_connection_value(conn, MHD_HEADER_KIND, MHD_HTTP_HEADER_CONTENT_LENGTH);
    const char *te =
        MHD_lookup_connection_value(conn, MHD_HEADER_KIND, MHD_HTTP_HEADER_TRANSFER_ENCODING);
    return te || (cl && strcmp(cl, "0") != 0);
}

static enum MHD_Result dispatch(amp_http_admin *a, amp_req *r, const char *url,
                                const char *method) {
    const amp_config *cfg = r->gen->cfg;
    /* Before anything else: nothing about the API shows without the token. */
    if (!cfg->admin.verifier ||
        amp_sig_verify(cfg->admin.verifier, header_lookup, r->conn, "", 0, 0, NULL) != AMP_SIG_OK)
        return amp_handlers_reply_error_hdr(r, MHD_HTTP_UNAUTHORIZED, "unauthorized",
                                            "expected Authorization: Bearer <admin token>",
                                            MHD_HTTP_HEADER_WWW_AUTHENTICATE, "Bearer");
    params p = {0};
    MHD_get_connection_values(r->conn, MHD_GET_ARGUMENT_KIND, collect, &p);
    if (p.too_many)
        return bad_request(r, "invalid_parameter", "more than %d query parameters",
                           ADMIN_MAX_PARAMS);
    bool get = strcmp(method, MHD_HTTP_METHOD_GET) == 0;
    bool post = strcmp(method, MHD_HTTP_METHOD_POST) == 0;
    if (has_body(r->conn) && (get || post))
        return bad_request(r, "invalid_request",
                           "admin requests take no body; parameters go in the query string");

    if (strcmp(url, "/admin/events") == 0)
        return get ? get_event(a, r, &p) : wrong_method(r, MHD_HTTP_METHOD_GET);
    if (strcmp(url, "/admin/dlq") == 0)
        return get ? dlq(a, r, &p, DLQ_LIST) : wrong_method(r, MHD_HTTP_METHOD_GET);
    if (strcmp(url, "/admin/dlq/replay") == 0)
        return post ? dlq(a, r, &p, DLQ_REPLAY) : wrong_method(r, MHD_HTTP_METHOD_POST);
    if (strcmp(url, "/admin/dlq/purge") == 0)
        return post ? dlq(a, r, &p, DLQ_PURGE) : wrong_method(r, MHD_HTTP_METHOD_POST);
    if (strcmp(url, "/admin/apps") == 0)
        return get ? get_apps(a, r, &p) : wrong_method(r, MHD_HTTP_METHOD_GET);
    if (strncmp(url, APPS_PREFIX, strlen(APPS_PREFIX)) == 0) {
        /* /admin/apps/<app>/pause|resume */
        const char *app = url + strlen(APPS_PREFIX);
        const char *slash = strchr(app, '/');
        if (slash && slash > app && !strchr(slash + 1, '/') &&
            (strcmp(slash, "/pause") == 0 || strcmp(slash, "/resume") == 0)) {
            if (!post)
                return wrong_method(r, MHD_HTTP_METHOD_POST);
            char name[256];
            if ((size_t)(slash - app) >= sizeof name)
                return bad_request(r, "invalid_parameter", "the app name is too long");
            memcpy(name, app, (size_t)(slash - app));
            name[slash - app] = '\0';
            return pause_app(a, r, &p, name, slash[1] == 'p');
        }
    }
    return amp_handlers_reply_error(r, MHD_HTTP_NOT_FOUND, "not_found", "no such admin endpoint");
}

static enum MHD_Result access_cb(void *cls, struct MHD_Connection *conn, const char *url,
                                 const char *method, const char *version, const char *upload_data,
                                 size_t *upload_data_size, void **req_cls) {
    (void)version;
    (void)upload_data;
    amp_http_admin *a = cls;
    amp_req *r = *req_cls;
    if (r) { /* answered on the first call: drop any body */
        *upload_data_size = 0;
        return MHD_YES;
    }
    r = amp_xcalloc(1, sizeof *r);
    r->h = a->h;
    r->gen = atomic_load(&a->h->gen);
    r->conn = conn;
    r->start_us = amp_mono_us();
    amp_handlers_request_id(r);
    amp_handlers_client_address(r->gen, conn, r->client, sizeof r->client);
    *req_cls = r;
    /* The path alone in the access line: the query may hold ids. */
    enum MHD_Result ret = dispatch(a, r, url, method);
    amp_log(AMP_LOG_INFO, "admin request", "{s:s, s:s, s:s, s:s, s:i, s:s?, s:I}", "request_id",
            r->request_id, "client", r->client, "method", method, "path", url, "status",
            (int)r->status, "error", r->error, "ms",
            (json_int_t)((amp_mono_us() - r->start_us) / 1000));
    return ret;
}

static void completed_cb(void *cls, struct MHD_Connection *conn, void **req_cls,
                         enum MHD_RequestTerminationCode toe) {
    (void)cls;
    (void)conn;
    (void)toe;
    free(*req_cls);
    *req_cls = NULL;
}

__attribute__((format(printf, 2, 0))) static void mhd_log(void *cls, const char *fmt, va_list ap) {
    (void)cls;
    char msg[512];
    vsnprintf(msg, sizeof msg, fmt, ap);
    msg[strcspn(msg, "\r\n")] = '\0';
    amp_log(AMP_LOG_WARN, "admin http server", "{s:s}", "detail", msg);
}

amp_http_admin *amp_http_admin_start(const amp_config *cfg, amp_handlers *handlers,
                                     const amp_http_admin_ops *ops, void *ctx, char *err,
                                     size_t errlen) {
    struct sockaddr_storage ss; /* checked when the config was loaded */
    if (amp_config_listen_addr(cfg->admin.address, cfg->admin.port, &ss, err, errlen) != 0)
        return NULL;
    unsigned flags = MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_POLL | MHD_USE_ERROR_LOG;
    if (ss.ss_family == AF_INET6)
        flags |= MHD_USE_IPv6;
    amp_http_admin *a = amp_xcalloc(1, sizeof *a);
    a->h = handlers;
    a->ops = ops;
    a->ctx = ctx;
    a->daemon = MHD_start_daemon(flags, cfg->admin.port, NULL, NULL, access_cb, a,
                                 MHD_OPTION_EXTERNAL_LOGGER, mhd_log, NULL, MHD_OPTION_SOCK_ADDR,
                                 (struct sockaddr *)&ss, MHD_OPTION_CONNECTION_LIMIT,
                                 (unsigned int)ADMIN_CONNECTIONS, MHD_OPTION_CONNECTION_TIMEOUT,
                                 (unsigned int)ADMIN_TIMEOUT_S, MHD_OPTION_NOTIFY_COMPLETED,
                                 completed_cb, a, MHD_OPTION_END);
    if (!a->daemon) {
        snprintf(err, errlen,
                 "cannot listen on %s:%u for the admin API (address in use or not "
                 "permitted)",
                 cfg->admin.address, (unsigned)cfg->admin.port);
        free(a);
        return NULL;
    }
    const union MHD_DaemonInfo *info = MHD_get_daemon_info(a->daemon, MHD_DAEMON_INFO_BIND_PORT);
    a->port = info ? info->port : cfg->admin.port;
    return a;
}

uint16_t amp_http_admin_port(const amp_http_admin *a) {
    return a->port;
}

void amp_http_admin_stop(amp_http_admin *a) {
    if (!a)
        return;
    MHD_stop_daemon(a->daemon);
    free(a);
}
