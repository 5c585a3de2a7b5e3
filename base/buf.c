#include "buf.h"

#include <stdlib.h>
#include <string.h>

#include "alloc.h"

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
