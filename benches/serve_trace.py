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

runs ``gm_under_fio``'s session-running and paused windows through it and
prints the summary (:func:`summary`): for the attempts that drained while
fio wrote, the loop thread's wall time by phase and by state (on a CPU,
runnable waiting for one, sleeping: its rest, the GIL, the turn), all and
the slowest 5%. docs/measurements/serve-gm.md has what it found.
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
            cur[name + "r"], cur[name + "w"], cur[name + "s"] = _schedstat(local)

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


def _phase(r: dict, name: str) -> float:
    return r.get(name + "1", 0.0) - r.get(name + "0", 0.0)


def split(rs: list[dict]) -> dict:
    """Where the wall time of attempts ``rs`` went: by phase (``rest``: the
    rest planned before the ask, by :class:`SessionTurn`; ``after_rest``:
    from its end to the ask for the turn: the wake-up, the GIL taken back;
    ``turn``: the wait for every place; then coordination, drain,
    FlashCopy phase, release, other) and by the thread's state (on a CPU,
    runnable waiting for one, sleeping), as shares; per attempt: wall, MB,
    CPU, times put on a CPU."""
    if not rs:
        return {}
    tot = sum(r["t1"] - r["t0"] for r in rs)
    rest = sum(r.get("rest", 0.0) for r in rs)
    parts = {"rest": rest,
             "after_rest": sum(r["tacq0"] - r["turn0"] for r in rs if "tacq0" in r) - rest,
             "turn": sum(_phase(r, "tacq") for r in rs),
             "coordinate": sum(_phase(r, "coord") for r in rs),
             "drain": sum(_phase(r, "drain") for r in rs),
             "flashcopy": sum(_phase(r, "flash") for r in rs),
             "release": sum(_phase(r, "release") for r in rs)}
    parts["other"] = tot - sum(parts.values())
    run = sum(r["run1"] - r["run0"] for r in rs)
    wait = sum(r["wait1"] - r["wait0"] for r in rs)
    n = len(rs)
    # times put on a CPU, by phase (each a wake-up or a return from preemption)
    on = {"to_ask": sum(r["tacq0s"] - r["slices0"] for r in rs if "tacq0s" in r),
          "turn": sum(r["tacq1s"] - r["tacq0s"] for r in rs if "tacq1s" in r),
          "drain": sum(r["drain1s"] - r["drain0s"] for r in rs if "drain1s" in r),
          "flashcopy": sum(r["flash1s"] - r["flash0s"] for r in rs if "flash1s" in r),
          "release": sum(r["release1s"] - r["release0s"] for r in rs if "release1s" in r)}
    on["other"] = sum(r["slices1"] - r["slices0"] for r in rs) - sum(on.values())
    return {"n": n, "wall_ms": tot / n * 1e3,
            "mb": sum(r["bytes"] for r in rs) / n / 1e6,
            "cpu_ms": run / n * 1e3,
            "put_on_cpu": sum(r["slices1"] - r["slices0"] for r in rs) / n,
            "put_on_cpu_by_phase": {k: round(v / n, 2) for k, v in on.items()},
            "share": {k: round(v / tot, 3) for k, v in parts.items()},
            "on_cpu": run / tot, "runnable": wait / tot, "sleeping": 1 - (run + wait) / tot}


def summary(rows: list[dict]) -> dict:
    """The attempts that drained while clients wrote (:func:`busy`, less
    the first catch-up after a resume: over 20 MB), all and the slowest 5%
    (:func:`split`); the time between attempts; the RPO over time."""
    rs = [r for r in busy(rows) if 0 < r["bytes"] < 20e6]
    slow = sorted(rs, key=lambda r: r["t1"] - r["t0"])[-max(1, len(rs) // 20):]
    every = busy(rows)
    gaps = sorted(b["t0"] - a["t1"] for a, b in zip(every, every[1:]) if b["t0"] - a["t1"] < 0.5)
    return {"drained": split(rs), "slowest_5pct": split(slow),
            "between_attempts_ms": {"p99": gaps[int(len(gaps) * 0.99)] * 1e3 if gaps else 0,
                                    "max": gaps[-1] * 1e3 if gaps else 0},
            "rpo_time_weighted": rpo_over_time(every)}


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
