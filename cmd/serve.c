/*
 * serve — the daemon's lifecycle.
 *
 * Start: config (secrets resolved) -> spool -> forwarder -> HTTP. Signals
 * are blocked in every thread and taken by the main thread with sigwait.
 * SIGTERM/SIGINT: /readyz turns 503 and webhooks begun after it get 503,
 * the requests begun before finish (stored and answered), then HTTP stops,
 * the workers finish or hand back their deliveries, and the spool closes.
 * SIGHUP: the config file is loaded again; if it is valid and leaves the
 * listening socket and the spool as they are, new requests use it at once
 * (auth, secrets, routes, log level, limits, path, proxies), and when it
 * changes delivery (apps, keys, dify, shutdown timeout) the forwarder is
 * restarted under it; else the errors are logged and the running config
 * stays, whole. Which key is which is the reload class of its row in the
 * config table (amp_config_diff).
 */
#include <curl/curl.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "../forward/forward.h"
#include "../sources/export.h"
#include "../handlers/handlers.h"
#include "../queue/queue.h"
#include "commands.h"
#include "../config/config.h"
#include "../handlers/admin.h"
#include "../handlers/http.h"
#include "../base/log.h"
#include "../base/metrics.h"
#include "../base/version.h"
#include "../base/alloc.h"
#include "../base/clock.h"
#include "../base/errs.h"

/* Time given to answered requests to leave the socket before HTTP stops. */
#define DRAIN_GRACE_MS 200
/* How long a shutdown flush may take once the drain bound has passed. */
#define FLUSH_GRACE_MS 250
/* How long a reload that restarts delivery waits for the spool to answer. */
#define RELOAD_SPOOL_WAIT_MS 2000

/* shutdown_timeout_seconds is shared out: a quarter for the spool to answer
 * the requests it holds, half for Dify requests under way (then they are
 * ended and their rows handed back), the rest for the last commits. */
static int64_t drain_max_ms(const amp_config *cfg) {
    return (int64_t)cfg->shutdown_timeout_s * 1000 / 4;
}

static int64_t forward_grace_ms(const amp_config *cfg) {
    return (int64_t)cfg->shutdown_timeout_s * 1000 / 2;
}

static amp_forward *start_forwarder(const amp_config *cfg, amp_queue *spool, amp_metrics *metrics,
                                    const char *const *paused, char *err, size_t errlen) {
    size_t napps = amp_mapper_app_count(cfg->mapper);
    const amp_app **apps = amp_xcalloc(napps + 1, sizeof *apps);
    for (size_t i = 0; i < napps; i++)
        apps[i] = amp_mapper_app(cfg->mapper, i);
    amp_forward_opts opts = {
        .base_url = cfg->dify.base_url,
        .connect_timeout_s = cfg->dify.connect_timeout_s,
        .timeout_s = cfg->dify.timeout_s,
        .workers = cfg->dify.workers,
        .nice = cfg->dify.nice,
        .retry_initial_ms = cfg->dify.retry_initial_ms,
        .retry_max_ms = cfg->dify.retry_max_ms,
        .retry_max_age_s = cfg->dify.retry_max_age_s,
        .napps = napps,
        .apps = apps,
        .api_keys = (const char *const *)cfg->api_keys,
        .metrics = metrics,
        .stop_grace_ms = forward_grace_ms(cfg),
        .paused_apps = paused,
        .mapper = cfg->mapper,
        .report_base_url = cfg->reports.base_url,
        .report_api_key = cfg->reports.api_key,
        .report_batch_events = cfg->reports.batch_events,
        .report_linger_ms = cfg->reports.linger_ms,
        .report_throttle_ms = cfg->reports.throttle_ms,
    };
    amp_forward *f = amp_forward_start(&opts, spool, err, errlen);
    free(apps); /* the forwarder copies the app table it needs */
    return f;
}

/* What a reload replaces. The configs replaced stay allocated until exit
 * (requests under way may still use theirs). */
