/*
 * serve — the daemon's lifecycle.
 *
 * Start: config (secrets resolved) -> spool -> forwarder -> HTTP. Signals
 * are blocked in every thread and taken by the main thread with sigwait.
 * SIGTERM/SIGINT: /readyz turns 503 and new webhooks get 503, the requests
 * already handed to the spool are committed and answered, then HTTP stops,
 * the workers finish or hand back their deliveries, and the spool closes.
 * SIGHUP: the config file is loaded again; if it is valid and changes only
 * what can change while running (auth, secrets, routes, log level, body
 * limit, webhook path, trusted proxies), new requests use it at once, else
 * the errors are logged and the running config stays.
 */
#include <curl/curl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "../forward/forward.h"
#include "../handlers/handlers.h"
#include "../spool/spool.h"
#include "commands.h"
#include "config.h"
#include "http.h"
#include "log.h"
#include "metrics.h"
#include "version.h"

/* Time given to answered requests to leave the socket before HTTP stops. */
#define DRAIN_GRACE_MS 200

/* shutdown_timeout_seconds is shared out: a quarter for the spool to answer
 * the requests it holds, half for Dify requests under way (then they are
 * ended and their rows handed back), the rest for the last commits. */
static int64_t drain_max_ms(const amp_config *cfg) {
    return (int64_t)cfg->shutdown_timeout_s * 1000 / 4;
}

static int64_t forward_grace_ms(const amp_config *cfg) {
    return (int64_t)cfg->shutdown_timeout_s * 1000 / 2;
}

/* The first key whose change needs a restart: the listening socket, the
 * spool, and what the forwarder holds (Dify settings, apps and their keys).
 * NULL when none changed. */
static const char *restart_only_change(const amp_config *a, const amp_config *b) {
    if (strcmp(a->listen.address, b->listen.address) || a->listen.port != b->listen.port)
        return "listen.address/port";
    if (a->listen.threads != b->listen.threads ||
        a->listen.connection_limit != b->listen.connection_limit ||
        a->listen.per_ip_connection_limit != b->listen.per_ip_connection_limit ||
        a->listen.connection_timeout_s != b->listen.connection_timeout_s)
        return "listen (threads, connection limits, timeout)";
    if (strcmp(a->spool.path, b->spool.path) || a->spool.sync_normal != b->spool.sync_normal ||
        a->spool.dedupe_window_s != b->spool.dedupe_window_s ||
        a->spool.max_pending != b->spool.max_pending || a->spool.max_bytes != b->spool.max_bytes ||
        a->spool.retention_s != b->spool.retention_s ||
        a->spool.lock_timeout_ms != b->spool.lock_timeout_ms)
        return "spool";
    if (a->shutdown_timeout_s != b->shutdown_timeout_s)
        return "shutdown_timeout_seconds";
    if (strcmp(a->dify.base_url, b->dify.base_url) || a->dify.timeout_s != b->dify.timeout_s ||
        a->dify.connect_timeout_s != b->dify.connect_timeout_s ||
        a->dify.workers != b->dify.workers ||
        a->dify.retry_initial_ms != b->dify.retry_initial_ms ||
        a->dify.retry_max_ms != b->dify.retry_max_ms ||
        a->dify.retry_max_age_s != b->dify.retry_max_age_s)
        return "dify";
    size_t n = amp_mapper_app_count(a->mapper);
    if (n != amp_mapper_app_count(b->mapper))
        return "apps";
    for (size_t i = 0; i < n; i++) {
        const amp_app *x = amp_mapper_app(a->mapper, i), *y = amp_mapper_app(b->mapper, i);
        if (strcmp(x->name, y->name) || x->endpoint != y->endpoint ||
            x->streaming != y->streaming || x->rate_per_sec != y->rate_per_sec ||
            x->burst != y->burst || x->max_in_flight != y->max_in_flight ||
            strcmp(a->api_keys[i], b->api_keys[i]))
            return "apps";
    }
    return NULL;
}

/* Load the config again; on success it becomes *cfg and the old one joins
 * the retired list (requests under way may still use it). */
