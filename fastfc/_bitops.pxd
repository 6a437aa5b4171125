# Inline word-level bitmap helpers shared by the kernels in _core.pyx.
# Bit i lives in word i >> 6 at position i & 63. Bits past n_bits in the last
# word are always zero, so counts and scans need no masking at the end.
from libc.stdint cimport uint64_t, uint8_t

cdef extern from *:
    int __builtin_popcountll(unsigned long long) nogil
    int __builtin_ctzll(unsigned long long) nogil

cdef extern from *:
    """
    /* Word-array kernels with the widest vectors the build targets (setup.py
       builds with -march=native unless FASTFC_PORTABLE=1); plain C otherwise. */
    #include <stdint.h>
    #if defined(__AVX512F__) || defined(__AVX2__)
    #include <immintrin.h>
    #endif

    /* Set bits in w[0, n): four independent accumulators, so the adds do not
       wait on each other (AVX-512 VPOPCNTQ: 32 words per step). */
    static inline long long fastfc_popcount_words(const uint64_t *w, Py_ssize_t n)
    {
        Py_ssize_t k = 0;
        long long c0 = 0, c1 = 0, c2 = 0, c3 = 0;
    #if defined(__AVX512VPOPCNTDQ__) && defined(__AVX512F__)
        __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
        /* NumPy arrays are often 16-byte aligned: a 64-byte load would then
           straddle two cache lines every time (measured: 1.6x slower in L2) */
        for (; k < n && ((uintptr_t)(w + k) & 63); k++)
            c0 += __builtin_popcountll(w[k]);
        for (; k + 32 <= n; k += 32) {
            a0 = _mm512_add_epi64(a0, _mm512_popcnt_epi64(_mm512_loadu_si512(w + k)));
            a1 = _mm512_add_epi64(a1, _mm512_popcnt_epi64(_mm512_loadu_si512(w + k + 8)));
            a2 = _mm512_add_epi64(a2, _mm512_popcnt_epi64(_mm512_loadu_si512(w + k + 16)));
            a3 = _mm512_add_epi64(a3, _mm512_popcnt_epi64(_mm512_loadu_si512(w + k + 24)));
        }
        c0 += _mm512_reduce_add_epi64(_mm512_add_epi64(_mm512_add_epi64(a0, a1),
                                                       _mm512_add_epi64(a2, a3)));
    #endif
        for (; k + 4 <= n; k += 4) {
            c0 += __builtin_popcountll(w[k]);
            c1 += __builtin_popcountll(w[k + 1]);
            c2 += __builtin_popcountll(w[k + 2]);
            c3 += __builtin_popcountll(w[k + 3]);
        }
        for (; k < n; k++)
            c0 += __builtin_popcountll(w[k]);
        return c0 + c1 + c2 + c3;
    }

    /* Index of the first non-zero word in w[k, n), or n. Tests 256 bytes
       per step with AVX-512 (128 with AVX2), 64 in plain C. */
    static inline Py_ssize_t fastfc_first_nonzero_word(const uint64_t *w, Py_ssize_t k,
                                                       Py_ssize_t n)
    {
    #if defined(__AVX512F__) || defined(__AVX2__)
        for (; k < n && ((uintptr_t)(w + k) & 63); k++)   /* align the loads */
            if (w[k])
                return k;
    #endif
    #if defined(__AVX512F__)
        for (; k + 32 <= n; k += 32) {
            __m512i a = _mm512_or_si512(
                _mm512_or_si512(_mm512_loadu_si512(w + k), _mm512_loadu_si512(w + k + 8)),
                _mm512_or_si512(_mm512_loadu_si512(w + k + 16), _mm512_loadu_si512(w + k + 24)));
            if (_mm512_test_epi64_mask(a, a))
                break;
        }
    #elif defined(__AVX2__)
        for (; k + 16 <= n; k += 16) {
            __m256i a = _mm256_or_si256(
                _mm256_or_si256(_mm256_loadu_si256((const __m256i *)(w + k)),
                                _mm256_loadu_si256((const __m256i *)(w + k + 4))),
                _mm256_or_si256(_mm256_loadu_si256((const __m256i *)(w + k + 8)),
                                _mm256_loadu_si256((const __m256i *)(w + k + 12))));
            if (!_mm256_testz_si256(a, a))
                break;
        }
    #endif
        for (; k + 8 <= n; k += 8)
            if (w[k] | w[k + 1] | w[k + 2] | w[k + 3] | w[k + 4] | w[k + 5] | w[k + 6] | w[k + 7])
                break;
        for (; k < n; k++)
            if (w[k])
                return k;
        return n;
    }
    """
    long long bm_popcount_words "fastfc_popcount_words"(const uint64_t* w, Py_ssize_t n) nogil
    Py_ssize_t bm_first_nonzero_word "fastfc_first_nonzero_word"(const uint64_t* w, Py_ssize_t k, Py_ssize_t n) nogil

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
    """Index of the first set bit >= start, or -1. Skips zero words 32 at a
    time (bm_first_nonzero_word)."""
    cdef Py_ssize_t n_words, k
    cdef uint64_t word
    if start >= n_bits or start < 0:
        return -1
    n_words = (n_bits + 63) >> 6
    k = start >> 6
    word = w[k] & ~low_mask(start & 63)
    if word:
        return (k << 6) + __builtin_ctzll(word)
    k = bm_first_nonzero_word(w, k + 1, n_words)
    if k < n_words:
        return (k << 6) + __builtin_ctzll(w[k])
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