typedef struct running {
    const char *path; /* the config file, reloaded on SIGHUP */
    amp_config *cfg;
    amp_config **retired;
    size_t nretired;
    amp_handlers *handlers;
    amp_queue *spool;
    amp_metrics *metrics;
    /* The forwarder and the apps an operator paused (the admin API, on its
     * own thread), under delivery_mu; the pauses outlive a forwarder that a
     * reload restarts. fwd is NULL while it restarts. */
    pthread_mutex_t delivery_mu;
    amp_forward *fwd;
    char **paused; /* NULL-terminated */
    size_t npaused;
    amp_source_export_poller *exporter; /* sources.export, when enabled */
    char *export_cursor;
} running;

/* (Re)start delivery under cfg with the operator's pauses; rs->fwd is set
 * (NULL on failure). */
static void start_delivery(running *rs, const amp_config *cfg, char *err, size_t errlen) {
    pthread_mutex_lock(&rs->delivery_mu);
    rs->fwd =
        start_forwarder(cfg, rs->spool, rs->metrics, (const char *const *)rs->paused, err, errlen);
    pthread_mutex_unlock(&rs->delivery_mu);
}

static void stop_delivery(running *rs) {
    pthread_mutex_lock(&rs->delivery_mu);
    amp_forward *f = rs->fwd;
    rs->fwd = NULL;
    pthread_mutex_unlock(&rs->delivery_mu);
    amp_forward_stop(f);
}

/* ---- the admin API's hooks into delivery (admin thread) ---- */

static int admin_set_paused(void *ctx, const char *app, bool paused) {
    running *rs = ctx;
    pthread_mutex_lock(&rs->delivery_mu);
    int rc = rs->fwd ? amp_forward_set_paused(rs->fwd, app, paused) : 0;
    size_t i = 0;
    while (i < rs->npaused && strcmp(rs->paused[i], app) != 0)
        i++;
    if (rc == 0 && paused && i == rs->npaused) {
        rs->paused = amp_xrealloc(rs->paused, (rs->npaused + 2) * sizeof *rs->paused);
        rs->paused[rs->npaused++] = amp_xstrdup(app);
        rs->paused[rs->npaused] = NULL;
    } else if (rc == 0 && !paused && i < rs->npaused) {
        free(rs->paused[i]);
        rs->paused[i] = rs->paused[--rs->npaused];
        rs->paused[rs->npaused] = NULL;
    }
    pthread_mutex_unlock(&rs->delivery_mu);
    return rc;
}

static json_t *admin_apps(void *ctx) {
    running *rs = ctx;
    pthread_mutex_lock(&rs->delivery_mu);
    json_t *apps = rs->fwd ? amp_forward_apps(rs->fwd) : NULL;
    pthread_mutex_unlock(&rs->delivery_mu);
    return apps;
}

static const amp_http_admin_ops admin_ops = {.set_paused = admin_set_paused, .apps = admin_apps};

/* Delivery under next: the forwarder is stopped (requests under way finish
 * within its grace, then are ended and their rows handed back, as at
 * shutdown) and started again. Refused, with the forwarder left running,
 * while the spool does not answer (stopping waits for its last
 * acknowledgements to commit, and this thread must stay free for SIGTERM);
 * if the new one cannot start, the old config's is started again and the
 * reload is refused. */
static bool restart_delivery(running *rs, const amp_config *next, const char *changed) {
    char err[512];
    if (!amp_queue_flush_until(rs->spool, amp_mono_ms() + RELOAD_SPOOL_WAIT_MS)) {
        amp_log(AMP_LOG_ERROR, "reload rejected", "{s:s, s:s, s:s}", "file", rs->path, "changed",
                changed, "error", "the spool is not answering; delivery was not restarted");
        return false;
    }
    stop_delivery(rs);
    start_delivery(rs, next, err, sizeof err);
    if (!rs->fwd) {
        amp_log(AMP_LOG_ERROR, "reload rejected", "{s:s, s:s, s:s}", "file", rs->path, "changed",
                changed, "error", err);
        start_delivery(rs, rs->cfg, err, sizeof err);
        if (!rs->fwd) { /* what started once does not fail again but for resources */
            amp_log(AMP_LOG_ERROR, "delivery could not be restarted", "{s:s}", "error", err);
            abort();
        }
        amp_forward_kick(rs->fwd);
        return false;
    }
    amp_forward_kick(rs->fwd);
    return true;
}

