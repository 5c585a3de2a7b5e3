/*
 * Durability acceptance tests (SPEC "Durability", README "Delivery"): the
 * real amp2dify binary, its spool on disk, the in-process fake Dify.
 *
 *   crash_kill9_loses_nothing   four clients post while amp2dify is killed
 *                               with SIGKILL three times and restarted;
 *                               every 202 reaches Dify, duplicates only for
 *                               deliveries in flight at a kill
 *   disk_full_back_pressure     the spool on a full filesystem: 503 with
 *                               Retry-After, /readyz 503, no 202 for
 *                               anything not stored, service returns
 *   spool_limits_back_pressure  spool.max_pending and spool.max_bytes
 *                               reached while Dify is down: the same, and
 *                               the spool recovers once Dify is back
 *   dedupe_*                    inside one request, across requests, after
 *                               a restart; delivered once
 *   dlq_list_replay_purge       `amp2dify dlq` against a running daemon
 *   dlq_is_one_thread_beside_a_busy_daemon
 *                               `dlq list` holds the spool open with one
 *                               thread while the daemon is busy
 *   shutdown_bounded_when_spool_hangs
 *                               SIGTERM while the spool cannot answer: a
 *                               bounded exit 1, no 202 for the waiting
 *                               request
 *
 * Sanitizer builds ($AMP2DIFY_BIN under build/san-...) run the crash test
 * for fewer seconds; $AMP2DIFY_E2E_CRASH_SECONDS and $AMP2DIFY_E2E_SEED
 * override the length and the kill schedule.
 */
#include <check.h>
#include <dirent.h>
#include <errno.h>
#include <sqlite3.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <spawn.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "../../base/alloc.h"
#include "../../base/buf.h"
#include "../../base/clock.h"
#include "../../base/parse.h"
#include "../fake_dify/fake_dify.h"
#include "checked.h"
#include "harness.h"
#include "../check_run.h"

extern char **environ;

#define DELIVERY_TIMEOUT_MS 15000
#define QUIET_MS 1000
#define CRASH_CLIENTS 4
#define CRASH_KILLS 3
/* Events per client at most, whatever the speed: bounds memory and time. */
#define CRASH_MAX_PER_CLIENT 200000
/* How long the load may go on past the run's duration, waiting for the
 * last restarted server's first 202. */
#define CRASH_AFTER_RESTART_MS 30000
/* A duplicate must have been delivered at most this long before a kill:
 * its acknowledgement was still waiting for the committer. */
#define IN_FLIGHT_WINDOW_MS 2000
/* Dify may record a request of the killed process a little after the kill
 * returned (it was still in the socket). */
#define KILL_SLACK_MS 1000
/* Sanity bound on duplicates per kill: the default 16 workers each with one
 * request in flight, plus acknowledgements waiting for one commit. */
#define MAX_DUPLICATES_PER_KILL 64

/* ---- small helpers ------------------------------------------------------- */

static bool sanitized(void) {
    return strstr(h_bin(), "san-") != NULL;
}

static int64_t env_int(const char *name, int64_t min, int64_t max, int64_t dflt) {
    const char *v = getenv(name);
    int64_t n;
    if (v && *v && amp_parse_i64(v, strlen(v), min, max, &n) == 0)
        return n;
    return dflt;
}

static const char *jstr(const json_t *o, const char *key) {
    return json_string_value(json_object_get(o, key));
}

static json_int_t jint(const json_t *o, const char *key) {
    return json_integer_value(json_object_get(o, key));
}

/* Stop with SIGTERM: exit 0 and no sanitizer report in the log. */
static void stop_clean(h_server *srv) {
    char *why = h_server_stop_clean(srv);
    ck_assert_msg(why == NULL, "%s", why);
}

/* The harness's default config with more keys, each a run of `"key":
 * value,` pairs (or ""): top_keys at the top level, spool_keys in "spool".
 * Caller frees. */
static char *default_config_with(const char *top_keys, const char *spool_keys) {
    const char *def = h_default_config(), *spool = "\"spool\": {";
    const char *at = strstr(def, spool);
    ck_assert_ptr_nonnull(at);
    at += strlen(spool);
    return amp_xasprintf("{%s%.*s%s%s", top_keys, (int)(at - def - 1), def + 1, spool_keys, at);
}

static h_server *start_with(fake_dify *fake, const char *config) {
    h_opts o = {.config_json = config, .dify_port = fake_dify_port(fake)};
    h_server *srv = h_server_start(&o);
    ck_assert_msg(srv != NULL, "amp2dify did not start (see its log above)");
    return srv;
}

static void assert_accepted(const h_resp *r, int accepted, int duplicates) {
    ck_assert_msg(r->status == 202, "status %ld, body %s", r->status, r->body);
    json_t *want =
        json_pack("{s:i, s:i, s:i}", "accepted", accepted, "duplicates", duplicates, "filtered", 0);
    ck_assert_msg(r->json && json_equal(r->json, want), "body %s (want accepted %d duplicates %d)",
                  r->body, accepted, duplicates);
    json_decref(want);
}

/* A signed POST of body to the webhook on port, usable from any thread (the
 * harness's h_post_signed reads the server object, which restarts touch). */
static h_resp *post_signed_port(uint16_t port, const char *secret, const char *body,
                                unsigned timeout_ms) {
    int64_t ts = (int64_t)time(NULL);
    char *sig = h_sign(body, strlen(body), ts, secret);
    char *sig_h = amp_xasprintf("X-Amplitude-Sig: %s", sig);
    char *ts_h = amp_xasprintf("X-Amplitude-Timestamp: %lld", (long long)ts);
    const char *headers[] = {ts_h, sig_h, NULL};
    h_req req = {.method = "POST",
                 .path = H_WEBHOOK,
                 .body = body,
                 .headers = headers,
                 .timeout_ms = timeout_ms};
    h_resp *r = h_request_port(port, &req);
    free(sig);
    free(sig_h);
    free(ts_h);
    return r;
}

/* The spool depth the daemon reports (amp2dify_spool_pending), -1 if none. */
static double spool_pending(const h_server *srv) {
    h_resp *r = h_get(srv, "/metrics");
    double v = -1;
    const char *line = r->status == 200 ? strstr(r->body, "\namp2dify_spool_pending ") : NULL;
    if (line) {
        char *end;
        v = strtod(line + strlen("\namp2dify_spool_pending "), &end);
    }
    h_resp_free(r);
    return v;
}

/* Wait until nothing is pending: every acknowledgement committed (the
 * daemon's count drops only when one commits). Not after a `dlq replay`
 * from another process: the daemon's count does not see those rows until
 * its periodic recount. */
static bool wait_drained(const h_server *srv, unsigned timeout_ms) {
    int64_t deadline = h_mono_ms() + timeout_ms;
    do {
        if (spool_pending(srv) == 0)
            return true;
        h_sleep_ms(50);
    } while (h_mono_ms() < deadline);
    return false;
}

static long readyz(const h_server *srv) {
    h_resp *r = h_get(srv, "/readyz");
    long st = r->status;
    h_resp_free(r);
    return st;
}

/* Successful deliveries by trace id: {id: {"n": count, "first_ms": arrival}}.
 * Caller owns. */
static json_t *delivered_by_trace(fake_dify *fake) {
    json_t *reqs = fake_dify_requests(fake), *out = json_object();
    size_t i;
    json_t *r;
    json_array_foreach(reqs, i, r) {
        const char *id = jstr(r, "trace_id");
        if (!json_is_true(json_object_get(r, "delivered")) || !id)
            continue;
        json_t *e = json_object_get(out, id);
        if (!e) {
            e = json_pack("{s:i, s:I}", "n", 0, "first_ms", jint(r, "arrived_ms"));
            json_object_set_new(out, id, e);
        }
        json_object_set_new(e, "n", json_integer(jint(e, "n") + 1));
    }
    json_decref(reqs);
    return out;
}

/* ids (an object used as a set) not in delivered; caller owns. */
static json_t *missing_from(const json_t *ids, const json_t *delivered) {
    json_t *missing = json_array();
    const char *id;
    json_t *v;
    json_object_foreach((json_t *)ids, id, v) {
        if (!json_object_get(delivered, id))
            json_array_append_new(missing, json_string(id));
    }
    return missing;
}

/* Wait until every id of the set has been delivered; returns what is still
 * missing (caller owns) and the final delivered map in *delivered. */
