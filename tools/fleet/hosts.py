"""hosts: one orcafs or rclone mount per host namespace; start, wait until live, stop."""

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

from common import (BUCKET, CLUSTER_PORT, ORIGIN_ADDR, PROXY_PORT, REGION, FleetError,
                    host_addr, in_ns, mounted_paths, run, tail, write_private)

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
