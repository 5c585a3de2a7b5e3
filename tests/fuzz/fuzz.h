/*
 * fuzz — what the fuzz targets of tests/fuzz/ share: the libFuzzer entry
 * point's prototype and a check that stops the run when a property the
 * product promises does not hold. libFuzzer (and tests/fuzz/replay.c)
 * report the abort as a crash together with the input that caused it.
 */
#ifndef AMP_FUZZ_H
#define AMP_FUZZ_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define FUZZ_CHECK(cond, ...)                                                                      \
    do {                                                                                           \
        if (!(cond)) {                                                                             \
            fprintf(stderr, "%s:%d: property broken: %s: ", __FILE__, __LINE__, #cond);            \
            fprintf(stderr, __VA_ARGS__);                                                          \
            fputc('\n', stderr);                                                                   \
            abort();                                                                               \
        }                                                                                          \
    } while (0)

#endif
