#include "harness.h"

#include <arpa/inet.h>
#include <curl/curl.h>
#include <errno.h>
#include <fcntl.h>
#include <dirent.h>
#include <ftw.h>
#include <limits.h>
#include <netinet/in.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "../../base/alloc.h"
#include "../../base/buf.h"
#include "../../base/clock.h"

extern char **environ;

#define H_MAX_LIVE 16
#define H_MAX_HEADERS 32
#define H_START_ATTEMPTS 3

struct h_server {
    char *bin;
    char *dir;
    char *config_path;
    char *log_path;
    char *config_template;
    const char *const *extra_env; /* borrowed from opts: tests pass literals */
    const char *const *extra_args;
    char *secret;
    char *api_key;
    uint16_t port;
    uint16_t dify_port;
    unsigned ready_timeout_ms;
    pid_t pid; /* 0 when not running */
};

/* Servers not yet stopped: reported and killed if the test exits early. */
static h_server *live[H_MAX_LIVE];

/* ---- small helpers ---------------------------------------------------------- */

int h_nice(int pid) {
    errno = 0;
    int v = getpriority(PRIO_PROCESS, (id_t)pid);
    return v == -1 && errno != 0 ? INT_MIN : v;
}

/* Niceness of each of pid's threads named name, in out[] (at most cap);
 * returns how many threads have that name. */
static size_t thread_nices(int pid, const char *name, int *out, size_t cap) {
    char dir[64];
    snprintf(dir, sizeof dir, "/proc/%d/task", pid);
    DIR *d = opendir(dir);
    if (!d)
        return 0;
    size_t n = 0, namelen = strlen(name);
    for (struct dirent *e; (e = readdir(d));) {
        if (e->d_name[0] == '.')
            continue;
        char path[400], stat[1024];
        snprintf(path, sizeof path, "%s/%s/stat", dir, e->d_name);
        FILE *in = fopen(path, "r");
        if (!in)
            continue; /* the thread ended meanwhile */
        size_t len = fread(stat, 1, sizeof stat - 1, in);
        fclose(in);
        stat[len] = '\0';
        /* "tid (comm) state ..."; nice is the 19th field, the 17th after ')'. */
        char *open = strchr(stat, '('), *close = strrchr(stat, ')');
        if (!open || !close || close < open || (size_t)(close - open - 1) != namelen ||
            strncmp(open + 1, name, namelen) != 0)
            continue;
        char *f = close + 1;
        for (int i = 0; i < 16 && f; i++)
            f = strchr(f + 1, ' ');
        if (!f)
            continue;
        if (n < cap)
            out[n] = atoi(f + 1);
        n++;
    }
    closedir(d);
    return n;
}

bool h_wait_nice(int pid, const char *name, size_t count, int want, char *why, size_t whylen) {
    enum { CAP = 64 };
    int v[CAP];
    size_t n = 0, bad = 0;
    for (int64_t end = h_mono_ms() + 5000;; h_sleep_ms(10)) {
        n = thread_nices(pid, name, v, CAP);
        bool counted = n > 0 && n <= CAP && (count == 0 || n == count);
        for (bad = 0; counted && bad < n && v[bad] == want; bad++)
            ;
        if (counted && bad == n)
            return true;
        if (!counted && count)
            snprintf(why, whylen, "%zu threads named %s, expected %zu", n, name, count);
        else if (!counted)
            snprintf(why, whylen, "%zu threads named %s, expected 1 to %d", n, name, (int)CAP);
        else
            snprintf(why, whylen, "%s thread %zu: nice %d, expected %d", name, bad, v[bad], want);
        if (h_mono_ms() > end)
            return false;
    }
}

