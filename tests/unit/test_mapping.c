/* Unit tests: field paths, values, filters, transforms, templates, and the
 * mapper's compile errors and request bodies. JSON in this file is written
 * with single quotes (turned into double quotes by j()) to stay readable. */
#include <check.h>
#include <stdlib.h>
#include <string.h>

#include "../../mapping/mapping.h"
#include "../../mapping/mapping_int.h"
#include "../check_run.h"
#include "../../base/buf.h"
#include "../../base/errs.h"

/* JSON from single-quoted text (caller owns). */
static json_t *j(const char *text) {
    char *s = strdup(text);
    ck_assert_ptr_nonnull(s);
    for (char *p = s; *p; p++)
        if (*p == '\'')
            *p = '"';
    json_error_t e;
    json_t *v = json_loads(s, JSON_DECODE_ANY, &e);
    if (!v)
        ck_abort_msg("bad test JSON %s: %s", s, e.text);
    free(s);
    return v;
}

/* Does errs hold exactly this line? Prints them all when it does not. */
/* An error that reads want, or begins with it: "path: found X; expected Y"
 * where want may stop inside the long Y. */
static bool has_err(const amp_errs *errs, const char *want) {
    for (size_t i = 0; i < amp_errs_count(errs); i++)
        if (!strncmp(amp_errs_get(errs, i), want, strlen(want)))
            return true;
    for (size_t i = 0; i < amp_errs_count(errs); i++)
        fprintf(stderr, "  have: %s\n", amp_errs_get(errs, i));
    fprintf(stderr, "  want: %s\n", want);
    return false;
}

static bool starts(const char *s, const char *prefix) {
    return strncmp(s, prefix, strlen(prefix)) == 0;
}

/* ---- paths ----------------------------------------------------------- */

START_TEST(path_parse_forms) {
    amp_path p;
    char err[160];
    ck_assert_int_eq(amp_map_path_parse(&p, "user_properties.plan", true, err, sizeof(err)), 0);
    ck_assert_uint_eq(p.nsegs, 2);
    ck_assert_str_eq(p.segs[1].key, "plan");
    amp_map_path_free(&p);

    ck_assert_int_eq(amp_map_path_parse(&p, "user_properties[\"a.b\"].c", true, err, sizeof(err)),
                     0);
    ck_assert_uint_eq(p.nsegs, 3);
    ck_assert_str_eq(p.segs[1].key, "a.b");
    ck_assert_str_eq(p.segs[2].key, "c");
    amp_map_path_free(&p);

    ck_assert_int_eq(amp_map_path_parse(&p, "[\"x.y\"]", true, err, sizeof(err)), 0);
    ck_assert_uint_eq(p.nsegs, 1);
    ck_assert_str_eq(p.segs[0].key, "x.y");
    amp_map_path_free(&p);

    ck_assert_int_eq(amp_map_path_parse(&p, "a[\"q\\\"t\"][2]", true, err, sizeof(err)), 0);
    ck_assert_str_eq(p.segs[1].key, "q\"t");
    ck_assert_ptr_null(p.segs[2].key);
    ck_assert_uint_eq(p.segs[2].index, 2);
    ck_assert_str_eq(p.text, "a[\"q\\\"t\"][2]");
    amp_map_path_free(&p);
}
END_TEST

START_TEST(path_parse_errors) {
    amp_path p;
    char err[160];
    ck_assert_int_eq(amp_map_path_parse(&p, "", true, err, sizeof(err)), -1);
    ck_assert_str_eq(err, "empty field path");
    ck_assert_int_eq(amp_map_path_parse(&p, "a..b", true, err, sizeof(err)), -1);
    ck_assert_str_eq(err, "empty key at offset 2");
    ck_assert_int_eq(amp_map_path_parse(&p, "a.", true, err, sizeof(err)), -1);
    ck_assert_int_eq(amp_map_path_parse(&p, ".a", true, err, sizeof(err)), -1);
    ck_assert_int_eq(amp_map_path_parse(&p, "a[\"b\"", true, err, sizeof(err)), -1);
    ck_assert_str_eq(err, "unclosed [\"...\"] at offset 1");
    ck_assert_int_eq(amp_map_path_parse(&p, "a[x]", true, err, sizeof(err)), -1);
    ck_assert_int_eq(amp_map_path_parse(&p, "a[\"b\"]c", true, err, sizeof(err)), -1);
    ck_assert_str_eq(err, "expected '.' or '[' at offset 6");
    ck_assert_int_eq(amp_map_path_parse(&p, "a[0]", false, err, sizeof(err)), -1);
    ck_assert_str_eq(err, "array index at offset 1; a target names object keys only");
}
END_TEST

START_TEST(path_get_set) {
    json_t *ev = j("{'a':{'b.c':{'d':[10,{'e':true}]}},'n':null}");
    amp_path p;
    char err[160];
    ck_assert_int_eq(amp_map_path_parse(&p, "a[\"b.c\"].d[1].e", true, err, sizeof(err)), 0);
    ck_assert(json_is_true(amp_map_path_get(&p, ev)));
    amp_map_path_free(&p);
    ck_assert_int_eq(amp_map_path_parse(&p, "a[\"b.c\"].d[2]", true, err, sizeof(err)), 0);
    ck_assert_ptr_null(amp_map_path_get(&p, ev));
    amp_map_path_free(&p);
    ck_assert_int_eq(amp_map_path_parse(&p, "n.x", true, err, sizeof(err)), 0);
    ck_assert_ptr_null(amp_map_path_get(&p, ev));
    amp_map_path_free(&p);

    json_t *obj = json_object();
    ck_assert_int_eq(amp_map_path_parse(&p, "profile.phone", false, err, sizeof(err)), 0);
    ck_assert_int_eq(amp_map_path_set(&p, obj, json_string("123")), 0);
    amp_map_path_free(&p);
    ck_assert_int_eq(amp_map_path_parse(&p, "profile.name", false, err, sizeof(err)), 0);
    ck_assert_int_eq(amp_map_path_set(&p, obj, json_string("x")), 0);
    amp_map_path_free(&p);
    ck_assert_int_eq(amp_map_path_parse(&p, "profile.phone.cc", false, err, sizeof(err)), 0);
    ck_assert_int_eq(amp_map_path_set(&p, obj, json_string("y")), -1);
    amp_map_path_free(&p);
    json_t *want = j("{'profile':{'phone':'123','name':'x'}}");
    ck_assert(json_equal(obj, want));
    json_decref(want);
    json_decref(obj);
    json_decref(ev);
}
END_TEST

/* ---- values ---------------------------------------------------------- */

