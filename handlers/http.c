#include "http.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netdb.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>

#include "../base/alloc.h"
#include "../base/clock.h"
#include "../base/log.h"
#include "handlers_int.h"

/* Descriptors kept back from connections: the spool and its journal, one
 * or two per Dify worker, logs, epoll and the listening socket. */
#define FD_RESERVE 256
/* Connections libmicrohttpd may hold beyond listen.connection_limit (plus
 * an eighth), while those pushed out finish closing. */
#define HEADROOM 16
/* How often the sweeper looks for connections past their deadline. */
#define SWEEP_MS 200
/* libmicrohttpd's per-connection buffer holds the request line and headers:
 * listen.max_header_bytes and 16 KiB more, so that headers somewhat over
 * the cap are still read whole and answered with our JSON 431 (larger ones
 * get libmicrohttpd's own 431). libmicrohttpd zeroes the whole buffer
 * before every request of a connection, so each KiB of it costs CPU on
 * every request: at four times the cap (80 KiB) the clearing was an eighth
 * of the HTTP threads' CPU. */
#define POOL_SPARE (16 * 1024)

/* One open connection. In the idle or body list while in that phase (each
 * list ordered by since_ms, so the oldest is first); freed when
 * libmicrohttpd reports the connection closed. */
typedef struct tracked {
    struct tracked *prev, *next;
    amp_http *owner;
    int fd;
    amp_http_phase phase;
    bool closing; /* shut down by us: no longer in any list */
    int64_t since_ms;
} tracked;

typedef struct {
    tracked *head, *tail;
} conn_list;

struct amp_http {
    struct MHD_Daemon *daemon;
    uint16_t port;
    pthread_mutex_t mu; /* the lists, count and stopping */
    conn_list idle, body;
    size_t count;    /* connections open */
    size_t evict_at; /* above this many, a new connection closes the longest-idle one */
    int64_t header_ms, body_ms;
    pthread_cond_t wake;
    bool stopping;
    pthread_t sweeper;
    amp_series *open, *dropped_idle, *dropped_slow_body, *dropped_header, *dropped_body;
};

__attribute__((format(printf, 2, 0))) static void mhd_log(void *cls, const char *fmt, va_list ap) {
    (void)cls;
    char msg[512];
    vsnprintf(msg, sizeof msg, fmt, ap);
    size_t n = strlen(msg);
    while (n > 0 && (msg[n - 1] == '\n' || msg[n - 1] == '\r'))
        msg[--n] = '\0';
    /* A client that hangs up (or a connection we close) is routine: one
     * line per connection would flood the log during a connection flood. */
    amp_log(strstr(msg, "closed when reading") ? AMP_LOG_DEBUG : AMP_LOG_WARN, "http server",
            "{s:s}", "detail", msg);
}

static void list_push(conn_list *l, tracked *t) {
    t->prev = l->tail;
    t->next = NULL;
    if (l->tail)
        l->tail->next = t;
    else
        l->head = t;
    l->tail = t;
}

static void list_remove(conn_list *l, tracked *t) {
    if (t->prev)
        t->prev->next = t->next;
    else
        l->head = t->next;
    if (t->next)
        t->next->prev = t->prev;
    else
        l->tail = t->prev;
    t->prev = t->next = NULL;
}

static conn_list *list_of(amp_http *http, amp_http_phase phase) {
    return phase == AMP_HTTP_CONN_IDLE   ? &http->idle
           : phase == AMP_HTTP_CONN_BODY ? &http->body
                                         : NULL;
}

/* Under mu. The descriptor is still the connection's: libmicrohttpd closes
 * it only after the closed notification, which takes mu. */
static void cut(amp_http *http, tracked *t, amp_series *why) {
    conn_list *l = list_of(http, t->phase);
    if (l)
        list_remove(l, t);
    t->closing = true;
    shutdown(t->fd, SHUT_RDWR);
    amp_series_inc(why);
}

static void set_phase(amp_http *http, tracked *t, amp_http_phase phase, int64_t now) {
    if (t->closing)
        return;
    conn_list *from = list_of(http, t->phase), *to = list_of(http, phase);
    if (from)
        list_remove(from, t);
    t->phase = phase;
    t->since_ms = now;
    if (to)
        list_push(to, t);
}

void amp_http_conn_phase(struct MHD_Connection *conn, amp_http_phase phase) {
    const union MHD_ConnectionInfo *ci =
        MHD_get_connection_info(conn, MHD_CONNECTION_INFO_SOCKET_CONTEXT);
    tracked *t = ci ? ci->socket_context : NULL;
    if (!t)
        return;
    amp_http *http = t->owner;
    pthread_mutex_lock(&http->mu);
    set_phase(http, t, phase, amp_mono_ms());
    pthread_mutex_unlock(&http->mu);
}