void h_sleep_ms(unsigned ms) {
    struct timespec ts = {.tv_sec = ms / 1000, .tv_nsec = (long)(ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
    }
}

int64_t h_mono_ms(void) {
    return amp_mono_ms();
}

static char *read_file(const char *path) {
    FILE *fp = fopen(path, "rb");
    if (!fp)
        return amp_xstrdup("");
    amp_buf b;
    amp_buf_init(&b, (size_t)256 * 1024 * 1024);
    char chunk[8192];
    size_t n;
    while ((n = fread(chunk, 1, sizeof(chunk), fp)) > 0)
        if (amp_buf_append(&b, chunk, n) != 0)
            break;
    fclose(fp);
    return b.data ? b.data : amp_xstrdup("");
}

static int write_file(const char *path, const char *text) {
    FILE *fp = fopen(path, "wb");
    if (!fp)
        return -1;
    size_t len = strlen(text);
    int ok = fwrite(text, 1, len, fp) == len;
    return (fclose(fp) == 0 && ok) ? 0 : -1;
}

/* Replace every occurrence of token in s; caller owns. */
static char *replace_all(const char *s, const char *token, const char *value) {
    amp_buf b;
    amp_buf_init(&b, SIZE_MAX / 2);
    size_t tl = strlen(token);
    for (const char *p = s, *hit; *p; p = hit + tl) {
        hit = strstr(p, token);
        if (!hit) {
            amp_buf_append(&b, p, strlen(p));
            break;
        }
        amp_buf_append(&b, p, (size_t)(hit - p));
        amp_buf_append(&b, value, strlen(value));
    }
    return b.data ? b.data : amp_xstrdup("");
}

static int rm_entry(const char *path, const struct stat *st, int flag, struct FTW *ftw) {
    (void)st;
    (void)flag;
    (void)ftw;
    remove(path);
    return 0;
}

static void remove_tree(const char *dir) {
    nftw(dir, rm_entry, 16, FTW_DEPTH | FTW_PHYS);
}

static void print_log_tail(const h_server *s, size_t max_lines) {
    char *log = read_file(s->log_path);
    size_t len = strlen(log), lines = 0;
    const char *start = log;
    for (size_t i = len; i > 0; i--) {
        if (log[i - 1] == '\n' && i != len && ++lines >= max_lines) {
            start = log + i;
            break;
        }
    }
    fprintf(stderr, "---- %s (last %zu lines) ----\n%s---- end of log ----\n", s->log_path,
            max_lines, start);
    free(log);
}

/* ---- ports -------------------------------------------------------------------- */

int h_connect(uint16_t port, unsigned timeout_ms) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -1;
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons(port)};
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    struct timeval tv = {.tv_sec = timeout_ms / 1000, .tv_usec = (timeout_ms % 1000) * 1000};
    if (setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv) != 0 ||
        connect(fd, (struct sockaddr *)&sa, sizeof sa) != 0) {
        close(fd);
        return -1;
    }
    return fd;
}

int h_send_all(int fd, const char *data, size_t len) {
    while (len > 0) {
        ssize_t n = send(fd, data, len, MSG_NOSIGNAL);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return -1;
        data += n;
        len -= (size_t)n;
    }
    return 0;
}

char *h_recv_all(int fd) {
    amp_buf b;
    amp_buf_init(&b, (size_t)1024 * 1024);
    char chunk[4096];
    ssize_t n;
    while ((n = recv(fd, chunk, sizeof chunk, 0)) > 0 || (n < 0 && errno == EINTR))
        if (n > 0 && amp_buf_append(&b, chunk, (size_t)n) != 0)
            break;
    return b.data ? b.data : amp_xstrdup("");
}

char *h_recv_head(int fd) {
    char buf[4096];
    size_t n = 0;
    while (n + 1 < sizeof buf) {
        ssize_t got = recv(fd, buf + n, 1, 0); /* a byte at a time: stop at the head's end */
        if (got < 0 && errno == EINTR)
            continue;
        if (got <= 0)
            break;
        n++;
        if (n >= 4 && memcmp(buf + n - 4, "\r\n\r\n", 4) == 0)
            break;
    }
    return amp_xstrndup(buf, n);
}

const char *h_bin(void) {
    const char *bin = getenv("AMP2DIFY_BIN");
    return bin && *bin ? bin : "build/amp2dify";
}

uint16_t h_free_port(void) {
    static uint16_t given[256];
    static size_t ngiven;
    for (int attempt = 0; attempt < 50; attempt++) {
        int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (fd < 0)
            return 0;
        struct sockaddr_in sa;
        memset(&sa, 0, sizeof(sa));
        sa.sin_family = AF_INET;
        sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        socklen_t sl = sizeof(sa);
        uint16_t port = 0;
        if (bind(fd, (struct sockaddr *)&sa, sizeof(sa)) == 0 &&
            getsockname(fd, (struct sockaddr *)&sa, &sl) == 0)
            port = ntohs(sa.sin_port);
        close(fd);
        if (!port)
            return 0;
        bool seen = false;
        for (size_t i = 0; i < ngiven && i < 256; i++)
            seen |= given[i] == port;
        if (seen)
            continue;
        given[ngiven++ % 256] = port;
        return port;
    }
    return 0;
}

