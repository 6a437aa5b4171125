"""``fastfc serve`` through real NBD clients: qemu-io, qemu-img, nbdcopy,
nbdinfo and fio (its nbd engine).

Most tests run ``fastfc -u UNIT serve`` as a subprocess on a unit in
tmp_path, with the copy services set up by the command line before it
starts. Those that change copy services *while* clients do I/O serve
in-process (:class:`fastfc.tools.cli.serve.Server`, the very object the
command runs) and drive the library under the server's lock, as the
control socket does; the last ones drive a running ``fastfc serve`` through
the command line (tests/test_control.py checks that path command by
command).

The client tools come from apt (qemu-utils, libnbd-bin, fio, nbdkit). A
missing tool skips a test on a developer machine and fails it, naming the
package, under ``CI``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

import fastfc
from fastfc import StorageUnit
from fastfc.tools.cli.serve import Server
from fastfc.tools.cli.units import Units

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"qemu-io": "qemu-utils", "qemu-img": "qemu-utils", "nbdcopy": "libnbd-bin",
            "nbdinfo": "libnbd-bin", "fio": "fio"}
MIB = 1 << 20


def need(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if not missing:
        return
    pkgs = sorted({PACKAGES[t] for t in missing})
    msg = (f"{', '.join(missing)} not installed: apt-get install {' '.join(pkgs)} "
           "(.ci/run does it)")
    if os.environ.get("CI"):
        pytest.fail(msg)
    pytest.skip(msg)


def fastfc_cli(*args, check=True) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-m", "fastfc", *map(str, args)], env=env,
                       capture_output=True, text=True, timeout=120)
    if check:
        assert r.returncode == 0, (args, r.stdout, r.stderr)
    return r


def run(*cmd, check=True, timeout=120) -> subprocess.CompletedProcess:
    r = subprocess.run(list(map(str, cmd)), capture_output=True, text=True, timeout=timeout)
    if check:
        assert r.returncode == 0, (cmd, r.stdout, r.stderr)
    return r


def uri(sock: Path, name: str) -> str:
    return f"nbd+unix:///{name}?socket={sock}"


def wait_for(path: Path, proc: subprocess.Popen | None = None, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"serve exited with {proc.returncode}: "
                                 f"{proc.stderr.read() if proc.stderr else ''}")
        assert time.monotonic() < deadline, f"no socket {path} after {timeout}s"
        time.sleep(0.02)


@contextmanager
def serving(unit: Path, sock: Path, *extra, remote: Path | None = None, stop=signal.SIGTERM):
    """``fastfc -u unit serve --socket sock`` as a subprocess (its own
    process group); stopped with ``stop`` and checked to exit 0."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    opts = ["-u", str(unit)] + (["-r", str(remote)] if remote else [])
    proc = subprocess.Popen([sys.executable, "-m", "fastfc", *opts, "serve", "--socket",
                             str(sock), *map(str, extra)], env=env, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        wait_for(sock, proc)
        yield proc
        if stop is not None and proc.poll() is None:
            proc.send_signal(stop)
        if stop == signal.SIGTERM:
            assert proc.wait(timeout=60) == 0, proc.stderr.read() if proc.stderr else ""
            assert not sock.exists()     # the socket goes with the server
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)


@contextmanager
def serving_here(unit: Path, sock: Path, remote: Path | None = None):
    """The server of ``fastfc serve``, in this process: the test drives the
    library under ``server.lock`` while real clients do I/O."""
    units = Units(str(unit), str(remote) if remote else None)
    try:
        server = Server(units)
        server.nbd.listen_unix(str(sock))
        server.nbd.start()
        try:
            yield server
        finally:
            server.nbd.stop()
            server.flush()
    finally:
        units.close()