START_TEST(value_equality) {
    json_t *one = json_integer(1), *onef = json_real(1.0), *s1 = json_string("1");
    ck_assert(amp_map_value_equal(one, onef));
    ck_assert(!amp_map_value_equal(one, s1));
    ck_assert(!amp_map_value_equal(json_true(), one));
    json_t *big = json_integer(9007199254740993LL), *bigf = json_real(9007199254740992.0);
    ck_assert(!amp_map_value_equal(big, bigf)); /* 2^53 + 1 is not 2^53 */
    ck_assert_int_gt(amp_map_number_cmp(big, bigf), 0);
    ck_assert_int_lt(amp_map_number_cmp(bigf, big), 0);
    json_t *a = j("[1,{'x':2.0}]"), *b = j("[1.0,{'x':2}]"), *c = j("[1,{'x':'2'}]");
    ck_assert(amp_map_value_equal(a, b));
    ck_assert(!amp_map_value_equal(a, c));
    json_t *half = json_real(0.5), *zero = json_integer(0);
    ck_assert_int_lt(amp_map_number_cmp(zero, half), 0);
    json_decref(zero);
    ck_assert_int_gt(amp_map_number_cmp(one, half), 0);
    json_decref(half);
    json_decref(one);
    json_decref(onef);
    json_decref(s1);
    json_decref(big);
    json_decref(bigf);
    json_decref(a);
    json_decref(b);
    json_decref(c);
}
END_TEST

START_TEST(real_format) {
    char buf[40];
    amp_map_real_format(0.1, buf, sizeof(buf));
    ck_assert_str_eq(buf, "0.1");
    amp_map_real_format(100.0, buf, sizeof(buf));
    ck_assert_str_eq(buf, "100.0");
    amp_map_real_format(1e22, buf, sizeof(buf));
    ck_assert_str_eq(buf, "1e22");
    amp_map_real_format(1e-7, buf, sizeof(buf));
    ck_assert_str_eq(buf, "1e-7");
    amp_map_real_format(-2.5, buf, sizeof(buf));
    ck_assert_str_eq(buf, "-2.5");
    amp_map_real_format(1.0 / 3, buf, sizeof(buf));
    ck_assert_str_eq(buf, "0.3333333333333333");
}
END_TEST

/* ---- filters --------------------------------------------------------- */

static const char *EVENT =
    "{'event_type':'Signup','user_id':'u1','n':5,'f':2.5,'big':9007199254740993,"
    "'s':'hello world','e':'','z':null,'b':true,'arr':[1,2],"
    "'up':{'plan':'pro','a.b':'dot'}}";

/* Evaluate a filter given as single-quoted JSON against EVENT. */
static bool ev_filter(const char *spec) {
    json_t *f = j(spec), *ev = j(EVENT);
    amp_errs *errs = amp_errs_create();
    amp_filter *flt = amp_map_filter_compile(f, "filter", errs);
    if (!flt)
        ck_abort_msg("filter did not compile: %s", amp_errs_get(errs, 0));
    bool r = amp_map_filter_eval(flt, ev);
    amp_map_filter_free(flt);
    amp_errs_destroy(errs);
    json_decref(f);
    json_decref(ev);
    return r;
}

START_TEST(filter_ops) {
    ck_assert(ev_filter("{'field':'event_type','op':'equals','value':'Signup'}"));
    ck_assert(!ev_filter("{'field':'event_type','op':'equals','value':'signup'}"));
    ck_assert(ev_filter("{'field':'n','op':'equals','value':5.0}"));
    ck_assert(!ev_filter("{'field':'n','op':'equals','value':'5'}"));
    ck_assert(ev_filter("{'field':'big','op':'equals','value':9007199254740993}"));
    ck_assert(!ev_filter("{'field':'big','op':'equals','value':9007199254740992}"));
    ck_assert(ev_filter("{'field':'z','op':'equals','value':null}"));
    ck_assert(ev_filter("{'field':'arr','op':'equals','value':[1,2.0]}"));
    ck_assert(!ev_filter("{'field':'missing','op':'equals','value':null}"));

    ck_assert(ev_filter("{'field':'event_type','op':'not_equals','value':'X'}"));
    ck_assert(ev_filter("{'field':'missing','op':'not_equals','value':'X'}"));
    ck_assert(!ev_filter("{'field':'n','op':'not_equals','value':5}"));

    ck_assert(ev_filter("{'field':'up.plan','op':'in','value':['free','pro']}"));
    ck_assert(!ev_filter("{'field':'up.plan','op':'in','value':['free','team']}"));
    ck_assert(ev_filter("{'field':'n','op':'in','value':['5',5]}"));
    ck_assert(!ev_filter("{'field':'n','op':'in','value':['5']}"));

    ck_assert(ev_filter("{'field':'s','op':'regex','value':'^hello (world|there)$'}"));
    ck_assert(ev_filter("{'field':'s','op':'regex','value':'wor'}"));
    ck_assert(!ev_filter("{'field':'s','op':'regex','value':'^world'}"));
    ck_assert(!ev_filter("{'field':'n','op':'regex','value':'5'}"));
    ck_assert(ev_filter("{'field':'e','op':'regex','value':'^$'}"));

    ck_assert(ev_filter("{'field':'z','op':'exists'}"));
    ck_assert(!ev_filter("{'field':'missing','op':'exists'}"));
    ck_assert(!ev_filter("{'field':'z','op':'exclude_null'}"));
    ck_assert(ev_filter("{'field':'e','op':'exclude_null'}"));
    ck_assert(!ev_filter("{'field':'missing','op':'exclude_null'}"));

    ck_assert(ev_filter("{'field':'n','op':'gt','value':4.9}"));
    ck_assert(!ev_filter("{'field':'n','op':'gt','value':5}"));
    ck_assert(ev_filter("{'field':'n','op':'gte','value':5}"));
    ck_assert(ev_filter("{'field':'f','op':'lt','value':3}"));
    ck_assert(ev_filter("{'field':'f','op':'lte','value':2.5}"));
    ck_assert(!ev_filter("{'field':'s','op':'gt','value':0}"));
    ck_assert(!ev_filter("{'field':'b','op':'gte','value':0}"));
    ck_assert(ev_filter("{'field':'big','op':'gt','value':9007199254740992.0}"));

    ck_assert(ev_filter("{'field':'s','op':'prefix','value':'hell'}"));
    ck_assert(ev_filter("{'field':'s','op':'prefix','value':''}"));
    ck_assert(!ev_filter("{'field':'e','op':'prefix','value':'a'}"));
    ck_assert(!ev_filter("{'field':'n','op':'prefix','value':'5'}"));

    ck_assert(ev_filter("{'field':'up[\\'a.b\\']','op':'equals','value':'dot'}"));
}
END_TEST

