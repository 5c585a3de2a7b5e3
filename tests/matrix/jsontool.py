#!/usr/bin/env python3
"""Small JSON helper for the matrix scripts (so they need no jq).

    jsontool.py get FILE KEY...            one line per KEY: its value as JSON text
                                           (strings bare), "-" when absent; exit 1
                                           when the input is not one JSON object
    jsontool.py set IN OUT PATH=JSON...    copy IN to OUT with each dotted PATH
                                           ("listen.connection_limit") set to JSON
    jsontool.py log-port FILE              the "port" of the first log line whose
                                           "msg" is "listening"; exit 1 when none
    jsontool.py serve                      the commands above, one per line of stdin
                                           (arguments tab-separated); each answer is
                                           the command's output, then a line of \\x1e
                                           and its exit status (tests/matrix/jsonq.sh)
"""
import json
import sys


def get(args):
    try:
        with open(args[0], "rb") as src:
            doc = json.load(src)
    except (OSError, ValueError):
        return 1
    if not isinstance(doc, dict):
        return 1
    for key in args[1:]:
        v = doc.get(key)
        print("-" if v is None else v if isinstance(v, str) else json.dumps(v))
    return 0


def set_(args):
    doc = json.load(open(args[0]))
    for item in args[2:]:
        path, _, value = item.partition("=")
        node = doc
        keys = path.split(".")
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = json.loads(value)
    with open(args[1], "w") as out:
        json.dump(doc, out, indent=1)
    return 0


def log_port(args):
    try:
        lines = open(args[0], errors="replace").read().splitlines()
    except OSError:
        return 1
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and rec.get("msg") == "listening" and "port" in rec:
            print(rec["port"])
            return 0
    return 1


COMMANDS = {"get": (get, 2), "set": (set_, 2), "log-port": (log_port, 1)}


def run(argv):
    if not argv or argv[0] not in COMMANDS or len(argv) - 1 < COMMANDS[argv[0]][1]:
        print(__doc__, file=sys.stderr)
        return 2
    return COMMANDS[argv[0]][0](argv[1:])


def serve():
    # One python3 for all of a script's questions: starting one costs about
    # 0.3 s on some machines, and the matrix asks about 130.
    for line in sys.stdin:
        argv = line.rstrip("\n").split("\t")
        try:
            rc = run(argv)
        except Exception as e:  # this question fails, not the ones after it
            print("jsontool: %s: %s" % (" ".join(argv), e), file=sys.stderr)
            rc = 1
        print("\x1e%d" % rc, flush=True)
    return 0


def main():
    if sys.argv[1:] == ["serve"]:
        return serve()
    return run(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
