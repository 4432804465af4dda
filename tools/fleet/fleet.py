"""fleet: a simulated datacenter for orcafs, measured in one run; writes docs/fleet.md.

What it builds (all of it in network namespaces it creates, named `orcafleet-*`; nothing touches
the host's own network):

    orcafleet-br      a bridge, br0, and one veth per node plugged into it
    orcafleet-origin  Garage (S3 on 127.0.0.1:3900 inside), the delaying proxy (proxy.py) on
                      198.18.0.2:8080, and the only shaped link: tbf on its veth
    orcafleet-hN      one orcafs (or rclone) host each, 198.18.0.(10+N)

Processes enter a namespace with `nsenter --net=...`, not `ip netns exec`: the latter also
unshares the mount namespace, and a FUSE mount made there would be invisible to the readers,
to `orcafs status` and to the cleanup.

Runs, each from cold (fresh mounts, empty caches): one host alone; one host alone with the link
at --fast-rate (where a host stops being link-bound here); N hosts with the cluster; N
independent hosts; N rclone hosts; N hosts with the cluster where one is SIGKILLed mid-read.
The origin's bytes come from the proxy (it sees every byte the origin link carries), each
host's time from its reader, peak RSS from VmHWM, peer traffic from the veth counters.

Everything created is recorded in <workdir>/state.jsonl as it is created; `cleanup` (run at the
end, on failure, on Ctrl-C, and again by scripts/fleet's trap) undoes exactly that: readers,
mounts, processes by pid (checked against their start time), namespaces.

Layout: common (constants, helpers), netns (what is created and its cleanup, the network),
origin (Garage, proxy.py, the dataset), hosts (orcafs and rclone mounts), reader (one host's
workload, a separate process per host), report (docs/fleet.md), and this file: the runs.

Subcommands: run (the default), cleanup, render (the document again from a results.json).
"""

import argparse
import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path

sys.dont_write_bytecode = True  # keep tools/fleet free of __pycache__
import report  # noqa: E402
from common import (HERE, MIB, FleetError, log, machine_cpu, parse_rate_bits, parse_size,  # noqa: E402
                    proc_cpu_seconds, proc_status_kib, run, tail, write_private)
from hosts import orcafs_status, start_hosts, stop_hosts  # noqa: E402
from netns import Registry, cleanup, link_bytes, setup_network, shape_origin  # noqa: E402
from origin import Origin, make_dataset, upload  # noqa: E402

def start_readers(reg, ctx, hosts, run_name, victim):
    """One reader per host. With a victim, the survivors share the hashing: survivor k hashes the
    files i with i mod (number of survivors) = k, so each file is checked by one of them."""
    procs = []
    survivors = [h for h in hosts if h is not victim]
    for h in hosts:
        out = h.dir / f"read-{run_name}.json"
        out.unlink(missing_ok=True)
        cmd = [sys.executable, HERE / "reader.py", "--mount", h.mnt, "--manifest",
               ctx.manifest_path, "--out", out, "--threads", ctx.args.reader_threads]
        if victim and h is not victim:
            cmd += ["--hash-mod", len(survivors), "--hash-rem", survivors.index(h)]
        logp = h.dir / f"read-{run_name}.log"
        procs.append((h, reg.spawn(f"reader-{h.node}", cmd, logp), out, logp))
    return procs


def snapshot(ctx, hosts):
    return {
        "t": time.time(),
        "origin": ctx.origin.proxy_stats(),
        "links": {h.node: link_bytes(h.node) for h in hosts},
        "cpu": machine_cpu(),
        "origin_cpu": sum(proc_cpu_seconds(p.pid) or 0 for p in (ctx.origin.garage, ctx.origin.proxy)),
    }


# ---------------------------------------------------------------------------------------------
# Runs


class Ctx:
    pass