START_TEST(filter_combinators) {
    ck_assert(ev_filter("{'all':[{'field':'n','op':'gt','value':1},{'field':'b','op':'equals',"
                        "'value':true}]}"));
    ck_assert(!ev_filter("{'all':[{'field':'n','op':'gt','value':1},{'field':'b','op':'equals',"
                         "'value':false}]}"));
    ck_assert(
        ev_filter("{'any':[{'field':'n','op':'gt','value':10},{'field':'b','op':'exists'}]}"));
    ck_assert(
        !ev_filter("{'any':[{'field':'n','op':'gt','value':10},{'field':'q','op':'exists'}]}"));
    ck_assert(ev_filter("{'not':{'field':'n','op':'gt','value':10}}"));
    ck_assert(!ev_filter("{'not':{'not':{'field':'n','op':'gt','value':10}}}"));
    ck_assert(ev_filter("{'all':[{'any':[{'not':{'field':'s','op':'prefix','value':'x'}}]}]}"));
}
END_TEST

static void explain_is(const char *spec, const char *want) {
    json_t *f = j(spec), *ev = j(EVENT);
    amp_errs *errs = amp_errs_create();
    amp_filter *flt = amp_map_filter_compile(f, "filter", errs);
    ck_assert_ptr_nonnull(flt);
    ck_assert(!amp_map_filter_eval(flt, ev));
    amp_buf b;
    amp_buf_init(&b, 4096);
    amp_map_filter_explain(flt, ev, &b);
    ck_assert_str_eq(b.data, want);
    amp_buf_free(&b);
    amp_map_filter_free(flt);
    amp_errs_destroy(errs);
    json_decref(f);
    json_decref(ev);
}

START_TEST(filter_explain) {
    explain_is("{'field':'event_type','op':'equals','value':'X'}",
               "filter: event_type equals \"X\" is false");
    explain_is("{'all':[{'field':'n','op':'gt','value':1},{'field':'q','op':'exists'}]}",
               "filter all[1]: q exists is false (field is missing)");
    explain_is("{'all':[{'field':'n','op':'gt','value':1},{'any':[{'field':'s','op':'lt','value':"
               "1},{'field':'z','op':'exclude_null'}]}]}",
               "filter all[1].any: none of 2 rules matched");
    explain_is("{'not':{'field':'n','op':'equals','value':5}}", "filter not: n equals 5 is true");
    explain_is("{'all':[{'all':[{'field':'s','op':'gt','value':1}]}]}",
               "filter all[0].all[0]: s gt 1 is false (field is string)");
    explain_is("{'not':{'all':[{'field':'n','op':'exists'}]}}",
               "filter not: all of 1 rules matched");
}
END_TEST

static amp_errs *filter_errs(const char *spec) {
    json_t *f = j(spec);
    amp_errs *errs = amp_errs_create();
    amp_filter *flt = amp_map_filter_compile(f, "routes[1].filter", errs);
    ck_assert_ptr_null(flt);
    ck_assert_uint_gt(amp_errs_count(errs), 0);
    json_decref(f);
    return errs;
}

START_TEST(filter_compile_errors) {
    amp_errs *e = filter_errs("{'field':'event_type','op':'equal','value':'x'}");
    ck_assert(has_err(e, "routes[1].filter.op: found 'equal'; expected one of equals, not_equals, "
                         "in, regex, exists, exclude_null, gt, gte, lt, lte, prefix"));
    amp_errs_destroy(e);

    e = filter_errs("{'all':[{'field':'s','op':'regex','value':'a('},{'field':'x','op':'in',"
                    "'value':'a'}]}");
    ck_assert_uint_eq(amp_errs_count(e), 2);
    ck_assert(starts(amp_errs_get(e, 0), "routes[1].filter.all[0].value: found 'a(' ("));
    ck_assert(has_err(
        e,
        "routes[1].filter.all[1].value: found a string; expected a non-empty array for op 'in'"));
    amp_errs_destroy(e);

    e = filter_errs("{'field':'n','op':'gt','value':'5'}");
    ck_assert(has_err(e, "routes[1].filter.value: found a string; expected a number for op 'gt'"));
    amp_errs_destroy(e);

    e = filter_errs("{'field':'n','op':'exists','value':1,'extra':2}");
    ck_assert(has_err(e, "routes[1].filter.extra: found an unknown key; expected one of field, op, "
                         "value, all, any, not"));
    ck_assert(has_err(e, "routes[1].filter.value: found a value; expected none for op 'exists'"));
    amp_errs_destroy(e);

    e = filter_errs("{'op':'equals'}");
    ck_assert(has_err(
        e, "routes[1].filter.field: found nothing; expected a field path such as \"event_type\""));
    ck_assert(
        has_err(e, "routes[1].filter.value: found nothing; expected a value for op 'equals'"));
    amp_errs_destroy(e);

    e = filter_errs("{'all':[],'any':[]}");
    ck_assert(has_err(
        e,
        "routes[1].filter: found both 'all' and 'any'; expected one of all, any, not per object"));
    amp_errs_destroy(e);

    e = filter_errs("{'any':[]}");
    ck_assert(has_err(
        e, "routes[1].filter.any: found an empty array; expected a non-empty array of filters"));
    amp_errs_destroy(e);

    e = filter_errs("{'field':'a..b','op':'exists'}");
    ck_assert(has_err(
        e, "routes[1].filter.field: found 'a..b' (empty key at offset 2); expected a field path"));
    amp_errs_destroy(e);

    e = filter_errs("[1]");
    ck_assert(has_err(e, "routes[1].filter: found an array; expected a filter object"));
    amp_errs_destroy(e);
}
END_TEST

START_TEST(filter_depth_cap) {
    /* 32 nested "not" levels compile, 33 do not. */
    char spec[2048] = "";
    for (int depth = 32; depth <= 33; depth++) {
        spec[0] = '\0';
        for (int i = 1; i < depth; i++)
            strcat(spec, "{'not':");
        strcat(spec, "{'field':'n','op':'exists'}");
        for (int i = 1; i < depth; i++)
            strcat(spec, "}");
        json_t *f = j(spec);
        amp_errs *errs = amp_errs_create();
        amp_filter *flt = amp_map_filter_compile(f, "filter", errs);
        if (depth == 32) {
            ck_assert_ptr_nonnull(flt);
        } else {
            ck_assert_ptr_null(flt);
            ck_assert_uint_eq(amp_errs_count(errs), 1);
            ck_assert_ptr_nonnull(strstr(
                amp_errs_get(errs, 0), "found a filter nested deeper; expected at most 32 levels"));
        }
        amp_map_filter_free(flt);
        amp_errs_destroy(errs);
        json_decref(f);
    }
}
END_TEST

/* ---- transforms ------------------------------------------------------ */

