"""reader: reads every file of a dataset manifest from one mount, as one host's workload.

`python3 reader.py --mount M --manifest F --out R.json [--threads N] [--hash-mod K --hash-rem J]`
reads the files in manifest order, N at a time, with 1 MiB reads; checks each file's length, and
hashes (SHA-256, against the manifest) the files i with i mod K = J. Writes what it saw to R.json:
start and end (wall clock), bytes, files, how many were hashed, and each error.
"""

import argparse
import hashlib
import json
import os
import resource
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

READ_BUF = 1 << 20


def cpu_seconds():
    u = resource.getrusage(resource.RUSAGE_SELF)
    return u.ru_utime + u.ru_stime


def read_main(argv):
    """The per-host reader: every file of the manifest, `threads` at a time, in manifest order.
    Checks each file's size; hashes the files whose index % hash_mod == hash_rem."""
    p = argparse.ArgumentParser(prog="reader.py")
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
        "cpu_seconds": cpu_seconds(),
    }
    Path(a.out).write_text(json.dumps(out))


if __name__ == "__main__":
    read_main(sys.argv[1:])
