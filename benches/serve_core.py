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


def plain(builds: dict[str, dict], reps: int, seconds: float, size_mib: int = 256,
          jobs: int = 4) -> dict[str, dict[str, list[float]]]:
    """Plain serving, no session: fio 4 KiB randwrite and randread QD16, one
    job (connection) per volume of ``jobs``, against ``fastfc serve`` of each
    build in turn; kIOPS per build and workload, one a repetition."""
    import signal
    import subprocess
    import tempfile
    import time
    from pathlib import Path
    got: dict[str, dict[str, list[float]]] = {b: {"randwrite": [], "randread": []}
                                              for b in builds}
    names = [f"V{i}" for i in range(jobs)]
    for rep in range(reps):
        for b in (list(builds) if rep % 2 == 0 else list(builds)[::-1]):
            cfg = builds[b]
            with tempfile.TemporaryDirectory(dir="/dev/shm") as d:
                unit, sock = Path(d) / "u", Path(d) / "nbd.sock"
                sv.cli("-u", unit, "mkvol", *names, "--size", f"{size_mib}M")
                env = sv._env()
                if cfg.get("server_path"):
                    env["PYTHONPATH"] = cfg["server_path"] + os.pathsep + env["PYTHONPATH"]
                server = subprocess.Popen(
                    [sys.executable, *cfg.get("server", sv.FULL_CLIENT), "-u", str(unit),
                     "serve", "--socket", str(sock)], env=env, start_new_session=True,
                    stderr=subprocess.DEVNULL, cwd=cfg.get("server_path"))
                try:
                    sv.wait_socket(str(sock), server)
                    time.sleep(0.5)
                    args = []
                    for n in names:
                        args += [f"--name={n}", f"--uri=nbd+unix:///{n}?socket={sock}"]
                    sv.fio_json(["--ioengine=nbd", "--rw=write", "--bs=1m", "--iodepth=4",
                                 f"--size={size_mib}M", *args])
                    for rw in ("randwrite", "randread"):
                        doc = sv.fio_json(["--ioengine=nbd", f"--rw={rw}", "--bs=4k",
                                           "--iodepth=16", f"--size={size_mib}M",
                                           "--time_based", f"--runtime={seconds}",
                                           "--group_reporting", *args])
                        side = doc["jobs"][0]["write" if rw == "randwrite" else "read"]
                        got[b][rw].append(side["iops"] / 1e3)
                finally:
                    os.killpg(server.pid, signal.SIGTERM)
                    server.wait(timeout=60)
            print(f"  plain {b}: " + ", ".join(f"{k} {v[-1]:.1f} k" for k, v in got[b].items()),
                  file=sys.stderr, flush=True)
    return got


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
    ap.add_argument("--plain", action="store_true",
                    help="plain serving (no session) instead: randwrite / randread kIOPS")
    args = ap.parse_args(argv)
    builds = {"core": dict(), "python": dict(server=PYTHON_LOOP),
              "main": dict(server_path=os.path.abspath(args.old)) if args.old else None}
    order = [b for b in args.builds.split(",") if builds.get(b) is not None]
    if args.plain:
        res = plain({b: builds[b] for b in order}, args.reps, args.seconds)
        base = "main" if "main" in order else order[0]
        for b in order:
            for rw, xs in res[b].items():
                rs = [x / y for x, y in zip(xs, res[base][rw])]
                print(f"{b:7s} {rw:9s} kIOPS min {min(xs):6.1f} median "
                      f"{statistics.median(xs):6.1f}; / {base} per rep "
                      f"{', '.join(f'{r:.2f}' for r in rs)} (median "
                      f"{statistics.median(rs):.2f})")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(res, f, indent=1)
        return
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