/* Run a chain on a value (single-quoted JSON, or NULL = missing) and
 * return the compact JSON of the result ("<missing>" when unset). */
static char *xf(const char *chain, const char *value) {
    json_t *spec = json_string(chain);
    amp_errs *errs = amp_errs_create();
    amp_xform *x = amp_map_xform_compile(spec, "t", errs);
    if (!x)
        ck_abort_msg("transform did not compile: %s", amp_errs_get(errs, 0));
    const char *why;
    json_t *out = amp_map_xform_apply(x, value ? j(value) : NULL, &why);
    char *s =
        out ? json_dumps(out, JSON_ENCODE_ANY | JSON_COMPACT) : strdup(why ? why : "<missing>");
    json_decref(out);
    amp_map_xform_free(x);
    amp_errs_destroy(errs);
    json_decref(spec);
    return s;
}

#define XF(chain, in, want)                                                                        \
    do {                                                                                           \
        char *got_ = xf(chain, in);                                                                \
        ck_assert_str_eq(got_, want);                                                              \
        free(got_);                                                                                \
    } while (0)

START_TEST(transform_text) {
    XF("trim", "'  a b \\t\\n'", "\"a b\"");
    XF("trim", "''", "\"\"");
    XF("trim", "5", "5");
    XF("trim|lowercase", "' MiXeD ÄÖ '", "\"mixed ÄÖ\"");
    XF("uppercase", "'straße é'", "\"STRAßE é\"");
    XF(" trim | uppercase ", "' x '", "\"X\"");
    XF("lowercase", "null", "null");
    XF("lowercase", "[\"A\"]", "[\"A\"]");
    XF("truncate:3", "'héllo'", "\"hél\"");
    XF("truncate:2", "'你好世界'", "\"你好\"");
    XF("truncate:1", "'😀😀'", "\"😀\"");
    XF("truncate:0", "'abc'", "\"\"");
    XF("truncate:10", "'abc'", "\"abc\"");
    XF("truncate:1", "12345", "12345");
}
END_TEST

START_TEST(transform_conversions) {
    XF("iso8601", "'2026-11-21 10:15:42.123000'", "\"2026-11-21T10:15:42.123Z\"");
    XF("iso8601", "'2026-11-21 10:15:42.123'", "\"2026-11-21T10:15:42.123Z\"");
    XF("iso8601", "'2026-11-21 10:15:42'", "\"2026-11-21T10:15:42.000Z\"");
    XF("iso8601", "1795256142123", "\"2026-11-21T10:15:42.123Z\"");
    XF("iso8601", "1795256142123.9", "\"2026-11-21T10:15:42.123Z\"");
    XF("iso8601", "'2026-11-21T11:15:42+01:00'", "\"2026-11-21T10:15:42.000Z\"");
    XF("iso8601", "'yesterday'", "null");
    XF("iso8601", "true", "null");
    XF("iso8601", "999999999999999999", "null");

    XF("to_string", "42", "\"42\"");
    XF("to_string", "-0.5", "\"-0.5\"");
    XF("to_string", "true", "\"true\"");
    XF("to_string", "{'a':[1,'x']}", "\"{\\\"a\\\":[1,\\\"x\\\"]}\"");
    XF("to_string", "null", "null");
    XF("to_string", "'s'", "\"s\"");

    XF("to_number", "'42'", "42");
    XF("to_number", "' -4.5e1 '", "-45.0");
    XF("to_number", "'9223372036854775807'", "9223372036854775807");
    XF("to_number", "'99999999999999999999'", "1e20");
    XF("to_number", "'0x10'", "null");
    XF("to_number", "'nan'", "null");
    XF("to_number", "''", "null");
    XF("to_number", "'1.'", "null");
    XF("to_number", "false", "0");
    XF("to_number", "7.25", "7.25");
    XF("to_number|default:0", "'abc'", "\"0\"");

    XF("sha256", "'alice@example.com'",
       "\"ff8d9819fc0e12bf0d24892e45987e249a28dce836a85cad60e28eaaa8c6d976\"");
    XF("sha256", "42", "\"73475cb40a568e8da8a045ced110137e159f890ac4da883b6b17dc651b3a8049\"");
    XF("trim|lowercase|sha256", "' Alice@Example.com '",
       "\"ff8d9819fc0e12bf0d24892e45987e249a28dce836a85cad60e28eaaa8c6d976\"");
    XF("sha256", "null", "null");
}
END_TEST

START_TEST(transform_default_required) {
    XF("default:n/a", NULL, "\"n/a\"");
    XF("default:n/a", "null", "\"n/a\"");
    XF("default:n/a", "''", "\"\"");
    XF("default:", NULL, "\"\"");
    XF("default:a:b", NULL, "\"a:b\"");
    XF("default:42", NULL, "\"42\"");
    XF("default:42|to_number", NULL, "42");
    XF("trim", NULL, "<missing>");
    XF("required", NULL, "missing");
    XF("required", "null", "null");
    XF("required", "''", "\"\"");
    XF("default:x|required", NULL, "\"x\"");
    XF("iso8601|required", "'bad'", "null");
}
END_TEST

START_TEST(transform_array_form) {
    json_t *spec = j("['trim','default:a|b']");
    amp_errs *errs = amp_errs_create();
    amp_xform *x = amp_map_xform_compile(spec, "t", errs);
    ck_assert_ptr_nonnull(x);
    const char *why;
    json_t *out = amp_map_xform_apply(x, NULL, &why);
    ck_assert_str_eq(json_string_value(out), "a|b");
    json_decref(out);
    amp_map_xform_free(x);
    amp_errs_destroy(errs);
    json_decref(spec);
}
END_TEST

static amp_errs *xform_errs(const char *spec_json) {
    json_t *spec = j(spec_json);
    amp_errs *errs = amp_errs_create();
    ck_assert_ptr_null(amp_map_xform_compile(spec, "routes[1].map[0].transform", errs));
    json_decref(spec);
    return errs;
}

START_TEST(transform_compile_errors) {
    amp_errs *e = xform_errs("'trim|upper'");
    ck_assert(has_err(
        e, "routes[1].map[0].transform: found 'upper'; expected one of trim, lowercase, uppercase, "
           "iso8601, to_string, to_number, default:<value>, truncate:<n>, sha256, required"));
    amp_errs_destroy(e);
    e = xform_errs("'trim||lowercase'");
    ck_assert(starts(amp_errs_get(e, 0), "routes[1].map[0].transform: found an empty transform"));
    amp_errs_destroy(e);
    e = xform_errs("'truncate:-1|truncate|trim:2|default'");
    ck_assert_uint_eq(amp_errs_count(e), 4);
    ck_assert(has_err(
        e, "routes[1].map[0].transform: found 'trim:2'; expected 'trim' without an argument"));
    ck_assert(has_err(
        e,
        "routes[1].map[0].transform: found 'default' without a value; expected default:<value>"));
    amp_errs_destroy(e);
    e = xform_errs("['trim', 3]");
    ck_assert(
        has_err(e, "routes[1].map[0].transform[1]: found an integer; expected a transform string"));
    amp_errs_destroy(e);
    e = xform_errs("5");
    ck_assert_uint_eq(amp_errs_count(e), 1);
    amp_errs_destroy(e);
}
END_TEST