/* ---- child process ------------------------------------------------------------ */

static void live_add(h_server *s) {
    for (int i = 0; i < H_MAX_LIVE; i++)
        if (!live[i]) {
            live[i] = s;
            return;
        }
}

static void live_remove(h_server *s) {
    for (int i = 0; i < H_MAX_LIVE; i++)
        if (live[i] == s)
            live[i] = NULL;
}

/* A test that exits while its server runs has failed (or forgot to stop):
 * keep the evidence and do not leave the process behind. */
static void at_exit(void) {
    for (int i = 0; i < H_MAX_LIVE; i++) {
        h_server *s = live[i];
        if (!s)
            continue;
        fprintf(stderr, "harness: test ended with amp2dify (pid %d) running; kept %s\n",
                (int)s->pid, s->dir);
        print_log_tail(s, 40);
        if (s->pid > 0) {
            kill(s->pid, SIGKILL);
            waitpid(s->pid, NULL, 0);
        }
        live[i] = NULL;
    }
}

static bool env_name_is(const char *entry, const char *name) {
    size_t n = strlen(name);
    return strncmp(entry, name, n) == 0 && (entry[n] == '=' || entry[n] == '\0');
}

static bool overridden(const h_server *s, const char *entry) {
    static const char *const ours[] = {
        "AMP2DIFY_SECRETS",  "AMP2DIFY_SECRETS_FILE", "DIFY_BASE_URL",   "DIFY_API_KEY",
        "DIFY_API_KEY_FILE", "AMP2DIFY_SPOOL",        "AMP2DIFY_LISTEN", "AMP2DIFY_CONFIG"};
    for (size_t i = 0; i < sizeof(ours) / sizeof(ours[0]); i++)
        if (env_name_is(entry, ours[i]))
            return true;
    for (const char *const *e = s->extra_env; e && *e; e++) {
        const char *eq = strchr(*e, '=');
        size_t n = eq ? (size_t)(eq - *e) : strlen(*e);
        if (strncmp(entry, *e, n) == 0 && entry[n] == '=')
            return true;
    }
    return false;
}

/* envp for the child, built before fork: after fork only async-signal-safe
 * calls are allowed, and the fake Dify's threads may hold malloc's lock. */
static char **build_env(const h_server *s) {
    size_t n = 0, cap = 16;
    for (char **e = environ; *e; e++)
        cap++;
    for (const char *const *e = s->extra_env; e && *e; e++)
        cap++;
    char **env = amp_xcalloc(cap, sizeof(char *));
    for (char **e = environ; *e; e++)
        if (!overridden(s, *e))
            env[n++] = amp_xstrdup(*e);
    env[n++] = amp_xasprintf("AMP2DIFY_SECRETS=%s", s->secret);
    env[n++] = amp_xasprintf("DIFY_BASE_URL=http://127.0.0.1:%u/v1", s->dify_port);
    env[n++] = amp_xasprintf("DIFY_API_KEY=%s", s->api_key);
    env[n++] = amp_xasprintf("AMP2DIFY_SPOOL=%s/spool.db", s->dir);
    env[n++] = amp_xasprintf("AMP2DIFY_LISTEN=127.0.0.1:%u", s->port);
    for (const char *const *e = s->extra_env; e && *e; e++)
        if (strchr(*e, '='))
            env[n++] = amp_xstrdup(*e);
    env[n] = NULL;
    return env;
}

static void free_strv(char **v) {
    if (!v)
        return;
    for (char **p = v; *p; p++)
        free(*p);
    free(v);
}

static int write_config(h_server *s) {
    char port[16], dport[16];
    snprintf(port, sizeof(port), "%u", s->port);
    snprintf(dport, sizeof(dport), "%u", s->dify_port);
    char *a = replace_all(s->config_template, "@PORT@", port);
    char *b = replace_all(a, "@DIFY_PORT@", dport);
    char *c = replace_all(b, "@DIR@", s->dir);
    int rc = write_file(s->config_path, c);
    free(a);
    free(b);
    free(c);
    return rc;
}