/* dify.validate: check cfg's apps against Dify (GET /info, /parameters) and
 * log what does not fit. false when it is "strict" and something does not
 * fit: the caller refuses the config. An unreachable Dify is a warning
 * whatever the setting: it must never keep the relay from starting. */
static bool validate_apps(const amp_config *cfg, const char *when) {
    if (cfg->dify.validate == AMP_CONFIG_VALIDATE_OFF)
        return true;
    amp_errs *findings = amp_errs_create(), *unreachable = amp_errs_create();
    amp_cmd_check_apps(cfg, findings, unreachable);
    bool strict = cfg->dify.validate == AMP_CONFIG_VALIDATE_STRICT;
    for (size_t i = 0; i < amp_errs_count(unreachable); i++)
        amp_log(AMP_LOG_WARN, "dify app not checked", "{s:s, s:s}", "when", when, "error",
                amp_errs_get(unreachable, i));
    for (size_t i = 0; i < amp_errs_count(findings); i++)
        amp_log(strict ? AMP_LOG_ERROR : AMP_LOG_WARN, "dify app does not fit the config",
                "{s:s, s:s, s:s}", "when", when, "file", cfg->file, "error",
                amp_errs_get(findings, i));
    bool ok = !strict || amp_errs_count(findings) == 0;
    amp_errs_destroy(findings);
    amp_errs_destroy(unreachable);
    return ok;
}

/* Load the config again; on success it becomes rs->cfg. */
static void reload(running *rs) {
    amp_errs *errs = amp_errs_create();
    amp_config *next = amp_config_load(rs->path, AMP_CONFIG_SECRETS, errs);
    /* The config table says, per key, how a change is taken. */
    const char *changed = NULL;
    amp_json_schema_reload how = next ? amp_config_diff(rs->cfg, next, &changed) : 0;
    const char *fixed = how == AMP_JSON_SCHEMA_RESTART ? changed : NULL;
    const char *delivery = how == AMP_JSON_SCHEMA_RESTART_DELIVERY ? changed : NULL;
    if (!next) {
        for (size_t i = 0; i < amp_errs_count(errs); i++)
            amp_log(AMP_LOG_ERROR, "reload rejected", "{s:s, s:s}", "file", rs->path, "error",
                    amp_errs_get(errs, i));
    } else if (fixed) {
        amp_log(AMP_LOG_ERROR, "reload rejected", "{s:s, s:s, s:s}", "file", rs->path, "changed",
                fixed, "error", "this part of the config only changes with a restart");
        amp_config_destroy(next);
    } else if (!validate_apps(next, "reload")) {
        amp_log(AMP_LOG_ERROR, "reload rejected", "{s:s, s:s}", "file", rs->path, "error",
                "dify.validate is strict and an app does not fit the config");
        amp_config_destroy(next);
    } else if (delivery && !restart_delivery(rs, next, delivery)) {
        amp_config_destroy(next);
    } else {
        amp_handlers_set_config(rs->handlers, next);
        amp_log_set_level(next->log_level);
        rs->retired = amp_xrealloc(rs->retired, (rs->nretired + 1) * sizeof *rs->retired);
        rs->retired[rs->nretired++] = rs->cfg;
        rs->cfg = next;
        amp_log(AMP_LOG_INFO, "config reloaded", "{s:s, s:s?}", "file", rs->path,
                "delivery_restarted", delivery);
    }
    amp_errs_destroy(errs);
}

/* Gauges read from the spool at each scrape. */
static void collect_spool(void *ctx, amp_metrics *m) {
    amp_queue *spool = ctx;
    amp_series_set(amp_metrics_series(m, "amp2dify_spool_pending", NULL),
                   (double)amp_queue_depth(spool));
    int64_t oldest = amp_queue_oldest_pending_ms(spool);
    amp_series_set(amp_metrics_series(m, "amp2dify_spool_oldest_pending_age_seconds", NULL),
                   oldest ? (double)(amp_now_ms() - oldest) / 1e3 : 0);
    amp_series_set(amp_metrics_series(m, "amp2dify_spool_writable", NULL),
                   amp_queue_writable(spool) ? 1 : 0);
    amp_series_set(amp_metrics_series(m, "amp2dify_spool_bytes", NULL),
                   (double)amp_queue_bytes(spool));
    amp_series_set(amp_metrics_series(m, "amp2dify_spool_full", NULL),
                   amp_queue_full(spool) ? 1 : 0);
}