static json_t *wait_all_delivered(fake_dify *fake, const json_t *ids, unsigned timeout_ms,
                                  json_t **delivered) {
    int64_t deadline = h_mono_ms() + timeout_ms;
    for (;;) {
        *delivered = delivered_by_trace(fake);
        json_t *missing = missing_from(ids, *delivered);
        if (json_array_size(missing) == 0 || h_mono_ms() >= deadline)
            return missing;
        json_decref(missing);
        json_decref(*delivered);
        h_sleep_ms(300);
    }
}

static char *dump_head(const json_t *arr, size_t max) {
    json_t *head = json_array();
    for (size_t i = 0; i < json_array_size(arr) && i < max; i++)
        json_array_append(head, json_array_get(arr, i));
    char *s = json_dumps(head, JSON_COMPACT);
    json_decref(head);
    return s ? s : amp_xstrdup("?");
}

/* ---- crash: SIGKILL under load -------------------------------------------- */

typedef struct client {
    pthread_t thread;
    int index;
    uint16_t port;
    const char *secret;
    unsigned run;
    int64_t deadline_ms;  /* monotonic: a bound in case the test stops early */
    atomic_bool *running; /* cleared by the test when the load has run long enough */
    atomic_size_t *accepted_total;
    /* results, read after join */
    json_t *acked;  /* ids answered 202 */
    json_t *failed; /* ids whose POST got no answer, or 503 */
    size_t sent, no_answer, unavailable;
    char *unexpected; /* first answer that is neither 202, 503 nor no answer */
} client;

static void *client_main(void *arg) {
    client *c = arg;
    c->acked = json_object();
    c->failed = json_object();
    for (size_t n = 0;
         n < CRASH_MAX_PER_CLIENT && atomic_load(c->running) && h_mono_ms() < c->deadline_ms; n++) {
        char id[64], user[32];
        snprintf(id, sizeof id, "crash-%u-%d-%zu", c->run, c->index, n);
        snprintf(user, sizeof user, "user-%d-%zu", c->index, n % 40);
        char *ev = h_event("crash_test", user, id);
        h_resp *r = post_signed_port(c->port, c->secret, ev, 5000);
        c->sent++;
        if (r->status == 202 && r->json && jint(r->json, "accepted") == 1 &&
            jint(r->json, "duplicates") == 0) {
            json_object_set_new(c->acked, id, json_true());
            atomic_fetch_add(c->accepted_total, 1);
        } else if (r->status == 0 || r->status == 503) {
            json_object_set_new(c->failed, id, json_true());
            if (r->status == 0)
                c->no_answer++;
            else
                c->unavailable++;
            h_sleep_ms(5); /* the server is down or restarting */
        } else if (!c->unexpected) {
            json_object_set_new(c->failed, id, json_true());
            c->unexpected = amp_xasprintf("%s: status %ld, body %s", id, r->status, r->body);
        }
        h_resp_free(r);
        free(ev);
    }
    return NULL;
}

START_TEST(crash_kill9_loses_nothing) {
    int64_t seconds = env_int("AMP2DIFY_E2E_CRASH_SECONDS", 3, 120, sanitized() ? 8 : 20);
    unsigned seed = (unsigned)env_int("AMP2DIFY_E2E_SEED", 0, UINT32_MAX,
                                      (int64_t)(time(NULL) ^ getpid()) & 0x7fffffff);
    fprintf(stderr, "crash: %lld s, %d clients, %d kills, seed %u (AMP2DIFY_E2E_SEED)\n",
            (long long)seconds, CRASH_CLIENTS, CRASH_KILLS, seed);
    srand(seed);

    fake_dify *fake = fake_dify_start(0, H_API_KEY);
    ck_assert_ptr_nonnull(fake);
    fake_dify_set_fail_rate(fake, 0.30, seed);
    h_server *srv = start_with(fake, NULL);

    /* The kill moments: one in each third of [10%, 90%] of the run, in the
     * first three quarters of its third so restarts never overlap. */
    int64_t dur_ms = seconds * 1000, kill_at[CRASH_KILLS];
    int64_t slot = dur_ms * 8 / 10 / CRASH_KILLS;
    for (int k = 0; k < CRASH_KILLS; k++)
        kill_at[k] = dur_ms / 10 + k * slot + (int64_t)(rand() % (int)(slot * 3 / 4));

    atomic_size_t accepted_total;
    atomic_init(&accepted_total, 0);
    atomic_bool running;
    atomic_init(&running, true);
    int64_t t0 = h_mono_ms();
    client clients[CRASH_CLIENTS];
    memset(clients, 0, sizeof clients);
    for (int i = 0; i < CRASH_CLIENTS; i++) {
        clients[i] = (client){.index = i,
                              .port = h_server_port(srv),
                              .secret = h_server_secret(srv),
                              .run = seed,
                              .deadline_ms = t0 + dur_ms + CRASH_AFTER_RESTART_MS,
                              .running = &running,
                              .accepted_total = &accepted_total};
        ck_assert_int_eq(pthread_create(&clients[i].thread, NULL, client_main, &clients[i]), 0);
    }

    int64_t kill_wall[CRASH_KILLS], killed_wall[CRASH_KILLS];
    size_t accepted_at_kill[CRASH_KILLS + 1];
    for (int k = 0; k < CRASH_KILLS; k++) {
        int64_t wait = t0 + kill_at[k] - h_mono_ms();
        if (wait > 0)
            h_sleep_ms((unsigned)wait);
        accepted_at_kill[k] = atomic_load(&accepted_total);
        kill_wall[k] = amp_now_ms();
        int st = h_server_kill(srv, SIGKILL, 5000);
        ck_assert_msg(WIFSIGNALED(st) && WTERMSIG(st) == SIGKILL, "kill %d: wait status %d", k, st);
        killed_wall[k] = amp_now_ms();
        int64_t down = h_mono_ms();
        ck_assert_msg(h_server_restart(srv) == 0, "restart %d failed; log in %s", k,
                      h_server_dir(srv));
        fprintf(stderr, "crash: kill %d at %.1f s after %zu acknowledged; back in %lld ms\n", k,
                (double)(down - t0) / 1e3, accepted_at_kill[k], (long long)(h_mono_ms() - down));
    }
    /* The load runs for the whole duration and, however long the last
     * restart took on a busy machine, until the restarted server has
     * answered 202 again (or CRASH_AFTER_RESTART_MS have passed). */
    int64_t wait = t0 + dur_ms - h_mono_ms();
    if (wait > 0)
        h_sleep_ms((unsigned)wait);
    for (int64_t end = h_mono_ms() + CRASH_AFTER_RESTART_MS;
         atomic_load(&accepted_total) == accepted_at_kill[CRASH_KILLS - 1] && h_mono_ms() < end;)
        h_sleep_ms(20);
    atomic_store(&running, false);
    for (int i = 0; i < CRASH_CLIENTS; i++)
        pthread_join(clients[i].thread, NULL);
    accepted_at_kill[CRASH_KILLS] = atomic_load(&accepted_total);

    json_t *acked = json_object(), *failed = json_object();
    size_t sent = 0, no_answer = 0, unavailable = 0;
    for (int i = 0; i < CRASH_CLIENTS; i++) {
        client *c = &clients[i];
        ck_assert_msg(c->unexpected == NULL, "client %d: unexpected answer %s", i, c->unexpected);
        json_object_update(acked, c->acked);
        json_object_update(failed, c->failed);
        json_decref(c->acked);
        json_decref(c->failed);
        sent += c->sent;
        no_answer += c->no_answer;
        unavailable += c->unavailable;
    }
    size_t nacked = json_object_size(acked);
    /* The load must have kept going across every restart. */
    for (int k = 0; k < CRASH_KILLS; k++)
        ck_assert_msg(accepted_at_kill[k + 1] > accepted_at_kill[k],
                      "no 202 between kill %d and the next (acknowledged %zu then %zu)", k,
                      accepted_at_kill[k], accepted_at_kill[k + 1]);
    ck_assert_msg(nacked >= 100, "only %zu events acknowledged", nacked);

    /* Every promise kept. */
    json_t *delivered;
    json_t *missing = wait_all_delivered(fake, acked, sanitized() ? 90000 : 45000, &delivered);
    char *miss = dump_head(missing, 10);
    ck_assert_msg(json_array_size(missing) == 0,
                  "%zu of %zu acknowledged events never reached Dify, e.g. %s (log in %s)",
                  json_array_size(missing), nacked, miss, h_server_dir(srv));
    free(miss);
    json_decref(missing);

    /* Nothing invented, and duplicates only for deliveries in flight at a
     * kill: the first copy arrived shortly before some kill, whose process
     * never committed its acknowledgement. */
    size_t dup_events = 0, dup_extra = 0, stored_unanswered = 0, per_kill[CRASH_KILLS] = {0};
    int64_t worst_lead = 0;
    const char *id;
    json_t *d;
    json_object_foreach(delivered, id, d) {
        ck_assert_msg(json_object_get(acked, id) || json_object_get(failed, id),
                      "Dify got %s, which no client sent", id);
        if (!json_object_get(acked, id))
            stored_unanswered++;
        json_int_t n = jint(d, "n");
        if (n < 2)
            continue;
        dup_events++;
        dup_extra += (size_t)(n - 1);
        int64_t first = jint(d, "first_ms"), lead = INT64_MAX;
        int by = -1;
        for (int k = 0; k < CRASH_KILLS; k++)
            if (first <= killed_wall[k] + KILL_SLACK_MS &&
                kill_wall[k] - first <= IN_FLIGHT_WINDOW_MS && kill_wall[k] - first < lead) {
                lead = kill_wall[k] - first;
                by = k;
            }
        ck_assert_msg(by >= 0,
                      "%s was delivered %lld times; its first delivery (at %lld) was not in "
                      "flight at any kill",
                      id, (long long)n, (long long)first);
        per_kill[by]++;
        if (lead > worst_lead)
            worst_lead = lead;
    }
    char per_kill_text[64] = "";
    for (int k = 0; k < CRASH_KILLS; k++) {
        ck_assert_msg(per_kill[k] <= MAX_DUPLICATES_PER_KILL, "%zu duplicates at kill %d",
                      per_kill[k], k);
        size_t used = strlen(per_kill_text);
        snprintf(per_kill_text + used, sizeof per_kill_text - used, "%s%zu", k ? "/" : "",
                 per_kill[k]);
    }

    size_t requests = fake_dify_count(fake), ok = fake_dify_delivered(fake);
    printf("crash: %d kills in %lld s; sent %zu, acknowledged %zu, no answer %zu, 503 %zu; "
           "delivered unique %zu (of which %zu stored without a 202); duplicates %zu events "
           "(%zu extra deliveries; per kill %s; first copy at most %lld ms before its kill); "
           "Dify saw %zu requests, %zu successful, %zu failed\n",
           CRASH_KILLS, (long long)seconds, sent, nacked, no_answer, unavailable,
           json_object_size(delivered), stored_unanswered, dup_events, dup_extra, per_kill_text,
           (long long)worst_lead, requests, ok, requests - ok);
    fflush(stdout);

    json_decref(delivered);
    json_decref(acked);
    json_decref(failed);
    stop_clean(srv);
    fake_dify_stop(fake);
}
END_TEST

