# Inline word-level bitmap helpers shared by the kernels in _core.pyx.
# Bit i lives in word i >> 6 at position i & 63. Bits past n_bits in the last
# word are always zero, so counts and scans need no masking at the end.
from libc.stdint cimport uint64_t, uint8_t

cdef extern from *:
    int __builtin_popcountll(unsigned long long) nogil
    int __builtin_ctzll(unsigned long long) nogil

cdef inline uint64_t low_mask(Py_ssize_t nbits) noexcept nogil:
    """Mask of the nbits lowest bits, 0 <= nbits <= 64."""
    if nbits >= 64:
        return <uint64_t>0xFFFFFFFFFFFFFFFF
    return ((<uint64_t>1) << nbits) - 1

cdef inline bint bm_test(const uint64_t* w, Py_ssize_t i) noexcept nogil:
    return (w[i >> 6] >> (i & 63)) & 1

cdef inline void bm_set(uint64_t* w, Py_ssize_t i) noexcept nogil:
    w[i >> 6] |= (<uint64_t>1) << (i & 63)

cdef inline void bm_clear(uint64_t* w, Py_ssize_t i) noexcept nogil:
    w[i >> 6] &= ~((<uint64_t>1) << (i & 63))

cdef inline void bm_set_range(uint64_t* w, Py_ssize_t start, Py_ssize_t stop) noexcept nogil:
    """Set bits [start, stop)."""
    cdef Py_ssize_t a, b, k
    if stop <= start:
        return
    a = start >> 6
    b = (stop - 1) >> 6
    if a == b:
        w[a] |= low_mask(stop - start) << (start & 63)
        return
    w[a] |= ~low_mask(start & 63)
    for k in range(a + 1, b):
        w[k] = <uint64_t>0xFFFFFFFFFFFFFFFF
    w[b] |= low_mask(((stop - 1) & 63) + 1)

cdef inline void bm_clear_range(uint64_t* w, Py_ssize_t start, Py_ssize_t stop) noexcept nogil:
    """Clear bits [start, stop)."""
    cdef Py_ssize_t a, b, k
    if stop <= start:
        return
    a = start >> 6
    b = (stop - 1) >> 6
    if a == b:
        w[a] &= ~(low_mask(stop - start) << (start & 63))
        return
    w[a] &= low_mask(start & 63)
    for k in range(a + 1, b):
        w[k] = 0
    w[b] &= ~low_mask(((stop - 1) & 63) + 1)

cdef inline bint bm_any_range(const uint64_t* w, Py_ssize_t start, Py_ssize_t stop) noexcept nogil:
    """True when any bit in [start, stop) is set."""
    cdef Py_ssize_t a, b, k
    if stop <= start:
        return 0
    a = start >> 6
    b = (stop - 1) >> 6
    if a == b:
        return (w[a] >> (start & 63)) & low_mask(stop - start) != 0
    if w[a] & ~low_mask(start & 63):
        return 1
    for k in range(a + 1, b):
        if w[k]:
            return 1
    return (w[b] & low_mask(((stop - 1) & 63) + 1)) != 0

cdef inline Py_ssize_t bm_next_set(const uint64_t* w, Py_ssize_t n_bits, Py_ssize_t start) noexcept nogil:
    """Index of the first set bit >= start, or -1. Scans 8 words at a time."""
    cdef Py_ssize_t n_words, k, j
    cdef uint64_t word, acc
    if start >= n_bits or start < 0:
        return -1
    n_words = (n_bits + 63) >> 6
    k = start >> 6
    word = w[k] & ~low_mask(start & 63)
    if word:
        return (k << 6) + __builtin_ctzll(word)
    k += 1
    # Unrolled OR over blocks of 8 words: the compiler vectorises this.
    while k + 8 <= n_words:
        acc = w[k] | w[k + 1] | w[k + 2] | w[k + 3] | w[k + 4] | w[k + 5] | w[k + 6] | w[k + 7]
        if acc:
            break
        k += 8
    while k < n_words:
        if w[k]:
            return (k << 6) + __builtin_ctzll(w[k])
        k += 1
    return -1

cdef inline Py_ssize_t bm_next_clear(const uint64_t* w, Py_ssize_t n_bits, Py_ssize_t start) noexcept nogil:
    """Index of the first clear bit >= start (below n_bits), or -1."""
    cdef Py_ssize_t n_words, k, r
    cdef uint64_t word
    if start >= n_bits or start < 0:
        return -1
    n_words = (n_bits + 63) >> 6
    k = start >> 6
    word = ~w[k] & ~low_mask(start & 63)
    while True:
        if word:
            r = (k << 6) + __builtin_ctzll(word)
            return r if r < n_bits else -1
        k += 1
        if k >= n_words:
            return -1
        word = ~w[k]
