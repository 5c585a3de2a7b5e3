/*
 * Unit tests for forward/decide.c: every row of tests/unit/data/decide.tsv
 * is one exchange with Dify (what came back, the job, the settings) and the
 * verdict amp_forward_decide must reach (ack kind, stored status, code and
 * message, the code counted in metrics, pause verdict, conversation action,
 * due time). The table must also reach every outcome, every ack kind,
 * every pause verdict and every (outcome, kind) pair the rules produce, so
 * a rule cannot drop out of it unnoticed.
 */
#include "../../forward/forward.h"
#include "../../forward/forward_int.h"
#include "../check_run.h"

#include <check.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define TABLE "tests/unit/data/decide.tsv"
#define NCOLS 30
#define NOW_MS ((int64_t)1700000000000)

static const char *const kinds[] = {"DELIVERED", "RETRY", "DEAD", "RELEASE", "WAITING", "HOLD"};
#define HOLD_INDEX 5 /* not an ack kind: RELEASE with hold */
static const char *const pauses[] = {"NONE", "APP", "PROBE_REJECTED", "PROBE_AGAIN", "RESUME"};
static const char *const convs[] = {"KEEP", "STORE", "CLEAR"};
static const char *const outcomes[] = {
    "delivered", "retry", "permanent", "pause_app", "reset_conversation", "waiting_input"};

#define NKINDS (sizeof kinds / sizeof kinds[0])
#define NPAUSES (sizeof pauses / sizeof pauses[0])
#define NOUTCOMES (sizeof outcomes / sizeof outcomes[0])

/* Index of name in names[], or -1. */
static int lookup(const char *const *names, size_t n, const char *name) {
    for (size_t i = 0; i < n; i++)
        if (strcmp(names[i], name) == 0)
            return (int)i;
    return -1;
}

static const char *opt(const char *s) {
    return strcmp(s, "-") == 0 ? NULL : s;
}

static int64_t num(const char *s, int line) {
    char *end;
    errno = 0;
    long long v = strtoll(s, &end, 10);
    ck_assert_msg(errno == 0 && end != s && *end == '\0', "%s:%d: not a number: '%s'", TABLE, line,
                  s);
    return (int64_t)v;
}

static bool flag(const char *s, int line) {
    ck_assert_msg(strcmp(s, "0") == 0 || strcmp(s, "1") == 0, "%s:%d: want 0 or 1: '%s'", TABLE,
                  line, s);
    return s[0] == '1';
}

static bool same(const char *want, const char *got) {
    return want ? got && strcmp(want, got) == 0 : !got;
}

/* Split line at tabs in place; the number of fields. */
static int split(char *line, char **f, int max) {
    int n = 0;
    for (char *p = line; n < max;) {
        f[n++] = p;
        char *tab = strchr(p, '\t');
        if (!tab)
            break;
        *tab = '\0';
        p = tab + 1;
    }
    return n;
}

typedef struct {
    bool kind[NKINDS], pause[NPAUSES], outcome[NOUTCOMES];
    bool pair[NOUTCOMES][NKINDS];
} seen_t;

/* Every (outcome, ack kind) pair the rules can produce; the table must
 * reach each one. */
static const struct {
    const char *outcome, *kind;
} pairs[] = {
    {"delivered", "DELIVERED"},      /* 2xx */
    {"retry", "RETRY"},              /* 429, 5xx, no answer */
    {"retry", "DEAD"},               /* ... past retry.max_age: expired */
    {"retry", "RELEASE"},            /* ended by a stop */
    {"permanent", "DEAD"},           /* other 4xx, failed workflow, bad stored body */
    {"pause_app", "HOLD"},           /* 401/403 */
    {"reset_conversation", "RETRY"}, /* 404 of a sent conversation */
    {"reset_conversation", "DEAD"},  /* 404 "Conversation Not Exists." without one */
    {"waiting_input", "WAITING"},    /* workflow_paused, human_input_required */
};

