"""Compare two builds of fastfc on the same machine, interleaved.

Each build is a source tree with its extension built in place (for example
this checkout and a copy built with ``FASTFC_NATIVE=1``). Worker processes
alternate between the trees (A B B A ...), each timing the same cases from
``benches/cases.py`` plus a PPRC drain; the report gives, per case, the
median time of each build and their ratio, and each build's ratio to the
same-run baseline (np.copyto for the 1 GiB copy).

Usage::

    python scripts/bench_builds.py NATIVE_TREE DISPATCHED_TREE [--alternations 4]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

CASES = ["bg_copy_caller", "count_2p20", "count_2p27", "find_next_set_2p20",
         "find_next_set_2p27", "write_4k_cow"]


def worker(rounds: int) -> None:
    """In a tree: time every case, print one JSON line."""
    import time

    import numpy as np

    from benches import cases
    from fastfc import PPRCPair, Volume, _core

    cases._numba = lambda: None           # no numba baselines: JIT time, noise
    out: dict = {"kernels": getattr(_core, "kernels", lambda: "native build")()}
    for name in CASES:
        r = cases.measure(cases.get_case(name), rounds=rounds)
        out[name] = {"fastfc": r.median("fastfc") / r.ops,
                     "baseline": r.baseline_s / r.ops, "baseline_name": r.baseline_name}
    # PPRC: drain 256 MiB of out-of-sync 64 KiB tracks to the secondary
    n, track = 4096, 65536
    P, S = Volume(n, track, name="P"), Volume(n, track, name="S")
    data = np.random.default_rng(3).integers(0, 256, n * track, dtype=np.uint8)
    S.array[:] = 1
    pair = PPRCPair(P, S, background=False)
    pair.drain()
    times = []
    for _ in range(rounds):
        pair.suspend()
        data[::4096] ^= 0xFF
        P.write(0, data)
        pair.resume()
        t0 = time.perf_counter()
        sent = pair.drain()
        times.append(time.perf_counter() - t0)
        assert sent == n * track and np.array_equal(S.array, P.array)
    out["pprc_drain_256m"] = {"fastfc": statistics.median(times), "baseline": None,
                              "baseline_name": None}
    print(json.dumps(out))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("a", help="tree A (e.g. the -march=native build)")
    ap.add_argument("b", help="tree B (e.g. the runtime-dispatched build)")
    ap.add_argument("--alternations", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.rounds)
        return 0
    runs: dict[str, list[dict]] = {"A": [], "B": []}
    order = []
    for i in range(args.alternations):
        order += ["A", "B"] if i % 2 == 0 else ["B", "A"]
    for label in order:
        tree = os.path.abspath(args.a if label == "A" else args.b)
        env = {**os.environ, "PYTHONPATH": tree}
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), args.a, args.b,
                               "--worker", "--rounds", str(args.rounds)],
                              cwd=tree, env=env, capture_output=True, text=True, check=True)
        runs[label].append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(f"{label} done ({runs[label][-1]['kernels']})", file=sys.stderr, flush=True)
    print(f"A = {args.a}\nB = {args.b}\n{args.alternations} runs each, ABBA order; "
          "medians over runs of each run's median")
    print(f"{'case':22} {'A':>12} {'B':>12} {'B/A time':>9}  {'A vs base':>9} {'B vs base':>9}")
    for name in [*CASES, "pprc_drain_256m"]:
        a = statistics.median(r[name]["fastfc"] for r in runs["A"])
        b = statistics.median(r[name]["fastfc"] for r in runs["B"])
        line = f"{name:22} {a * 1e6:10.1f}us {b * 1e6:10.1f}us {b / a:9.3f}"
        if runs["A"][0][name]["baseline"] is not None:
            ra = statistics.median(r[name]["baseline"] / r[name]["fastfc"] for r in runs["A"])
            rb = statistics.median(r[name]["baseline"] / r[name]["fastfc"] for r in runs["B"])
            line += f"  {ra:9.3f} {rb:9.3f}  ({runs['A'][0][name]['baseline_name']} / fastfc)"
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