def measure_run(reg, ctx, name, n, kind, kill=False, rate=None):
    """One run from cold; `rate` shapes the origin link differently for this run only."""
    if rate:
        shape_origin("change", rate, parse_rate_bits(rate))
        ctx.run_rate_bits = parse_rate_bits(rate)
        try:
            return measure_run(reg, ctx, name, n, kind, kill)
        finally:
            shape_origin("change", ctx.args.rate, ctx.rate_bits)
            ctx.run_rate_bits = ctx.rate_bits
    log(f"run {name}: starting {n} {kind} host(s)")
    hosts = start_hosts(reg, ctx, n, kind)
    result = {"name": name, "hosts": n, "kind": kind, "rate_bits": ctx.run_rate_bits}
    try:
        if kind == "cluster" and not kill:
            result["idle"] = measure_idle(ctx, hosts, ctx.args.idle_seconds)
        before = snapshot(ctx, hosts)
        victim = hosts[-1] if kill else None
        readers = start_readers(reg, ctx, hosts, name, victim)
        result.update(wait_readers(ctx, readers, before, victim))
        after = snapshot(ctx, hosts)
        result.update(summarize(ctx, hosts, readers, before, after, victim))
        result["status"] = collect_status(ctx, hosts, victim)
    finally:
        stop_hosts(hosts)
    log(f"run {name}: origin {result['origin_bytes'] / ctx.manifest['total']:.3f}x the dataset, "
        f"slowest host {result['time_max']:.1f}s")
    return result


def measure_idle(ctx, hosts, seconds):
    """Bytes on the hosts' links while the cluster only health-checks."""
    before = {h.node: link_bytes(h.node) for h in hosts}
    time.sleep(seconds)
    after = {h.node: link_bytes(h.node) for h in hosts}
    tx = sum(after[h.node][0] - before[h.node][0] for h in hosts)
    return {"seconds": seconds, "tx_bytes": tx}


def wait_readers(ctx, readers, before, victim):
    n = len(readers)
    deadline = time.time() + 3 * n * ctx.manifest["total"] * 8 / ctx.run_rate_bits + 300
    killed_at = killed_bytes = None
    kill_after = ctx.args.kill_at * ctx.manifest["total"]
    while any(p.poll() is None for _, p, _, _ in readers):
        if time.time() > deadline:
            raise FleetError(f"readers still running after the run's deadline; see {ctx.workdir}/h*/read-*.log")
        if victim and killed_at is None:
            sent = ctx.origin.proxy_bytes_now() - before["origin"]["bytes_down"]
            if sent >= kill_after:
                killed_at, killed_bytes = time.time() - before["t"], sent
                kill_host(victim, readers)
        time.sleep(0.1)
    if victim and killed_at is None:
        raise FleetError("the read finished before the kill point; lower --kill-at")
    return {"killed_at": killed_at, "killed_origin_bytes": killed_bytes}


def kill_host(victim, readers):
    log(f"SIGKILL {victim.node} (pid {victim.proc.pid}) mid-read")
    victim.vmhwm = proc_status_kib(victim.proc.pid, "VmHWM")
    victim.cpu = proc_cpu_seconds(victim.proc.pid)
    victim.proc.send_signal(signal.SIGKILL)
    victim.proc.wait(timeout=10)
    for h, p, _, _ in readers:
        if h is victim and p.poll() is None:
            p.kill()
            p.wait(timeout=10)
    run(["umount", "-l", victim.mnt], check=False)


def summarize(ctx, hosts, readers, before, after, victim):
    per_host = []
    for h, p, out, logp in readers:
        entry = {"node": h.node, "victim": h is victim}
        tx0, rx0 = before["links"][h.node]
        tx1, rx1 = after["links"][h.node]
        entry.update(tx_bytes=tx1 - tx0, rx_bytes=rx1 - rx0)
        if h is not victim:
            if p.returncode != 0 or not out.exists():
                raise FleetError(f"reader on {h.node} failed ({p.returncode}):\n{tail(logp)}")
            r = json.loads(out.read_text())
            entry.update(time=r["end"] - before["t"], bytes=r["bytes"], hashed=r["hashed"],
                         errors=r["errors"][:5], error_count=len(r["errors"]),
                         reader_cpu_seconds=r["cpu_seconds"])
        if h is victim:
            entry.update(vmhwm_kib=h.vmhwm, cpu_seconds=h.cpu)
        else:
            entry.update(vmhwm_kib=proc_status_kib(h.proc.pid, "VmHWM"),
                         cpu_seconds=proc_cpu_seconds(h.proc.pid))
        per_host.append(entry)
    finished = [e for e in per_host if not e["victim"]]
    busy0, total0 = before["cpu"]
    busy1, total1 = after["cpu"]
    fleet_cpu = (after["origin_cpu"] - before["origin_cpu"]
                 + sum(e.get("cpu_seconds") or 0 for e in per_host)
                 + sum(e.get("reader_cpu_seconds", 0) for e in per_host))
    return {
        "per_host": per_host,
        "origin_bytes": after["origin"]["bytes_down"] - before["origin"]["bytes_down"],
        "origin_answers": after["origin"]["answers"] - before["origin"]["answers"],
        "time_max": max(e["time"] for e in finished),
        "time_mean": sum(e["time"] for e in finished) / len(finished),
        "errors": sum(e["error_count"] for e in finished),
        "bytes_ok": all(e["bytes"] == ctx.manifest["total"] for e in finished),
        "hashed": sum(e["hashed"] for e in finished),
        "cpu_busy": (busy1 - busy0) / max(1, total1 - total0),
        "fleet_cpu_seconds": fleet_cpu,
        "fleet_cpu_share": fleet_cpu / ((after["t"] - before["t"]) * os.cpu_count()),
    }


