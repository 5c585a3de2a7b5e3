/*
 * healthcheck — exit 0 when GET /healthz of the local server answers 200,
 * for container health checks in images without curl. The address comes
 * from the same config and environment the server reads; a wildcard listen
 * address is checked on loopback.
 */
#include <curl/curl.h>
#include <stdio.h>
#include <string.h>

#include "commands.h"
#include "../config/config.h"

static size_t discard(char *p, size_t size, size_t n, void *ctx) {
    (void)p;
    (void)ctx;
    return size * n;
}

int amp_cmd_healthcheck(int argc, char **argv) {
    const char *cfile;
    if (amp_cmd_config_only(argc, argv, &cfile) != 0)
        return 2;
    amp_config *cfg = amp_cmd_load_config(cfile, 0);
    if (!cfg)
        return 2;

    const char *host = cfg->listen.address;
    int v6 = strchr(host, ':') != NULL;
    if (strcmp(host, "0.0.0.0") == 0)
        host = "127.0.0.1";
    else if (strcmp(host, "::") == 0)
        host = "::1";
    char url[128];
    snprintf(url, sizeof url, v6 ? "http://[%s]:%u/healthz" : "http://%s:%u/healthz", host,
             (unsigned)cfg->listen.port);

    int rc = 1;
    long status = 0;
    CURL *c = curl_easy_init();
    if (c) {
        curl_easy_setopt(c, CURLOPT_URL, url);
        curl_easy_setopt(c, CURLOPT_NOSIGNAL, 1L);
        curl_easy_setopt(c, CURLOPT_CONNECTTIMEOUT_MS, 2000L);
        curl_easy_setopt(c, CURLOPT_TIMEOUT_MS, 5000L);
        curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, discard);
        CURLcode res = curl_easy_perform(c);
        if (res == CURLE_OK)
            curl_easy_getinfo(c, CURLINFO_RESPONSE_CODE, &status);
        if (status == 200) {
            rc = 0;
        } else if (res != CURLE_OK) {
            fprintf(stderr, "amp2dify healthcheck: %s: %s\n", url, curl_easy_strerror(res));
        } else {
            fprintf(stderr, "amp2dify healthcheck: %s answered %ld\n", url, status);
        }
        curl_easy_cleanup(c);
    }
    amp_config_destroy(cfg);
    return rc;
}
