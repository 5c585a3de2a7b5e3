/*
 * Streaming answers: an incremental text/event-stream parser fed by the curl
 * write callback with arbitrary splits, which folds Dify's events into the
 * JSON a blocking request would have returned:
 *
 *   message / agent_message chunks   -> "answer" (concatenated, capped)
 *   message_replace                  -> "answer" replaced
 *   message_end                      -> "metadata" (usage); closes
 *   workflow_finished                -> "workflow_run_id", "data"; closes
 *   workflow_paused                  -> "data", "event":"workflow_paused"; closes
 *   human_input_required             -> "event":"workflow_paused"; closes (Dify
 *                                       sends workflow_paused next and ends)
 *   error                            -> {"event":"error","status","code","message"}; closes
 *   ping and everything else         -> ignored
 *
 * Only what the stored result needs is kept, so memory stays bounded by the
 * answer cap plus one event, whatever the stream's length.
 */
#include "forward_int.h"
#include "../base/alloc.h"
#include "../base/buf.h"
#include "../json/jsonr.h"

#include <string.h>

struct amp_forward_sse {
    amp_buf line;   /* the current line, without its terminator */
    amp_buf data;   /* "data:" lines of the current event, joined by \n */
    char event[32]; /* "event:" field of the current event */
    bool saw_cr;    /* last byte fed was \r: a following \n is the same break */
    bool saw_agent; /* an agent_message arrived: a later message is the whole answer */
    bool complete;
    bool error;
    bool paused; /* workflow_paused or human_input_required: waits for a person */
    amp_buf answer;
    json_t *ids;     /* message_id, conversation_id, task_id, workflow_run_id */
    json_t *meta;    /* message_end metadata */
    json_t *wf_data; /* workflow_finished / workflow_paused data */
    json_t *err;     /* error event */
};

amp_forward_sse *amp_forward_sse_create(void) {
    amp_forward_sse *p = amp_xcalloc(1, sizeof *p);
    amp_buf_init(&p->line, AMP_FORWARD_MAX_RESPONSE);
    amp_buf_init(&p->data, AMP_FORWARD_MAX_RESPONSE);
    amp_buf_init(&p->answer, AMP_FORWARD_ANSWER_CAP);
    return p;
}

void amp_forward_sse_reset(amp_forward_sse *p) {
    amp_buf_reset(&p->line);
    amp_buf_reset(&p->data);
    amp_buf_reset(&p->answer);
    p->event[0] = '\0';
    p->saw_cr = p->saw_agent = p->complete = p->error = p->paused = false;
    json_decref(p->ids);
    json_decref(p->meta);
    json_decref(p->wf_data);
    json_decref(p->err);
    p->ids = p->meta = p->wf_data = p->err = NULL;
}

void amp_forward_sse_destroy(amp_forward_sse *p) {
    if (!p)
        return;
    amp_forward_sse_reset(p);
    amp_buf_free(&p->line);
    amp_buf_free(&p->data);
    amp_buf_free(&p->answer);
    free(p);
}

/* Append a chunk to the answer, dropping what would pass the cap at a
 * character boundary so the kept text stays valid UTF-8. */
static void answer_append(amp_forward_sse *p, const json_t *chunk) {
    if (!json_is_string(chunk))
        return;
    const char *s = json_string_value(chunk);
    size_t n = json_string_length(chunk);
    size_t room = p->answer.max - p->answer.len;
    amp_buf_append(&p->answer, s, amp_forward_utf8_cut(s, n, room));
}

static void keep_id(amp_forward_sse *p, const json_t *ev, const char *key) {
    const json_t *v = json_object_get(ev, key);
    if (!json_is_string(v) || json_string_length(v) == 0)
        return;
    if (!p->ids)
        p->ids = json_object();
    if (p->ids)
        json_object_set(p->ids, key, (json_t *)v);
}

static void replace(json_t **slot, json_t *v) {
    json_incref(v);
    json_decref(*slot);
    *slot = v;
}