/* Check one row; the number of mismatches (each printed). */
static int check_row(char **c, int line, seen_t *seen) {
    amp_forward_exchange in = {0};
    const char *refused = opt(c[1]), *transport = opt(c[3]), *message = opt(c[6]);
    const char *wf = opt(c[7]);
    in.refused_code = refused;
    in.aborted = flag(c[2], line);
    if (transport) {
        in.transport_error = in.aborted ? 42 : 28; /* CURLE_ABORTED_BY_CALLBACK, TIMEDOUT */
        in.transport_code = transport;
    }
    in.status = (long)num(c[4], line);
    in.code = opt(c[5]);
    if (refused)
        in.refused_message = message;
    else if (transport)
        in.transport_message = message;
    else if (wf)
        in.workflow_error = message;
    else
        in.message = message;
    in.workflow_status = wf;
    in.conversation_id = opt(c[8]);
    in.too_large = flag(c[9], line);
    in.retry_after_ms = num(c[10], line);
    in.attempts = (int)num(c[11], line);
    in.now_ms = NOW_MS;
    in.created_ms = NOW_MS - num(c[12], line) * 1000;
    in.retry_max_age_s = num(c[13], line);
    in.per_user = flag(c[14], line);
    in.had_conversation = flag(c[15], line);
    in.probe = flag(c[16], line);
    in.retry_initial_ms = num(c[17], line);
    in.retry_max_ms = num(c[18], line);
    char *end;
    in.rnd = strtod(c[19], &end);
    ck_assert_msg(*end == '\0', "%s:%d: rnd '%s'", TABLE, line, c[19]);

    int want_outcome = lookup(outcomes, NOUTCOMES, c[20]);
    int want_kind = lookup(kinds, NKINDS, c[21]);
    int want_pause = lookup(pauses, NPAUSES, c[26]);
    int want_conv = lookup(convs, sizeof convs / sizeof convs[0], c[27]);
    ck_assert_msg(want_outcome >= 0 && want_kind >= 0 && want_pause >= 0 && want_conv >= 0,
                  "%s:%d: unknown outcome, kind, pause or conversation name", TABLE, line);
    seen->outcome[want_outcome] = seen->kind[want_kind] = seen->pause[want_pause] = true;
    seen->pair[want_outcome][want_kind] = true;

    amp_forward_verdict v;
    amp_forward_decide(&in, &v);

    int got_kind = v.hold ? HOLD_INDEX : (int)v.kind;
    int bad = 0;
#define EXPECT(cond, ...)                                                                          \
    do {                                                                                           \
        if (!(cond)) {                                                                             \
            fprintf(stderr, "%s:%d (%s): ", TABLE, line, c[0]);                                    \
            fprintf(stderr, __VA_ARGS__);                                                          \
            fputc('\n', stderr);                                                                   \
            bad++;                                                                                 \
        }                                                                                          \
    } while (0)
    EXPECT((int)v.outcome == want_outcome, "outcome %s, want %s", outcomes[v.outcome], c[20]);
    EXPECT(got_kind == want_kind, "kind %s, want %s", kinds[got_kind], c[21]);
    EXPECT(v.hold == (want_kind == HOLD_INDEX), "hold %d", v.hold);
    EXPECT(v.status == (long)num(c[22], line), "status %ld, want %s", v.status, c[22]);
    EXPECT(same(opt(c[23]), v.code), "code '%s', want '%s'", v.code ? v.code : "-", c[23]);
    EXPECT(same(opt(c[24]), v.message), "message '%s', want '%s'", v.message ? v.message : "-",
           c[24]);
    EXPECT(same(opt(c[25]), v.answer_code), "responses code '%s', want '%s'",
           v.answer_code ? v.answer_code : "-", c[25]);
    EXPECT((int)v.pause == want_pause, "pause %s, want %s", pauses[v.pause], c[26]);
    /* Every HTTP answer (401/403 too) feeds the app's latency estimate. */
    EXPECT(v.answered == (!refused && !in.aborted && !transport && in.status > 0), "answered %d",
           v.answered);
    EXPECT((int)v.conversation == want_conv, "conversation %s, want %s", convs[v.conversation],
           c[27]);
    if (v.conversation == AMP_FORWARD_CONV_STORE)
        EXPECT(same(in.conversation_id, v.conversation_id), "stored conversation '%s'",
               v.conversation_id ? v.conversation_id : "-");
    else
        EXPECT(!v.conversation_id, "conversation id set without STORE");
    EXPECT(v.reset == (want_outcome == AMP_OUTCOME_RESET_CONVERSATION &&
                       want_kind == (int)AMP_QUEUE_ACK_RETRY),
           "reset %d", v.reset);
    EXPECT(v.expired == (same("expired", opt(c[23]))), "expired %d", v.expired);
    if (strcmp(c[28], "-") == 0) {
        EXPECT(v.due_ms == 0 && strcmp(c[29], "-") == 0, "due %lld ms after now, want none",
               (long long)(v.due_ms - NOW_MS));
    } else {
        int64_t lo = num(c[28], line), hi = num(c[29], line);
        int64_t d = v.due_ms - NOW_MS;
        EXPECT(d >= lo && d <= hi, "due %lld ms after now, want %lld..%lld", (long long)d,
               (long long)lo, (long long)hi);
        if (v.kind == AMP_QUEUE_ACK_RETRY)
            EXPECT(v.delay_ms == d, "delay %lld, due - now %lld", (long long)v.delay_ms,
                   (long long)d);
    }
#undef EXPECT
    return bad;
}

