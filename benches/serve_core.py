"""The NBD server's small requests in the core (``_core.nbd_batch``) against
the Python loop, in one run: ``serve_gm``'s session-running and
session-paused windows (:func:`benches.serve.gm_under_fio`) for each server
build, the builds taking turns round after round (the machine is shared).

    python -m benches.serve_core [--old PATH] [--reps N] [--seconds S] [--track 64K]

Builds: ``core`` (this tree), ``python`` (this tree with
``NBDServer.core_batches = False``), and ``main`` when ``--old`` names
another tree with its extension built in place (``python setup.py
build_ext --inplace`` there). Prints, per build, the min / median over the
repetitions of: client IOPS with the session and paused and their ratio,
RPO p50 / p99, the server's answer to ``showgmir --json`` p50 / p99 under
the session and fio, CG/s and server CPU; then each build against the
``main`` (or ``python``) build of the same repetition, as ratios. The raw
figures go to ``--json`` if given.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

from benches import serve as sv

PYTHON_LOOP = ("-c", "from fastfc.tools import nbd; nbd.NBDServer.core_batches = False; "
                     "from fastfc.tools.cli import main; main(prog_name='fastfc')")

FIGURES = ("iops_with", "iops_without", "ratio", "rpo_p50_ms", "rpo_p99_ms",
           "answer_with_p50_ms", "answer_with_p99_ms", "cgs_per_s", "server_cores_with",
           "server_cores_without")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--old", help="a tree of the baseline (its _core built in place)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--size-mib", type=int, default=64)
    ap.add_argument("--triplets", type=int, default=16)
    ap.add_argument("--track", default="64K")
    ap.add_argument("--builds", default="main,python,core")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    builds = {"core": dict(), "python": dict(server=PYTHON_LOOP),
              "main": dict(server_path=os.path.abspath(args.old)) if args.old else None}
    order = [b for b in args.builds.split(",") if builds.get(b) is not None]
    got: dict[str, list[dict]] = {b: [] for b in order}
    for rep in range(args.reps):
        for b in (order if rep % 2 == 0 else order[::-1]):
            print(f"rep {rep + 1}/{args.reps}: {b}", file=sys.stderr, flush=True)
            g = sv.gm_under_fio(triplets=args.triplets, size_mib=args.size_mib,
                                seconds=args.seconds, rounds=args.rounds, idle_reps=0,
                                track_size=args.track, modes=("with", "without"),
                                **builds[b])
            g.pop("raw", None)
            got[b].append(g)
            print(f"  {b}: " + ", ".join(f"{k} {g[k]:.3g}" for k in FIGURES), file=sys.stderr,
                  flush=True)
    print(f"{args.triplets} triplets x {args.size_mib} MiB, {args.track} tracks, fio 4 KiB "
          f"randwrite QD16 x {args.triplets}; {args.reps} reps x {args.rounds} rounds of "
          f"{args.seconds} s per window; load average "
          f"{min(g['load_average']['min'] for v in got.values() for g in v):.1f}.."
          f"{max(g['load_average']['max'] for v in got.values() for g in v):.1f}")
    for b in order:
        print(f"{b}:")
        for k in FIGURES:
            xs = [g[k] for g in got[b]]
            print(f"  {k:22s} min {min(xs):9.3f}  median {statistics.median(xs):9.3f}  "
                  f"({', '.join(f'{x:.3g}' for x in xs)})")
    base = "main" if "main" in order else order[0]
    for b in order:
        if b == base:
            continue
        print(f"{b} / {base}, per rep (min, median):")
        for k in FIGURES:
            rs = [x[k] / y[k] for x, y in zip(got[b], got[base]) if y[k]]
            if rs:
                print(f"  {k:22s} {min(rs):6.3f} {statistics.median(rs):6.3f}  "
                      f"({', '.join(f'{r:.3f}' for r in rs)})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(got, f, indent=1)


if __name__ == "__main__":
    main()
