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

Runs, each from cold (fresh mounts, empty caches): one host alone; N hosts with the cluster;
N independent hosts; N rclone hosts; N hosts with the cluster where one is SIGKILLed mid-read.
The origin's bytes come from the proxy (it sees every byte the origin link carries), each
host's time from its reader, peak RSS from VmHWM, peer traffic from the veth counters.

Everything created is recorded in <workdir>/state.jsonl as it is created; `cleanup` (run at the
end, on failure, on Ctrl-C, and again by scripts/fleet's trap) undoes exactly that: readers,
mounts, processes by pid (checked against their start time), namespaces.

Subcommands: run, cleanup, read (the per-host reader, started by run).
"""

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import report

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


# ---------------------------------------------------------------------------------------------
# What was created, and undoing it


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
    start = proc_start_time(entry["pid"])
    return start is not None and start == entry["start"]


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


# ---------------------------------------------------------------------------------------------
# Network


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
    # tbf needs a bucket of at least one (GSO) packet; 10 ms of the rate, and at least 256 KiB.
    burst = max(256 * 1024, rate_bits // 8 // 100)
    run(["tc", "-n", ns_name("origin"), "qdisc", "add", "dev", "eth0", "root", "tbf",
         "rate", rate, "burst", str(burst), "latency", "100ms"])
    return burst


def link_bytes(node):
    """(tx, rx) bytes of `node`'s eth0, as seen inside its namespace."""
    out = run(["ip", "-n", ns_name(node), "-j", "-s", "link", "show", "eth0"])
    stats = json.loads(out)[0]["stats64"]
    return stats["tx"]["bytes"], stats["rx"]["bytes"]


# ---------------------------------------------------------------------------------------------
# Origin: Garage and the delaying proxy


class Origin:
    def __init__(self, workdir):
        self.dir = Path(workdir) / "origin"
        self.config = self.dir / "garage.toml"
        self.stats = self.dir / "proxy-stats.json"
        self.key = "GK" + os.urandom(12).hex()
        self.secret = os.urandom(32).hex()

    def cli(self, *args, timeout=30):
        return run(in_ns("origin", ["garage", "-c", self.config, *args]), timeout=timeout)

    def start(self, reg, latency_ms):
        shutil.rmtree(self.dir, ignore_errors=True)  # a fresh Garage: a new layout and bucket
        self.dir.mkdir(parents=True)
        write_private(self.config, garage_config(self.dir))
        env = {k: v for k, v in os.environ.items() if not k.startswith("GARAGE_")}
        env.update(RUST_LOG="warn", NO_COLOR="1")
        self.garage = reg.spawn("garage", in_ns("origin", ["garage", "-c", self.config, "server"]),
                                self.dir / "garage.log", env=env)
        self.wait_answering()
        node_id = self.cli("node", "id", "-q").strip().split("@")[0]
        self.cli("layout", "assign", "-z", "dc1", "-c", "100G", node_id)
        self.cli("layout", "apply", "--version", "1")
        self.cli("key", "import", "--yes", "-n", "fleet", self.key, self.secret)
        self.cli("bucket", "create", BUCKET)
        self.cli("bucket", "allow", "--read", "--write", "--owner", BUCKET, "--key", self.key)
        self.proxy = reg.spawn("proxy", in_ns("origin", [sys.executable, HERE / "proxy.py",
                               f"{ORIGIN_ADDR}:{PROXY_PORT}", GARAGE_S3, latency_ms, self.stats]),
                               self.dir / "proxy.log")
        deadline = time.time() + 15
        while not self.stats.exists():
            if time.time() > deadline or self.proxy.poll() is not None:
                raise FleetError(f"the delaying proxy did not start:\n{tail(self.dir / 'proxy.log')}")
            time.sleep(0.1)

    def wait_answering(self):
        deadline = time.time() + 30
        while True:
            if self.garage.poll() is not None:
                raise FleetError(f"garage exited:\n{tail(self.dir / 'garage.log')}")
            try:
                self.cli("status", timeout=10)
                return
            except FleetError as e:
                if time.time() > deadline:
                    raise FleetError(f"garage did not answer in 30s: {e}")
                time.sleep(0.3)

    def put(self, key, path):
        url = f"http://{GARAGE_S3}/{BUCKET}/{key}"
        # Garage wants the payload hash header, which this curl does not send by itself.
        cmd = ["curl", "-sS", "--fail", "--aws-sigv4", f"aws:amz:{REGION}:s3", "--user",
               f"{self.key}:{self.secret}", "-H", "x-amz-content-sha256: UNSIGNED-PAYLOAD",
               "-T", path, url]
        try:
            run(in_ns("origin", cmd), timeout=600)
        except FleetError as e:
            raise FleetError(str(e).replace(self.secret, "…"))

    def proxy_stats(self):
        """The proxy's counters, after letting its 200 ms writer catch up."""
        time.sleep(0.5)
        return json.loads(self.stats.read_text())

    def proxy_bytes_now(self):
        return json.loads(self.stats.read_text())["bytes_down"]


def garage_config(d):
    return f"""metadata_dir = "{d / 'meta'}"
data_dir = "{d / 'data'}"
db_engine = "lmdb"
replication_factor = 1
rpc_bind_addr = "{GARAGE_RPC}"
rpc_public_addr = "{GARAGE_RPC}"
rpc_secret = "{os.urandom(32).hex()}"

[s3_api]
s3_region = "{REGION}"
api_bind_addr = "{GARAGE_S3}"
"""


def write_private(path, text):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


# ---------------------------------------------------------------------------------------------
# Dataset


def make_dataset(workdir, args):
    """Random files on disk and their manifest (key, size, sha256), large objects first."""
    data = Path(workdir) / "data"
    shutil.rmtree(data, ignore_errors=True)
    rng = random.Random(20261101)
    files = [(f"large/large-{i}.bin", args.large_size) for i in range(args.large_count)]
    for i in range(args.small_count):
        size = rng.randrange(args.small_min, args.small_max + 1)
        files.append((f"small/d{i // 100:02d}/f{i:04d}.bin", size))
    manifest = []
    for key, size in files:
        path = data / key
        path.parent.mkdir(parents=True, exist_ok=True)
        h = hashlib.sha256()
        with open(path, "wb") as f:
            left = size
            while left:
                piece = os.urandom(min(left, 8 * MIB))
                h.update(piece)
                f.write(piece)
                left -= len(piece)
        manifest.append({"key": key, "size": size, "sha256": h.hexdigest()})
    return data, {"files": manifest, "total": sum(f["size"] for f in manifest)}


def upload(origin, data, manifest):
    with ThreadPoolExecutor(4) as pool:
        jobs = [pool.submit(origin.put, f["key"], data / f["key"]) for f in manifest["files"]]
        for j in jobs:
            j.result()


# ---------------------------------------------------------------------------------------------
# Hosts


class Host:
    def __init__(self, workdir, i, kind):
        self.i = i
        self.node = f"h{i}"
        self.addr = host_addr(i)
        self.kind = kind  # "orcafs" or "rclone"
        self.dir = Path(workdir) / self.node
        self.mnt = self.dir / "mnt"
        self.proc = None

    @property
    def log(self):
        return self.dir / f"{self.kind}.log"

    def fresh(self):
        if str(self.mnt) in mounted_paths():
            run(["umount", "-l", self.mnt], check=False)
        for sub in ("cache", "rclone-cache"):
            shutil.rmtree(self.dir / sub, ignore_errors=True)
        self.mnt.mkdir(parents=True, exist_ok=True)
        self.log.unlink(missing_ok=True)


def orcafs_config(host, hosts, cluster, cache_max):
    lines = [
        f'endpoint_url = "http://{ORIGIN_ADDR}:{PROXY_PORT}"',
        f'region = "{REGION}"',
        "force_path_style = true",
        f'cache_dir = "{host.dir / "cache"}"',
        f'cache_max_size = "{cache_max}"',
    ]
    if cluster:
        peers = ", ".join(f'"{host_addr(i)}:{CLUSTER_PORT}"' for i in range(1, hosts + 1))
        lines += [
            "",
            "[cluster]",
            f'listen = "{host.addr}:{CLUSTER_PORT}"',
            f"peers = [{peers}]",
            f'secret_file = "{host.dir.parent / "cluster.secret"}"',
        ]
    return "\n".join(lines) + "\n"


def start_orcafs(reg, ctx, host, hosts, cluster):
    host.fresh()
    cfg = host.dir / "orcafs.toml"
    cache_max = f"{max(4, 3 * ctx.manifest['total'] // (1 << 30) + 2)}GiB"
    cfg.write_text(orcafs_config(host, hosts, cluster, cache_max))
    env = dict(os.environ, AWS_ACCESS_KEY_ID=ctx.origin.key, AWS_SECRET_ACCESS_KEY=ctx.origin.secret,
               AWS_EC2_METADATA_DISABLED="true")
    reg.record(mount=str(host.mnt))
    cmd = [ctx.orcafs, "mount", BUCKET, host.mnt, "--foreground", "--config", cfg]
    host.proc = reg.spawn(f"orcafs-{host.node}", in_ns(host.node, cmd), host.log, env=env)


def start_rclone(reg, ctx, host):
    host.fresh()
    conf = host.dir / "rclone.conf"
    write_private(conf, f"""[origin]
type = s3
provider = Other
endpoint = http://{ORIGIN_ADDR}:{PROXY_PORT}
access_key_id = {ctx.origin.key}
secret_access_key = {ctx.origin.secret}
region = {REGION}
force_path_style = true
""")
    reg.record(mount=str(host.mnt))
    cmd = ["rclone", "mount", f"origin:{BUCKET}", host.mnt, "--config", conf, "--read-only",
           "--vfs-cache-mode", "full", "--cache-dir", host.dir / "rclone-cache",
           "--log-file", host.log, "--log-level", "NOTICE"]
    # rclone's AWS SDK refuses an inherited AWS_CA_BUNDLE on a plain-HTTP endpoint.
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    host.proc = reg.spawn(f"rclone-{host.node}", in_ns(host.node, cmd), host.dir / "rclone.out", env=env)


def orcafs_status(ctx, host):
    out = run([ctx.orcafs, "status", host.mnt, "--json"], timeout=10)
    return json.loads(out)


def wait_mounted(ctx, host, deadline):
    while True:
        if host.proc.poll() is not None:
            raise FleetError(f"{host.kind} on {host.node} exited ({host.proc.returncode}):\n{tail(host.log)}")
        if host.kind == "rclone":
            if str(host.mnt) in mounted_paths():
                return
        else:
            try:
                orcafs_status(ctx, host)
                return
            except FleetError:
                pass
        if time.time() > deadline:
            raise FleetError(f"{host.kind} on {host.node} did not mount in time:\n{tail(host.log)}")
        time.sleep(0.2)


def wait_cluster(ctx, hosts, deadline):
    """Until every host sees every peer up."""
    n = len(hosts)
    for h in hosts:
        while True:
            peers = orcafs_status(ctx, h).get("peers", [])
            up = [p for p in peers if p.get("state") == "up"]
            if len(up) >= n - 1 and len(up) == len(peers):
                break
            if time.time() > deadline:
                raise FleetError(f"{h.node} sees {len(up)} of {n} peers up: {peers}")
            time.sleep(0.2)


def start_hosts(reg, ctx, n, kind):
    hosts = [Host(ctx.workdir, i, "rclone" if kind == "rclone" else "orcafs") for i in range(1, n + 1)]
    for h in hosts:
        if kind == "rclone":
            start_rclone(reg, ctx, h)
        else:
            start_orcafs(reg, ctx, h, n, cluster=(kind == "cluster"))
    deadline = time.time() + 60
    for h in hosts:
        wait_mounted(ctx, h, deadline)
    if kind == "cluster":
        wait_cluster(ctx, hosts, time.time() + 60)
    return hosts


def stop_hosts(hosts):
    for h in hosts:
        if h.proc.poll() is None:
            h.proc.send_signal(signal.SIGTERM)
    deadline = time.time() + 30
    for h in hosts:
        try:
            h.proc.wait(timeout=max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            h.proc.kill()
            h.proc.wait(timeout=10)
    for h in hosts:
        if str(h.mnt) in mounted_paths():
            run(["umount", "-l", h.mnt], check=False)


# ---------------------------------------------------------------------------------------------
# Reading


def read_main(argv):
    """The per-host reader: every file of the manifest, `threads` at a time, in manifest order.
    Checks each file's size; hashes the files whose index % hash_mod == hash_rem."""
    p = argparse.ArgumentParser(prog="fleet.py read")
    p.add_argument("--mount", required=True)
    p.add_argument("--manifest", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--threads", type=int, default=4)
    p.add_argument("--hash-mod", type=int, default=0)
    p.add_argument("--hash-rem", type=int, default=0)
    a = p.parse_args(argv)
    files = json.loads(Path(a.manifest).read_text())["files"]
    start = time.time()

    def one(idx_f):
        idx, f = idx_f
        want_hash = a.hash_mod > 0 and idx % a.hash_mod == a.hash_rem
        h = hashlib.sha256() if want_hash else None
        buf = bytearray(READ_BUF)
        n = 0
        try:
            with open(os.path.join(a.mount, f["key"]), "rb", buffering=0) as fh:
                while True:
                    got = fh.readinto(buf)
                    if not got:
                        break
                    n += got
                    if h:
                        h.update(memoryview(buf)[:got])
        except OSError as e:
            return {"key": f["key"], "error": str(e), "bytes": n}
        r = {"key": f["key"], "bytes": n}
        if n != f["size"]:
            r["error"] = f"read {n} bytes, want {f['size']}"
        if h:
            r["hashed"] = True
            if h.hexdigest() != f["sha256"]:
                r["error"] = "sha256 differs from the dataset's"
        return r

    with ThreadPoolExecutor(a.threads) as pool:
        results = list(pool.map(one, enumerate(files)))
    out = {
        "start": start,
        "end": time.time(),
        "bytes": sum(r["bytes"] for r in results),
        "files": len(results),
        "hashed": sum(1 for r in results if r.get("hashed")),
        "errors": [r for r in results if "error" in r],
    }
    Path(a.out).write_text(json.dumps(out))


def start_readers(reg, ctx, hosts, run_name, hash_sample):
    procs = []
    for k, h in enumerate(hosts):
        out = h.dir / f"read-{run_name}.json"
        out.unlink(missing_ok=True)
        cmd = [sys.executable, HERE / "fleet.py", "read", "--mount", h.mnt, "--manifest",
               ctx.manifest_path, "--out", out, "--threads", ctx.args.reader_threads]
        if hash_sample:
            cmd += ["--hash-mod", len(hosts), "--hash-rem", k]
        logp = h.dir / f"read-{run_name}.log"
        procs.append((h, reg.spawn(f"reader-{h.node}", cmd, logp), out, logp))
    return procs


def snapshot(ctx, hosts):
    return {
        "t": time.time(),
        "origin": ctx.origin.proxy_stats(),
        "links": {h.node: link_bytes(h.node) for h in hosts},
        "cpu": machine_cpu(),
    }


# ---------------------------------------------------------------------------------------------
# Runs


class Ctx:
    pass


def measure_run(reg, ctx, name, n, kind, kill=False):
    log(f"run {name}: starting {n} {kind} host(s)")
    hosts = start_hosts(reg, ctx, n, kind)
    result = {"name": name, "hosts": n, "kind": kind}
    try:
        if kind == "cluster" and not kill:
            result["idle"] = measure_idle(ctx, hosts, ctx.args.idle_seconds)
        before = snapshot(ctx, hosts)
        readers = start_readers(reg, ctx, hosts, name, hash_sample=kill)
        victim = hosts[-1] if kill else None
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
    deadline = time.time() + 3 * n * ctx.manifest["total"] * 8 / ctx.rate_bits + 300
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
                         errors=r["errors"][:5], error_count=len(r["errors"]))
        if h is victim:
            entry.update(vmhwm_kib=h.vmhwm, cpu_seconds=h.cpu)
        else:
            entry.update(vmhwm_kib=proc_status_kib(h.proc.pid, "VmHWM"),
                         cpu_seconds=proc_cpu_seconds(h.proc.pid))
        per_host.append(entry)
    finished = [e for e in per_host if not e["victim"]]
    busy0, total0 = before["cpu"]
    busy1, total1 = after["cpu"]
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


RUNS = ["single", "cluster", "independent", "rclone", "kill"]


def parse_args(argv):
    p = argparse.ArgumentParser(prog="scripts/fleet", description=__doc__.split("\n\n")[0])
    p.add_argument("--orcafs", required=True)
    p.add_argument("--workdir", required=True)
    p.add_argument("--out", default="docs/fleet.md")
    p.add_argument("--hosts", type=int, default=8)
    p.add_argument("--rate", default="200mbit", help="origin link rate (tc units)")
    p.add_argument("--latency-ms", type=int, default=20, help="first-byte latency of the origin")
    p.add_argument("--large-count", type=int, default=3)
    p.add_argument("--large-size", type=parse_size, default=parse_size("192MiB"))
    p.add_argument("--small-count", type=int, default=1000)
    p.add_argument("--small-min", type=parse_size, default=parse_size("64KiB"))
    p.add_argument("--small-max", type=parse_size, default=parse_size("832KiB"))
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
    ctx.rate_bits = parse_rate_bits(args.rate)
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
        "single": (1, "alone"),
        "cluster": (args.hosts, "cluster"),
        "independent": (args.hosts, "independent"),
        "rclone": (args.hosts, "rclone"),
        "kill": (args.hosts, "cluster"),
    }
    for name in args.runs:
        n, kind = plan[name]
        results["runs"][name] = measure_run(reg, ctx, name, n, kind, kill=(name == "kill"))
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
    if argv and argv[0] == "read":
        return read_main(argv[1:])
    if argv and argv[0] == "cleanup":
        p = argparse.ArgumentParser(prog="fleet.py cleanup")
        p.add_argument("--workdir", required=True)
        return cleanup(Path(p.parse_args(argv[1:]).workdir))
    if argv and argv[0] == "run":
        argv = argv[1:]
    args = parse_args(argv)
    # Ctrl-C and SIGTERM unwind through the `finally` that cleans up.
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
