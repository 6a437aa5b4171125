"""``fastfc serve`` against nbdkit's memory plugin and qemu-nbd (issue 11).

One 1 GiB export each, over a unix socket, everything in memory (tmpfs):
fastfc serves a unit in /dev/shm, qemu-nbd a raw file in /dev/shm, nbdkit
its ``memory`` plugin. The workloads of the issue's table run interleaved
(round r runs every server once per workload, in a rotating order) and
each server's figure is the median of its rounds; a ratio (fastfc over a
peer) is the median over rounds of that round's ratio, since the load of a
shared machine drifts between rounds more than within one.

    python benches/serve.py [--rounds 3] [--seconds 3] [--size-mib 1024]

Needs fio (nbd engine), nbdcopy (libnbd-bin), nbdkit and qemu-nbd
(qemu-utils): ``apt-get install fio libnbd-bin nbdkit qemu-utils``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORKLOADS = {
    "nbdcopy in (GB/s)": None,
    "4K randwrite QD16 (kIOPS)": dict(rw="randwrite", bs="4k", iodepth=16),
    "4K randread QD16 (kIOPS)": dict(rw="randread", bs="4k", iodepth=16),
    "1M seq write QD8 (GB/s)": dict(rw="write", bs="1m", iodepth=8),
}
TOOLS = ["fio", "nbdcopy", "nbdkit", "qemu-nbd"]


def wait_socket(path: str, proc: subprocess.Popen, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{proc.args}: no socket {path} after {timeout}s")
        time.sleep(0.05)


def start_servers(tmp: Path, size: int) -> dict[str, tuple[subprocess.Popen, str]]:
    py = sys.executable
    env = dict(os.environ)
    root = Path(__file__).resolve().parent.parent
    env["PYTHONPATH"] = str(root) + os.pathsep + env.get("PYTHONPATH", "")
    unit = tmp / "unit"
    subprocess.run([py, "-m", "fastfc", "-u", str(unit), "mkvol", "V", "--size", str(size)],
                   check=True, env=env, capture_output=True)
    raw = tmp / "qemu.raw"
    with open(raw, "wb") as f:
        f.truncate(size)
    servers = {}
    s = str(tmp / "fastfc.sock")
    p = subprocess.Popen([py, "-m", "fastfc", "-u", str(unit), "serve", "--socket", s],
                         env=env, start_new_session=True, stderr=subprocess.DEVNULL)
    servers["fastfc"] = (p, f"nbd+unix:///V?socket={s}")
    s = str(tmp / "nbdkit.sock")
    p = subprocess.Popen(["nbdkit", "-f", "-U", s, "memory", str(size)],
                         start_new_session=True, stderr=subprocess.DEVNULL)
    servers["nbdkit memory"] = (p, f"nbd+unix:///?socket={s}")
    s = str(tmp / "qemu.sock")
    p = subprocess.Popen(["qemu-nbd", "-f", "raw", "-k", s, "-x", "V", "-t", "-e", "16",
                          str(raw)], start_new_session=True, stderr=subprocess.DEVNULL)
    servers["qemu-nbd"] = (p, f"nbd+unix:///V?socket={s}")
    for name, (p, uri) in servers.items():
        wait_socket(uri.split("socket=")[1], p)
    return servers


def fio(uri: str, size: int, seconds: float, rw: str, bs: str, iodepth: int) -> float:
    out = subprocess.run(
        ["fio", "--name=w", "--ioengine=nbd", f"--uri={uri}", f"--rw={rw}", f"--bs={bs}",
         f"--iodepth={iodepth}", f"--size={size}", "--time_based", f"--runtime={seconds}",
         "--ramp_time=0.5", "--output-format=json"],
        check=True, capture_output=True, text=True)
    job = json.loads(out.stdout[out.stdout.index("{"):])["jobs"][0]
    side = job["write" if "write" in rw else "read"]
    if bs == "4k":
        return side["iops"] / 1e3
    return side["bw_bytes"] / 1e9


def nbdcopy(src: Path, uri: str, size: int) -> float:
    t = time.perf_counter()
    subprocess.run(["nbdcopy", str(src), uri], check=True, capture_output=True)
    return size / (time.perf_counter() - t) / 1e9


def run(rounds: int, seconds: float, size: int) -> dict:
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        raise SystemExit(f"missing {missing}: apt-get install fio libnbd-bin nbdkit qemu-utils")
    with tempfile.TemporaryDirectory(dir="/dev/shm") as d:
        tmp = Path(d)
        src = tmp / "src.raw"
        with open(src, "wb") as f:
            block = os.urandom(1 << 20)
            for _ in range(size >> 20):
                f.write(block)
        servers = start_servers(tmp, size)
        names = list(servers)
        results: dict[str, dict[str, list[float]]] = {w: {n: [] for n in names}
                                                       for w in WORKLOADS}
        try:
            for r in range(rounds):
                order = names[r % len(names):] + names[:r % len(names)]
                for w, params in WORKLOADS.items():
                    for n in order:
                        uri = servers[n][1]
                        v = nbdcopy(src, uri, size) if params is None else \
                            fio(uri, size, seconds, **params)
                        results[w][n].append(v)
        finally:
            for p, _ in servers.values():
                os.killpg(p.pid, signal.SIGTERM)
                p.wait(timeout=30)
    table = {w: {n: statistics.median(v) for n, v in by.items()} for w, by in results.items()}
    # the machine's load drifts: a ratio is taken within each round (the
    # servers ran back to back), then the median over rounds
    ratios = {w: {peer: statistics.median(f / p for f, p in zip(by["fastfc"], by[peer]))
                  for peer in names if peer != "fastfc"} for w, by in results.items()}
    return {"medians": table, "ratios": ratios, "raw": results}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--only", action="append", choices=list(WORKLOADS), default=None)
    args = ap.parse_args()
    if args.only:
        for w in list(WORKLOADS):
            if w not in args.only:
                del WORKLOADS[w]
    out = run(args.rounds, args.seconds, args.size_mib << 20)
    print(f"{'workload':28} {'fastfc':>9} {'nbdkit':>9} {'qemu-nbd':>9} "
          f"{'/nbdkit':>8} {'/qemu':>8}")
    for w, m in out["medians"].items():
        f, k, q = m["fastfc"], m["nbdkit memory"], m["qemu-nbd"]
        r = out["ratios"][w]
        print(f"{w:28} {f:9.2f} {k:9.2f} {q:9.2f} {r['nbdkit memory']:8.2f} "
              f"{r['qemu-nbd']:8.2f}")
    print("(values: medians over rounds; ratios: medians of the per-round ratios)")
    print(json.dumps(out["raw"]))


if __name__ == "__main__":
    main()
