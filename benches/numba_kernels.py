"""Numba reference kernels for the bitmap benchmarks.

They work on the same ``uint64`` words as :class:`fastfc.TrackBitmap` and
use LLVM's ``ctpop`` / ``cttz`` intrinsics, so they show what a JIT-compiled
loop on this CPU reaches; ``benches/cases.py`` compares fastfc against the
faster of these and NumPy. Numba is a dev dependency only: nothing in
``fastfc`` imports this module.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic


@intrinsic
def _popcount64(typingctx, x):
    """``llvm.ctpop.i64``: hardware popcount of one word."""
    sig = types.uint64(types.uint64)

    def codegen(context, builder, signature, args):
        fnty = ir.FunctionType(ir.IntType(64), [ir.IntType(64)])
        fn = builder.module.declare_intrinsic("llvm.ctpop.i64", fnty=fnty)
        return builder.call(fn, args)

    return sig, codegen


@intrinsic
def _ctz64(typingctx, x):
    """``llvm.cttz.i64``: count trailing zeros of one word (64 for zero)."""
    sig = types.uint64(types.uint64)

    def codegen(context, builder, signature, args):
        fnty = ir.FunctionType(ir.IntType(64), [ir.IntType(64), ir.IntType(1)])
        fn = builder.module.declare_intrinsic("llvm.cttz.i64", fnty=fnty)
        return builder.call(fn, [args[0], ir.Constant(ir.IntType(1), 0)])

    return sig, codegen


@njit(cache=False, nogil=True)
def popcount_words(words):
    """Number of set bits in a 1-D ``uint64`` array."""
    c = np.uint64(0)
    for k in range(words.shape[0]):
        c += _popcount64(words[k])
    return c


@njit(cache=False, nogil=True)
def find_next_set_words(words, n_bits, start):
    """Index of the first set bit at or after ``start`` (below ``n_bits``), or -1.

    Same contract as :meth:`fastfc.TrackBitmap.find_next_set`; a plain
    word-by-word scan, which is what a straightforward numba loop compiles to.
    """
    if start < 0 or start >= n_bits:
        return -1
    n_words = (n_bits + 63) >> 6
    k = start >> 6
    w = words[k] & ~((np.uint64(1) << np.uint64(start & 63)) - np.uint64(1))
    while True:
        if w != 0:
            r = (k << 6) + np.int64(_ctz64(w))
            return r if r < n_bits else -1
        k += 1
        if k >= n_words:
            return -1
        w = words[k]


def warm_up() -> None:
    """Compile both kernels (outside any timed region)."""
    w = np.zeros(16, dtype=np.uint64)
    w[3] = 8
    assert popcount_words(w) == 1
    assert find_next_set_words(w, 16 * 64, 0) == 3 * 64 + 3
