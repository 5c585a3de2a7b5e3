/*
 * fuzz_config — the config loader (config/config.c, and through it the
 * mapper compiler: filters, regexes, paths, transforms, templates).
 *
 * Input: the config file's bytes. They go into an anonymous in-memory file
 * (memfd) loaded through /proc/self/fd/N, so runs never touch the disk.
 * Secrets are not resolved (flags 0, like `amp2dify map`), and the
 * environment overrides are cleared once so every run sees the same
 * process state.
 *
 * Properties checked: a config is returned exactly when no error was added;
 * every error message is non-empty; loading twice gives the same errors.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "../../config/config.h"
#include "fuzz.h"
#include "../../base/errs.h"

static void clear_env(void) {
    static int done;
    if (done)
        return;
    static const char *const vars[] = {
        "AMP2DIFY_CONFIG",    "AMP2DIFY_LISTEN",  "AMP2DIFY_SPOOL",       "DIFY_BASE_URL",
        "AMP2DIFY_LOG_LEVEL", "AMP2DIFY_SECRETS", "AMP2DIFY_SECRETS_FILE"};
    for (size_t i = 0; i < sizeof vars / sizeof vars[0]; i++)
        unsetenv(vars[i]);
    done = 1;
}

/* Loads path; returns the errors (caller owns) and whether a config came
 * back. */
static amp_errs *load(const char *path, int *loaded) {
    amp_errs *errs = amp_errs_create();
    amp_config *c = amp_config_load(path, 0, errs);
    *loaded = c != NULL;
    if (c) {
        FUZZ_CHECK(amp_errs_count(errs) == 0, "config returned with %zu errors",
                   amp_errs_count(errs));
        FUZZ_CHECK(c->mapper && c->listen.path && c->listen.path[0] == '/', "incomplete config");
        amp_spool_opts so = amp_config_spool_opts(c);
        FUZZ_CHECK(so.path && *so.path, "no spool path");
        amp_config_destroy(c);
    } else {
        FUZZ_CHECK(amp_errs_count(errs) > 0, "config refused without an error");
    }
    for (size_t i = 0; i < amp_errs_count(errs); i++) {
        const char *e = amp_errs_get(errs, i);
        FUZZ_CHECK(e && *e, "empty error message %zu", i);
    }
    return errs;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    clear_env();
    int fd = memfd_create("amp2dify-fuzz-config", MFD_CLOEXEC);
    FUZZ_CHECK(fd >= 0, "memfd_create failed");
    size_t off = 0;
    while (off < size) {
        ssize_t n = write(fd, data + off, size - off);
        FUZZ_CHECK(n > 0, "write to memfd failed");
        off += (size_t)n;
    }
    char path[64];
    snprintf(path, sizeof path, "/proc/self/fd/%d", fd);

    int loaded, loaded2;
    amp_errs *a = load(path, &loaded);
    amp_errs *b = load(path, &loaded2);
    FUZZ_CHECK(loaded == loaded2, "loaded once but not twice");
    FUZZ_CHECK(amp_errs_count(a) == amp_errs_count(b), "%zu errors, then %zu", amp_errs_count(a),
               amp_errs_count(b));
    for (size_t i = 0; i < amp_errs_count(a); i++)
        FUZZ_CHECK(strcmp(amp_errs_get(a, i), amp_errs_get(b, i)) == 0, "error %zu differs", i);
    amp_errs_destroy(a);
    amp_errs_destroy(b);
    close(fd);
    return 0;
}
