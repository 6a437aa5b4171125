"""Crash tests: a Global Mirror session over file-backed storage units is
killed with SIGKILL, and reopening the units must keep the promise.

A child process (tests/crash_child.py, forked from a server that imported it
once: see run_child) runs the session under host writes
and dies by SIGKILL, either through a fault hook at a named step of the
protocol (each prepare, the decision, each commit, each revert, mid-drain,
mid-send on the link, mid-copy-on-write, mid-coordination, inside the
resolution of a failed commit, each sync of durability "power"; while the
session recovers at the remote site or closes) or at a random moment chosen
by the parent.
The child records the A images of every coordination instant durably
(fsync + atomic rename) before the CG goes on.

After each kill the parent reopens the units (the secondary alone first, or
both at once: the first open resolves an interrupted CG) and checks: every C
volume carries the same CG sequence S, none is left revertible, each C's
logical image equals the A image recorded at CG S's coordination, and for a
named point, S and the recovery are the ones that point implies. Then it
forms one more CG itself (the restored session and pairs must still mirror
A exactly) and starts the child again on the same units (the restore path).

``FASTFC_CRASH_ROUNDS`` (default 3) sets the kills per named-point test and
``FASTFC_CRASH_RANDOM`` (default 20) the random-moment kills; the defaults take
well under a minute. ``python tests/stress_crash.py`` runs a longer campaign.
"""

from __future__ import annotations

import collections
import json
import multiprocessing
import multiprocessing.forkserver
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from fastfc import StorageUnit

sys.path.insert(0, str(Path(__file__).parent))
import crash_child as cc  # noqa: E402

pytestmark = pytest.mark.slow     # child processes killed and recovered: about 30 s

ROUNDS = int(os.environ.get("FASTFC_CRASH_ROUNDS", "3"))
RANDOM_KILLS = int(os.environ.get("FASTFC_CRASH_RANDOM", "20"))
N = cc.N_TRIPLETS

# point -> [kills tried, kills survived (the promise held after reopening)]
TALLY: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])


@pytest.fixture(scope="module", autouse=True)
def _summary(request):
    yield
    if not TALLY:
        return
    parts = [f"{p} {t[1]}/{t[0]}" for p, t in sorted(TALLY.items())]
    tried = sum(t[0] for t in TALLY.values())
    survived = sum(t[1] for t in TALLY.values())
    line = f"crash kills survived/tried: {survived}/{tried} ({', '.join(parts)})"
    plugins = request.config.pluginmanager
    reporter = plugins.get_plugin("terminalreporter")
    capture = plugins.get_plugin("capturemanager")
    if reporter is None or capture is None:
        print(line)
        return
    with capture.global_and_fixture_disabled():
        reporter.write_line("")
        reporter.write_line(line)


@pytest.fixture
def tmp_path(tmpfs_tmp_path):
    """The units live on tmpfs (conftest.tmpfs_tmp_path; the children take
    the disk's I/O path there too): a SIGKILL leaves the page cache as it
    is, on tmpfs as on a disk, and on a busy disk the units' syncs took
    most of the time."""
    return tmpfs_tmp_path


# -- running the child ------------------------------------------------------------
# The children are forked from a server that imported crash_child and
# failover_child (fastfc, NumPy) once per worker (multiprocessing's
# forkserver): a fresh interpreter spent about half a second importing them,
# per child, and the module starts well over a hundred. Each child is still a
# process of its own (its own units' locks, threads, mappings) ended by a
# SIGKILL; it reads its environment when it starts (``configure()``), and its
# stdout and stderr go to files the parent reads.
_FORKSERVER = None


