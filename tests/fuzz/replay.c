/*
 * replay — a plain main() for the fuzz targets: runs every file of the
 * given corpus directories (and single files) once through the target's
 * LLVMFuzzerTestOneInput, so `make test` replays the corpora with the
 * normal compiler and no libFuzzer.
 *
 *   replay_<name> DIR|FILE...
 *
 * Each input is copied into a heap block of exactly its size, so a
 * sanitizer build catches any read past the end as libFuzzer would. Files
 * are taken in name order for reproducible runs. A target reports a broken
 * property by aborting; this program then dies with it, and the last
 * "replaying" line on stderr names the input (printed with -v, or always
 * when REPLAY_VERBOSE is set).
 *
 * Exit status: 0 when every input ran, 1 when an argument or a file could
 * not be read or no input was found, 2 on usage errors.
 */
#include <dirent.h>
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "../../base/alloc.h"
#include "../../base/buf.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
/* Optional in a target; libFuzzer calls it once before the first input. */
int LLVMFuzzerInitialize(int *argc, char ***argv) __attribute__((weak));

/* Corpus files are small; anything larger is a mistake in the corpus. */
#define REPLAY_MAX_INPUT (16 * 1024 * 1024)

static int verbose;

/* 0 and a caller-owned buffer of exactly *len bytes (at least one byte is
 * allocated so an empty file still has a valid pointer); -1 on error. */
static int read_file(const char *path, uint8_t **out, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (!f) {
        fprintf(stderr, "replay: cannot open %s: %s\n", path, strerror(errno));
        return -1;
    }
    amp_buf b;
    amp_buf_init(&b, REPLAY_MAX_INPUT);
    int rc = amp_buf_read(&b, f);
    if (rc == -1)
        fprintf(stderr, "replay: %s is larger than %d bytes\n", path, REPLAY_MAX_INPUT);
    else if (rc == -2)
        fprintf(stderr, "replay: cannot read %s\n", path);
    rc = rc == 0 ? 0 : -1;
    fclose(f);
    if (rc == 0) {
        *len = b.len;
        *out = amp_xmalloc(b.len ? b.len : 1);
        if (b.len)
            memcpy(*out, b.data, b.len);
    }
    amp_buf_free(&b);
    return rc;
}

static int run_file(const char *path) {
    uint8_t *data;
    size_t len;
    if (read_file(path, &data, &len) != 0)
        return -1;
    if (verbose)
        fprintf(stderr, "replaying %s (%zu bytes)\n", path, len);
    LLVMFuzzerTestOneInput(data, len);
    free(data);
    return 0;
}

/* Regular files directly inside dir (libFuzzer corpora are flat), in name
 * order. Returns the number run, or -1 on an error. */
static long run_dir(const char *dir) {
    struct dirent **names = NULL;
    int n = scandir(dir, &names, NULL, alphasort);
    if (n < 0) {
        fprintf(stderr, "replay: cannot list %s: %s\n", dir, strerror(errno));
        return -1;
    }
    long count = 0;
    int failed = 0;
    for (int i = 0; i < n; i++) {
        const char *name = names[i]->d_name;
        if (name[0] != '.') {
            char *path = amp_xasprintf("%s/%s", dir, name);
            struct stat st;
            if (stat(path, &st) == 0 && S_ISREG(st.st_mode)) {
                if (run_file(path) == 0)
                    count++;
                else
                    failed = 1;
            }
            free(path);
        }
        free(names[i]);
    }
    free(names);
    return failed ? -1 : count;
}

int main(int argc, char **argv) {
    int first = 1;
    if (argc > 1 && strcmp(argv[1], "-v") == 0) {
        verbose = 1;
        first = 2;
    }
    const char *env = getenv("REPLAY_VERBOSE");
    if (env && *env && strcmp(env, "0") != 0)
        verbose = 1;
    if (first >= argc) {
        fprintf(stderr, "usage: %s [-v] CORPUS_DIR|FILE...\n", argv[0]);
        return 2;
    }
    if (LLVMFuzzerInitialize)
        LLVMFuzzerInitialize(&argc, &argv);

    long total = 0;
    int failed = 0;
    for (int i = first; i < argc; i++) {
        struct stat st;
        if (stat(argv[i], &st) != 0) {
            fprintf(stderr, "replay: %s: %s\n", argv[i], strerror(errno));
            failed = 1;
        } else if (S_ISDIR(st.st_mode)) {
            long n = run_dir(argv[i]);
            if (n < 0)
                failed = 1;
            else
                total += n;
        } else if (run_file(argv[i]) == 0) {
            total++;
        } else {
            failed = 1;
        }
    }
    printf("%s: %ld inputs replayed\n", argv[0], total);
    if (total == 0) {
        fprintf(stderr, "replay: no input found\n");
        return 1;
    }
    return failed;
}