/* ---- disk full -------------------------------------------------------------
 * Preferred: the spool lives on a small tmpfs mounted by the tcase's
 * unchecked fixture (in the parent process, so it is unmounted even when the
 * test dies). The harness always puts the spool at DIR/spool.db; a symlink
 * there points into the mount (SQLite resolves it, so the WAL lands there
 * too). "Full" is a filler file up to ENOSPC; "space returns" removes it.
 *
 * Fallback, where mounting is not allowed (no root, a container without
 * CAP_SYS_ADMIN), or with AMP2DIFY_E2E_DISKFULL=rlimit: the daemon's
 * RLIMIT_FSIZE is lowered (prlimit) to the WAL's current size, so the next
 * write that grows it fails with EFBIG (serve ignores SIGXFSZ); raising the
 * limit again is "space returns". */

#define TMPFS_SIZE "4m"

static char tmpfs_dir[64];
static bool tmpfs_mounted;
static int tmpfs_errno;

static void tmpfs_setup(void) {
    snprintf(tmpfs_dir, sizeof tmpfs_dir, "/tmp/amp2dify-full-XXXXXX");
    if (!mkdtemp(tmpfs_dir)) {
        tmpfs_errno = errno;
        tmpfs_dir[0] = '\0';
        return;
    }
    if (mount("tmpfs", tmpfs_dir, "tmpfs", MS_NOSUID | MS_NODEV, "size=" TMPFS_SIZE ",mode=0700") ==
        0)
        tmpfs_mounted = true;
    else
        tmpfs_errno = errno;
}

static void tmpfs_teardown(void) {
    if (tmpfs_mounted && umount2(tmpfs_dir, MNT_DETACH) != 0)
        fprintf(stderr, "disk full: umount %s: %s\n", tmpfs_dir, strerror(errno));
    tmpfs_mounted = false;
    if (tmpfs_dir[0])
        rmdir(tmpfs_dir);
}

/* Fill the filesystem holding dir with dir/filler until ENOSPC; bytes written. */
static size_t fill_disk(const char *path) {
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    ck_assert_msg(fd >= 0, "open %s: %s", path, strerror(errno));
    static char chunk[16384];
    memset(chunk, 'x', sizeof chunk);
    size_t total = 0;
    for (int i = 0; i < 100000; i++) { /* bounded: 1.6 GB */
        ssize_t w = write(fd, chunk, sizeof chunk);
        if (w <= 0)
            break;
        total += (size_t)w;
    }
    /* Then the last bytes, one page at a time. */
    for (int i = 0; i < 64; i++)
        if (write(fd, chunk, 4096) <= 0)
            break;
    ck_assert_int_eq(close(fd), 0);
    return total;
}

/* Fallback "full": the daemon may not grow any file past the WAL's current
 * size. Returns the limit in bytes. */
static size_t limit_file_size(const h_server *srv) {
    char *wal = amp_xasprintf("%s/spool.db-wal", h_server_dir(srv));
    struct stat sb;
    ck_assert_msg(stat(wal, &sb) == 0, "stat %s: %s", wal, strerror(errno));
    free(wal);
    struct rlimit cur;
    ck_assert_int_eq(prlimit(h_server_pid(srv), RLIMIT_FSIZE, NULL, &cur), 0);
    struct rlimit lim = {.rlim_cur = (rlim_t)(sb.st_size > 4096 ? sb.st_size : 4096),
                         .rlim_max = cur.rlim_max};
    ck_assert_msg(prlimit(h_server_pid(srv), RLIMIT_FSIZE, &lim, NULL) == 0, "prlimit: %s",
                  strerror(errno));
    return (size_t)lim.rlim_cur;
}

static void unlimit_file_size(const h_server *srv) {
    struct rlimit cur;
    ck_assert_int_eq(prlimit(h_server_pid(srv), RLIMIT_FSIZE, NULL, &cur), 0);
    cur.rlim_cur = cur.rlim_max;
    ck_assert_msg(prlimit(h_server_pid(srv), RLIMIT_FSIZE, &cur, NULL) == 0, "prlimit: %s",
                  strerror(errno));
}

/* One event of about 2 KB, so a few commits use up any slack. */
static char *big_event(const char *insert_id) {
    char pad[2048];
    memset(pad, 'p', sizeof pad - 1);
    pad[sizeof pad - 1] = '\0';
    json_t *e = json_pack("{s:s, s:s, s:s, s:I, s:{s:s}}", "event_type", "disk_full", "user_id",
                          "user-full", "insert_id", insert_id, "time", (json_int_t)amp_now_ms(),
                          "event_properties", "pad", pad);
    char *s = json_dumps(e, JSON_COMPACT);
    json_decref(e);
    ck_assert_ptr_nonnull(s);
    return s;
}

/* One test's state across the full periods. */
typedef struct full_ctx {
    bool rlimit; /* the fallback instead of the tmpfs */
    fake_dify *fake;
    h_server *srv;
    json_t *acked, *refused; /* ids answered 202 / 503 */
    int seq;
} full_ctx;

/* POST one new big event; 202 ids go to acked, others to refused. */
static long post_next(full_ctx *c, h_resp **keep) {
    char id[64];
    snprintf(id, sizeof id, "full-%d", c->seq++);
    char *ev = big_event(id);
    h_resp *r = h_post_signed(c->srv, ev);
    free(ev);
    long st = r->status;
    if (st == 202) {
        ck_assert_msg(r->json && jint(r->json, "accepted") == 1, "body %s", r->body);
        json_object_set_new(c->acked, id, json_true());
    } else {
        json_object_set_new(c->refused, id, json_true());
    }
    if (keep)
        *keep = r;
    else
        h_resp_free(r);
    return st;
}

/* Fill the disk until webhooks are refused, check the refusal and the
 * readiness, hold the full state for hold_ms, free the space and wait for
 * readiness to come back without any request. With in_flight, a delivery
 * is still waiting for Dify's answer when the disk fills up. */
