"""Every variant of the run-time dispatched kernels (fastfc/_kernels.h) gives
the reference's results: scalar always, AVX2 and AVX-512 where this CPU has
them, each forced through ``_core._use_kernels``.

Sizes straddle each variant's block (8 words AVX2 popcount, 31 of those per
byte-counter flush, 32 words AVX-512, 4 x 4 KiB copy streams) and the words
start at every alignment, since the vector loops align their loads first.
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from fastfc import TrackBitmap, _core

FEATURES = _core.cpu_features()
LEVELS = ["scalar"] + [lvl for lvl, ok in (("avx2", FEATURES["avx2"]),
                                           ("avx512", FEATURES["avx512f"])) if ok]
WORDS = [0, 1, 7, 8, 9, 31, 32, 33, 63, 64, 65, 247, 248, 249, 500, 2000, 4099]
DENSITIES = [0.0, 0.001, 0.5, 1.0]


@pytest.fixture(params=LEVELS)
def level(request):
    """Force one variant for the test, then put the import-time choice back."""
    picked = _core._use_kernels(request.param)
    if request.param != "scalar":
        assert request.param in picked.values(), picked
    else:
        assert set(picked.values()) == {"scalar"}
    yield request.param
    _core._use_kernels(os.environ.get("FASTFC_KERNELS") or "avx512")


def random_words(n: int, density: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    bits = rng.random(n * 64) < density
    return np.packbits(bits, bitorder="little").view(np.uint64).copy()


def misaligned(words: np.ndarray, shift: int) -> np.ndarray:
    """The same words in an array that starts ``shift`` words past a 64-byte line."""
    buf = np.zeros(len(words) + 16, dtype=np.uint64)
    lead = (-(buf.ctypes.data // 8)) % 8 + shift
    out = buf[lead:lead + len(words)]
    out[:] = words
    return out


def ref_count(words: np.ndarray) -> int:
    return int(np.unpackbits(words.view(np.uint8)).sum())


def test_the_import_picked_the_best_variant_this_cpu_runs() -> None:
    if os.environ.get("FASTFC_KERNELS"):
        pytest.skip("FASTFC_KERNELS caps the choice")
    picked = _core.kernels()
    best = "avx512" if FEATURES["avx512f"] else "avx2" if FEATURES["avx2"] else "scalar"
    assert picked["copy_stream"] == best
    assert picked["popcount_words"] == (
        "avx512" if FEATURES["avx512f"] and FEATURES["avx512vpopcntdq"] else
        "avx2" if FEATURES["avx2"] else "scalar")


def test_an_unknown_level_is_refused() -> None:
    with pytest.raises(ValueError, match="scalar, avx2, avx512"):
        _core._use_kernels("sse9")


@pytest.mark.parametrize("n", WORDS)
@pytest.mark.parametrize("density", DENSITIES)
def test_count(level, n, density) -> None:
    for shift in (0, 1, 3, 7):
        w = misaligned(random_words(n, density, seed=n + shift), shift)
        bm = TrackBitmap(n * 64, words=w)
        assert bm.count() == ref_count(w)
        if n > 2:   # the interior words start at any alignment
            a, b = 5, n * 64 - 70
            assert bm.count_range(a, b) == int(bm.to_bools()[a:b].sum())


@pytest.mark.parametrize("n", WORDS)
def test_find_next_set(level, n) -> None:
    rng = np.random.default_rng(n)
    for shift in (0, 5):
        w = misaligned(np.zeros(n, dtype=np.uint64), shift)
        bm = TrackBitmap(n * 64, words=w)
        assert bm.find_next_set(0) == -1 and not bm.any()
        for _ in range(min(n, 12)):
            bm.set(int(rng.integers(n * 64)))
        ref = np.flatnonzero(bm.to_bools())
        for start in sorted({0, 1, 63, 64, 65, *rng.integers(0, n * 64 + 1, 20).tolist()}):
            after = ref[ref >= start]
            assert bm.find_next_set(start) == (int(after[0]) if after.size else -1)


@pytest.mark.parametrize("n", WORDS)
def test_word_algebra(level, n) -> None:
    a_w, b_w, c_w = (random_words(n, 0.3, seed=s) for s in (1, 2, 3))
    a, b, c = (TrackBitmap(n * 64, words=misaligned(w, s))
               for w, s in ((a_w, 0), (b_w, 1), (c_w, 2)))
    assert np.array_equal((a | b).words, a_w | b_w)
    assert np.array_equal((a & b).words, a_w & b_w)
    assert np.array_equal((a - b).words, a_w & ~b_w)
    assert np.array_equal(_core.combine_or3(a, b, c).words, a_w | b_w | c_w)
    assert a.copy() == a and (n == 0 or a.copy() != b or np.array_equal(a_w, b_w))
    same = a.copy()
    assert np.array_equal(same.or_(same).words, a_w)    # an operand may be the result
    assert not same.andnot(same).any()


@pytest.mark.parametrize("size", [0, 1, 4095, 16383, 16384, 16384 + 63, 16384 + 64,
                                  65536 + 127, 65536 + 128, (1 << 20) + 37])
@pytest.mark.parametrize("dst_off", [0, 1, 17, 63])
def test_copy_stream(level, size, dst_off) -> None:
    rng = np.random.default_rng(size + dst_off)
    src_buf = rng.integers(0, 256, size + 64, dtype=np.uint8)
    src = src_buf[5:5 + size]
    dst_buf = np.full(size + 2 * 64 + 1, 0xA5, dtype=np.uint8)
    _core._copy_stream(dst_buf[64 + dst_off:], src)
    assert np.array_equal(dst_buf[64 + dst_off:64 + dst_off + size], src)
    assert (dst_buf[:64 + dst_off] == 0xA5).all()               # nothing before
    assert (dst_buf[64 + dst_off + size:] == 0xA5).all()        # nothing after


def test_copy_stream_refuses_a_short_destination() -> None:
    with pytest.raises(ValueError, match="dst holds 3 bytes"):
        _core._copy_stream(np.zeros(3, np.uint8), np.zeros(4, np.uint8))


def test_a_flashcopy_background_copy_gives_the_image(level) -> None:
    """The copy path end to end (copy_set_runs streams runs of 64 KiB+)."""
    from fastfc import FlashCopy, Volume
    src, tgt = Volume(64, track_size=65536), Volume(64, track_size=65536)
    data = np.random.default_rng(0).integers(0, 256, 64 * 65536, dtype=np.uint8)
    src.write(0, data)
    fc = FlashCopy(src, tgt, background_copy=False)
    fc.copy(64)
    assert np.array_equal(tgt.read(0, 64 * 65536), data)


# -- the built extension ------------------------------------------------------------------
def _isa_by_function(path: str) -> dict[str, dict[str, int]]:
    out = subprocess.run(["objdump", "-d", path], check=True, capture_output=True,
                         text=True, timeout=120).stdout
    per: dict[str, dict[str, int]] = {}
    func = "?"
    for line in out.splitlines():
        m = re.match(r"^[0-9a-f]+ <(.+)>:$", line)
        if m:
            func = m.group(1)
            continue
        parts = line.split("\t")
        if len(parts) >= 3 and parts[1].strip():
            first = parts[1].split()[0]
            kind = "evex" if first == "62" else "vex" if first in ("c4", "c5") else None
            if kind:
                per.setdefault(func, {"evex": 0, "vex": 0})[kind] += 1
    return per


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64") or not shutil.which("objdump"),
                    reason="needs x86-64 and objdump")
def test_wide_instructions_only_in_their_variants() -> None:
    """A portable build holds AVX-512 instructions only in the *_avx512
    kernels and AVX ones only in the *_avx2 / *_avx512 kernels: any other
    place would die with SIGILL on a CPU without them."""
    base = _core.build_baseline()
    if "avx2" in base or "avx512f" in base:
        pytest.skip(f"a native build (baseline {base}) may use them anywhere")
    per = _isa_by_function(_core.__file__)
    assert any(f.endswith("_avx512") for f in per), per    # the variants are there
    stray = {f: c for f, c in per.items()
             if (c["evex"] and not f.endswith("_avx512"))
             or (c["vex"] and not f.endswith(("_avx2", "_avx512")))}
    assert not stray


@pytest.mark.slow
@pytest.mark.parametrize("value", ["avx", "sse", "AVX-512"])
def test_a_bad_kernels_value_is_ignored_with_a_warning_naming_it(value):
    """``import fastfc`` does not fail on a bad FASTFC_KERNELS: the best
    variants run and a RuntimeWarning, at the first volume, names the variable
    and the values it takes. A value in another case is read."""
    code = ("import warnings, fastfc\n"
            "from fastfc import _core\n"
            "print(_core.kernels()['copy_stream'], _core.environment_problems())\n"
            "with warnings.catch_warnings(record=True) as w:\n"
            "    warnings.simplefilter('always')\n"
            "    fastfc.Volume(4)\n"
            "print([str(x.message) for x in w if x.category is RuntimeWarning])\n")
    env = dict(os.environ, FASTFC_KERNELS=value)
    out = subprocess.run([sys.executable, "-W", "error", "-c", code], env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    best = "avx512" if FEATURES["avx512f"] else "avx2" if FEATURES["avx2"] else "scalar"
    problem = f"FASTFC_KERNELS must be one of scalar, avx2, avx512, got {value!r}"
    assert out.stdout.splitlines() == [
        f"{best} {(problem,)!r}", repr([f"{problem}: ignored, the default is used"])]
    env["FASTFC_KERNELS"] = " Scalar "
    out = subprocess.run([sys.executable, "-W", "error", "-c", code], env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.splitlines() == ["scalar ()", "[]"], out.stderr
