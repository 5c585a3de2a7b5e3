/*
 * What one exchange with a sink means, decided in one place: the ack the
 * spool gets (delivered, retry at a backoff time, dead letter, or release
 * without spending an attempt), what happens to the user's conversation,
 * and what the answer says about the app's key. Pure: no clock, no
 * randomness, no I/O of its own; the exchange carries all of them, so
 * tests/unit/data/decide.tsv can state every rule as a row.
 */
#include "forward_int.h"

#include <inttypes.h>
#include <stdio.h>
#include <string.h>

/* Older than retry.max_age: give up. The bound check keeps the product in
 * range for absurd settings (then nothing expires, as max_age 0). */
static bool expired(const amp_forward_exchange *in) {
    int64_t max_age_s = in->retry_max_age_s;
    return max_age_s > 0 && max_age_s < INT64_MAX / 1000 &&
           in->now_ms - in->created_ms > max_age_s * 1000;
}

/* snprintf cut text at a byte: do not leave half a UTF-8 sequence behind
 * (a stored message must stay valid JSON text). */
static void trim_partial_utf8(char *text) {
    size_t n = strlen(text), i = n;
    while (i > 0 && ((unsigned char)text[i - 1] & 0xC0) == 0x80)
        i--;
    if (i == 0 || (unsigned char)text[i - 1] < 0xC0)
        return;
    unsigned char lead = (unsigned char)text[i - 1];
    size_t want = lead >= 0xF0 ? 4 : lead >= 0xE0 ? 3 : 2;
    if (n - (i - 1) < want)
        text[i - 1] = '\0';
}

static void dead(amp_forward_verdict *out, long status, const char *code, const char *message) {
    out->kind = AMP_QUEUE_ACK_DEAD;
    out->status = status;
    out->code = code;
    out->message = message;
}

static void retry(const amp_forward_exchange *in, amp_forward_verdict *out, const char *code,
                  const char *message) {
    if (expired(in)) {
        snprintf(out->text, sizeof out->text, "gave up after %" PRId64 " s; last: %ld %s%s%s",
                 (in->now_ms - in->created_ms) / 1000, in->status, code ? code : "",
                 message ? " " : "", message ? message : "");
        trim_partial_utf8(out->text);
        out->expired = true;
        dead(out, in->status, "expired", out->text);
        return;
    }
    int64_t delay =
        amp_forward_backoff_ms(in->retry_initial_ms, in->retry_max_ms, in->attempts, in->rnd);
    /* Retry-After wins over a shorter backoff, even past retry.max_ms: it
     * is the server saying when it can take the request. */
    if (in->retry_after_ms > delay)
        delay = in->retry_after_ms;
    out->kind = AMP_QUEUE_ACK_RETRY;
    /* A run Dify started keeps going after our connection dropped: the
     * next attempt resumes it instead of posting the event again. */
    out->run_id = in->run_id;
    out->delay_ms = delay;
    out->due_ms = in->now_ms + delay;
    out->status = in->status;
    out->code = code;
    out->message = message;
}

void amp_forward_decide(const amp_forward_exchange *in, amp_forward_verdict *out) {
    memset(out, 0, sizeof *out);
    out->conversation = AMP_FORWARD_CONV_KEEP;
    out->status = in->status;

    if (in->refused_code) {
        /* Nothing was sent: the stored job cannot become a request, and
         * never will. The key was not tried. */
        out->outcome = AMP_OUTCOME_PERMANENT;
        dead(out, 0, in->refused_code, in->refused_message);
        out->pause = in->probe ? AMP_FORWARD_PAUSE_PROBE_AGAIN : AMP_FORWARD_PAUSE_NONE;
        return;
    }
    if (in->aborted) {
        /* Ended by a stop past its grace: not an attempt; due again at the
         * next start. */
        out->outcome = AMP_OUTCOME_RETRY;
        out->kind = AMP_QUEUE_ACK_RELEASE;
        out->due_ms = in->now_ms;
        out->pause = in->probe ? AMP_FORWARD_PAUSE_PROBE_AGAIN : AMP_FORWARD_PAUSE_NONE;
        return;
    }

    const char *code = NULL, *message = NULL;
    amp_outcome o = amp_forward_outcome(in, &code, &message);
    if (in->transport_error) {
        code = in->transport_code;
        message = in->transport_message;
    } else if (in->too_large && o != AMP_OUTCOME_DELIVERED) {
        code = "response_too_large";
        message = "Dify's answer exceeded the size cap";
    }
    out->outcome = o;
    out->answer_code = code;
    out->answered = !in->transport_error && in->status > 0;

    switch (o) {
    case AMP_OUTCOME_DELIVERED:
        out->kind = AMP_QUEUE_ACK_DELIVERED;
        if (in->per_user && in->conversation_id) {
            out->conversation = AMP_FORWARD_CONV_STORE;
            out->conversation_id = in->conversation_id;
        }
        break;
    case AMP_OUTCOME_RETRY:
        retry(in, out, code, message);
        break;
    case AMP_OUTCOME_PAUSE_APP:
        /* A bad key or a disabled app: the event is not to blame, so it is
         * not spent. It waits for the app's next probe. */
        out->kind = AMP_QUEUE_ACK_RELEASE;
        out->hold = true;
        out->code = code;
        out->message = message;
        out->pause = in->probe ? AMP_FORWARD_PAUSE_PROBE_REJECTED : AMP_FORWARD_PAUSE_APP;
        return;
    case AMP_OUTCOME_RESET_CONVERSATION:
        if (in->per_user && in->had_conversation) {
            /* Dify forgot the conversation (deleted, expired): start a new
             * one right away, without waiting for a backoff. */
            out->kind = AMP_QUEUE_ACK_RETRY;
            out->due_ms = in->now_ms;
            out->code = code;
            out->message = message;
            out->conversation = AMP_FORWARD_CONV_CLEAR;
            out->reset = true;
            break;
        }
        /* We sent no conversation, so this 404 is about something else. */
        dead(out, in->status, code, message);
        break;
    case AMP_OUTCOME_PERMANENT:
        dead(out, in->status, code, message);
        break;
    case AMP_OUTCOME_WAITING_INPUT:
        /* Not delivered and not dead: the run waits for a person. Nothing
         * to retry (Dify holds the run); `amp2dify dlq list --waiting`
         * shows it with its run id. */
        out->kind = AMP_QUEUE_ACK_WAITING;
        out->code = code;
        out->message = message;
        out->run_id = in->run_id;
        if (in->per_user && in->conversation_id) {
            out->conversation = AMP_FORWARD_CONV_STORE;
            out->conversation_id = in->conversation_id;
        }
        break;
    }

    /* An answer other than "try again" got past the key check. */
    if (out->answered && o != AMP_OUTCOME_RETRY)
        out->pause = AMP_FORWARD_PAUSE_RESUME;
    else
        out->pause = in->probe ? AMP_FORWARD_PAUSE_PROBE_AGAIN : AMP_FORWARD_PAUSE_NONE;
}
