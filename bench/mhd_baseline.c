/*
 * mhd_baseline — the ceiling for `make bench`: a libmicrohttpd server set up
 * like amp2dify's (server/http.c: epoll internal thread, a thread pool,
 * suspend/resume allowed, connection limit 1024, 30 s idle timeout) that
 * collects the POST body into a capped buffer, as the product's router does,
 * and answers 200 with a small JSON body. It does no signature check, no
 * parsing and no storage, so amp2dify's requests/s divided by this one's is
 * the share of the HTTP layer's throughput the product keeps.
 *
 *   mhd_baseline [--port P] [--threads N]
 *
 * Prints "listening <port>" once it accepts connections (--port 0, the
 * default, picks a free port on 127.0.0.1), runs until SIGTERM or SIGINT,
 * then prints {"requests":N,"body_bytes":B} and exits 0.
 */
#include <microhttpd.h>
#include <netinet/in.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../server/util.h"

#define MAX_BODY (1024 * 1024) /* amp2dify's default listen.max_body_bytes */
#define CONNECTION_LIMIT 1024
#define CONNECTION_TIMEOUT_S 30

/* Same length and shape as amp2dify's answer to a one-event request. */
static const char reply_ok[] = "{\"accepted\":1,\"duplicates\":0,\"filtered\":0}";
static const char reply_too_large[] = "{\"error\":\"body_too_large\"}";

typedef struct counters {
    atomic_ullong requests;
    atomic_ullong body_bytes;
} counters;

typedef struct req {
    amp_buf body;
    int too_large;
} req;

static enum MHD_Result reply(struct MHD_Connection *conn, unsigned status, const char *body,
                             size_t len) {
    struct MHD_Response *resp =
        MHD_create_response_from_buffer(len, (void *)body, MHD_RESPMEM_PERSISTENT);
    if (!resp)
        return MHD_NO;
    if (MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_TYPE, "application/json") !=
        MHD_YES) {
        MHD_destroy_response(resp);
        return MHD_NO;
    }
    enum MHD_Result rc = MHD_queue_response(conn, status, resp);
    MHD_destroy_response(resp);
    return rc;
}

static enum MHD_Result access_cb(void *cls, struct MHD_Connection *conn, const char *url,
                                 const char *method, const char *version, const char *upload_data,
                                 size_t *upload_data_size, void **req_cls) {
    (void)url;
    (void)method;
    (void)version;
    counters *c = cls;
    req *r = *req_cls;
    if (!r) {
        r = amp_xcalloc(1, sizeof *r);
        amp_buf_init(&r->body, MAX_BODY);
        *req_cls = r;
        return MHD_YES;
    }
    if (*upload_data_size) {
        if (!r->too_large && amp_buf_append(&r->body, upload_data, *upload_data_size) != 0) {
            r->too_large = 1;
            amp_buf_free(&r->body);
        }
        *upload_data_size = 0;
        return MHD_YES;
    }
    atomic_fetch_add(&c->requests, 1);
    atomic_fetch_add(&c->body_bytes, r->body.len);
    if (r->too_large)
        return reply(conn, MHD_HTTP_CONTENT_TOO_LARGE, reply_too_large, sizeof reply_too_large - 1);
    return reply(conn, MHD_HTTP_OK, reply_ok, sizeof reply_ok - 1);
}

static void completed_cb(void *cls, struct MHD_Connection *conn, void **req_cls,
                         enum MHD_RequestTerminationCode toe) {
    (void)cls;
    (void)conn;
    (void)toe;
    req *r = *req_cls;
    if (!r)
        return;
    amp_buf_free(&r->body);
    free(r);
    *req_cls = NULL;
}

static int usage(void) {
    fprintf(stderr, "usage: mhd_baseline [--port P] [--threads N]\n");
    return 2;
}

int main(int argc, char **argv) {
    int64_t port = 0, threads = 2;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!v)
            return usage();
        i++;
        if (strcmp(a, "--port") == 0) {
            if (amp_parse_i64(v, strlen(v), 0, 65535, &port) != 0)
                return usage();
        } else if (strcmp(a, "--threads") == 0) {
            if (amp_parse_i64(v, strlen(v), 1, 64, &threads) != 0)
                return usage();
        } else {
            return usage();
        }
    }

    /* Before any thread exists, so only sigwait below sees the stop signals. */
    sigset_t stop;
    sigemptyset(&stop);
    sigaddset(&stop, SIGTERM);
    sigaddset(&stop, SIGINT);
    sigaddset(&stop, SIGPIPE);
    pthread_sigmask(SIG_BLOCK, &stop, NULL);

    counters c;
    atomic_init(&c.requests, 0);
    atomic_init(&c.body_bytes, 0);

    struct sockaddr_in sa;
    memset(&sa, 0, sizeof sa);
    sa.sin_family = AF_INET;
    sa.sin_port = htons((uint16_t)port);
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);

    struct MHD_Daemon *d = MHD_start_daemon(
        MHD_USE_EPOLL_INTERNAL_THREAD | MHD_ALLOW_SUSPEND_RESUME | MHD_USE_ERROR_LOG,
        (uint16_t)port, NULL, NULL, access_cb, &c, MHD_OPTION_SOCK_ADDR, (struct sockaddr *)&sa,
        MHD_OPTION_THREAD_POOL_SIZE, (unsigned int)threads, MHD_OPTION_CONNECTION_LIMIT,
        (unsigned int)CONNECTION_LIMIT, MHD_OPTION_CONNECTION_TIMEOUT,
        (unsigned int)CONNECTION_TIMEOUT_S, MHD_OPTION_NOTIFY_COMPLETED, completed_cb, NULL,
        MHD_OPTION_END);
    if (!d) {
        fprintf(stderr, "mhd_baseline: cannot listen on 127.0.0.1:%lld\n", (long long)port);
        return 1;
    }
    const union MHD_DaemonInfo *info = MHD_get_daemon_info(d, MHD_DAEMON_INFO_BIND_PORT);
    printf("listening %u\n", info ? (unsigned)info->port : (unsigned)port);
    fflush(stdout);

    int sig = 0;
    do {
        if (sigwait(&stop, &sig) != 0)
            sig = 0;
    } while (sig != SIGTERM && sig != SIGINT);
    MHD_stop_daemon(d);
    printf("{\"requests\":%llu,\"body_bytes\":%llu}\n",
           (unsigned long long)atomic_load(&c.requests),
           (unsigned long long)atomic_load(&c.body_bytes));
    fflush(stdout);
    return 0;
}
