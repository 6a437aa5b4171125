"""``fastfc serve`` against nbdkit's memory plugin and qemu-nbd.

One export each (1 GiB by default), over a unix socket, everything in
memory (tmpfs): fastfc serves a unit in /dev/shm, qemu-nbd a raw file in
/dev/shm, nbdkit its ``memory`` plugin. The workloads of the issue's table
run interleaved (round r runs every server once per workload, in a rotating
order) and each server's figure is the median of its rounds; a ratio
(fastfc over a peer) is the median over rounds of that round's ratio, since
the load of a shared machine drifts between rounds more than within one.
The CPU time each server used per request comes from ``/proc/PID/stat``.

``gm_under_fio``: the same fio load (4 KiB randwrite QD16) on
the A exports of a Global Mirror session (two units in /dev/shm: A in one,
B and C in the other), with the session's continuous loop running in the
server process (``serve_gm_child.py``) and stopped, interleaved: client
IOPS with / without, CG/s, RPO p99.

Run both as the ``serve`` suite: ``python -m benches [--quick] serve``.

Needs fio (nbd engine), nbdcopy (libnbd-bin), nbdkit and qemu-nbd
(qemu-utils): ``apt-get install fio libnbd-bin nbdkit qemu-utils``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORKLOADS = {
    "nbdcopy in (GB/s)": None,
    "4K randwrite QD16 (kIOPS)": dict(rw="randwrite", bs="4k", iodepth=16),
    "4K randread QD16 (kIOPS)": dict(rw="randread", bs="4k", iodepth=16),
    "1M seq write QD8 (GB/s)": dict(rw="write", bs="1m", iodepth=8),
}
# tool -> the Debian/Ubuntu package that installs it
PACKAGES = {"fio": "fio", "nbdcopy": "libnbd-bin", "nbdkit": "nbdkit",
            "qemu-nbd": "qemu-utils"}
TOOLS = list(PACKAGES)
GM_TOOLS = ["fio"]
ROOT = Path(__file__).resolve().parent.parent
TICK = os.sysconf("SC_CLK_TCK")


def missing(tools=TOOLS) -> str | None:
    """None when every tool is on PATH, else what is missing and the
    ``apt-get install`` line that installs it."""
    gone = [t for t in tools if shutil.which(t) is None]
    if not gone:
        return None
    pkgs = sorted({PACKAGES[t] for t in gone})
    return (f"{', '.join(gone)} not found on PATH: apt-get install {' '.join(pkgs)}")


def cpu_seconds(pid: int) -> float:
    """utime + stime of process ``pid`` (all its threads), from /proc."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / TICK


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def wait_socket(path: str, proc: subprocess.Popen, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{proc.args}: no socket {path} after {timeout}s")
        time.sleep(0.05)


def start_servers(tmp: Path, size: int) -> dict[str, tuple[subprocess.Popen, str]]:
    py = sys.executable
    env = _env()
    unit = tmp / "unit"
    subprocess.run([py, "-m", "fastfc", "-u", str(unit), "mkvol", "V", "--size", str(size)],
                   check=True, env=env, capture_output=True)
    raw = tmp / "qemu.raw"
    with open(raw, "wb") as f:
        f.truncate(size)
    servers = {}
    s = str(tmp / "fastfc.sock")
    p = subprocess.Popen([py, "-m", "fastfc", "-u", str(unit), "serve", "--socket", s],
                         env=env, start_new_session=True, stderr=subprocess.DEVNULL)
    servers["fastfc"] = (p, f"nbd+unix:///V?socket={s}")
    s = str(tmp / "nbdkit.sock")
    p = subprocess.Popen(["nbdkit", "-f", "-U", s, "memory", str(size)],
                         start_new_session=True, stderr=subprocess.DEVNULL)
    servers["nbdkit memory"] = (p, f"nbd+unix:///?socket={s}")
    s = str(tmp / "qemu.sock")
    p = subprocess.Popen(["qemu-nbd", "-f", "raw", "-k", s, "-x", "V", "-t", "-e", "16",
                          str(raw)], start_new_session=True, stderr=subprocess.DEVNULL)
    servers["qemu-nbd"] = (p, f"nbd+unix:///V?socket={s}")
    for name, (p, uri) in servers.items():
        wait_socket(uri.split("socket=")[1], p)
    return servers


def fio_json(args: list[str]) -> dict:
    out = subprocess.run(["fio", "--output-format=json", *args], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"fio {' '.join(args)} exited with {out.returncode}: "
                           f"{out.stderr.strip()[-500:]}")
    return json.loads(out.stdout[out.stdout.index("{"):])


def fio(uri: str, size: int, seconds: float, rw: str, bs: str, iodepth: int,
        ramp: float = 0.5) -> tuple[float, int]:
    """One fio job; (kIOPS for 4k, else GB/s; the requests it completed)."""
    doc = fio_json(["--name=w", "--ioengine=nbd", f"--uri={uri}", f"--rw={rw}", f"--bs={bs}",
                    f"--iodepth={iodepth}", f"--size={size}", "--time_based",
                    f"--runtime={seconds}", f"--ramp_time={ramp}"])
    side = doc["jobs"][0]["write" if "write" in rw else "read"]
    value = side["iops"] / 1e3 if bs == "4k" else side["bw_bytes"] / 1e9
    return value, int(side["total_ios"])


def nbdcopy(src: Path, uri: str, size: int) -> tuple[float, int]:
    """Copy ``src`` into the export; (GB/s, the 256 KiB requests it takes)."""
    t = time.perf_counter()
    subprocess.run(["nbdcopy", str(src), uri], check=True, capture_output=True)
    return size / (time.perf_counter() - t) / 1e9, max(1, size // (256 << 10))


def run(rounds: int, seconds: float, size: int, log=lambda msg: None) -> dict:
    """The table's workloads against the three servers, interleaved; raises
    RuntimeError naming the apt packages when a tool is missing."""
    gone = missing()
    if gone:
        raise RuntimeError(gone)
    with tempfile.TemporaryDirectory(dir="/dev/shm") as d:
        tmp = Path(d)
        src = tmp / "src.raw"
        with open(src, "wb") as f:
            block = os.urandom(1 << 20)
            for _ in range(size >> 20):
                f.write(block)
        servers = start_servers(tmp, size)
        names = list(servers)
        results: dict[str, dict[str, list[float]]] = {w: {n: [] for n in names}
                                                       for w in WORKLOADS}
        # server CPU seconds per request (all its threads, from /proc)
        cpu: dict[str, dict[str, list[float]]] = {w: {n: [] for n in names} for w in WORKLOADS}
        try:
            for r in range(rounds):
                log(f"    round {r + 1} of {rounds}")
                order = names[r % len(names):] + names[:r % len(names)]
                for w, params in WORKLOADS.items():
                    for n in order:
                        proc, uri = servers[n]
                        c0 = cpu_seconds(proc.pid)
                        v, ios = nbdcopy(src, uri, size) if params is None else \
                            fio(uri, size, seconds, **params)
                        c = cpu_seconds(proc.pid) - c0
                        results[w][n].append(v)
                        # the fio figure counts the requests after its ramp;
                        # the CPU time spans the ramp too: scale it out
                        if params is not None:
                            ios = int(ios * (seconds + 0.5) / seconds)
                        cpu[w][n].append(c / ios)
        finally:
            for p, _ in servers.values():
                os.killpg(p.pid, signal.SIGTERM)
                p.wait(timeout=30)
    table = {w: {n: statistics.median(v) for n, v in by.items()} for w, by in results.items()}
    # the machine's load drifts: a ratio is taken within each round (the
    # servers ran back to back), then the median over rounds
    ratios = {w: {peer: statistics.median(f / p for f, p in zip(by["fastfc"], by[peer]))
                  for peer in names if peer != "fastfc"} for w, by in results.items()}
    cpu_us = {w: {n: statistics.median(v) * 1e6 for n, v in by.items()} for w, by in cpu.items()}
    return {"medians": table, "ratios": ratios, "raw": results, "cpu_us_per_request": cpu_us,
            "rounds": rounds, "seconds": seconds, "size": size}


# --------------------------------------------------------------------------
# the same fio load with Global Mirror forming CGs underneath
# --------------------------------------------------------------------------

def _cli(*args) -> None:
    out = subprocess.run([sys.executable, "-m", "fastfc", *map(str, args)], env=_env(),
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"fastfc {' '.join(map(str, args))}: {out.stderr.strip()}")


class _Child:
    """``serve_gm_child.py``: the serve command's Server with session S."""

    def __init__(self, a: Path, b: Path, sock: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "benches" / "serve_gm_child.py"), str(a), str(b),
             str(sock)], env=_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True, start_new_session=True)
        self.read()

    def read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait(timeout=30)
            raise RuntimeError(f"serve_gm_child.py exited with {self.proc.returncode}: "
                               f"{self.proc.stderr.read().strip()[-2000:]}")
        return json.loads(line)

    def ask(self, cmd: str) -> dict:
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        return self.read()

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.ask("quit")
                self.proc.wait(timeout=60)
            except (OSError, RuntimeError, subprocess.TimeoutExpired, ValueError):
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)