/* ---- templates ------------------------------------------------------- */

static char *render(const char *tmpl, const char *event, const char *inputs) {
    amp_errs *errs = amp_errs_create();
    amp_tmpl *t = amp_map_tmpl_compile(tmpl, "q", errs);
    if (!t)
        ck_abort_msg("template did not compile: %s", amp_errs_get(errs, 0));
    json_t *ev = j(event), *in = j(inputs);
    amp_buf b;
    amp_buf_init(&b, AMP_TEMPLATE_MAX_BYTES);
    amp_buf_append(&b, "", 0);
    amp_map_tmpl_render(t, ev, in, &b);
    char *s = strdup(b.data);
    amp_buf_free(&b);
    json_decref(ev);
    json_decref(in);
    amp_map_tmpl_free(t);
    amp_errs_destroy(errs);
    return s;
}

#define RENDER(tmpl, ev, in, want)                                                                 \
    do {                                                                                           \
        char *got_ = render(tmpl, ev, in);                                                         \
        ck_assert_str_eq(got_, want);                                                              \
        free(got_);                                                                                \
    } while (0)

START_TEST(template_render) {
    const char *ev = "{'event_type':'Buy','n':3,'f':0.1,'b':false,'z':null,'o':{'k':[1,'v']},"
                     "'inputs':{'x':'event-inputs'},'p':{'a.b':'dot'}}";
    const char *in = "{'name':'Ann','deep':{'x':'y'}}";
    RENDER("{{event_type}} by {{inputs.name}}", ev, in, "Buy by Ann");
    RENDER("n={{n}} f={{f}} b={{b}} z=[{{z}}] m=[{{missing}}]", ev, in,
           "n=3 f=0.1 b=false z=[] m=[]");
    RENDER("{{o}}|{{inputs}}", ev, in,
           "{\"k\":[1,\"v\"]}|{\"name\":\"Ann\",\"deep\":{\"x\":\"y\"}}");
    RENDER("{{ inputs.deep.x }} {{[\"inputs\"].x}} {{p[\"a.b\"]}}", ev, in, "y event-inputs dot");
    RENDER("no fields }} here", ev, in, "no fields }} here");
    RENDER("", ev, in, "");
    RENDER("{{o.k[1]}}{{o.k[0]}}", ev, in, "v1");
}
END_TEST

START_TEST(template_errors) {
    amp_errs *e = amp_errs_create();
    ck_assert_ptr_null(amp_map_tmpl_compile("hi {{user_id", "routes[0].query", e));
    ck_assert(
        has_err(e, "routes[0].query: found an unclosed '{{' at offset 3; expected a template"));
    ck_assert_ptr_null(amp_map_tmpl_compile("{{ }}", "routes[0].user", e));
    ck_assert(has_err(e, "routes[0].user: found an empty {{}} at offset 0; expected a template"));
    ck_assert_ptr_null(amp_map_tmpl_compile("x{{a..b}}", "routes[0].user", e));
    ck_assert(has_err(e, "routes[0].user: found field path 'a..b' at offset 1 (empty key at offset "
                         "2); expected a template"));
    amp_errs_destroy(e);
}
END_TEST

/* ---- mapper ---------------------------------------------------------- */

static amp_mapper *compile_cfg(const char *cfg, amp_errs *errs) {
    json_t *root = j(cfg);
    amp_mapper *m =
        amp_mapper_compile(json_object_get(root, "apps"), json_object_get(root, "routes"), errs);
    json_decref(root);
    return m;
}

typedef struct got {
    json_t *reqs; /* [{"route","app","user","per_user","body"}] */
} got;

static void collect(void *ctx, const amp_map_request *req) {
    got *g = ctx;
    json_array_append_new(g->reqs, json_pack("{s:s,s:s,s:s,s:b,s:O}", "route", req->route, "app",
                                             req->app->name, "user", req->user, "per_user",
                                             req->per_user, "body", req->body));
}

static void collect_explain(void *ctx, const char *route, const char *reason) {
    json_array_append_new(ctx, json_pack("[s,s]", route, reason));
}

/* Apply cfg to one event; returns the requests (caller owns). */
static json_t *apply(const char *cfg, const char *event, int *rc, char *detail, size_t dlen) {
    amp_errs *errs = amp_errs_create();
    amp_mapper *m = compile_cfg(cfg, errs);
    if (!m)
        ck_abort_msg("config did not compile: %s", amp_errs_get(errs, 0));
    got g = {json_array()};
    json_t *ev = j(event);
    *rc = amp_mapper_apply(m, ev, collect, &g, NULL, NULL, detail, dlen);
    json_decref(ev);
    amp_mapper_destroy(m);
    amp_errs_destroy(errs);
    return g.reqs;
}

static void assert_json(const json_t *got_, const char *want_sq) {
    json_t *want = j(want_sq);
    if (!json_equal((json_t *)got_, want)) {
        char *a = json_dumps(got_, JSON_COMPACT | JSON_ENCODE_ANY);
        char *b = json_dumps(want, JSON_COMPACT | JSON_ENCODE_ANY);
        ck_abort_msg("got %s\nwant %s", a, b);
    }
    json_decref(want);
}