static void reload(const char *path, amp_config **cfg, amp_handlers *handlers,
                   amp_config ***retired, size_t *nretired) {
    amp_errs *errs = amp_errs_create();
    amp_config *next = amp_config_load(path, AMP_CONFIG_SECRETS, errs);
    const char *fixed = next ? restart_only_change(*cfg, next) : NULL;
    if (!next) {
        for (size_t i = 0; i < amp_errs_count(errs); i++)
            amp_log(AMP_LOG_ERROR, "reload rejected", "{s:s, s:s}", "file", path, "error",
                    amp_errs_get(errs, i));
    } else if (fixed) {
        amp_log(AMP_LOG_ERROR, "reload rejected", "{s:s, s:s, s:s}", "file", path, "changed", fixed,
                "error", "this part of the config only changes with a restart");
        amp_config_destroy(next);
    } else {
        amp_handlers_set_config(handlers, next);
        amp_log_set_level(next->log_level);
        *retired = amp_xrealloc(*retired, (*nretired + 1) * sizeof **retired);
        (*retired)[(*nretired)++] = *cfg;
        *cfg = next;
        amp_log(AMP_LOG_INFO, "config reloaded", "{s:s}", "file", path);
    }
    amp_errs_destroy(errs);
}

/* Gauges read from the spool at each scrape. */
static void collect_spool(void *ctx, amp_metrics *m) {
    amp_spool *spool = ctx;
    amp_series_set(amp_metrics_series(m, "amp2dify_spool_pending", NULL),
                   (double)amp_spool_depth(spool));
    int64_t oldest = amp_spool_oldest_pending_ms(spool);
    amp_series_set(amp_metrics_series(m, "amp2dify_spool_oldest_pending_age_seconds", NULL),
                   oldest ? (double)(amp_now_ms() - oldest) / 1e3 : 0);
    amp_series_set(amp_metrics_series(m, "amp2dify_spool_writable", NULL),
                   amp_spool_writable(spool) ? 1 : 0);
    amp_series_set(amp_metrics_series(m, "amp2dify_spool_bytes", NULL),
                   (double)amp_spool_bytes(spool));
    amp_series_set(amp_metrics_series(m, "amp2dify_spool_full", NULL),
                   amp_spool_full(spool) ? 1 : 0);
}

static amp_forward *start_forwarder(const amp_config *cfg, amp_spool *spool, amp_metrics *metrics,
                                    char *err, size_t errlen) {
    size_t napps = amp_mapper_app_count(cfg->mapper);
    const amp_app **apps = amp_xcalloc(napps + 1, sizeof *apps);
    for (size_t i = 0; i < napps; i++)
        apps[i] = amp_mapper_app(cfg->mapper, i);
    amp_forward_opts opts = {
        .base_url = cfg->dify.base_url,
        .connect_timeout_s = cfg->dify.connect_timeout_s,
        .timeout_s = cfg->dify.timeout_s,
        .workers = cfg->dify.workers,
        .retry_initial_ms = cfg->dify.retry_initial_ms,
        .retry_max_ms = cfg->dify.retry_max_ms,
        .retry_max_age_s = cfg->dify.retry_max_age_s,
        .napps = napps,
        .apps = apps,
        .api_keys = (const char *const *)cfg->api_keys,
        .metrics = metrics,
        .stop_grace_ms = forward_grace_ms(cfg),
    };
    amp_forward *f = amp_forward_start(&opts, spool, err, errlen);
    free(apps); /* the forwarder copies the app table it needs */
    return f;
}