def make_unit(path: Path, *names: str, size: int = 4 * MIB, track_size: int = 65536) -> None:
    with StorageUnit(path) as u:
        for n in names:
            u.create_volume(n, size // track_size, track_size)


def volume_bytes(unit: Path, name: str) -> np.ndarray:
    with StorageUnit(unit, readonly=True) as u:
        v = u.volume(name)
        return v.read(0, v.capacity)


def qemu_io(sock: Path, name: str, *cmds: str, check=True,
            read_only=False) -> subprocess.CompletedProcess:
    args = ["qemu-io", "-f", "raw"] + (["-r"] if read_only else [])
    for c in cmds:
        args += ["-c", c]
    r = run(*args, uri(sock, name), check=False)
    if check:
        assert r.returncode == 0 and "fail" not in (r.stdout + r.stderr).lower(), \
            (cmds, r.stdout, r.stderr)
    return r


# -- the protocol ----------------------------------------------------------------------
def test_list_info_and_unknown_export(tmp_path):
    need("nbdinfo")
    unit, sock = tmp_path / "u", tmp_path / "s"
    make_unit(unit, "alpha", "beta", size=2 * MIB)
    with serving(unit, sock):
        out = run("nbdinfo", "--list", "--json", uri(sock, "")).stdout
        names = re.findall(r'"export-name": "([^"]*)"', out)
        assert sorted(names) == ["alpha", "beta"]
        info = run("nbdinfo", uri(sock, "beta")).stdout
        assert "export-size: 2097152" in info
        assert re.search(r"is_read_only: false", info)
        assert re.search(r"can_flush: true", info) and re.search(r"can_fua: true", info)
        assert re.search(r"can_multi_conn: true", info)
        assert re.search(r"can_zero: true", info) and re.search(r"can_trim: false", info)
        r = run("nbdinfo", uri(sock, "gamma"), check=False)
        assert r.returncode != 0 and "gamma" in r.stderr
        assert oct(sock.stat().st_mode & 0o777) == "0o600"


def test_qemu_io_patterns_and_qemu_img(tmp_path):
    need("qemu-io", "qemu-img")
    unit, sock = tmp_path / "u", tmp_path / "s"
    make_unit(unit, "V", size=4 * MIB)
    ref = tmp_path / "ref.raw"
    with serving(unit, sock):
        qemu_io(sock, "V", "write -P 0x11 0 1M", "write -P 0x22 1M 64k",
                "write -P 0x33 1000000 3333", "write -z 2M 512k", "writev -P 0x44 3M 4k 4k",
                "flush")
        qemu_io(sock, "V", "read -P 0x11 0 999999", "read -P 0x33 1000000 3333",
                "read -P 0x22 1M 64k", "read -P 0 2M 1M", "read -P 0x44 3M 8k")
        r = qemu_io(sock, "V", "read -P 0x99 0 4k", check=False)
        assert "Pattern verification failed" in r.stdout + r.stderr
        run("qemu-img", "convert", "-f", "raw", "-O", "raw", uri(sock, "V"), ref)
        run("qemu-img", "compare", "-f", "raw", "-F", "raw", ref, uri(sock, "V"))
        ref2 = tmp_path / "ref2.raw"
        data = np.random.default_rng(1).integers(0, 256, 4 * MIB, dtype=np.uint8)
        data.tofile(ref2)
        run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", ref2, uri(sock, "V"))
        run("qemu-img", "compare", "-f", "raw", "-F", "raw", ref2, uri(sock, "V"))
    assert np.array_equal(volume_bytes(unit, "V"), data)   # SIGTERM kept every write


@pytest.mark.slow
def test_nbdcopy_multi_conn_in_and_out(tmp_path):
    need("nbdcopy", "nbdinfo")
    unit, sock = tmp_path / "u", tmp_path / "s"
    size = 32 * MIB
    make_unit(unit, "V", size=size)
    src, back = tmp_path / "src.raw", tmp_path / "back.raw"
    data = np.random.default_rng(2).integers(0, 256, size, dtype=np.uint8)
    data[5 * MIB: 7 * MIB] = 0              # a zero run (nbdcopy may zero it)
    data.tofile(src)
    with serving(unit, sock):
        run("nbdcopy", "--connections=4", "--requests=16", src, uri(sock, "V"))
        run("nbdcopy", "--connections=4", back, uri(sock, "V"), check=False)  # wrong way
        run("nbdcopy", "--connections=4", uri(sock, "V"), back)
        assert back.read_bytes() == src.read_bytes()
    assert np.array_equal(volume_bytes(unit, "V"), data)


@pytest.mark.slow
def test_fio_nbd_engine_with_verify(tmp_path):
    need("fio")
    unit, sock = tmp_path / "u", tmp_path / "s"
    make_unit(unit, "V", size=16 * MIB)
    with serving(unit, sock):
        for rw, bs in (("randwrite", "4k"), ("write", "256k")):
            r = run("fio", "--name=v", "--ioengine=nbd", f"--uri={uri(sock, 'V')}",
                    f"--rw={rw}", f"--bs={bs}", "--iodepth=16", "--size=16M",
                    "--verify=crc32c", "--verify_state_save=0", "--do_verify=1",
                    "--verify_fatal=1", check=False)
            assert r.returncode == 0, r.stdout + r.stderr
            assert "verify" not in r.stderr.lower(), r.stderr


@pytest.mark.slow
# -- the I/O semantics -----------------------------------------------------------------
def test_write_inhibited_volume_fails_with_eperm(tmp_path):
    need("qemu-io")
    unit, sock = tmp_path / "u", tmp_path / "s"
    make_unit(unit, "S", "T", size=MIB)
    fastfc_cli("-u", unit, "mkflash", "--nocp", "--record", "S:T")
    fastfc_cli("-u", unit, "resyncflash", "--revertible", "S:T")   # S write-inhibited
    before = volume_bytes(unit, "S")
    with serving(unit, sock):
        for name in ("S", "T"):        # the source, and the target of a revertible FC
            r = qemu_io(sock, name, "write -P 0x55 0 64k", check=False)
            assert "Operation not permitted" in r.stdout + r.stderr, (name, r.stdout, r.stderr)
        r = qemu_io(sock, "S", "write -z 0 64k", check=False)
        assert "Operation not permitted" in r.stdout + r.stderr
        qemu_io(sock, "S", "read -P 0 0 1M")
    assert np.array_equal(volume_bytes(unit, "S"), before)     # nothing landed

@pytest.mark.slow

def test_invalid_image_read_fails_with_eio(tmp_path):
    need("qemu-io")
    unit, sock = tmp_path / "u", tmp_path / "s"
    make_unit(unit, "S", "T", size=MIB)
    fastfc_cli("-u", unit, "mkflash", "--nocp", "S:T")
    fastfc_cli("-u", unit, "rmflash", "--force", "S:T")          # T: no valid image
    with serving(unit, sock):
        r = qemu_io(sock, "T", "read 0 4k", check=False)
        assert "Input/output error" in r.stdout + r.stderr, (r.stdout, r.stderr)
        qemu_io(sock, "S", "read -P 0 0 4k")
        qemu_io(sock, "T", "write -P 0x66 0 1M")         # a whole write makes it valid
        qemu_io(sock, "T", "read -P 0x66 0 1M")

@pytest.mark.slow

def test_secondaries_and_c_volumes_are_read_only(tmp_path):
    need("qemu-io", "nbdinfo")
    a, b, sock = tmp_path / "a", tmp_path / "b", tmp_path / "s"
    make_unit(a, "A0", size=MIB)
    make_unit(b, "B0", "C0", size=MIB)
    fastfc_cli("-u", a, "-r", b, "mkgmir", "S", "A0:B0:C0")
    fastfc_cli("-u", a, "-r", b, "formcg", "S")
    with serving(a, sock, remote=b):
        names = re.findall(r'"export-name": "([^"]*)"',
                           run("nbdinfo", "--list", "--json", uri(sock, "")).stdout)
        assert sorted(names) == ["A0", "B0", "C0"]
        for name, ro in (("A0", "false"), ("B0", "true"), ("C0", "true")):
            assert f"is_read_only: {ro}" in run("nbdinfo", uri(sock, name)).stdout, name
        for name in ("B0", "C0"):
            r = qemu_io(sock, name, "write -P 1 0 4k", check=False)   # refused at open
            assert r.returncode != 0 and "Permission denied" in r.stderr, (name, r.stderr)
            qemu_io(sock, name, "read -P 0 0 4k", read_only=True)
        qemu_io(sock, "A0", "write -P 0x77 0 64k")


def test_cow_seen_through_target_and_flashcopy_while_writing(tmp_path):
    need("qemu-io", "nbdcopy", "fio")
    unit, sock = tmp_path / "u", tmp_path / "s"
    make_unit(unit, "S", "T", "T2", size=4 * MIB)
    with serving_here(unit, sock) as server:
        qemu_io(sock, "S", "write -P 0x11 0 4M")
        with server.lock:
            u = server.units.local()
            fc = fastfc.FlashCopy(u.volume("S"), u.volume("T"), background_copy=False)
        qemu_io(sock, "S", "write -P 0x22 64k 128k", "write -P 0x23 3M 5")
        qemu_io(sock, "T", "read -P 0x11 0 4M")           # the point-in-time image
        qemu_io(sock, "S", "read -P 0x22 64k 128k", "read -P 0x11 0 64k")
        # copy-on-write moved tracks 1 and 2 whole and one 4 KiB grain of
        # track 48, which still has grains to copy
        assert fc.tracks_to_copy == 64 - 2
        assert u.volume("T").copied_bytes == 2 * 65536 + 4096

        # a FlashCopy established while a client writes: T2 holds S's
        # image of the establish instant (taken with S's writes held)
        writer = subprocess.Popen(["fio", "--name=w", "--ioengine=nbd",
                                   f"--uri={uri(sock, 'S')}", "--rw=randwrite", "--bs=4k",
                                   "--iodepth=8", "--size=4M", "--time_based",
                                   "--runtime=1.5"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            time.sleep(0.5)
            with server.lock:
                S, T2 = u.volume("S"), u.volume("T2")
                S._lock()           # S's writes held: its image of this instant
                try:
                    image = S.read(0, S.capacity)
                    fastfc.FlashCopy(S, T2, background_copy=False)
                finally:
                    S._unlock()
        finally:
            assert writer.wait(timeout=60) == 0
        assert not np.array_equal(S.read(0, S.capacity), image)   # writes went on after
        out = tmp_path / "t2.raw"
        run("nbdcopy", uri(sock, "T2"), out)
        assert np.array_equal(np.fromfile(out, np.uint8), image)


@pytest.mark.slow
def test_global_mirror_forms_cgs_while_fio_writes_with_verify(tmp_path):
    need("fio", "nbdcopy")
    a, b, sock = tmp_path / "a", tmp_path / "b", tmp_path / "s"
    make_unit(a, "A0", "A1", size=8 * MIB)
    make_unit(b, "B0", "B1", "C0", "C1", size=8 * MIB)
    fastfc_cli("-u", a, "-r", b, "mkgmir", "S", "A0:B0:C0", "A1:B1:C1")
    fastfc_cli("-u", a, "-r", b, "formcg", "S")
    with serving_here(a, sock, remote=b) as server:
        with server.lock:
            gm = server.units.session("S")
        results = []
        done = threading.Event()

        def form():
            while not done.is_set():
                results.append(gm.form_consistency_group().committed)

        t = threading.Thread(target=form)
        t.start()
        procs = [subprocess.Popen(
            ["fio", "--name=v", "--ioengine=nbd", f"--uri={uri(sock, name)}",
             "--rw=randwrite", "--bs=4k", "--iodepth=16", "--size=8M", "--verify=crc32c",
             "--verify_state_save=0",
             "--do_verify=1", "--verify_fatal=1"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for name in ("A0", "A1")]
        try:
            for p in procs:
                out, _ = p.communicate(timeout=120)
                assert p.returncode == 0, out
        finally:
            done.set()
            t.join()
        assert sum(results) >= 2, results        # CGs committed under the writes
        with server.lock:
            assert gm.form_consistency_group().committed
            assert len(set(gm.c_sequences)) == 1
        for name, c in (("A0", "C0"), ("A1", "C1")):   # quiet now: C == A
            pa, pc = tmp_path / f"{name}.raw", tmp_path / f"{c}.raw"
            run("nbdcopy", uri(sock, name), pa)
            run("nbdcopy", uri(sock, c), pc)
            assert pa.read_bytes() == pc.read_bytes()


def test_volume_created_and_removed_while_serving(tmp_path):
    need("qemu-io", "nbdinfo")
    unit, sock = tmp_path / "u", tmp_path / "s"
    make_unit(unit, "V", size=MIB)
    with serving_here(unit, sock) as server:
        with server.lock:
            server.units.local().create_volume("NEW", 16)
        qemu_io(sock, "NEW", "write -P 0x12 0 1M", "read -P 0x12 0 1M")
        # a client holding NEW open while it is removed gets errors
        client = subprocess.Popen(["qemu-io", "-f", "raw", uri(sock, "NEW")],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True)
        client.stdin.write("read -P 0x12 0 4k\n")
        client.stdin.flush()
        time.sleep(0.5)
        with server.lock:
            server.units.local().remove_volume("NEW")
        out, _ = client.communicate("read 0 4k\nwrite -P 1 0 4k\nquit\n", timeout=60)
        assert "read 4096/4096" in out
        assert out.count("failed") >= 2 and "Cannot send after transport endpoint" in out, out
        r = run("nbdinfo", uri(sock, "NEW"), check=False)
        assert r.returncode != 0
        names = re.findall(r'"export-name": "([^"]*)"',
                           run("nbdinfo", "--list", "--json", uri(sock, "")).stdout)
        assert names == ["V"]


# -- stopping ------------------------------------------------------------------------
@pytest.mark.slow
def test_sigkill_keeps_completed_writes_and_one_cg(tmp_path):
    need("qemu-io")
    a, b, sock = tmp_path / "a", tmp_path / "b", tmp_path / "s"
    make_unit(a, "A0", "A1", "X", size=MIB)
    make_unit(b, "B0", "B1", "C0", "C1", size=MIB)
    fastfc_cli("-u", a, "-r", b, "mkgmir", "S", "A0:B0:C0", "A1:B1:C1")
    fastfc_cli("-u", a, "-r", b, "formcg", "S")
    with serving(a, sock, remote=b, stop=signal.SIGKILL):
        qemu_io(sock, "X", "write -P 0x31 0 512k")
        qemu_io(sock, "A0", "write -P 0x32 0 64k")
        qemu_io(sock, "A1", "write -P 0x33 4k 4k")
    assert not (np.any(volume_bytes(a, "X")[512 * 1024:]))
    assert np.all(volume_bytes(a, "X")[:512 * 1024] == 0x31)
    assert np.all(volume_bytes(a, "A0")[:65536] == 0x32)
    assert np.all(volume_bytes(a, "A1")[4096:8192] == 0x33)
    show = json.loads(fastfc_cli("-u", a, "-r", b, "showgmir", "S", "--json").stdout)
    assert show["c_sequences"] == [1, 1]          # every C on one CG
    fastfc_cli("-u", a, "-r", b, "formcg", "S")       # the A writes reach C
    assert np.all(volume_bytes(b, "C0")[:65536] == 0x32)
    assert np.all(volume_bytes(b, "C1")[4096:8192] == 0x33)

@pytest.mark.slow

def test_serve_refuses_bad_options(tmp_path):
    unit = tmp_path / "u"
    make_unit(unit, "V", size=MIB)
    r = fastfc_cli("-u", unit, "serve", check=False)
    assert r.returncode == 2 and "--socket" in r.stderr
    r = fastfc_cli("-u", unit, "serve", "--port", "0", "--bind", "0.0.0.0",
                   "--allow-plain-tcp", check=False)
    assert r.returncode == 1 and "--allow-remote-plain" in r.stderr
    psk = tmp_path / "psk"
    psk.write_text("x")
    r = fastfc_cli("-u", unit, "serve", "--socket", tmp_path / "s", "--tls-psk", psk,
                   check=False)
    assert r.returncode == 1 and "PSK" in r.stderr
    notsock = tmp_path / "file"
    notsock.write_text("keep me")
    r = fastfc_cli("-u", unit, "serve", "--socket", notsock, check=False)
    assert r.returncode == 1 and "not a socket" in r.stderr
    assert notsock.read_text() == "keep me"


def test_sigterm_with_clients_connected(tmp_path):
    """SIGTERM while a client holds a connection: the server answers what is
    in flight, closes the connection, flushes, closes the unit, exits 0."""
    need("qemu-io")
    unit, sock = tmp_path / "u", tmp_path / "s"
    make_unit(unit, "V", size=MIB)
    with serving(unit, sock, stop=None) as proc:
        client = subprocess.Popen(["qemu-io", "-f", "raw", uri(sock, "V")],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True)
        client.stdin.write("write -P 0x42 0 256k\n")
        client.stdin.flush()
        deadline = time.monotonic() + 30
        while not np.all(volume_bytes_live(unit, proc) == 0x42):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, proc.stderr.read()
        out, _ = client.communicate("read -P 0x42 0 4k\nquit\n", timeout=30)
        assert "wrote 262144/262144" in out and "read 4096/4096" not in out, out
    assert not sock.exists()
    assert np.all(volume_bytes(unit, "V")[:256 * 1024] == 0x42)


def volume_bytes_live(unit: Path, proc) -> np.ndarray:
    """The first 256 KiB of V while the server holds the unit (read from the
    volume file: the server's mapping shares its pages)."""
    assert proc.poll() is None
    return np.fromfile(unit / "volumes" / "V.vol", np.uint8, count=256 * 1024)


@pytest.mark.slow
# -- the command line driving the live server (through its control socket) ------------
def test_cli_drives_flashcopy_between_client_writes(tmp_path):
    need("qemu-io")
    unit, sock = tmp_path / "u", tmp_path / "s"
    make_unit(unit, "S", "T", size=MIB)
    with serving(unit, sock):
        qemu_io(sock, "S", "write -P 0x11 0 1M")
        fastfc_cli("-u", unit, "mkflash", "--nocp", "--record", "S:T")
        qemu_io(sock, "S", "write -P 0x22 0 64k")
        qemu_io(sock, "T", "read -P 0x11 0 1M")                     # copy-on-write
        fastfc_cli("-u", unit, "resyncflash", "--revertible", "S:T")
        qemu_io(sock, "T", "read -P 0x22 0 64k", "read -P 0x11 64k 64k", read_only=True)
        r = qemu_io(sock, "S", "write -P 0x33 0 4k", check=False)
        assert "Operation not permitted" in r.stdout + r.stderr
        fastfc_cli("-u", unit, "revertflash", "S:T")
        qemu_io(sock, "T", "read -P 0x11 0 1M", read_only=True)    # the prior image
        qemu_io(sock, "S", "write -P 0x44 0 4k")
        fastfc_cli("-u", unit, "resyncflash", "--revertible", "S:T")
        fastfc_cli("-u", unit, "commitflash", "S:T")
        qemu_io(sock, "T", "read -P 0x44 0 4k", "read -P 0x22 4k 60k", "read -P 0x11 64k 64k")
        out = fastfc_cli("-u", unit, "lsflash", "--json").stdout
        assert json.loads(out)[0]["revertible"] is False


@pytest.mark.slow
def _fio_writes_coordinated(snaps) -> bool:
    """Whether some coordination instant recorded by ``serve_child`` has fio's
    writes (past the first MiB) in both A volumes."""
    for f in sorted(snaps.glob("[0-9]*.npy"), key=lambda p: int(p.stem), reverse=True)[:1]:
        images = np.load(f)
        return all(images[k][MIB:].any() for k in range(len(images)))
    return False

@pytest.mark.slow

def test_sigkill_while_fio_writes_and_cgs_form(tmp_path):
    """The kill-anywhere guarantee through the server: SIGKILL while fio
    writes to the A exports and CGs form; after reopening, every C is on
    one CG and equals the A images of its coordination instant, and every
    write a client saw complete is in A."""
    need("qemu-io", "fio")
    a, b, sock, snaps = tmp_path / "a", tmp_path / "b", tmp_path / "s", tmp_path / "snaps"
    make_unit(a, "A0", "A1", size=4 * MIB)
    make_unit(b, "B0", "B1", "C0", "C1", size=4 * MIB)
    fastfc_cli("-u", a, "-r", b, "mkgmir", "S", "A0:B0:C0", "A1:B1:C1")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    child = subprocess.Popen([sys.executable, str(ROOT / "tests" / "serve_child.py"), a, b,
                              sock, snaps], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert child.stdout.readline().strip() == "READY", child.stderr.read()
        qemu_io(sock, "A0", "write -P 0x51 0 64k")
        qemu_io(sock, "A1", "write -P 0x52 4k 4k")
        fios = [subprocess.Popen(
            ["fio", "--name=w", "--ioengine=nbd", f"--uri={uri(sock, n)}", "--rw=randwrite",
             "--bs=4k", "--iodepth=16", "--offset=1M", "--size=3M", "--time_based",
             "--runtime=5"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for n in ("A0", "A1")]
        # kill once CGs have carried fio's writes: a coordination instant
        # whose A images hold writes in both fio ranges (a condition, not a
        # pace: a loaded machine only takes longer to get there)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not _fio_writes_coordinated(snaps):
            time.sleep(0.1)
        time.sleep(0.3)                        # and kill while more CGs form
        os.killpg(child.pid, signal.SIGKILL)
        for f in fios:
            f.wait(timeout=60)                 # they fail: the server is gone
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
        child.wait(timeout=60)
    show = json.loads(fastfc_cli("-u", a, "-r", b, "showgmir", "S", "--json").stdout)
    seqs = set(show["c_sequences"])
    assert len(seqs) == 1 and show["successes"] >= 2, show     # every C on one CG
    n = seqs.pop()
    images = np.load(snaps / f"{n}.npy")
    assert _fio_writes_coordinated(snaps), "no CG carried fio's writes before the kill"
    assert show["bytes_drained"] > MIB, show     # the writes flowed through CGs
    for k, c in enumerate(("C0", "C1")):
        assert np.array_equal(volume_bytes(b, c), images[k]), c
    assert np.all(volume_bytes(a, "A0")[:65536] == 0x51)
    assert np.all(volume_bytes(a, "A1")[4096:8192] == 0x52)

@pytest.mark.slow

def test_plain_tcp_needs_an_explicit_flag_even_on_loopback(tmp_path):
    """Loopback is no trust boundary on a shared host: plain TCP lets every
    local user read and write every volume (the unix socket is 0600), so
    ``--port`` without TLS is refused unless ``--allow-plain-tcp`` says so,
    and the message names TLS with client certificates."""
    unit = tmp_path / "u"
    make_unit(unit, "V", size=MIB)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    for bind in ("127.0.0.1", "::1", "localhost"):
        try:
            r = subprocess.run([sys.executable, "-m", "fastfc", "-u", str(unit), "serve",
                                "--port", "0", "--bind", bind], env=env, capture_output=True,
                               text=True, timeout=30)
        except subprocess.TimeoutExpired as e:
            raise AssertionError(f"--bind {bind}: served plain TCP: {e.stderr!r}") from None
        assert r.returncode == 1, (bind, r.stderr)
        assert "--allow-plain-tcp" in r.stderr and "--tls-client-ca" in r.stderr, r.stderr
        assert "serving" not in r.stderr
    help_text = fastfc_cli("serve", "--help").stdout
    assert "--allow-plain-tcp" in help_text


def test_tcp_on_loopback(tmp_path):
    need("qemu-io", "nbdinfo")
    unit, sock = tmp_path / "u", tmp_path / "s"
    make_unit(unit, "V", size=MIB)
    with serving(unit, sock, "--port", "0", "--allow-plain-tcp") as proc:
        line = proc.stderr.readline()
        m = re.search(r"tcp 127\.0\.0\.1:(\d+)", line)
        assert m, line
        tcp = f"nbd://127.0.0.1:{m.group(1)}/V"
        r = run("qemu-io", "-f", "raw", "-c", "write -P 0x61 0 64k", "-c", "read -P 0x61 0 64k",
                tcp)
        assert "fail" not in r.stdout.lower(), r.stdout
        assert "export-size: 1048576" in run("nbdinfo", tcp).stdout
    assert np.all(volume_bytes(unit, "V")[:65536] == 0x61)
