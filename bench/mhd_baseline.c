/*
 * mhd_baseline — the reference servers for `make bench`: a libmicrohttpd
 * server set up like amp2dify's (handlers/http.c: epoll internal thread, a
 * thread pool, suspend/resume allowed, connection limit 1024, 30 s idle
 * timeout, and the same per-connection buffer: libmicrohttpd clears it for
 * every request, so its size is part of the HTTP layer's cost) that collects the POST body into a
 * capped buffer, as the product's router does, and answers with a small JSON body. It checks no
 * signature and parses nothing. Three modes, each the ceiling of one more
 * part of amp2dify's ingest path on this machine:
 *
 *   plain     answer 200 at once: the HTTP layer alone.
 *   handoff   suspend the connection and queue the request to one thread,
 *             which resumes every queued connection in a batch; then answer
 *             202. The cost of handing a request to a committer thread.
 *   durable   handoff, and before resuming, the thread writes the batch's
 *             bodies to a log file (preallocated, so overwriting it needs
 *             no metadata update) and fdatasyncs it: the fastest any design
 *             that answers only after an fdatasync can be here, with
 *             nothing but the body stored (no index, no dedupe, no parsing).
 *
 *   mhd_baseline [--port P] [--threads N] [--mode plain|handoff|durable]
 *                [--log FILE]      (durable: the log, default mhd_baseline.log)
 *                [--pool-bytes B]  (the per-connection buffer; default
 *                                   amp2dify's with its default
 *                                   listen.max_header_bytes)
 *
 * Prints "listening <port>" once it accepts connections (--port 0, the
 * default, picks a free port on 127.0.0.1), runs until SIGTERM or SIGINT,
 * then prints {"requests":N,"body_bytes":B,"batches":K} and exits 0;
 * batches counts the hand-off thread's rounds (fdatasyncs, when durable).
 */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <microhttpd.h>
#include <netinet/in.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>
#include <unistd.h>

#include "../base/alloc.h"
#include "../base/buf.h"
#include "../base/parse.h"

#define MAX_BODY (1024 * 1024) /* amp2dify's default listen.max_body_bytes */
#define CONNECTION_LIMIT 1024
#define CONNECTION_TIMEOUT_S 30
/* handlers/http.c: listen.max_header_bytes (16384) + 16 KiB. */
#define POOL_BYTES (16384 + 16 * 1024)
#define LOG_BYTES (64 * 1024 * 1024) /* the durable log, written round and round */

/* Same length and shape as amp2dify's answer to a one-event request. */
static const char reply_ok[] = "{\"accepted\":1,\"duplicates\":0,\"filtered\":0}";
static const char reply_too_large[] = "{\"error\":\"body_too_large\"}";

typedef enum { MODE_PLAIN, MODE_HANDOFF, MODE_DURABLE } mode;

typedef enum { REQ_READING, REQ_WAITING, REQ_DONE } req_state;

typedef struct req {
    struct req *next; /* in the hand-off queue */
    struct MHD_Connection *conn;
    amp_buf body;
    int too_large;
    _Atomic req_state state;
} req;

/* The server; the hand-off queue and thread exist in handoff and durable
 * modes only. */
typedef struct server {
    mode mode;
    atomic_ullong requests;
    atomic_ullong body_bytes;
    atomic_ullong suspended;
    unsigned long long batches; /* hand-off thread only, read after it stopped */
    int log_fd;                 /* durable: the log; -1 otherwise */
    off_t log_off;              /* hand-off thread only */
    pthread_mutex_t mu;
    pthread_cond_t cond; /* queued, or stop */
    req *queue;
    bool stop;
    pthread_t thread;
} server;

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

static void count(server *sv, const req *r) {
    atomic_fetch_add(&sv->requests, 1);
    atomic_fetch_add(&sv->body_bytes, r->body.len);
}

static void hand_off(server *sv, req *r) {
    pthread_mutex_lock(&sv->mu);
    r->next = sv->queue;
    sv->queue = r;
    pthread_cond_signal(&sv->cond);
    pthread_mutex_unlock(&sv->mu);
}

/* Writes n buffers of len bytes in all at the log's offset, which then
 * moves past them. Aborts on an I/O error: a reference that skipped its
 * writes would overstate the ceiling. */
