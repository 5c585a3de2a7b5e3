/*
 * sign_corpus — the request corpus for the ingest benchmark: N signed
 * amplitude-hmac requests, one line each, in a form wrk's Lua reads with
 * io.lines and splits with one pattern:
 *
 *     <timestamp> TAB <64 hex HMAC> TAB <JSON body>
 *
 * Each body is one realistic Amplitude event (event_type, user_id,
 * device_id, a unique insert_id, event_time, device and location fields,
 * event_properties and user_properties) padded to --size bytes, so every
 * request is stored as a new event rather than counted as a duplicate.
 * The MAC is HMAC-SHA256(secret, "<timestamp>.<body>"), computed here with
 * OpenSSL directly rather than with the product's crypto, so a disagreement
 * between the two shows up as 401s in the benchmark instead of hiding.
 *
 *   sign_corpus --secret-env VAR --count N --out FILE
 *               [--size BYTES] [--timestamp T] [--run-id ID]
 *
 * The secret comes from the environment (the first of a comma-separated
 * list), never from the command line. The timestamp defaults to now, so the
 * corpus passes amp2dify's freshness check for auth.tolerance_seconds
 * (300 s by default) after it is written. Each insert_id is UUID-shaped
 * and random-looking, as the Amplitude SDKs send them, so that each new key
 * lands on its own page of the spool's dedupe index as in real traffic
 * (sequential ids would share pages and flatter the benchmark). They are
 * unique within a corpus (see insert_id()), and --run-id (default: the
 * timestamp and the process id) seeds them, so corpora from different runs
 * do not collide in one spool's dedupe window.
 */
#include <errno.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "../base/parse.h"

#define MAX_SIZE 3500 /* bodies larger than this gain nothing for an ingest benchmark */
#define BODY_CAP 4096
#define PAD_FIELD_MAX (BODY_CAP - 64)
#define NUSERS 10000 /* many users: per-user delivery order never serialises the run */

static const char *const event_types[] = {
    "AI_Generation_Executed", "Page_Viewed",      "Button_Clicked", "Signed_Up",
    "Subscription_Renewed",   "Search_Performed", "File_Uploaded",  "Session_Started",
};
static const char *const platforms[][2] = {
    /* platform, os_name */
    {"Web", "Chrome"},
    {"Web", "Firefox"},
    {"iOS", "ios"},
    {"Android", "android"},
};
static const char *const countries[] = {"Germany", "United States", "Japan", "Brazil", "France"};
static const char *const first_names[] = {"Ada", "Grace", "Alan", "Linus", "Margaret", "Dennis"};
static const char *const last_names[] = {"Lovelace", "Hopper", "Turing", "Hamilton", "Ritchie"};
static const char *const plans[] = {"free", "starter", "pro", "enterprise"};
static const char *const features[] = {"summarize", "translate", "chat", "classify", "extract"};
static const char *const models[] = {"gpt-4o-mini", "claude-3-5-sonnet", "llama-3.1-70b"};

#define PICK(arr, r) (arr[(r) % (sizeof(arr) / sizeof(arr[0]))])

/* splitmix64: a cheap, well-mixed stream from a counter; the corpus only
 * needs variety, and a fixed sequence keeps runs comparable. */
static uint64_t mix(uint64_t x) {
    x += 0x9e3779b97f4a7c15ULL;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
    return x ^ (x >> 31);
}

/* The i-th insert_id of the run seeded by seed, into out[37]. mix() is a
 * bijection, so distinct i give distinct hi, and all 64 bits of hi are in
 * the text: no two ids of one corpus are equal. */
static void insert_id(char out[37], uint64_t seed, uint64_t i) {
    uint64_t hi = mix(seed ^ i), lo = mix(hi);
    snprintf(out, 37, "%08x-%04x-4%03x-%04x-%012llx", (unsigned)(hi >> 32),
             (unsigned)(hi >> 16) & 0xffff, (unsigned)hi & 0xfff,
             0x8000u | (((unsigned)(hi >> 12) & 0xf) << 10) | ((unsigned)(lo >> 54) & 0x3ff),
             (unsigned long long)(lo & 0xffffffffffffULL));
}