def collect_status(ctx, hosts, victim):
    """Each live orcafs host's counters (none for rclone)."""
    out = {}
    for h in hosts:
        if h.kind != "orcafs" or h is victim:
            continue
        try:
            out[h.node] = orcafs_status(ctx, h).get("metrics", {})
        except FleetError as e:
            out[h.node] = {"error": str(e)}
    return out


# ---------------------------------------------------------------------------------------------
# Main


RUNS = ["single", "single-fast", "cluster", "independent", "rclone", "kill"]


def parse_args(argv):
    p = argparse.ArgumentParser(prog="scripts/fleet", description=__doc__.split("\n\n")[0])
    p.add_argument("--orcafs", required=True)
    p.add_argument("--workdir", required=True)
    p.add_argument("--out", default="docs/fleet.md")
    p.add_argument("--hosts", type=int, default=8)
    p.add_argument("--rate", default="200mbit", help="origin link rate (tc units)")
    p.add_argument("--fast-rate", default="1gbit",
                   help="origin link rate of the single-fast run (one host, to show where it is CPU-bound)")
    p.add_argument("--latency-ms", type=int, default=20, help="first-byte latency of the origin")
    p.add_argument("--large-count", type=int, default=3)
    p.add_argument("--large-size", type=parse_size, default=parse_size("512MiB"))
    p.add_argument("--small-count", type=int, default=1000)
    p.add_argument("--small-min", type=parse_size, default=parse_size("64KiB"))
    p.add_argument("--small-max", type=parse_size, default=parse_size("1MiB"))
    p.add_argument("--reader-threads", type=int, default=4)
    p.add_argument("--idle-seconds", type=int, default=10)
    p.add_argument("--kill-at", type=float, default=0.4,
                   help="kill when the origin has sent this fraction of the dataset")
    p.add_argument("--runs", default=",".join(RUNS), help="comma-separated subset of " + ",".join(RUNS))
    p.add_argument("--quick", action="store_true", help="a ~100 MiB dataset, for trying the script")
    a = p.parse_args(argv)
    if a.quick:
        a.large_count, a.large_size, a.small_count = 2, 32 * MIB, 100
    a.runs = [r for r in a.runs.split(",") if r]
    for r in a.runs:
        if r not in RUNS:
            p.error(f"unknown run {r!r}; choose from {','.join(RUNS)}")
    if not 2 <= a.hosts <= 200:
        p.error("--hosts must be 2..200")
    return a


def preflight(args):
    if os.geteuid() != 0:
        raise FleetError("must run as root (namespaces, tc, mounts)")
    for tool in ("ip", "tc", "nsenter", "curl", "garage"):
        if not shutil.which(tool):
            raise FleetError(f"`{tool}` is not installed")
    if not Path("/dev/fuse").exists():
        raise FleetError("/dev/fuse is missing (modprobe fuse)")
    if not os.access(args.orcafs, os.X_OK):
        raise FleetError(f"no orcafs binary at {args.orcafs}")
    if "rclone" in args.runs and not shutil.which("rclone"):
        log("rclone is not installed (apt-get install rclone): skipping the rclone run")
        args.runs.remove("rclone")