static void full_period(full_ctx *c, bool in_flight, const char *label) {
    size_t requests_before = fake_dify_count(c->fake);
    if (in_flight) {
        fake_dify_behaviour slow = {.delay_ms = 1500};
        fake_dify_push(c->fake, &slow);
        size_t arrived = fake_dify_arrived(c->fake);
        ck_assert_int_eq(post_next(c, NULL), 202);
        /* Claimed and sent; Dify holds the answer. */
        ck_assert_uint_gt(fake_dify_wait_arrived(c->fake, arrived + 1, 10000), arrived);
    }
    size_t acked_before = json_object_size(c->acked);

    char *filler = amp_xasprintf("%s/filler", tmpfs_dir);
    size_t filled = c->rlimit ? limit_file_size(c->srv) : fill_disk(filler);
    h_resp *first = NULL;
    int64_t deadline = h_mono_ms() + 20000;
    for (int i = 0; i < 2000 && !first && h_mono_ms() < deadline; i++) {
        h_resp *r;
        if (post_next(c, &r) == 202)
            h_resp_free(r);
        else
            first = r;
    }
    size_t acked_while_filling = json_object_size(c->acked) - acked_before;
    ck_assert_msg(first != NULL, "%s: no refusal after %d posts on a full disk", label, c->seq);
    ck_assert_msg(first->status == 503, "%s: status %ld, body %s", label, first->status,
                  first->body);
    ck_assert_str_eq(h_resp_error(first), "unavailable");
    const char *ra = h_resp_header(first, "Retry-After");
    int64_t ra_s;
    ck_assert_msg(ra && amp_parse_i64(ra, strlen(ra), 1, 3600, &ra_s) == 0, "Retry-After: %s", ra);
    h_resp_free(first);
    ck_assert_int_eq(readyz(c->srv), 503);

    /* Still full: more refusals (a 202 would have to be stored: checked at
     * the end), and readiness stays down for as long as it lasts. */
    size_t refused_before = json_object_size(c->refused);
    for (int i = 0; i < 5; i++) {
        long st = post_next(c, NULL);
        ck_assert_msg(st == 202 || st == 503, "%s: status %ld", label, st);
    }
    size_t refused_more = json_object_size(c->refused) - refused_before;
    if (in_flight)
        ck_assert_uint_gt(fake_dify_wait_count(c->fake, requests_before + 1, 5000),
                          requests_before);
    for (int i = 0; i < 10; i++) {
        ck_assert_int_eq(readyz(c->srv), 503);
        h_sleep_ms(100);
    }
    size_t requests_full = fake_dify_count(c->fake) - requests_before;

    /* Space returns: readiness comes back by itself, without new traffic. */
    if (c->rlimit)
        unlimit_file_size(c->srv);
    else
        ck_assert_int_eq(unlink(filler), 0);
    free(filler);
    int64_t freed = h_mono_ms();
    long ready = 0;
    while ((ready = readyz(c->srv)) != 200 && h_mono_ms() - freed < 15000)
        h_sleep_ms(50);
    int64_t recovered_ms = h_mono_ms() - freed;
    ck_assert_msg(ready == 200, "%s: /readyz still %ld %lld ms after space returned", label, ready,
                  (long long)recovered_ms);
    for (int i = 0; i < 3; i++)
        ck_assert_int_eq(post_next(c, NULL), 202);
    printf("disk full (%s): %s %zu KiB; %zu accepted while filling, then 503 with "
           "Retry-After %lld; %zu of 5 more refused; Dify saw %zu requests while full; readyz "
           "200 again %lld ms after space returned\n",
           label, c->rlimit ? "RLIMIT_FSIZE" : "filler", filled / 1024, acked_while_filling,
           (long long)ra_s, refused_more, requests_full, (long long)recovered_ms);
    fflush(stdout);
}

START_TEST(disk_full_back_pressure) {
    const char *mode = getenv("AMP2DIFY_E2E_DISKFULL");
    full_ctx c = {.acked = json_object(), .refused = json_object()};
    c.rlimit = (mode && strcmp(mode, "rlimit") == 0) || !tmpfs_mounted;
    if (c.rlimit && !(mode && strcmp(mode, "rlimit") == 0))
        fprintf(stderr, "disk full: cannot mount a tmpfs on %s (%s); using RLIMIT_FSIZE\n",
                tmpfs_dir, strerror(tmpfs_errno));
    c.fake = fake_dify_start(0, H_API_KEY);
    ck_assert_ptr_nonnull(c.fake);
    c.srv = start_with(c.fake, NULL);

    if (!c.rlimit) {
        /* Move the spool onto the tmpfs: stop, replace the file by a link. */
        int st = h_server_kill(c.srv, SIGTERM, 10000);
        ck_assert_msg(WIFEXITED(st) && WEXITSTATUS(st) == 0, "wait status %d", st);
        char *db = amp_xasprintf("%s/spool.db", h_server_dir(c.srv));
        const char *sfx[] = {"", "-wal", "-shm"};
        for (size_t i = 0; i < 3; i++) {
            char *p = amp_xasprintf("%s%s", db, sfx[i]);
            unlink(p);
            free(p);
        }
        char *target = amp_xasprintf("%s/spool.db", tmpfs_dir);
        ck_assert_msg(symlink(target, db) == 0, "symlink: %s", strerror(errno));
        ck_assert_int_eq(h_server_restart(c.srv), 0);
        struct stat sb;
        ck_assert_msg(stat(target, &sb) == 0, "the spool is not on the tmpfs (%s)", target);
        free(target);
        free(db);
    }

    /* Normal service first. */
    for (int i = 0; i < 5; i++)
        ck_assert_int_eq(post_next(&c, NULL), 202);
    ck_assert_uint_eq(fake_dify_wait_delivered(c.fake, 5, DELIVERY_TIMEOUT_MS), 5);
    ck_assert_msg(wait_drained(c.srv, 10000), "deliveries not acknowledged");

    /* Idle when the disk fills: only a probe can notice that space is back. */
    full_period(&c, false, "idle");
    ck_assert_msg(wait_drained(c.srv, 10000), "deliveries not acknowledged");
    /* A delivery answered while full: its acknowledgement waits for space,
     * and the event must not be sent again meanwhile. */
    full_period(&c, true, "delivery in flight");

    json_t *lines = h_server_log_lines(c.srv, "spool commit failed");
    ck_assert_msg(json_array_size(lines) > 0, "no 'spool commit failed' log line");
    const char *why = jstr(json_array_get(lines, 0), "error");
    ck_assert_msg(why && strstr(why, c.rlimit ? "I/O" : "full"), "the log does not say why: %s",
                  why);
    json_decref(lines);

    /* Every 202 kept, nothing refused delivered, nothing sent twice. */
    json_t *delivered;
    json_t *missing = wait_all_delivered(c.fake, c.acked, DELIVERY_TIMEOUT_MS, &delivered);
    char *miss = dump_head(missing, 10);
    ck_assert_msg(json_array_size(missing) == 0, "acknowledged but never delivered: %s", miss);
    free(miss);
    json_decref(missing);
    ck_assert_msg(wait_drained(c.srv, 10000), "deliveries not acknowledged");
    h_sleep_ms(QUIET_MS);
    json_decref(delivered);
    delivered = delivered_by_trace(c.fake);
    size_t dups = 0;
    const char *key;
    json_t *v;
    json_object_foreach(delivered, key, v) {
        ck_assert_msg(!json_object_get(c.refused, key), "%s was refused with 503, yet delivered",
                      key);
        ck_assert_msg(json_object_get(c.acked, key), "unknown delivery %s", key);
        dups += (size_t)(jint(v, "n") - 1);
    }
    printf("disk full: %zu acknowledged in all, all delivered; %zu refused, none delivered; %zu "
           "duplicate deliveries\n",
           json_object_size(c.acked), json_object_size(c.refused), dups);
    fflush(stdout);
    ck_assert_msg(dups == 0, "%zu duplicate deliveries without any crash", dups);

    /* SIGTERM while full, with an acknowledgement held: the shutdown is
     * bounded, exits 0 and leaks nothing (sanitizer builds check). */
    fake_dify_behaviour slow = {.delay_ms = 1000};
    fake_dify_push(c.fake, &slow);
    size_t before = fake_dify_count(c.fake);
    ck_assert_int_eq(post_next(&c, NULL), 202);
    h_sleep_ms(200);
    char *filler = amp_xasprintf("%s/filler", tmpfs_dir);
    if (c.rlimit)
        limit_file_size(c.srv);
    else
        fill_disk(filler);
    free(filler);
    ck_assert_uint_gt(fake_dify_wait_count(c.fake, before + 1, 5000), before);
    h_sleep_ms(300);
    int64_t t0 = h_mono_ms();
    stop_clean(c.srv);
    printf("disk full: SIGTERM while full with an acknowledgement held: exit 0 in %lld ms\n",
           (long long)(h_mono_ms() - t0));

    json_decref(delivered);
    json_decref(c.acked);
    json_decref(c.refused);
    fake_dify_stop(c.fake);
}
END_TEST

