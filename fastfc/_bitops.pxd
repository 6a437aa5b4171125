# Inline word-level bitmap helpers shared by the kernels in _core.pyx.
# Bit i lives in word i >> 6 at position i & 63. Bits past n_bits in the last
# word are always zero, so counts and scans need no masking at the end.
from libc.stdint cimport uint64_t, uint8_t

cdef extern from *:
    int __builtin_popcountll(unsigned long long) nogil
    int __builtin_ctzll(unsigned long long) nogil

cdef extern from "_kernels.h":
    # Kernels with AVX2 and AVX-512 variants picked at run time (see the
    # header); each name is a call through the table ``fastfc_k``.
    long long bm_popcount_words "fastfc_popcount_words"(const uint64_t* w, Py_ssize_t n) noexcept nogil
    Py_ssize_t bm_first_nonzero_word "fastfc_first_nonzero_word"(const uint64_t* w, Py_ssize_t k, Py_ssize_t n) noexcept nogil
    void bm_words_op "fastfc_words_op"(int op, uint64_t* d, const uint64_t* s, Py_ssize_t n) noexcept nogil
    void bm_or3_words "fastfc_or3_words"(uint64_t* r, const uint64_t* a, const uint64_t* b, const uint64_t* c, Py_ssize_t n) noexcept nogil
    void copy_stream "fastfc_copy_stream"(uint8_t* dst, const uint8_t* src, size_t n) noexcept nogil
    # a large run, with the copy chosen for this CPU (measured at first use)
    void copy_large "fastfc_copy_large"(uint8_t* dst, const uint8_t* src, size_t n) noexcept nogil
    enum:
        FASTFC_SCALAR
        FASTFC_AVX2
        FASTFC_AVX512
        FASTFC_OP_OR
        FASTFC_OP_AND
        FASTFC_OP_ANDNOT
        FASTFC_OP_COPY
        FASTFC_N_KERNELS
        FASTFC_HAS_AVX2
        FASTFC_HAS_AVX512F
        FASTFC_HAS_VPOPCNTDQ
    ctypedef struct fastfc_kernel_table:
        int level[6]
    fastfc_kernel_table fastfc_k
    const char* fastfc_level_names[3]
    const char* fastfc_kernel_names[6]
    int fastfc_cpu_features() noexcept nogil
    const char* fastfc_missing_baseline() noexcept nogil
    int fastfc_select_kernels(int max_level) noexcept nogil
    const char* fastfc_baseline_names[8]
    int fastfc_baseline_count() noexcept nogil
    # the copy of large runs (see the header)
    enum:
        FASTFC_N_COPY
        FASTFC_COPY_MEMCPY
        FASTFC_COPY_UNCHOSEN
        FASTFC_COPY_MEASURED
        FASTFC_COPY_FORCED
        FASTFC_COPY_NO_BUFFER
        FASTFC_COPY_NO_STREAMS
        FASTFC_CAL_ROUNDS
    size_t FASTFC_CAL_BYTES
    size_t FASTFC_CAL_PIECE
    double FASTFC_COPY_MARGIN
    const char* fastfc_copy_names[3]
    ctypedef struct fastfc_copy_state:
        int kind
        int state
        int how
        double seconds[3]
        double cost
        unsigned long runs[3]
    fastfc_copy_state fastfc_copy
    void fastfc_copy_with(int kind, uint8_t* dst, const uint8_t* src, size_t n) noexcept nogil
    int fastfc_copy_decide(const double* seconds, int n, int dflt, double margin) noexcept nogil
    int fastfc_copy_choose() noexcept nogil
    void fastfc_copy_force(int kind) noexcept nogil
    void fastfc_copy_init() noexcept nogil

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


# -- summaries ---------------------------------------------------------------
# A large bitmap keeps a summary: one bit per word, set when the word may be
# nonzero. Every path that sets bits marks their words (bms_mark); paths
# that clear bits leave the summary as it is (a stale bit costs a look at a
# zero word, never a missed bit); clearing a whole bitmap clears its summary.
# A scan (bms_next_set) skips the words whose summary bit is clear.

cdef inline void bms_mark(uint64_t* s, Py_ssize_t start, Py_ssize_t stop) noexcept nogil:
    """The words that hold bits [start, stop) may be nonzero (s may be NULL)."""
    if s != NULL and stop > start:
        bm_set_range(s, start >> 6, ((stop - 1) >> 6) + 1)

cdef inline void bms_set_range(uint64_t* w, uint64_t* s, Py_ssize_t start,
                               Py_ssize_t stop) noexcept nogil:
    """Set bits [start, stop) and mark their words in the summary ``s``."""
    bm_set_range(w, start, stop)
    bms_mark(s, start, stop)

cdef inline void bms_rebuild(const uint64_t* w, uint64_t* s, Py_ssize_t n_words) noexcept nogil:
    """Make the summary exact: a bit for each nonzero word, none for others."""
    cdef Py_ssize_t k
    cdef uint64_t acc = 0
    for k in range(n_words):
        if w[k]:
            acc |= (<uint64_t>1) << (k & 63)
        if (k & 63) == 63 or k == n_words - 1:
            s[k >> 6] = acc
            acc = 0

# stale summary bits a scan follows before it scans the words themselves
cdef enum:
    STALE_LOOKS = 16

cdef inline Py_ssize_t bms_next_set(const uint64_t* w, const uint64_t* s, Py_ssize_t n_bits,
                                    Py_ssize_t start) noexcept nogil:
    """bm_next_set through the summary ``s`` (NULL: the plain scan)."""
    cdef Py_ssize_t n_words, k, j
    cdef int stale = 0
    if s == NULL:
        return bm_next_set(w, n_bits, start)
    if start >= n_bits or start < 0:
        return -1
    n_words = (n_bits + 63) >> 6
    k = start >> 6
    j = bm_next_set(w, min(n_bits, (k + 1) << 6), start)   # the rest of start's word
    if j >= 0:
        return j
    while True:
        j = bm_next_set(s, n_words, k + 1)
        if j < 0:
            return -1
        if w[j]:
            return (j << 6) + __builtin_ctzll(w[j])
        stale += 1
        if stale >= STALE_LOOKS:      # a summary gone stale: the words, as without one
            return bm_next_set(w, n_bits, j << 6)
        k = j