static void notify_connection(void *cls, struct MHD_Connection *conn, void **socket_context,
                              enum MHD_ConnectionNotificationCode code) {
    amp_http *http = cls;
    if (code == MHD_CONNECTION_NOTIFY_STARTED) {
        const union MHD_ConnectionInfo *ci =
            MHD_get_connection_info(conn, MHD_CONNECTION_INFO_CONNECTION_FD);
        tracked *t = amp_xcalloc(1, sizeof *t);
        t->owner = http;
        t->fd = ci ? ci->connect_fd : -1;
        t->phase = AMP_HTTP_CONN_BUSY; /* not in a list until set_phase */
        *socket_context = t;
        pthread_mutex_lock(&http->mu);
        set_phase(http, t, AMP_HTTP_CONN_IDLE, amp_mono_ms());
        http->count++;
        if (t->fd < 0)
            t->closing = true, list_remove(&http->idle, t);
        /* Nearly full: the longest-idle connection makes room or, when
         * none is idle, the slowest body. libmicrohttpd must never reach
         * its own limit: it then stops accepting, and connections whose
         * peers hang up meanwhile are not noticed until their timeout. */
        if (http->count > http->evict_at) {
            if (http->idle.head && http->idle.head != t)
                cut(http, http->idle.head, http->dropped_idle);
            else if (http->body.head)
                cut(http, http->body.head, http->dropped_slow_body);
        }
        amp_series_set(http->open, (double)http->count);
        pthread_mutex_unlock(&http->mu);
    } else if (code == MHD_CONNECTION_NOTIFY_CLOSED) {
        tracked *t = *socket_context;
        if (!t)
            return;
        *socket_context = NULL;
        pthread_mutex_lock(&http->mu);
        conn_list *l = t->closing ? NULL : list_of(http, t->phase);
        if (l)
            list_remove(l, t);
        http->count--;
        amp_series_set(http->open, (double)http->count);
        pthread_mutex_unlock(&http->mu);
        free(t);
    }
}

/* Closes connections past their phase's deadline. The lists are ordered by
 * since_ms and each has one deadline, so only expired heads are visited. */
static void *sweep(void *arg) {
    amp_http *http = arg;
    pthread_setname_np(pthread_self(), "amp-sweep");
    pthread_mutex_lock(&http->mu);
    while (!http->stopping) {
        int64_t now = amp_mono_ms();
        while (http->idle.head && now - http->idle.head->since_ms >= http->header_ms)
            cut(http, http->idle.head, http->dropped_header);
        while (http->body.head && now - http->body.head->since_ms >= http->body_ms)
            cut(http, http->body.head, http->dropped_body);
        struct timespec ts = amp_mono_deadline_in(SWEEP_MS);
        pthread_cond_timedwait(&http->wake, &http->mu, &ts);
    }
    pthread_mutex_unlock(&http->mu);
    return NULL;
}

/* Raise the soft open-file limit to fit limit connections; returns how
 * many connections fit (limit, or fewer when the hard limit is lower). */
static unsigned fit_open_files(unsigned limit) {
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) != 0)
        return limit;
    rlim_t need = (rlim_t)limit + FD_RESERVE;
    if (rl.rlim_cur < need && rl.rlim_cur != RLIM_INFINITY) {
        rlim_t want = rl.rlim_max == RLIM_INFINITY || rl.rlim_max >= need ? need : rl.rlim_max;
        struct rlimit raised = {want, rl.rlim_max};
        if (setrlimit(RLIMIT_NOFILE, &raised) == 0)
            rl.rlim_cur = want;
    }
    if (rl.rlim_cur == RLIM_INFINITY || rl.rlim_cur >= need)
        return limit;
    unsigned fit = rl.rlim_cur > 2 * FD_RESERVE ? (unsigned)(rl.rlim_cur - FD_RESERVE)
                                                : (unsigned)(rl.rlim_cur / 2);
    if (fit < 1)
        fit = 1;
    amp_log(AMP_LOG_WARN, "open-file limit is below what listen.connection_limit needs",
            "{s:i, s:I, s:i}", "connections_needed", (int)limit, "open_files",
            (json_int_t)rl.rlim_cur, "connections_held", (int)(fit - fit / 9));
    return fit;
}