static int spawn(h_server *s) {
    char **env = build_env(s);
    size_t nargs = 0;
    for (const char *const *a = s->extra_args; a && *a; a++)
        nargs++;
    char **argv = amp_xcalloc(nargs + 5, sizeof(char *));
    argv[0] = s->bin;
    argv[1] = "serve";
    argv[2] = "-c";
    argv[3] = s->config_path;
    for (size_t i = 0; i < nargs; i++)
        argv[4 + i] = (char *)s->extra_args[i];

    int logfd = open(s->log_path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600);
    if (logfd < 0) {
        fprintf(stderr, "harness: cannot open %s: %s\n", s->log_path, strerror(errno));
        free(argv);
        free_strv(env);
        return -1;
    }
    pid_t parent = getpid();
    pid_t pid = fork();
    if (pid == 0) {
        /* Die with the test process, even when Check kills it on a timeout. */
        prctl(PR_SET_PDEATHSIG, SIGKILL);
        if (getppid() != parent)
            _exit(127);
        dup2(logfd, STDOUT_FILENO);
        dup2(logfd, STDERR_FILENO);
        int devnull = open("/dev/null", O_RDONLY);
        if (devnull >= 0)
            dup2(devnull, STDIN_FILENO);
        /* No test sockets (fake Dify, curl) may leak into the server. */
        close_range(3, ~0U, 0);
        sigset_t none;
        sigemptyset(&none);
        sigprocmask(SIG_SETMASK, &none, NULL);
        execve(s->bin, argv, env);
        static const char msg[] = "harness: exec of the amp2dify binary failed\n";
        ssize_t w = write(STDERR_FILENO, msg, sizeof(msg) - 1);
        (void)w;
        _exit(127);
    }
    close(logfd);
    free(argv);
    free_strv(env);
    if (pid < 0) {
        fprintf(stderr, "harness: fork: %s\n", strerror(errno));
        return -1;
    }
    s->pid = pid;
    return 0;
}

/* Returns the wait status once the child exited, -1 while it runs. */
static int reap(h_server *s, bool block) {
    if (s->pid <= 0)
        return -1;
    int status;
    pid_t r;
    do {
        r = waitpid(s->pid, &status, block ? 0 : WNOHANG);
    } while (r < 0 && errno == EINTR);
    if (r == s->pid) {
        s->pid = 0;
        return status;
    }
    return -1;
}

/* 0 when /healthz answered 200; 1 when the child exited first; -1 on timeout. */
static int wait_ready(h_server *s) {
    int64_t deadline = h_mono_ms() + s->ready_timeout_ms;
    while (h_mono_ms() < deadline) {
        if (reap(s, false) != -1)
            return 1;
        h_req req = {.method = "GET", .path = "/healthz", .timeout_ms = 1000};
        h_resp *r = h_request(s, &req);
        long st = r->status;
        h_resp_free(r);
        if (st == 200)
            return 0;
        h_sleep_ms(50);
    }
    return -1;
}

static bool log_says_port_busy(const h_server *s) {
    char *log = read_file(s->log_path);
    bool busy = strstr(log, "in use") || strstr(log, "EADDRINUSE");
    free(log);
    return busy;
}

static void server_free(h_server *s) {
    free(s->bin);
    free(s->dir);
    free(s->config_path);
    free(s->log_path);
    free(s->config_template);
    free(s->secret);
    free(s->api_key);
    free(s);
}

/* ---- server lifecycle ------------------------------------------------------- */

const char *h_default_config(void) {
    return "{\n"
           "  \"listen\": {\"address\": \"127.0.0.1\", \"port\": @PORT@,\n"
           "             \"path\": \"/webhooks/amplitude\"},\n"
           "  \"spool\": {\"path\": \"@DIR@/spool.db\"},\n"
           "  \"dify\": {\"base_url\": \"http://127.0.0.1:@DIFY_PORT@/v1\", "
           "\"timeout_seconds\": 10,\n"
           "           \"retry\": {\"initial_ms\": 50, \"max_ms\": 200}},\n"
           "  \"apps\": {\"support\": {\"api_key_env\": \"DIFY_API_KEY\", "
           "\"endpoint\": \"chat\"}},\n"
           "  \"routes\": [{\"name\": \"all\", \"app\": \"support\",\n"
           "              \"query\": \"{{event_type}} by {{user_id}}\",\n"
           "              \"user\": \"{{user_id}}\"}]\n"
           "}\n";
}