def _forkserver():
    global _FORKSERVER
    if _FORKSERVER is None:
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["crash_child", "failover_child"])
        # the server imports them from tests/ (Python 3.11's forkserver does
        # not apply the sys.path it is handed before preloading: a module it
        # cannot import is skipped silently, and each child imported it again)
        here = str(Path(__file__).parent)
        old = os.environ.get("PYTHONPATH")
        os.environ["PYTHONPATH"] = here + (os.pathsep + old if old else "")
        try:
            multiprocessing.forkserver.ensure_running()
        finally:
            if old is None:
                del os.environ["PYTHONPATH"]
            else:
                os.environ["PYTHONPATH"] = old
        _FORKSERVER = ctx
    return _FORKSERVER


def start_child(module: str, argv: list):
    """Start ``tests/<module>.py ARGV`` forked from the server; returns the
    process and the paths of its stdout and stderr."""
    fd, out = tempfile.mkstemp(prefix=f"fastfc-{module}-", suffix=".out")
    os.close(fd)
    err = out[:-4] + ".err"
    proc = _forkserver().Process(target=cc.forked_main,
                                 args=(module, argv, dict(os.environ), out, err), daemon=True)
    proc.start()
    return proc, Path(out), Path(err)


def finish_child(proc, out: Path, err: Path, timeout: float) -> tuple[int | None, str, str]:
    """Wait for the child (killed after ``timeout`` s); its exit status
    (negative: the signal that ended it) and its stdout and stderr."""
    proc.join(timeout)
    if proc.exitcode is None:
        proc.kill()
        proc.join()
        code = None
    else:
        code = proc.exitcode
    texts = [p.read_text(errors="replace") if p.exists() else "" for p in (out, err)]
    out.unlink(missing_ok=True)
    err.unlink(missing_ok=True)
    return code, texts[0], texts[1]


def run_child(root: Path, *, point: str = "none", index: int = 0, after: int = 0,
              seed: int = 0, cg_interval: float = 0.0, kill_after: float | None = None,
              early_kill: bool = False, timeout: float = 30.0, then: str = "loop") -> None:
    """Run the child until it dies; assert that SIGKILL is what ended it.
    With ``kill_after`` the parent kills it that many seconds after it
    printed READY (after it started, if ``early_kill``)."""
    argv = ["--root", str(root), "--point", point,
            "--index", str(index), "--after", str(after), "--seed", str(seed),
            "--cg-interval", str(cg_interval), "--timeout", str(timeout), "--then", then]
    proc, out, err = start_child("crash_child", argv)
    try:
        if kill_after is not None:
            if not early_kill:
                # the parent's clock starts at READY
                end = time.monotonic() + timeout + 30
                while (not out.read_bytes().startswith(b"READY") and proc.is_alive()
                       and time.monotonic() < end):
                    time.sleep(0.001)
                line = out.read_text()
                assert line.startswith("READY"), f"child did not start: {line!r}"
            time.sleep(kill_after)
            proc.kill()
    finally:
        code, stdout, stderr = finish_child(proc, out, err, timeout + 30)
    assert code == -signal.SIGKILL, (
        f"child {' '.join(argv)} ended with {code}, not SIGKILL\n"
        f"stdout: {stdout}\nstderr: {stderr}")


def kill_info(root: Path) -> dict | None:
    path = root / "kill.json"
    return json.loads(path.read_text()) if path.exists() else None


# -- checking the promise after a kill -----------------------------------------------
def c_images(unit: StorageUnit) -> list[np.ndarray]:
    return [unit.volume(f"C{i}").read(0, cc.N_TRACKS * cc.TRACK) for i in range(N)]


def check_secondary_alone(root: Path) -> tuple[int, list[str]]:
    """Open the secondary unit without its primary: every C reads as one CG."""
    with StorageUnit(cc.unit_dirs(root)[1]) as u2:
        assert u2.sessions == {}                  # needs the primary unit to come back
        by_target = {fc.target.name: fc for fc in u2.flashcopies}
        fcs = [by_target[f"C{i}"] for i in range(N)]
        assert not any(fc.revertible for fc in fcs), fcs
        seqs = {fc.sequence for fc in fcs}
        assert len(seqs) == 1, f"C volumes carry different CG sequences: {fcs}"
        seq = seqs.pop()
        assert_images(root, seq, c_images(u2))
        return seq, list(u2.recovered)


