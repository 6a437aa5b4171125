"""``fastfc serve`` against nbdkit's memory plugin and qemu-nbd.

One export each (1 GiB by default), over a unix socket, everything in
memory (tmpfs): fastfc serves a unit in /dev/shm, qemu-nbd a raw file in
/dev/shm, nbdkit its ``memory`` plugin. The workloads of the issue's table
run interleaved (round r runs every server once per workload, in a rotating
order) and each server's figure is the median of its rounds; a ratio
(fastfc over a peer) is the median over rounds of that round's ratio, since
the load of a shared machine drifts between rounds more than within one.
The CPU time each server used per request comes from ``/proc/PID/stat``.

``gm_under_fio``: the same fio load (4 KiB randwrite QD16) on the A
exports of a Global Mirror session run by the product: ``fastfc serve``
holds two units in /dev/shm (A in one, B and C in the other),
``fastfc resumegmir`` / ``pausegmir`` start and stop the session's loop in
it; interleaved: client IOPS with the session running / paused, CG/s, RPO
p50/p99 (``showgmir --json`` sampled), and the latency of read-only
commands (``lsvol``, ``showgmir``, ``lsflash``) run as client processes
under that load: through the ``fastfc`` console script's front door
(``fastfc_client``, which forwards without importing the engine) and
through the full command line (``python -m fastfc``) in turn, and against
the same commands on the idle server.

The table is the ``serve`` suite, the session the ``serve_gm`` suite:
``python -m benches [--quick] serve serve_gm``.

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
import threading
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
# the same fio load with a Global Mirror session running in fastfc serve
# --------------------------------------------------------------------------

READ_ONLY = (("lsvol", "--json"), ("showgmir", "S", "--json"), ("lsflash", "--json"))


#: the full command line: click, NumPy and the engine imported before the
#: command is forwarded (``python -m fastfc``)
FULL_CLIENT = ("-m", "fastfc")
#: what the ``fastfc`` console script runs (``fastfc_client.main``): a
#: command for a unit a server holds is forwarded with the standard library
CONSOLE_CLIENT = ("-m", "fastfc_client")


def cli(*args, check: bool = True, client=FULL_CLIENT) -> subprocess.CompletedProcess:
    """``fastfc ARGS``, a client process (``client``: the full command line,
    or the console script's front door)."""
    out = subprocess.run([sys.executable, *client, *map(str, args)], env=_env(),
                         capture_output=True, text=True, timeout=300)
    if check and out.returncode != 0:
        raise RuntimeError(f"fastfc {' '.join(map(str, args))}: {out.stderr.strip()}")
    return out


def timed_cli(*args, client=FULL_CLIENT) -> float:
    """Seconds ``fastfc ARGS`` took, start of the client process to its exit."""
    t = time.perf_counter()
    cli(*args, client=client)
    return time.perf_counter() - t


def timed_console(*args) -> float:
    """Seconds ``fastfc ARGS`` took as the console script runs it
    (``fastfc_client``: forwarded without importing the engine)."""
    return timed_cli(*args, client=CONSOLE_CLIENT)


def ask(unit: Path, *args: str) -> tuple[float, str]:
    """``fastfc -u UNIT ARGS`` forwarded to the server holding ``unit`` from
    this process, through the control socket the client uses
    (``control.forward``), without starting a client: (seconds, stdout)."""
    import io

    from fastfc.tools.cli import control
    out, err = io.BytesIO(), io.BytesIO()
    t = time.perf_counter()
    status = control.forward(unit, ["-u", str(unit), *args], "fastfc", stdout=out, stderr=err,
                             stdout_text=io.StringIO(), stderr_text=io.StringIO())
    took = time.perf_counter() - t
    if status != 0:
        raise RuntimeError(f"fastfc -u {unit} {' '.join(args)} (forwarded): status {status}: "
                           f"{err.getvalue().decode().strip()}")
    return took, out.getvalue().decode()


def show(unit: Path) -> dict:
    return json.loads(ask(unit, "showgmir", "S", "--json")[1])


def pct(xs: list[float], q: int) -> float:
    xs = sorted(xs)
    if not xs:
        return float("nan")
    if len(xs) == 1:
        return xs[0]
    return float(statistics.quantiles(xs, n=100, method="inclusive")[q - 1])


class Sampler:
    """A thread asking the server ``showgmir S --json`` every ``every``
    seconds through the control socket: each answer's ``rpo`` (the session's
    RPO at that instant) and how long the answer took."""

    def __init__(self, unit: Path, every: float) -> None:
        self.unit, self.every = unit, every
        self.rpo: list[float] = []
        self.latency: list[float] = []
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                took, out = ask(self.unit, "showgmir", "S", "--json")
                self.latency.append(took)
                rpo = json.loads(out)["rpo"]
                if rpo is not None:
                    self.rpo.append(rpo)
                self._stop.wait(max(0.0, self.every - took))
        except BaseException as e:      # noqa: BLE001 - reported by stop()
            self.error = e

    def __enter__(self) -> "Sampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=60)
        if self.error is not None and exc[0] is None:
            raise RuntimeError(f"showgmir sampling failed: {self.error}") from self.error


class ClientLoop:
    """A thread running the read-only commands (``READ_ONLY``) as client
    processes, ``fastfc -u UNIT ...``, one after another, in turn, through
    ``client`` (:data:`FULL_CLIENT`, the full command line, or
    :data:`CONSOLE_CLIENT`, the console script's front door): the seconds
    each took, by command (``took``). A command counts if it started before
    the loop was told to stop."""

    def __init__(self, unit: Path, client=FULL_CLIENT) -> None:
        self.unit, self.client = unit, client
        self.took: dict[str, list[float]] = {c[0]: [] for c in READ_ONLY}
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            i = 0
            while True:
                cmd = READ_ONLY[i % len(READ_ONLY)]
                if self._stop.is_set():
                    return
                self.took[cmd[0]].append(timed_cli("-u", self.unit, *cmd, client=self.client))
                i += 1
        except BaseException as e:      # noqa: BLE001 - reported by __exit__
            self.error = e

    def __enter__(self) -> "ClientLoop":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=120)
        if self.error is not None and exc[0] is None:
            raise RuntimeError(f"a read-only command failed: {self.error}") from self.error


