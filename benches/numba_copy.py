"""Numba versions of fastfc's copy kernels: copy the runs of set tracks, and
the host write with copy-on-write.

The bitmap scans (count, find-next) are in ``numba_kernels.py``; these add
the two data-moving kernels. Each is written the way a numba user would at
their best: whole runs of tracks move with one ``memcpy`` (libc's, called
through ``ctypes``: numba's slice assignment of ``uint8`` arrays copies at
~1.8 GB/s on this machine, a byte loop at ~6.8 GB/s, libc's memcpy at
memory speed), bits are tested and cleared word by word with LLVM's
``cttz``. Like fastfc's kernels they take no lock; unlike fastfc they check
nothing (ranges, state): the caller must pass consistent arrays.
"""

from __future__ import annotations

import ctypes

import numpy as np
from numba import njit

from benches.numba_kernels import _ctz64, find_next_set_words

_libc = ctypes.CDLL(None)
_memcpy = _libc.memcpy
_memcpy.restype = ctypes.c_void_p
_memcpy.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]

_ONE = np.uint64(1)
_ALL = np.uint64(0xFFFFFFFFFFFFFFFF)


@njit(nogil=True, cache=False)
def find_next_clear_words(words, n_bits, start):
    """Index of the first clear bit at or after ``start`` (below ``n_bits``), or -1."""
    if start < 0 or start >= n_bits:
        return -1
    n_words = (n_bits + 63) >> 6
    k = start >> 6
    w = ~words[k] & ~((_ONE << np.uint64(start & 63)) - _ONE)
    while True:
        if w != 0:
            r = (k << 6) + np.int64(_ctz64(w))
            return r if r < n_bits else -1
        k += 1
        if k >= n_words:
            return -1
        w = ~words[k]


@njit(nogil=True, cache=False)
def clear_range_words(words, a, b):
    """Clear bits [a, b)."""
    if a >= b:
        return
    ka, kb = a >> 6, (b - 1) >> 6
    lo = _ALL << np.uint64(a & 63)
    hi = _ALL >> np.uint64(63 - ((b - 1) & 63))
    if ka == kb:
        words[ka] &= ~(lo & hi)
        return
    words[ka] &= ~lo
    for k in range(ka + 1, kb):
        words[k] = np.uint64(0)
    words[kb] &= ~hi


@njit(nogil=True, cache=False)
def copy_set_runs(dst, src, words, n_bits, shift):
    """Copy every run of set tracks from ``src`` to ``dst`` (flat ``uint8``
    arrays of ``n_bits << shift`` bytes) with one memcpy per run, clearing
    the bits. Returns the number of tracks copied."""
    d = dst.ctypes.data
    s = src.ctypes.data
    done = 0
    a = find_next_set_words(words, n_bits, 0)
    while a >= 0:
        b = find_next_clear_words(words, n_bits, a)
        if b < 0:
            b = n_bits
        _memcpy(d + (a << shift), s + (a << shift), (b - a) << shift)
        clear_range_words(words, a, b)
        done += b - a
        if b >= n_bits:
            break
        a = find_next_set_words(words, n_bits, b)
    return done


@njit(nogil=True, cache=False)
def cow_write(src, targets, to_copy, offset, data, shift):
    """Host write of ``data`` at ``offset`` of ``src``: first copy each old
    track to every target whose bit (row j of ``to_copy``) is set, clearing
    it; then store the bytes. ``targets`` holds the targets' base addresses."""
    n = data.shape[0]
    s = src.ctypes.data
    t0 = offset >> shift
    t1 = ((offset + n - 1) >> shift) + 1
    for j in range(targets.shape[0]):
        w = to_copy[j]
        for t in range(t0, t1):
            k = t >> 6
            bit = _ONE << np.uint64(t & 63)
            if w[k] & bit:
                _memcpy(targets[j] + (t << shift), s + (t << shift), 1 << shift)
                w[k] &= ~bit
    _memcpy(s + offset, data.ctypes.data, n)


@njit(nogil=True, cache=False)
def cow_write_batch(src, targets, to_copy, offsets, data, shift):
    """:func:`cow_write` of ``data[i]`` at ``offsets[i]`` for every i."""
    for i in range(offsets.shape[0]):
        cow_write(src, targets, to_copy, offsets[i], data[i], shift)


def warm_up() -> None:
    """Compile every kernel (outside any timed region) and check it."""
    n, shift = 256, 12
    src = np.arange(n << shift, dtype=np.uint64).astype(np.uint8)
    dst = np.zeros_like(src)
    words = np.zeros(4, np.uint64)
    words[0] = np.uint64(0b1110)
    words[1] = _ALL
    assert copy_set_runs(dst, src, words, n, shift) == 3 + 64
    assert not words.any() and np.array_equal(dst[1 << shift:4 << shift],
                                              src[1 << shift:4 << shift])
    tgt = np.zeros_like(src)
    targets = np.array([tgt.ctypes.data], np.int64)
    tc = np.full((1, 4), _ALL)
    old = src[:1 << shift].copy()
    cow_write(src, targets, tc, 0, np.full(16, 7, np.uint8), shift)
    assert np.array_equal(tgt[:1 << shift], old) and src[0] == 7 and tc[0, 0] == _ALL - _ONE
    cow_write_batch(src, targets, tc, np.array([4096], np.int64),
                    np.full((1, 16), 9, np.uint8), shift)
    assert src[4096] == 9 and tc[0, 0] == _ALL - np.uint64(3)
    assert find_next_clear_words(tc[0], 256, 0) == 0
    clear_range_words(tc[0], 3, 130)
    assert find_next_set_words(tc[0], 256, 3) == 130 and tc[0, 0] & np.uint64(4)
