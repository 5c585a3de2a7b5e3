/*
 * client — the client address of a request. The peer's address, unless the
 * peer is a trusted proxy (listen.trusted_proxies): then X-Real-IP, else the
 * right-most address of X-Forwarded-For that is not itself a trusted proxy.
 * Forwarding headers from anyone else are ignored, so a client cannot
 * choose the address it is logged under.
 */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <string.h>

#include "handlers_int.h"
#include "../base/alloc.h"
#include "../base/parse.h"

struct amp_cidr {
    int family;
    unsigned char addr[16];
    unsigned bits;
};

static int parse_cidr(const char *s, amp_cidr *out) {
    char host[INET6_ADDRSTRLEN + 1];
    const char *slash = strchr(s, '/');
    size_t n = slash ? (size_t)(slash - s) : strlen(s);
    if (n == 0 || n >= sizeof host)
        return -1;
    memcpy(host, s, n);
    host[n] = '\0';
    memset(out, 0, sizeof *out);
    if (inet_pton(AF_INET, host, out->addr) == 1) {
        out->family = AF_INET;
        out->bits = 32;
    } else if (inet_pton(AF_INET6, host, out->addr) == 1) {
        out->family = AF_INET6;
        out->bits = 128;
    } else {
        return -1;
    }
    if (slash) {
        int64_t bits;
        if (amp_parse_i64(slash + 1, strlen(slash + 1), 0, out->bits, &bits) != 0)
            return -1;
        out->bits = (unsigned)bits;
    }
    return 0;
}

amp_cidr *amp_handlers_client_parse_proxies(char *const *cidrs, size_t n, size_t *count) {
    amp_cidr *out = amp_xcalloc(n + 1, sizeof *out);
    *count = 0;
    for (size_t i = 0; i < n; i++)
        if (parse_cidr(cidrs[i], &out[*count]) == 0) /* validated by config */
            (*count)++;
    return out;
}

static int in_cidr(const amp_cidr *c, int family, const unsigned char *addr) {
    if (c->family != family)
        return 0;
    unsigned full = c->bits / 8, rest = c->bits % 8;
    if (memcmp(c->addr, addr, full) != 0)
        return 0;
    if (!rest)
        return 1;
    unsigned char mask = (unsigned char)(0xff << (8 - rest));
    return (c->addr[full] & mask) == (addr[full] & mask);
}

/* Parse a textual address; IPv4-mapped IPv6 peers count as IPv4. */
static int parse_addr(const char *s, size_t len, int *family, unsigned char *addr) {
    char buf[INET6_ADDRSTRLEN + 1];
    while (len > 0 && (*s == ' ' || *s == '\t'))
        s++, len--;
    while (len > 0 && (s[len - 1] == ' ' || s[len - 1] == '\t'))
        len--;
    if (len == 0 || len >= sizeof buf)
        return -1;
    memcpy(buf, s, len);
    buf[len] = '\0';
    if (inet_pton(AF_INET, buf, addr) == 1)
        return *family = AF_INET, 0;
    if (inet_pton(AF_INET6, buf, addr) == 1)
        return *family = AF_INET6, 0;
    return -1;
}

static int trusted(const amp_handlers_gen *g, int family, const unsigned char *addr) {
    for (size_t i = 0; i < g->nproxies; i++)
        if (in_cidr(&g->proxies[i], family, addr))
            return 1;
    return 0;
}

static void format_addr(int family, const unsigned char *addr, char *out, size_t len) {
    if (!inet_ntop(family, addr, out, (socklen_t)len))
        snprintf(out, len, "unknown");
}

void amp_handlers_client_address(const amp_handlers_gen *g, struct MHD_Connection *conn, char *out,
                                 size_t len) {
    const union MHD_ConnectionInfo *ci =
        MHD_get_connection_info(conn, MHD_CONNECTION_INFO_CLIENT_ADDRESS);
    unsigned char addr[16] = {0};
    int family = 0;
    if (ci && ci->client_addr->sa_family == AF_INET) {
        family = AF_INET;
        memcpy(addr, &((const struct sockaddr_in *)ci->client_addr)->sin_addr, 4);
    } else if (ci && ci->client_addr->sa_family == AF_INET6) {
        const struct in6_addr *a6 = &((const struct sockaddr_in6 *)ci->client_addr)->sin6_addr;
        if (IN6_IS_ADDR_V4MAPPED(a6)) {
            family = AF_INET;
            memcpy(addr, a6->s6_addr + 12, 4);
        } else {
            family = AF_INET6;
            memcpy(addr, a6->s6_addr, 16);
        }
    } else {
        snprintf(out, len, "unknown");
        return;
    }
    format_addr(family, addr, out, len);
    if (!trusted(g, family, addr))
        return;

    const char *real = MHD_lookup_connection_value(conn, MHD_HEADER_KIND, "X-Real-IP");
    unsigned char a[16];
    int f;
    if (real && parse_addr(real, strlen(real), &f, a) == 0) {
        format_addr(f, a, out, len);
        return;
    }
    const char *xff = MHD_lookup_connection_value(conn, MHD_HEADER_KIND, "X-Forwarded-For");
    if (!xff)
        return;
    /* Walk from the right: the first address that is not a trusted proxy. */
    const char *end = xff + strlen(xff);
    while (end > xff) {
        const char *start = end;
        while (start > xff && start[-1] != ',')
            start--;
        if (parse_addr(start, (size_t)(end - start), &f, a) != 0)
            return; /* garbage: keep the last address we trust */
        format_addr(f, a, out, len);
        if (!trusted(g, f, a))
            return;
        end = start > xff ? start - 1 : xff;
    }
}
