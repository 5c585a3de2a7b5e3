#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../json/jsonw.h"
#include "handlers_int.h"

static enum MHD_Result queue(amp_req *r, unsigned status, char *text, const char *hname,
                             const char *hvalue) {
    struct MHD_Response *resp =
        MHD_create_response_from_buffer(strlen(text), text, MHD_RESPMEM_MUST_FREE);
    if (!resp) {
        free(text);
        return MHD_NO;
    }
    MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_TYPE, "application/json");
    MHD_add_response_header(resp, "X-Request-Id", r->request_id);
    if (hname)
        MHD_add_response_header(resp, hname, hvalue);
    r->status = status;
    enum MHD_Result ret = MHD_queue_response(r->conn, status, resp);
    MHD_destroy_response(resp);
    return ret;
}

static enum MHD_Result reply_json_hdr(amp_req *r, unsigned status, json_t *body, const char *hname,
                                      const char *hvalue) {
    char *text = body ? amp_json_dumps(body) : NULL;
    json_decref(body);
    if (!text)
        return MHD_NO;
    return queue(r, status, text, hname, hvalue);
}

enum MHD_Result amp_handlers_reply_text(amp_req *r, unsigned status, char *text) {
    return text ? queue(r, status, text, NULL, NULL) : MHD_NO;
}

enum MHD_Result amp_handlers_reply_json(amp_req *r, unsigned status, json_t *body) {
    return reply_json_hdr(r, status, body, NULL, NULL);
}

enum MHD_Result amp_handlers_reply_error_hdr(amp_req *r, unsigned status, const char *code,
                                             const char *detail, const char *hname,
                                             const char *hvalue) {
    json_t *body = json_pack("{s:s, s:s}", "error", code, "detail", detail);
    r->error = code;
    return reply_json_hdr(r, status, body, hname, hvalue);
}

enum MHD_Result amp_handlers_reply_unavailable(amp_req *r, const char *detail,
                                               unsigned retry_after_s) {
    char seconds[16];
    snprintf(seconds, sizeof seconds, "%u", retry_after_s);
    return amp_handlers_reply_error_hdr(r, MHD_HTTP_SERVICE_UNAVAILABLE, "unavailable", detail,
                                        "Retry-After", seconds);
}

enum MHD_Result amp_handlers_reply_error(amp_req *r, unsigned status, const char *code,
                                         const char *detail) {
    return amp_handlers_reply_error_hdr(r, status, code, detail, NULL, NULL);
}
