"""Where a served Global Mirror session's loop thread spends its time, CG
by CG: ``fastfc serve`` started through this module (``-m
benches.serve_trace``, the ``server`` of :func:`benches.serve.gm_under_fio`)
records, for every attempt of the loop thread, the monotonic time at each
phase's start and end (rest, turn, coordination, drain, FlashCopy phase,
release), the thread's CPU time (``time.thread_time``) and its scheduler
figures (``/proc/thread-self/schedstat``: on a CPU, runnable waiting for
one) at the attempt's start and end; and each committed CG's coordination
instant and commit time (for the RPO over time, not only as sampled).
Written as JSON lines to ``$FASTFC_TRACE`` when the server exits.

    python -m benches.serve_trace [--seconds S] [--rounds N] [--track 64K]

runs ``gm_under_fio``'s session-running window through it and prints the
summary (:func:`summary`): per attempt, the loop thread's wall time split
into on a CPU, runnable waiting for one, and the rest (sleeping: the GIL,
locks, the turn, rests), for all attempts and for the slowest 5%.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import statistics
import sys
import tempfile
import threading
import time


_LIBC = None


def _schedstat(local) -> tuple[float, float, int]:
    """This thread's (seconds on a CPU, seconds runnable waiting for one,
    times it was put on a CPU),
    read without giving the GIL up (``ctypes.PyDLL``: a read through
    ``open`` would hand the GIL over, and wait to get it back, each time)."""
    import ctypes
    global _LIBC
    if _LIBC is None:
        _LIBC = ctypes.PyDLL(None)
        _LIBC.pread.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_long)
    fd = getattr(local, "fd", None)
    if fd is None:
        fd = local.fd = os.open("/proc/thread-self/schedstat", os.O_RDONLY)
        local.buf = ctypes.create_string_buffer(128)
    n = _LIBC.pread(fd, local.buf, 127, 0)
    if n <= 0:
        return float("nan"), float("nan"), 0
    run, wait, slices = local.buf.raw[:n].split()
    return int(run) / 1e9, int(wait) / 1e9, int(slices)


def install(path: str) -> None:
    """Wrap the session's attempt and its phases to record them; dump to
    ``path`` at exit."""
    from fastfc.copyservices import globalmirror as gmod
    from fastfc.tools.cli import loops

    records: list[dict] = []
    local = threading.local()
    clock = time.monotonic

    def mark(name: str) -> None:
        cur = getattr(local, "cur", None)
        if cur is not None:
            cur[name] = clock()
            run, wait, _ = _schedstat(local)
            cur[name + "r"], cur[name + "w"] = run, wait

    def phase(cls, attr: str, name: str) -> None:
        orig = getattr(cls, attr)

        def wrapped(*a, **k):
            mark(name + "0")
            try:
                return orig(*a, **k)
            finally:
                mark(name + "1")
        setattr(cls, attr, wrapped)

    orig_form = gmod.GlobalMirror.form_consistency_group

    def form(self):
        cur = local.cur = {"t0": clock(), "cpu0": time.thread_time()}
        turn = self.turn
        if turn is not None and hasattr(turn, "_rest_until"):
            cur["rest"] = max(0.0, turn._rest_until - time.monotonic())
        cur["run0"], cur["wait0"], cur["slices0"] = _schedstat(local)
        try:
            res = orig_form(self)
        finally:
            cur["t1"] = clock()
            cur["cpu1"] = time.thread_time()
            cur["run1"], cur["wait1"], cur["slices1"] = _schedstat(local)
            local.cur = None
        cur["committed"] = bool(res.committed)
        cur["coordinated_at"] = res.coordinated_at
        cur["commit_wall"] = time.time()
        cur["bytes"] = res.bytes_drained
        records.append(cur)
        return res

    gmod.GlobalMirror.form_consistency_group = form
    phase(loops.SessionTurn, "acquire", "turn")
    phase(loops.SessionTurn, "release", "release")
    phase(gmod.GlobalMirror, "_coordinate", "coord")
    phase(gmod.GlobalMirror, "_drain", "drain")
    phase(gmod.GlobalMirror, "_flashcopy_phase", "flash")

    from fastfc.tools import nbd
    phase(nbd.Turn, "acquire", "tacq")     # the turn's own wait, apart from the rest

    def dump() -> None:
        with open(path, "w") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
    atexit.register(dump)


def summary(rows: list[dict]) -> dict:
    """Per attempt: wall, on CPU (schedstat run), runnable (schedstat wait),
    the rest (sleeping); and by phase, wall time; for all and the slowest 5%."""
    def split(rs: list[dict]) -> dict:
        if not rs:
            return {}
        wall = sum(r["t1"] - r["t0"] for r in rs)
        run = sum(r["run1"] - r["run0"] for r in rs)
        wait = sum(r["wait1"] - r["wait0"] for r in rs)
        cpu = sum(r["cpu1"] - r["cpu0"] for r in rs)
        slices = sum(r["slices1"] - r["slices0"] for r in rs)
        out = {"n": len(rs), "wall_ms_mean": wall / len(rs) * 1e3,
               "on_cpu": run / wall, "runnable": wait / wall,
               "sleeping": 1 - (run + wait) / wall, "thread_cpu": cpu / wall,
               "cpu_ms_mean": cpu / len(rs) * 1e3, "slices_mean": slices / len(rs),
               "mb_mean": sum(r["bytes"] for r in rs) / len(rs) / 1e6}
        for p in ("turn", "tacq", "coord", "drain", "flash", "release"):
            xs = [r[p + "1"] - r[p + "0"] for r in rs if p + "0" in r and p + "1" in r]
            out[p + "_share"] = sum(xs) / wall
        return out
    rows = busy(rows)
    walls = sorted(r["t1"] - r["t0"] for r in rows)
    cut = walls[int(len(walls) * 0.95)] if walls else 0
    gaps = [b["t0"] - a["t1"] for a, b in zip(rows, rows[1:])]
    return {"attempts": len(rows), "wall_ms_p50": statistics.median(walls) * 1e3 if walls else 0,
            "wall_ms_p99": walls[int(len(walls) * 0.99)] * 1e3 if walls else 0,
            "gap_ms_max": max(gaps, default=0) * 1e3,
            "all": split(rows), "slowest_5pct": split([r for r in rows
                                                        if r["t1"] - r["t0"] >= cut]),
            "rpo_time_weighted": rpo_over_time(rows)}


def busy(rows: list[dict]) -> list[dict]:
    """The attempts while clients wrote: from each run of attempts that
    drained bytes (no more than 0.5 s between two of them) to its last."""
    rows = [r for r in rows if "t1" in r]
    out: list[dict] = []
    run: list[dict] = []
    last = None
    for r in rows:
        if r["bytes"]:
            if last is not None and r["t0"] - last > 0.5:
                run = []
            if run:
                out += run
            run = []
            last = r["t1"]
            out.append(r)
        elif last is not None:
            run.append(r)
    return out


def rpo_over_time(rows: list[dict], step: float = 0.001) -> dict:
    """The RPO at every ``step`` between the first and last commit: now
    minus the coordination instant of the newest committed CG."""
    commits = sorted((r["commit_wall"], r["coordinated_at"]) for r in rows
                     if r.get("committed") and r.get("coordinated_at"))
    if len(commits) < 2:
        return {}
    xs: list[float] = []
    for (c0, at0), (c1, _) in zip(commits, commits[1:]):
        if c1 - c0 > 0.5:
            continue              # (a paused window between)
        t = c0
        while t < c1:
            xs.append(t - at0)
            t += step
    if not xs:
        return {}
    xs.sort()
    return {"p50_ms": xs[len(xs) // 2] * 1e3, "p99_ms": xs[int(len(xs) * 0.99)] * 1e3,
            "max_ms": xs[-1] * 1e3}


SERVER = ("-m", "benches.serve_trace", "--serve")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--serve":
        install(os.environ["FASTFC_TRACE"])
        from fastfc.tools.cli import main as cli_main
        cli_main(args=argv[1:], prog_name="fastfc")
        return
    from benches import serve as sv
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--track", default="64K")
    ap.add_argument("--triplets", type=int, default=16)
    ap.add_argument("--modes", default="with,without")
    ap.add_argument("--keep", help="keep the trace's JSON lines here")
    args = ap.parse_args(argv)
    with tempfile.NamedTemporaryFile(suffix=".jsonl", delete=False) as f:
        path = args.keep or f.name
    os.environ["FASTFC_TRACE"] = path
    g = sv.gm_under_fio(triplets=args.triplets, seconds=args.seconds, rounds=args.rounds,
                        idle_reps=0, track_size=args.track,
                        modes=tuple(args.modes.split(",")), server=SERVER,
                        server_path=os.getcwd())
    with open(path) as f:
        rows = [json.loads(line) for line in f]
    print(json.dumps({k: g[k] for k in ("iops_with", "iops_without", "ratio", "rpo_p50_ms",
                                        "rpo_p99_ms", "cgs_per_s", "answer_with_p50_ms",
                                        "answer_with_p99_ms", "server_cores_with",
                                        "load_average")}, indent=1))
    print(json.dumps(summary(rows), indent=1))


if __name__ == "__main__":
    main()
