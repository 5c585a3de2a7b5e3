#include "http.h"

#include <arpa/inet.h>
#include <netdb.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../base/log.h"
#include "../base/alloc.h"

struct amp_http {
    struct MHD_Daemon *daemon;
    uint16_t port;
};

__attribute__((format(printf, 2, 0))) static void mhd_log(void *cls, const char *fmt, va_list ap) {
    (void)cls;
    char msg[512];
    vsnprintf(msg, sizeof msg, fmt, ap);
    size_t n = strlen(msg);
    while (n > 0 && (msg[n - 1] == '\n' || msg[n - 1] == '\r'))
        msg[--n] = '\0';
    amp_log(AMP_LOG_WARN, "http server", "{s:s}", "detail", msg);
}

amp_http *amp_http_start(const amp_config *cfg, amp_handlers *handlers, char *err, size_t errlen) {
    struct sockaddr_storage ss; /* checked when the config was loaded */
    if (amp_config_listen_addr(cfg->listen.address, cfg->listen.port, &ss, err, errlen) != 0)
        return NULL;
    unsigned flags = MHD_USE_EPOLL_INTERNAL_THREAD | MHD_ALLOW_SUSPEND_RESUME | MHD_USE_ERROR_LOG;
    if (ss.ss_family == AF_INET6)
        flags |= MHD_USE_IPv6;

    amp_http *http = amp_xcalloc(1, sizeof *http);
    http->daemon = MHD_start_daemon(
        flags, cfg->listen.port, NULL, NULL, amp_handlers_access, handlers,
        MHD_OPTION_EXTERNAL_LOGGER, mhd_log, NULL, /* first, so every message goes to our log */
        MHD_OPTION_SOCK_ADDR, (struct sockaddr *)&ss, MHD_OPTION_THREAD_POOL_SIZE,
        (unsigned int)cfg->listen.threads, MHD_OPTION_CONNECTION_LIMIT,
        (unsigned int)cfg->listen.connection_limit, MHD_OPTION_PER_IP_CONNECTION_LIMIT,
        (unsigned int)cfg->listen.per_ip_connection_limit, MHD_OPTION_CONNECTION_TIMEOUT,
        (unsigned int)cfg->listen.connection_timeout_s, MHD_OPTION_NOTIFY_COMPLETED,
        amp_handlers_completed, handlers, MHD_OPTION_END);
    if (!http->daemon) {
        snprintf(err, errlen, "cannot listen on %s:%u (address in use or not permitted)",
                 cfg->listen.address, (unsigned)cfg->listen.port);
        free(http);
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
    MHD_stop_daemon(http->daemon);
    free(http);
}