def do_run(args):
    preflight(args)
    ctx = Ctx()
    ctx.args = args
    ctx.orcafs = str(Path(args.orcafs).resolve())
    ctx.workdir = Path(args.workdir).resolve()
    ctx.rate_bits = ctx.run_rate_bits = parse_rate_bits(args.rate)
    parse_rate_bits(args.fast_rate)
    ctx.workdir.mkdir(parents=True, exist_ok=True)
    os.chmod(ctx.workdir, 0o700)
    reg = Registry(ctx.workdir)
    if any("pid" in e or "ns" in e for e in reg.entries()):
        log("cleaning up what an earlier run left")
        cleanup(ctx.workdir)
    try:
        results = measure_all(reg, ctx)
    finally:
        log("cleaning up")
        cleanup(ctx.workdir)
    Path(args.out).write_text(report.render(results))
    log(f"wrote {args.out}")


def measure_all(reg, ctx):
    args = ctx.args
    burst = setup_network(reg, args.hosts, args.rate, ctx.rate_bits)
    write_private(ctx.workdir / "cluster.secret", os.urandom(32).hex() + "\n")
    log("starting Garage and the delaying proxy")
    ctx.origin = Origin(ctx.workdir)
    ctx.origin.start(reg, args.latency_ms)
    log("writing and uploading the dataset")
    data, ctx.manifest = make_dataset(ctx.workdir, args)
    upload(ctx.origin, data, ctx.manifest)
    shutil.rmtree(data)
    ctx.manifest_path = ctx.workdir / "manifest.json"
    ctx.manifest_path.write_text(json.dumps(ctx.manifest))
    results = {
        "setup": setup_facts(ctx, burst),
        "runs": {},
    }
    plan = {
        "single": (1, "alone", None),
        "single-fast": (1, "alone", args.fast_rate),
        "cluster": (args.hosts, "cluster", None),
        "independent": (args.hosts, "independent", None),
        "rclone": (args.hosts, "rclone", None),
        "kill": (args.hosts, "cluster", None),
    }
    for name in args.runs:
        n, kind, rate = plan[name]
        results["runs"][name] = measure_run(reg, ctx, name, n, kind, kill=(name == "kill"), rate=rate)
        (ctx.workdir / "results.json").write_text(json.dumps(results, indent=1))
    return results


def setup_facts(ctx, burst):
    a = ctx.args
    files = ctx.manifest["files"]
    small = [f["size"] for f in files if f["key"].startswith("small/")]
    return {
        "hosts": a.hosts,
        "rate": a.rate,
        "rate_bits": ctx.rate_bits,
        "fast_rate": a.fast_rate,
        "burst": burst,
        "latency_ms": a.latency_ms,
        "dataset_bytes": ctx.manifest["total"],
        "large_count": a.large_count,
        "large_size": a.large_size,
        "small_count": len(small),
        "small_bytes": sum(small),
        "small_min": min(small) if small else 0,
        "small_max": max(small) if small else 0,
        "reader_threads": a.reader_threads,
        "kill_at": a.kill_at,
        "cpus": os.cpu_count(),
        "loadavg": Path("/proc/loadavg").read_text().split()[:3],
        "mem_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / (1 << 30)),
        "kernel": os.uname().release,
        "orcafs_version": run([ctx.orcafs, "--version"], check=False).strip(),
        "rclone_version": (run(["rclone", "version"], check=False).splitlines() or [""])[0]
        if shutil.which("rclone") else None,
        "garage_version": run(["garage", "--version"], check=False).strip(),
        "commit": run(["git", "rev-parse", "--short", "HEAD"], check=False).strip(),
        "command": os.environ.get("ORCAFS_FLEET_COMMAND", "scripts/fleet"),
        "date": time.strftime("%Y-%m-%d"),
    }


def main(argv):
    if argv and argv[0] == "cleanup":
        p = argparse.ArgumentParser(prog="fleet.py cleanup")
        p.add_argument("--workdir", required=True)
        return cleanup(Path(p.parse_args(argv[1:]).workdir))
    if argv and argv[0] == "render":
        p = argparse.ArgumentParser(prog="fleet.py render", description="rewrite the document "
                                    "from a run's results.json, without running anything")
        p.add_argument("--results", required=True)
        p.add_argument("--out", required=True)
        a = p.parse_args(argv[1:])
        Path(a.out).write_text(report.render(json.loads(Path(a.results).read_text())))
        return
    if argv and argv[0] == "run":
        argv = argv[1:]
    args = parse_args(argv)
    # Ctrl-C and SIGTERM unwind through the `finally` that cleans up (SIGINT even when started
    # from a shell that ignores it for background jobs).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        do_run(args)
    except FleetError as e:
        print(f"fleet: error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("fleet: interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main(sys.argv[1:])
