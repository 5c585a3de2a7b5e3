#include "util.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static void oom(size_t n) {
    fprintf(stderr, "{\"level\":\"error\",\"msg\":\"out of memory\",\"bytes\":%zu}\n", n);
    abort();
}

void *amp_xmalloc(size_t n) {
    void *p = malloc(n ? n : 1);
    if (!p)
        oom(n);
    return p;
}

void *amp_xcalloc(size_t count, size_t size) {
    void *p = calloc(count ? count : 1, size ? size : 1);
    if (!p)
        oom(count * size);
    return p;
}

void *amp_xrealloc(void *p, size_t n) {
    void *q = realloc(p, n ? n : 1);
    if (!q)
        oom(n);
    return q;
}

char *amp_xstrdup(const char *s) {
    return s ? amp_xstrndup(s, strlen(s)) : NULL;
}

char *amp_xstrndup(const char *s, size_t n) {
    char *d = amp_xmalloc(n + 1);
    memcpy(d, s, n);
    d[n] = '\0';
    return d;
}

char *amp_xvasprintf(const char *fmt, va_list ap) {
    va_list again;
    va_copy(again, ap);
    int n = vsnprintf(NULL, 0, fmt, ap);
    if (n < 0)
        abort();
    char *s = amp_xmalloc((size_t)n + 1);
    vsnprintf(s, (size_t)n + 1, fmt, again);
    va_end(again);
    return s;
}

char *amp_xasprintf(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    char *s = amp_xvasprintf(fmt, ap);
    va_end(ap);
    return s;
}

static int64_t clock_ms(clockid_t id) {
    struct timespec ts;
    clock_gettime(id, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

int64_t amp_now_ms(void) {
    return clock_ms(CLOCK_REALTIME);
}

int64_t amp_mono_ms(void) {
    return clock_ms(CLOCK_MONOTONIC);
}

int amp_parse_i64(const char *s, size_t len, int64_t min, int64_t max, int64_t *out) {
    size_t i = 0;
    int neg = 0;
    if (len == 0)
        return -1;
    if (s[0] == '-') {
        if (min >= 0)
            return -1;
        neg = 1;
        i = 1;
    }
    if (i == len)
        return -1;
    /* Accumulate as a negative number so INT64_MIN fits. */
    int64_t v = 0;
    for (; i < len; i++) {
        if (s[i] < '0' || s[i] > '9')
            return -1;
        int d = s[i] - '0';
        if (v < (INT64_MIN + d) / 10)
            return -1;
        v = v * 10 - d;
    }
    if (!neg) {
        if (v == INT64_MIN)
            return -1;
        v = -v;
    }
    if (v < min || v > max)
        return -1;
    *out = v;
    return 0;
}

void amp_buf_init(amp_buf *b, size_t max) {
    b->data = NULL;
    b->len = 0;
    b->cap = 0;
    b->max = max;
}

int amp_buf_append(amp_buf *b, const void *p, size_t n) {
    if (n > b->max - b->len)
        return -1;
    if (b->len + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 256;
        while (cap < b->len + n + 1)
            cap *= 2;
        if (cap > b->max + 1)
            cap = b->max + 1;
        b->data = amp_xrealloc(b->data, cap);
        b->cap = cap;
    }
    if (n)
        memcpy(b->data + b->len, p, n);
    b->len += n;
    b->data[b->len] = '\0';
    return 0;
}

int amp_buf_read(amp_buf *b, FILE *f) {
    char chunk[16384];
    size_t n;
    while ((n = fread(chunk, 1, sizeof chunk, f)) > 0)
        if (amp_buf_append(b, chunk, n) != 0)
            return -1;
    return ferror(f) ? -2 : 0;
}

void amp_buf_reset(amp_buf *b) {
    b->len = 0;
    if (b->data)
        b->data[0] = '\0';
}

void amp_buf_free(amp_buf *b) {
    free(b->data);
    amp_buf_init(b, b->max);
}

struct amp_errs {
    char **items;
    size_t n;
    size_t cap;
};

amp_errs *amp_errs_create(void) {
    return amp_xcalloc(1, sizeof(amp_errs));
}

void amp_errs_destroy(amp_errs *e) {
    if (!e)
        return;
    for (size_t i = 0; i < e->n; i++)
        free(e->items[i]);
    free(e->items);
    free(e);
}

void amp_errs_add(amp_errs *e, const char *path, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    char *msg = amp_xvasprintf(fmt, ap);
    va_end(ap);

    if (e->n == e->cap) {
        e->cap = e->cap ? e->cap * 2 : 8;
        e->items = amp_xrealloc(e->items, e->cap * sizeof(char *));
    }
    if (path && *path) {
        e->items[e->n++] = amp_xasprintf("%s: %s", path, msg);
        free(msg);
    } else {
        e->items[e->n++] = msg;
    }
}

size_t amp_errs_count(const amp_errs *e) {
    return e->n;
}

const char *amp_errs_get(const amp_errs *e, size_t i) {
    return i < e->n ? e->items[i] : NULL;
}