static void log_write(server *sv, const struct iovec *iov, int n, size_t len) {
    if (n && pwritev(sv->log_fd, iov, n, sv->log_off) != (ssize_t)len) {
        fprintf(stderr, "mhd_baseline: cannot write the log: %s\n", strerror(errno));
        abort();
    }
    sv->log_off += (off_t)len;
}

/* Durable mode: the batch's bodies, in as few writes as fit (IOV_MAX at a
 * time, the log's end starting over at 0), then one fdatasync. */
static void write_batch(server *sv, req *batch) {
    struct iovec iov[IOV_MAX];
    int n = 0;
    size_t len = 0;
    for (req *r = batch; r; r = r->next) {
        if (n == IOV_MAX || sv->log_off + (off_t)(len + r->body.len) > LOG_BYTES) {
            log_write(sv, iov, n, len);
            n = 0;
            len = 0;
            if (sv->log_off + (off_t)r->body.len > LOG_BYTES)
                sv->log_off = 0;
        }
        iov[n++] = (struct iovec){.iov_base = r->body.data, .iov_len = r->body.len};
        len += r->body.len;
    }
    log_write(sv, iov, n, len);
    if (fdatasync(sv->log_fd) != 0) {
        fprintf(stderr, "mhd_baseline: cannot sync the log: %s\n", strerror(errno));
        abort();
    }
}

/* Takes everything queued, stores it (durable mode), resumes it. */
static void *handoff_main(void *arg) {
    server *sv = arg;
    pthread_mutex_lock(&sv->mu);
    for (;;) {
        while (!sv->queue && !sv->stop)
            pthread_cond_wait(&sv->cond, &sv->mu);
        if (!sv->queue)
            break;
        req *batch = sv->queue;
        sv->queue = NULL;
        pthread_mutex_unlock(&sv->mu);
        if (sv->mode == MODE_DURABLE)
            write_batch(sv, batch);
        sv->batches++;
        for (req *r = batch, *next; r; r = next) {
            next = r->next; /* r may be gone once resumed */
            atomic_store(&r->state, REQ_DONE);
            MHD_resume_connection(r->conn);
            atomic_fetch_sub(&sv->suspended, 1);
        }
        pthread_mutex_lock(&sv->mu);
    }
    pthread_mutex_unlock(&sv->mu);
    return NULL;
}

/* The durable log, filled with zeros and synced once, so that writes over
 * it later change no file metadata (a recycled log, as SQLite's WAL is). */
static int open_log(server *sv, const char *path) {
    sv->log_fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (sv->log_fd < 0)
        return -1;
    static const char zeros[1 << 16];
    for (off_t off = 0; off < LOG_BYTES; off += (off_t)sizeof zeros)
        if (pwrite(sv->log_fd, zeros, sizeof zeros, off) != (ssize_t)sizeof zeros)
            return -1;
    return fsync(sv->log_fd);
}

