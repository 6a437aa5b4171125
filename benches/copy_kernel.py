"""The copy of large runs, kernel by kernel, against ``np.copyto`` of the same
bytes in the same run (``python -m benches.copy_kernel [--gib N] [--rounds R]``).

Every round times each variant once, in a rotating order, so that a noisy
neighbour hits them all alike; the ratios are ``np.copyto``'s time over the
variant's (higher is faster), from the minimum and the median times:

- ``memcpy``, ``stream`` (non-temporal, four 4 KiB streams), ``stream1``
  (non-temporal, one stream): each kernel alone on the calling thread
  (``_core._copy_with``); ``_copy_stream`` is the four-stream kernel's hook;
- ``big path, <kernel>``: ``_core._pool_copy`` of the whole buffer, the
  path of a large copy (split over the copy threads from 1 MiB), with that
  kernel; ``4 MiB chunks``: the same path a 4 MiB chunk at a time, as a
  background copy goes (and with the chosen kernel on one thread: no split);
- small copies: ``_core._pool_copy`` of 4 KiB and 64 KiB pieces walking a
  64 MiB buffer, against ``np.copyto`` of the same pieces.

It prints ``_core.copy_kernel()`` first: the kernel the measurement at the
first large copy chose, its timings and what it cost.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from fastfc import _core

KERNELS = _core.COPY_KERNELS
CHUNK = 4 << 20   # a background-copy chunk (flashcopy.CHUNK_BYTES)


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _interleaved(variants: dict, rounds: int) -> dict[str, list[float]]:
    """Each variant's times over ``rounds`` rounds, the order rotated per
    round (the machine is shared: neighbours' noise falls on all alike)."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for r in range(rounds):
        for j in range(len(names)):
            name = names[(r + j) % len(names)]
            times[name].append(_timed(variants[name]))
    return times


def _report(name: str, times: list[float], base: list[float]) -> str:
    lo = min(base) / min(times)
    med = statistics.median(base) / statistics.median(times)
    return f"{name:34s} {lo:5.2f} x  {med:5.2f} x   ({min(times) * 1e3:8.2f} ms min)"


def large(nbytes: int, rounds: int) -> None:
    src = np.random.default_rng(0).integers(0, 256, nbytes, dtype=np.uint8)
    dst = np.ones(nbytes, dtype=np.uint8)
    chosen = _core.copy_kernel()["kernel"]
    pool_threads = _core.copy_threads()

    def pool(kernel: str):
        def run():
            _core._use_copy(kernel)
            _core._pool_copy(dst, src)
        return run

    def chunks(kernel: str, threads: int | None = None):
        def run():
            _core._use_copy(kernel)
            if threads is not None:
                _core.set_copy_threads(threads)
            try:
                for o in range(0, nbytes, CHUNK):
                    _core._pool_copy(dst[o:o + CHUNK], src[o:o + CHUNK])
            finally:
                _core.set_copy_threads(pool_threads)
        return run

    variants = {"np.copyto": lambda: np.copyto(dst, src),
                "_copy_stream (four streams)": lambda: _core._copy_stream(dst, src)}
    for k in KERNELS:
        variants[f"{k} alone"] = (lambda k=k: _core._copy_with(k, dst, src))
    for k in KERNELS:
        variants[f"big path, {k}, {_core.copy_threads()} threads"] = pool(k)
    for k in KERNELS:
        variants[f"4 MiB chunks, {k}, {pool_threads} threads"] = chunks(k)
    if pool_threads > 1:
        variants[f"4 MiB chunks, {chosen}, 1 thread"] = chunks(chosen, 1)
    names = list(variants)
    times = _interleaved(variants, rounds)
    _core._use_copy(chosen, why="restored by the benchmark")
    assert np.array_equal(dst, src)
    print(f"\n{nbytes / 2**30:g} GiB, {rounds} rounds; ratio = np.copyto time / time "
          f"(min, median); np.copyto {min(times['np.copyto']) * 1e3 / (nbytes / 2**30):.0f} "
          "ms/GiB at best")
    for name in names[1:]:
        print(_report(name, times[name], times["np.copyto"]))


def small(piece: int, rounds: int, span: int = 64 << 20) -> None:
    src = np.random.default_rng(1).integers(0, 256, span, dtype=np.uint8)
    dst = np.ones(span, dtype=np.uint8)
    offs = range(0, span, piece)
    chosen = _core.copy_kernel()["kernel"]
    pc, ct = _core._pool_copy, np.copyto

    def fast(kernel: str):
        def run():
            _core._use_copy(kernel)
            for o in offs:
                pc(dst[o:o + piece], src[o:o + piece])
        return run

    def numpy():
        for o in offs:
            ct(dst[o:o + piece], src[o:o + piece])

    variants = {"np.copyto": numpy, **{f"_pool_copy, {k}": fast(k) for k in KERNELS}}
    names = list(variants)
    times = _interleaved(variants, rounds)
    _core._use_copy(chosen, why="restored by the benchmark")
    print(f"\n{piece // 1024} KiB pieces over {span >> 20} MiB, {rounds} rounds "
          "(a kernel below 64 KiB is always memcpy)")
    for name in names[1:]:
        print(_report(name, times[name], times["np.copyto"]))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gib", type=float, default=1.0, help="bytes of the large copy, in GiB")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--no-small", action="store_true", help="skip the 4 KiB / 64 KiB pieces")
    a = ap.parse_args(argv)
    print("copy_kernel():", _core.copy_kernel())
    print("copy threads:", _core.copy_threads(), "| kernels:", _core.kernels()["copy_stream"])
    large(int(a.gib * 2**30), a.rounds)
    if not a.no_small:
        small(4096, a.rounds)
        small(65536, a.rounds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