/* ---- spool limits ------------------------------------------------------------ */

/* Dify is down, so everything stored stays pending until the limit is
 * reached: then 503 `unavailable` with Retry-After naming the limit, the
 * same on /readyz, a log line and the gauge. Dify comes back: the spool
 * drains (and, for the size, prunes what it delivered) and takes events
 * again by itself. Every 202 is delivered, no refused event is. */
static void limit_reached_then_recovers(const char *label, const char *spool_keys, size_t pad,
                                        const char *reason) {
    char *config = default_config_with("", spool_keys);
    h_opts o = {.config_json = config}; /* nothing listens on the Dify port yet */
    /* The default route's query carries the event type: a long one makes
     * a row of about pad bytes. */
    char *type = amp_xmalloc(pad + 1);
    memset(type, 't', pad);
    type[pad] = '\0';
    h_server *srv = h_server_start(&o);
    ck_assert_msg(srv != NULL, "amp2dify did not start (see its log above)");
    ck_assert_int_eq(readyz(srv), 200);
    json_t *acked = json_object(), *refused = json_object();

    h_resp *first = NULL;
    int n = 0;
    int64_t deadline = h_mono_ms() + 30000;
    while (!first && n < 2000 && h_mono_ms() < deadline) {
        char id[64];
        snprintf(id, sizeof id, "%s-%d", label, n++);
        char *ev = h_event(type, "user-limit", id);
        h_resp *r = h_post_signed(srv, ev);
        free(ev);
        if (r->status == 202) {
            json_object_set_new(acked, id, json_true());
            h_resp_free(r);
        } else {
            json_object_set_new(refused, id, json_true());
            first = r;
        }
    }
    ck_assert_msg(first != NULL, "%s: no refusal after %d events", label, n);
    ck_assert_msg(first->status == 503, "%s: status %ld, body %s", label, first->status,
                  first->body);
    ck_assert_str_eq(h_resp_error(first), "unavailable");
    ck_assert_str_eq(jstr(first->json, "detail"), reason);
    ck_assert_ptr_nonnull(h_resp_header(first, "Retry-After"));
    h_resp_free(first);
    h_resp *rz = h_get(srv, "/readyz");
    ck_assert_int_eq(rz->status, 503);
    ck_assert_str_eq(jstr(rz->json, "detail"), reason);
    h_resp_free(rz);
    ck_assert(h_metric(srv, "amp2dify_spool_full") == 1);
    json_t *lines = h_server_log_lines(srv, "spool full: new events get 503");
    ck_assert_uint_eq(json_array_size(lines), 1);
    ck_assert_str_eq(jstr(json_array_get(lines, 0), "reason"), reason);
    json_decref(lines);
    size_t nacked = json_object_size(acked);

    /* Dify comes back: ready again without any new event. */
    fake_dify *fake = fake_dify_start(h_server_dify_port(srv), H_API_KEY);
    ck_assert_ptr_nonnull(fake);
    int64_t back = h_mono_ms();
    long ready;
    while ((ready = readyz(srv)) != 200 && h_mono_ms() - back < 20000)
        h_sleep_ms(50);
    int64_t recovered_ms = h_mono_ms() - back;
    ck_assert_msg(ready == 200, "%s: /readyz still %ld after %lld ms", label, ready,
                  (long long)recovered_ms);
    ck_assert(h_metric(srv, "amp2dify_spool_full") == 0);
    ck_assert_msg(h_server_log_wait(srv, "spool takes new events again", 1000), "no log line");
    char id[64];
    snprintf(id, sizeof id, "%s-after", label);
    char *ev = h_event(type, "user-limit", id);
    h_resp *r = h_post_signed(srv, ev);
    free(ev);
    ck_assert_msg(r->status == 202, "%s: status %ld after recovery", label, r->status);
    h_resp_free(r);
    json_object_set_new(acked, id, json_true());

    json_t *delivered;
    json_t *missing = wait_all_delivered(fake, acked, DELIVERY_TIMEOUT_MS, &delivered);
    char *miss = dump_head(missing, 10);
    ck_assert_msg(json_array_size(missing) == 0, "%s: acknowledged, never delivered: %s", label,
                  miss);
    free(miss);
    json_decref(missing);
    const char *key;
    json_t *v;
    json_object_foreach(refused, key, v)
        ck_assert_msg(!json_object_get(delivered, key), "%s was refused, yet delivered", key);
    printf("spool limit (%s): %zu events of ~%zu bytes accepted, then 503 \"%s\"; ready again "
           "%lld ms after Dify returned; all %zu delivered, the refused one not\n",
           label, nacked, pad, reason, (long long)recovered_ms, json_object_size(acked));
    fflush(stdout);
    json_decref(delivered);
    json_decref(acked);
    json_decref(refused);
    stop_clean(srv);
    fake_dify_stop(fake);
    free(type);
    free(config);
}

START_TEST(spool_limits_back_pressure) {
    limit_reached_then_recovers("depth", "\"max_pending\": 20, ", 100,
                                "the spool holds spool.max_pending events");
    /* 1 MiB, the smallest limit, in rows of about 8 KiB. */
    limit_reached_then_recovers("size", "\"max_bytes\": 1048576, ", 8192,
                                "the spool reached spool.max_bytes");
}
END_TEST

/* ---- dedupe ------------------------------------------------------------------ */

/* An event keyed by key_name (insert_id, $insert_id or uuid); key may be NULL
 * for an event without any key. Caller owns. */
static json_t *keyed_event(const char *key_name, const char *key, const char *user) {
    json_t *e = json_pack("{s:s, s:s, s:I}", "event_type", "dedupe_test", "user_id", user, "time",
                          (json_int_t)amp_now_ms());
    ck_assert_ptr_nonnull(e);
    if (key)
        json_object_set_new(e, key_name, json_string(key));
    return e;
}

static h_resp *post_events(h_server *srv, json_t *events) {
    char *body = json_dumps(events, JSON_COMPACT);
    ck_assert_ptr_nonnull(body);
    h_resp *r = h_post_signed(srv, body);
    free(body);
    json_decref(events);
    return r;
}

START_TEST(dedupe_within_across_and_after_restart) {
    fake_dify *fake = fake_dify_start(0, H_API_KEY);
    ck_assert_ptr_nonnull(fake);
    h_server *srv = start_with(fake, NULL);

    /* One request: A twice, B by $insert_id, C by uuid, and one event with no key. */
    h_resp *r =
        post_events(srv, json_pack("[o, o, o, o, o]", keyed_event("insert_id", "dd-A", "user-1"),
                                   keyed_event("insert_id", "dd-A", "user-1"),
                                   keyed_event("$insert_id", "dd-B", "user-2"),
                                   keyed_event("uuid", "dd-C", "user-3"),
                                   keyed_event("insert_id", NULL, "user-4")));
    assert_accepted(r, 4, 1);
    h_resp_free(r);

    /* Across requests, under each spelling. */
    r = post_events(srv, json_pack("[o]", keyed_event("insert_id", "dd-A", "user-1")));
    assert_accepted(r, 0, 1);
    h_resp_free(r);
    r = post_events(srv, json_pack("[o, o]", keyed_event("$insert_id", "dd-B", "user-2"),
                                   keyed_event("insert_id", "dd-D", "user-5")));
    assert_accepted(r, 1, 1);
    h_resp_free(r);
    /* An event without a key is never a duplicate. */
    r = post_events(srv, json_pack("[o]", keyed_event("insert_id", NULL, "user-4")));
    assert_accepted(r, 1, 0);
    h_resp_free(r);

    ck_assert_uint_eq(fake_dify_wait_delivered(fake, 6, DELIVERY_TIMEOUT_MS), 6);
    ck_assert_msg(wait_drained(srv, 10000), "deliveries not acknowledged");

    /* After a crash the keys are still there. */
    int st = h_server_kill(srv, SIGKILL, 5000);
    ck_assert_msg(WIFSIGNALED(st), "wait status %d", st);
    ck_assert_int_eq(h_server_restart(srv), 0);
    r = post_events(srv, json_pack("[o, o, o, o]", keyed_event("insert_id", "dd-A", "user-1"),
                                   keyed_event("uuid", "dd-C", "user-3"),
                                   keyed_event("$insert_id", "dd-D", "user-5"),
                                   keyed_event("insert_id", "dd-E", "user-6")));
    assert_accepted(r, 1, 3);
    h_resp_free(r);

    ck_assert_uint_eq(fake_dify_wait_delivered(fake, 7, DELIVERY_TIMEOUT_MS), 7);
    h_sleep_ms(QUIET_MS);
    ck_assert_uint_eq(fake_dify_delivered(fake), 7);
    json_t *reqs = fake_dify_requests(fake);
    json_t *seen = json_object();
    size_t no_key = 0, i;
    json_t *q;
    json_array_foreach(reqs, i, q) {
        const char *id = jstr(q, "trace_id");
        if (!id) {
            no_key++;
            continue;
        }
        ck_assert_msg(!json_object_get(seen, id), "%s delivered twice", id);
        json_object_set_new(seen, id, json_true());
    }
    const char *want[] = {"dd-A", "dd-B", "dd-C", "dd-D", "dd-E"};
    for (size_t k = 0; k < 5; k++)
        ck_assert_msg(json_object_get(seen, want[k]), "%s never delivered", want[k]);
    ck_assert_uint_eq(no_key, 2);
    json_decref(seen);
    json_decref(reqs);

    stop_clean(srv);
    fake_dify_stop(fake);
}
END_TEST