h_server *h_server_start(const h_opts *opts) {
    static bool registered;
    if (!registered) {
        atexit(at_exit);
        registered = true;
    }
    h_opts none;
    memset(&none, 0, sizeof(none));
    if (!opts)
        opts = &none;

    h_server *s = amp_xcalloc(1, sizeof(h_server));
    s->bin = amp_xstrdup(h_bin());
    char tmpl[] = "/tmp/amp2dify-e2e-XXXXXX";
    if (!mkdtemp(tmpl)) {
        fprintf(stderr, "harness: mkdtemp: %s\n", strerror(errno));
        server_free(s);
        return NULL;
    }
    s->dir = amp_xstrdup(tmpl);
    s->config_path = amp_xasprintf("%s/amp2dify.json", s->dir);
    s->log_path = amp_xasprintf("%s/server.log", s->dir);
    s->config_template = amp_xstrdup(opts->config_json ? opts->config_json : h_default_config());
    s->extra_env = opts->env;
    s->extra_args = opts->args;
    s->secret = amp_xstrdup(opts->secret ? opts->secret : H_SECRET);
    s->api_key = amp_xstrdup(opts->api_key ? opts->api_key : H_API_KEY);
    s->dify_port = opts->dify_port ? opts->dify_port : h_free_port();
    s->ready_timeout_ms = opts->ready_timeout_ms ? opts->ready_timeout_ms : 10000;
    if (access(s->bin, X_OK) != 0) {
        fprintf(stderr, "harness: %s is not executable (set AMP2DIFY_BIN)\n", s->bin);
        remove_tree(s->dir);
        server_free(s);
        return NULL;
    }

    for (int attempt = 0; attempt < H_START_ATTEMPTS; attempt++) {
        s->port = h_free_port();
        if (!s->port || write_config(s) != 0 || spawn(s) != 0)
            break;
        live_add(s);
        if (opts->no_wait)
            return s;
        int rc = wait_ready(s);
        if (rc == 0) {
            /* A failed assertion ends the test with _exit: this line is what
             * points at the log it leaves behind. */
            fprintf(stderr, "harness: amp2dify pid %d on 127.0.0.1:%u, log %s\n", (int)s->pid,
                    s->port, s->log_path);
            return s;
        }
        if (rc == 1 && log_says_port_busy(s) && attempt + 1 < H_START_ATTEMPTS) {
            live_remove(s);
            continue; /* someone took the port between probe and bind */
        }
        fprintf(stderr, "harness: amp2dify %s\n",
                rc == 1 ? "exited during start-up" : "did not answer /healthz in time");
        print_log_tail(s, 60);
        if (s->pid > 0) {
            kill(s->pid, SIGKILL);
            reap(s, true);
        }
        break;
    }
    live_remove(s);
    fprintf(stderr, "harness: kept %s\n", s->dir);
    server_free(s);
    return NULL;
}

int h_server_wait_exit(h_server *s, unsigned timeout_ms) {
    int64_t deadline = h_mono_ms() + timeout_ms;
    for (;;) {
        int st = reap(s, false);
        if (st != -1 || s->pid <= 0)
            return st;
        if (h_mono_ms() >= deadline)
            return -1;
        h_sleep_ms(10);
    }
}

int h_server_kill(h_server *s, int sig, unsigned timeout_ms) {
    if (!s || s->pid <= 0)
        return -1;
    kill(s->pid, sig);
    int st = h_server_wait_exit(s, timeout_ms ? timeout_ms : 15000);
    if (st == -1 && s->pid > 0) {
        fprintf(stderr, "harness: amp2dify ignored signal %d; killing it\n", sig);
        kill(s->pid, SIGKILL);
        st = reap(s, true);
    }
    return st;
}

int h_server_restart(h_server *s) {
    if (s->pid > 0)
        h_server_kill(s, SIGKILL, 0);
    FILE *fp = fopen(s->log_path, "a");
    if (fp) {
        fputs("harness: ---- restart ----\n", fp);
        fclose(fp);
    }
    if (spawn(s) != 0)
        return -1;
    int rc = wait_ready(s);
    if (rc != 0) {
        fprintf(stderr, "harness: amp2dify %s after restart\n",
                rc == 1 ? "exited" : "did not answer /healthz in time");
        print_log_tail(s, 60);
        return -1;
    }
    return 0;
}

