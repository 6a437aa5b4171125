"""Compare builds with scripts/durable_datapath_measure.py, interleaved.

Each repetition runs durable_datapath_measure.py once per build (alternating which goes
first), each run measuring disk and tmpfs back to back; medians per build
and variant, and the disk/tmpfs ratio, are printed at the end.

Usage: python scripts/durable_datapath_ab.py --build before=/path/to/tree:base \
           --build after=/work/wt-datapath:base,pwA [--reps 3] [--seconds 8]
Each tree must hold a built fastfc and scripts/durable_datapath_measure.py.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

KEYS = ("cgs_per_s", "rpo_p99_ms", "write_rate_ratio", "drain_p50_ms", "flash_p50_ms",
        "minflt_per_cg", "nvcsw_per_cg")


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--build", action="append", required=True, help="name=tree:variants")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--out", default="bench-results/durable-datapath-ab")
    ap.add_argument("--extra", default="", help="more durable_datapath_measure.py arguments")
    a = ap.parse_args(argv)
    builds = []
    for b in a.build:
        name, rest = b.split("=", 1)
        tree, variants = rest.rsplit(":", 1)
        builds.append((name, Path(tree), variants))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for rep in range(a.reps):
        order = builds if rep % 2 == 0 else builds[::-1]
        for name, tree, variants in order:
            js = out / f"{name}-{rep}.json"
            cmd = [sys.executable, str(tree / "scripts/durable_datapath_measure.py"), "--reps", "1",
                   "--seconds", str(a.seconds), "--variants", variants, "--json", str(js),
                   *a.extra.split()]
            env = dict(os.environ, PYTHONPATH=str(tree), PYTHONDONTWRITEBYTECODE="1")
            print(f"== rep {rep} {name}: {' '.join(cmd)}", flush=True)
            subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
            for r in json.loads(js.read_text()):
                r["build"] = name
                results.append(r)
    (out / "all.json").write_text(json.dumps(results, indent=1))
    print(f"\n{'build/variant':18s} {'figure':18s} {'disk':>10s} {'tmpfs':>10s} {'ratio':>8s}")
    for name, _, variants in builds:
        for var in variants.split(","):
            for key in KEYS:
                med = {}
                for loc in ("disk", "tmpfs"):
                    xs = [r[key] for r in results
                          if r["build"] == name and r["variant"] == var and r["loc"] == loc]
                    med[loc] = statistics.median(xs) if xs else float("nan")
                ratio = med["disk"] / med["tmpfs"] if med["tmpfs"] else float("nan")
                print(f"{name + '/' + var:18s} {key:18s} {med['disk']:10.3f} "
                      f"{med['tmpfs']:10.3f} {ratio:8.3f}")
            print()


if __name__ == "__main__":
    main()
