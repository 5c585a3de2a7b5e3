#include "parse.h"

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
