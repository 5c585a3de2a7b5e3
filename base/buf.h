/*
 * buf — a growable byte buffer with a hard maximum fixed at init (curl's
 * dynbuf): request bodies, Dify answers and JSON text never grow past what
 * their owner allows.
 *
 * Threading: an amp_buf belongs to one thread at a time.
 */
#ifndef AMP_BUF_H
#define AMP_BUF_H

#include <stddef.h>
#include <stdio.h>

/* data is always NUL-terminated after a successful append. */
typedef struct amp_buf {
    char *data;
    size_t len;
    size_t cap;
    size_t max;
} amp_buf;

void amp_buf_init(amp_buf *b, size_t max);
/* 0 on success; -1 when the result would exceed max (buffer unchanged). */
int amp_buf_append(amp_buf *b, const void *p, size_t n);
/* Append everything f holds until end of file. 0; -1 when it would exceed
 * max (b keeps what fitted); -2 on a read error (errno says which). */
int amp_buf_read(amp_buf *b, FILE *f);
void amp_buf_reset(amp_buf *b);
void amp_buf_free(amp_buf *b);

#endif