START_TEST(mapper_spec_example) {
    const char *cfg =
        "{'apps':{'support':{'api_key_env':'DIFY_API_KEY','endpoint':'chat','rate_per_sec':10,"
        "'burst':20,'max_in_flight':8}},"
        "'routes':[{'name':'ai-usage','filter':{'all':[{'field':'event_type','op':'equals',"
        "'value':'AI_Generation_Executed'},{'field':'user_id','op':'exclude_null'}]},"
        "'map':[{'source':'user_properties.user_name','target':'username','transform':'trim|"
        "lowercase'},{'source':'event_properties.plan','target':'plan'}],'app':'support',"
        "'query':'{{event_type}} by {{inputs.username}} on plan {{inputs.plan}}',"
        "'user':'{{user_id}}','conversation':'per_user'}]}";
    int rc;
    char detail[256];
    json_t *r = apply(cfg,
                      "{'event_type':'AI_Generation_Executed','user_id':'u-1','user_properties':"
                      "{'user_name':'  Ada '},'event_properties':{'plan':'team'}}",
                      &rc, detail, sizeof(detail));
    ck_assert_int_eq(rc, 1);
    assert_json(r, "[{'route':'ai-usage','app':'support','user':'u-1','per_user':true,'body':"
                   "{'inputs':{'username':'ada','plan':'team'},'query':'AI_Generation_Executed by "
                   "ada on plan team','user':'u-1','response_mode':'blocking'}}]");
    /* Body keys in Dify's documented order. */
    char *s = json_dumps(json_object_get(json_array_get(r, 0), "body"), JSON_COMPACT);
    ck_assert(!strncmp(s, "{\"inputs\":", 10));
    ck_assert_ptr_nonnull(strstr(s, "\"query\":\"AI_Generation_Executed by ada on plan team\","
                                    "\"user\":\"u-1\",\"response_mode\":\"blocking\"}"));
    free(s);
    json_decref(r);

    r = apply(cfg, "{'event_type':'Other','user_id':'u-1'}", &rc, detail, sizeof(detail));
    ck_assert_int_eq(rc, 0);
    ck_assert_uint_eq(json_array_size(r), 0);
    json_decref(r);
}
END_TEST

START_TEST(mapper_endpoints_and_defaults) {
    const char *cfg =
        "{'apps':{'c':{'api_key_env':'K1'},'p':{'api_key_file':'/run/k','endpoint':'completion',"
        "'response_mode':'streaming'},'w':{'api_key_env':'K3','endpoint':'workflow'}},"
        "'routes':[{'name':'r-chat','app':'c'},"
        "{'name':'r-comp','app':'p','map':[{'source':'n','target':'x.y'}]},"
        "{'name':'r-comp-q','app':'p','query':'q={{n}}','user':'{{nothing}}'},"
        "{'name':'r-wf','app':'w','user':'wf-{{device_id}}','map':[{'source_field':'event_type',"
        "'target_field':'t','transformer':'lowercase'}]}]}";
    int rc;
    char detail[256];
    json_t *r =
        apply(cfg, "{'event_type':'Ev','device_id':'d9','n':1.5}", &rc, detail, sizeof(detail));
    ck_assert_int_eq(rc, 4);
    assert_json(
        r, "[{'route':'r-chat','app':'c','user':'d9','per_user':false,'body':{'inputs':{},"
           "'query':'Ev','user':'d9','response_mode':'blocking'}},"
           "{'route':'r-comp','app':'p','user':'d9','per_user':false,'body':{'inputs':{'x':{'y':"
           "1.5}},'user':'d9','response_mode':'streaming'}},"
           "{'route':'r-comp-q','app':'p','user':'d9','per_user':false,'body':{'inputs':{},"
           "'query':'q=1.5','user':'d9','response_mode':'streaming'}},"
           "{'route':'r-wf','app':'w','user':'wf-d9','per_user':false,'body':{'inputs':{'t':'ev'},"
           "'user':'wf-d9','response_mode':'blocking'}}]");
    json_decref(r);

    amp_errs *errs = amp_errs_create();
    amp_mapper *m = compile_cfg(cfg, errs);
    ck_assert_ptr_nonnull(m);
    ck_assert_uint_eq(amp_mapper_app_count(m), 3);
    const amp_app *a = amp_mapper_app(m, 0);
    ck_assert_str_eq(a->name, "c");
    ck_assert_str_eq(a->api_key_env, "K1");
    ck_assert_ptr_null(a->api_key_file);
    ck_assert_int_eq(a->endpoint, AMP_ENDPOINT_CHAT);
    ck_assert(!a->streaming);
    ck_assert(a->rate_per_sec == 0);
    ck_assert_uint_eq(a->burst, 1);
    ck_assert_uint_eq(a->max_in_flight, 8);
    a = amp_mapper_app(m, 1);
    ck_assert_str_eq(a->api_key_file, "/run/k");
    ck_assert_ptr_null(a->api_key_env);
    ck_assert(a->streaming);
    ck_assert_str_eq(amp_map_endpoint_path(amp_mapper_app(m, 2)->endpoint), "workflows/run");
    ck_assert_ptr_null(amp_mapper_app(m, 3));
    amp_mapper_destroy(m);
    amp_errs_destroy(errs);
}
END_TEST

START_TEST(mapper_burst_default) {
    amp_errs *errs = amp_errs_create();
    amp_mapper *m = compile_cfg("{'apps':{'a':{'api_key_env':'K','rate_per_sec':2.5},"
                                "'b':{'api_key_env':'K','rate_per_sec':0.2,'burst':3,"
                                "'max_in_flight':1}},'routes':[]}",
                                errs);
    ck_assert_ptr_nonnull(m);
    ck_assert_uint_eq(amp_mapper_app(m, 0)->burst, 3);
    ck_assert_uint_eq(amp_mapper_app(m, 1)->burst, 3);
    ck_assert_uint_eq(amp_mapper_app(m, 1)->max_in_flight, 1);
    ck_assert(amp_mapper_app(m, 1)->rate_per_sec == 0.2);
    amp_mapper_destroy(m);
    amp_errs_destroy(errs);
}
END_TEST

START_TEST(mapper_required_rejects_all) {
    const char *cfg =
        "{'apps':{'c':{'api_key_env':'K'}},'routes':[{'name':'first','app':'c'},"
        "{'name':'needs-email','app':'c','map':[{'source':'user_properties.email','target':'e',"
        "'transform':'trim|required'}]}]}";
    int rc;
    char detail[256];
    json_t *r = apply(cfg, "{'event_type':'E','user_id':'u'}", &rc, detail, sizeof(detail));
    ck_assert_int_eq(rc, -1);
    ck_assert_uint_eq(json_array_size(r), 0); /* the first route emitted nothing either */
    ck_assert_str_eq(detail,
                     "routes[1] (needs-email): required field user_properties.email is missing");
    json_decref(r);

    r = apply(cfg, "{'event_type':'E','user_id':'u','user_properties':{'email':null}}", &rc, detail,
              sizeof(detail));
    ck_assert_int_eq(rc, -1);
    ck_assert_str_eq(detail,
                     "routes[1] (needs-email): required field user_properties.email is null");
    json_decref(r);

    r = apply(cfg, "{'event_type':'E','user_id':'u','user_properties':{'email':' a@b '}}", &rc,
              detail, sizeof(detail));
    ck_assert_int_eq(rc, 2);
    ck_assert_str_eq(
        json_string_value(json_object_get(
            json_object_get(json_object_get(json_array_get(r, 1), "body"), "inputs"), "e")),
        "a@b");
    json_decref(r);
}
END_TEST

