"""The server of ``fastfc serve`` (:class:`fastfc.tools.cli.serve.Server`)
over units ``A`` and ``B`` with the Global Mirror session ``S``, whose
continuous loop (``gm.start()``, CG interval 0) the parent turns on and off
between fio runs (``benches/serve.py``, the ``serve`` bench section).

    python benches/serve_gm_child.py A B SOCKET

Commands, one a line on stdin; each answers one JSON line on stdout:

``start``   start the session's loop; answer once two CGs committed after it
            started (the backlog of the stopped phase is drained by then)
``mark``    start counting: CGs, attempts, RPO samples, CPU time
``report``  what was counted since ``mark``: ``cgs``, ``attempts``,
            ``failures``, ``rpo`` (seconds, every sample), ``seconds``, and
            the CPU seconds of the whole process and of the session's loop
            thread (``/proc/self/task/TID/stat``), and that thread's time on
            a CPU and waiting in the run queue (``schedstat``): the rest of
            its wall time it slept (the GIL, a volume's lock)
``stop``    stop the loop (after the attempt in flight)
``quit``    stop serving and exit

``FASTFC_BENCH_LOOP_NICE=N`` (an experiment; root for N < 0) renices the
loop's thread when it starts: is the loop short of CPU?
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fastfc.tools.cli.serve import Server  # noqa: E402
from fastfc.tools.cli.units import Units  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(tid: int | None = None) -> float:
    """utime + stime of this process (``tid`` None) or of one of its threads."""
    path = "/proc/self/stat" if tid is None else f"/proc/self/task/{tid}/stat"
    try:
        with open(path) as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / TICK


def schedstat(tid: int) -> tuple[float, float]:
    """(seconds on a CPU, seconds runnable but waiting for one) of a thread
    of this process: ``/proc/self/task/TID/schedstat``."""
    try:
        with open(f"/proc/self/task/{tid}/schedstat") as f:
            run, wait = f.read().split()[:2]
    except (OSError, ValueError):
        return float("nan"), float("nan")
    return int(run) / 1e9, int(wait) / 1e9


def main() -> None:
    a, b, sock = sys.argv[1:4]
    units = Units(a, b)
    server = Server(units)
    with server.lock:
        gm = units.session("S")
    counting = threading.Event()
    rpo: list[float] = []
    phases: dict[str, list[float]] = {"coordination": [], "drain": [], "flashcopy": []}
    seen = {"cgs": 0, "attempts": 0}

    def on_result(res) -> None:
        seen["attempts"] += 1
        if res.committed:
            seen["cgs"] += 1
        if not counting.is_set():
            return
        if gm.stats.rpo_samples:
            rpo.append(gm.stats.rpo_samples[-1])   # this attempt's sample
        for k, v in (("coordination", res.coordination_time), ("drain", res.drain_time),
                     ("flashcopy", res.flash_time)):
            if v:
                phases[k].append(v)

    gm.on_result = on_result
    server.nbd.listen_unix(sock)
    server.nbd.start()
    mark: dict = {}

    def answer(**kw) -> None:
        print(json.dumps(kw), flush=True)

    answer(ready=True, pid=os.getpid())
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "start":
            first = seen["cgs"]
            gm.start()
            nice = os.environ.get("FASTFC_BENCH_LOOP_NICE")
            if nice and gm._thread is not None and gm._thread.native_id is not None:
                # an experiment (root for < 0): is the loop short of CPU?
                os.setpriority(os.PRIO_PROCESS, gm._thread.native_id, int(nice))
            deadline = time.monotonic() + 120
            while seen["cgs"] < first + 2 and time.monotonic() < deadline:
                time.sleep(0.002)
            answer(started=seen["cgs"] >= first + 2, state=gm.state.value)
        elif cmd == "mark":
            rpo.clear()
            for v in phases.values():
                v.clear()
            tid = gm._thread.native_id if gm._thread is not None else None
            mark = dict(t=time.perf_counter(), cpu=cpu_seconds(), tid=tid,
                        loop_cpu=cpu_seconds(tid) if tid else 0.0,
                        loop_sched=schedstat(tid) if tid else (0.0, 0.0),
                        failures=dict(gm.stats.failures),
                        drained=gm.stats.bytes_drained, **seen)
            counting.set()
            answer(marked=True)
        elif cmd == "report":
            counting.clear()
            tid = mark["tid"]
            failures = {k: v - mark["failures"].get(k, 0)
                        for k, v in gm.stats.failures.items()
                        if v - mark["failures"].get(k, 0)}
            answer(seconds=time.perf_counter() - mark["t"], cgs=seen["cgs"] - mark["cgs"],
                   attempts=seen["attempts"] - mark["attempts"], failures=failures,
                   rpo=list(rpo), phases=phases,
                   bytes_drained=gm.stats.bytes_drained - mark["drained"], cpu=cpu_seconds() - mark["cpu"],
                   loop_cpu=(cpu_seconds(tid) - mark["loop_cpu"]) if tid else 0.0,
                   # the loop thread's wall time: on a CPU, runnable waiting for
                   # one; the rest it slept (the GIL, a volume's lock, waits)
                   loop_on_cpu=(schedstat(tid)[0] - mark["loop_sched"][0]) if tid else 0.0,
                   loop_runqueue=(schedstat(tid)[1] - mark["loop_sched"][1]) if tid else 0.0,
                   state=gm.state.value, fatal_reason=gm.fatal_reason)
        elif cmd == "stop":
            gm.stop()
            answer(stopped=True)
        elif cmd == "quit":
            break
        else:
            answer(error=f"unknown command {cmd!r}")
    if gm._thread is not None:
        gm.stop()
    server.nbd.stop()
    server.flush()
    units.close()
    answer(bye=True)


if __name__ == "__main__":
    main()
