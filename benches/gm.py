"""Global Mirror benchmark: a session of many triplets under 4 KiB
random writes, measured against its own baselines in the same run.

Figures: coordination hold p99, FlashCopy phase (all volumes) p99, CGs per
second, RPO p99 (paced writers), host write throughput with Global
Mirror running relative to the same unpaced writers without it, and the
bytes copied into B and C per byte the hosts wrote.

The ``gm`` suite of ``python -m benches`` runs it (``mirror_cases.py``
puts it beside the same session on the NumPy engine).
"""

from __future__ import annotations

import time

from fastfc import GlobalMirror, Volume
from fastfc.tools.testing import RandomWriters, run_under_writers


def make_triplets(n: int, size_mib: int, track_size: int = 65536,
                  grain_size: int | None = None):
    n_tracks = size_mib * 2**20 // track_size

    def vol(tag, i):
        v = Volume(n_tracks, track_size, name=f"{tag}{i:03d}", grain_size=grain_size)
        v._raw_array().fill(0)   # fault the pages in before timing
        return v

    return [(vol("A", i), vol("B", i), vol("C", i)) for i in range(n)]


def close_triplets(triplets) -> None:
    for t in triplets:
        for v in t:
            v.close()


def copy_counts(gm) -> tuple[int, int] | None:
    """Bytes hosts wrote into a session's A volumes and bytes the engine
    copied into its B and C volumes (drains, copy-on-write, background
    copy), so far; None for a session whose B and C are not in this process
    (their counters are the units')."""
    trips = getattr(gm, "triplets", None)
    if trips is None or not all(hasattr(t.b, "copied_bytes") for t in trips):
        return None
    return (sum(t.a.host_bytes for t in trips),
            sum(t.b.copied_bytes + t.c.copied_bytes for t in trips))


def session_figures(gm, primaries, seconds: float, rate: float | None, *, seed: int,
                    io_size: int = 4096, settle=None) -> dict:
    """Run ``gm`` (fastfc's :class:`GlobalMirror` or the NumPy engine's
    session) for ``seconds`` under two writer threads of ``io_size`` random
    writes on ``primaries``, paced at ``rate`` bytes/s combined (None:
    unpaced); then ``settle()`` if given; return the figures, with
    ``copied_per_host_byte``: the bytes copied into B and C per byte the
    hosts wrote (fastfc's sessions in this process; None otherwise)."""
    before = copy_counts(gm) if isinstance(gm, GlobalMirror) else None
    writers, elapsed = run_under_writers(gm, primaries, seconds, threads=2, seed=seed,
                                         io_size=io_size, pace=rate)
    if settle is not None:
        settle()
    after = copy_counts(gm) if before is not None else None
    amplification = None
    if before is not None and after is not None and after[0] > before[0]:
        amplification = (after[1] - before[1]) / (after[0] - before[0])
    if isinstance(gm, GlobalMirror):
        st = gm.stats
        p, successes, attempts, failures = (st.phase_percentiles(), st.successes, st.attempts,
                                            dict(st.failures))
    else:                           # benches.engine_numpy.NpGlobalMirror
        p, successes, attempts, failures = gm.percentiles(), gm.successes, gm.successes, {}
    return {
        "cgs_per_s": successes / elapsed,
        "attempts": attempts,
        "failures": failures,
        "coord_p99_ms": p["coordination"]["p99"] * 1e3,
        "flash_p50_ms": p["flashcopy"]["p50"] * 1e3,
        "flash_p99_ms": p["flashcopy"]["p99"] * 1e3,
        "drain_p50_ms": p["drain"]["p50"] * 1e3,
        "drain_p99_ms": p["drain"]["p99"] * 1e3,
        "rpo_p99_ms": p["rpo"]["p99"] * 1e3,
        "write_mb_s": writers.bytes / elapsed / 1e6,
        "copied_per_host_byte": amplification,
        "elapsed_s": elapsed,
    }


def run_session(triplets, seconds: float, rate: float | None, io_size: int = 4096,
                max_coordination_time: float = 0.05) -> dict:
    """Run GM for ``seconds`` under writers; return the figures. B catches
    up with A at the end and the volumes are left free for the next run."""
    gm = GlobalMirror(triplets, cg_interval=0.0, initial_copy=False,
                      max_coordination_time=max_coordination_time)
    out = session_figures(gm, [t[0] for t in triplets], seconds, rate, seed=1, io_size=io_size,
                          settle=gm.form_consistency_group)
    gm.close(discard=True)   # (the session's own pairs and FlashCopies go)
    return out


def writer_throughput(volumes, seconds: float, io_size: int = 4096) -> float:
    w = RandomWriters(volumes, threads=2, seed=2, io_size=io_size).start()
    time.sleep(seconds)
    w.stop()
    return w.bytes / seconds / 1e6


def three_runs(trips, seconds: float, rate_mbs: float, session=run_session,
               log=lambda msg: None, who: str = "fastfc") -> dict:
    """Host writes alone (``seconds / 2``), then a paced session
    (``seconds``, ``rate_mbs`` MB/s), then an unpaced one (``seconds / 2``)."""
    log(f"    {who}: host writes alone ({seconds / 2:g} s)")
    alone = writer_throughput([t[0] for t in trips], seconds / 2)
    for a, b, _ in trips:            # the session starts with each B equal to its A
        b._raw_array()[:] = a._raw_array()
    log(f"    {who}: paced session ({seconds:g} s)")
    paced = session(trips, seconds, rate_mbs * 1e6)
    log(f"    {who}: unpaced session ({seconds / 2:g} s)")
    return {"alone_mb_s": alone, "paced": paced, "unpaced": session(trips, seconds / 2, None)}
