"""Long stress run of the promise, outside CI.

Writer threads hammer the A volumes while a Global Mirror session forms CGs
with a fault armed before each attempt (every kind in turn, at random
volumes); after every attempt every C volume must equal the A images at the
newest committed coordination instant, all with one sequence number.

Usage::

    .venv/bin/python scripts/stress_promise.py [--attempts 5000] [--triplets 12]
        [--tracks 64] [--track-size 4096] [--decide after_all|after_each] [--seed 0]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

import fastfc  # noqa: E402
from fastfc.copyservices.globalmirror import GlobalMirror  # noqa: E402
from fastfc.tools.testing import FaultPlan, PromiseChecker, RandomWriters  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Stress the Global Mirror promise.")
    ap.add_argument("--attempts", type=int, default=5000)
    ap.add_argument("--triplets", type=int, default=12)
    ap.add_argument("--tracks", type=int, default=64)
    ap.add_argument("--track-size", type=int, default=4096)
    ap.add_argument("--decide", choices=["after_all", "after_each"], default="after_all")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    def vols(tag):
        return [fastfc.Volume(args.tracks, args.track_size, name=f"{tag}{i}")
                for i in range(args.triplets)]

    checker = PromiseChecker()
    gm = GlobalMirror(list(zip(vols("A"), vols("B"), vols("C"))), decide=args.decide,
                      on_coordinate=checker.on_coordinate, max_drain_time=0.25)
    checker.attach(gm)
    plan = FaultPlan(gm, np.random.default_rng(args.seed), stall=0.3, cycle=True)
    t0 = time.perf_counter()
    with RandomWriters([t.a for t in gm.triplets], threads=2, seed=args.seed) as w:
        for i in range(1, args.attempts + 1):
            plan.arm()
            gm.form_consistency_group()
            plan.disarm()
            checker.check()
            if i % 500 == 0:
                print(f"{i} attempts, {gm.stats.successes} committed, "
                      f"failures {dict(gm.stats.failures)}, {w.writes} host writes, "
                      f"{time.perf_counter() - t0:.0f} s", flush=True)
    print(f"promise held after every one of {args.attempts} attempts "
          f"({checker.checks} checks, {gm.stats.successes} CGs committed)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
