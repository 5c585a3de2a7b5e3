/*
 * http — the libmicrohttpd daemon: an epoll internal thread pool of
 * listen.threads, suspend/resume allowed (the spool resumes connections),
 * connection limits and timeout from the config, errors into the JSON log.
 *
 * Threading: start and stop from the main thread.
 */
#ifndef AMP_HTTP_H
#define AMP_HTTP_H

#include "handlers.h"
#include "../config/config.h"

typedef struct amp_http amp_http;

/* Bind listen.address:listen.port and start serving through handlers
 * (borrowed; must outlive the daemon). NULL and err on failure. */
amp_http *amp_http_start(const amp_config *cfg, amp_handlers *handlers, char *err, size_t errlen);
/* The bound port (useful with port 0). */
uint16_t amp_http_port(const amp_http *http);
/* Stop accepting, close every connection, join the threads. Every
 * suspended connection must have been resumed first. Accepts NULL. */
void amp_http_stop(amp_http *http);

#endif
