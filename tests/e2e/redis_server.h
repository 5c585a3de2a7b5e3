/*
 * redis_server — a redis-server of the test's own, for the Redis engine's
 * tests: a free port on 127.0.0.1, a fresh directory under /tmp, and the
 * settings the engine requires (appendonly yes, appendfsync always,
 * maxmemory-policy noeviction, no RDB snapshots) unless the test passes
 * others. The server dies with the test process (PR_SET_PDEATHSIG) and is
 * stopped by its pid, never by name.
 *
 * Threading: one test thread drives it.
 */
#ifndef E2E_REDIS_SERVER_H
#define E2E_REDIS_SERVER_H

#include <stdint.h>

typedef struct h_redis h_redis;

/* Start redis-server and wait (bounded) until it answers PING. extra:
 * more "--name value" arguments, NULL-terminated; they come after the
 * defaults, so they override them. NULL on failure (reason on stderr). */
h_redis *h_redis_start(const char *const *extra);
/* Send sig and wait (bounded; then SIGKILL) for the exit. */
void h_redis_kill(h_redis *r, int sig);
/* Start it again on the same port and directory (the AOF is replayed). 0
 * once it answers PING, -1 otherwise. */
int h_redis_restart(h_redis *r);
/* Stop it, remove its directory, free. Accepts NULL. */
void h_redis_stop(h_redis *r);

uint16_t h_redis_port(const h_redis *r);
/* "redis://127.0.0.1:<port>", borrowed. */
const char *h_redis_url(const h_redis *r);
int h_redis_pid(const h_redis *r);

#endif
