#include "redis_server.h"

#include <hiredis/hiredis.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "harness.h"

#define MAX_ARGS 64

struct h_redis {
    pid_t pid;
    uint16_t port;
    char dir[64];
    char url[64];
    char *argv[MAX_ARGS];
    int argc;
};

static void add(h_redis *r, const char *a) {
    if (r->argc < MAX_ARGS - 1)
        r->argv[r->argc++] = strdup(a);
}

static bool answers(const h_redis *r) {
    struct timeval tv = {.tv_sec = 1};
    redisContext *c = redisConnectWithTimeout("127.0.0.1", r->port, tv);
    bool ok = false;
    if (c && !c->err) {
        redisReply *rep = redisCommand(c, "PING");
        ok = rep && rep->type == REDIS_REPLY_STATUS && strcmp(rep->str, "PONG") == 0;
        if (rep)
            freeReplyObject(rep);
    }
    redisFree(c);
    return ok;
}

static int launch(h_redis *r) {
    char log[128];
    snprintf(log, sizeof log, "%s/redis.log", r->dir);
    r->pid = fork();
    if (r->pid < 0)
        return -1;
    if (r->pid == 0) {
        prctl(PR_SET_PDEATHSIG, SIGKILL);
        FILE *f = freopen(log, "a", stdout);
        (void)f;
        dup2(STDOUT_FILENO, STDERR_FILENO);
        execvp("redis-server", r->argv);
        _exit(127);
    }
    int64_t end = h_mono_ms() + 10000;
    while (h_mono_ms() < end) {
        if (answers(r))
            return 0;
        int st;
        if (waitpid(r->pid, &st, WNOHANG) == r->pid) {
            r->pid = 0;
            fprintf(stderr, "redis-server exited at start; see %s\n", log);
            return -1;
        }
        h_sleep_ms(20);
    }
    fprintf(stderr, "redis-server did not answer within 10 s; see %s\n", log);
    return -1;
}

h_redis *h_redis_start(const char *const *extra) {
    h_redis *r = calloc(1, sizeof *r);
    snprintf(r->dir, sizeof r->dir, "/tmp/amp2dify-redis-XXXXXX");
    if (!mkdtemp(r->dir)) {
        free(r);
        return NULL;
    }
    r->port = h_free_port();
    snprintf(r->url, sizeof r->url, "redis://127.0.0.1:%u", (unsigned)r->port);
    char port[16];
    snprintf(port, sizeof port, "%u", (unsigned)r->port);
    const char *base[] = {
        "redis-server", "--port",       port,  "--bind",        "127.0.0.1", "--dir",
        r->dir,         "--appendonly", "yes", "--appendfsync", "always",    "--maxmemory-policy",
        "noeviction",   "--save",       "",    "--daemonize",   "no",        NULL};
    for (int i = 0; base[i]; i++)
        add(r, base[i]);
    for (int i = 0; extra && extra[i]; i++)
        add(r, extra[i]);
    r->argv[r->argc] = NULL;
    if (launch(r) != 0) {
        h_redis_stop(r);
        return NULL;
    }
    return r;
}

void h_redis_kill(h_redis *r, int sig) {
    if (!r || r->pid <= 0)
        return;
    kill(r->pid, sig);
    int64_t end = h_mono_ms() + 10000;
    int st;
    while (waitpid(r->pid, &st, WNOHANG) == 0) {
        if (h_mono_ms() > end) {
            kill(r->pid, SIGKILL);
            waitpid(r->pid, &st, 0);
            break;
        }
        h_sleep_ms(10);
    }
    r->pid = 0;
}

int h_redis_restart(h_redis *r) {
    return launch(r);
}

void h_redis_stop(h_redis *r) {
    if (!r)
        return;
    h_redis_kill(r, SIGTERM);
    char cmd[128];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", r->dir);
    if (system(cmd) != 0)
        fprintf(stderr, "could not remove %s\n", r->dir);
    for (int i = 0; i < r->argc; i++)
        free(r->argv[i]);
    free(r);
}

uint16_t h_redis_port(const h_redis *r) {
    return r->port;
}

const char *h_redis_url(const h_redis *r) {
    return r->url;
}

int h_redis_pid(const h_redis *r) {
    return (int)r->pid;
}