int h_server_stop(h_server *s) {
    if (!s)
        return -1;
    int st = s->pid > 0 ? h_server_kill(s, SIGTERM, 15000) : -1;
    live_remove(s);
    const char *keep = getenv("AMP2DIFY_E2E_KEEP");
    if (keep && *keep && strcmp(keep, "0") != 0)
        fprintf(stderr, "harness: kept %s\n", s->dir);
    else
        remove_tree(s->dir);
    server_free(s);
    return st;
}

char *h_server_stop_clean(h_server *s) {
    int st = h_server_running(s) ? h_server_kill(s, SIGTERM, 15000) : 0;
    char *report = h_server_sanitizer_report(s);
    char *why = NULL;
    if (report)
        why = amp_xasprintf("sanitizer report in %s/server.log:\n%s", s->dir, report);
    else if (!WIFEXITED(st) || WEXITSTATUS(st) != 0)
        why = amp_xasprintf("amp2dify did not exit 0 on SIGTERM (wait status %d); log in "
                            "%s/server.log",
                            st, s->dir);
    free(report);
    if (!why)
        h_server_stop(s);
    return why;
}

bool h_server_running(h_server *s) {
    reap(s, false);
    return s->pid > 0;
}

uint16_t h_server_port(const h_server *s) {
    return s->port;
}

uint16_t h_server_dify_port(const h_server *s) {
    return s->dify_port;
}

const char *h_server_dir(const h_server *s) {
    return s->dir;
}

const char *h_server_secret(const h_server *s) {
    return s->secret;
}

int h_server_pid(const h_server *s) {
    return (int)s->pid;
}

char *h_server_log(const h_server *s) {
    return read_file(s->log_path);
}

bool h_server_log_wait(const h_server *s, const char *needle, unsigned timeout_ms) {
    int64_t deadline = h_mono_ms() + timeout_ms;
    for (;;) {
        char *log = read_file(s->log_path);
        bool found = strstr(log, needle) != NULL;
        free(log);
        if (found)
            return true;
        if (h_mono_ms() >= deadline)
            return false;
        h_sleep_ms(20);
    }
}

char *h_server_sanitizer_report(const h_server *s) {
    static const char *const marks[] = {"ERROR: AddressSanitizer", "ERROR: LeakSanitizer",
                                        "runtime error:", "WARNING: ThreadSanitizer"};
    char *log = read_file(s->log_path);
    const char *first = NULL;
    for (size_t i = 0; i < sizeof(marks) / sizeof(marks[0]); i++) {
        const char *hit = strstr(log, marks[i]);
        if (hit && (!first || hit < first))
            first = hit;
    }
    char *out = first ? amp_xstrndup(first, strnlen(first, 2000)) : NULL;
    free(log);
    return out;
}

json_t *h_server_log_lines(const h_server *s, const char *msg) {
    json_t *out = json_array();
    char *log = read_file(s->log_path);
    for (char *line = log, *nl; line && *line; line = nl ? nl + 1 : NULL) {
        nl = strchr(line, '\n');
        size_t len = nl ? (size_t)(nl - line) : strlen(line);
        json_t *o = json_loadb(line, len, 0, NULL);
        const char *m = json_string_value(json_object_get(o, "msg"));
        if (m && (!msg || strcmp(m, msg) == 0))
            json_array_append(out, o);
        json_decref(o);
    }
    free(log);
    return out;
}

/* ---- HTTP ---------------------------------------------------------------------- */

static pthread_once_t curl_once = PTHREAD_ONCE_INIT;

static void curl_init(void) {
    if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK)
        abort();
}

typedef struct collect {
    amp_buf body;
    h_resp *resp;
} collect;

static size_t on_body(char *p, size_t size, size_t n, void *ud) {
    collect *c = ud;
    c->resp->pieces++;
    return amp_buf_append(&c->body, p, size * n) == 0 ? size * n : 0;
}

