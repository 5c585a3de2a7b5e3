/*
 * sign — print the amplitude-hmac headers for a body, so a sender (or a
 * person with curl) can produce exactly what serve verifies.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "../crypto/sig.h"
#include "commands.h"
#include "../config/config.h"
#include "../base/buf.h"
#include "../base/errs.h"
#include "../base/parse.h"

#define MAX_SIGN_BODY (64 * 1024 * 1024)

int amp_cmd_sign(int argc, char **argv) {
    const char *secret_env = NULL, *ts_arg = NULL, *file = NULL;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--secret-env") == 0 && i + 1 < argc)
            secret_env = argv[++i];
        else if (strcmp(argv[i], "--timestamp") == 0 && i + 1 < argc)
            ts_arg = argv[++i];
        else if (!file && (argv[i][0] != '-' || strcmp(argv[i], "-") == 0))
            file = argv[i];
        else {
            fprintf(stderr,
                    "amp2dify sign: unexpected argument '%s'\n"
                    "usage: amp2dify sign --secret-env VAR [--timestamp T] [FILE|-]\n",
                    argv[i]);
            return 2;
        }
    }
    if (!secret_env) {
        fputs("amp2dify sign: --secret-env VAR is required (the variable holding the secret; "
              "the first of a comma-separated list is used)\n",
              stderr);
        return 2;
    }
    int64_t ts = (int64_t)time(NULL);
    if (ts_arg && amp_parse_i64(ts_arg, strlen(ts_arg), 0, 253402300799LL, &ts) != 0) {
        fprintf(stderr, "amp2dify sign: --timestamp '%s' is not a unix time in seconds\n", ts_arg);
        return 2;
    }

    amp_errs *errs = amp_errs_create();
    char *secret = NULL;
    int rc = amp_config_secret_from_env(secret_env, &secret, secret_env, errs);
    if (rc != 0) {
        if (rc > 0)
            fprintf(stderr, "amp2dify sign: %s (or %s_FILE) is not set\n", secret_env, secret_env);
        else
            amp_cmd_print_errors("amp2dify sign", errs);
        amp_errs_destroy(errs);
        return 2;
    }
    amp_errs_destroy(errs);
    /* The first of the list, read as serve reads it. */
    size_t nsecrets;
    char **secrets = amp_config_split_secrets(secret, &nsecrets);
    free(secret);
    secret = secrets[0];
    for (size_t i = 1; i < nsecrets; i++)
        free(secrets[i]);
    free(secrets);
    if (!secret) {
        fprintf(stderr, "amp2dify sign: %s holds no secret\n", secret_env);
        return 2;
    }

    FILE *in = stdin;
    if (file && strcmp(file, "-") != 0) {
        in = fopen(file, "rb");
        if (!in) {
            fprintf(stderr, "amp2dify sign: cannot open '%s': %s\n", file, strerror(errno));
            free(secret);
            return 1;
        }
    }
    amp_buf body;
    amp_buf_init(&body, MAX_SIGN_BODY);
    int read_rc = amp_buf_read(&body, in);
    if (in != stdin)
        fclose(in);
    if (read_rc != 0) {
        fprintf(stderr, "amp2dify sign: cannot read the body (larger than 64 MiB or I/O error)\n");
        free(secret);
        amp_buf_free(&body);
        return 1;
    }

    char hex[65];
    amp_sig_amplitude_hex(secret, strlen(secret), ts, body.data ? body.data : "", body.len, hex);
    printf("X-Amplitude-Timestamp: %lld\nX-Amplitude-Sig: sha256=%s\n", (long long)ts, hex);
    free(secret);
    amp_buf_free(&body);
    return 0;
}
