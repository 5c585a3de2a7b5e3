/*
 * admin — the admin API (README "Admin API"): a second libmicrohttpd daemon
 * on admin.listen, apart from the webhook listener, answering JSON to
 * operators who send "Authorization: Bearer <AMP2DIFY_ADMIN_TOKEN>":
 *
 *   GET  /admin/events?insert_id=ID      where an event is: its stored jobs,
 *                                        state, attempts, last status, the
 *                                        answer's excerpt, conversation id
 *   GET  /admin/dlq?FILTERS&limit=N      dead letters (the `dlq` filters:
 *   POST /admin/dlq/replay?FILTERS|all=true   route, app, code, status,
 *   POST /admin/dlq/purge?FILTERS|all=true    since, until, id)
 *   GET  /admin/apps                     per app: queue depth and delivery state
 *   POST /admin/apps/<app>/pause         stop sending an app's requests
 *   POST /admin/apps/<app>/resume
 *
 * A missing or wrong token gets 401 before anything else is looked at.
 * Bad input is 400 naming the parameter; an unknown event or app 404; an
 * operation the queue engine leaves out 501. Errors have the webhook's
 * shape {"error","detail"}. One access log line per request ("admin
 * request"). The token comes from the config the handlers serve, so a
 * reload that changes it takes effect at once.
 *
 * Delivery lives in forward/, which handlers/ does not include: pausing
 * and the apps' delivery state go through amp_http_admin_ops, which
 * cmd/serve.c provides.
 *
 * Threading: one internal thread of its own answers every request; it may
 * block on the queue (SQLite reads, dead-letter updates), never the
 * webhook listener's threads. Start and stop from the main thread.
 */
#ifndef AMP_HANDLERS_ADMIN_H
#define AMP_HANDLERS_ADMIN_H

#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "handlers.h"

/* What the admin API asks of delivery; every function is called on the
 * admin thread with ctx. */
typedef struct amp_http_admin_ops {
    /* Pause (true) or resume an app: 0, or -1 when delivery has no such app. */
    int (*set_paused)(void *ctx, const char *app, bool paused);
    /* Each app's delivery state, {"<app>": {...}} (caller owns), or NULL
     * while delivery is restarting. */
    json_t *(*apps)(void *ctx);
} amp_http_admin_ops;

typedef struct amp_http_admin amp_http_admin;

/* Listen on cfg's admin.address:admin.port (cfg borrowed for the call) and
 * serve the admin API over handlers' queue and current config; ops (a
 * static table) and ctx borrowed until amp_http_admin_stop. NULL and err on
 * failure. */
amp_http_admin *amp_http_admin_start(const amp_config *cfg, amp_handlers *handlers,
                                     const amp_http_admin_ops *ops, void *ctx, char *err,
                                     size_t errlen);
/* The bound port. */
uint16_t amp_http_admin_port(const amp_http_admin *a);
/* Close every connection, join the thread, free. Accepts NULL. */
void amp_http_admin_stop(amp_http_admin *a);

#endif
