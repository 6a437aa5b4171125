"""Run fastfc's benchmarks and print each figure as a ratio against its
baseline, measured in the same run.

Usage::

    .venv/bin/python benches/run.py [--quick] [--case NAME ...] [--json PATH]

Each case times fastfc and its baseline(s) interleaved, round by round, and
reports medians (see ``benches/cases.py`` for the cases and the ratio
convention). ``--quick`` runs fewer rounds; sizes stay the same, because the
figures depend on them (caches, glibc's non-temporal copy threshold).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benches.cases import CASES, Result, measure, metadata_rows  # noqa: E402
from benches.report import machine, per_op  # noqa: E402


def _per_op(r: Result, s: float) -> str:
    return per_op(s, r.ops, r.nbytes)


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = "  ".join("-" * w for w in widths)
    out = ["  ".join(h.ljust(w) for h, w in zip(header, widths)), line]
    out += ["  ".join(str(x).ljust(w) for x, w in zip(row, widths)) for row in rows]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer rounds")
    ap.add_argument("--case", action="append", default=[],
                    help="run only cases whose name contains this (repeatable)")
    ap.add_argument("--rounds", type=int, help="override every case's number of rounds")
    ap.add_argument("--json", type=Path, help="also write the results (with every sample) here")
    ap.add_argument("--list", action="store_true", help="list the cases and exit")
    ap.add_argument("--strict", action="store_true", help="exit 1 if a target is not met")
    args = ap.parse_args(argv)

    cases = [c for c in CASES if not args.case or any(s in c.name for s in args.case)]
    if args.list:
        for c in CASES:
            print(f"{c.name:24} {c.target_text:6} {c.figure}  [vs {c.baseline_desc}]")
        return 0
    print(machine())
    print("ratio: speed figures (>=) = baseline time / fastfc time; "
          "cost figures (<=) = fastfc time / baseline time; medians of interleaved rounds\n")

    results: list[Result] = []
    for c in cases:
        t0 = time.perf_counter()
        print(f"  {c.name} ...", end="", flush=True, file=sys.stderr)
        r = measure(c, quick=args.quick, rounds=args.rounds)
        rr = sorted(r.round_ratios())
        print(f" {r.ratio:.3f} (rounds {rr[0]:.2f}..{rr[-1]:.2f}, "
              f"{time.perf_counter() - t0:.1f} s)", file=sys.stderr)
        results.append(r)

    rows = []
    for r in results:
        rows.append([r.case.name, _per_op(r, r.fastfc_s), _per_op(r, r.baseline_s),
                     r.baseline_name, f"{r.ratio:.3f}", r.case.target_text,
                     "met" if r.met else "NOT MET"])
    print(_table(rows, ["figure", "fastfc", "baseline", "baseline is", "ratio",
                        "target", "met?"]))
    for r in results:
        others = {k: v for k, v in r.samples.items() if k not in ("fastfc", r.baseline_name)}
        if others:
            print(f"  {r.case.name}: other baselines: " + ", ".join(
                f"{k} {_per_op(r, r.median(k))}" for k in others))
        if r.info:
            print(f"  {r.case.name}: " + ", ".join(f"{k}={v}" for k, v in r.info.items()))
    met = sum(r.met for r in results)
    print(f"\n{met} of {len(results)} targets met")

    meta = []
    if not args.case or any("meta" in s for s in args.case):
        meta = metadata_rows()
        print("\nFlashCopy.metadata_bytes (allowance: 3 bits/track/relationship, "
              "+3 for the revert image while revertible)")
        print(_table([[m["tracks"], m["relationship"], m["metadata_bytes"],
                       f"{m['bits_per_track']:.2f}", m["allowance_bytes"],
                       "ok" if m["ok"] else "OVER"] for m in meta],
                     ["tracks", "relationship", "bytes", "bits/track", "allowance", "ok?"]))

    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "machine": machine(), "quick": args.quick,
            "results": [r.as_dict() for r in results], "metadata": meta,
        }, indent=1))
    return 1 if args.strict and met < len(results) else 0


if __name__ == "__main__":
    sys.exit(main())
