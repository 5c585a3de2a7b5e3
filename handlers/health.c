#include <jansson.h>

#include "handlers_int.h"

enum MHD_Result amp_handlers_health_healthz(amp_handlers *h, amp_req *r) {
    (void)h;
    return amp_handlers_reply_json(r, MHD_HTTP_OK, json_pack("{s:s}", "status", "ok"));
}

enum MHD_Result amp_handlers_health_readyz(amp_handlers *h, amp_req *r) {
    if (atomic_load(&h->draining))
        return amp_handlers_reply_unavailable(r, "shutting down", RETRY_SOON_S);
    if (!amp_queue_writable(h->queue))
        return amp_handlers_reply_unavailable(r, "the spool cannot be written", RETRY_SOON_S);
    const char *full = amp_queue_full(h->queue);
    if (full)
        return amp_handlers_reply_unavailable(r, full, RETRY_FULL_S);
    return amp_handlers_reply_json(r, MHD_HTTP_OK, json_pack("{s:s}", "status", "ready"));
}
