/*
 * json_support.h — test helpers shared by the JSON reader and writer tests
 * (tests/unit/test_jsonr.c, tests/unit/test_jsonw.c) and the reader's fuzz
 * target (tests/fuzz/fuzz_jsonr.c): comparing two jansson trees exactly,
 * and visiting the project's JSON case files. Header-only (static inline)
 * so that each of those binaries takes what it uses, with no extra object
 * in the build.
 */
#ifndef AMP_TESTS_JSON_SUPPORT_H
#define AMP_TESTS_JSON_SUPPORT_H

#include <dirent.h>
#include <jansson.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "../base/alloc.h"

/* Where two trees differ, or NULL when they are the same: json_equal does
 * not look at key order and json_equal(1, 1.0) is false but
 * json_equal(0.0, -0.0) true, so this walks the trees itself. */
static inline const char *json_tree_diff(const json_t *a, const json_t *b) {
    if (json_typeof(a) != json_typeof(b))
        return "types differ";
    switch (json_typeof(a)) {
    case JSON_INTEGER:
        return json_integer_value(a) == json_integer_value(b) ? NULL : "integers differ";
    case JSON_REAL: {
        double x = json_real_value(a), y = json_real_value(b);
        return memcmp(&x, &y, sizeof x) == 0 ? NULL : "reals differ";
    }
    case JSON_STRING:
        if (json_string_length(a) != json_string_length(b))
            return "string lengths differ";
        return memcmp(json_string_value(a), json_string_value(b), json_string_length(a)) == 0
                   ? NULL
                   : "string bytes differ";
    case JSON_ARRAY:
        if (json_array_size(a) != json_array_size(b))
            return "array sizes differ";
        for (size_t i = 0; i < json_array_size(a); i++) {
            const char *d = json_tree_diff(json_array_get(a, i), json_array_get(b, i));
            if (d)
                return d;
        }
        return NULL;
    case JSON_OBJECT: {
        json_t *oa = (json_t *)a, *ob = (json_t *)b;
        if (json_object_size(oa) != json_object_size(ob))
            return "object sizes differ";
        void *ia = json_object_iter(oa), *ib = json_object_iter(ob);
        for (; ia && ib; ia = json_object_iter_next(oa, ia), ib = json_object_iter_next(ob, ib)) {
            size_t ka = json_object_iter_key_len(ia), kb = json_object_iter_key_len(ib);
            if (ka != kb || memcmp(json_object_iter_key(ia), json_object_iter_key(ib), ka) != 0)
                return "keys or key order differ";
            const char *d = json_tree_diff(json_object_iter_value(ia), json_object_iter_value(ib));
            if (d)
                return d;
        }
        return ia || ib ? "object iteration lengths differ" : NULL;
    }
    default:
        return NULL; /* true, false, null: the type says it all */
    }
}

/* The input, printable, for failure messages (at most 120 bytes of it). */
/* Calls fn(path, ctx) for every regular file one level below each
 * directory under root (root/<case>/<file>, as in tests/mapping and
 * tests/fuzz/corpus); names starting with '.' are skipped. Returns the
 * number of files, or -1 when root cannot be opened. */
static inline long json_case_files(const char *root, void (*fn)(const char *path, void *ctx),
                                   void *ctx) {
    DIR *d = opendir(root);
    if (!d)
        return -1;
    long files = 0;
    struct dirent *e;
    while ((e = readdir(d))) {
        if (e->d_name[0] == '.')
            continue;
        char *sub = amp_xasprintf("%s/%s", root, e->d_name);
        DIR *sd = opendir(sub);
        if (sd) {
            struct dirent *f;
            while ((f = readdir(sd))) {
                char *path = amp_xasprintf("%s/%s", sub, f->d_name);
                struct stat st;
                if (f->d_name[0] != '.' && stat(path, &st) == 0 && S_ISREG(st.st_mode)) {
                    fn(path, ctx);
                    files++;
                }
                free(path);
            }
            closedir(sd);
        }
        free(sub);
    }
    closedir(d);
    return files;
}

#endif
