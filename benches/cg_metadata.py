"""What a consistency group costs a storage unit in metadata: SQL statements
per CG and CGs/s, a session's FlashCopy steps recorded per relationship
(``save_flash`` each) or per group and step (``save_flashes``: one row of
the unit's FlashCopy log), against the same session in memory.

Usage (in a checkout)::

    .venv/bin/python -m benches.cg_metadata [--triplets 16 256] [--rounds 3]

Each (mode, triplets) runs in a fresh child process, modes interleaved
round by round; figures are medians (and minima) of the rounds, reported as
ratios against a baseline measured in the same run. CGs are formed back to
back (``form_consistency_group`` in a loop), four 4 KiB host writes to
A volumes before each, at durability "process"; the primary unit holds A,
the secondary B and C. Statements are counted on both units' connections
(``sqlite3`` trace callback).

Modes: ``memory`` (volumes of no unit), ``shm-single`` and ``shm-batched``
(units in /dev/shm), ``disk-single`` and ``disk-batched`` (units under
``--disk``); with ``--baseline-tree DIR`` also ``shm-baseline`` and
``disk-baseline``: "single" on the fastfc of another checkout (its built
extension in place), e.g. the commit before the FlashCopy log. "batched" routes each group's steps through ``save_flashes``
with the test shim ``tests/batched_saves.py`` while the CG path itself does
not (it is a no-op once it does).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODES = ("memory", "shm-single", "shm-batched", "disk-single", "disk-batched")
# with --baseline-tree: the per-relationship modes run on another checkout
BASELINE_MODES = ("shm-baseline", "disk-baseline")


def child(mode: str, n: int, cgs: int, disk: str) -> dict:
    import numpy as np

    from fastfc import GlobalMirror, StorageUnit, Volume
    if mode.endswith("batched"):
        sys.path.insert(0, str(ROOT / "tests"))
        import batched_saves
        batched_saves.install()
    n_tracks = 4096 if n <= 32 else 256          # 16 MiB or 1 MiB of 4 KiB tracks
    units: tuple = ()
    root = None
    if mode == "memory":
        trips = [tuple(Volume(n_tracks, 4096) for _ in range(3)) for _ in range(n)]
    else:
        root = Path(tempfile.mkdtemp(prefix="fastfc-cgmeta-",
                                     dir="/dev/shm" if mode.startswith("shm") else disk))
        prim, sec = StorageUnit(root / "p"), StorageUnit(root / "s")
        units = (prim, sec)
        trips = [(prim.create_volume(f"A{i}", n_tracks, 4096),
                  sec.create_volume(f"B{i}", n_tracks, 4096),
                  sec.create_volume(f"C{i}", n_tracks, 4096)) for i in range(n)]
    try:
        gm = GlobalMirror(trips, cg_interval=0.0, initial_copy=False,
                          max_coordination_time=1.0)
        for _ in range(3):
            gm.form_consistency_group()
        stmts = [0]

        def count(_sql: str) -> None:
            stmts[0] += 1
        for u in units:
            u.store.db.set_trace_callback(count)
        rng = np.random.default_rng(1)
        data = np.full(4096, 7, np.uint8)
        As = [t[0] for t in trips]
        offsets = (rng.integers(0, n_tracks, (cgs, 4)) * 4096).tolist()
        which = rng.integers(0, n, (cgs, 4)).tolist()
        t = time.perf_counter()
        for k in range(cgs):
            for a, off in zip(which[k], offsets[k]):
                As[a].write(off, data)
            res = gm.form_consistency_group()
            assert res.committed, res
        elapsed = time.perf_counter() - t
        for u in units:
            u.store.db.set_trace_callback(None)
        gm.close(discard=True)
        return {"cgs_per_s": cgs / elapsed, "stmts_per_cg": stmts[0] / cgs}
    finally:
        for u in units:
            u.close()
        if root is not None:
            shutil.rmtree(root, ignore_errors=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--triplets", type=int, nargs="+", default=[16, 256])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    ap.add_argument("--seconds", type=float, default=3.0, help="per run, about")
    ap.add_argument("--disk", default="/var/tmp",
                    help="a directory on the disk for the disk modes")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--baseline-tree", type=Path,
                    help="a checkout whose fastfc the *-baseline modes import")
    ap.add_argument("--child", nargs=4, metavar=("MODE", "N", "CGS", "DISK"),
                    help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        mode, n, cgs, disk = args.child
        print(json.dumps(child(mode, int(n), int(cgs), disk)))
        return 0
    Path(args.disk).mkdir(parents=True, exist_ok=True)
    if args.baseline_tree is not None:
        args.modes = list(args.modes) + [m for m in BASELINE_MODES if m not in args.modes]
    results: dict = {}
    for rnd in range(args.rounds):
        for n in args.triplets:
            modes = args.modes if rnd % 2 == 0 else args.modes[::-1]
            for mode in modes:
                # CG counts sized for about --seconds (memory forms CGs fastest)
                per_s = {"memory": 2000, "shm": 400, "disk": 150}[mode.split("-")[0]]
                cgs = max(20, int(args.seconds * per_s * 16 / max(n, 16)))
                env = None
                run_mode = mode
                if mode.endswith("baseline"):
                    env = dict(os.environ, PYTHONPATH=str(args.baseline_tree))
                    run_mode = mode.replace("baseline", "single")
                out = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child",
                                      run_mode, str(n), str(cgs), args.disk], cwd=ROOT, env=env,
                                     capture_output=True, text=True, timeout=1800)
                if out.returncode:
                    raise SystemExit(f"{mode} n={n} failed:\n{out.stderr}")
                r = json.loads(out.stdout.strip().splitlines()[-1])
                results.setdefault((mode, n), []).append(r)
                print(f"round {rnd} n={n:4d} {mode:13s} {r['cgs_per_s']:9.1f} CG/s "
                      f"{r['stmts_per_cg']:7.1f} statements/CG", flush=True)

    def med(mode, n, key, f=statistics.median):
        return f(r[key] for r in results[(mode, n)])
    print()
    for n in args.triplets:
        have = {m for m, k in results if k == n}
        print(f"{n} triplets: CG/s median (min) and statements per CG")
        for m in args.modes:
            print(f"  {m:13s} {med(m, n, 'cgs_per_s'):9.1f} ({med(m, n, 'cgs_per_s', min):9.1f})"
                  f"  {med(m, n, 'stmts_per_cg'):7.1f}")
        ratios = [("shm-batched", "memory"), ("shm-single", "memory"),
                  ("shm-baseline", "memory"), ("disk-baseline", "shm-baseline"),
                  ("shm-batched", "shm-baseline"), ("disk-batched", "disk-baseline"),
                  ("shm-batched", "shm-single"), ("disk-batched", "shm-batched"),
                  ("disk-single", "shm-single"), ("disk-batched", "disk-single")]
        for a, b in ratios:
            if a in have and b in have:
                print(f"  CG/s {a} / {b}: {med(a, n, 'cgs_per_s') / med(b, n, 'cgs_per_s'):.3f}"
                      f" (per-round min {min(x['cgs_per_s'] / y['cgs_per_s'] for x, y in zip(results[(a, n)], results[(b, n)])):.3f})")
        for base in ("shm-single", "shm-baseline"):
            if base in have and "shm-batched" in have:
                print(f"  statements/CG shm-batched / {base}: "
                      f"{med('shm-batched', n, 'stmts_per_cg') / med(base, n, 'stmts_per_cg'):.3f}")
    if args.json:
        args.json.write_text(json.dumps({f"{m}/{n}": v for (m, n), v in results.items()},
                                        indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
