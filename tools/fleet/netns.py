"""netns: what the harness creates and how it is undone; the namespaces, bridge and shaped link.

Every pid, mount and namespace is recorded in <workdir>/state.jsonl before or as it is created;
`cleanup` undoes exactly that (pids checked against their start time, so a reused pid is never
signalled), and nothing else.
"""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

from common import (FleetError, NS_PREFIX, ORIGIN_ADDR, host_addr, mounted_paths, ns_name,
                    proc_start_time, proc_state, run)

class Registry:
    """Append-only record of everything created: pids, mounts, namespaces."""

    def __init__(self, workdir):
        self.path = Path(workdir) / "state.jsonl"

    def record(self, **entry):
        with open(self.path, "a") as f:
            f.write(json.dumps(entry) + "\n")

    def entries(self):
        try:
            lines = self.path.read_text().splitlines()
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in lines if line.strip()]

    def spawn(self, what, cmd, log_path, env=None):
        logf = open(log_path, "ab")
        p = subprocess.Popen(
            [str(c) for c in cmd],
            stdin=subprocess.DEVNULL,
            stdout=logf,
            stderr=logf,
            env=env,
            start_new_session=True,
        )
        logf.close()
        self.record(pid=p.pid, start=proc_start_time(p.pid), what=what)
        return p


def ours_alive(entry):
    """Whether the process we recorded still runs. A zombie child of ours is reaped and gone."""
    pid = entry["pid"]
    if proc_start_time(pid) != entry["start"]:
        return False
    if proc_state(pid) == "Z":
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        return False
    return True


def signal_ours(entries, sig):
    for e in entries:
        if ours_alive(e):
            try:
                os.kill(e["pid"], sig)
            except ProcessLookupError:
                pass


def wait_gone(entries, seconds):
    deadline = time.time() + seconds
    while time.time() < deadline and any(ours_alive(e) for e in entries):
        time.sleep(0.1)


def cleanup(workdir):
    """Undoes what <workdir>/state.jsonl records. Idempotent; never touches anything else."""
    reg = Registry(workdir)
    entries = reg.entries()
    pids = [e for e in entries if "pid" in e]
    readers = [e for e in pids if e["what"].startswith("reader")]
    signal_ours(readers, signal.SIGKILL)
    wait_gone(readers, 5)
    mounts = {e["mount"] for e in entries if "mount" in e}
    for m in sorted(mounts & mounted_paths()):
        run(["umount", "-l", m], check=False)
    signal_ours(pids, signal.SIGTERM)
    wait_gone(pids, 15)
    signal_ours(pids, signal.SIGKILL)
    wait_gone(pids, 5)
    for m in sorted(mounts & mounted_paths()):
        run(["umount", "-l", m], check=False)
    namespaces = [e["ns"] for e in entries if "ns" in e]
    existing = set(run(["ip", "netns", "list"], check=False).split())
    for ns in reversed(namespaces):
        if ns in existing and ns.startswith(NS_PREFIX):
            left = run(["ip", "netns", "pids", ns], check=False).split()
            for pid in left:  # only what we started can be in our namespaces
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            run(["ip", "netns", "del", ns], check=False)
    if reg.path.exists():
        reg.path.rename(reg.path.with_suffix(".done"))


def add_namespace(reg, node):
    name = ns_name(node)
    if name in run(["ip", "netns", "list"]).split():
        raise FleetError(f"namespace {name} already exists (a previous run?): `scripts/fleet --cleanup-only`, or `ip netns del {name}`")
    reg.record(ns=name)
    run(["ip", "netns", "add", name])
    run(["ip", "-n", name, "link", "set", "lo", "up"])


def attach(reg, node, addr):
    """A namespace for `node` with eth0 = `addr`/24, its other end on the bridge."""
    add_namespace(reg, node)
    br = ns_name("br")
    port = f"p-{node}"
    run(["ip", "-n", br, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns_name(node)])
    run(["ip", "-n", br, "link", "set", port, "master", "br0", "up"])
    run(["ip", "-n", ns_name(node), "addr", "add", f"{addr}/24", "dev", "eth0"])
    run(["ip", "-n", ns_name(node), "link", "set", "eth0", "up"])


def setup_network(reg, hosts, rate, rate_bits):
    add_namespace(reg, "br")
    run(["ip", "-n", ns_name("br"), "link", "add", "br0", "type", "bridge"])
    run(["ip", "-n", ns_name("br"), "link", "set", "br0", "up"])
    attach(reg, "origin", ORIGIN_ADDR)
    for i in range(1, hosts + 1):
        attach(reg, f"h{i}", host_addr(i))
    return shape_origin("add", rate, rate_bits)


def shape_origin(verb, rate, rate_bits):
    """tbf on the origin's link (`verb` add or change); returns the burst in bytes. tbf needs a
    bucket of at least one (GSO) packet: 10 ms of the rate, and at least 256 KiB."""
    burst = max(256 * 1024, rate_bits // 8 // 100)
    run(["tc", "-n", ns_name("origin"), "qdisc", verb, "dev", "eth0", "root", "tbf",
         "rate", rate, "burst", str(burst), "latency", "100ms"])
    return burst


def link_bytes(node):
    """(tx, rx) bytes of `node`'s eth0, as seen inside its namespace."""
    out = run(["ip", "-n", ns_name(node), "-j", "-s", "link", "show", "eth0"])
    stats = json.loads(out)[0]["stats64"]
    return stats["tx"]["bytes"], stats["rx"]["bytes"]