static size_t on_header(char *p, size_t size, size_t n, void *ud) {
    collect *c = ud;
    h_resp *r = c->resp;
    size_t len = size * n;
    if (len >= 5 && strncmp(p, "HTTP/", 5) == 0) {
        /* A new response (after 100 Continue, say): forget the old headers. */
        for (size_t i = 0; i < r->nheaders; i++)
            free(r->headers[i]);
        r->nheaders = 0;
        return len;
    }
    while (len && (p[len - 1] == '\n' || p[len - 1] == '\r'))
        len--;
    if (len && r->nheaders < H_MAX_HEADERS) {
        r->headers = amp_xrealloc(r->headers, (r->nheaders + 1) * sizeof(char *));
        r->headers[r->nheaders++] = amp_xstrndup(p, len);
    }
    return size * n;
}

typedef struct upload {
    const char *p;
    size_t left;
} upload;

static size_t on_read(char *buf, size_t size, size_t n, void *ud) {
    upload *u = ud;
    size_t k = size * n < u->left ? size * n : u->left;
    /* Small pieces, so a chunked body really arrives in many chunks. */
    if (k > 16384)
        k = 16384;
    memcpy(buf, u->p, k);
    u->p += k;
    u->left -= k;
    return k;
}

static bool has_header(const char *const *headers, const char *name) {
    size_t n = strlen(name);
    for (const char *const *h = headers; h && *h; h++)
        if (strncasecmp(*h, name, n) == 0 && (*h)[n] == ':')
            return true;
    return false;
}

h_resp *h_request(const h_server *s, const h_req *req) {
    return h_request_port(s->port, req);
}

h_resp *h_request_port(uint16_t port, const h_req *req) {
    pthread_once(&curl_once, curl_init);
    h_resp *r = amp_xcalloc(1, sizeof(h_resp));
    collect c = {.resp = r};
    amp_buf_init(&c.body, (size_t)64 * 1024 * 1024);

    CURL *h = curl_easy_init();
    if (!h)
        abort();
    char *url = amp_xasprintf("http://127.0.0.1:%u%s", port, req->path);
    size_t blen = req->body ? (req->body_len ? req->body_len : strlen(req->body)) : 0;
    const char *method = req->method ? req->method : req->body ? "POST" : "GET";
    upload up = {.p = req->body, .left = blen};

    struct curl_slist *hdrs = NULL;
    for (const char *const *x = req->headers; x && *x; x++)
        hdrs = curl_slist_append(hdrs, *x);
    if (req->body && !has_header(req->headers, "Content-Type"))
        hdrs = curl_slist_append(hdrs, "Content-Type: application/json");
    if (req->chunked)
        hdrs = curl_slist_append(hdrs, "Transfer-Encoding: chunked");

    curl_easy_setopt(h, CURLOPT_URL, url);
    curl_easy_setopt(h, CURLOPT_NOPROXY, "*");
    curl_easy_setopt(h, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(h, CURLOPT_CONNECTTIMEOUT_MS, 2000L);
    curl_easy_setopt(h, CURLOPT_TIMEOUT_MS, (long)(req->timeout_ms ? req->timeout_ms : 10000));
    curl_easy_setopt(h, CURLOPT_WRITEFUNCTION, on_body);
    curl_easy_setopt(h, CURLOPT_WRITEDATA, &c);
    curl_easy_setopt(h, CURLOPT_HEADERFUNCTION, on_header);
    curl_easy_setopt(h, CURLOPT_HEADERDATA, &c);
    curl_easy_setopt(h, CURLOPT_HTTPHEADER, hdrs);
    if (strcmp(method, "GET") == 0 && !req->body) {
        curl_easy_setopt(h, CURLOPT_HTTPGET, 1L);
    } else if (strcmp(method, "HEAD") == 0) {
        curl_easy_setopt(h, CURLOPT_NOBODY, 1L);
    } else {
        curl_easy_setopt(h, CURLOPT_POST, 1L);
        if (strcmp(method, "POST") != 0)
            curl_easy_setopt(h, CURLOPT_CUSTOMREQUEST, method);
        if (req->chunked) {
            curl_easy_setopt(h, CURLOPT_READFUNCTION, on_read);
            curl_easy_setopt(h, CURLOPT_READDATA, &up);
        } else {
            curl_easy_setopt(h, CURLOPT_POSTFIELDS, req->body ? req->body : "");
            curl_easy_setopt(h, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)blen);
        }
    }

    CURLcode rc = curl_easy_perform(h);
    if (rc != CURLE_OK)
        r->error = curl_easy_strerror(rc);
    /* A server may answer (413, say) and close before the upload ends;
     * curl then reports a send error, yet the status did arrive. */
    curl_easy_getinfo(h, CURLINFO_RESPONSE_CODE, &r->status);
    curl_easy_cleanup(h);
    curl_slist_free_all(hdrs);
    free(url);

    r->body = c.body.data ? c.body.data : amp_xstrdup("");
    r->len = c.body.len;
    r->json = json_loadb(r->body, r->len, 0, NULL);
    return r;
}