START_TEST(mapper_values_keep_types) {
    const char *cfg =
        "{'apps':{'c':{'api_key_env':'K'}},'routes':[{'name':'r','app':'c','map':["
        "{'source':'p.n','target':'n'},{'source':'p.f','target':'f'},{'source':'p.b','target':'b'},"
        "{'source':'p.z','target':'z'},{'source':'p.o','target':'o'},{'source':'p.a','target':'a'},"
        "{'source':'p.missing','target':'m'},{'source':'p.big','target':'big'},"
        "{'source':'p[\\'k.d\\']','target':'kd'},{'source':'p.a[1]','target':'a1'}]}]}";
    int rc;
    char detail[256];
    json_t *r = apply(cfg,
                      "{'event_type':'E','user_id':'u','p':{'n':1,'f':1.25,'b':true,'z':null,"
                      "'o':{'x':[1]},'a':['s',2],'big':9223372036854775807,'k.d':'dotted'}}",
                      &rc, detail, sizeof(detail));
    ck_assert_int_eq(rc, 1);
    assert_json(json_object_get(json_object_get(json_array_get(r, 0), "body"), "inputs"),
                "{'n':1,'f':1.25,'b':true,'z':null,'o':{'x':[1]},'a':['s',2],"
                "'big':9223372036854775807,'kd':'dotted','a1':2}");
    json_decref(r);
}
END_TEST

/* A mapped object is shared with the event, not copied: neither the event
 * nor the other route's body changes, and a path written through a shared
 * object (amp_map_path_set; the config keeps targets apart, so only as a
 * safeguard) writes into a copy. */
START_TEST(mapper_shared_values_stay_unchanged) {
    const char *cfg =
        "{'apps':{'c':{'api_key_env':'K'}},'routes':["
        "{'name':'r1','app':'c','map':[{'source':'p','target':'props'},"
        "{'source':'event_type','target':'meta.type'},{'source':'p.o','target':'meta.o'}]},"
        "{'name':'r2','app':'c','map':[{'source':'p','target':'props'},"
        "{'source':'p.o','target':'o','transform':'to_string'}]}]}";
    amp_errs *errs = amp_errs_create();
    amp_mapper *m = compile_cfg(cfg, errs);
    ck_assert_msg(m != NULL, "%s", amp_errs_get(errs, 0));
    got g = {json_array()};
    json_t *ev = j("{'event_type':'E','user_id':'u','p':{'n':1,'o':{'x':[1]}}}");
    json_t *before = json_deep_copy(ev);
    char detail[256];
    ck_assert_int_eq(amp_mapper_apply(m, ev, collect, &g, NULL, NULL, detail, sizeof detail), 2);
    ck_assert_msg(json_equal(ev, before), "the event changed");
    assert_json(json_object_get(json_object_get(json_array_get(g.reqs, 0), "body"), "inputs"),
                "{'props':{'n':1,'o':{'x':[1]}},'meta':{'type':'E','o':{'x':[1]}}}");
    assert_json(json_object_get(json_object_get(json_array_get(g.reqs, 1), "body"), "inputs"),
                "{'props':{'n':1,'o':{'x':[1]}},'o':'{\\\"x\\\":[1]}'}");
    json_decref(g.reqs);
    amp_mapper_destroy(m);
    amp_errs_destroy(errs);

    /* Through a shared object, at two depths: the original keeps its members. */
    json_t *root = json_object();
    json_object_set(root, "props", json_object_get(ev, "p"));
    amp_path path;
    char err[160];
    ck_assert_int_eq(amp_map_path_parse(&path, "props.o.deep", false, err, sizeof err), 0);
    ck_assert_int_eq(amp_map_path_set(&path, root, json_string("d")), 0);
    amp_map_path_free(&path);
    ck_assert_int_eq(amp_map_path_parse(&path, "props.extra", false, err, sizeof err), 0);
    ck_assert_int_eq(amp_map_path_set(&path, root, json_true()), 0);
    amp_map_path_free(&path);
    ck_assert_msg(json_equal(ev, before), "the event changed through a shared object");
    assert_json(root, "{'props':{'n':1,'o':{'x':[1],'deep':'d'},'extra':true}}");
    json_decref(root);
    json_decref(before);
    json_decref(ev);
}
END_TEST

START_TEST(mapper_explain_callback) {
    const char *cfg = "{'apps':{'c':{'api_key_env':'K'}},'routes':[{'name':'r1','app':'c',"
                      "'filter':{'field':'event_type','op':'in','value':['A','B']}},"
                      "{'name':'r2','app':'c'}]}";
    amp_errs *errs = amp_errs_create();
    amp_mapper *m = compile_cfg(cfg, errs);
    ck_assert_msg(m != NULL, "%s", amp_errs_get(errs, 0));
    got g = {json_array()};
    json_t *reasons = json_array();
    json_t *ev = j("{'event_type':'C','user_id':'u'}");
    ck_assert_int_eq(amp_mapper_apply(m, ev, collect, &g, collect_explain, reasons, NULL, 0), 1);
    assert_json(reasons, "[['r1','filter: event_type in [\\'A\\',\\'B\\'] is false']]");
    json_decref(ev);
    json_decref(reasons);
    json_decref(g.reqs);
    amp_mapper_destroy(m);
    amp_errs_destroy(errs);
}
END_TEST

/* Compile a config expecting failure; caller owns the errors. */
static amp_errs *cfg_errs(const char *cfg) {
    amp_errs *errs = amp_errs_create();
    ck_assert_ptr_null(compile_cfg(cfg, errs));
    ck_assert_uint_gt(amp_errs_count(errs), 0);
    return errs;
}

START_TEST(mapper_app_errors) {
    amp_errs *e = cfg_errs("{'routes':[]}");
    ck_assert(has_err(e, "apps: found nothing; expected an object of Dify apps, e.g. {\"support\": "
                         "{\"api_key_env\": \"DIFY_API_KEY\"}}"));
    amp_errs_destroy(e);

    e = cfg_errs("{'apps':{'a':{'api_key_env':'K','api_key_file':'/f','endpoint':'chatbot',"
                 "'response_mode':'fast','rate_per_sec':-1,'burst':0,'max_in_flight':1.5,"
                 "'colour':'red'},'b':{},'x.y':{'api_key_env':'bad name'},'':{'api_key_env':'K'}},"
                 "'routes':[]}");
    ck_assert(has_err(e,
                      "apps.a.colour: found an unknown key; expected one of api_key_env, "
                      "api_key_file, endpoint, response_mode, rate_per_sec, burst, max_in_flight"));
    ck_assert(
        has_err(e, "apps.a: found both api_key_env and api_key_file; expected only one of them"));
    ck_assert(
        has_err(e, "apps.a.endpoint: found 'chatbot'; expected one of chat, completion, workflow"));
    ck_assert(
        has_err(e, "apps.a.response_mode: found 'fast'; expected one of blocking, streaming"));
    ck_assert(has_err(
        e, "apps.a.rate_per_sec: found -1; expected a number from 0 (unlimited) to 1000000"));
    ck_assert(has_err(e, "apps.a.burst: found 0; expected an integer from 1 to 1000000"));
    ck_assert(
        has_err(e, "apps.a.max_in_flight: found a number; expected an integer from 1 to 10000"));
    ck_assert(has_err(e, "apps[\"x.y\"].api_key_env: found 'bad name'; expected an environment "
                         "variable name ([A-Za-z_][A-Za-z0-9_]*)"));
    ck_assert(has_err(e, "apps[\"\"]: found an empty name; expected a non-empty app name"));
    ck_assert_uint_eq(amp_errs_count(e), 9);
    amp_errs_destroy(e);

    e = cfg_errs("{'apps':[],'routes':{}}");
    ck_assert(has_err(e, "apps: found an empty array; expected an object of Dify apps"));
    ck_assert(has_err(e, "routes: found an object; expected an array of routes"));
    amp_errs_destroy(e);
}
END_TEST

