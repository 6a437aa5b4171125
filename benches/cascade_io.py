"""Host I/O of 4 KiB with and without cascaded FlashCopy.

Without a cascade (the paths the cascade code passes through: a plain
volume, a source, a target): nanoseconds per operation and the ratio to a
4 KiB slice assignment timed in the same process. Run it under two builds
in turn to compare them (``docs/measurements/cascades.md`` did, main's
and the cascade branch's, interleaved); the script uses nothing a build
without cascades lacks for those figures.

With a cascade S -> T1 -> T2 -> T3 (NOCOPY): a read of T3 whose grains are
still on S (three levels up) against a read of T1 whose grains are on S
(one level), and a 4 KiB write to T1 (its copy-on-write to T2 takes S's
grain through T1) against the same write to a source with one target.

``python -m benches.cascade_io [LABEL]`` (LABEL starts each line).
"""

from __future__ import annotations

import sys
import time

import numpy as np

from fastfc import FlashCopy, Volume

N = 2048              # 64 KiB tracks: 128 MiB volumes
TRACK = 65536


def best(f, reps: int = 15) -> float:
    """The least CPU time of this thread over ``reps`` calls (CPU time: on a
    shared machine the wall clock counts the other jobs' turns too)."""
    ts = []
    for _ in range(reps):
        t0 = time.thread_time()
        f()
        ts.append(time.thread_time() - t0)
    return min(ts)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    label = argv[0] if argv else "fastfc"
    rng = np.random.default_rng(1)
    data = rng.integers(0, 256, 4096, dtype=np.uint8)
    offs = [int(t) * TRACK + 1024 for t in rng.permutation(N)]
    arr = np.ones(N * TRACK, np.uint8)

    def base():
        for o in offs:
            arr[o:o + 4096] = data

    def reads(v):
        def run():
            r = v.read
            for o in offs:
                r(o, 4096)
        return run

    def writes(v):
        def run():
            w = v.write
            for o in offs:
                w(o, data)
        return run

    def fresh_cow(pairs):
        """Each timed pass writes grains the target still needs: a new
        establish before it (not timed)."""
        out = []
        for _ in range(7):
            src, tgt = pairs
            fc = FlashCopy(src, tgt, background_copy=False)
            out.append(best(writes(src), reps=1))
            fc.withdraw(force=True)
            tgt.write(0, np.zeros(tgt.capacity, np.uint8))    # valid again, in memory
        return min(out)

    def vol(fill=0):
        v = Volume(N, TRACK)
        v._raw_array()[:] = fill       # (every page in memory: no first-touch faults)
        return v

    b = best(base)
    figures = {}
    P = vol(3)
    S, T = vol(1), vol(2)
    FlashCopy(S, T, background_copy=False)
    figures["plain volume write"] = best(writes(P))
    figures["plain volume read"] = best(reads(P))
    figures["target read, grains on its source"] = best(reads(T))
    figures["target write, partial grains fetched"] = best(writes(T), reps=1)
    figures["source write, grains copied already"] = best(writes(S))
    figures["source write with copy-on-write"] = fresh_cow((vol(4), vol()))
    cascade = {}
    try:
        s, t1, t2, t3 = vol(5), vol(6), vol(7), vol(8)
        FlashCopy(s, t1, background_copy=False)
        FlashCopy(t1, t2, background_copy=False)
        FlashCopy(t2, t3, background_copy=False)
    except Exception:    # noqa: BLE001 - a build without cascades
        pass
    else:
        cascade["T3 read, grains on S (3 levels up)"] = best(reads(t3))
        cascade["T1 read, grains on S (1 level up)"] = best(reads(t1))
        one_s, one_t = vol(9), vol()
        FlashCopy(one_s, one_t, background_copy=False)
        cascade["middle T1 write, copy-on-write to T2 from S"] = best(writes(t1), reps=1)
        cascade["source write, copy-on-write to its target"] = best(writes(one_s), reps=1)
    for k, v in {**figures, **cascade}.items():
        print(f"{label}\t{k}\t{v / len(offs) * 1e9:.0f} ns\t{v / b:.3f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
