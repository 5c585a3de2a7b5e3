/*
 * http — the libmicrohttpd daemon: an internal thread pool of
 * listen.threads waiting with epoll or poll (listen.event_loop),
 * suspend/resume allowed (the spool resumes connections),
 * connection limits and timeout from the config, errors into the JSON log.
 *
 * Floods: at start the open-file limit is raised to fit
 * listen.connection_limit (the limit is lowered, with a warning, when the
 * hard limit is smaller). Every connection is tracked in one of three
 * phases: idle (waiting for a request's headers, since it opened or since
 * its previous answer), body (headers in, body arriving) and busy (being
 * answered, or suspended waiting for the spool). An idle connection gets
 * listen.header_timeout_seconds for a request's complete headers, a body
 * listen.body_timeout_seconds, however slowly the bytes trickle in; and
 * when the server is nearly full, each new connection closes the
 * longest-idle one (or, when none is idle, the one that has been sending
 * its body longest) rather than waiting for a free slot. Busy connections are
 * never closed by either, so an accepted event is always answered.
 * Connections are closed with shutdown(2): libmicrohttpd sees the end of the
 * stream on its own thread and cleans up as for any client that hung up.
 *
 * Threading: start and stop from the main thread; amp_http_conn_phase from
 * libmicrohttpd's callbacks (any of its threads). A sweeper thread enforces
 * the deadlines.
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

typedef enum {
    AMP_HTTP_CONN_IDLE, /* waiting for a request's headers */
    AMP_HTTP_CONN_BODY, /* headers in, reading the body */
    AMP_HTTP_CONN_BUSY, /* being answered or waiting for the spool: never closed early */
} amp_http_phase;

/* The request on conn (borrowed) moved to phase. A connection not started
 * by amp_http_start is ignored. */
void amp_http_conn_phase(struct MHD_Connection *conn, amp_http_phase phase);

#endif