static enum MHD_Result access_cb(void *cls, struct MHD_Connection *conn, const char *url,
                                 const char *method, const char *version, const char *upload_data,
                                 size_t *upload_data_size, void **req_cls) {
    (void)url;
    (void)method;
    (void)version;
    server *sv = cls;
    req *r = *req_cls;
    if (!r) {
        r = amp_xcalloc(1, sizeof *r);
        r->conn = conn;
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
    if (r->too_large)
        return reply(conn, MHD_HTTP_CONTENT_TOO_LARGE, reply_too_large, sizeof reply_too_large - 1);
    if (sv->mode == MODE_PLAIN) {
        count(sv, r);
        return reply(conn, MHD_HTTP_OK, reply_ok, sizeof reply_ok - 1);
    }
    switch (atomic_load(&r->state)) {
    case REQ_READING:
        atomic_store(&r->state, REQ_WAITING);
        atomic_fetch_add(&sv->suspended, 1);
        MHD_suspend_connection(conn);
        hand_off(sv, r);
        return MHD_YES;
    case REQ_WAITING:
        return MHD_YES; /* resumed before the answer: keep waiting */
    case REQ_DONE:
        break;
    }
    count(sv, r);
    return reply(conn, MHD_HTTP_ACCEPTED, reply_ok, sizeof reply_ok - 1);
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
    fprintf(stderr, "usage: mhd_baseline [--port P] [--threads N] "
                    "[--mode plain|handoff|durable] [--log FILE] [--pool-bytes B]\n");
    return 2;
}

int main(int argc, char **argv) {
    int64_t port = 0, threads = 2, pool = POOL_BYTES;
    server sv = {.mode = MODE_PLAIN, .log_fd = -1};
    const char *log_path = "mhd_baseline.log";
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
        } else if (strcmp(a, "--mode") == 0) {
            if (strcmp(v, "plain") == 0)
                sv.mode = MODE_PLAIN;
            else if (strcmp(v, "handoff") == 0)
                sv.mode = MODE_HANDOFF;
            else if (strcmp(v, "durable") == 0)
                sv.mode = MODE_DURABLE;
            else
                return usage();
        } else if (strcmp(a, "--log") == 0) {
            log_path = v;
        } else if (strcmp(a, "--pool-bytes") == 0) {
            if (amp_parse_i64(v, strlen(v), 4096, 64 << 20, &pool) != 0)
                return usage();
        } else {
            return usage();
        }
    }
    if (sv.mode == MODE_DURABLE && open_log(&sv, log_path) != 0) {
        fprintf(stderr, "mhd_baseline: cannot prepare the log '%s': %s\n", log_path,
                strerror(errno));
        return 1;
    }

    /* Before any thread exists, so only sigwait below sees the stop signals. */
    sigset_t stop;
    sigemptyset(&stop);
    sigaddset(&stop, SIGTERM);
    sigaddset(&stop, SIGINT);
    sigaddset(&stop, SIGPIPE);
    pthread_sigmask(SIG_BLOCK, &stop, NULL);

    pthread_mutex_init(&sv.mu, NULL);
    pthread_cond_init(&sv.cond, NULL);
    if (sv.mode != MODE_PLAIN && pthread_create(&sv.thread, NULL, handoff_main, &sv) != 0) {
        fprintf(stderr, "mhd_baseline: cannot start the hand-off thread\n");
        return 1;
    }

    struct sockaddr_in sa;
    memset(&sa, 0, sizeof sa);
    sa.sin_family = AF_INET;
    sa.sin_port = htons((uint16_t)port);
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);

    struct MHD_Daemon *d = MHD_start_daemon(
        MHD_USE_EPOLL_INTERNAL_THREAD | MHD_ALLOW_SUSPEND_RESUME | MHD_USE_ERROR_LOG,
        (uint16_t)port, NULL, NULL, access_cb, &sv, MHD_OPTION_SOCK_ADDR, (struct sockaddr *)&sa,
        MHD_OPTION_THREAD_POOL_SIZE, (unsigned int)threads, MHD_OPTION_CONNECTION_LIMIT,
        (unsigned int)CONNECTION_LIMIT, MHD_OPTION_CONNECTION_TIMEOUT,
        (unsigned int)CONNECTION_TIMEOUT_S, MHD_OPTION_CONNECTION_MEMORY_LIMIT, (size_t)pool,
        MHD_OPTION_NOTIFY_COMPLETED, completed_cb, NULL, MHD_OPTION_END);
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
    /* Every suspended connection is resumed before the daemon stops: stop
     * accepting, let the queue drain (bounded), then stop the thread. */
    MHD_quiesce_daemon(d);
    for (int i = 0; i < 500 && atomic_load(&sv.suspended) > 0; i++)
        usleep(10 * 1000);
    if (sv.mode != MODE_PLAIN) {
        pthread_mutex_lock(&sv.mu);
        sv.stop = true;
        pthread_cond_signal(&sv.cond);
        pthread_mutex_unlock(&sv.mu);
        pthread_join(sv.thread, NULL);
    }
    MHD_stop_daemon(d);
    if (sv.log_fd >= 0)
        close(sv.log_fd);
    printf("{\"requests\":%llu,\"body_bytes\":%llu,\"batches\":%llu}\n",
           (unsigned long long)atomic_load(&sv.requests),
           (unsigned long long)atomic_load(&sv.body_bytes), sv.batches);
    fflush(stdout);
    return 0;
}
