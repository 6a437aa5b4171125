"""Same-run A/B of small host writes across builds.

Times ``Volume.write`` of --size bytes at random aligned offsets on a memory
volume, a volume of a tmpfs unit (/dev/shm) and one of a disk unit, per
build, in alternating order across repetitions; prints the median ns per
write and new/old ratios.

Usage: python scripts/smallwrite_ab.py old=/tree/a new=/tree/b [--reps 7]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

CHILD = r"""
import json, shutil, sys, time
from pathlib import Path
import numpy as np
from fastfc import StorageUnit, Volume
size, n, locs = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3].split(",")
out = {}
for loc in locs:
    root = None
    if loc == "memory":
        v = Volume(4096, 4096)
    else:
        root = Path("/dev/shm/smallwrite-ab" if loc == "tmpfs" else "/work/smallwrite-ab")
        shutil.rmtree(root, ignore_errors=True)
        u = StorageUnit(root)
        v = u.create_volume("v", 4096, 4096)
    v.write(0, np.ones(v.capacity, np.uint8))
    offs = (np.random.default_rng(1).integers(0, v.capacity // size, n) * size).tolist()
    data = np.full(size, 7, np.uint8)
    w = v.write
    for o in offs[:2000]:
        w(o, data)
    t = time.perf_counter_ns()
    for o in offs:
        w(o, data)
    out[loc] = (time.perf_counter_ns() - t) / n
    if root is not None:
        u.close()
        shutil.rmtree(root, ignore_errors=True)
print(json.dumps(out))
"""


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("builds", nargs="+", help="name=tree")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--n", type=int, default=200000)
    ap.add_argument("--locs", default="memory,tmpfs,disk")
    a = ap.parse_args(argv)
    builds = [b.split("=", 1) for b in a.builds]
    res = {name: [] for name, _ in builds}
    for rep in range(a.reps):
        for name, tree in (builds if rep % 2 == 0 else builds[::-1]):
            env = dict(os.environ, PYTHONPATH=tree, PYTHONDONTWRITEBYTECODE="1")
            p = subprocess.run([sys.executable, "-c", CHILD, str(a.size), str(a.n), a.locs],
                               env=env, check=True, capture_output=True, text=True, cwd="/")
            res[name].append(json.loads(p.stdout))
    first = builds[0][0]
    print(f"{'loc':8s} " + " ".join(f"{n:>12s}" for n, _ in builds) + "   ratio/" + first)
    for loc in a.locs.split(","):
        med = {n: statistics.median(r[loc] for r in res[n]) for n, _ in builds}
        print(f"{loc:8s} " + " ".join(f"{med[n]:10.0f}ns" for n, _ in builds) + "   "
              + " ".join(f"{med[n] / med[first]:.3f}" for n, _ in builds[1:]))


if __name__ == "__main__":
    main()