static void dispatch(amp_forward_sse *p) {
    if (p->data.len == 0) {
        p->event[0] = '\0';
        return;
    }
    json_error_t jerr;
    json_t *ev = amp_json_loadb(p->data.data, p->data.len, 0, &jerr);
    amp_buf_reset(&p->data);
    if (!json_is_object(ev)) {
        json_decref(ev); /* not JSON: nothing Dify documents; skip it */
        p->event[0] = '\0';
        return;
    }
    /* Dify names the event inside the JSON; the SSE "event:" line is the
     * fallback. */
    const json_t *name_v = json_object_get(ev, "event");
    const char *name = json_is_string(name_v) ? json_string_value(name_v) : p->event;

    keep_id(p, ev, "message_id");
    keep_id(p, ev, "conversation_id");
    keep_id(p, ev, "task_id");
    keep_id(p, ev, "workflow_run_id");

    if (strcmp(name, "message") == 0) {
        if (p->saw_agent) {
            /* An agent app's closing "message" carries the whole answer. */
            amp_buf_reset(&p->answer);
            p->saw_agent = false;
        }
        answer_append(p, json_object_get(ev, "answer"));
    } else if (strcmp(name, "agent_message") == 0) {
        p->saw_agent = true;
        answer_append(p, json_object_get(ev, "answer"));
    } else if (strcmp(name, "message_replace") == 0) {
        amp_buf_reset(&p->answer);
        answer_append(p, json_object_get(ev, "answer"));
    } else if (strcmp(name, "message_end") == 0) {
        replace(&p->meta, json_object_get(ev, "metadata"));
        p->complete = true;
    } else if (strcmp(name, "workflow_finished") == 0) {
        replace(&p->wf_data, json_object_get(ev, "data"));
        p->complete = true;
        p->paused = false; /* a resumed stream runs on to its end */
    } else if (strcmp(name, "workflow_paused") == 0) {
        replace(&p->wf_data, json_object_get(ev, "data"));
        p->complete = p->paused = true;
    } else if (strcmp(name, "human_input_required") == 0) {
        p->complete = p->paused = true;
    } else if (strcmp(name, "human_input_form_filled") == 0 ||
               strcmp(name, "human_input_form_timeout") == 0) {
        /* A resumed run goes on: its end is still to come. */
        p->complete = p->paused = false;
    } else if (strcmp(name, "error") == 0) {
        replace(&p->err, ev);
        p->error = true;
        p->complete = true;
    }
    json_decref(ev);
    p->event[0] = '\0';
}

static void field(amp_forward_sse *p, const char *line, size_t len, int *rc) {
    if (len == 0) {
        dispatch(p);
        return;
    }
    if (line[0] == ':')
        return; /* comment / keep-alive */
    const char *colon = memchr(line, ':', len);
    size_t nlen = colon ? (size_t)(colon - line) : len;
    const char *v = colon ? colon + 1 : line + len;
    size_t vlen = colon ? len - nlen - 1 : 0;
    if (vlen && *v == ' ')
        v++, vlen--;
    if (nlen == 4 && memcmp(line, "data", 4) == 0) {
        if ((p->data.len && amp_buf_append(&p->data, "\n", 1) != 0) ||
            amp_buf_append(&p->data, v, vlen) != 0)
            *rc = -1;
    } else if (nlen == 5 && memcmp(line, "event", 5) == 0) {
        size_t n = vlen < sizeof p->event - 1 ? vlen : sizeof p->event - 1;
        memcpy(p->event, v, n);
        p->event[n] = '\0';
    }
    /* "id" and "retry" steer browser reconnects; a delivery never
     * reconnects a stream, so they are ignored. */
}

int amp_forward_sse_feed(amp_forward_sse *p, const char *data, size_t len) {
    if (len == 0)
        return 0; /* keeps a pending CR: an empty chunk is no line break */
    int rc = 0;
    size_t i = 0;
    if (p->saw_cr && len > 0 && data[0] == '\n')
        i = 1;
    p->saw_cr = false;
    while (i < len && rc == 0) {
        const char *start = data + i;
        size_t n = 0;
        while (i + n < len && start[n] != '\n' && start[n] != '\r')
            n++;
        if (amp_buf_append(&p->line, start, n) != 0)
            return -1;
        i += n;
        if (i == len)
            break; /* line continues in the next chunk */
        /* A terminator: \n, \r, or \r\n (possibly split across chunks). */
        if (data[i] == '\r') {
            if (i + 1 < len && data[i + 1] == '\n')
                i++;
            else if (i + 1 == len)
                p->saw_cr = true;
        }
        i++;
        field(p, p->line.data ? p->line.data : "", p->line.len, &rc);
        amp_buf_reset(&p->line);
    }
    return rc;
}

json_t *amp_forward_sse_finish(amp_forward_sse *p, bool *complete) {
    /* A stream may end without the blank line after its last event. */
    if (p->line.len) {
        int rc = 0;
        field(p, p->line.data, p->line.len, &rc);
        amp_buf_reset(&p->line);
    }
    dispatch(p);
    *complete = p->complete;

    if (p->error) {
        json_t *e = json_object();
        if (!e)
            return NULL;
        json_object_set_new(e, "event", json_string("error"));
        const char *keys[] = {"status", "code", "message"};
        for (size_t i = 0; i < 3; i++) {
            json_t *v = json_object_get(p->err, keys[i]);
            if (v)
                json_object_set(e, keys[i], v);
        }
        return e;
    }
    if (!p->ids && !p->meta && !p->wf_data && p->answer.len == 0 && !p->paused)
        return NULL;
    json_t *r = json_object();
    if (!r)
        return NULL;
    if (p->ids)
        json_object_update(r, p->ids);
    if (p->answer.len || p->meta) {
        json_t *a = json_stringn(p->answer.data ? p->answer.data : "", p->answer.len);
        if (a)
            json_object_set_new(r, "answer", a);
    }
    if (p->meta)
        json_object_set(r, "metadata", p->meta);
    if (p->wf_data)
        json_object_set(r, "data", p->wf_data);
    if (p->paused)
        json_object_set_new(r, "event", json_string("workflow_paused"));
    return r;
}
