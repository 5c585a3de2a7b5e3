#include "errs.h"

#include <stdarg.h>
#include <stdlib.h>

#include "alloc.h"

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
