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


# -- the copy of large runs, measured per CPU (_kernels.h "Which kernel copies a large run") --
COPY_KERNELS = _core.COPY_KERNELS


@pytest.fixture
def restore_copy():
    """Put the process's copy choice back after a test that forces one."""
    before = _core.copy_kernel()
    yield
    if before["why"].startswith("forced"):
        _core._use_copy(before["kernel"], why=before["why"])
    else:
        _core._use_copy("auto")


def test_the_copy_kernels_are_the_three_candidates() -> None:
    assert COPY_KERNELS == ("memcpy", "stream", "stream1")


@pytest.mark.parametrize("seconds, expected", [
    # the default stays unless another is more than the margin (15%) faster
    ({"memcpy": 1.0, "stream": 1.0, "stream1": 1.0}, "memcpy"),
    ({"memcpy": 1.0, "stream": 0.9, "stream1": 0.95}, "memcpy"),
    ({"memcpy": 1.0, "stream": 0.86}, "memcpy"),
    ({"memcpy": 1.0, "stream": 0.84}, "stream"),
    # the fastest of the others wins, not the first past the margin
    ({"memcpy": 1.0, "stream": 0.5, "stream1": 0.3}, "stream1"),
    ({"memcpy": 1.0, "stream": 0.3, "stream1": 0.5}, "stream"),
    # this machine: the four streams about 3x slower than memcpy
    ({"memcpy": 0.0025, "stream": 0.0075, "stream1": 0.0015}, "stream1"),
    ({"memcpy": 0.0025, "stream": 0.0075, "stream1": 0.0024}, "memcpy"),
    # the Xeon it was tuned on: streaming clearly ahead
    ({"memcpy": 0.0040, "stream": 0.0021, "stream1": 0.0030}, "stream"),
    # not measured (missing, 0, negative) never wins; nor without a default time
    ({"memcpy": 1.0, "stream": 0.0, "stream1": -1.0}, "memcpy"),
    ({"memcpy": 1.0}, "memcpy"),
    ({"stream": 0.1, "stream1": 0.2}, "memcpy"),
])
def test_the_decision_keeps_the_default_unless_another_is_clearly_faster(seconds, expected):
    assert _core._decide_copy(seconds) == expected


def test_the_decision_takes_a_margin_and_a_default() -> None:
    t = {"memcpy": 1.0, "stream": 0.8, "stream1": 1.2}
    assert _core._decide_copy(t, margin=0.25) == "memcpy"
    assert _core._decide_copy(t, margin=0.1) == "stream"
    assert _core._decide_copy(t, margin=0.0) == "stream"
    # from another default, memcpy must clear the margin too
    assert _core._decide_copy({"memcpy": 0.95, "stream": 1.0}, default="stream") == "stream"
    assert _core._decide_copy({"memcpy": 0.5, "stream": 1.0}, default="stream") == "memcpy"
    with pytest.raises(ValueError, match="memcpy, stream, stream1"):
        _core._decide_copy({"rep_movsb": 1.0})
    with pytest.raises(ValueError, match="memcpy, stream, stream1"):
        _core._decide_copy({"memcpy": 1.0}, default="nt")


def test_a_noise_blip_cannot_pick_a_three_times_slower_kernel() -> None:
    """The measurement keeps each candidate's best round: a blip slows some
    rounds of the default; the slow kernel still loses unless every round of
    the default was hit (then the margin still has to be cleared)."""
    rng = np.random.default_rng(7)
    for _ in range(2000):
        rounds = {"memcpy": 1.0 * (1 + rng.exponential(0.5, 3) * (rng.random(3) < 0.5)),
                  "stream": 3.0 * (1 + rng.exponential(0.5, 3) * (rng.random(3) < 0.5)),
                  "stream1": 2.9 * (1 + rng.exponential(0.5, 3) * (rng.random(3) < 0.5))}
        best = {k: float(v.min()) for k, v in rounds.items()}
        if min(rounds["memcpy"]) < 2.5:    # at least one clean-ish round of memcpy
            assert _core._decide_copy(best) == "memcpy", best