def assert_images(root: Path, seq: int, images) -> None:
    snap = cc.load_snapshot(root, seq)
    for i, got in enumerate(images):
        if not np.array_equal(got, snap[i]):
            bad = sorted(set((np.flatnonzero(got != snap[i]) // cc.TRACK).tolist()))
            raise AssertionError(f"C{i} differs from CG {seq} on tracks {bad}")


def check(root: Path, secondary_first: bool) -> tuple[int, list[str]]:
    """Reopen the units after a kill and check the promise; then form one
    more CG in this process (snapshot recorded like the child's). Returns
    the CG sequence the C volumes held, and what opening had to resolve."""
    p, s = cc.unit_dirs(root)
    if secondary_first:
        seq, recovered = check_secondary_alone(root)
    u1, u2 = StorageUnit(p), StorageUnit(s)
    try:
        if not secondary_first:
            recovered = list(u2.recovered)
        else:
            assert u2.recovered == []             # resolved by the first open
        gm = u2.session(cc.SESSION)
        assert all(not t.fc.revertible for t in gm.triplets)
        assert all(not t.b.write_inhibited for t in gm.triplets)
        seqs = set(gm.c_sequences)
        assert len(seqs) == 1, f"C volumes carry different CG sequences: {gm.c_sequences}"
        got = seqs.pop()
        if secondary_first:
            assert got == seq
        seq = got
        assert gm.stats.sequence == seq
        assert_images(root, seq, c_images(u2))
        # the restored session still mirrors A exactly: nothing a kill left
        # half-sent is missing from the out-of-sync bitmaps
        gm.on_coordinate = cc.recorder(root, gm)
        res = gm.form_consistency_group()
        assert res.committed, res
        assert gm.c_sequences == [res.sequence] * N
        a_now = [t.a.read(0, t.a.capacity) for t in gm.triplets]
        assert_images(root, res.sequence, a_now)
        assert_images(root, res.sequence, c_images(u2))
    finally:
        u2.close()
        u1.close()
    if not secondary_first:
        seq2, rec2 = check_secondary_alone(root)
        assert (seq2, rec2) == (res.sequence, [])
    return seq, recovered


# What each named point implies: is the CG in flight committed after
# reopening, and what must opening resolve ("committed"/"reverted" on how
# many volumes, or nothing)?
EXPECT = {
    "prepare": (False, None),        # killed inside the prepare transaction: nothing recorded
    "decision": (True, ("committed", N)),
    "commit": (True, ("committed", N)),
    "revert": (False, ("reverted", N - 1)),   # one prepare failed, so N-1 were prepared
    "resolve": (False, ("reverted", None)),   # part reverted by the session before the kill
    "drain": (False, None),
    "link": (False, None),
    "cow": (False, None),
    "coordinate": (False, None),
}

CASES = ([("prepare", i) for i in range(N)] + [("commit", i) for i in range(N)]
         + [("revert", i) for i in range(N)] + [("resolve", 1), ("resolve", 2)]
         + [("decision", 0), ("drain", 0), ("link", 0), ("cow", 0), ("coordinate", 0)])


@pytest.mark.parametrize("point, index", CASES, ids=[f"{p}{i}" for p, i in CASES])
def test_kill_at_named_point(tmp_path, point, index):
    rng = np.random.default_rng(sum(map(ord, point)) * 10 + index)
    committed_before = 0
    for rnd in range(ROUNDS):
        idx = index if point not in ("drain", "cow") else (index + rnd) % N
        if point == "link":
            after = int(rng.integers(0, 40))
        elif point == "cow":
            after = int(rng.integers(0, 30))
        else:
            after = 0 if rnd == 0 else int(rng.integers(0, 5))
        # copy-on-write also happens in the Global Copy drains between CGs
        interval = 0.005 if point == "cow" and rnd % 2 else 0.0
        TALLY[point][0] += 1
        run_child(tmp_path, point=point, index=idx, after=after, seed=rnd,
                  cg_interval=interval)
        info = kill_info(tmp_path)
        assert info is not None and info["point"] == point, info
        seq, recovered = check(tmp_path, secondary_first=rnd % 2 == 0)
        in_flight_commits, resolution = EXPECT[point]
        assert info["committed"] >= committed_before
        if in_flight_commits:
            assert seq == info["sequence"], (info, seq)
        else:
            assert seq == info["committed"], (info, seq)
        if resolution is None:
            assert recovered == [], recovered
        else:
            verb, count = resolution
            assert len(recovered) == 1 and recovered[0].startswith(
                f"session {cc.SESSION}: CG {info['sequence']} {verb} on "), recovered
            if count is not None:
                assert f" on {count} of {N} volumes" in recovered[0], recovered
        committed_before = seq + 1                # the parent's CG
        TALLY[point][1] += 1


# the secondary unit's statements of two CGs and a bit (about 8 per CG)
STATEMENTS = int(os.environ.get("FASTFC_CRASH_STATEMENTS", "18"))


def test_kill_between_any_two_statements_of_a_cg(tmp_path):
    """Killed before each of the secondary unit's SQL statements in turn
    (its transactions: the prepare batch and the decision, the commit batch
    and the counters, a fold of the FlashCopy log; at durability "process"
    the statements kept for the CG journal and each append to it): every C
    comes back on one CG, the one in flight or the one before it."""
    committed_before = 0
    killed_at = []
    for k in range(STATEMENTS):
        TALLY["statement"][0] += 1
        run_child(tmp_path, point="statement", after=k, seed=k)
        info = kill_info(tmp_path)
        assert info is not None and info["point"] == "statement", info
        killed_at.append(info["sql"].split("=")[0])
        seq, _ = check(tmp_path, secondary_first=k % 2 == 0)
        assert info["committed"] >= committed_before
        assert seq in (info["committed"], info["sequence"]), (info, seq)
        committed_before = seq + 1                # the parent's CG
        TALLY["statement"][1] += 1
    # the kills met the batch record (the FlashCopy log), both steps of a CG
    assert sum("flash_log" in s for s in killed_at) >= 2, killed_at


@pytest.mark.parametrize("point", ["drain", "cow", "decision", "commit"])
def test_kill_at_named_point_with_durability_power(tmp_path, point, monkeypatch):
    """The kill-anywhere guarantee at durability "power" too: its ordered
    drain (change bits, then C's copy-on-write data, then the cleared bits,
    each synced) and synced decision change what reaches the disk, not what
    a killed process leaves."""
    monkeypatch.setenv("FASTFC_CRASH_DURABILITY", "power")
    rng = np.random.default_rng(sum(map(ord, point)))
    after = int(rng.integers(0, 4)) if point in ("drain", "cow") else 0
    run_child(tmp_path, point=point, index=1, after=after, seed=7)
    info = kill_info(tmp_path)
    assert info is not None and info["point"] == point, info
    seq, _ = check(tmp_path, secondary_first=True)
    in_flight_commits, _ = EXPECT[point]
    assert seq == (info["sequence"] if in_flight_commits else info["committed"]), (info, seq)


# Killed while the session recovers at the remote site (failover, fast reverse
# restore C -> B) or closes (each C first takes, by FlashCopy's copy path, the
# tracks it still reads from B), after a loop with Global Copy between CGs
# under host writes: (then, point, durability). "barrier" is each sync of the
# "power" ordering; "copy" is between the copies of close (on_copy); "cow" is
# after a copy into C, before its bits clear; "none" kills right after.
ENDINGS = [("recover", "none", "process"), ("recover", "none", "power"),
           ("recover", "barrier", "power"), ("close", "copy", "process"),
           ("close", "copy", "power"), ("close", "cow", "power"),
           ("close", "barrier", "power"), ("loop", "barrier", "power")]


def check_ending(root: Path, then: str, info: dict) -> None:
    """After a kill in recovery or close: every C reads the last committed CG;
    a recovery finished after the reopen leaves every B on it too; a close
    finished after the reopen leaves every C on it."""
    seq = info["committed"]
    p, s = cc.unit_dirs(root)
    with StorageUnit(p) as u1, StorageUnit(s) as u2:
        assert_images(root, seq, c_images(u2))
        if then == "recover":
            gm = u2.session(cc.SESSION)
            assert gm.recover() == seq       # again: the B volumes restored before are kept
            assert_images(root, seq, [t.b.read(0, t.b.capacity) for t in gm.triplets])
        elif cc.SESSION in u2.sessions:
            u2.session(cc.SESSION).close()
        assert_images(root, seq, c_images(u2))


@pytest.mark.parametrize("then, point, durability", ENDINGS,
                         ids=[f"{t}-{p}-{d}" for t, p, d in ENDINGS])
def test_kill_while_the_session_recovers_or_closes(tmp_path, then, point, durability,
                                                   monkeypatch):
    monkeypatch.setenv("FASTFC_CRASH_DURABILITY", durability)
    points = []
    for rnd in range(2):
        root = tmp_path / f"round{rnd}"
        root.mkdir()
        TALLY[f"{then}/{point}/{durability}"][0] += 1
        run_child(root, point=point, index=rnd, after=rnd * 2, seed=rnd,
                  cg_interval=0.005, then=then)
        info = kill_info(root)
        assert info is not None and info["point"] in (point, f"after {then}"), info
        points.append(info["point"])
        if then == "loop":
            seq, _ = check(root, secondary_first=rnd == 0)
            assert seq >= info["committed"], (info, seq)
        else:
            check_ending(root, then, info)
        TALLY[f"{then}/{point}/{durability}"][1] += 1
    if point != "none":      # the point was reached (not only the kill after the step)
        assert point in points, points


def test_kill_at_random_moments(tmp_path):
    """Random moments after the child is READY; every fourth kill is not
    checked, and the next child is killed early (from its start, maybe while
    it opens the units and resolves what the previous kill interrupted)."""
    rng = np.random.default_rng(2024)
    last = 0
    unchecked = 0
    for rnd in range(RANDOM_KILLS):
        TALLY["random"][0] += 1
        early = rnd % 4 == 0 and rnd > 0
        run_child(tmp_path, seed=100 + rnd, early_kill=early,
                  kill_after=float(rng.uniform(0.02, 0.6)),
                  cg_interval=(0.0, 0.002, 0.01)[rnd % 3])
        unchecked += 1
        if rnd % 4 == 3 and rnd != RANDOM_KILLS - 1:
            continue
        seq, recovered = check(tmp_path, secondary_first=rnd % 2 == 0)
        assert seq >= last, "a committed CG was lost"
        last = seq + 1
        TALLY["random"][1] += unchecked
        unchecked = 0


# -- a live failover killed between its two units' writes ------------------------------


@pytest.mark.parametrize("durability", ["process", "power"])
@pytest.mark.parametrize("victim", ["primary", "secondary"])
def test_kill_between_the_two_units_writes_of_a_failover(tmp_path, victim, durability):
    """``PPRCPair.failover()`` with both units open writes each unit's store:
    A's pair row (failed over) and B's flags and record of the failover. A
    kill at the first write to one unit (``victim``) leaves the other's half
    recorded alone, or neither. Reopened, the two units agree: the pair is
    failed over and B takes host writes (recorded for failback), or it is
    not and B is still a secondary. A half failover recorded by A alone left
    B a secondary under a failed-over pair: its host writes refused."""
    import failover_child as fc
    code, out, err = finish_child(*start_child(
        "failover_child", ["--root", str(tmp_path), "--victim", victim,
                           "--durability", durability]), timeout=120)
    assert code == -signal.SIGKILL, (code, out, err)
    with StorageUnit(tmp_path / "primary", durability=durability) as u1, \
            StorageUnit(tmp_path / "secondary", durability=durability) as u2:
        a, b = u1.volume("A"), u2.volume("B")
        pairs = u1.pairs
        assert len(pairs) == 1 and not u2.pairs
        pair = pairs[0]
        assert (pair.primary, pair.secondary) == (a, b)
        assert b.is_secondary is not pair.failed_over, (pair, b.is_secondary)
        b_image = b.read(0, b.capacity)
        if not pair.failed_over:
            pair.failover()
        b.write(5 * fc.TRACK, fc.data(50, fc.TRACK))      # a host write at B
        b_image[5 * fc.TRACK:6 * fc.TRACK] = fc.data(50, fc.TRACK)
        pair.failback()
        # B's write, and A's tracks B never had, go from B to A
        assert set(pair.oos.set_indices().tolist()) >= {5, *fc.OWED}
        pair.drain()
        assert np.array_equal(b.read(0, b.capacity), b_image)
        assert np.array_equal(a.read(0, a.capacity), b_image)


@pytest.mark.parametrize("alone", [False, True], ids=["both", "alone"])
@pytest.mark.parametrize("durability", ["process", "power"])
@pytest.mark.parametrize("index", [0, 1])
def test_kill_before_a_restore_of_recover_then_recover_again(tmp_path, index, durability,
                                                             alone):
    """``GlobalMirror.recover()`` killed before the fast reverse restore of
    triplet ``index``: reopened, a B not yet restored still refuses host
    writes (it holds no CG image), and recover() run again restores it
    while a B restored before keeps the host writes it took since (a second
    recover() threw them away, restoring that B from its C again). At the
    secondary alone (``alone``), recover_session restores every B not yet
    restored (it skipped a B failed over but not restored)."""
    import failover_child as fc
    code, out, err = finish_child(*start_child(
        "failover_child", ["--root", str(tmp_path), "--session", "--index", str(index),
                           "--durability", durability]), timeout=120)
    assert code == -signal.SIGKILL, (code, out, err)
    cg = np.load(tmp_path / "cg.npy")
    if alone:       # the primary site lost now: recovery at the secondary alone
        with StorageUnit(tmp_path / "secondary", durability=durability) as u2:
            B = [u2.volume(f"B{i}") for i in range(2)]
            assert [b.is_secondary for b in B] == [i >= index for i in range(2)]
            assert u2.recover_session("g") == 2
            for b, want in zip(B, cg):
                assert np.array_equal(b.read(0, b.capacity), want)
        return
    with StorageUnit(tmp_path / "primary", durability=durability) as u1, \
            StorageUnit(tmp_path / "secondary", durability=durability) as u2:
        gm = u2.session("g")
        B = [t.b for t in gm.triplets]
        assert [b.is_secondary for b in B] == [i >= index for i in range(2)]
        for i in range(index):                    # restored: on the CG, writable
            assert np.array_equal(B[i].read(0, B[i].capacity), cg[i])
            B[i].write(5 * fc.TRACK, fc.data(60 + i, fc.TRACK))
            cg[i][5 * fc.TRACK:6 * fc.TRACK] = fc.data(60 + i, fc.TRACK)
        assert gm.recover() == 2
        for b, want in zip(B, cg):
            assert not b.is_secondary
            assert np.array_equal(b.read(0, b.capacity), want)
        for t in gm.triplets:                     # and failback makes A == B
            t.pair.failback()
            t.pair.drain()
            assert np.array_equal(t.a.read(0, t.a.capacity), t.b.read(0, t.b.capacity))