/* One event body into out[BODY_CAP]; returns its length, or -1 when the
 * fields alone exceed the buffer. pad is the number of filler characters in
 * event_properties.page_url. */
static int format_body(char *out, uint64_t seed, uint64_t i, int64_t ts, size_t pad) {
    static char filler[PAD_FIELD_MAX + 1];
    if (!filler[0]) {
        for (size_t k = 0; k < PAD_FIELD_MAX; k++)
            filler[k] = (char)('a' + k % 26);
    }
    if (pad > PAD_FIELD_MAX)
        pad = PAD_FIELD_MAX;

    uint64_t r = mix(i);
    char id[37];
    insert_id(id, seed, i);
    unsigned user = (unsigned)(mix(r) % NUSERS);
    uint64_t dev = mix(user + 0x5eedULL);
    const char *const *pf = platforms[r % (sizeof platforms / sizeof platforms[0])];
    const char *country = PICK(countries, r >> 8);
    unsigned prompt_tokens = 50 + (unsigned)((r >> 16) % 2000);
    unsigned completion_tokens = 20 + (unsigned)((r >> 28) % 800);
    unsigned latency = 120 + (unsigned)((r >> 40) % 4000);

    int n = snprintf(
        out, BODY_CAP,
        "{\"event_type\":\"%s\",\"user_id\":\"user-%06u\","
        "\"device_id\":\"%08x-%04x-4%03x-a%03x-%012llx\",\"insert_id\":\"%s\","
        "\"event_time\":\"2026-11-21 10:15:42.123000\",\"session_id\":%lld,"
        "\"platform\":\"%s\",\"os_name\":\"%s\",\"country\":\"%s\",\"ip\":\"10.%u.%u.%u\","
        "\"event_properties\":{\"feature\":\"%s\",\"model\":\"%s\",\"prompt_tokens\":%u,"
        "\"completion_tokens\":%u,\"latency_ms\":%u,\"success\":%s,"
        "\"page_url\":\"https://app.example.com/w/%u/%.*s\"},"
        "\"user_properties\":{\"user_name\":\"%s %s\",\"plan\":\"%s\","
        "\"company\":\"Org %u\",\"seats\":%u}}",
        PICK(event_types, r >> 3), user, (unsigned)(dev >> 32), (unsigned)(dev >> 16) & 0xffff,
        (unsigned)(dev >> 4) & 0xfff, (unsigned)(dev >> 20) & 0xfff,
        (unsigned long long)(mix(dev) & 0xffffffffffffULL), id, (long long)ts * 1000, pf[0], pf[1],
        country, user % 256, (user / 256) % 256, (unsigned)(r >> 48) % 256, PICK(features, r >> 5),
        PICK(models, r >> 7), prompt_tokens, completion_tokens, latency,
        (r >> 33) % 20 ? "true" : "false", user % 97, (int)pad, filler, PICK(first_names, user),
        PICK(last_names, user >> 3), PICK(plans, user >> 5), user % 500, 1 + user % 50);
    return n < 0 || n >= BODY_CAP ? -1 : n;
}

static int sign(const char *secret, size_t secret_len, int64_t ts, const char *body, size_t len,
                char hex[65]) {
    char msg[BODY_CAP + 32];
    int prefix = snprintf(msg, sizeof msg, "%lld.", (long long)ts);
    if (prefix < 0 || (size_t)prefix + len > sizeof msg)
        return -1;
    memcpy(msg + prefix, body, len);
    unsigned char mac[EVP_MAX_MD_SIZE];
    unsigned int mac_len = 0;
    if (!HMAC(EVP_sha256(), secret, (int)secret_len, (const unsigned char *)msg,
              (size_t)prefix + len, mac, &mac_len) ||
        mac_len != 32)
        return -1;
    static const char digits[] = "0123456789abcdef";
    for (unsigned k = 0; k < mac_len; k++) {
        hex[2 * k] = digits[mac[k] >> 4];
        hex[2 * k + 1] = digits[mac[k] & 15];
    }
    hex[64] = '\0';
    return 0;
}

