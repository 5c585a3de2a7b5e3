/* Unit tests: amp_log_fields (fields already encoded, with
 * amp_json_write_string) writes the very line amp_log writes through
 * jansson for the same fields, apart from the time stamp; it honours the
 * level and takes lines longer than its stack buffer. */
#include <check.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "../../base/buf.h"
#include "../../base/log.h"
#include "../../json/jsonw.h"
#include "../check_run.h"

/* Runs fn with stderr sent to a temporary file; returns what it wrote
 * (caller frees), time stamps blanked so that two lines compare. */
static char *captured(void (*fn)(void *), void *ctx) {
    char path[] = "/tmp/amp-test-log.XXXXXX";
    int fd = mkstemp(path);
    ck_assert_int_ge(fd, 0);
    unlink(path);
    int saved = dup(STDERR_FILENO);
    ck_assert_int_ge(saved, 0);
    ck_assert_int_ge(dup2(fd, STDERR_FILENO), 0);
    fn(ctx);
    ck_assert_int_ge(dup2(saved, STDERR_FILENO), 0);
    close(saved);
    off_t n = lseek(fd, 0, SEEK_END);
    ck_assert_int_ge(n, 0);
    char *out = calloc(1, (size_t)n + 1);
    ck_assert_ptr_nonnull(out);
    ck_assert_int_eq(pread(fd, out, (size_t)n, 0), n);
    close(fd);
    /* "ts":"2026-12-03T19:01:41.123Z" */
    for (char *p = out; (p = strstr(p, "\"ts\":\"")) != NULL; p += 6)
        for (char *q = p + 6; *q && *q != '"'; q++)
            *q = 'T';
    return out;
}

typedef struct fields {
    const char *msg;
    const char *id, *client, *error;
    int status;
    long long ms;
    amp_log_level level;
} fields;

static void with_jansson(void *ctx) {
    const fields *f = ctx;
    amp_log(f->level, f->msg, "{s:s, s:s, s:i, s:s?, s:I}", "request_id", f->id, "client",
            f->client, "status", f->status, "error", f->error, "ms", (json_int_t)f->ms);
}

static void put(amp_buf *b, const char *key) {
    if (b->len)
        ck_assert_int_eq(amp_buf_append(b, ",", 1), 0);
    ck_assert_int_eq(amp_buf_append(b, "\"", 1), 0);
    ck_assert_int_eq(amp_buf_append(b, key, strlen(key)), 0);
    ck_assert_int_eq(amp_buf_append(b, "\":", 2), 0);
}

static void with_fields(void *ctx) {
    const fields *f = ctx;
    amp_buf b;
    amp_buf_init(&b, 1 << 20);
    char num[32];
    put(&b, "request_id");
    ck_assert_int_eq(amp_json_write_string(&b, f->id, strlen(f->id)), 0);
    put(&b, "client");
    ck_assert_int_eq(amp_json_write_string(&b, f->client, strlen(f->client)), 0);
    put(&b, "status");
    snprintf(num, sizeof num, "%d", f->status);
    amp_buf_append(&b, num, strlen(num));
    put(&b, "error");
    if (f->error)
        ck_assert_int_eq(amp_json_write_string(&b, f->error, strlen(f->error)), 0);
    else
        amp_buf_append(&b, "null", 4);
    put(&b, "ms");
    snprintf(num, sizeof num, "%lld", f->ms);
    amp_buf_append(&b, num, strlen(num));
    amp_log_fields(f->level, f->msg, b.data, b.len);
    amp_buf_free(&b);
}

static void same_line(const fields *f) {
    char *want = captured(with_jansson, (void *)f);
    char *got = captured(with_fields, (void *)f);
    ck_assert_str_eq(got, want);
    free(want);
    free(got);
}

START_TEST(fields_line_is_the_jansson_line) {
    amp_log_set_level(AMP_LOG_INFO);
    fields f = {"request", "0123456789abcdef", "127.0.0.1", NULL, 202, 3, AMP_LOG_INFO};
    same_line(&f);
    char *line = captured(with_fields, &f);
    ck_assert_str_eq(line, "{\"ts\":\"TTTTTTTTTTTTTTTTTTTTTTTT\",\"level\":\"info\",\"msg\":"
                           "\"request\",\"request_id\":\"0123456789abcdef\",\"client\":"
                           "\"127.0.0.1\",\"status\":202,\"error\":null,\"ms\":3}\n");
    free(line);
    /* Escapes, slashes, UTF-8, control bytes, negative and large numbers. */
    fields g = {"request",
                "a\"b\\c/d\n\t\x01\x1f",
                "caf\xc3\xa9 \xe2\x82\xac \xf0\x9f\x98\x80",
                "invalid_signature",
                401,
                -9007199254740993LL,
                AMP_LOG_ERROR};
    same_line(&g);
    /* A message that needs escapes itself. */
    fields h = {"odd \"message\"\n", "x", "y", "e", 500, 0, AMP_LOG_WARN};
    same_line(&h);
}
END_TEST

START_TEST(long_lines_and_levels) {
    amp_log_set_level(AMP_LOG_INFO);
    /* Longer than the writer's stack buffer. */
    char *big = malloc(5000);
    ck_assert_ptr_nonnull(big);
    memset(big, 'q', 4999);
    big[4999] = '\0';
    fields f = {"request", big, "::1", "e", 202, 1, AMP_LOG_INFO};
    same_line(&f);
    char *line = captured(with_fields, &f);
    ck_assert_uint_gt(strlen(line), 5000);
    ck_assert_int_eq(line[strlen(line) - 1], '\n');
    ck_assert_ptr_eq(strchr(line, '\n'), line + strlen(line) - 1); /* one line */
    free(line);
    /* Below the level: nothing, like amp_log. */
    amp_log_set_level(AMP_LOG_WARN);
    f.level = AMP_LOG_INFO;
    line = captured(with_fields, &f);
    ck_assert_str_eq(line, "");
    free(line);
    amp_log_set_level(AMP_LOG_INFO);
    free(big);
}
END_TEST

int main(void) {
    Suite *s = suite_create("log");
    TCase *tc = tcase_create("log");
    tcase_add_test(tc, fields_line_is_the_jansson_line);
    tcase_add_test(tc, long_lines_and_levels);
    suite_add_tcase(s, tc);
    return amp_check_run(s);
}