/* SPEC: DIFY_API_KEY is "the key of the default Dify app": an app that names
 * no key source reads it (or DIFY_API_KEY_FILE). */
START_TEST(mapper_app_default_key) {
    amp_errs *e = amp_errs_create();
    amp_mapper *m = compile_cfg("{'apps':{'a':{},'b':{'api_key_file':'/run/k'}},"
                                "'routes':[{'name':'r','app':'a'}]}",
                                e);
    ck_assert_msg(m != NULL, "%s", amp_errs_count(e) ? amp_errs_get(e, 0) : "");
    ck_assert_str_eq(amp_mapper_app(m, 0)->api_key_env, "DIFY_API_KEY");
    ck_assert_ptr_null(amp_mapper_app(m, 0)->api_key_file);
    ck_assert_ptr_null(amp_mapper_app(m, 1)->api_key_env);
    ck_assert_str_eq(amp_mapper_app(m, 1)->api_key_file, "/run/k");
    amp_mapper_destroy(m);
    amp_errs_destroy(e);
}
END_TEST

START_TEST(mapper_route_errors) {
    amp_errs *e = cfg_errs(
        "{'apps':{'c':{'api_key_env':'K'},'w':{'api_key_env':'K','endpoint':'workflow'}},"
        "'routes':[{'name':'a','app':'nope','maps':[]},"
        "{'name':'a','app':'w','query':'x','conversation':'per_user'},"
        "{'app':'c','conversation':'sticky','user':5},"
        "{'name':'','app':'c','map':[{'source':'a','target':'x'},{'source':'b','target':'x.y'},"
        "{'source':'c','target_field':'z'},{'source':'d'},{'source':'e','target':'q[0]'},"
        "{'source':'f','target':'dup'},{'source':'g','target':'dup','transform':'nope'}]},"
        "7]}");
    ck_assert(has_err(e, "routes[0].maps: found an unknown key; expected one of name, filter, map, "
                         "app, query, user, conversation, report"));
    ck_assert(has_err(e, "routes[0].app: found 'nope'; expected one of c, w"));
    ck_assert(has_err(
        e, "routes[1].name: found 'a', also routes[0].name; expected a route name used once"));
    ck_assert(
        has_err(e, "routes[1].query: found a query for app 'w', a workflow; expected no query"));
    ck_assert(has_err(e, "routes[1].conversation: found per_user for app 'w' (endpoint "
                         "'workflow'); expected a chat app"));
    ck_assert(has_err(e, "routes[2].name: found nothing; expected a non-empty string"));
    ck_assert(has_err(e, "routes[2].conversation: found 'sticky'; expected one of none, per_user"));
    ck_assert(has_err(
        e,
        "routes[2].user: found an integer; expected a template string such as \"{{event_type}}\""));
    ck_assert(has_err(e, "routes[3].name: found an empty string; expected a non-empty string"));
    ck_assert(has_err(e, "routes[3].map[1].target: found 'x.y', which collides with target 'x' of "
                         "map[0]; expected a distinct target"));
    ck_assert(has_err(e, "routes[3].map[2]: found both source/target/transform and "
                         "source_field/target_field/transformer; expected one spelling"));
    ck_assert(has_err(e, "routes[3].map[3].target: found nothing; expected a non-empty string"));
    ck_assert(has_err(e, "routes[3].map[4].target: found 'q[0]' (array index at offset 1; a target "
                         "names object keys only); expected a field path"));
    ck_assert(has_err(e, "routes[3].map[6].target: found 'dup', which collides with target 'dup' "
                         "of map[5]; expected a distinct target"));
    ck_assert(has_err(
        e, "routes[3].map[6].transform: found 'nope'; expected one of trim, lowercase, uppercase, "
           "iso8601, to_string, to_number, default:<value>, truncate:<n>, sha256, required"));
    ck_assert(has_err(e, "routes[4]: found an integer; expected a route object"));
    ck_assert_uint_eq(amp_errs_count(e), 16);
    amp_errs_destroy(e);
}
END_TEST

int main(void) {
    Suite *s = suite_create("mapping");
    TCase *tc = tcase_create("mapping");
    tcase_add_test(tc, path_parse_forms);
    tcase_add_test(tc, path_parse_errors);
    tcase_add_test(tc, path_get_set);
    tcase_add_test(tc, value_equality);
    tcase_add_test(tc, real_format);
    tcase_add_test(tc, filter_ops);
    tcase_add_test(tc, filter_combinators);
    tcase_add_test(tc, filter_explain);
    tcase_add_test(tc, filter_compile_errors);
    tcase_add_test(tc, filter_depth_cap);
    tcase_add_test(tc, transform_text);
    tcase_add_test(tc, transform_conversions);
    tcase_add_test(tc, transform_default_required);
    tcase_add_test(tc, transform_array_form);
    tcase_add_test(tc, transform_compile_errors);
    tcase_add_test(tc, template_render);
    tcase_add_test(tc, template_errors);
    tcase_add_test(tc, mapper_spec_example);
    tcase_add_test(tc, mapper_endpoints_and_defaults);
    tcase_add_test(tc, mapper_burst_default);
    tcase_add_test(tc, mapper_required_rejects_all);
    tcase_add_test(tc, mapper_values_keep_types);
    tcase_add_test(tc, mapper_shared_values_stay_unchanged);
    tcase_add_test(tc, mapper_explain_callback);
    tcase_add_test(tc, mapper_app_errors);
    tcase_add_test(tc, mapper_app_default_key);
    tcase_add_test(tc, mapper_route_errors);
    suite_add_tcase(s, tc);
    return amp_check_run(s);
}