static void sleep_ms(long ms) {
    struct timespec ts = {.tv_sec = ms / 1000, .tv_nsec = (ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

int amp_cmd_serve(int argc, char **argv) {
    const char *cfile;
    if (amp_cmd_config_only(argc, argv, &cfile) != 0)
        return 2;
    amp_config *cfg = amp_cmd_load_config(cfile, AMP_CONFIG_SECRETS);
    if (!cfg)
        return 2;
    const char *path = amp_config_default_path(cfile); /* reloaded from here on SIGHUP */
    amp_log_set_level(cfg->log_level);

    /* Before any thread exists: every thread inherits the blocked set. */
    sigset_t sigs;
    sigemptyset(&sigs);
    sigaddset(&sigs, SIGTERM);
    sigaddset(&sigs, SIGINT);
    sigaddset(&sigs, SIGHUP);
    sigaddset(&sigs, SIGPIPE);
    pthread_sigmask(SIG_BLOCK, &sigs, NULL);
    /* Under a file-size limit (ulimit -f, systemd LimitFSIZE=) a spool write
     * past it must fail with EFBIG, which the spool answers with 503, rather
     * than kill the daemon. */
    signal(SIGXFSZ, SIG_IGN);

    if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK) {
        amp_log(AMP_LOG_ERROR, "curl initialisation failed", NULL);
        amp_config_destroy(cfg);
        return 1;
    }

    int rc = 1;
    char err[512] = "";
    amp_spool *spool = NULL;
    amp_forward *fwd = NULL;
    amp_handlers *handlers = NULL;
    amp_http *http = NULL;
    amp_metrics *metrics = amp_metrics_create();
    amp_config **retired = NULL; /* configs replaced by SIGHUP, freed at exit */
    size_t nretired = 0;

    amp_spool_opts sopts = amp_config_spool_opts(cfg);
    spool = amp_spool_open(&sopts, err, sizeof err);
    if (!spool) {
        amp_log(AMP_LOG_ERROR, "spool unavailable", "{s:s, s:s}", "path", cfg->spool.path, "error",
                err);
        goto out;
    }
    fwd = start_forwarder(cfg, spool, metrics, err, sizeof err);
    if (!fwd) {
        amp_log(AMP_LOG_ERROR, "forwarder failed to start", "{s:s}", "error", err);
        goto out;
    }
    amp_forward_kick(fwd); /* resume what a previous run left pending */

    amp_metrics_set_collector(metrics, collect_spool, spool);
    handlers = amp_handlers_create(cfg, spool, metrics);
    http = amp_http_start(cfg, handlers, err, sizeof err);
    if (!http) {
        amp_log(AMP_LOG_ERROR, "http server failed to start", "{s:s}", "error", err);
        goto out;
    }
    if (cfg->auth.scheme == AMP_AUTH_NONE)
        amp_log(AMP_LOG_WARN, "authentication is off: every request is accepted unsigned", "{s:s}",
                "scheme", "none");
    amp_log(AMP_LOG_INFO, "listening", "{s:s, s:s, s:i, s:s, s:s, s:s, s:I}", "version",
            AMP_VERSION, "address", cfg->listen.address, "port", (int)amp_http_port(http), "path",
            cfg->listen.path, "auth", amp_sig_scheme_name(cfg->auth.scheme), "spool",
            cfg->spool.path, "pending", (json_int_t)amp_spool_depth(spool));

    for (;;) {
        int sig = 0;
        if (sigwait(&sigs, &sig) != 0)
            continue;
        if (sig == SIGTERM || sig == SIGINT) {
            amp_log(AMP_LOG_INFO, "shutting down", "{s:s}", "signal", strsignal(sig));
            break;
        }
        if (sig == SIGHUP)
            reload(path, &cfg, handlers, &retired, &nretired);
    }

    /* Webhooks begun from now on get 503. Those begun before finish: wait
     * until each has been answered and sent (one may still be reading its
     * body or handing its events to the spool, hence the loop), then give
     * the last answers time to leave. */
    amp_handlers_set_draining(handlers, true);
    int64_t drain_end = amp_mono_ms() + drain_max_ms(cfg);
    bool answered;
    while ((answered = amp_spool_flush_until(spool, drain_end)) &&
           amp_handlers_open(handlers) > 0 && amp_mono_ms() < drain_end)
        sleep_ms(10);
    int waiting = amp_handlers_suspended(handlers);
    if (answered && waiting == 0 && amp_handlers_open(handlers) > 0)
        /* Still sending their bodies at the bound: their connections are
         * closed without an answer, so their senders retry. */
        amp_log(AMP_LOG_WARN, "requests unfinished at shutdown", "{s:i}", "requests",
                amp_handlers_open(handlers));
    if (!answered || waiting > 0) {
        /* The spool did not answer in time (its disk hangs, say). Stopping
         * the HTTP server would free connections the spool must still
         * resume, and stopping the workers or closing the spool would wait
         * for the disk: leave at once instead. None of the waiting requests
         * got a 2xx, so their senders retry them, and dedupe absorbs any
         * that were stored; acknowledgements not yet committed mean those
         * deliveries are made again after the next start. */
        amp_log(AMP_LOG_ERROR, "the spool did not answer in time; exiting without waiting",
                "{s:i, s:I}", "requests_waiting", waiting, "waited_ms",
                (json_int_t)drain_max_ms(cfg));
        _exit(1);
    }
    sleep_ms(DRAIN_GRACE_MS);
    rc = 0;
out:
    amp_http_stop(http);
    amp_forward_stop(fwd);
    amp_spool_close(spool);
    amp_handlers_destroy(handlers);
    amp_metrics_destroy(metrics);
    curl_global_cleanup();
    if (rc == 0)
        amp_log(AMP_LOG_INFO, "stopped", NULL);
    for (size_t i = 0; i < nretired; i++)
        amp_config_destroy(retired[i]);
    free(retired);
    amp_config_destroy(cfg);
    return rc;
}