static void sleep_ms(long ms) {
    struct timespec ts = {.tv_sec = ms / 1000, .tv_nsec = (ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

int amp_cmd_serve(int argc, char **argv) {
    const char *cfile;
    if (amp_cmd_config_only(argc, argv, &cfile) != 0)
        return 2;
    running rs = {.cfg = amp_cmd_load_config(cfile, AMP_CONFIG_SECRETS)};
    if (!rs.cfg)
        return 2;
    pthread_mutex_init(&rs.delivery_mu, NULL);
    rs.path = amp_config_default_path(cfile); /* reloaded from here on SIGHUP */
    amp_log_set_level(rs.cfg->log_level);

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
        amp_config_destroy(rs.cfg);
        return 1;
    }

    int rc = 1;
    char err[512] = "";
    amp_http *http = NULL;
    amp_http_admin *admin = NULL;
    rs.metrics = amp_metrics_create();

    if (!validate_apps(rs.cfg, "start")) {
        amp_log(AMP_LOG_ERROR,
                "not starting: dify.validate is strict and an app does not fit "
                "the config",
                "{s:s}", "file", rs.cfg->file);
        rc = 2;
        goto out;
    }
    rs.spool = amp_cmd_open_queue(rs.cfg, AMP_CMD_QUEUE_SERVE, err, sizeof err);
    if (!rs.spool) {
        const char *engine;
        char target[512];
        amp_cmd_queue_target(rs.cfg, &engine, target, sizeof target);
        amp_log(AMP_LOG_ERROR, "queue unavailable", "{s:s, s:s, s:s}", "engine", engine, "target",
                target, "error", err);
        goto out;
    }
    start_delivery(&rs, rs.cfg, err, sizeof err);
    if (!rs.fwd) {
        amp_log(AMP_LOG_ERROR, "forwarder failed to start", "{s:s}", "error", err);
        goto out;
    }
    amp_forward_kick(rs.fwd); /* resume what a previous run left pending */

    if (rs.cfg->sources.export.enabled) {
        /* Polls with the routes of the config it started with (the
         * sources.export keys take a restart). */
        rs.export_cursor = amp_config_export_cursor(rs.cfg, NULL);
        amp_source_export_opts eo = amp_cmd_export_opts(rs.cfg, rs.export_cursor, rs.metrics);
        int64_t start = -1;
        if (rs.cfg->sources.export.start && *rs.cfg->sources.export.start)
            amp_source_export_parse_hour(rs.cfg->sources.export.start, &start);
        rs.exporter = amp_source_export_start(rs.spool, &eo, rs.cfg->sources.export.interval_s,
                                              rs.cfg->sources.export.lag_hours, start);
        if (!rs.exporter) {
            amp_log(AMP_LOG_ERROR, "the export poller failed to start", NULL);
            goto out;
        }
        amp_log(AMP_LOG_INFO, "export poller started", "{s:s, s:s, s:i, s:i}", "base_url",
                rs.cfg->sources.export.base_url, "cursor", rs.export_cursor, "interval_seconds",
                (int)rs.cfg->sources.export.interval_s, "lag_hours",
                (int)rs.cfg->sources.export.lag_hours);
    }

    amp_metrics_set_collector(rs.metrics, collect_spool, rs.spool);
    rs.handlers = amp_handlers_create(rs.cfg, rs.spool, rs.metrics);
    http = amp_http_start(rs.cfg, rs.handlers, err, sizeof err);
    if (!http) {
        amp_log(AMP_LOG_ERROR, "http server failed to start", "{s:s}", "error", err);
        goto out;
    }
    if (rs.cfg->admin.address) {
        admin = amp_http_admin_start(rs.cfg, rs.handlers, &admin_ops, &rs, err, sizeof err);
        if (!admin) {
            amp_log(AMP_LOG_ERROR, "admin API failed to start", "{s:s}", "error", err);
            goto out;
        }
        amp_log(AMP_LOG_INFO, "admin API listening", "{s:s, s:i}", "address", rs.cfg->admin.address,
                "port", (int)amp_http_admin_port(admin));
    }
    if (rs.cfg->auth.scheme == AMP_AUTH_NONE)
        amp_log(AMP_LOG_WARN, "authentication is off: every request is accepted unsigned", "{s:s}",
                "scheme", "none");
    const char *engine;
    char target[512];
    amp_cmd_queue_target(rs.cfg, &engine, target, sizeof target);
    amp_log(AMP_LOG_INFO, "listening", "{s:s, s:s, s:i, s:s, s:s, s:s, s:s, s:I}", "version",
            AMP_VERSION, "address", rs.cfg->listen.address, "port", (int)amp_http_port(http),
            "path", rs.cfg->listen.path, "auth", amp_sig_scheme_name(rs.cfg->auth.scheme), "queue",
            engine, "target", target, "pending", (json_int_t)amp_queue_depth(rs.spool));

    for (;;) {
        int sig = 0;
        if (sigwait(&sigs, &sig) != 0)
            continue;
        if (sig == SIGTERM || sig == SIGINT) {
            amp_log(AMP_LOG_INFO, "shutting down", "{s:s}", "signal", strsignal(sig));
            break;
        }
        if (sig == SIGHUP)
            reload(&rs);
    }

    /* Webhooks begun from now on get 503. Those begun before finish: wait
     * until each has been answered and sent (one may still be reading its
     * body or handing its events to the spool, hence the loop), then give
     * the last answers time to leave. */
    amp_handlers_set_draining(rs.handlers, true);
    /* The poller's batches under way are answered before it returns. */
    amp_source_export_stop(rs.exporter);
    rs.exporter = NULL;
    int64_t drain_end = amp_mono_ms() + drain_max_ms(rs.cfg);
    bool answered;
    /* A flush asked for at the bound still gets FLUSH_GRACE_MS: a request
     * open until then (a body still arriving) must not make a healthy
     * spool look hung. */
    while ((answered = amp_queue_flush_until(rs.spool, drain_end > amp_mono_ms() + FLUSH_GRACE_MS
                                                           ? drain_end
                                                           : amp_mono_ms() + FLUSH_GRACE_MS)) &&
           amp_handlers_open(rs.handlers) > 0 && amp_mono_ms() < drain_end)
        sleep_ms(10);
    int waiting = amp_handlers_suspended(rs.handlers);
    if (answered && waiting == 0 && amp_handlers_open(rs.handlers) > 0)
        /* Still sending their bodies at the bound: their connections are
         * closed without an answer, so their senders retry. */
        amp_log(AMP_LOG_WARN, "requests unfinished at shutdown", "{s:i}", "requests",
                amp_handlers_open(rs.handlers));
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
                (json_int_t)drain_max_ms(rs.cfg));
        _exit(1);
    }
    sleep_ms(DRAIN_GRACE_MS);
    rc = 0;
out:
    amp_http_admin_stop(admin);
    amp_source_export_stop(rs.exporter);
    free(rs.export_cursor);
    amp_http_stop(http);
    stop_delivery(&rs);
    amp_queue_close(rs.spool);
    amp_handlers_destroy(rs.handlers);
    amp_metrics_destroy(rs.metrics);
    curl_global_cleanup();
    if (rc == 0)
        amp_log(AMP_LOG_INFO, "stopped", NULL);
    for (size_t i = 0; i < rs.npaused; i++)
        free(rs.paused[i]);
    free(rs.paused);
    pthread_mutex_destroy(&rs.delivery_mu);
    for (size_t i = 0; i < rs.nretired; i++)
        amp_config_destroy(rs.retired[i]);
    free(rs.retired);
    amp_config_destroy(rs.cfg);
    return rc;
}
