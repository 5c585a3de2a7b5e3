#!/usr/bin/env python3
"""Small JSON helper for the matrix scripts (so they need no jq).

    jsontool.py get FILE|- KEY...          one line per KEY: its value as JSON text
                                           (strings bare), "-" when absent; exit 1
                                           when the input is not one JSON object
    jsontool.py set IN OUT PATH=JSON...    copy IN to OUT with each dotted PATH
                                           ("listen.connection_limit") set to JSON
    jsontool.py log-port FILE              the "port" of the first log line whose
                                           "msg" is "listening"; exit 1 when none
"""
import json
import sys


def get(args):
    src = sys.stdin if args[0] == "-" else open(args[0], "rb")
    try:
        doc = json.load(src)
    except ValueError:
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


def main():
    cmds = {"get": (get, 2), "set": (set_, 2), "log-port": (log_port, 1)}
    if len(sys.argv) < 2 or sys.argv[1] not in cmds or len(sys.argv) - 2 < cmds[sys.argv[1]][1]:
        print(__doc__, file=sys.stderr)
        return 2
    fn, _ = cmds[sys.argv[1]]
    return fn(sys.argv[2:])


if __name__ == "__main__":
    sys.exit(main())
