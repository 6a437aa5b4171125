"""Read-only opens of units whose volumes are larger than memory.

A unit opened read-only maps each volume file shared and read-only. A
private (copy-on-write) mapping, as before, is charged in full against the
kernel's commit limit, so with the default heuristic overcommit a volume
larger than RAM + swap could not be opened read-only at all (ENOMEM from
``StorageUnit(p, readonly=True)``, ``lsvol``, ``read``, ``lsflash``,
``lspprc``, ``showgmir``). The volumes here are thin (sparse files: they
cost nothing) and twice RAM + swap, at least 40 GiB.

(A per-process ``RLIMIT_AS`` cannot stand in for the commit limit: it counts
shared mappings as well, so no mapping of a volume that size fits under it.)
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from fastfc import StorageUnit

ROOT = Path(__file__).resolve().parent.parent
TRACK = 65536


def _memory_bytes() -> int:
    """RAM + swap, from /proc/meminfo."""
    total = 0
    with open("/proc/meminfo") as f:
        for line in f:
            key, value = line.split(":", 1)
            if key in ("MemTotal", "SwapTotal"):
                total += int(value.split()[0]) * 1024
    return total


BIG = max(40 << 30, 2 * _memory_bytes())
BIG_TRACKS = -(-BIG // TRACK)


def cli(*args) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "fastfc", *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=300)

@pytest.mark.slow

def test_read_only_open_of_volumes_larger_than_memory(tmp_path):
    site1, site2 = tmp_path / "site1", tmp_path / "site2"
    with StorageUnit(site1) as u1:
        big = u1.create_volume("Big", BIG_TRACKS, TRACK, thin=True)
        big.write(BIG - TRACK, b"at the end")
        u1.create_volume("A", 16, TRACK).write(0, b"primary")
    with StorageUnit(site2) as u2:
        u2.create_volume("Big2", BIG_TRACKS, TRACK, thin=True)
        u2.create_volume("B", 16, TRACK)
        u2.create_volume("C", 16, TRACK)
    r = cli("-u", site1, "-r", site2, "mkgmir", "gm", "A:B:C")
    assert r.returncode == 0, r.stderr
    r = cli("-u", site1, "-r", site2, "formcg", "gm")
    assert r.returncode == 0, r.stderr

    # the library, in a child (an ENOMEM there is the failure being tested)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    code = f"""
        import numpy as np, fastfc
        with fastfc.StorageUnit({str(site1)!r}, readonly=True) as u:
            big = u.volume("Big")
            assert big.capacity == {BIG_TRACKS * TRACK}
            assert bytes(big.read({BIG - TRACK}, 10)) == b"at the end"
            assert not big.read(0, 1 << 20).any()
            assert not big.array.flags.writeable
            with open("/proc/self/maps") as f:
                maps = [l for l in f if l.rstrip().endswith("Big.vol")]
            assert maps and all(l.split()[1] == "r--s" for l in maps), maps
            print("library ok")
    """
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "library ok" in r.stdout, r.stderr[-2000:]

    # the command line's read-only commands
    r = cli("-u", site1, "lsvol")
    assert r.returncode == 0 and "Big" in r.stdout, r.stderr
    r = cli("-u", site1, "read", "Big", "--offset", BIG - TRACK, "--length", 10)
    assert r.returncode == 0 and "at the end" in r.stdout, r.stderr
    r = cli("-u", site2, "lsvol")
    assert r.returncode == 0 and "Big2" in r.stdout, r.stderr
    r = cli("-u", site2, "lsflash")
    assert r.returncode == 0 and "B" in r.stdout, r.stderr
    r = cli("-u", site1, "-r", site2, "lspprc")
    assert r.returncode == 0 and "A" in r.stdout, r.stderr
    r = cli("-u", site2, "-r", site1, "showgmir", "gm")
    assert r.returncode == 0 and "gm" in r.stdout, r.stderr

    # and the volumes are as they were
    with StorageUnit(site1) as u1:
        assert bytes(u1.volume("Big").read(BIG - TRACK, 10)) == b"at the end"
        assert np.count_nonzero(u1.volume("A").read(0, 7)) == 7
