/*
 * check_run.h — the runner every Check test binary ends with. Header-only
 * (static inline) so that unit and end-to-end binaries need no extra object.
 */
#ifndef AMP_TESTS_CHECK_RUN_H
#define AMP_TESTS_CHECK_RUN_H

#include <check.h>
#include <stdlib.h>

/* Runs every test case of s (taken over and freed) in the default mode,
 * printing Check's summary; returns the process exit status: EXIT_SUCCESS
 * when nothing failed. */
static inline int amp_check_run(Suite *s) {
    SRunner *sr = srunner_create(s);
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}

#endif