amp_http *amp_http_start(const amp_config *cfg, amp_handlers *handlers, char *err, size_t errlen) {
    struct sockaddr_storage ss; /* checked when the config was loaded */
    if (amp_config_listen_addr(cfg->listen.address, cfg->listen.port, &ss, err, errlen) != 0)
        return NULL;
    unsigned flags = MHD_ALLOW_SUSPEND_RESUME | MHD_USE_ERROR_LOG;
    flags |= cfg->listen.event_loop == AMP_CONFIG_EVENT_LOOP_POLL ? MHD_USE_POLL_INTERNAL_THREAD
                                                                  : MHD_USE_EPOLL_INTERNAL_THREAD;
    if (ss.ss_family == AF_INET6)
        flags |= MHD_USE_IPv6;

    /* libmicrohttpd's own limit is higher than ours, split between its
     * threads, and must never be reached (see notify_connection): the
     * headroom covers connections still closing after being pushed out. */
    unsigned want = cfg->listen.connection_limit;
    unsigned limit = fit_open_files(want + want / 8 + HEADROOM);
    amp_http *http = amp_xcalloc(1, sizeof *http);
    pthread_mutex_init(&http->mu, NULL);
    amp_cond_init_mono(&http->wake);
    http->evict_at = limit < want + want / 8 + HEADROOM ? limit - limit / 9 : want;
    http->header_ms = (int64_t)cfg->listen.header_timeout_s * 1000;
    http->body_ms = (int64_t)cfg->listen.body_timeout_s * 1000;
    amp_metrics *m = handlers->metrics;
    http->open = amp_metrics_series(m, "amp2dify_connections_open", NULL);
    http->dropped_idle =
        amp_metrics_series(m, "amp2dify_connections_closed_total", "reason", "idle_evicted", NULL);
    http->dropped_slow_body =
        amp_metrics_series(m, "amp2dify_connections_closed_total", "reason", "body_evicted", NULL);
    http->dropped_header = amp_metrics_series(m, "amp2dify_connections_closed_total", "reason",
                                              "header_timeout", NULL);
    http->dropped_body =
        amp_metrics_series(m, "amp2dify_connections_closed_total", "reason", "body_timeout", NULL);
    if (pthread_create(&http->sweeper, NULL, sweep, http) != 0) {
        snprintf(err, errlen, "cannot start the connection sweeper thread");
        pthread_cond_destroy(&http->wake);
        pthread_mutex_destroy(&http->mu);
        free(http);
        return NULL;
    }
    size_t pool = cfg->listen.max_header_bytes + POOL_SPARE;
    http->daemon = MHD_start_daemon(
        flags, cfg->listen.port, NULL, NULL, amp_handlers_access, handlers,
        MHD_OPTION_EXTERNAL_LOGGER, mhd_log, NULL, /* first, so every message goes to our log */
        MHD_OPTION_SOCK_ADDR, (struct sockaddr *)&ss, MHD_OPTION_THREAD_POOL_SIZE,
        (unsigned int)cfg->listen.threads, MHD_OPTION_CONNECTION_LIMIT, limit,
        MHD_OPTION_PER_IP_CONNECTION_LIMIT, (unsigned int)cfg->listen.per_ip_connection_limit,
        MHD_OPTION_CONNECTION_TIMEOUT, (unsigned int)cfg->listen.connection_timeout_s,
        MHD_OPTION_CONNECTION_MEMORY_LIMIT, pool, MHD_OPTION_NOTIFY_CONNECTION, notify_connection,
        http, MHD_OPTION_URI_LOG_CALLBACK, amp_handlers_uri, handlers, MHD_OPTION_NOTIFY_COMPLETED,
        amp_handlers_completed, handlers, MHD_OPTION_END);
    if (!http->daemon) {
        snprintf(err, errlen, "cannot listen on %s:%u (address in use or not permitted)",
                 cfg->listen.address, (unsigned)cfg->listen.port);
        http->port = 0;
        amp_http_stop(http);
        return NULL;
    }
    const union MHD_DaemonInfo *info = MHD_get_daemon_info(http->daemon, MHD_DAEMON_INFO_BIND_PORT);
    http->port = info ? info->port : cfg->listen.port;
    return http;
}

uint16_t amp_http_port(const amp_http *http) {
    return http->port;
}

void amp_http_stop(amp_http *http) {
    if (!http)
        return;
    if (http->daemon)
        MHD_stop_daemon(http->daemon); /* every connection reports closed */
    pthread_mutex_lock(&http->mu);
    http->stopping = true;
    pthread_cond_signal(&http->wake);
    pthread_mutex_unlock(&http->mu);
    pthread_join(http->sweeper, NULL);
    pthread_cond_destroy(&http->wake);
    pthread_mutex_destroy(&http->mu);
    free(http);
}
