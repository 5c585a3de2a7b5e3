#!/usr/bin/env python3
"""Read a systemd unit file and check its hardening.

    check_unit.py UNIT            check the options below; exit 1 naming each miss
    check_unit.py UNIT --env DIR  print the service's Environment= assignments,
                                  one a line, with %d (the credentials
                                  directory) replaced by DIR

Keys may repeat (systemd appends, or for some keys an empty value resets);
a line ending in a backslash continues on the next.
"""
import sys

# Key -> the value the service must have (the last one, as systemd takes it).
REQUIRED = {
    "DynamicUser": "yes",
    "NoNewPrivileges": "yes",
    "CapabilityBoundingSet": "",
    "AmbientCapabilities": "",
    "PrivateUsers": "yes",
    "UMask": "0077",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "PrivateDevices": "yes",
    "DevicePolicy": "closed",
    "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes",
    "ProtectKernelLogs": "yes",
    "ProtectControlGroups": "yes",
    "ProtectClock": "yes",
    "ProtectHostname": "yes",
    "ProtectProc": "invisible",
    "ProcSubset": "pid",
    "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
    "RestrictNamespaces": "yes",
    "RestrictRealtime": "yes",
    "RestrictSUIDSGID": "yes",
    "LockPersonality": "yes",
    "MemoryDenyWriteExecute": "yes",
    "RemoveIPC": "yes",
    "SystemCallArchitectures": "native",
    "StateDirectory": "amp2dify",
    "StateDirectoryMode": "0700",
    "KillSignal": "SIGTERM",
    "ExecReload": "/bin/kill -HUP $MAINPID",
    "Restart": "on-failure",
}
# Keys every value of which must be present (systemd accumulates them).
ALL_OF = {
    "SystemCallFilter": ["@system-service", "~@privileged"],
    "LoadCredential": ["amp2dify_secrets:/etc/amp2dify/amp2dify_secrets",
                       "dify_api_key:/etc/amp2dify/dify_api_key"],
    "Environment": ["AMP2DIFY_SPOOL=/var/lib/amp2dify/spool.db",
                    "AMP2DIFY_SECRETS_FILE=%d/amp2dify_secrets",
                    "DIFY_API_KEY_FILE=%d/dify_api_key"],
}


def parse(path):
    sections = {}
    section = None
    pending = ""
    with open(path) as f:
        for raw in f:
            line = pending + raw.rstrip("\n")
            pending = ""
            if line.endswith("\\"):
                pending = line[:-1] + " "
                continue
            s = line.strip()
            if not s or s[0] in "#;":
                continue
            if s.startswith("[") and s.endswith("]"):
                section = sections.setdefault(s[1:-1], {})
                continue
            if section is None or "=" not in s:
                raise SystemExit(f"{path}: cannot read line: {s}")
            key, value = s.split("=", 1)
            section.setdefault(key.strip(), []).append(value.strip())
    return sections


def main():
    path = sys.argv[1]
    units = parse(path)
    service = units.get("Service", {})
    if len(sys.argv) == 4 and sys.argv[2] == "--env":
        for v in service.get("Environment", []):
            print(v.replace("%d", sys.argv[3]))
        return 0
    problems = []
    for section in ("Unit", "Service", "Install"):
        if section not in units:
            problems.append(f"no [{section}] section")
    for key, want in REQUIRED.items():
        got = service.get(key)
        if got is None:
            problems.append(f"{key}= is missing (want {want!r})")
        elif got[-1] != want:
            problems.append(f"{key}={got[-1]!r}, want {want!r}")
    for key, wants in ALL_OF.items():
        got = service.get(key, [])
        for w in wants:
            if w not in got:
                problems.append(f"{key}={w} is missing")
    start = service.get("ExecStart", [""])[-1].split()
    if start[:2] != ["/usr/local/bin/amp2dify", "serve"]:
        problems.append(f"ExecStart= does not run /usr/local/bin/amp2dify serve: {start}")
    stop = int(service.get("TimeoutStopSec", ["0"])[-1])
    if stop <= 25:
        problems.append(f"TimeoutStopSec={stop} leaves no room past shutdown_timeout_seconds (25)")
    if "User" in service:
        problems.append("User= is set: DynamicUser= gives the service a user of its own")
    for p in problems:
        print(f"{path}: {p}", file=sys.stderr)
    print(f"{path}: {len(REQUIRED) + sum(map(len, ALL_OF.values()))} settings checked")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