/* ---- dlq ----------------------------------------------------------------------- */

typedef struct cli_out {
    int status; /* wait status */
    char *out;  /* stdout; caller frees */
    char *err;  /* stderr */
} cli_out;

static char *slurp(const char *path) {
    FILE *fp = fopen(path, "rb");
    amp_buf b;
    amp_buf_init(&b, (size_t)16 * 1024 * 1024);
    if (fp) {
        char chunk[4096];
        size_t n;
        while ((n = fread(chunk, 1, sizeof chunk, fp)) > 0)
            amp_buf_append(&b, chunk, n);
        fclose(fp);
    }
    return b.data ? b.data : amp_xstrdup("");
}

/* Start `amp2dify dlq ARGS... -c DIR/amp2dify.json` beside the daemon, its
 * stdout on out_fd when it is not -1, else in out_path. The environment is
 * ours without the variables that would point it elsewhere. */
static pid_t spawn_dlq(const h_server *srv, const char *const *args, int out_fd,
                       const char *out_path, const char *err_path) {
    const char *bin = h_bin();
    char *config = amp_xasprintf("%s/amp2dify.json", h_server_dir(srv));
    const char *argv[32];
    size_t n = 0;
    argv[n++] = bin;
    argv[n++] = "dlq";
    for (const char *const *a = args; *a && n < 28; a++)
        argv[n++] = *a;
    argv[n++] = "-c";
    argv[n++] = config;
    argv[n] = NULL;

    size_t nenv = 0;
    for (char **e = environ; *e; e++)
        nenv++;
    char **env = amp_xcalloc(nenv + 1, sizeof *env);
    size_t k = 0;
    for (char **e = environ; *e; e++)
        if (strncmp(*e, "AMP2DIFY_SPOOL=", 15) != 0 && strncmp(*e, "AMP2DIFY_CONFIG=", 16) != 0)
            env[k++] = *e;

    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_addopen(&fa, STDIN_FILENO, "/dev/null", O_RDONLY, 0);
    if (out_fd >= 0)
        posix_spawn_file_actions_adddup2(&fa, out_fd, STDOUT_FILENO);
    else
        posix_spawn_file_actions_addopen(&fa, STDOUT_FILENO, out_path, O_WRONLY | O_CREAT | O_TRUNC,
                                         0600);
    posix_spawn_file_actions_addopen(&fa, STDERR_FILENO, err_path, O_WRONLY | O_CREAT | O_TRUNC,
                                     0600);
    pid_t pid;
    int rc = posix_spawn(&pid, bin, &fa, NULL, (char *const *)argv, env);
    posix_spawn_file_actions_destroy(&fa);
    free(env);
    free(config);
    ck_assert_msg(rc == 0, "posix_spawn %s: %s", bin, strerror(rc));
    return pid;
}

/* Run `amp2dify dlq ARGS... -c DIR/amp2dify.json` beside the daemon. */
static cli_out run_dlq(const h_server *srv, const char *const *args) {
    char *out_path = amp_xasprintf("%s/cli.out", h_server_dir(srv));
    char *err_path = amp_xasprintf("%s/cli.err", h_server_dir(srv));
    pid_t pid = spawn_dlq(srv, args, -1, out_path, err_path);

    cli_out o = {.status = -1};
    int64_t deadline = h_mono_ms() + 20000;
    for (;;) {
        pid_t w = waitpid(pid, &o.status, WNOHANG);
        if (w == pid)
            break;
        if (h_mono_ms() > deadline) {
            kill(pid, SIGKILL);
            waitpid(pid, &o.status, 0);
            ck_abort_msg("amp2dify dlq did not finish within 20 s");
        }
        h_sleep_ms(10);
    }
    o.out = slurp(out_path);
    o.err = slurp(err_path);
    ck_assert_msg(!strstr(o.err, "Sanitizer") && !strstr(o.err, "runtime error:"),
                  "sanitizer report from amp2dify dlq:\n%s", o.err);
    free(out_path);
    free(err_path);
    return o;
}

static void cli_free(cli_out *o) {
    free(o->out);
    free(o->err);
}

static bool cli_ok(const cli_out *o) {
    return WIFEXITED(o->status) && WEXITSTATUS(o->status) == 0;
}

/* `dlq list --json` with extra filters: one JSON object per line. */
static json_t *dlq_list(const h_server *srv, const char *const *filters) {
    const char *args[24] = {"list", "--json"};
    size_t n = 2;
    for (const char *const *f = filters; f && *f && n < 22; f++)
        args[n++] = *f;
    args[n] = NULL;
    cli_out o = run_dlq(srv, args);
    ck_assert_msg(cli_ok(&o), "dlq list failed (status %d): %s", o.status, o.err);
    json_t *rows = json_array();
    for (char *line = o.out, *nl; *line; line = nl + 1) {
        nl = strchr(line, '\n');
        ck_assert_msg(nl != NULL, "unterminated line in: %s", o.out);
        json_error_t je;
        json_t *row = json_loadb(line, (size_t)(nl - line), 0, &je);
        ck_assert_msg(row != NULL, "not JSON: %.*s", (int)(nl - line), line);
        json_array_append_new(rows, row);
    }
    cli_free(&o);
    return rows;
}

/* Wait until `dlq list` shows n rows. */
static json_t *wait_dead(const h_server *srv, size_t n) {
    int64_t deadline = h_mono_ms() + DELIVERY_TIMEOUT_MS;
    for (;;) {
        json_t *rows = dlq_list(srv, NULL);
        if (json_array_size(rows) >= n || h_mono_ms() > deadline)
            return rows;
        json_decref(rows);
        h_sleep_ms(100);
    }
}

/* Dify's answer to a request it will never take: a dead letter after one
 * attempt. */
static const fake_dify_behaviour dead_400 = {
    .status = 400, .code = "invalid_param", .message = "query is required and must be a string"};

static size_t count_rows(const h_server *srv, const char *const *filters) {
    json_t *rows = dlq_list(srv, filters);
    size_t n = json_array_size(rows);
    json_decref(rows);
    return n;
}

