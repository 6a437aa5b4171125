"""Kill tests of durable recovery points (tests/points_child.py): a child
takes points of two volumes at one instant, expires and restores them under
host writes, and is killed (SIGKILL) at random moments, several times over
the same unit. After each kill the unit reopens and every surviving point
reads exactly the image saved at its take; every point whose take returned
with a retention is still there; no point whose expiry returned is; every
restore reaches exactly its point's image."""

from __future__ import annotations

import json
import os
import signal
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from fastfc import StorageUnit

from test_crash import _forkserver, finish_child

import crash_child

pytestmark = pytest.mark.slow     # child processes killed and reopened: about 10 s


def run_points_child(root: Path, seed: int, kill_after: float,
                     child: str = "points_child") -> None:
    fd, out = tempfile.mkstemp(prefix="fastfc-points-", suffix=".out")
    os.close(fd)
    err = out[:-4] + ".err"
    proc = _forkserver().Process(target=crash_child.forked_main,
                                 args=(child, ["--root", str(root), "--seed", str(seed)],
                                       dict(os.environ), out, err), daemon=True)
    proc.start()
    end = time.monotonic() + 60
    while (not Path(out).read_bytes().startswith(b"READY") and proc.is_alive()
           and time.monotonic() < end):
        time.sleep(0.001)
    time.sleep(kill_after)
    proc.kill()
    code, stdout, stderr = finish_child(proc, Path(out), Path(err), 60)
    assert code == -signal.SIGKILL, f"child ended with {code}\nstdout: {stdout}\nstderr: {stderr}"


def check(root: Path) -> int:
    """Reopen the unit and check every point and restore; the points checked."""
    checked = 0
    with StorageUnit(root / "unit") as unit:
        live = {(p.volume.name, p.seq): p for p in unit.points.points()}
        for (v, s), p in live.items():
            img = np.load(root / "images" / f"{v}_{s}.npy")
            assert np.array_equal(p.image(), img), f"point {v}#{s} does not read its image"
            checked += 1
        for f in (root / "taken").iterdir():
            if "." in f.name:
                continue        # (a marker whose write was killed: its call had not returned)
            v, s = f.name.rsplit("_", 1)
            if float(f.read_text()) > 0:
                assert (v, int(s)) in live, f"retained point {v}#{s} lost"
        for f in (root / "expired").iterdir():
            if "." in f.name:
                continue        # (a marker whose write was killed: its call had not returned)
            v, s = f.name.rsplit("_", 1)
            assert (v, int(s)) not in live, f"expired point {v}#{s} came back"
        for f in (root / "restores").glob("*.json"):
            rec = json.loads(f.read_text())
            target = f.stem
            if target not in unit:
                continue        # killed before the restore was recorded
            r = unit.points._restores.get(target)
            if r is not None:
                assert r.wait(60)
            img = np.load(root / "images" / f"{rec['volume']}_{rec['seq']}.npy")
            got = unit.volume(target).read(0, unit.volume(target).capacity)
            assert np.array_equal(got, img), f"restore {target} of {rec} differs"
    return checked


@pytest.mark.parametrize("seed", [1, 2])
def test_kill_while_taking_expiring_and_restoring_points(tmp_path, seed):
    rng = np.random.default_rng(seed)
    total = 0
    for round_ in range(4):
        run_points_child(tmp_path, seed * 100 + round_, float(rng.uniform(0.2, 1.0)))
        total += check(tmp_path)
    assert total > 0


def check_session(root: Path) -> int:
    """Reopen the unit: every point the session's schedule holds of each C
    reads its A's image at that CG's coordination; the points checked."""
    from fastfc.copyservices.point_schedule import point_cg
    checked = 0
    with StorageUnit(root / "unit") as unit:
        gm = unit.session("s")
        assert gm.point_schedule is not None
        for i in range(2):
            held = gm.scheduled_points(i)
            assert len(held) <= 5 or any(p.pins for p in held)
            for p in held:
                seq = point_cg(p.name)[1]
                img = np.load(root / "images" / f"{seq}_{i}.npy")
                assert np.array_equal(p.image(), img), f"{p!r} does not read CG {seq}"
                checked += 1
        assert [point_cg(p.name) for p in gm.scheduled_points(0)] == \
            [point_cg(p.name) for p in gm.scheduled_points(1)]
    return checked


def test_kill_a_session_taking_points_on_its_schedule(tmp_path):
    """A session whose schedule takes a point of every C after each CG is
    killed at random moments (mid-CG too: prepares, commits, takes and
    expiries, the resyncs' saves into the newest points), several times over
    the same unit: after each reopen every scheduled point reads its CG."""
    rng = np.random.default_rng(7)
    total = 0
    for round_ in range(4):
        run_points_child(tmp_path, 700 + round_, float(rng.uniform(0.3, 1.0)),
                         child="session_points_child")
        total += check_session(tmp_path)
    print(f"{total} scheduled points checked")
    assert total > 0
