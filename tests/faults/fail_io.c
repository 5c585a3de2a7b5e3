/*
 * fail_io — a test tool, not part of amp2dify: preloaded into the real
 * binary by tests/e2e/test_io_errors.c (LD_PRELOAD) to give its spool the
 * I/O errors a failing disk gives, which no filesystem here can be made to.
 *
 * While the file named by $AMP2DIFY_FAIL_IO_CONTROL exists, calls on a
 * descriptor whose path starts with $AMP2DIFY_SPOOL (the spool: the
 * database, its -wal and -shm files; not the log) fail with EIO. The control
 * file says which calls: "sync" (fdatasync, fsync) or "write" (write,
 * pwrite, pwrite64). Everything else goes to the C library untouched.
 *
 * Built without sanitizers (it is loaded before their runtimes) and with
 * no allocation on the call path; the control file is read on every call,
 * so a test switches failures on and off by writing or removing it.
 */
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <unistd.h>

typedef enum { FAIL_NONE, FAIL_SYNC, FAIL_WRITE } fail_kind;

static int (*real_fdatasync)(int);
static int (*real_fsync)(int);
static ssize_t (*real_write)(int, const void *, size_t);
static ssize_t (*real_pwrite)(int, const void *, size_t, off_t);
static ssize_t (*real_pwrite64)(int, const void *, size_t, off64_t);

__attribute__((constructor)) static void resolve(void) {
    real_fdatasync = (int (*)(int))dlsym(RTLD_NEXT, "fdatasync");
    real_fsync = (int (*)(int))dlsym(RTLD_NEXT, "fsync");
    real_write = (ssize_t(*)(int, const void *, size_t))dlsym(RTLD_NEXT, "write");
    real_pwrite = (ssize_t(*)(int, const void *, size_t, off_t))dlsym(RTLD_NEXT, "pwrite");
    real_pwrite64 = (ssize_t(*)(int, const void *, size_t, off64_t))dlsym(RTLD_NEXT, "pwrite64");
}

/* What fails now, by the control file's first word. */
static fail_kind failing(void) {
    const char *ctl = getenv("AMP2DIFY_FAIL_IO_CONTROL");
    if (!ctl)
        return FAIL_NONE;
    int fd = open(ctl, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return FAIL_NONE;
    char buf[16] = "";
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0)
        return FAIL_NONE;
    if (strncmp(buf, "sync", 4) == 0)
        return FAIL_SYNC;
    if (strncmp(buf, "write", 5) == 0)
        return FAIL_WRITE;
    return FAIL_NONE;
}

/* Whether fd is one of the spool's files. */
static bool watched(int fd) {
    const char *prefix = getenv("AMP2DIFY_SPOOL");
    if (!prefix || !*prefix)
        return false;
    char link[48], path[4096];
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t n = readlink(link, path, sizeof path - 1);
    if (n <= 0)
        return false;
    path[n] = '\0';
    return strncmp(path, prefix, strlen(prefix)) == 0;
}

static bool fail(int fd, fail_kind kind) {
    if (failing() != kind || !watched(fd))
        return false;
    errno = EIO;
    return true;
}

int fdatasync(int fd) {
    return fail(fd, FAIL_SYNC) ? -1 : real_fdatasync(fd);
}

int fsync(int fd) {
    return fail(fd, FAIL_SYNC) ? -1 : real_fsync(fd);
}

ssize_t write(int fd, const void *buf, size_t len) {
    return fail(fd, FAIL_WRITE) ? -1 : real_write(fd, buf, len);
}

ssize_t pwrite(int fd, const void *buf, size_t len, off_t off) {
    return fail(fd, FAIL_WRITE) ? -1 : real_pwrite(fd, buf, len, off);
}

ssize_t pwrite64(int fd, const void *buf, size_t len, off64_t off) {
    return fail(fd, FAIL_WRITE) ? -1 : real_pwrite64(fd, buf, len, off);
}