def gm_under_fio(triplets: int = 16, size_mib: int = 64, seconds: float = 3.0,
                 rounds: int = 3, jobs: int | None = None, iodepth: int = 16,
                 track_size: str = "64K", sample_every: float = 0.02, idle_reps: int = 3,
                 log=lambda msg: None, modes: tuple[str, ...] = ("with", "without", "clients",
                                                                  "lean"),
                 server: tuple[str, ...] = FULL_CLIENT, server_path: str | None = None,
                 cg_interval: float = 0.0) -> dict:
    """A Global Mirror session run by the product: ``fastfc -u A -r B serve``
    holds the units (A in one, B and C in the other, both in /dev/shm),
    ``fastfc -u A resumegmir S`` starts the session's loop in the server (CGs
    back to back, or ``cg_interval`` seconds apart: ``mkgmir --cg-interval``) and
    ``pausegmir S`` stops it; fio 4 KiB randwrite QD``iodepth`` writes the
    first ``jobs`` A exports (one job, one connection, each; default all).

    Each round (the machine is shared: the windows of a round run back to
    back, in an order that alternates between rounds) has five windows:

    ``with`` / ``without``  fio with the session running / paused (client
        IOPS); a thread asks the server ``showgmir S --json`` every
        ``sample_every`` s through the control socket: the session's RPO at
        that instant, the answer's latency; CGs and server CPU from before
        and after
    ``clients`` / ``lean``  fio with the session running, and the
        read-only commands (``READ_ONLY``) run as client processes one
        after another: through the full command line (``python -m
        fastfc``: click, NumPy and the engine imported before it forwards)
        / through the console script's front door (``fastfc_client``: the
        standard library alone); their latency from the client's start to
        its exit. Each client in windows of its own: the full one's imports
        would load the machine the lean one runs on
    ``idle``  no fio, the session paused: each read-only command and
        ``fastfc --help`` ``idle_reps`` times (the client's own cost), and
        the forwarded ``showgmir`` answer alone

    The idle commands run through both clients.

    ``modes``: the windows a round runs (``with`` and ``without`` at least);
    ``server``: the interpreter's arguments that start ``fastfc`` for the
    server (another build: ``server_path`` first on its ``PYTHONPATH``).
    """
    gone = missing(GM_TOOLS)
    if gone:
        raise RuntimeError(gone)
    jobs = triplets if jobs is None else min(jobs, triplets)
    names = [(f"A{i:03d}", f"B{i:03d}", f"C{i:03d}") for i in range(triplets)]
    with tempfile.TemporaryDirectory(dir="/dev/shm") as d:
        tmp = Path(d)
        a, b, sock = tmp / "a", tmp / "b", tmp / "nbd.sock"
        size = f"{size_mib}M"
        cli("-u", a, "mkvol", *(n[0] for n in names), "--size", size, "--track-size",
            track_size)
        cli("-u", b, "mkvol", *(x for n in names for x in n[1:]), "--size", size,
            "--track-size", track_size)
        cli("-u", a, "-r", b, "mkgmir", "S", *(":".join(n) for n in names),
            *(("--cg-interval", str(cg_interval)) if cg_interval else ()))
        server_env = _env()
        if server_path is not None:
            server_env["PYTHONPATH"] = server_path + os.pathsep + server_env["PYTHONPATH"]
        server = subprocess.Popen(
            [sys.executable, *server, "-u", str(a), "-r", str(b), "serve", "--socket",
             str(sock)], env=server_env, start_new_session=True, stderr=subprocess.PIPE,
            text=True, cwd=server_path)
        args = []
        for n in names[:jobs]:
            args += [f"--name={n[0]}", f"--uri=nbd+unix:///{n[0]}?socket={sock}"]
        common = ["--ioengine=nbd", "--rw=randwrite", "--bs=4k", f"--iodepth={iodepth}",
                  f"--size={size_mib}M", "--time_based", f"--runtime={seconds}",
                  "--group_reporting"]
        iops: dict[str, list[float]] = {m: [] for m in ("with", "without", "clients", "lean")}
        windows: list[dict] = []
        rpo: list[float] = []
        answer: dict[str, list[float]] = {m: [] for m in ("with", "without", "idle")}
        clients: dict[str, list[float]] = {c[0]: [] for c in READ_ONLY}
        idle: dict[str, list[float]] = {c[0]: [] for c in READ_ONLY}
        idle["--help"] = []
        lean: dict[str, list[float]] = {c[0]: [] for c in READ_ONLY}
        lean_idle: dict[str, list[float]] = {c[0]: [] for c in READ_ONLY}
        lean_idle["start"] = []     # python -c 'import fastfc_client': the client's own start
        loads: list[float] = []

        def resume() -> None:
            before = show(a)["successes"]
            cli("-u", a, "resumegmir", "S")
            deadline = time.monotonic() + 120
            while True:      # the backlog of the paused window drained: two CGs
                s = show(a)
                if s["fatal_reason"]:
                    raise RuntimeError(f"the session failed: {s['fatal_reason']}")
                if s["successes"] >= before + 2:
                    return
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the session formed no CG in 120 s: {s}")
                time.sleep(0.005)

        def window(mode: str) -> None:
            if mode != "without":
                resume()
            s0, c0 = show(a), cpu_seconds(server.pid)
            t = time.perf_counter()
            if mode in ("clients", "lean"):
                with ClientLoop(a, FULL_CLIENT if mode == "clients" else CONSOLE_CLIENT
                                ) as loop:
                    doc = fio_json([*common, *args])
                for k, v in loop.took.items():
                    (clients if mode == "clients" else lean)[k] += v
            else:
                with Sampler(a, sample_every) as sampler:
                    doc = fio_json([*common, *args])
                answer[mode] += sampler.latency
                if mode == "with":
                    rpo.extend(sampler.rpo)
            spent = time.perf_counter() - t
            s1, c1 = show(a), cpu_seconds(server.pid)
            if mode != "without":
                cli("-u", a, "pausegmir", "S")
            if s1["fatal_reason"]:
                raise RuntimeError(f"the session failed: {s1['fatal_reason']}")
            iops[mode].append(doc["jobs"][0]["write"]["iops"])
            failures = {k: v - s0["failures"].get(k, 0) for k, v in s1["failures"].items()
                        if v - s0["failures"].get(k, 0)}
            windows.append({"mode": mode, "seconds": spent, "iops": iops[mode][-1],
                            "cgs": s1["successes"] - s0["successes"],
                            "attempts": s1["attempts"] - s0["attempts"], "failures": failures,
                            "bytes_drained": s1["bytes_drained"] - s0["bytes_drained"],
                            "server_cores": (c1 - c0) / spent,
                            "load": os.getloadavg()[0]})

        try:
            wait_socket(str(sock), server)
            wait_socket(str(a / "control.sock"), server)
            # the volumes start zero: write them once, so no run sees a first touch
            fio_json(["--ioengine=nbd", "--rw=write", "--bs=1m", "--iodepth=4",
                      f"--size={size_mib}M", *args])
            resume()         # B and C in step with A: every window starts alike
            cli("-u", a, "pausegmir", "S")
            for r in range(rounds):
                log(f"    round {r + 1} of {rounds}")
                loads.append(os.getloadavg()[0])
                order = ["with", "without", "clients", "lean"] if r % 2 else \
                    ["without", "with", "lean", "clients"]
                for mode in (m for m in order if m in modes):
                    window(mode)
                for _ in range(idle_reps):
                    idle["--help"].append(timed_cli("--help"))
                    lean_idle["start"].append(timed_cli(
                        client=("-c", "import fastfc_client")))
                    for cmd in READ_ONLY:
                        idle[cmd[0]].append(timed_cli("-u", a, *cmd))
                        lean_idle[cmd[0]].append(timed_console("-u", a, *cmd))
                    for _ in range(10):
                        answer["idle"].append(ask(a, "showgmir", "S", "--json")[0])
        finally:
            if server.poll() is None:
                os.killpg(server.pid, signal.SIGTERM)
                try:
                    server.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    os.killpg(server.pid, signal.SIGKILL)
                    server.wait(timeout=30)
    ratios = [w / wo for w, wo in zip(iops["with"], iops["without"])]
    withs = [w for w in windows if w["mode"] == "with"]
    secs = sum(w["seconds"] for w in withs)
    cgs = sum(w["cgs"] for w in withs)
    failures: dict[str, int] = {}
    for w in withs:
        for k, v in w["failures"].items():
            failures[k] = failures.get(k, 0) + v
    ms = 1e3
    every = [x for v in clients.values() for x in v]
    lean_every = [x for v in lean.values() for x in v]
    lean_idle_cmds = [x for k, v in lean_idle.items() if k != "start" for x in v]
    idle_cmds = [x for k, v in idle.items() if k != "--help" for x in v]
    idle_p50 = pct(idle_cmds, 50)
    client_p99 = pct(every, 99)
    return {
        "triplets": triplets, "size_mib": size_mib, "jobs": jobs, "iodepth": iodepth,
        "track_size": track_size, "seconds": seconds, "rounds": rounds,
        "sample_every_ms": sample_every * ms,
        "load_average": {"min": min(loads), "median": statistics.median(loads),
                         "max": max(loads)},
        # client IOPS: the session running / paused (one ratio per round)
        "iops_with": statistics.median(iops["with"]),
        "iops_without": statistics.median(iops["without"]),
        "iops_clients": statistics.median(iops["clients"]) if iops["clients"] else None,
        "iops_lean": statistics.median(iops["lean"]) if iops["lean"] else None,
        "ratio": statistics.median(ratios), "round_ratios": ratios,
        # the session in the fio windows, from showgmir --json before and after
        "cgs_per_s": cgs / secs if secs else float("nan"), "cgs": cgs,
        "round_cgs_per_s": [w["cgs"] / w["seconds"] for w in withs],
        "attempts": sum(w["attempts"] for w in withs), "failures": failures,
        "drained_mb_s": sum(w["bytes_drained"] for w in withs) / secs / 1e6
        if secs else float("nan"),
        # RPO: showgmir's rpo, sampled every sample_every s
        "rpo_p50_ms": pct(rpo, 50) * ms, "rpo_p99_ms": pct(rpo, 99) * ms,
        "rpo_max_ms": max(rpo, default=float("nan")) * ms, "rpo_samples": len(rpo),
        # the server's answer to showgmir --json (control socket, no client
        # process): under fio with / without the session, and idle
        **{f"answer_{m}_p{q}_ms": pct(v, q) * ms for m, v in answer.items() for q in (50, 99)},
        # the read-only commands as client processes: under fio with the
        # session running, and against the idle server; fastfc --help
        "client_p50_ms": pct(every, 50) * ms, "client_p99_ms": client_p99 * ms,
        "client_max_ms": max(every, default=float("nan")) * ms, "client_samples": len(every),
        "client_by_command": {k: {"p50_ms": pct(v, 50) * ms, "p99_ms": pct(v, 99) * ms,
                                  "n": len(v)} for k, v in clients.items()},
        "idle_p50_ms": idle_p50 * ms, "idle_p99_ms": pct(idle_cmds, 99) * ms,
        "idle_by_command": {k: {"p50_ms": pct(v, 50) * ms, "p99_ms": pct(v, 99) * ms,
                                "n": len(v)} for k, v in idle.items()},
        "help_p50_ms": pct(idle["--help"], 50) * ms,
        # the same commands through the console script's front door
        # (fastfc_client: forwarded without importing the engine), in the
        # same windows: under the same load, and idle; its start alone
        "lean_p50_ms": pct(lean_every, 50) * ms, "lean_p99_ms": pct(lean_every, 99) * ms,
        "lean_max_ms": max(lean_every, default=float("nan")) * ms,
        "lean_samples": len(lean_every),
        "lean_by_command": {k: {"p50_ms": pct(v, 50) * ms, "p99_ms": pct(v, 99) * ms,
                                "n": len(v)} for k, v in lean.items()},
        "lean_idle_p50_ms": pct(lean_idle_cmds, 50) * ms,
        "lean_idle_p99_ms": pct(lean_idle_cmds, 99) * ms,
        "lean_start_p50_ms": pct(lean_idle["start"], 50) * ms,
        # the console script's p99 against the full command line's, same run
        "lean_ratio": pct(lean_every, 99) / client_p99 if every and lean_every
        else float("nan"),
        # the latency under load against the idle server's, and the part above it
        "client_ratio": client_p99 / pct(idle_cmds, 99) if idle_cmds else float("nan"),
        "client_above_idle_p99_ms": (client_p99 - idle_p50) * ms,
        "server_cores_with": statistics.median(w["server_cores"] for w in withs),
        "server_cores_without": statistics.median(w["server_cores"] for w in windows
                                                  if w["mode"] == "without"),
        "raw": {"iops": iops, "windows": windows, "rpo": rpo, "answer": answer,
                "clients": clients, "idle": idle, "lean": lean, "lean_idle": lean_idle},
    }