static int usage(void) {
    fprintf(stderr, "usage: sign_corpus --secret-env VAR --count N --out FILE [--size BYTES] "
                    "[--timestamp T] [--run-id ID]\n");
    return 2;
}

int main(int argc, char **argv) {
    const char *secret_env = NULL, *out_path = NULL, *run_id = NULL;
    int64_t count = -1, size = 600, ts = (int64_t)time(NULL);
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!v)
            return usage();
        i++;
        if (strcmp(a, "--secret-env") == 0)
            secret_env = v;
        else if (strcmp(a, "--out") == 0)
            out_path = v;
        else if (strcmp(a, "--run-id") == 0)
            run_id = v;
        else if (strcmp(a, "--count") == 0) {
            if (amp_parse_i64(v, strlen(v), 1, 100000000, &count) != 0)
                return usage();
        } else if (strcmp(a, "--size") == 0) {
            if (amp_parse_i64(v, strlen(v), 1, MAX_SIZE, &size) != 0)
                return usage();
        } else if (strcmp(a, "--timestamp") == 0) {
            if (amp_parse_i64(v, strlen(v), 0, 253402300799LL, &ts) != 0)
                return usage();
        } else {
            return usage();
        }
    }
    if (!secret_env || !out_path || count < 0)
        return usage();
    if (run_id && (!*run_id || strcspn(run_id, "\"\\\t\n") != strlen(run_id))) {
        fprintf(stderr, "sign_corpus: --run-id must be non-empty, without quotes, backslashes, "
                        "tabs or newlines\n");
        return 2;
    }

    const char *all = getenv(secret_env);
    if (!all || !*all) {
        fprintf(stderr, "sign_corpus: %s is not set\n", secret_env);
        return 2;
    }
    size_t secret_len = strcspn(all, ","); /* the first secret, as `amp2dify sign` */
    if (secret_len == 0) {
        fprintf(stderr, "sign_corpus: %s starts with an empty secret\n", secret_env);
        return 2;
    }

    char default_id[64];
    if (!run_id) {
        snprintf(default_id, sizeof default_id, "bench-%lld-%ld", (long long)ts, (long)getpid());
        run_id = default_id;
    }

    FILE *out = fopen(out_path, "wb");
    if (!out) {
        fprintf(stderr, "sign_corpus: cannot write '%s': %s\n", out_path, strerror(errno));
        return 1;
    }
    static char iobuf[1 << 20];
    setvbuf(out, iobuf, _IOFBF, sizeof iobuf);

    /* FNV-1a of the run id: the seed of its insert_ids. */
    uint64_t seed = 0xcbf29ce484222325ULL;
    for (const char *c = run_id; *c; c++)
        seed = (seed ^ (unsigned char)*c) * 0x100000001b3ULL;

    char body[BODY_CAP], hex[65];
    size_t total = 0;
    for (int64_t i = 0; i < count; i++) {
        int len = format_body(body, seed, (uint64_t)i, ts, 0);
        if (len > 0 && len < size)
            len = format_body(body, seed, (uint64_t)i, ts, (size_t)(size - len));
        if (len < 0 || sign(all, secret_len, ts, body, (size_t)len, hex) != 0) {
            fprintf(stderr, "sign_corpus: cannot build request %lld\n", (long long)i);
            fclose(out);
            return 1;
        }
        total += (size_t)len;
        if (fprintf(out, "%lld\t%s\t%.*s\n", (long long)ts, hex, len, body) < 0)
            break;
    }
    if (ferror(out) | (fclose(out) != 0)) {
        fprintf(stderr, "sign_corpus: writing '%s' failed: %s\n", out_path, strerror(errno));
        return 1;
    }
    printf("{\"requests\":%lld,\"timestamp\":%lld,\"mean_body_bytes\":%zu,\"run_id\":\"%s\"}\n",
           (long long)count, (long long)ts, total / (size_t)count, run_id);
    return 0;
}
