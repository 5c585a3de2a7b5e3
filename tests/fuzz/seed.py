#!/usr/bin/env python3
"""Writes the seed corpora of tests/fuzz/corpus/<target>/ from the project's
own examples: tests/unit/data/sig_vectors.json, tests/mapping/*, tests/config/*,
examples/ and docker/ configs, the SPEC's bodies and Dify's documented stream
events. Run from the repository root when the examples change:

    python3 tests/fuzz/seed.py

Seeds are named seed-<what>; files named regress-<what> are crash inputs kept
as regression cases and are never touched here. Inputs libFuzzer found that
add coverage can be merged in with
    build/fuzz-clang/fuzz/fuzz_<t> -merge=1 tests/fuzz/corpus/<t> build/fuzz-clang/work/<t>
(not done by `make fuzz`, so the checked-in corpora stay small and readable).
"""
import glob
import hashlib
import hmac
import json
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CORPUS = os.path.join(ROOT, "tests", "fuzz", "corpus")

# Must match tests/fuzz/fuzz_sig.c.
AMP_SECRETS = ["amp-secret-1", "old-secret"]
NOW_AMPLITUDE = 1700000000


def write(target, name, data):
    d = os.path.join(CORPUS, target)
    os.makedirs(d, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", name)
    with open(os.path.join(d, "seed-" + name), "wb") as f:
        f.write(data)


def clear_seeds():
    for path in glob.glob(os.path.join(CORPUS, "*", "seed-*")):
        os.remove(path)


def amp_sign(secret, ts, body):
    return hmac.new(secret.encode(), ts.encode() + b"." + body, hashlib.sha256).hexdigest()


def sig_seeds():
    vectors = json.load(open(os.path.join(ROOT, "tests/unit/data/sig_vectors.json")))
    for v in vectors:
        body = v.get("body", "").encode("utf-8", "surrogatepass")
        secrets = v.get("secrets", [])
        headers = []
        for name, value in v.get("headers", {}).items():
            ts = v["headers"].get("X-Amplitude-Timestamp", "").strip(" \t")

            def sub(m):
                s = m.group(1)
                # The vector's own secrets map onto the fuzzer's fixed ones.
                if s in secrets:
                    s = AMP_SECRETS[min(secrets.index(s), 1)]
                return amp_sign(s, ts, body)

            headers.append("%s: %s" % (name, re.sub(r"\{\{sign:([^}]*)\}\}", sub, value)))
        text = v["scheme"] + "\n" + "".join(h + "\n" for h in headers) + "\n"
        write("sig", v["name"], text.encode() + body)
    # Directly signed for the fuzzer's clock and secrets.
    body = b'{"event_type":"Signed_Up","user_id":"u-42","insert_id":"demo-1"}'
    ts = str(NOW_AMPLITUDE)
    write("sig", "direct_ok", "amplitude-hmac\nX-Amplitude-Timestamp: %s\nX-Amplitude-Sig: "
          "sha256=%s\n\n" % (ts, amp_sign(AMP_SECRETS[0], ts, body)) + body.decode())
    write("sig", "direct_rotation_last", "amplitude-hmac\nX-Amplitude-Timestamp: %s\n"
          "X-Amplitude-Sig: sha256=%s sha256=%s\n\n" % (ts, "ab" * 32,
                                                       amp_sign(AMP_SECRETS[1], ts, body))
          + body.decode())
    write("sig", "static_ok", "static-header\nAuthorization: Bearer tok-9f8e7d6c\n\n{}")
    write("sig", "none", "none\n\n{}")


SPEC_BODIES = {
    "spec_single": '{"event_type":"Signed_Up","user_id":"u-42","insert_id":"demo-1",'
                   '"event_properties":{"plan":"pro"}}',
    "spec_http_v2": '{"api_key":"k","events":[{"event_type":"A","user_id":"u1",'
                    '"event_time":"2026-11-21 10:15:42.123000","insert_id":"i1"},'
                    '{"event_type":"B","device_id":"d1","time":1795263342123,'
                    '"$insert_id":"i2"}],"options":{"min_id_length":1}}',
    "spec_array": '[{"event_type":"A","user_id":"u1","uuid":"0f6e"},'
                  '{"event_type":"B","user_id":null,"device_id":"d"}]',
    "ai_usage": '{"event_type":"AI_Generation_Executed","user_id":"u-1",'
                '"user_properties":{"user_name":"  Ada Lovelace "},'
                '"event_properties":{"plan":"pro"}}',
    "ops_amount": '{"event_type":"Purchase","user_id":"u","event_properties":{"amount":12.5,'
                  '"items":[{"sku":"SKU-1"},{"sku":"x"}],"score":-1},'
                  '"event_time":"2026-02-28 23:59:59.999","time":1795263342123,'
                  '"user_properties":{"a.b":1,"email":" A@B.example ","account":"acct-7"}}',
    "ops_big_ints": '{"event_type":"Sub_Monthly","user_id":"u","time":9223372036854775807,'
                    '"event_properties":{"amount":18446744073709551615}}',
    "order_missing": '[{"event_type":"Order","user_id":"u","event_properties":{}},'
                     '{"event_type":"Order","user_id":"u","event_properties":{"order_id":7}}]',
    "dup_keys": '{"event_type":"A","user_id":"u","user_id":"v"}',
    "deep": '{"event_type":"A","user_id":"u","p":' + "[" * 70 + "]" * 70 + "}",
    "deep_ok": '{"event_type":"A","user_id":"u","p":' + "[" * 62 + "]" * 62 + "}",
    "huge_number": '{"event_type":"A","user_id":"u","n":1e999999,"m":123456789012345678901234}',
    "nul_escape": '{"event_type":"A\\u0000B","user_id":"u"}',
    "surrogates": '{"event_type":"\\ud83d\\ude00","user_id":"\\udc00"}',
    "empty_array": "[]",
    "events_not_array": '{"events":{"event_type":"A"}}',
    "scalar": "42",
    "bad_time": '{"event_type":"A","user_id":"u","event_time":"2026-02-29 10:00:00"}',
    "neg_time": '{"event_type":"A","user_id":"u","time":-1}',
    "numeric_user": '{"event_type":"A","user_id":12}',
    "empty": "",
    "time_lenient": "2026-11-21T10:15:42.123456789+05:30",
    "time_strict": "2026-11-21 10:15:42.123000",
    "time_year0": "0000-01-01T00:00:00Z",
    "time_leap": "2024-02-29 23:59:59",
}


def decode_seeds():
    for path in sorted(glob.glob(os.path.join(ROOT, "tests/mapping/*/events.json*"))):
        name = os.path.basename(os.path.dirname(path))
        data = open(path, "rb").read()
        write("decode", name, data)
        write("mapping", name, data)
    for name, body in SPEC_BODIES.items():
        write("decode", name, body)
        write("mapping", name, body)
    write("decode", "invalid_utf8", b'{"event_type":"A\xff\xfe","user_id":"u"}')
    write("decode", "overlong_utf8", b'{"event_type":"\xc0\xaf","user_id":"u"}')
    # The per-string cap of decode.c (65536 bytes), at and past it.
    for n in (65536, 65537):
        write("decode", "string_%d" % n, '{"event_type":"A","user_id":"u","p":{"s":"%s"}}' % ("x" * n))
        write("decode", "key_%d" % n, '{"event_type":"A","user_id":"u","p":{"%s":1}}' % ("k" * n))


def config_seeds():
    paths = sorted(glob.glob(os.path.join(ROOT, "tests/mapping/*/config.json")))
    paths += sorted(glob.glob(os.path.join(ROOT, "tests/config/*/config.json")))
    for path in paths:
        parts = path.split(os.sep)
        write("config", parts[-3] + "_" + parts[-2], open(path, "rb").read())
    for path in ["examples/amp2dify.json", "docker/amp2dify.json"]:
        full = os.path.join(ROOT, path)
        if os.path.exists(full):
            write("config", path.replace("/", "_"), open(full, "rb").read())
    full = {
        "listen": {"address": "::1", "port": 0, "path": "/hook", "max_body_bytes": 64,
                   "threads": 4, "event_loop": "poll", "connection_limit": 10,
                   "per_ip_connection_limit": 2,
                   "connection_timeout_seconds": 5,
                   "trusted_proxies": ["10.0.0.0/8", "::1/128", "192.168.1.1"]},
        "auth": {"scheme": "standard-webhooks", "tolerance_seconds": 60,
                 "header": "X-Token", "allow_unauthenticated": False},
        "spool": {"path": "/tmp/s.db", "dedupe_window_seconds": 0, "max_pending": 5,
                  "max_bytes": 1048576,
                  "retention_seconds": 60, "sync": "normal"},
        "dify": {"base_url": "http://127.0.0.1:1/v1", "timeout_seconds": 1,
                 "connect_timeout_seconds": 1, "workers": 1, "nice": 0,
                 "retry": {"initial_ms": 1, "max_ms": 2, "max_age_seconds": 3}},
        "log": {"level": "debug"},
        "apps": {"a": {"api_key_env": "K", "endpoint": "workflow"}},
        "routes": [{"name": "r", "app": "a",
                    "filter": {"not": {"field": "x[0][\"y.z\"]", "op": "regex",
                                       "value": "a{2,3}(b|c)*$"}},
                    "map": [{"source": "x", "target": "y.z", "transform": ["truncate:3"]}]}],
    }
    write("config", "every_key", json.dumps(full, indent=1))
    write("config", "none_scheme", json.dumps({"auth": {"scheme": "none"}, "apps": {},
                                              "routes": []}))
    write("config", "not_json", "{\"listen\": ")
    write("config", "top_array", "[]")


SSE = {
    "chat": ": keep-alive comment\nevent: ping\n\n"
            'data: {"event": "message", "task_id": "t1", "message_id": "m1", '
            '"conversation_id": "c1", "answer": " I", "created_at": 1}\n\n'
            'data: {"event": "message", "task_id": "t1", "message_id": "m1", '
            '"conversation_id": "c1", "answer": "\'m \\u00e9", "created_at": 1}\n\n'
            'data: {"event": "message_end", "task_id": "t1", "id": "x", "message_id": "m1", '
            '"conversation_id": "c1", "metadata": {"usage": {"prompt_tokens": 3, '
            '"completion_tokens": 4, "total_tokens": 7}}}\n\n',
    "error": 'data: {"event":"message","answer":"par","message_id":"m"}\n\n'
             'data: {"event":"error","message_id":"m","status":400,'
             '"code":"completion_request_error","message":"quota"}\n\n',
    "workflow": 'data: {"event":"workflow_started","workflow_run_id":"wr","data":{}}\n\n'
                'data: {"event":"text_chunk","workflow_run_id":"wr","data":{"text":"B"}}\n\n'
                'data: {"event":"workflow_finished","workflow_run_id":"wr","data":'
                '{"status":"failed","error":"node broke","total_tokens":9}}\n\n',
    "paused": 'data: {"event":"workflow_paused","workflow_run_id":"wr","data":{"x":1}}\r\n\r\n',
    "cut_short": 'data: {"event":"message","answer":"par","message_id":"m"}\n\n',
    "multiline": 'event: message_end\ndata: {"message_id":"m",\ndata: "metadata":{}}',
    "replace": 'data: {"event":"message","answer":"bad words"}\n\n'
               'data: {"event":"message_replace","answer":"[removed]"}\n\n'
               'data: {"event":"message_end","metadata":{}}\n\n',
    "agent": 'data: {"event":"agent_message","answer":"Hel"}\n\n'
             'data: {"event":"agent_message","answer":"lo"}\n\n'
             'data: {"event":"message","answer":"Hello!"}\n\n'
             'data: {"event":"message_end","metadata":{}}\n\n',
    "garbage": 'data: not json\n\ndata: {"event":"ping"}\n\n',
    "crlf_mix": 'event:message\r\ndata:{"answer":"a"}\r\r\ndata: {"event":"message_end"}\n\r\n',
    "long_answer": 'data: {"event":"message","answer":"' + "\\u00e9" * 300 + '"}\n\n',
}


def sse_seeds():
    for i, (name, text) in enumerate(sorted(SSE.items())):
        # Byte 0 seeds the chunk sizes.
        write("sse", name, bytes([i * 37 % 256]) + text.encode())


def main():
    clear_seeds()
    sig_seeds()
    decode_seeds()
    config_seeds()
    sse_seeds()
    for t in sorted(os.listdir(CORPUS)):
        print("%s: %d files" % (t, len(os.listdir(os.path.join(CORPUS, t)))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
