"""The demo: a Global Mirror session under a random write workload, with
faults injected, live progress, a summary table and an optional plot."""

from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from fastfc import faults
from fastfc.copyservices.globalmirror import GlobalMirror
from fastfc.tools.testing import FaultPlan, RandomWriters
from fastfc.storage.volume import Volume


@dataclass
class DemoConfig:
    seconds: float = 20.0
    triplets: int = 16
    size_mib: int = 32
    track_size: int = 65536
    rate_mbs: float = 100.0      # combined host write rate (MB/s), 0 = unpaced
    io_size: int = 4096
    fault_every: float = 1.0     # seconds between injected faults, 0 = none
    max_drain_time: float = 0.5
    seed: int = 0


@dataclass
class Timeline:
    t: list = field(default_factory=list)
    rpo: list = field(default_factory=list)


def _ms(x: float) -> str:
    return "-" if x != x else f"{x * 1e3:.2f}"


def _status_table(gm: GlobalMirror, writers: RandomWriters, elapsed: float, last_fault: str):
    from rich.table import Table
    st = gm.stats
    p = st.phase_percentiles()
    t = Table(title=f"fastfc Global Mirror demo: {len(gm.triplets)} triplets, "
                    f"{elapsed:5.1f} s", expand=False)
    t.add_column("figure")
    t.add_column("value", justify="right")
    t.add_row("CG sequence (newest committed)", str(st.sequence))
    t.add_row("CGs committed / attempts", f"{st.successes} / {st.attempts}")
    t.add_row("failures by cause", ", ".join(f"{k} {v}" for k, v in sorted(st.failures.items())) or "none")
    t.add_row("session state", gm.state.value)
    rpo = st.rpo
    t.add_row("RPO now (ms)", "-" if rpo is None else f"{rpo * 1e3:.1f}")
    t.add_row("RPO p50 / p99 (ms)", f"{_ms(p['rpo']['p50'])} / {_ms(p['rpo']['p99'])}")
    t.add_row("coordination hold p50 / p99 (ms)",
              f"{_ms(p['coordination']['p50'])} / {_ms(p['coordination']['p99'])}")
    t.add_row("drain p50 / p99 (ms)", f"{_ms(p['drain']['p50'])} / {_ms(p['drain']['p99'])}")
    t.add_row("FlashCopy phase p50 / p99 (ms)",
              f"{_ms(p['flashcopy']['p50'])} / {_ms(p['flashcopy']['p99'])}")
    t.add_row("drained to B (MiB)", f"{st.bytes_drained / 2**20:.1f}")
    t.add_row("host writes (MB/s)", f"{writers.bytes / max(elapsed, 1e-9) / 1e6:.1f}")
    t.add_row("last fault injected", last_fault)
    return t