START_TEST(test_decide_table) {
    FILE *fp = fopen(TABLE, "r");
    ck_assert_msg(fp != NULL, "cannot open %s (run from the repository root)", TABLE);
    char buf[4096];
    int line = 0, rows = 0, bad = 0;
    seen_t seen = {0};
    while (fgets(buf, sizeof buf, fp)) {
        line++;
        size_t n = strlen(buf);
        ck_assert_msg(n > 0 && buf[n - 1] == '\n', "%s:%d: line too long", TABLE, line);
        buf[--n] = '\0';
        if (n == 0 || buf[0] == '#')
            continue;
        char *c[NCOLS + 1];
        int nc = split(buf, c, NCOLS + 1);
        ck_assert_msg(nc == NCOLS, "%s:%d: %d columns, want %d", TABLE, line, nc, NCOLS);
        bad += check_row(c, line, &seen);
        rows++;
    }
    fclose(fp);
    ck_assert_int_ge(rows, 50);
    ck_assert_msg(bad == 0, "%d mismatches in %s (listed above)", bad, TABLE);
    for (size_t i = 0; i < NOUTCOMES; i++)
        ck_assert_msg(seen.outcome[i], "no row with outcome %s", outcomes[i]);
    for (size_t i = 0; i < NKINDS; i++)
        ck_assert_msg(seen.kind[i], "no row with ack kind %s", kinds[i]);
    for (size_t i = 0; i < NPAUSES; i++)
        ck_assert_msg(seen.pause[i], "no row with pause verdict %s", pauses[i]);
    for (size_t i = 0; i < sizeof pairs / sizeof pairs[0]; i++)
        ck_assert_msg(seen.pair[lookup(outcomes, NOUTCOMES, pairs[i].outcome)]
                               [lookup(kinds, NKINDS, pairs[i].kind)],
                      "no row with outcome %s and ack kind %s", pairs[i].outcome, pairs[i].kind);
}
END_TEST

/* The expiry note quotes Dify's message into a bounded buffer: a long one
 * is cut, never inside a UTF-8 sequence. */
START_TEST(test_expired_message_cut) {
    char msg[2000];
    size_t n = 0;
    for (; n + 2 < sizeof msg; n += 2)
        memcpy(msg + n, "\xc3\xa9", 2); /* é */
    msg[n] = '\0';
    for (int shift = 0; shift < 4; shift++) {
        amp_forward_exchange in = {.status = 500,
                                   .code = "internal_server_error" + shift,
                                   .message = msg,
                                   .retry_after_ms = -1,
                                   .now_ms = NOW_MS,
                                   .created_ms = NOW_MS - 90000000,
                                   .retry_initial_ms = 1000,
                                   .retry_max_ms = 1000,
                                   .retry_max_age_s = 86400};
        amp_forward_verdict v;
        amp_forward_decide(&in, &v);
        ck_assert_int_eq(v.kind, AMP_QUEUE_ACK_DEAD);
        ck_assert(v.expired);
        ck_assert_str_eq(v.code, "expired");
        size_t len = strlen(v.message);
        ck_assert_uint_lt(len, AMP_FORWARD_VERDICT_TEXT);
        ck_assert_uint_gt(len, AMP_FORWARD_VERDICT_TEXT - 4);
        /* Valid UTF-8: the note is ASCII, then whole "é" pairs. */
        const char *tail = strstr(v.message, "error ");
        ck_assert_ptr_nonnull(tail);
        size_t rest = strlen(tail + 6);
        ck_assert_uint_eq(rest % 2, 0);
        ck_assert_int_eq(memcmp(tail + 6, msg, rest), 0);
    }
}
END_TEST

/* amp_forward_classify (JSON body) and the exchange path agree. */
START_TEST(test_classify_reads_the_exchange) {
    json_error_t e;
    json_t *body = json_loads("{\"status\":404,\"code\":\"not_found\",\"message\":\"Conversation "
                              "Not Exists.\",\"conversation_id\":\"c-7\",\"data\":{\"status\":"
                              "\"failed\",\"error\":\"x\"}}",
                              0, &e);
    ck_assert_ptr_nonnull(body);
    amp_forward_exchange ex = {.status = 404};
    amp_forward_exchange_answer(&ex, body);
    ck_assert_str_eq(ex.code, "not_found");
    ck_assert_str_eq(ex.message, "Conversation Not Exists.");
    ck_assert_str_eq(ex.conversation_id, "c-7");
    ck_assert_str_eq(ex.workflow_status, "failed");
    ck_assert_str_eq(ex.workflow_error, "x");
    const char *c1, *m1, *c2, *m2;
    ck_assert_int_eq(amp_forward_classify(0, 404, body, &c1, &m1),
                     amp_forward_outcome(&ex, &c2, &m2));
    ck_assert_ptr_eq(c1, c2);
    ck_assert_ptr_eq(m1, m2);
    json_decref(body);
}
END_TEST

static Suite *decide_suite(void) {
    Suite *s = suite_create("decide");
    TCase *tc = tcase_create("core");
    tcase_add_test(tc, test_decide_table);
    tcase_add_test(tc, test_expired_message_cut);
    tcase_add_test(tc, test_classify_reads_the_exchange);
    suite_add_tcase(s, tc);
    return s;
}

int main(void) {
    return amp_check_run(decide_suite());
}