def test_the_copy_is_measured_once_and_says_why(restore_copy) -> None:
    if os.environ.get("FASTFC_COPY", "").strip().lower() not in ("", "auto"):
        pytest.skip("FASTFC_COPY forces the copy")
    assert _core._use_copy("auto") == {"kernel": None, "why": "not chosen yet",
                                       "ms_per_gib": {}, "cost_ms": 0.0}
    first = _core.copy_kernel()
    assert first["kernel"] in COPY_KERNELS
    if platform.machine() in ("x86_64", "AMD64"):
        assert first["why"].startswith("measured: "), first
        assert set(first["ms_per_gib"]) == set(COPY_KERNELS)
        assert all(ms > 0 for ms in first["ms_per_gib"].values())
        assert first["cost_ms"] > 0
        t = first["ms_per_gib"]
        assert first["kernel"] == _core._decide_copy(t)   # the rule, on what it measured
    assert _core.copy_kernel() == first                  # measured once


def test_a_large_copy_measures_when_nothing_was_chosen(restore_copy) -> None:
    _core._use_copy("auto")
    assert _core.copy_kernel(choose=False)["kernel"] is None
    src = np.arange(1 << 16, dtype=np.uint8)
    dst = np.zeros_like(src)
    _core._pool_copy(dst, src)
    assert np.array_equal(dst, src)
    assert _core.copy_kernel(choose=False)["kernel"] in COPY_KERNELS


def test_a_small_copy_does_not_measure(restore_copy) -> None:
    _core._use_copy("auto")
    src = np.arange(65535, dtype=np.uint8)
    dst = np.zeros_like(src)
    _core._pool_copy(dst, src)
    assert np.array_equal(dst, src)
    assert _core.copy_kernel(choose=False)["kernel"] is None


@pytest.mark.parametrize("kernel", COPY_KERNELS)
def test_a_forced_copy_is_used_and_reported(restore_copy, kernel) -> None:
    got = _core._use_copy(kernel)
    assert got == {"kernel": kernel, "why": "forced by _use_copy", "ms_per_gib": {},
                   "cost_ms": 0.0}
    assert _core.copy_kernel() == got                    # no measuring over a forced choice


def test_an_unknown_copy_kernel_is_refused() -> None:
    with pytest.raises(ValueError, match="auto, memcpy, stream, stream1, got 'nt'"):
        _core._use_copy("nt")
    with pytest.raises(ValueError, match="memcpy, stream, stream1, got 'nt'"):
        _core._copy_with("nt", np.zeros(4, np.uint8), np.zeros(4, np.uint8))
    with pytest.raises(ValueError, match="dst holds 3 bytes"):
        _core._copy_with("memcpy", np.zeros(3, np.uint8), np.zeros(4, np.uint8))


COPY_SIZES = [0, 1, 15, 4095, 16383, 16384, 16384 + 31, 16384 + 63, 16384 + 64, 16384 + 127,
              65535, 65536, 65536 + 127, 65536 + 128, (1 << 20) - 1, (1 << 20) + 37,
              (2 << 20) + 4097]


@pytest.mark.parametrize("kernel", COPY_KERNELS)
@pytest.mark.parametrize("size", COPY_SIZES)
def test_each_copy_kernel_copies_byte_for_byte(level, kernel, size) -> None:
    """Every kernel, at every vector level, at unaligned starts of both ends
    and sizes about its thresholds (the 4 x 4 KiB block, the 128-byte step,
    64 KiB, the 1 MiB split), touches exactly the bytes it copies."""
    for src_off, dst_off in ((0, 0), (5, 1), (16, 17), (33, 63)):
        rng = np.random.default_rng(size + dst_off)
        src_buf = rng.integers(0, 256, size + 64, dtype=np.uint8)
        src = src_buf[src_off:src_off + size]
        dst_buf = np.full(size + 2 * 64 + 1, 0xA5, dtype=np.uint8)
        _core._copy_with(kernel, dst_buf[64 + dst_off:], src)
        assert np.array_equal(dst_buf[64 + dst_off:64 + dst_off + size], src)
        assert (dst_buf[:64 + dst_off] == 0xA5).all()
        assert (dst_buf[64 + dst_off + size:] == 0xA5).all()


@pytest.mark.parametrize("kernel", COPY_KERNELS)
@pytest.mark.parametrize("size", [65535, 65536, (1 << 20) - 1, 1 << 20, (1 << 20) + 37,
                                  (4 << 20) + 4097])
