#!/usr/bin/env python3
"""Hold many idle or half-sent HTTP connections open against a server.

    conns.py PORT IDLE HALF_HEADERS HALF_BODY [HOLD_SECONDS [SOURCES [TRICKLE]]]

Opens IDLE connections that send nothing, HALF_HEADERS that send the start of
a request and stop inside the headers, and HALF_BODY that send complete
headers announcing a 1000-byte JSON body and then only 10 bytes of it. Prints
"open N refused R" once all are attempted (R counts connections the server
closed or refused at once), keeps them open until HOLD_SECONDS pass (default
30) or stdin reaches end of file, then prints "closed_by_server C" (how many
the server closed in the meantime, e.g. by its idle timeout) and exits.

SOURCES > 0 spreads the connections over that many source addresses,
127.0.0.10 upwards (default 0: the kernel's choice, 127.0.0.1). TRICKLE 1
makes the half-sent connections send one more byte of their headers or body
every half second while held, so that no idle timeout ever fires: only a
deadline for the whole headers or body can close them.
"""
import os
import select
import socket
import sys
import time


def readable(s):
    p = select.poll()
    p.register(s, select.POLLIN)
    return bool(p.poll(0))


def main():
    if len(sys.argv) < 5:
        print(__doc__, file=sys.stderr)
        return 2
    port, idle, half_headers, half_body = (int(a) for a in sys.argv[1:5])
    hold = float(sys.argv[5]) if len(sys.argv) > 5 else 30.0
    sources = int(sys.argv[6]) if len(sys.argv) > 6 else 0
    trickle = len(sys.argv) > 7 and sys.argv[7] == "1"
    try:
        import resource
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        want = idle + half_headers + half_body + 64
        if soft < want:
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, hard), hard))
    except (ImportError, ValueError, OSError):
        pass

    socks, refused = [], 0
    plan = [b""] * idle
    plan += [b"POST /webhooks/amplitude HTTP/1.1\r\nHost: x\r\nContent-Ty"] * half_headers
    plan += [b"POST /webhooks/amplitude HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
             b"Content-Length: 1000\r\n\r\n{\"event_ty"] * half_body
    for i, data in enumerate(plan):
        try:
            src = ("127.0.0.%d" % (10 + i % sources), 0) if sources else None
            s = socket.create_connection(("127.0.0.1", port), timeout=5, source_address=src)
            if data:
                s.sendall(data)
            socks.append((s, data))
        except OSError:
            refused += 1
    # A server over its per-IP limit accepts and closes at once: count those
    # as refused too. (poll, not select: descriptors pass FD_SETSIZE here.)
    time.sleep(0.3)
    alive = []
    for s, data in socks:
        if readable(s):
            try:
                if s.recv(1, socket.MSG_PEEK) == b"":
                    refused += 1
                    s.close()
                    continue
            except OSError:
                refused += 1
                s.close()
                continue
        alive.append((s, data))
    print("open %d refused %d" % (len(alive), refused), flush=True)

    deadline = time.monotonic() + hold
    next_byte = time.monotonic() + 0.5
    while time.monotonic() < deadline:
        p = select.poll()
        p.register(sys.stdin.fileno(), select.POLLIN)
        if p.poll(200) and not os.read(sys.stdin.fileno(), 4096):
            break
        if trickle and time.monotonic() >= next_byte:
            next_byte += 0.5
            for s, data in alive:
                if data:
                    try:
                        s.send(b"x")
                    except OSError:
                        pass
    closed = 0
    for s, _ in alive:
        if readable(s):
            try:
                if s.recv(4096) == b"":
                    closed += 1
            except OSError:
                closed += 1
        s.close()
    print("closed_by_server %d" % closed, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