def run_demo(cfg: DemoConfig, plot: str | None = None, console=None) -> dict:
    """Run the demo; returns the final stats as a dict.

    On a terminal the status table updates live; otherwise (a pipe, a file)
    a one-line status goes to stderr every few seconds and stdout gets the
    final table only, so the output holds no live-display control codes."""
    from rich.console import Console
    from rich.live import Live

    if console is None:
        console = Console(highlight=False)
        if not console.is_terminal:
            console.width = 200     # a pipe: no wrapping at 80 columns
    n_tracks = cfg.size_mib * 2**20 // cfg.track_size
    console.print(f"[bold]fastfc demo[/]: {cfg.triplets} triplets (A->B Global Copy, "
                  f"B->C revertible FlashCopy) of {cfg.size_mib} MiB, {cfg.io_size} B random "
                  f"writes on 2 threads at {cfg.rate_mbs or 'unpaced'} MB/s, "
                  f"a fault every {cfg.fault_every} s, for {cfg.seconds} s")

    def vols(tag):
        return [Volume(n_tracks, cfg.track_size, name=f"{tag}{i:02d}") for i in range(cfg.triplets)]

    A, B, C = vols("A"), vols("B"), vols("C")
    gm = GlobalMirror(list(zip(A, B, C)), cg_interval=0.0, max_drain_time=cfg.max_drain_time)
    rng = np.random.default_rng(cfg.seed)
    plan = FaultPlan(gm, rng, stall=cfg.max_drain_time * 1.5)
    writers = RandomWriters(A, threads=2, seed=cfg.seed, io_size=cfg.io_size,
                            pace=cfg.rate_mbs * 1e6 if cfg.rate_mbs else None)
    timeline = Timeline()
    last_fault = ["none yet"]
    stop = threading.Event()

    def injector():
        while not stop.wait(cfg.fault_every):
            kind = plan.arm()
            last_fault[0] = f"{kind} at {time.perf_counter() - t0:.1f} s"
            stop.wait(min(0.5, cfg.fault_every / 2))
            plan.disarm()

    t0 = time.perf_counter()
    writers.start()
    gm.start()
    inj = threading.Thread(target=injector, daemon=True)
    if cfg.fault_every > 0:
        inj.start()
    live = Live(console=console, refresh_per_second=4, transient=True) \
        if console.is_terminal else None
    said = t0
    try:
        if live is not None:
            live.start()
        while (elapsed := time.perf_counter() - t0) < cfg.seconds:
            rpo = gm.stats.rpo
            timeline.t.append(elapsed)
            timeline.rpo.append(float("nan") if rpo is None else rpo)
            if live is not None:
                live.update(_status_table(gm, writers, elapsed, last_fault[0]))
            elif time.perf_counter() - said >= 5:
                said = time.perf_counter()
                st = gm.stats
                print(f"{elapsed:.0f} s: CG {st.sequence}, {st.successes} of {st.attempts} "
                      f"committed, RPO {'-' if rpo is None else f'{rpo * 1e3:.1f} ms'}",
                      file=sys.stderr, flush=True)
            time.sleep(0.1)
    finally:
        if live is not None:
            live.stop()
        stop.set()
        if inj.is_alive():
            inj.join()
        faults.clear()
        writers.stop()
        gm.link.restore()
        gm.stop()
        if gm.state.value == "fatal":
            gm.clear_fatal()
    elapsed = time.perf_counter() - t0

    console.print(_status_table(gm, writers, elapsed, last_fault[0]))

    # with the writers stopped, one last CG must bring every C to the A images
    plan.disarm()
    final = gm.form_consistency_group()
    ok = final.committed and all(
        np.array_equal(t.c.read(0, t.c.capacity), t.a.array) for t in gm.triplets)
    seqs = set(gm.c_sequences)
    console.print(f"final CG {final.sequence}: "
                  + ("[green]every C volume equals its A volume, one sequence number "
                     f"{seqs.pop()} across all C[/]" if ok and len(seqs) == 1 else
                     f"[red]C volumes do NOT match ({final.cause})[/]"))
    if plot:
        _plot(gm, timeline, plot)
        console.print(f"plot written to {plot}")
    out = gm.stats.as_dict()
    out["promise_ok"] = bool(ok)
    gm.close()
    return out


def _plot(gm: GlobalMirror, timeline: Timeline, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hist = [r for r in gm.history if r.coordinated_at is not None]
    t0 = gm.stats.started_at
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    ax1.plot(np.asarray(timeline.t), np.asarray(timeline.rpo) * 1e3, lw=1)
    ax1.set_ylabel("RPO (ms)")
    ax1.set_title("Global Mirror: recovery point objective")
    fails = [r.coordinated_at for r in gm.history
             if not r.committed and r.coordinated_at is not None]
    for at in fails:
        ax1.axvline(at - t0, color="tab:red", alpha=0.25, lw=0.8)
    xs = np.asarray([(r.coordinated_at or t0) - t0 for r in hist])
    for name, attr in (("coordination hold", "coordination_time"), ("drain", "drain_time"),
                       ("FlashCopy phase", "flash_time")):
        ys = np.asarray([getattr(r, attr) for r in hist]) * 1e3
        mask = ys > 0
        ax2.scatter(xs[mask], ys[mask], s=4, label=name)
    ax2.set_yscale("log")
    ax2.set_ylabel("phase time per CG (ms)")
    ax2.set_xlabel("seconds (red lines in the top plot: failed CG attempts)")
    ax2.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
