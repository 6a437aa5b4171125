"""The diff stream (``diffflash`` | ``applydiff``): a copy elsewhere kept
equal to a FlashCopy target's image round after round, against the
engine's own image; streams cut or corrupted anywhere, then resumed; every
stream that does not fit the copy refused with nothing written; and
through a server (the stream's bytes over the control socket)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from fastfc import StorageUnit
from fastfc.tools import diffstream as ds
from fastfc.tools.cli import main

TRACK = 65536


def cli(*args, input: bytes | None = None):
    r = CliRunner().invoke(main, [str(a) for a in args], input=input)
    return r


def ok(*args, input: bytes | None = None) -> bytes:
    r = cli(*args, input=input)
    assert r.exit_code == 0, (args, r.output, r.exception)
    return r.stdout_bytes


def image_of(unit: Path, name: str) -> np.ndarray:
    with StorageUnit(unit, readonly=True) as u:
        v = u.volume(name)
        return v.read(0, v.capacity).copy()


def scribble(unit: Path, rng, k: int, name: str = "S") -> None:
    with StorageUnit(unit) as u:
        v = u.volume(name)
        for _ in range(k):
            off = int(rng.integers(0, v.capacity - 1))
            n = int(min(rng.integers(1, 3 * v.grain_size), v.capacity - off))
            v.write(off, rng.integers(0, 256, n, dtype=np.uint8))


@pytest.fixture
def unit(tmp_path):
    u = tmp_path / "u"
    ok("-u", u, "mkvol", "S", "T", "--tracks", 48)
    ok("-u", u, "mkflash", "--nocp", "--record", "S:T")
    return u


def test_a_copy_follows_the_target_round_after_round(unit, tmp_path):
    rng = np.random.default_rng(1)
    scribble(unit, rng, 20)
    img = tmp_path / "backup.img"
    ok("applydiff", "--create", img, input=ok("-u", unit, "diffflash", "--full", "S:T"))
    assert np.array_equal(np.fromfile(img, np.uint8), image_of(unit, "T"))
    for round_ in range(1, 6):
        scribble(unit, rng, int(rng.integers(0, 15)))
        if round_ == 3:
            scribble(unit, rng, 3, "T")             # the target written too
        before = np.fromfile(img, np.uint8)
        stream = ok("-u", unit, "diffflash", "S:T")
        h = ds.read_header(__import__("io").BytesIO(stream))
        assert (h.kind, h.base, h.sequence) == ("incremental", round_ - 1, round_)
        ok("applydiff", img, input=stream)
        image = image_of(unit, "T")
        assert np.array_equal(np.fromfile(img, np.uint8), image)
        assert np.array_equal(image, image_of(unit, "S"))
        # the stream carries the grains that differ, and only changed grains
        gs = h.grain
        changed = (before != image).reshape(-1, gs).any(axis=1)
        carried = ds.extents_in(h.extents, gs, changed.size)
        assert not (changed & ~carried).any()
        state = json.loads(ds.state_path(img).read_text())
        assert state["sequence"] == round_ and state["partial"] is None


@pytest.mark.parametrize("seed", range(4))
def test_a_stream_cut_or_corrupted_anywhere_resumes(unit, tmp_path, seed, monkeypatch):
    monkeypatch.setattr(ds, "SYNC_EVERY", 3 * 4096)     # progress recorded often
    rng = np.random.default_rng(seed)
    img = tmp_path / "backup.img"
    ok("applydiff", "--create", img, input=ok("-u", unit, "diffflash", "--full", "S:T"))
    scribble(unit, rng, 25)
    stream = ok("-u", unit, "diffflash", "S:T")
    before = np.fromfile(img, np.uint8)
    state_before = ds.state_path(img).read_text()
    cut = int(rng.integers(1, len(stream) - 1))
    broken = stream[:cut]
    if seed % 2:                                  # corrupt a byte instead of cutting
        broken = bytearray(stream)
        broken[cut] ^= 0xFF
        broken = bytes(broken)
    r = cli("applydiff", img, input=broken)
    assert r.exit_code == 1
    header_end = len(ds.MAGIC) + 4 + int.from_bytes(stream[12:16], "big") + 4
    if cut < header_end:                          # the header: nothing written
        assert np.array_equal(np.fromfile(img, np.uint8), before)
        assert ds.state_path(img).read_text() == state_before
        ok("applydiff", img, input=stream)
    else:
        state = json.loads(ds.state_path(img).read_text())
        assert state["partial"] and state["sequence"] == 0
        assert "--resume" in r.output
        # a fresh incremental does not fit an image in between
        resumed = ok("-u", unit, "diffflash", "S:T", "--resume", ds.state_path(img))
        ok("applydiff", img, input=resumed)
    assert np.array_equal(np.fromfile(img, np.uint8), image_of(unit, "T"))
    assert json.loads(ds.state_path(img).read_text())["sequence"] == 1


def test_streams_that_do_not_fit_the_copy_are_refused(unit, tmp_path):
    rng = np.random.default_rng(3)
    img = tmp_path / "backup.img"
    ok("applydiff", "--create", img, input=ok("-u", unit, "diffflash", "--full", "S:T"))
    scribble(unit, rng, 5)
    skipped = ok("-u", unit, "diffflash", "S:T")            # never applied
    scribble(unit, rng, 5)
    later = ok("-u", unit, "diffflash", "S:T")
    before = np.fromfile(img, np.uint8)
    state = ds.state_path(img).read_text()

    def refused(args, stream, words):
        r = cli(*args, input=stream)
        assert r.exit_code == 1 and words in r.output, r.output
        assert np.array_equal(np.fromfile(img, np.uint8), before)
        assert ds.state_path(img).read_text() == state

    refused(("applydiff", img), later, "from sequence 1 to 2, but")
    refused(("applydiff", img), b"not a stream", "not a fastfc diff stream")
    refused(("applydiff", img), b"", "empty")
    other = tmp_path / "other"
    ok("-u", other, "mkvol", "S", "X", "--tracks", 48)
    ok("-u", other, "mkflash", "--nocp", "--record", "S:X")
    refused(("applydiff", img), ok("-u", other, "diffflash", "S:X"), "a copy of T")
    small = tmp_path / "small.img"
    small.write_bytes(b"\0" * 4096)
    r = cli("applydiff", small, input=ok("-u", unit, "diffflash", "--full", "S:T"))
    assert r.exit_code == 1 and "has 4096 bytes" in r.output
    ok("applydiff", img, input=skipped)                     # in order, they fit
    ok("applydiff", img, input=later)
    assert np.array_equal(np.fromfile(img, np.uint8), image_of(unit, "T"))


def test_a_resume_of_a_target_written_since_is_refused(unit, tmp_path):
    img = tmp_path / "backup.img"
    ok("applydiff", "--create", img, input=ok("-u", unit, "diffflash", "--full", "S:T"))
    scribble(unit, np.random.default_rng(4), 30)
    stream = ok("-u", unit, "diffflash", "S:T")
    assert cli("applydiff", img, input=stream[:len(stream) // 2]).exit_code == 1
    scribble(unit, np.random.default_rng(5), 30, "T")
    r = cli("-u", unit, "diffflash", "S:T", "--resume", ds.state_path(img))
    assert r.exit_code == 1 and "written by a host" in r.output
    ok("-u", unit, "resyncflash", "S:T")
    r = cli("-u", unit, "diffflash", "S:T", "--resume", ds.state_path(img))
    assert r.exit_code == 1 and "was resynced since" in r.output
    # a full stream makes it a copy again
    ok("applydiff", img, input=ok("-u", unit, "diffflash", "--full", "S:T"))
    assert np.array_equal(np.fromfile(img, np.uint8), image_of(unit, "T"))


def test_diffflash_needs_change_recording(tmp_path):
    u = tmp_path / "u"
    ok("-u", u, "mkvol", "S", "T", "--tracks", 4)
    ok("-u", u, "mkflash", "--nocp", "S:T")
    r = cli("-u", u, "diffflash", "S:T")
    assert r.exit_code == 1 and "no change recording" in r.output


def test_a_stream_through_the_server_is_the_same(unit, tmp_path):
    """diffflash forwarded to ``fastfc serve`` sends the stream's bytes
    through the control socket: applied, the copy equals the target."""
    from test_serve import serving_here
    rng = np.random.default_rng(6)
    img = tmp_path / "backup.img"
    fastfc = Path(sys.executable).with_name("fastfc")
    with serving_here(unit, tmp_path / "nbd.sock") as server:
        from fastfc.tools.cli import control
        with control.hosting(server.units, server.lock):
            full = subprocess.run([fastfc, "-u", unit, "diffflash", "--full", "S:T"],
                                  capture_output=True, timeout=60)
            assert full.returncode == 0, full.stderr
            ok("applydiff", "--create", img, input=full.stdout)
            with server.lock:
                S = server.units.local().volume("S")
                S.write(12345, rng.integers(0, 256, 70000, dtype=np.uint8))
            inc = subprocess.run(f"{fastfc} -u {unit} diffflash S:T | {fastfc} applydiff {img}",
                                 shell=True, capture_output=True, text=True, timeout=60)
            assert inc.returncode == 0, inc.stderr
            assert "applied incremental stream of S:T" in inc.stdout
            with server.lock:
                T = server.units.local().volume("T")
                assert np.array_equal(np.fromfile(img, np.uint8), T.read(0, T.capacity))
