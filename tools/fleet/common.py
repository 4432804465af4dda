"""common: constants and small helpers every part of the fleet harness uses."""

import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
NS_PREFIX = "orcafleet-"
# RFC 2544's benchmarking range, used only inside the namespaces this script creates.
SUBNET = "198.18.0"
ORIGIN_ADDR = f"{SUBNET}.2"
PROXY_PORT = 8080
GARAGE_S3 = "127.0.0.1:3900"
GARAGE_RPC = "127.0.0.1:3901"
CLUSTER_PORT = 7070
BUCKET = "fleet"
REGION = "garage"
READ_BUF = 1 << 20
MIB = 1 << 20


class FleetError(Exception):
    """One sentence for the operator; the run stops and cleans up."""


# ---------------------------------------------------------------------------------------------
# Small helpers


def parse_size(s):
    units = {"kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    low = s.strip().lower()
    for unit, mult in sorted(units.items(), key=lambda u: -len(u[0])):
        if low.endswith(unit):
            return int(float(low[: -len(unit)]) * mult)
    return int(low)


def parse_rate_bits(s):
    """`200mbit` -> bits per second (tc's units)."""
    low = s.strip().lower()
    for unit, mult in (("gbit", 10**9), ("mbit", 10**6), ("kbit", 10**3)):
        if low.endswith(unit):
            return int(float(low[: -len(unit)]) * mult)
    raise FleetError(f"rate {s!r} must end in kbit, mbit or gbit (tc's units)")


def log(msg):
    print(f"fleet: {msg}", file=sys.stderr, flush=True)


def run(cmd, timeout=60, check=True, env=None):
    """Runs `cmd`, returns stdout; a failure is a FleetError quoting the command and stderr."""
    shown = " ".join(str(c) for c in cmd)
    try:
        p = subprocess.run(
            [str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, env=env
        )
    except subprocess.TimeoutExpired:
        raise FleetError(f"`{shown}` did not finish in {timeout}s")
    except FileNotFoundError:
        raise FleetError(f"`{cmd[0]}` is not installed")
    if check and p.returncode != 0:
        raise FleetError(f"`{shown}` failed ({p.returncode}): {p.stderr.strip()[-2000:]}")
    return p.stdout


def ns_name(node):
    return NS_PREFIX + node


def in_ns(node, cmd):
    """`cmd` run in `node`'s network namespace, keeping this mount namespace (see module doc)."""
    return ["nsenter", f"--net=/run/netns/{ns_name(node)}", "--"] + [str(c) for c in cmd]


def host_addr(i):
    return f"{SUBNET}.{10 + i}"


def tail(path, lines=20):
    try:
        text = Path(path).read_text(errors="replace").splitlines()
    except OSError:
        return f"(no {path})"
    return "\n".join(text[-lines:])


def proc_start_time(pid):
    """Field 22 of /proc/PID/stat: tells a reused pid from ours. None if the process is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def proc_state(pid):
    """R, S, D, Z, …; None if the process is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return None


def proc_status_kib(pid, field):
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def proc_cpu_seconds(pid):
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_cpu():
    """(busy, total) jiffies of the whole machine, from /proc/stat."""
    f = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = f[3] + f[4]
    return sum(f) - idle, sum(f)


def mounted_paths():
    out = set()
    for line in Path("/proc/self/mounts").read_text().splitlines():
        parts = line.split()
        if len(parts) > 1:
            out.add(parts[1].replace("\\040", " "))
    return out


def write_private(path, text):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
