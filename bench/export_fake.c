/*
 * bench/export_fake — the Export API benchmark's helpers:
 *
 *   export_fake --write ZIP --events N [--hours H] [--parts P] [--members M]
 *       write a real-format Export zip of N events (the fake Amplitude's
 *       events, about 1.6 KB each) over H hours from 2026-11-01T00
 *   export_fake --serve ZIP --key K --secret S
 *       the fake Amplitude on 127.0.0.1, answering every export request with
 *       ZIP; prints "listening <port>", runs until SIGTERM
 *   export_fake --baseline ZIP
 *       the floor of any Export ingest: read the zip with libarchive, gunzip
 *       each part, split the lines and parse each with amp2dify's JSON reader,
 *       nothing else (no routes, no spool); prints {"events","ms"}
 */
#include <archive.h>
#include <archive_entry.h>
#include <jansson.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "../base/buf.h"
#include "../base/clock.h"
#include "../base/parse.h"
#include "../json/jsonr.h"
#include "../tests/fake_amplitude/fake_amplitude.h"

#define NOV1 ((int64_t)1793491200 / 3600)

static la_ssize_t outer_read(struct archive *in, void *ctx, const void **buf) {
    (void)in;
    static char block[65536];
    *buf = block;
    return archive_read_data(ctx, block, sizeof block);
}

static int baseline(const char *zip) {
    int64_t t0 = amp_mono_ms(), events = 0;
    struct archive *a = archive_read_new();
    archive_read_support_format_zip_seekable(a);
    if (archive_read_open_filename(a, zip, 65536) != ARCHIVE_OK) {
        fprintf(stderr, "export_fake: %s\n", archive_error_string(a));
        return 1;
    }
    struct archive_entry *e;
    amp_buf line;
    amp_buf_init(&line, 8u << 20);
    static char block[65536];
    while (archive_read_next_header(a, &e) == ARCHIVE_OK) {
        struct archive *in = archive_read_new();
        archive_read_support_filter_gzip(in);
        archive_read_support_format_raw(in);
        struct archive_entry *ie;
        if (archive_read_open(in, a, NULL, outer_read, NULL) != ARCHIVE_OK ||
            archive_read_next_header(in, &ie) != ARCHIVE_OK)
            return 1;
        la_ssize_t n;
        while ((n = archive_read_data(in, block, sizeof block)) > 0) {
            const char *p = block, *end = block + n;
            while (p < end) {
                const char *nl = memchr(p, '\n', (size_t)(end - p));
                size_t take = (size_t)((nl ? nl : end) - p);
                if (amp_buf_append(&line, p, take) != 0)
                    return 1;
                if (!nl)
                    break;
                json_t *j = amp_json_parse(line.data, line.len);
                if (!j)
                    return 1;
                json_decref(j);
                events++;
                line.len = 0;
                p = nl + 1;
            }
        }
        archive_read_free(in);
    }
    archive_read_free(a);
    amp_buf_free(&line);
    printf("{\"events\":%lld,\"ms\":%lld}\n", (long long)events, (long long)(amp_mono_ms() - t0));
    return 0;
}

static int64_t num(const char *s) {
    int64_t v;
    if (!s || amp_parse_i64(s, strlen(s), 1, 100000000, &v) != 0) {
        fprintf(stderr, "export_fake: expected a positive integer, found '%s'\n", s ? s : "");
        exit(2);
    }
    return v;
}

int main(int argc, char **argv) {
    const char *write = NULL, *serve = NULL, *base = NULL, *key = NULL, *secret = NULL;
    int64_t events = 1000000, hours = 24, parts = 4, members = 2;
    for (int i = 1; i + 1 < argc; i += 2) {
        const char *a = argv[i], *v = argv[i + 1];
        if (!strcmp(a, "--write"))
            write = v;
        else if (!strcmp(a, "--serve"))
            serve = v;
        else if (!strcmp(a, "--baseline"))
            base = v;
        else if (!strcmp(a, "--key"))
            key = v;
        else if (!strcmp(a, "--secret"))
            secret = v;
        else if (!strcmp(a, "--events"))
            events = num(v);
        else if (!strcmp(a, "--hours"))
            hours = num(v);
        else if (!strcmp(a, "--parts"))
            parts = num(v);
        else if (!strcmp(a, "--members"))
            members = num(v);
        else {
            fprintf(stderr, "export_fake: unknown option %s\n", a);
            return 2;
        }
    }
    if (write)
        return fake_amplitude_write_zip(write, NOV1, (unsigned)hours,
                                        (unsigned)((events + hours - 1) / hours), (unsigned)parts,
                                        (unsigned)members) == 0
                   ? 0
                   : 1;
    if (base)
        return baseline(base);
    if (!serve || !key || !secret) {
        fprintf(stderr, "usage: export_fake --write ZIP --events N | --serve ZIP --key K "
                        "--secret S | --baseline ZIP\n");
        return 2;
    }
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGTERM);
    sigaddset(&set, SIGINT);
    pthread_sigmask(SIG_BLOCK, &set, NULL);
    fake_amplitude *f = fake_amplitude_start(0, key, secret);
    if (!f)
        return 1;
    fake_amplitude_export_file(f, serve);
    printf("listening %u\n", (unsigned)fake_amplitude_port(f));
    fflush(stdout);
    int sig;
    sigwait(&set, &sig);
    fake_amplitude_stop(f);
    return 0;
}