h_resp *h_get(const h_server *s, const char *path) {
    h_req req = {.method = "GET", .path = path};
    return h_request(s, &req);
}

h_resp *h_post(const h_server *s, const char *path, const char *body, ...) {
    const char *headers[H_MAX_HEADERS + 1];
    size_t n = 0;
    va_list ap;
    va_start(ap, body);
    for (const char *x; (x = va_arg(ap, const char *)) != NULL && n < H_MAX_HEADERS;)
        headers[n++] = x;
    va_end(ap);
    headers[n] = NULL;
    h_req req = {.method = "POST", .path = path, .body = body, .headers = headers};
    return h_request(s, &req);
}

h_resp *h_post_signed_at(const h_server *s, const char *body, int64_t ts, const char *secret) {
    char *sig = h_sign(body, strlen(body), ts, secret);
    char *sig_h = amp_xasprintf("X-Amplitude-Sig: %s", sig);
    char *ts_h = amp_xasprintf("X-Amplitude-Timestamp: %lld", (long long)ts);
    h_resp *r = h_post(s, H_WEBHOOK, body, ts_h, sig_h, "Content-Type: application/json",
                       (const char *)NULL);
    free(sig);
    free(sig_h);
    free(ts_h);
    return r;
}

h_resp *h_post_signed(const h_server *s, const char *body) {
    return h_post_signed_at(s, body, (int64_t)time(NULL), s->secret);
}

void h_resp_free(h_resp *r) {
    if (!r)
        return;
    free(r->body);
    json_decref(r->json);
    for (size_t i = 0; i < r->nheaders; i++)
        free(r->headers[i]);
    free(r->headers);
    free(r);
}

const char *h_resp_header(const h_resp *r, const char *name) {
    size_t n = strlen(name);
    for (size_t i = 0; i < r->nheaders; i++) {
        const char *h = r->headers[i];
        if (strncasecmp(h, name, n) == 0 && h[n] == ':') {
            h += n + 1;
            while (*h == ' ' || *h == '\t')
                h++;
            return h;
        }
    }
    return NULL;
}

const char *h_resp_error(const h_resp *r) {
    return json_string_value(json_object_get(r->json, "error"));
}

char *h_sign(const char *body, size_t len, int64_t ts, const char *secret) {
    char prefix[32];
    int plen = snprintf(prefix, sizeof(prefix), "%lld.", (long long)ts);
    size_t mlen = (size_t)plen + len;
    unsigned char *msg = amp_xmalloc(mlen);
    memcpy(msg, prefix, (size_t)plen);
    memcpy(msg + plen, body, len);
    unsigned char mac[EVP_MAX_MD_SIZE];
    unsigned int maclen = 0;
    if (!HMAC(EVP_sha256(), secret, (int)strlen(secret), msg, mlen, mac, &maclen))
        abort();
    free(msg);
    char *out = amp_xmalloc(7 + 2 * maclen + 1);
    memcpy(out, "sha256=", 7);
    for (unsigned i = 0; i < maclen; i++)
        snprintf(out + 7 + 2 * i, 3, "%02x", mac[i]);
    return out;
}

/* ---- events ---------------------------------------------------------------------- */

char *h_event(const char *event_type, const char *user_id, const char *insert_id) {
    json_t *e = json_pack("{s:s, s:I, s:{s:s, s:i}}", "event_type", event_type, "time",
                          (json_int_t)amp_now_ms(), "event_properties", "plan", "pro", "seats", 3);
    if (!e)
        abort();
    if (user_id)
        json_object_set_new(e, "user_id", json_string(user_id));
    else
        json_object_set_new(e, "device_id", json_string("device-e2e-0001"));
    if (insert_id)
        json_object_set_new(e, "insert_id", json_string(insert_id));
    char *s = json_dumps(e, JSON_COMPACT);
    json_decref(e);
    if (!s)
        abort();
    return s;
}
