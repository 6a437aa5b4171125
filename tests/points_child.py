"""Kill-test child for durable recovery points: a storage unit with two
volumes under host writes, taking points of both at one instant, expiring
the oldest expirable ones and restoring points onto new volumes, until the
parent kills it (SIGKILL at a random moment).

Layout of ``--root``::

    unit/               the storage unit (volumes a and b)
    images/V_S.npy      volume V's image at point S's instant: written (fsync,
                        atomic rename) before the point is taken, while the
                        writers are held off
    taken/V_S           the take of point S returned (its text: the seconds
                        it is retained)
    expired/V_S         its expiry returned
    restores/T.json     {"volume": V, "seq": S}: written before restoring V#S
                        onto a new volume T

Run by tests/test_points_crash.py.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
from pathlib import Path

import numpy as np

from fastfc import StorageUnit
from fastfc.errors import ImmutablePointError

VOLUMES = ("a", "b")
N_TRACKS = 16
TRACK = 16384
GRAIN = 4096


def _atomic(path: Path, write) -> None:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", required=True)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    root = Path(args.root)
    for d in ("images", "taken", "expired", "restores"):
        (root / d).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    unit = StorageUnit(root / "unit")
    for v in VOLUMES:
        if v not in unit:
            unit.create_volume(v, N_TRACKS, TRACK, grain_size=GRAIN)
    vols = [unit.volume(v) for v in VOLUMES]
    for r in unit.points._restores.values():
        r.wait(30)
    gate = threading.Lock()
    stop = threading.Event()

    def writer(seed: int) -> None:
        wr = np.random.default_rng(seed)
        cap = N_TRACKS * TRACK
        while not stop.is_set():
            v = vols[int(wr.integers(len(vols)))]
            off = int(wr.integers(0, cap // 512)) * 512
            n = int(wr.integers(1, 8)) * 512
            n = min(n, cap - off)
            with gate:
                v.write(off, wr.integers(0, 256, n, dtype=np.uint8))

    threads = [threading.Thread(target=writer, args=(args.seed * 10 + i,), daemon=True)
               for i in range(2)]
    for t in threads:
        t.start()
    print("READY", flush=True)
    n_restores = len(list((root / "restores").glob("*.json")))
    while True:
        op = rng.random()
        if op < 0.6:
            retain = 3600.0 if rng.random() < 0.3 else 0.0
            with gate:
                chains = [unit.points.chain(v) for v in vols]
                seqs = [c.next_point_seq for c in chains]
                for v, s in zip(vols, seqs):
                    img = v.read(0, v.capacity)
                    _atomic(root / "images" / f"{v.name}_{s}.npy",
                            lambda f, img=img: np.save(f, img))
                points = unit.points.take(VOLUMES, retain_for=retain)
            for p in points:
                _atomic(root / "taken" / f"{p.volume.name}_{p.seq}",
                        lambda f: f.write(str(retain).encode()))
        elif op < 0.85:
            pts = unit.points.points(VOLUMES[int(rng.integers(2))])
            if len(pts) > 3:
                p = pts[int(rng.integers(len(pts) - 1))]
                try:
                    unit.points.expire(p.volume.name, p.seq)
                except ImmutablePointError:
                    continue
                (root / "expired" / f"{p.volume.name}_{p.seq}").write_text("")
        elif n_restores < 6:
            pts = unit.points.points("a")
            if pts:
                p = pts[int(rng.integers(len(pts)))]
                target = f"r{n_restores}"
                n_restores += 1
                _atomic(root / "restores" / f"{target}.json",
                        lambda f: f.write(json.dumps({"volume": "a", "seq": p.seq}).encode()))
                unit.points.restore("a", p.seq, target)


if __name__ == "__main__":
    sys.exit(main())
