"""Copy threads: a large copy split across a small pool of threads
(``fastfc.set_copy_threads``), small ones on the calling thread, the bytes
the same either way."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

import fastfc
from fastfc import FlashCopy, Volume, _core
from helpers import rand


@pytest.fixture
def threads():
    before = fastfc.copy_threads()
    yield fastfc.set_copy_threads
    fastfc.set_copy_threads(before)


def test_set_copy_threads_checks_its_argument(threads):
    with pytest.raises(ValueError, match=">= 1"):
        threads(0)
    with pytest.raises(TypeError, match="must be an int"):
        threads(2.0)
    assert threads(1000) == 16 and fastfc.copy_threads() == 16
    assert threads(3) == 3 and fastfc.copy_threads() == 3


def test_default_follows_the_environment():
    code = "import fastfc; print(fastfc.copy_threads())"
    env = dict(os.environ, FASTFC_COPY_THREADS="3")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, check=True)
    assert out.stdout.strip() == "3"


@pytest.mark.parametrize("value", ["many", "0", "-2", "2.5", "3 threads"])
def test_a_bad_environment_value_is_ignored_with_a_warning_naming_it(value):
    """``import fastfc`` does not fail on a bad FASTFC_COPY_THREADS: the
    default is used and a RuntimeWarning, at the first volume, names the
    variable and what it takes."""
    code = ("import warnings, fastfc\n"
            "warnings.simplefilter('error')\n"       # nothing during the import
            "from fastfc import _core\n"
            "assert fastfc.copy_threads() == _core._default_copy_threads()\n"
            "print(_core.environment_problems())\n"
            "with warnings.catch_warnings(record=True) as w:\n"
            "    warnings.simplefilter('always')\n"
            "    fastfc.Volume(4); fastfc.Volume(4)\n"
            "print([(x.category.__name__, str(x.message)) for x in w])\n")
    env = dict(os.environ, FASTFC_COPY_THREADS=value)
    out = subprocess.run([sys.executable, "-W", "error", "-c", code], env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    problem = f"FASTFC_COPY_THREADS must be a whole number >= 1, got {value!r}"
    assert out.stdout.splitlines() == [
        repr((problem,)),
        repr([("RuntimeWarning", f"{problem}: ignored, the default is used")])]


def test_a_huge_thread_count_is_capped_not_an_overflow(threads):
    assert threads(1 << 70) == 16 and fastfc.copy_threads() == 16
    code = "import fastfc; print(fastfc.copy_threads())"
    env = dict(os.environ, FASTFC_COPY_THREADS="99999999999999999999999")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "16", out.stderr


@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("size", [0, 4096, (1 << 20) - 4096, 3 << 20, (5 << 20) + 12345])
def test_pool_copy_is_a_copy(threads, n, size):
    threads(n)
    src = rand(size, size % 97)
    dst = np.zeros(size + 10, np.uint8)
    k = _core._pool_copy(dst, src)
    assert (dst[:size] == src).all() and not dst[size:].any()
    assert 1 <= k <= n
    if n > 1 and size >= 1 << 20:
        assert k > 1                    # large: split
    if size < 1 << 20:
        assert k == 1                   # small: the calling thread only


@pytest.mark.parametrize("n", [1, 2])
def test_background_copy_and_reverse_restore_split_large_runs(threads, n):
    threads(n)
    ts = 65536
    S, T = Volume(160, ts), Volume(160, ts)          # 10 MiB
    s0 = rand(S.capacity, 1)
    S._raw_array()[:] = s0
    before = _core.pool_copies()
    fc = FlashCopy(S, T, background_copy=False, record=True, persistent=True)
    S.write(5 * ts + 100, np.full(7, 9, np.uint8))   # a copy-on-write first (one grain)
    assert fc.copy() == 160      # 159 tracks and 15 of the 16 grains of track 5
    assert T.copied_bytes == S.capacity
    assert (T.array == s0).all()
    assert (_core.pool_copies() > before) == (n > 1)
    # the source changes everywhere; reverse restore takes T's image back
    S.write(0, rand(S.capacity, 2))
    fc.reverse_restore()
    assert (S.read(0, S.capacity) == s0).all()
