# Included by _core.pyx: track bitmaps (TrackBitmap) and the word helpers
# that combine them.

# --------------------------------------------------------------------------
# Track bitmaps
# --------------------------------------------------------------------------

cdef class TrackBitmap:
    """One bit per track, held in ``uint64`` words.

    Parameters
    ----------
    n_bits : int
        Number of bits (tracks).
    fill : bool
        Start with every bit set (``True``) or clear (``False``, default).
    words : numpy.ndarray, optional
        Adopt this ``uint64`` array (``ceil(n_bits / 64)`` words, C-contiguous)
        as the storage instead of allocating; bits past ``n_bits`` are cleared.

    Notes
    -----
    Every operation is O(words) with hardware popcount and count-trailing-
    zeros. A bitmap of 64 words (4,096 bits) or more also keeps a
    summary, a bit per word set when the word may be nonzero, so that finding
    the next set bit skips the empty words 4,096 at a time (a TiB volume of
    4 KiB grains: 2^28 bits, 32 MiB of words, 512 KiB of summary). The
    bitmap is not locked: the object that owns it (a volume's lock, see
    :mod:`fastfc.storage.volume`) serialises access.
    """

    cdef readonly Py_ssize_t n_bits
    cdef readonly Py_ssize_t n_words
    cdef uint64_t* w
    cdef object _arr
    # the summary (NULL for a small bitmap): see _bitops.pxd
    cdef uint64_t* s
    cdef object _sarr

    def __cinit__(self, Py_ssize_t n_bits, bint fill=False, words=None):
        cdef uint64_t[::1] mv
        if n_bits < 0:
            raise ValueError(f"a bitmap needs n_bits >= 0, got {n_bits}")
        self.n_bits = n_bits
        self.n_words = (n_bits + 63) >> 6
        if words is None:
            self._arr = np.zeros(max(self.n_words, 1), dtype=np.uint64)
        else:
            if not isinstance(words, np.ndarray) or words.dtype != np.uint64:
                raise TypeError("words must be a numpy uint64 array")
            if words.ndim != 1 or words.shape[0] < self.n_words:
                raise ValueError(
                    f"words holds {words.size} words; {self.n_words} are needed "
                    f"for {n_bits} bits")
            if not words.flags.c_contiguous or not words.flags.writeable:
                raise ValueError("words must be C-contiguous and writeable")
            # no bits (e.g. unpickling an empty bitmap): nothing to share, but
            # self.w still needs a word to point at
            self._arr = words if words.shape[0] else np.zeros(1, dtype=np.uint64)
        mv = self._arr
        self.w = &mv[0]
        cdef uint64_t[::1] sv
        if self.n_words >= SUMMARY_WORDS:
            self._sarr = np.zeros((self.n_words + 63) >> 6, dtype=np.uint64)
            sv = self._sarr
            self.s = &sv[0]
        if fill:
            bms_set_range(self.w, self.s, 0, n_bits)
        elif words is not None:
            if self.n_words and (n_bits & 63):
                self.w[self.n_words - 1] &= low_mask(n_bits & 63)
            self._summarize()

    cdef void _summarize(self) noexcept:
        """Make the summary exact (after the words changed wholesale)."""
        if self.s != NULL:
            bms_rebuild(self.w, self.s, self.n_words)

    # -- single bits -------------------------------------------------------
    cdef inline int _check(self, Py_ssize_t i) except -1:
        if i < 0 or i >= self.n_bits:
            raise IndexError(f"bit {i} is out of range for a bitmap of {self.n_bits} bits")
        return 0

    cdef inline int _check_range(self, Py_ssize_t start, Py_ssize_t stop) except -1:
        if start < 0 or stop > self.n_bits or start > stop:
            raise IndexError(
                f"range [{start}, {stop}) is not within a bitmap of {self.n_bits} bits")
        return 0

    cdef inline int _check_same(self, TrackBitmap other) except -1:
        if other is None:
            raise TypeError("expected a TrackBitmap, got None")
        if other.n_bits != self.n_bits:
            raise ValueError(
                f"bitmaps differ in length: {self.n_bits} and {other.n_bits} bits")
        return 0

    def __len__(self):
        return self.n_bits

    def set(self, Py_ssize_t i):
        """Set bit ``i``."""
        self._check(i)
        bm_set(self.w, i)
        bms_mark(self.s, i, i + 1)

    def clear(self, Py_ssize_t i):
        """Clear bit ``i``."""
        self._check(i)
        bm_clear(self.w, i)
        if self.s != NULL and not self.w[i >> 6]:
            bm_clear(self.s, i >> 6)

    def test(self, Py_ssize_t i):
        """Return whether bit ``i`` is set."""
        self._check(i)
        return bool(bm_test(self.w, i))

    def __getitem__(self, Py_ssize_t i):
        self._check(i)
        return bool(bm_test(self.w, i))

    # -- ranges ------------------------------------------------------------
    def set_range(self, Py_ssize_t start, Py_ssize_t stop):
        """Set bits ``[start, stop)``."""
        self._check_range(start, stop)
        bms_set_range(self.w, self.s, start, stop)

    def clear_range(self, Py_ssize_t start, Py_ssize_t stop):
        """Clear bits ``[start, stop)``."""
        self._check_range(start, stop)
        bm_clear_range(self.w, start, stop)
        cdef Py_ssize_t a, b
        if self.s != NULL and stop > start:
            # the words the range covers are zero now, the two at its ends
            # perhaps: their summary bits follow (kernels that clear bits
            # leave them set, which is never wrong)
            a, b = start >> 6, (stop - 1) >> 6
            bm_clear_range(self.s, a, b + 1)
            if self.w[a]:
                bm_set(self.s, a)
            if self.w[b]:
                bm_set(self.s, b)

    def any_range(self, Py_ssize_t start, Py_ssize_t stop):
        """Return whether any bit in ``[start, stop)`` is set."""
        self._check_range(start, stop)
        return bool(bm_any_range(self.w, start, stop))

    def fill(self, bint value=True):
        """Set (or clear) every bit."""
        if value:
            bms_set_range(self.w, self.s, 0, self.n_bits)
            return
        if self.n_words >= NOGIL_WORDS:
            with nogil:
                memset(self.w, 0, self.n_words * 8)
        else:
            memset(self.w, 0, self.n_words * 8)
        if self.s != NULL:
            memset(self.s, 0, ((self.n_words + 63) >> 6) * 8)

    # -- counting and scanning --------------------------------------------
    def count(self):
        """Number of set bits (hardware popcount over the words)."""
        cdef Py_ssize_t n = self.n_words
        cdef const uint64_t* w = self.w
        cdef long long c
        if n >= NOGIL_WORDS:
            with nogil:
                c = bm_popcount_words(w, n)
        else:
            c = bm_popcount_words(w, n)
        return c

    def count_range(self, Py_ssize_t start, Py_ssize_t stop):
        """Number of set bits in ``[start, stop)``."""
        cdef Py_ssize_t a, b, k
        cdef long long c = 0
        self._check_range(start, stop)
        if start == stop:
            return 0
        a = start >> 6
        b = (stop - 1) >> 6
        if a == b:
            return __builtin_popcountll((self.w[a] >> (start & 63)) & low_mask(stop - start))
        c = __builtin_popcountll(self.w[a] & ~low_mask(start & 63))
        c += bm_popcount_words(self.w + a + 1, b - a - 1)
        c += __builtin_popcountll(self.w[b] & low_mask(((stop - 1) & 63) + 1))
        return c

    def count_groups(self, Py_ssize_t group):
        """Number of groups of ``group`` bits (a power of two; bit ``i`` is in
        group ``i // group``) with any bit set: the tracks with a grain set,
        when the bits are grains and ``group`` the grains per track."""
        cdef Py_ssize_t k, j, n = self.n_words, per
        cdef long long c = 0
        cdef uint64_t x, lanes
        cdef int s
        if group < 1 or group & (group - 1):
            raise ValueError(f"group must be a power of two, got {group}")
        if group == 1:
            return self.count()
        if group < 64:
            lanes = 0
            for s in range(0, 64, group):
                lanes |= (<uint64_t>1) << s
            for k in range(n):
                x = self.w[k]
                if x:
                    s = 1
                    while s < group:
                        x |= x >> s
                        s <<= 1
                    c += __builtin_popcountll(x & lanes)
            return c
        per = group >> 6
        k = 0
        while k < n:
            for j in range(k, min(k + per, n)):
                if self.w[j]:
                    c += 1
                    break
            k += per
        return c

    def any_groups(self, Py_ssize_t group):
        """A bitmap of ``ceil(n_bits / group)`` bits: bit ``g`` set when any
        bit of group ``g`` is (the tracks with a grain set)."""
        cdef Py_ssize_t i, g
        if group < 1 or group & (group - 1):
            raise ValueError(f"group must be a power of two, got {group}")
        cdef TrackBitmap out = TrackBitmap((self.n_bits + group - 1) // group)
        i = bms_next_set(self.w, self.s, self.n_bits, 0)
        while i >= 0:
            g = i // group
            bms_set_range(out.w, out.s, g, g + 1)
            i = bms_next_set(self.w, self.s, self.n_bits, (g + 1) * group)
        return out

    def spread(self, Py_ssize_t group):
        """The inverse of :meth:`any_groups`: a bitmap of ``n_bits * group``
        bits with every bit of group ``g`` set when bit ``g`` is."""
        if group < 1 or group & (group - 1):
            raise ValueError(f"group must be a power of two, got {group}")
        cdef TrackBitmap out = TrackBitmap(self.n_bits * group)
        cdef Py_ssize_t a = bms_next_set(self.w, self.s, self.n_bits, 0), b
        while a >= 0:
            b = bm_next_clear(self.w, self.n_bits, a)
            if b < 0:
                b = self.n_bits
            bms_set_range(out.w, out.s, a * group, b * group)
            a = bms_next_set(self.w, self.s, self.n_bits, b)
        return out

    def any(self):
        """Whether any bit is set."""
        return bms_next_set(self.w, self.s, self.n_bits, 0) >= 0

    def all(self):
        """Whether every bit is set (true for an empty bitmap)."""
        return bm_next_clear(self.w, self.n_bits, 0) < 0

    def find_next_set(self, Py_ssize_t start=0):
        """Index of the first set bit at or after ``start``, or -1."""
        if start < 0:
            raise IndexError(f"start must be >= 0, got {start}")
        return bms_next_set(self.w, self.s, self.n_bits, start)

    def find_next_clear(self, Py_ssize_t start=0):
        """Index of the first clear bit at or after ``start``, or -1."""
        if start < 0:
            raise IndexError(f"start must be >= 0, got {start}")
        return bm_next_clear(self.w, self.n_bits, start)

    def runs(self, Py_ssize_t start=0, stop=None):
        """An iterator of ``(first, last + 1)`` for each run of set bits in
        ``[start, stop)`` (the range is checked now, not at first use)."""
        cdef Py_ssize_t end = self.n_bits if stop is None else stop
        self._check_range(start, end)
        return self._runs(start, end)

    def _runs(self, Py_ssize_t start, Py_ssize_t end):
        cdef Py_ssize_t a, b
        a = bms_next_set(self.w, self.s, end, start)
        while 0 <= a < end:
            b = bm_next_clear(self.w, end, a)
            if b < 0:
                b = end
            yield (a, b)
            a = bms_next_set(self.w, self.s, end, b)

    def set_indices(self):
        """All set bit indices as an ``int64`` array (for tests and tools)."""
        return np.flatnonzero(self.to_bools())

    def to_bools(self):
        """The bits as a ``bool`` array of length ``n_bits``."""
        bits = np.unpackbits(self._arr[:self.n_words].view(np.uint8), bitorder="little")
        return bits[:self.n_bits].astype(bool)

    @staticmethod
    def from_bools(bools):
        """A bitmap holding the truth values of a 1-D array."""
        b = np.asarray(bools, dtype=bool)
        if b.ndim != 1:
            raise ValueError("from_bools takes a 1-D array")
        b = np.ascontiguousarray(b)
        n = b.shape[0]
        bm = TrackBitmap(n)
        packed = np.packbits(b, bitorder="little")
        bm._arr.view(np.uint8)[:packed.size] = packed
        bm._summarize()
        return bm

    # -- whole-bitmap algebra ----------------------------------------------
    cdef TrackBitmap _apply(self, int op, TrackBitmap other):
        self._check_same(other)
        words_op(op, self.w, other.w, self.n_words)
        if self.s != NULL:
            # (same length: other has a summary too) OR and COPY bring
            # other's words; AND and AND-NOT only clear bits
            if op == OP_OR or op == OP_COPY:
                words_op(op, self.s, other.s, (self.n_words + 63) >> 6)
        return self

    def or_(self, TrackBitmap other):
        """``self |= other``; returns self."""
        return self._apply(OP_OR, other)

    def and_(self, TrackBitmap other):
        """``self &= other``; returns self."""
        return self._apply(OP_AND, other)

    def andnot(self, TrackBitmap other):
        """``self &= ~other``; returns self."""
        return self._apply(OP_ANDNOT, other)

    def copy_from(self, TrackBitmap other):
        """Make self equal to ``other``; returns self."""
        return self._apply(OP_COPY, other)

    def copy(self):
        """A new bitmap with the same bits."""
        cdef TrackBitmap r = TrackBitmap(self.n_bits)
        words_op(OP_COPY, r.w, self.w, self.n_words)
        if r.s != NULL:
            words_op(OP_COPY, r.s, self.s, (self.n_words + 63) >> 6)
        return r

    def __or__(self, TrackBitmap other):
        return self.copy().or_(other)

    def __and__(self, TrackBitmap other):
        return self.copy().and_(other)

    def __sub__(self, TrackBitmap other):
        return self.copy().andnot(other)

    def __eq__(self, other):
        if not isinstance(other, TrackBitmap):
            return NotImplemented
        cdef TrackBitmap o = <TrackBitmap>other
        if o.n_bits != self.n_bits:
            return False
        return self.n_words == 0 or memcmp_words(self.w, o.w, self.n_words)

    __hash__ = None

    @property
    def words(self):
        """The ``uint64`` words: a read-only view that shares memory with the
        bitmap (change bits through the bitmap's methods)."""
        return read_only(self._arr[:self.n_words])

    def _raw_words(self):
        """The words as a writable view (tests and benchmarks only: a write
        through it bypasses whatever owns the bitmap). Every word is marked
        in the summary, which a write through the view may make nonzero."""
        if self.s != NULL:
            bm_set_range(self.s, 0, self.n_words)
        return self._arr[:self.n_words]

    @property
    def nbytes(self):
        return self.n_words * 8

    def __reduce__(self):
        return (_bitmap_from_words, (self.n_bits, self._arr[:self.n_words].copy()))

    def __repr__(self):
        return f"TrackBitmap(n_bits={self.n_bits}, set={self.count()})"


def _bitmap_from_words(n_bits, words):
    return TrackBitmap(n_bits, words=words)


def read_only(array):
    """A read-only view of ``array`` that cannot be made writeable again: its
    base is a read-only memoryview, which also keeps the memory (and any
    mapping under it) alive for as long as the view lives."""
    return np.frombuffer(memoryview(array).toreadonly(), dtype=array.dtype)


cdef inline bint memcmp_words(const uint64_t* a, const uint64_t* b, Py_ssize_t n) noexcept nogil:
    # glibc's memcmp already picks its vector width at run time
    return memcmp(a, b, n * 8) == 0


def combine_or3(TrackBitmap a, TrackBitmap b, TrackBitmap c, TrackBitmap out=None):
    """``a | b | c`` in one pass (b or c may be None), into ``out`` (a new
    bitmap if None); returns it."""
    cdef TrackBitmap r = TrackBitmap(a.n_bits) if out is None else out
    a._check_same(r)
    cdef Py_ssize_t k, n = a.n_words
    cdef uint64_t* rw = r.w
    cdef const uint64_t* aw = a.w
    cdef const uint64_t* bw
    cdef const uint64_t* cw
    if b is not None:
        a._check_same(b)
    if c is not None:
        a._check_same(c)
    if b is not None and c is not None:
        bw = b.w
        cw = c.w
        if n >= NOGIL_WORDS:
            with nogil:
                bm_or3_words(rw, aw, bw, cw, n)
        else:
            bm_or3_words(rw, aw, bw, cw, n)
        if r.s != NULL:
            bm_or3_words(r.s, a.s, b.s, c.s, (n + 63) >> 6)
    else:
        if b is None:
            b = c
        words_op(OP_COPY, rw, aw, n)
        if r.s != NULL:
            words_op(OP_COPY, r.s, a.s, (n + 63) >> 6)
        if b is not None:
            r.or_(b)
    return r


cdef enum:
    OP_OR = FASTFC_OP_OR
    OP_AND = FASTFC_OP_AND
    OP_ANDNOT = FASTFC_OP_ANDNOT
    OP_COPY = FASTFC_OP_COPY


cdef inline void words_op(int op, uint64_t* d, const uint64_t* s, Py_ssize_t n) noexcept:
    """``d op= s`` over n words, releasing the GIL only for large bitmaps."""
    if n >= NOGIL_WORDS:
        with nogil:
            bm_words_op(op, d, s, n)
    else:
        bm_words_op(op, d, s, n)