START_TEST(dlq_list_replay_purge) {
    fake_dify *fake = fake_dify_start(0, H_API_KEY);
    ck_assert_ptr_nonnull(fake);
    h_server *srv = start_with(fake, NULL);

    /* A permanent 400 makes a dead letter after one attempt. */
    fake_dify_push(fake, &dead_400);
    char *ev = h_event("dlq_test", "user-dlq", "dlq-1");
    h_resp *r = h_post_signed(srv, ev);
    assert_accepted(r, 1, 0);
    h_resp_free(r);
    free(ev);

    json_t *rows = wait_dead(srv, 1);
    ck_assert_uint_eq(json_array_size(rows), 1);
    json_t *row = json_array_get(rows, 0);
    ck_assert_int_eq(jint(row, "status"), 400);
    ck_assert_str_eq(jstr(row, "code"), "invalid_param");
    ck_assert_str_eq(jstr(row, "message"), "query is required and must be a string");
    ck_assert_str_eq(jstr(row, "route"), "all");
    ck_assert_str_eq(jstr(row, "app"), "support");
    ck_assert_str_eq(jstr(row, "dedupe_key"), "dlq-1");
    ck_assert_int_eq(jint(row, "attempts"), 1);
    json_int_t dead_id = jint(row, "id");
    json_decref(rows);
    ck_assert_uint_eq(fake_dify_count(fake), 1);
    ck_assert_uint_eq(fake_dify_delivered(fake), 0);

    /* Filters. */
    ck_assert_uint_eq(count_rows(srv, (const char *[]){"--status", "400", NULL}), 1);
    ck_assert_uint_eq(count_rows(srv, (const char *[]){"--status", "404", NULL}), 0);
    ck_assert_uint_eq(count_rows(srv, (const char *[]){"--code", "invalid_param", NULL}), 1);
    ck_assert_uint_eq(count_rows(srv, (const char *[]){"--code", "other", NULL}), 0);
    ck_assert_uint_eq(count_rows(srv, (const char *[]){"--route", "all", "--app", "support", NULL}),
                      1);
    ck_assert_uint_eq(count_rows(srv, (const char *[]){"--app", "nope", NULL}), 0);
    ck_assert_uint_eq(count_rows(srv, (const char *[]){"--since", "2000-01-01T00:00:00Z", NULL}),
                      1);
    ck_assert_uint_eq(count_rows(srv, (const char *[]){"--until", "2000-01-01T00:00:00Z", NULL}),
                      0);

    /* The table. */
    cli_out o = run_dlq(srv, (const char *[]){"list", NULL});
    ck_assert_msg(cli_ok(&o), "dlq list: %s", o.err);
    ck_assert_msg(strstr(o.out, "ID") && strstr(o.out, "invalid_param") && strstr(o.out, "400"),
                  "table: %s", o.out);
    cli_free(&o);

    /* --all with a filter is ambiguous: a usage error, nothing touched. */
    o = run_dlq(srv, (const char *[]){"purge", "--all", "--app", "support", NULL});
    ck_assert_msg(WIFEXITED(o.status) && WEXITSTATUS(o.status) == 2, "status %d", o.status);
    ck_assert_msg(strstr(o.err, "--all takes no IDs or filters"), "stderr: %s", o.err);
    cli_free(&o);
    /* A filter that matches nothing touches nothing. */
    o = run_dlq(srv, (const char *[]){"purge", "--app", "nope", NULL});
    ck_assert_msg(cli_ok(&o) && strstr(o.out, "purged 0 dead letters"), "purge said: %s", o.out);
    cli_free(&o);
    ck_assert_uint_eq(count_rows(srv, NULL), 1);

    /* Dify is fixed (the script is empty): replay by id delivers it. */
    char idarg[32];
    snprintf(idarg, sizeof idarg, "%lld", (long long)dead_id);
    o = run_dlq(srv, (const char *[]){"replay", idarg, NULL});
    ck_assert_msg(cli_ok(&o), "dlq replay: %s", o.err);
    ck_assert_msg(strstr(o.out, "replayed 1 dead letter"), "replay said: %s", o.out);
    cli_free(&o);
    ck_assert_uint_eq(fake_dify_wait_delivered(fake, 1, DELIVERY_TIMEOUT_MS), 1);
    json_t *reqs = fake_dify_requests(fake);
    ck_assert_uint_eq(json_array_size(reqs), 2);
    ck_assert_str_eq(jstr(json_array_get(reqs, 1), "trace_id"), "dlq-1");
    json_decref(reqs);
    ck_assert_uint_eq(count_rows(srv, NULL), 0);

    /* A second dead letter, purged: gone for good. */
    fake_dify_push(fake, &dead_400);
    ev = h_event("dlq_test", "user-dlq", "dlq-2");
    r = h_post_signed(srv, ev);
    assert_accepted(r, 1, 0);
    h_resp_free(r);
    free(ev);
    rows = wait_dead(srv, 1);
    ck_assert_uint_eq(json_array_size(rows), 1);
    ck_assert_str_eq(jstr(json_array_get(rows, 0), "dedupe_key"), "dlq-2");
    json_decref(rows);
    o = run_dlq(srv, (const char *[]){"purge", NULL}); /* no filter: all of them */
    ck_assert_msg(cli_ok(&o), "dlq purge: %s", o.err);
    ck_assert_msg(strstr(o.out, "purged 1 dead letter"), "purge said: %s", o.out);
    cli_free(&o);
    ck_assert_uint_eq(count_rows(srv, NULL), 0);
    o = run_dlq(srv, (const char *[]){"replay", "--all", NULL});
    ck_assert_msg(cli_ok(&o), "dlq replay --all: %s", o.err);
    ck_assert_msg(strstr(o.out, "replayed 0 dead letters"), "replay said: %s", o.out);
    cli_free(&o);
    h_sleep_ms(QUIET_MS + 1000); /* the dispatcher rescans at least every second */
    ck_assert_uint_eq(fake_dify_count(fake), 3);
    ck_assert_uint_eq(fake_dify_delivered(fake), 1);

    stop_clean(srv);
    fake_dify_stop(fake);
}
END_TEST

/* Threads of process pid (entries of /proc/<pid>/task); -1 once it is gone. */
static int task_count(pid_t pid) {
    char path[64];
    snprintf(path, sizeof path, "/proc/%d/task", (int)pid);
    DIR *d = opendir(path);
    if (!d)
        return -1;
    int n = 0;
    for (struct dirent *e; (e = readdir(d));)
        n += e->d_name[0] != '.';
    closedir(d);
    return n;
}

/* Posts one event after another until told to stop. */
typedef struct busy_poster {
    uint16_t port;
    const char *secret;
    atomic_bool stop;
    atomic_int accepted;
} busy_poster;

static void *busy_post_main(void *arg) {
    busy_poster *p = arg;
    for (unsigned i = 0; !atomic_load(&p->stop); i++) {
        char key[32], user[32];
        snprintf(key, sizeof key, "busy-%u", i);
        snprintf(user, sizeof user, "busy-user-%u", i % 8);
        char *ev = h_event("busy", user, key);
        h_resp *r = post_signed_port(p->port, p->secret, ev, 5000);
        if (r && r->status == 202)
            atomic_fetch_add(&p->accepted, 1);
        h_resp_free(r);
        free(ev);
    }
    return NULL;
}

/* `dlq` opens the spool without the daemon's threads: sampled while it
 * holds the spool open beside a daemon that is taking and delivering
 * events, the process has exactly one thread. Its listing (more than a
 * pipe holds) goes into a pipe nobody reads for a while, so the command
 * waits in the middle of its work with the spool open. */
