"""origin: Garage in the origin namespace, the delaying proxy in front of it, and the dataset."""

import hashlib
import json
import os
import random
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from common import (BUCKET, GARAGE_RPC, GARAGE_S3, HERE, MIB, ORIGIN_ADDR, PROXY_PORT, REGION,
                    FleetError, in_ns, run, tail, write_private)

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