def gm_under_fio(triplets: int = 16, size_mib: int = 64, seconds: float = 3.0,
                 rounds: int = 3, jobs: int | None = None, iodepth: int = 16,
                 track_size: str = "64K", log=lambda msg: None) -> dict:
    """fio 4 KiB randwrite QD``iodepth`` on the first ``jobs`` A exports (one
    fio job, one connection, per export; default all), with the session's
    loop running in the server process and stopped, interleaved (round r
    runs ``with`` first when r is odd). Units in /dev/shm."""
    gone = missing(GM_TOOLS)
    if gone:
        raise RuntimeError(gone)
    jobs = triplets if jobs is None else min(jobs, triplets)
    names = [(f"A{i:03d}", f"B{i:03d}", f"C{i:03d}") for i in range(triplets)]
    with tempfile.TemporaryDirectory(dir="/dev/shm") as d:
        tmp = Path(d)
        a, b, sock = tmp / "a", tmp / "b", tmp / "s"
        size = f"{size_mib}M"
        _cli("-u", a, "mkvol", *(n[0] for n in names), "--size", size,
             "--track-size", track_size)
        _cli("-u", b, "mkvol", *(x for n in names for x in n[1:]), "--size", size,
             "--track-size", track_size)
        _cli("-u", a, "-r", b, "mkgmir", "S", *(":".join(n) for n in names))
        child = _Child(a, b, sock)
        args = []
        for n in names[:jobs]:
            args += [f"--name={n[0]}", f"--uri=nbd+unix:///{n[0]}?socket={sock}"]
        common = ["--ioengine=nbd", "--rw=randwrite", "--bs=4k", f"--iodepth={iodepth}",
                  f"--size={size_mib}M", "--time_based", f"--runtime={seconds}",
                  "--group_reporting"]
        iops: dict[str, list[float]] = {"with": [], "without": []}
        reports: dict[str, list[dict]] = {"with": [], "without": []}
        server_cores: dict[str, list[float]] = {"with": [], "without": []}
        try:
            # the volumes start zero: write them once, so no run sees a first touch
            fio_json(["--ioengine=nbd", "--rw=write", "--bs=1m", "--iodepth=4",
                      f"--size={size_mib}M", *args])
            child.ask("start")
            child.ask("stop")        # B and C in step with A: every run starts alike
            for r in range(rounds):
                log(f"    round {r + 1} of {rounds}")
                order = ["with", "without"] if r % 2 else ["without", "with"]
                for mode in order:
                    if mode == "with":
                        started = child.ask("start")
                        if not started["started"]:
                            raise RuntimeError(f"the session formed no CG: {started}")
                    child.ask("mark")
                    doc = fio_json([*common, *args])
                    rep = child.ask("report")
                    if mode == "with":
                        child.ask("stop")
                    if rep.get("fatal_reason"):
                        raise RuntimeError(f"the session failed: {rep['fatal_reason']}")
                    w = doc["jobs"][0]["write"]
                    iops[mode].append(w["iops"])
                    reports[mode].append(rep)
                    server_cores[mode].append(rep["cpu"] / rep["seconds"])
        finally:
            child.close()
    ratios = [w / wo for w, wo in zip(iops["with"], iops["without"])]
    rpo = sorted(x for rep in reports["with"] for x in rep["rpo"])
    cgs = sum(rep["cgs"] for rep in reports["with"])
    secs = sum(rep["seconds"] for rep in reports["with"])
    loop_cpu = sum(rep["loop_cpu"] for rep in reports["with"])
    on_cpu = sum(rep["loop_on_cpu"] for rep in reports["with"])
    runq = sum(rep["loop_runqueue"] for rep in reports["with"])
    failures: dict[str, int] = {}
    for rep in reports["with"]:
        for k, v in rep["failures"].items():
            failures[k] = failures.get(k, 0) + v

    def pct(xs: list[float], q: int) -> float:
        return float(statistics.quantiles(xs, n=100)[q - 1]) if len(xs) >= 2 else \
            (xs[0] if xs else float("nan"))

    phases = {k: sorted(x for rep in reports["with"] for x in rep["phases"][k])
              for k in ("coordination", "drain", "flashcopy")}
    return {
        "triplets": triplets, "size_mib": size_mib, "jobs": jobs, "iodepth": iodepth,
        "track_size": track_size,
        "seconds": seconds, "rounds": rounds,
        "iops_with": statistics.median(iops["with"]),
        "iops_without": statistics.median(iops["without"]),
        "ratio": statistics.median(ratios), "round_ratios": ratios,
        "cgs_per_s": cgs / secs if secs else float("nan"),
        "attempts": sum(rep["attempts"] for rep in reports["with"]), "cgs": cgs,
        "failures": failures,
        "rpo_p50_ms": pct(rpo, 50) * 1e3, "rpo_p99_ms": pct(rpo, 99) * 1e3,
        "rpo_max_ms": (rpo[-1] if rpo else float("nan")) * 1e3, "rpo_samples": len(rpo),
        **{f"{k}_p{q}_ms": pct(v, q) * 1e3 for k, v in phases.items() for q in (50, 99)},
        "drained_mb_s": sum(rep["bytes_drained"] for rep in reports["with"]) / secs / 1e6
        if secs else float("nan"),
        # server CPU, in cores: the whole process, and the session's loop thread
        "server_cores_with": statistics.median(server_cores["with"]),
        "server_cores_without": statistics.median(server_cores["without"]),
        "loop_cores": loop_cpu / secs if secs else float("nan"),
        # the loop thread's wall time: on a CPU / in the run queue / asleep
        # (waiting for the GIL or a volume's lock: it never sleeps by choice
        # between CGs at CG interval 0 unless an attempt failed)
        "loop_on_cpu": on_cpu / secs if secs else float("nan"),
        "loop_runqueue": runq / secs if secs else float("nan"),
        "loop_asleep": (secs - on_cpu - runq) / secs if secs else float("nan"),
        "raw": {"iops": iops, "reports": [{k: v for k, v in rep.items()
                                           if k not in ("rpo", "phases")}
                                          for m in reports for rep in reports[m]]},
    }