START_TEST(dlq_is_one_thread_beside_a_busy_daemon) {
    enum { DEAD = 400, PER_POST = 50, HOLD_MS = 1500 };
    fake_dify *fake = fake_dify_start(0, H_API_KEY);
    ck_assert_ptr_nonnull(fake);
    h_server *srv = start_with(fake, NULL);
    fake_dify_push_n(fake, &dead_400, DEAD);
    for (int b = 0; b < DEAD / PER_POST; b++) {
        amp_buf body;
        amp_buf_init(&body, (size_t)1 << 20);
        amp_buf_append(&body, "[", 1);
        for (int i = 0; i < PER_POST; i++) {
            char key[32], user[32];
            snprintf(key, sizeof key, "dead-%d", b * PER_POST + i);
            snprintf(user, sizeof user, "dead-user-%d", i);
            char *ev = h_event("dlq_threads", user, key);
            if (i)
                amp_buf_append(&body, ",", 1);
            amp_buf_append(&body, ev, strlen(ev));
            free(ev);
        }
        amp_buf_append(&body, "]", 2); /* with the terminating NUL */
        h_resp *r = h_post_signed(srv, body.data);
        assert_accepted(r, PER_POST, 0);
        h_resp_free(r);
        amp_buf_free(&body);
    }
    json_t *rows = wait_dead(srv, DEAD);
    ck_assert_uint_eq(json_array_size(rows), DEAD);
    json_decref(rows);

    /* Busy: events arrive and are delivered (the script is empty: 200). */
    busy_poster p = {.port = h_server_port(srv), .secret = h_server_secret(srv)};
    atomic_init(&p.stop, false);
    atomic_init(&p.accepted, 0);
    pthread_t poster;
    ck_assert_int_eq(pthread_create(&poster, NULL, busy_post_main, &p), 0);
    int64_t deadline = h_mono_ms() + 10000;
    while (atomic_load(&p.accepted) < 5 && h_mono_ms() < deadline)
        h_sleep_ms(10);
    ck_assert_int_ge(atomic_load(&p.accepted), 5);
    size_t delivered_before = fake_dify_delivered(fake);
    int accepted_before = atomic_load(&p.accepted);

    int fds[2];
    ck_assert_int_eq(pipe2(fds, O_CLOEXEC), 0);
    char *err_path = amp_xasprintf("%s/cli.err", h_server_dir(srv));
    pid_t pid = spawn_dlq(srv, (const char *[]){"list", "--json", NULL}, fds[1], NULL, err_path);
    close(fds[1]);
    int samples = 0, lo = 1 << 30, hi = 0;
    int64_t hold_end = h_mono_ms() + HOLD_MS;
    while (h_mono_ms() < hold_end) {
        int n = task_count(pid);
        if (n > 0) {
            samples++;
            lo = n < lo ? n : lo;
            hi = n > hi ? n : hi;
        }
        h_sleep_ms(2);
    }
    int status, daemon_threads = task_count(h_server_pid(srv));
    bool held = waitpid(pid, &status, WNOHANG) == 0; /* still in its listing */
    int accepted_meanwhile = atomic_load(&p.accepted) - accepted_before;
    size_t delivered_meanwhile = fake_dify_delivered(fake) - delivered_before;

    amp_buf out;
    amp_buf_init(&out, (size_t)64 << 20);
    char chunk[65536];
    ssize_t got;
    while ((got = read(fds[0], chunk, sizeof chunk)) > 0)
        amp_buf_append(&out, chunk, (size_t)got);
    close(fds[0]);
    if (held)
        ck_assert_int_eq(waitpid(pid, &status, 0), pid);
    char *err = slurp(err_path);
    free(err_path);
    atomic_store(&p.stop, true);
    pthread_join(poster, NULL);

    fprintf(stderr,
            "dlq list beside a busy daemon: %d samples of /proc/%d/task over %d ms, threads "
            "min %d max %d (daemon: %d threads); %d events accepted and %zu delivered "
            "meanwhile; %zu bytes listed\n",
            samples, (int)pid, HOLD_MS, lo, hi, daemon_threads, accepted_meanwhile,
            delivered_meanwhile, out.len);
    ck_assert_msg(WIFEXITED(status) && WEXITSTATUS(status) == 0, "dlq list: %s", err);
    size_t lines = 0;
    for (size_t i = 0; i < out.len; i++)
        lines += out.data[i] == '\n';
    ck_assert_uint_eq(lines, DEAD);
    ck_assert_msg(held, "dlq list finished before the samples were taken");
    ck_assert_int_ge(samples, 100);
    ck_assert_int_eq(lo, 1);
    ck_assert_int_eq(hi, 1);
    ck_assert_int_gt(daemon_threads, 1);
    ck_assert_int_gt(accepted_meanwhile, 0);
    ck_assert_uint_gt(delivered_meanwhile, 0);
    free(err);
    amp_buf_free(&out);
    stop_clean(srv);
    fake_dify_stop(fake);
}
END_TEST

/* ---- a spool that stops answering ------------------------------------------ */

typedef struct waiting_post {
    uint16_t port;
    const char *secret;
    h_resp *resp;         /* read after the join */
    atomic_bool answered; /* read while the thread runs */
} waiting_post;

static void *post_one(void *arg) {
    waiting_post *p = arg;
    char *ev = h_event("hung_spool", "user-hung", "hung-1");
    char *body = amp_xasprintf("[%s]", ev);
    p->resp = post_signed_port(p->port, p->secret, body, 20000);
    atomic_store(&p->answered, true);
    free(body);
    free(ev);
    return NULL;
}

/* SIGTERM while a request waits for a spool that does not answer (another
 * process holds its lock, as a hung disk would hold the committer): the
 * server must not stop the HTTP side under a connection the spool still
 * has to resume, nor wait for the spool forever. It leaves after the drain
 * time with exit 1, says why, and the waiting request never got a 202; sent
 * again after a restart, it is stored as new. */
START_TEST(shutdown_bounded_when_spool_hangs) {
    fake_dify *fake = fake_dify_start(0, H_API_KEY);
    ck_assert_ptr_nonnull(fake);
    /* The default config, with a 1 s drain (a quarter of the shutdown
     * timeout) and a commit that waits for the lock as long as it is held. */
    char *text =
        default_config_with("\"shutdown_timeout_seconds\": 4,", "\"lock_timeout_ms\": 600000, ");
    h_server *srv = start_with(fake, text);
    free(text);

    h_resp *r = post_events(srv, json_pack("[o]", keyed_event("insert_id", "hung-0", "user-hung")));
    assert_accepted(r, 1, 0);
    h_resp_free(r);
    /* Delivered and acknowledged, so that the lock below holds no
     * acknowledgement back (one lost at the exit would be sent again). */
    ck_assert_uint_eq(fake_dify_wait_delivered(fake, 1, DELIVERY_TIMEOUT_MS), 1);
    ck_assert_msg(wait_drained(srv, 10000), "the delivery was not acknowledged");

    char *db_path = amp_xasprintf("%s/spool.db", h_server_dir(srv));
    sqlite3 *db;
    ck_assert_int_eq(sqlite3_open(db_path, &db), SQLITE_OK);
    sqlite3_busy_timeout(db, 10000);
    ck_assert_int_eq(sqlite3_exec(db, "BEGIN IMMEDIATE", NULL, NULL, NULL), SQLITE_OK);

    waiting_post p = {.port = h_server_port(srv), .secret = h_server_secret(srv)};
    atomic_init(&p.answered, false);
    pthread_t t;
    ck_assert_int_eq(pthread_create(&t, NULL, post_one, &p), 0);
    h_sleep_ms(500);
    ck_assert_msg(!atomic_load(&p.answered), "the request was answered while the spool was locked");

    int64_t t0 = h_mono_ms();
    int st = h_server_kill(srv, SIGTERM, 15000);
    int64_t took = h_mono_ms() - t0;
    pthread_join(t, NULL);
    ck_assert_msg(WIFEXITED(st) && WEXITSTATUS(st) == 1, "wait status %d after %lld ms", st,
                  (long long)took);
    ck_assert_msg(took >= 900 && took < 8000, "exited %lld ms after SIGTERM", (long long)took);
    ck_assert_msg(p.resp->status != 202, "the waiting request got a 202: %s", p.resp->body);
    json_t *lines =
        h_server_log_lines(srv, "the spool did not answer in time; exiting without waiting");
    ck_assert_uint_eq(json_array_size(lines), 1);
    ck_assert_int_eq(jint(json_array_get(lines, 0), "requests_waiting"), 1);
    json_decref(lines);
    printf("hung spool: SIGTERM with 1 request waiting: exit 1 after %lld ms, the client got "
           "status %ld\n",
           (long long)took, p.resp->status);
    fflush(stdout);
    h_resp_free(p.resp);

    ck_assert_int_eq(sqlite3_exec(db, "ROLLBACK", NULL, NULL, NULL), SQLITE_OK);
    sqlite3_close(db);
    free(db_path);

    ck_assert_int_eq(h_server_restart(srv), 0);
    r = post_events(srv, json_pack("[o]", keyed_event("insert_id", "hung-1", "user-hung")));
    assert_accepted(r, 1, 0);
    h_resp_free(r);
    ck_assert_uint_ge(fake_dify_wait_delivered(fake, 2, DELIVERY_TIMEOUT_MS), 2);
    h_sleep_ms(QUIET_MS);
    ck_assert_uint_eq(fake_dify_delivered(fake), 2); /* each event once */
    stop_clean(srv);
    fake_dify_stop(fake);
}
END_TEST

static Suite *suite(void) {
    Suite *s = suite_create("durability");
    TCase *tc = tcase_create("crash");
    /* 20 s of load (fewer under sanitizers), then the drain. */
    tcase_set_timeout(tc, 240);
    tcase_add_test(tc, crash_kill9_loses_nothing);
    suite_add_tcase(s, tc);

    tc = tcase_create("disk_full");
    tcase_add_unchecked_fixture(tc, tmpfs_setup, tmpfs_teardown);
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, disk_full_back_pressure);
    suite_add_tcase(s, tc);

    tc = tcase_create("limits");
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, spool_limits_back_pressure);
    suite_add_tcase(s, tc);

    tc = tcase_create("dedupe_dlq");
    tcase_set_timeout(tc, 90);
    tcase_add_test(tc, dedupe_within_across_and_after_restart);
    tcase_add_test(tc, dlq_list_replay_purge);
    tcase_add_test(tc, dlq_is_one_thread_beside_a_busy_daemon);
    suite_add_tcase(s, tc);

    tc = tcase_create("hung_spool");
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, shutdown_bounded_when_spool_hangs);
    suite_add_tcase(s, tc);
    return s;
}

int main(void) {
    return amp_check_run(suite());
}