def test_the_big_copy_path_with_each_forced_kernel(restore_copy, kernel, size) -> None:
    """The path a background-copy chunk takes (the copy threads from 1 MiB)."""
    _core._use_copy(kernel)
    rng = np.random.default_rng(size)
    src = rng.integers(0, 256, size + 3, dtype=np.uint8)[3:]
    dst_buf = np.full(size + 130, 0x5A, dtype=np.uint8)
    _core._pool_copy(dst_buf[65:65 + size], src)
    assert np.array_equal(dst_buf[65:65 + size], src)
    assert (dst_buf[:65] == 0x5A).all() and (dst_buf[65 + size:] == 0x5A).all()


@pytest.mark.parametrize("kernel", COPY_KERNELS)
def test_a_background_copy_with_each_forced_kernel(restore_copy, kernel) -> None:
    """The forced kernel is the one the copy paths use, and they copy right."""
    from fastfc import FlashCopy, Volume
    _core._use_copy(kernel)
    before = _core._copy_runs()
    src, tgt = Volume(96, track_size=65536), Volume(96, track_size=65536)
    data = np.random.default_rng(1).integers(0, 256, 96 * 65536, dtype=np.uint8)
    src.write(0, data)
    tgt.write(0, np.full(96 * 65536, 7, np.uint8))
    fc = FlashCopy(src, tgt, background_copy=False)
    fc.copy(96)
    assert np.array_equal(tgt.read(0, 96 * 65536), data)
    after = _core._copy_runs()
    assert after[kernel] > before[kernel]
    assert {k: after[k] - before[k] for k in COPY_KERNELS if k != kernel} == {
        k: 0 for k in COPY_KERNELS if k != kernel}


_COPY_ENV_CODE = ("import warnings, fastfc, numpy as np\n"
                  "from fastfc import _core\n"
                  "a, b = np.zeros(1 << 20, np.uint8), np.ones(1 << 20, np.uint8)\n"
                  "_core._pool_copy(a, b)\n"       # measures first, unless forced
                  "runs = _core._copy_runs()\n"
                  "print(_core.copy_kernel()['kernel'], _core.copy_kernel()['why'])\n"
                  "print(sorted(k for k, n in runs.items() if n))\n"
                  "print(_core.environment_problems())\n"
                  "with warnings.catch_warnings(record=True) as w:\n"
                  "    warnings.simplefilter('always')\n"
                  "    fastfc.Volume(4)\n"
                  "print([str(x.message) for x in w if x.category is RuntimeWarning])\n")


@pytest.mark.slow
@pytest.mark.parametrize("value, kernel", [("memcpy", "memcpy"), ("stream", "stream"),
                                           (" Stream1 ", "stream1")])
def test_fastfc_copy_forces_the_kernel(value, kernel):
    env = dict(os.environ, FASTFC_COPY=value)
    out = subprocess.run([sys.executable, "-W", "error", "-c", _COPY_ENV_CODE], env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [f"{kernel} forced by FASTFC_COPY", repr([kernel]), "()",
                                       "[]"]


@pytest.mark.slow
def test_a_bad_fastfc_copy_is_ignored_with_a_warning_naming_it():
    env = dict(os.environ, FASTFC_COPY="nontemporal")
    out = subprocess.run([sys.executable, "-W", "error", "-c", _COPY_ENV_CODE], env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    problem = "FASTFC_COPY must be one of auto, memcpy, stream, stream1, got 'nontemporal'"
    lines = out.stdout.splitlines()
    assert lines[0].split()[0] in COPY_KERNELS and lines[0].split(" ", 1)[1].startswith(
        "measured: " if platform.machine() in ("x86_64", "AMD64") else "default")
    assert lines[1] == repr([lines[0].split()[0]])      # measured before the copy it serves
    assert lines[2:] == [repr((problem,)), repr([f"{problem}: ignored, the default is used"])]
    env["FASTFC_COPY"] = "auto"
    out = subprocess.run([sys.executable, "-W", "error", "-c", _COPY_ENV_CODE], env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.splitlines()[2:] == ["()", "[]"], out.stderr


@pytest.mark.slow
def test_the_command_refuses_a_bad_fastfc_copy_as_a_usage_error(tmp_path):
    """As for a bad FASTFC_KERNELS (test_cli_hardening): one line, status 2."""
    env = dict(os.environ, FASTFC_COPY="fast")
    out = subprocess.run([sys.executable, "-m", "fastfc", "-u", str(tmp_path / "u"), "lsvol"],
                         env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().splitlines() == [
        "Error: FASTFC_COPY must be one of auto, memcpy, stream, stream1, got 'fast'"]
    assert out.stdout == "" and not (tmp_path / "u").exists()
