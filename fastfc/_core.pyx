# cython: language_level=3
"""fastfc's kernels: track bitmaps, copy kernels and the hot host I/O path.

Everything here is private; the public classes in ``fastfc.storage.volume`` and
``fastfc.copyservices.flashcopy`` subclass the ``cdef`` bases so that a host read or write
is one C method from the Python call to the ``memcpy``.

Locking (see DESIGN-NOTES): each volume has one re-entrant lock. A volume's
lock guards its data, its flags, and the bitmaps of every FlashCopy
relationship in which it is the *source* (``to_copy``, ``src_changed``,
``tgt_changed``) and of the PPRC pair in which it is the primary. A target's
data on tracks still to copy is only touched under the source's lock. When two
locks are needed they are taken in volume-id order, except a PPRC pair's:
the primary's, then the secondary's, always (an update, a drain, and the
pair's own steps, ``pprc.pair_locked``). Copies of a track or more
run with the GIL released; smaller copies keep it (it is cheaper), except into
a volume on a disk (``_file_backed``), where any store may take a write fault
into the filesystem: those run without the GIL whatever their size. PPRC
updates reach such a volume (and its FlashCopy targets' copy-on-write) with
``pwrite`` of the changed pages, not stores through the mapping.
"""

cimport cython
from libc.stdint cimport uint64_t, uint8_t, int64_t
from libc.string cimport memcmp, memcpy, memset
from libc.stdlib cimport calloc, free
from cpython.buffer cimport (PyObject_GetBuffer, PyBuffer_Release,
                             PyBUF_C_CONTIGUOUS, PyBUF_FORMAT, PyBUF_WRITABLE)
from cpython.pythread cimport (PyThread_type_lock, PyThread_allocate_lock,
                               PyThread_free_lock, PyThread_acquire_lock,
                               PyThread_release_lock, WAIT_LOCK, NOWAIT_LOCK,
                               PyThread_get_thread_ident)

from posix.time cimport clock_gettime, timespec, CLOCK_MONOTONIC
from posix.types cimport off_t

cdef extern from "<fcntl.h>" nogil:
    int posix_fallocate(int fd, off_t offset, off_t length)

cdef extern from "<unistd.h>" nogil:
    ssize_t pwrite(int fd, const void* buf, size_t count, off_t offset)

from libc.errno cimport errno, EINTR, EIO

cdef extern from "pythread.h":
    ctypedef enum PyLockStatus:
        PY_LOCK_FAILURE
        PY_LOCK_ACQUIRED
        PY_LOCK_INTR
    PyLockStatus PyThread_acquire_lock_timed(PyThread_type_lock, long long, int) nogil

from fastfc._bitops cimport *

import errno as _errno
import itertools
import os
import warnings

import numpy as np

from fastfc.errors import (InvalidImageError, NoSpaceError, StateError,
                           VolumeClosedError, WriteInhibitedError)

# Copies of at least this many bytes release the GIL (DESIGN-NOTES: below it
# the release costs more than it frees).
cdef Py_ssize_t NOGIL_BYTES = 65536
# Bitmap operations release the GIL only from this many words (64 KiB) up:
# a thread that gives the GIL up waits for busy Python threads to hand it
# back (up to the switch interval each time), far longer than a small scan.
cdef Py_ssize_t NOGIL_WORDS = 8192
# Host writes to a volume on a disk (measured, scripts/durable_datapath_measure.py):
# 0 store through the mapping without the GIL, 1 pwrite to its file without
# the GIL, 2 pwrite with the GIL kept below NOGIL_BYTES, 3 store with the GIL
# kept below NOGIL_BYTES (as in memory).
cdef int HOST_MODE = 0
def _largest_folio():
    """The largest page-cache folio the kernel makes: a PMD (2 MiB on x86-64
    and 4 KiB-page arm64), never less than 2 MiB here."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/hpage_pmd_size") as f:
            return max(2 << 20, int(f.read()))
    except (OSError, ValueError):
        return 2 << 20


#: A thin volume on a disk filesystem gets its blocks in aligned chunks of
#: this many bytes (or whole tracks, if larger): see VolumeBase._reserve_runs.
THIN_CHUNK = _largest_folio()
cdef Py_ssize_t CHUNK = THIN_CHUNK


def _set_host_mode(int mode):
    """Measurement switch: how host writes reach disk-backed volumes."""
    global HOST_MODE
    if not 0 <= mode <= 3:
        raise ValueError("mode is 0..3")
    HOST_MODE = mode


def _set_host_pwrite(bint on):
    """Measurement switch: host writes to disk-backed volumes with pwrite
    (mode 1) or stores (mode 0)."""
    _set_host_mode(1 if on else 0)

# --------------------------------------------------------------------------
# Kernel selection (_kernels.h): the build targets a baseline ISA; the AVX2
# and AVX-512 variants of the word and copy kernels are picked here, once.
# --------------------------------------------------------------------------

_LEVELS = ("scalar", "avx2", "avx512")


def cpu_features():
    """The CPU features the kernel variants use, as ``{name: bool}``."""
    cdef int f = fastfc_cpu_features()
    return {"avx2": bool(f & FASTFC_HAS_AVX2), "avx512f": bool(f & FASTFC_HAS_AVX512F),
            "avx512vpopcntdq": bool(f & FASTFC_HAS_VPOPCNTDQ)}


def kernels():
    """The variant each dispatched kernel runs, ``{kernel: "scalar" | "avx2" |
    "avx512"}``."""
    return {fastfc_kernel_names[i].decode(): fastfc_level_names[fastfc_k.level[i]].decode()
            for i in range(FASTFC_N_KERNELS)}


def _use_kernels(str level="avx512"):
    """Pick the best variants up to ``level`` that this CPU runs and return
    :func:`kernels`. For tests and benchmarks; no kernel may be running in
    another thread meanwhile."""
    if level not in _LEVELS:
        raise ValueError(f"level must be one of {', '.join(_LEVELS)}, got {level!r}")
    fastfc_select_kernels(_LEVELS.index(level))
    return kernels()


def build_baseline():
    """The instruction sets the build assumes everywhere (setup.py's
    ``-march``), e.g. ``("sse4.2", "popcnt")`` for x86-64-v2; empty when it
    assumes nothing past the architecture's base."""
    return tuple([fastfc_baseline_names[i].decode() for i in range(fastfc_baseline_count())])


def _copy_stream(uint8_t[::1] dst, const uint8_t[::1] src):
    """Copy ``src`` into the start of ``dst`` with the current copy_stream
    variant (a test hook)."""
    if src.shape[0] > dst.shape[0]:
        raise ValueError(f"dst holds {dst.shape[0]} bytes, src {src.shape[0]}")
    if src.shape[0] == 0:
        return
    with nogil:
        copy_stream(&dst[0], &src[0], src.shape[0])


def _select_at_import():
    cdef const char* missing = fastfc_missing_baseline()
    if missing != NULL:
        raise ImportError(
            f"this build of fastfc needs a CPU with {missing.decode()}; rebuild it for "
            "this machine with FASTFC_PORTABLE=1 pip install --no-binary fastfc fastfc")
    env = os.environ.get("FASTFC_KERNELS", "")
    level = env.strip().lower() or "avx512"
    if level not in _LEVELS:
        _environment_problem(f"FASTFC_KERNELS must be one of {', '.join(_LEVELS)}, "
                             f"got {env!r}")
        level = "avx512"
    _use_kernels(level)


# A bad FASTFC_KERNELS or FASTFC_COPY_THREADS does not stop the import: the
# value is ignored (the default used), a RuntimeWarning says so at the first
# volume made (not during the import, so that the command line, which refuses
# such a value as a usage error, prints one line), and environment_problems()
# names it.
_environment_problems = []
cdef bint _environment_unwarned = False


cdef _environment_problem(str problem):
    global _environment_unwarned
    if problem not in _environment_problems:
        _environment_problems.append(problem)
        _environment_unwarned = True


def environment_problems():
    """What is wrong with the ``FASTFC_KERNELS`` and ``FASTFC_COPY_THREADS``
    values this process saw (each ignored, its default used): one line each."""
    return tuple(_environment_problems)


cdef _warn_environment():
    global _environment_unwarned
    _environment_unwarned = False
    for problem in _environment_problems:
        warnings.warn(f"{problem}: ignored, the default is used", RuntimeWarning)


_select_at_import()


# Origins of a write: a host, or a PPRC update arriving at a secondary.
cdef enum:
    ORIGIN_HOST = 0
    ORIGIN_PPRC = 1

HOST = ORIGIN_HOST
PPRC = ORIGIN_PPRC

_volume_ids = itertools.count(1)

# Crash tests stop the world between a copy-on-write and the write it
# protects (fastfc.faults point "cow"); None keeps the I/O path hook-free.
cdef object _cow_hook = None


def set_cow_hook(hook):
    """Install ``hook(source_volume)``, called after each copy-on-write and
    before the host data lands (None removes it)."""
    global _cow_hook
    _cow_hook = hook


cdef class VolumeBase


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
    zeros. The bitmap is not locked: the object that owns it (a volume's lock,
    see :mod:`fastfc.storage.volume`) serialises access.
    """

    cdef readonly Py_ssize_t n_bits
    cdef readonly Py_ssize_t n_words
    cdef uint64_t* w
    cdef object _arr

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
        if fill:
            bm_set_range(self.w, 0, n_bits)
        elif words is not None and self.n_words and (n_bits & 63):
            self.w[self.n_words - 1] &= low_mask(n_bits & 63)

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

    def clear(self, Py_ssize_t i):
        """Clear bit ``i``."""
        self._check(i)
        bm_clear(self.w, i)

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
        bm_set_range(self.w, start, stop)

    def clear_range(self, Py_ssize_t start, Py_ssize_t stop):
        """Clear bits ``[start, stop)``."""
        self._check_range(start, stop)
        bm_clear_range(self.w, start, stop)

    def any_range(self, Py_ssize_t start, Py_ssize_t stop):
        """Return whether any bit in ``[start, stop)`` is set."""
        self._check_range(start, stop)
        return bool(bm_any_range(self.w, start, stop))

    def fill(self, bint value=True):
        """Set (or clear) every bit."""
        if value:
            bm_set_range(self.w, 0, self.n_bits)
        elif self.n_words >= NOGIL_WORDS:
            with nogil:
                memset(self.w, 0, self.n_words * 8)
        else:
            memset(self.w, 0, self.n_words * 8)

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

    def any(self):
        """Whether any bit is set."""
        return bm_next_set(self.w, self.n_bits, 0) >= 0

    def all(self):
        """Whether every bit is set (true for an empty bitmap)."""
        return bm_next_clear(self.w, self.n_bits, 0) < 0

    def find_next_set(self, Py_ssize_t start=0):
        """Index of the first set bit at or after ``start``, or -1."""
        if start < 0:
            raise IndexError(f"start must be >= 0, got {start}")
        return bm_next_set(self.w, self.n_bits, start)

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
        a = bm_next_set(self.w, end, start)
        while 0 <= a < end:
            b = bm_next_clear(self.w, end, a)
            if b < 0:
                b = end
            yield (a, b)
            a = bm_next_set(self.w, end, b)

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
        return bm

    # -- whole-bitmap algebra ----------------------------------------------
    cdef TrackBitmap _apply(self, int op, TrackBitmap other):
        self._check_same(other)
        words_op(op, self.w, other.w, self.n_words)
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
        through it bypasses whatever owns the bitmap)."""
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
    else:
        if b is None:
            b = c
        words_op(OP_COPY, rw, aw, n)
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


# --------------------------------------------------------------------------
# Copy kernels (no GIL)
# --------------------------------------------------------------------------

# copy_stream (from _bitops.pxd / _kernels.h) copies with non-temporal stores:
# a track copied to a FlashCopy target or a secondary is not read back soon.

# Runs of at least this many bytes are copied with streaming stores
# (copy_stream); shorter ones with memcpy, whose cached stores win when the
# destination is in cache anyway.
cdef Py_ssize_t STREAM_BYTES = 65536


# -- copy threads (fastfc/_pool.h) -------------------------------------------
cdef extern from "_pool.h" nogil:
    ctypedef void (*fastfc_copy_fn)(uint8_t* dst, const uint8_t* src, size_t n) noexcept nogil
    int FASTFC_POOL_MAX
    int fastfc_pool_set_threads(int n)
    int fastfc_pool_copy(uint8_t* dst, const uint8_t* src, size_t n, size_t min_piece,
                         fastfc_copy_fn fn)
    int fastfc_pool_threads "fastfc_pool.threads"
    unsigned long fastfc_pool_copies "fastfc_pool.copies"

# A copy is split across the copy threads when it is at least two pieces of
# this many bytes (a 4 MiB background-copy chunk: two threads of 2 MiB);
# smaller copies stay on the calling thread.
cdef size_t PAR_PIECE = 512 * 1024


cdef void _stream_piece(uint8_t* dst, const uint8_t* src, size_t n) noexcept nogil:
    if n >= <size_t>STREAM_BYTES:
        copy_stream(dst, src, n)
    else:
        memcpy(dst, src, n)


cdef inline void copy_big(uint8_t* dst, const uint8_t* src, size_t n) noexcept nogil:
    """Copy ``n`` bytes, streaming (non-temporal) when large, split across
    the copy threads when it is worth it (:func:`set_copy_threads`)."""
    if n >= 2 * PAR_PIECE and fastfc_pool_threads > 1:
        fastfc_pool_copy(dst, src, n, PAR_PIECE, _stream_piece)
    elif n >= <size_t>STREAM_BYTES:
        copy_stream(dst, src, n)
    else:
        memcpy(dst, src, n)


def _default_copy_threads():
    env = os.environ.get("FASTFC_COPY_THREADS", "")
    if env.strip():
        try:
            n = int(env)
        except ValueError:
            n = 0
        if n >= 1:
            return n
        _environment_problem(f"FASTFC_COPY_THREADS must be a whole number >= 1, got {env!r}")
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    return max(1, min(n, 4))


def set_copy_threads(n=None):
    """Set how many threads (the calling one included) split one large copy:
    a background-copy chunk, a reverse restore, a drain run of 1 MiB or more.
    ``None``: the default, ``FASTFC_COPY_THREADS`` if set, else the cores
    this process may run on (at most 4). 1 copies on the calling thread
    only. Returns the number set (at most 16)."""
    if n is None:
        n = _default_copy_threads()
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"copy threads must be an int, got {type(n).__name__}")
    if n < 1:
        raise ValueError(f"copy threads must be >= 1, got {n}")
    return fastfc_pool_set_threads(min(n, 1024))     # the pool takes at most 16


def copy_threads():
    """The number of copy threads (:func:`set_copy_threads`)."""
    return fastfc_pool_threads


def pool_copies():
    """How many copies were split across copy threads so far (for tests)."""
    return fastfc_pool_copies


def _pool_copy(uint8_t[::1] dst, const uint8_t[::1] src):
    """Copy ``src`` into the start of ``dst`` as large copies are made
    (split across the copy threads when it is worth it); a test and
    benchmark hook. Returns the threads that took part."""
    cdef int k
    cdef size_t n = src.shape[0]
    if src.shape[0] > dst.shape[0]:
        raise ValueError(f"dst holds {dst.shape[0]} bytes, src {src.shape[0]}")
    if n == 0:
        return 1
    with nogil:
        if n >= 2 * PAR_PIECE and fastfc_pool_threads > 1:
            k = fastfc_pool_copy(&dst[0], &src[0], n, PAR_PIECE, _stream_piece)
        else:
            _stream_piece(&dst[0], &src[0], n)
            k = 1
    return k


set_copy_threads()


cdef Py_ssize_t copy_set_runs(uint8_t* dst, const uint8_t* src, uint64_t* w,
                              Py_ssize_t start, Py_ssize_t stop, Py_ssize_t budget,
                              int shift, Py_ssize_t* resume) noexcept nogil:
    """Copy the runs of set tracks in ``[start, stop)`` from src to dst and
    clear their bits, until ``budget`` tracks are copied. Returns the number
    of tracks copied; ``resume[0]`` is where to carry on (``stop`` if done)."""
    cdef Py_ssize_t done = 0, a, b, lim
    a = bm_next_set(w, stop, start)
    while 0 <= a < stop and done < budget:
        # the run ends at the first clear bit, or where the budget does: look
        # no further (a chunk of a long all-set bitmap scans O(chunk), not
        # O(rest of the bitmap))
        lim = a + (budget - done)
        if lim > stop:
            lim = stop
        b = bm_next_clear(w, lim, a)
        if b < 0:
            b = lim
        copy_big(dst + (a << shift), src + (a << shift), (b - a) << shift)
        bm_clear_range(w, a, b)
        done += b - a
        a = bm_next_set(w, stop, b)
    resume[0] = a if 0 <= a < stop else stop
    return done


cdef void copy_redirected(uint8_t* dst, const uint8_t* own, const uint8_t* other,
                          const uint64_t* w, Py_ssize_t offset, Py_ssize_t n,
                          int shift) noexcept nogil:
    """Read ``n`` bytes at ``offset`` of a target: each track from ``other``
    (the source) where its bit is set in ``w``, else from ``own``."""
    cdef Py_ssize_t pos = offset, end = offset + n, t, piece_end
    cdef const uint8_t* base
    while pos < end:
        t = pos >> shift
        piece_end = (t + 1) << shift
        # extend over following tracks with the same bit value
        while piece_end < end and bm_test(w, piece_end >> shift) == bm_test(w, t):
            piece_end += (<Py_ssize_t>1) << shift
        if piece_end > end:
            piece_end = end
        base = other if bm_test(w, t) else own
        memcpy(dst + (pos - offset), base + pos, piece_end - pos)
        pos = piece_end


cdef int pwrite_all(int fd, const uint8_t* buf, Py_ssize_t n, off_t off) noexcept nogil:
    """Write ``n`` bytes at ``off`` of ``fd`` (retrying short writes and
    EINTR). Returns 0, or the errno of the failure."""
    cdef ssize_t got
    while n > 0:
        got = pwrite(fd, buf, <size_t>n, off)
        if got < 0:
            if errno == EINTR:
                continue
            return errno
        if got == 0:
            return EIO
        buf += got
        off += got
        n -= got
    return 0


cdef int put_changed_pages(int fd, const uint8_t* cur, const uint8_t* src, Py_ssize_t n,
                           off_t off) noexcept nogil:
    """Make the file bytes ``[off, off + n)`` of ``fd`` (mapped at ``cur``)
    equal to ``src``, writing only the 4 KiB pages that differ, each run of
    them with one ``pwrite``. A syscall write lands in the page cache the
    mapping shows, without the write fault (``page_mkwrite``, TLB shootdown)
    a store to a page writeback has cleaned takes. Returns 0 or an errno
    (the pages before the failing run written)."""
    cdef Py_ssize_t pos = 0, step, run = -1
    cdef int err
    while pos < n:
        step = n - pos if n - pos < 4096 else 4096
        if memcmp(cur + pos, src + pos, step) != 0:
            if run < 0:
                run = pos
        elif run >= 0:
            err = pwrite_all(fd, src + run, pos - run, off + run)
            if err:
                return err
            run = -1
        pos += step
    if run >= 0:
        return pwrite_all(fd, src + run, n - run, off + run)
    return 0


# --------------------------------------------------------------------------
# Buffers
# --------------------------------------------------------------------------

cdef int get_read_buffer(object data, Py_buffer* view) except -1:
    """Borrow ``data`` as contiguous bytes; TypeError/ValueError otherwise."""
    try:
        PyObject_GetBuffer(data, view, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT)
    except BufferError as e:
        raise ValueError(f"data must be C-contiguous: {e}") from None
    except TypeError:
        raise TypeError(
            f"data must be bytes-like or a uint8 array, not {type(data).__name__}") from None
    if view.itemsize != 1 or (view.format != NULL and not (
            view.format[0] == b'B' and view.format[1] == 0)):
        fmt = view.format.decode() if view.format != NULL else "?"
        PyBuffer_Release(view)
        raise TypeError(f"data must be uint8 bytes, got a buffer of format {fmt!r}")
    return 0


def as_offsets(offsets):
    """Byte offsets of a batch as int64; TypeError unless they are integers
    (a float offset must not be truncated to some other place)."""
    a = np.asarray(offsets)
    if a.size and a.dtype.kind not in "iu":
        raise TypeError(f"offsets must be integers, got an array of {a.dtype}")
    return np.ascontiguousarray(a, dtype=np.int64)


cdef int get_write_buffer(object out, Py_buffer* view) except -1:
    try:
        PyObject_GetBuffer(out, view, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | PyBUF_WRITABLE)
    except BufferError as e:
        raise ValueError(f"out must be a writable C-contiguous buffer: {e}") from None
    except TypeError:
        raise TypeError(f"out must be a writable uint8 buffer, not {type(out).__name__}") from None
    if view.itemsize != 1 or (view.format != NULL and not (
            view.format[0] == b'B' and view.format[1] == 0)):
        PyBuffer_Release(view)
        raise TypeError("out must be a uint8 buffer")
    return 0


# --------------------------------------------------------------------------
# Volumes, relationships and mirror hooks
# --------------------------------------------------------------------------

cdef class MirrorBase:
    """Primary-side hook of a PPRC pair, consulted by every host write.

    ``oos``: tracks owed to the secondary, set by every write before its data
    lands (a Metro Mirror pair clears them again once the secondary has it).
    ``cg``: tracks owed to the consistency group being drained, or None; a
    write touching one first calls ``_collide`` so the CG version is saved.
    ``sync``: Metro Mirror; each write calls ``_sync_write(offset, length,
    pending)`` before it completes, with the primary's lock held; ``pending``
    tells whether a track of the write was already out of sync before it.
    """

    cdef public TrackBitmap oos
    cdef public TrackBitmap cg
    cdef public TrackBitmap spare
    cdef public bint sync

    def _collide(self, Py_ssize_t t0, Py_ssize_t t1):
        pass

    def _sync_write(self, Py_ssize_t offset, Py_ssize_t length, bint pending):
        pass


cdef class RelationshipBase:
    """The bitmaps and flags of a FlashCopy relationship, read by the I/O path.

    All fields are guarded by the source volume's lock.
    """

    cdef public VolumeBase source
    cdef public VolumeBase target
    cdef public TrackBitmap to_copy
    cdef public TrackBitmap src_changed
    cdef public TrackBitmap tgt_changed
    cdef public bint inhibit_target_write
    cdef public bint revertible
    cdef public bint active

    def _copy_chunk(self, Py_ssize_t start, Py_ssize_t max_tracks):
        """Copy up to ``max_tracks`` set tracks from ``start`` on, under the
        locks; return ``(tracks copied, resume position)``."""
        cdef VolumeBase S = self.source, T = self.target
        cdef Py_ssize_t done = 0, resume = 0, n
        cdef uint64_t* w
        cdef int shift
        lock_two(S, T)
        try:
            if not self.active or self.revertible:
                return 0, start
            if S.base == NULL or T.base == NULL:
                raise VolumeClosedError("background copy needs both volumes open")
            n = S.n_tracks
            shift = S.track_shift
            w = self.to_copy.w
            T._reserve_runs(w, start, n, max_tracks)
            if S._reads_allocate:
                S._reserve_runs(w, start, n, max_tracks)
            with nogil:
                done = copy_set_runs(T.base, S.base, w, start, n, max_tracks, shift, &resume)
        finally:
            unlock_two(S, T)
        return done, resume

    def _copy_tracks_where(self, TrackBitmap mask, bint to_source):
        """Copy every track set in ``mask`` between the volumes (target ->
        source when ``to_source``), clearing ``mask``. Caller holds the locks."""
        cdef VolumeBase S = self.source, T = self.target
        cdef Py_ssize_t resume, done
        cdef uint8_t* dst = S.base if to_source else T.base
        cdef const uint8_t* src = T.base if to_source else S.base
        cdef Py_ssize_t n = S.n_tracks
        cdef int shift = S.track_shift
        S._reserve_runs(mask.w, 0, n, n)   # no-op unless thin
        T._reserve_runs(mask.w, 0, n, n)
        with nogil:
            done = copy_set_runs(dst, src, mask.w, 0, n, n, shift, &resume)
        return done


cdef int raise_write_error(VolumeBase v, int err, str what) except -1:
    """Raise the error for a failed ``pwrite`` to ``v``'s file."""
    if err == _errno.ENOSPC or err == _errno.EDQUOT:
        raise NoSpaceError(f"{v!r}: the filesystem has no room for {what}")
    raise OSError(err, f"writing {what} to {v!r}: {os.strerror(err)}")


cdef int raise_space(VolumeBase v, int err, Py_ssize_t nbytes) except -1:
    """Raise the error for a failed block reservation on a thin volume."""
    if err == _errno.ENOSPC or err == _errno.EDQUOT:
        raise NoSpaceError(
            f"{v!r}: the filesystem has no room for {nbytes} more bytes; nothing "
            "was written and no bitmap changed (free space and retry)")
    raise OSError(err, f"reserving {nbytes} bytes for {v!r}: {os.strerror(err)}")


cdef inline int lock_two(VolumeBase a, VolumeBase b) except -1:
    """Acquire two volumes' locks (b may be None) in volume-id order."""
    if b is None or b is a:
        a._acquire()
    elif a.vid < b.vid:
        a._acquire()
        b._acquire()
    else:
        b._acquire()
        a._acquire()
    return 0


cdef inline void unlock_two(VolumeBase a, VolumeBase b) noexcept:
    a._release()
    if b is not None and b is not a:
        b._release()


cdef inline int land_write(uint8_t* base, int fd, bint use_pwrite, uint64_t* oos,
                           Py_ssize_t t0, Py_ssize_t t1, const uint8_t* src,
                           Py_ssize_t n, Py_ssize_t offset) noexcept nogil:
    """The end of a host write: the out-of-sync bits (if any), then the data,
    through the mapping or with ``pwrite``. Returns 0 or an errno."""
    if oos != NULL:
        bm_set_range(oos, t0, t1)
    if use_pwrite:
        return pwrite_all(fd, src, n, offset)
    memcpy(base + offset, src, n)
    return 0


cdef class VolumeBase:
    """A volume's bytes, lock, flags and the I/O path.

    The public subclass :class:`fastfc.Volume` builds the backing array;
    this base holds a raw pointer to it so that reads and writes are C calls.
    """

    cdef readonly Py_ssize_t n_tracks
    cdef readonly Py_ssize_t track_size
    cdef readonly Py_ssize_t capacity
    cdef readonly int track_shift
    cdef readonly long long vid
    cdef uint8_t* base
    cdef object _array
    cdef object _ro          # the read-only view that .array hands out
    cdef PyThread_type_lock _lk
    cdef unsigned long _owner
    cdef int _depth
    # relationships and flags, guarded by this volume's lock
    cdef public list _src_rels
    cdef public RelationshipBase _tgt_rel
    cdef public MirrorBase _mirror
    cdef public int _inhibits
    cdef public bint _secondary
    cdef public bint _invalid
    # bumped whenever _src_rels changes or one of them gets other bitmaps
    # (resync, revert), so a kernel that runs without the GIL on a copy of
    # the list and of their bitmaps' addresses can tell it went stale
    cdef public int _rels_version
    # memory-mapped file: PPRC updates write only the pages that change
    cdef public bint _file_backed
    # thin (sparse) file: blocks are reserved (fallocate) on first touch of a
    # track, before any byte lands; _alloc marks the tracks that have them
    cdef readonly bint thin
    cdef int _fd
    cdef TrackBitmap _alloc
    # thin on a memory filesystem (tmpfs): there a read fault on a hole takes
    # a page too, so reads reserve the tracks they touch as writes do
    cdef public bint _reads_allocate
    # whether a FlashCopy target of this volume is thin, as of _rels_version
    # _space_version (so a write to a thick volume tests flags, not targets)
    cdef bint _thin_targets
    cdef int _space_version

    def __cinit__(self, *args, **kwargs):
        self._lk = PyThread_allocate_lock()
        if self._lk == NULL:
            raise MemoryError("could not allocate a volume lock")
        self.vid = next(_volume_ids)
        self._src_rels = []
        self._tgt_rel = None
        self._mirror = None
        self._fd = -1
        self._space_version = -1
        if _environment_unwarned:
            _warn_environment()

    def __dealloc__(self):
        if self._lk != NULL:
            PyThread_free_lock(self._lk)

    def _attach(self, array, Py_ssize_t track_size, int fd=-1, TrackBitmap allocated=None):
        """Adopt ``array`` (1-D C-contiguous uint8) as the backing store.

        A thin file-backed volume passes its file descriptor (kept until
        close) and the bitmap of tracks whose blocks the file already has.
        ``array`` may be read-only (a volume of a unit opened read-only maps
        its file shared and read-only, so that no private copy of a volume
        larger than memory is charged): such a volume must refuse every
        path that stores into it.
        """
        cdef const uint8_t[::1] mv = array
        cdef int shift = 0
        while ((<Py_ssize_t>1) << shift) < track_size:
            shift += 1
        self._array = array
        self._ro = read_only(array)
        self.base = <uint8_t*>&mv[0]
        self.track_size = track_size
        self.track_shift = shift
        self.capacity = array.shape[0]
        self.n_tracks = self.capacity >> shift
        self.thin = allocated is not None
        if self.thin and (fd < 0 or allocated.n_bits != self.n_tracks):
            raise ValueError("a thin volume needs its file descriptor and a bitmap "
                             "of n_tracks bits")
        self._fd = fd
        self._alloc = allocated

    def _detach(self):
        """Forget the backing store (close). Takes this volume's lock and, if
        it is a FlashCopy target, its source's (a copy-on-write lands on a
        target under the source's lock only). Returns None if it was closed
        already, else the file descriptor a thin volume kept (-1 for none),
        for the caller to close. The arrays
        handed out keep the memory alive; the engine never touches it again."""
        cdef RelationshipBase tr = self._lock_io()
        cdef int fd = self._fd
        try:
            if self.base == NULL:
                return None
            self._array = None
            self._ro = None
            self.base = NULL
            self._fd = -1
            self._alloc = None
            if tr is not None:
                # a drain running without the GIL on a copy of the source's
                # target pointers stops at its next chunk
                tr.source._rels_version += 1
            return fd
        finally:
            unlock_two(self, tr.source if tr is not None else None)

    @property
    def closed(self):
        return self.base == NULL

    @property
    def array(self):
        """The volume's bytes as a read-only, zero-copy view of the backing
        store: the physical content, without FlashCopy read redirection (use
        :meth:`read` for the logical image). It stays valid after
        :meth:`close` (the memory is freed when the last view dies)."""
        if self.base == NULL:
            raise VolumeClosedError(f"{self!r} is closed")
        if self._reads_allocate:
            # a view reads anywhere: on tmpfs a hole read takes a page, so a
            # thin volume there gets them all first (NoSpaceError if it can't)
            self._reserve_runs(NULL, 0, self.n_tracks, self.n_tracks)
        return self._ro

    def _raw_array(self):
        """The writable backing array: for tests and benchmarks that plant
        raw bytes. A write through it bypasses copy-on-write, change
        recording, mirroring and (thin volumes) space reservation."""
        if self.base == NULL:
            raise VolumeClosedError(f"{self!r} is closed")
        if self._reads_allocate:
            self._reserve_runs(NULL, 0, self.n_tracks, self.n_tracks)
        return self._array

    # -- space (thin volumes) ------------------------------------------------
    cdef int _reserve_runs(self, const uint64_t* m, Py_ssize_t start, Py_ssize_t stop,
                           Py_ssize_t budget, bint clear=False) except -1:
        """Thin volume: give the file blocks for the tracks set in ``m`` (clear
        in ``m`` with ``clear``; every track when ``m`` is NULL) from
        ``start`` (below ``stop``), the first ``budget`` of them, before any
        byte lands there. Raises NoSpaceError when the filesystem is full. A
        no-op otherwise.

        On a disk filesystem (ext4, xfs) the blocks come in whole aligned
        chunks of THIN_CHUNK bytes, the largest page-cache folio. A store
        through the mapping write-faults a whole folio (readahead makes them
        up to 2 MiB, naturally aligned), and the filesystem reserves blocks,
        inside the fault, for every part of the folio without any. With
        blocks per track, a folio ran on from a reserved track into a hole:
        on a full filesystem that reservation failed and the fault was
        SIGBUS, fallocate of the track having succeeded. A folio never
        straddles an allocated chunk and a hole; within fallocated (unwritten)
        extents a fault needs nothing more (as on a thick volume)."""
        cdef Py_ssize_t a, b, c, e, lim, done = 0, ct = 1
        cdef int err = 0, shift = self.track_shift
        cdef uint64_t* w
        if not self.thin or self._alloc is None:
            return 0
        if self._file_backed and CHUNK > self.track_size:
            ct = CHUNK >> shift      # tracks per chunk
        w = self._alloc.w
        if m == NULL:
            a = start
        elif clear:
            a = bm_next_clear(m, stop, start)
        else:
            a = bm_next_set(m, stop, start)
        while 0 <= a < stop and done < budget:
            lim = a + (budget - done)
            if lim > stop:
                lim = stop
            if m == NULL:
                b = lim
            else:
                b = bm_next_set(m, lim, a) if clear else bm_next_clear(m, lim, a)
                if b < 0:
                    b = lim
            # reserve the tracks of [a, b) that have no blocks yet (on a
            # disk: the whole aligned chunks that hold them)
            c = bm_next_clear(w, b, a)
            while 0 <= c < b:
                e = bm_next_set(w, b, c)
                if e < 0:
                    e = b
                if ct > 1:
                    c -= c % ct
                    e += (ct - e % ct) % ct
                    if e > self.n_tracks:
                        e = self.n_tracks
                with nogil:
                    err = posix_fallocate(self._fd, (<off_t>c) << shift,
                                          (<off_t>(e - c)) << shift)
                if err:
                    raise_space(self, err, (e - c) << shift)
                bm_set_range(w, c, e)
                c = bm_next_clear(w, b, e) if e < b else -1
            done += b - a
            if m == NULL:
                break
            a = bm_next_clear(m, stop, b) if clear else bm_next_set(m, stop, b)
        return 0

    cdef inline bint _needs_space(self, RelationshipBase tr) except -1:
        """Whether a write here may need blocks reserved first (lock held)."""
        cdef RelationshipBase r
        if self._space_version != self._rels_version:
            self._thin_targets = False
            for r in self._src_rels:
                if r.target.thin:
                    self._thin_targets = True
            self._space_version = self._rels_version
        return self.thin or self._thin_targets or (
            tr is not None and tr.source._reads_allocate)

    cdef int _reserve_write(self, Py_ssize_t offset, Py_ssize_t n) except -1:
        """Before a write of ``n`` bytes (n > 0) at ``offset`` lands: blocks on
        this volume (if thin), on thin FlashCopy targets for the tracks a
        copy-on-write moves, and (tmpfs) on the source of this target for a
        partly written track it fetches. Lock held."""
        cdef RelationshipBase r
        cdef int shift = self.track_shift
        cdef Py_ssize_t t0 = offset >> shift, t1 = ((offset + n - 1) >> shift) + 1
        if self.thin:
            self._reserve_runs(NULL, t0, t1, t1 - t0)
        for r in self._src_rels:
            if r.target.thin and bm_any_range(r.to_copy.w, t0, t1):
                r.target._reserve_runs(r.to_copy.w, t0, t1, t1 - t0)
        r = self._tgt_rel
        if r is not None and r.source._reads_allocate:
            # a partly written track still on the source is fetched from it
            # (only the first and the last track can be partly written)
            if offset & (self.track_size - 1):
                r.source._reserve_runs(r.to_copy.w, t0, t0 + 1, 1)
            if (offset + n) & (self.track_size - 1):
                r.source._reserve_runs(r.to_copy.w, t1 - 1, t1, 1)
        return 0

    def _reserve_tracks(self, TrackBitmap mask, bint read=False):
        """Thin volume: blocks for every track set in ``mask`` before data
        lands there (``read``: before it is read, which needs them only on a
        memory filesystem). A no-op for a thick volume. Lock held."""
        if mask.n_bits != self.n_tracks:
            raise ValueError("the mask must have one bit per track")
        if read and not self._reads_allocate:
            return
        self._reserve_runs(mask.w, 0, self.n_tracks, self.n_tracks)

    def _reserve_read(self, Py_ssize_t t0, Py_ssize_t t1):
        """Before tracks [t0, t1) are read through :attr:`array` (the PPRC
        send paths): a thin volume on a memory filesystem reserves them."""
        if self._reads_allocate and 0 <= t0 <= t1 <= self.n_tracks:
            self._reserve_runs(NULL, t0, t1, t1 - t0)

    @property
    def allocated_tracks(self):
        """Thin volume: how many tracks have blocks in the file (None for a
        thick or in-memory volume)."""
        if not self.thin or self._alloc is None:
            return None
        return self._alloc.count()

    # -- locking -----------------------------------------------------------
    cdef inline int _acquire(self) except -1:
        cdef unsigned long me = PyThread_get_thread_ident()
        if self._owner == me:
            self._depth += 1
            return 0
        if not PyThread_acquire_lock(self._lk, NOWAIT_LOCK):
            with nogil:
                PyThread_acquire_lock(self._lk, WAIT_LOCK)
        self._owner = me
        self._depth = 1
        return 0

    cdef inline void _release(self) noexcept:
        self._depth -= 1
        if self._depth == 0:
            self._owner = 0
            PyThread_release_lock(self._lk)

    def _lock(self, double timeout=-1.0):
        """Acquire this volume's (re-entrant) lock; False on timeout."""
        cdef unsigned long me = PyThread_get_thread_ident()
        cdef long long us
        cdef int ok
        if self._owner == me:
            self._depth += 1
            return True
        if not PyThread_acquire_lock(self._lk, NOWAIT_LOCK):
            us = -1 if timeout < 0 else <long long>(timeout * 1e6)
            with nogil:
                ok = PyThread_acquire_lock_timed(self._lk, us, 0) == PY_LOCK_ACQUIRED
            if not ok:
                return False
        self._owner = me
        self._depth = 1
        return True

    def _unlock(self):
        if self._owner != PyThread_get_thread_ident():
            raise RuntimeError("releasing a volume lock this thread does not hold")
        self._release()

    # -- host I/O ----------------------------------------------------------
    cdef int _check_range(self, Py_ssize_t offset, Py_ssize_t n) except -1:
        if offset < 0 or n < 0 or offset > self.capacity - n:
            if offset < 0:
                what = f"offset {offset} is negative"
            elif offset > self.capacity:
                what = f"offset {offset} is past the end of the volume"
            elif n < 0:
                what = f"length {n} is negative"
            else:
                what = (f"I/O of {n} bytes at offset {offset} runs "
                        f"{offset + n - self.capacity} bytes past the end of the volume")
            raise IndexError(f"{what} (capacity {self.capacity} bytes)")
        return 0

    cdef int _check_valid_write(self, Py_ssize_t offset, Py_ssize_t n) except -1:
        """An invalid volume (its FlashCopy was withdrawn before the copy
        completed) takes only a host write of the whole volume, which gives
        it a valid image again."""
        if self._invalid and not (offset == 0 and n == self.capacity):
            raise InvalidImageError(
                f"{self!r} does not hold a valid image (its FlashCopy was withdrawn "
                "before the copy completed) and refuses partial writes; write the "
                "whole volume (offset 0, capacity bytes) or establish a FlashCopy "
                "onto it to give it a valid image again")
        return 0

    def _valid_again(self):
        """Called after a whole-volume host write made an invalid volume
        valid (lock held); the public class records it."""

    cdef int _check_writable(self, Py_ssize_t t0, Py_ssize_t t1, int origin) except -1:
        """Refuse a write to tracks [t0, t1) that must not happen. Lock held."""
        cdef RelationshipBase r
        if self.base == NULL:
            raise VolumeClosedError(f"{self!r} is closed")
        if self._inhibits:
            raise WriteInhibitedError(
                f"{self!r} is write-inhibited: it is the source of a revertible "
                "FlashCopy; commit or revert it first")
        if origin == ORIGIN_HOST and self._secondary:
            raise WriteInhibitedError(
                f"{self!r} is a PPRC secondary and refuses host writes")
        r = self._tgt_rel
        if r is not None:
            if r.revertible:
                raise WriteInhibitedError(
                    f"{self!r} is the target of a revertible FlashCopy")
            if r.inhibit_target_write:
                raise WriteInhibitedError(
                    f"{self!r} is a FlashCopy target with inhibit_target_write")
            if r.source.base == NULL and bm_any_range(r.to_copy.w, t0, t1):
                raise VolumeClosedError(
                    f"source {r.source!r} of this target is closed")
        for r in self._src_rels:
            if r.target.base == NULL and bm_any_range(r.to_copy.w, t0, t1):
                raise VolumeClosedError(
                    f"copy-on-write target {r.target!r} is closed")
        return 0

    cdef RelationshipBase _lock_io(self):
        """Lock self and, if self is a FlashCopy target, its source; return
        that relationship (or None)."""
        cdef RelationshipBase r
        while True:
            r = self._tgt_rel
            lock_two(self, r.source if r is not None else None)
            if self._tgt_rel is r:
                return r
            unlock_two(self, r.source if r is not None else None)

    cdef int _write(self, Py_ssize_t offset, const uint8_t* src, Py_ssize_t n,
                    int origin) except -1:
        cdef RelationshipBase tr = None, r
        cdef VolumeBase S = None
        cdef Py_ssize_t t0, t1, t, ts, k, resume, ntr
        cdef int shift = self.track_shift
        cdef MirrorBase m
        cdef list rels
        cdef uint64_t* w
        cdef uint64_t* oos = NULL
        cdef bint pending = 0, whole_tracks = 0
        cdef int err = 0
        # a volume on a disk: every store into it may fault (writeback cleans
        # its pages; ext4's page_mkwrite), so it runs without the GIL whatever
        # its size; in memory a small copy keeps it (cheaper than releasing)
        cdef bint on_disk = self._file_backed
        cdef bint use_pwrite = on_disk and (HOST_MODE == 1 or HOST_MODE == 2) and self._fd >= 0
        cdef bint free_gil = on_disk and (HOST_MODE == 0 or HOST_MODE == 1)
        self._check_range(offset, n)
        tr = self._lock_io()
        if tr is not None:
            S = tr.source
        try:
            t0 = offset >> shift
            t1 = ((offset + n - 1) >> shift) + 1 if n else t0
            self._check_writable(t0, t1, origin)
            if origin == ORIGIN_HOST and self._invalid:
                self._check_valid_write(offset, n)
            if n == 0:
                return 0
            rels = self._src_rels
            ntr = len(rels)
            if self._needs_space(tr):
                self._reserve_write(offset, n)
            # ---- from here on nothing refuses: the write is applied whole
            m = self._mirror
            if m is not None and m.cg is not None and bm_any_range(m.cg.w, t0, t1):
                m._collide(t0, t1)
            for k in range(ntr):
                r = <RelationshipBase>rels[k]
                w = r.to_copy.w
                if bm_any_range(w, t0, t1):
                    # copy-on-write: the target takes the old tracks first
                    if ((t1 - t0) << shift) >= NOGIL_BYTES or (
                            r.target._file_backed and HOST_MODE != 3):
                        with nogil:
                            copy_set_runs(r.target.base, self.base, w, t0, t1, t1 - t0,
                                          shift, &resume)
                    else:
                        copy_set_runs(r.target.base, self.base, w, t0, t1, t1 - t0,
                                      shift, &resume)
                    if _cow_hook is not None:
                        _cow_hook(self)
                if r.src_changed is not None:
                    bm_set_range(r.src_changed.w, t0, t1)
            if tr is not None:
                w = tr.to_copy.w
                if bm_any_range(w, t0, t1):
                    for t in range(t0, t1):
                        if bm_test(w, t):
                            ts = t << shift
                            if offset <= ts and offset + n >= ts + self.track_size:
                                whole_tracks = 1   # cleared once the data is in
                            else:
                                # partial write of a virtual track: fetch it first
                                if self.track_size >= NOGIL_BYTES or free_gil:
                                    with nogil:
                                        memcpy(self.base + ts, S.base + ts, self.track_size)
                                else:
                                    memcpy(self.base + ts, S.base + ts, self.track_size)
                                bm_clear(w, t)
                if tr.tgt_changed is not None:
                    bm_set_range(tr.tgt_changed.w, t0, t1)
            # Metadata is recorded before the data lands, so that a process
            # killed mid-write (bitmaps live in memory-mapped files on a
            # storage unit) never holds a changed track that no bitmap names.
            if m is not None and m.oos is not None:
                oos = m.oos.w
                pending = bm_any_range(oos, t0, t1)
            if n >= NOGIL_BYTES or free_gil:
                with nogil:
                    err = land_write(self.base, self._fd, use_pwrite, oos, t0, t1,
                                     src, n, offset)
            else:
                err = land_write(self.base, self._fd, use_pwrite, oos, t0, t1,
                                 src, n, offset)
            if err:
                # the bits over-mark (safe); the bytes may be partly in
                raise_write_error(self, err, f"a write of {n} bytes")
            if whole_tracks:
                for t in range(t0, t1):
                    ts = t << shift
                    if offset <= ts and offset + n >= ts + self.track_size:
                        bm_clear(tr.to_copy.w, t)
            if origin == ORIGIN_HOST and self._invalid:
                self._invalid = False      # the whole volume was rewritten
                self._valid_again()
            if m is not None and m.sync:
                m._sync_write(offset, n, pending)
        finally:
            unlock_two(self, S)
        return 0

    def write(self, Py_ssize_t offset, data):
        """Write ``data`` (bytes-like or uint8 array) at byte ``offset``.

        Copy-on-write to every FlashCopy target that still needs the old
        tracks happens first; the write is then applied whole, or refused
        whole (closed, out of range, wrong type, write-inhibited).
        """
        self._write_buffer(offset, data, ORIGIN_HOST)

    def _write_origin(self, Py_ssize_t offset, data, int origin):
        """Write with an explicit origin (``PPRC`` for updates at a secondary)."""
        self._write_buffer(offset, data, origin)

    cdef int _write_buffer(self, Py_ssize_t offset, object data, int origin) except -1:
        """Borrow ``data`` as bytes and write it (the one path of :meth:`write`
        and :meth:`_write_origin`)."""
        cdef Py_buffer view
        get_read_buffer(data, &view)
        try:
            self._write(offset, <const uint8_t*>view.buf, view.len, origin)
        finally:
            PyBuffer_Release(&view)
        return 0

    cdef int _read(self, Py_ssize_t offset, uint8_t* dst, Py_ssize_t n) except -1:
        cdef RelationshipBase tr = None
        cdef VolumeBase S = None
        cdef Py_ssize_t t0, t1
        cdef const uint64_t* w
        cdef int shift = self.track_shift
        self._check_range(offset, n)
        tr = self._lock_io()
        if tr is not None:
            S = tr.source
        try:
            if self.base == NULL:
                raise VolumeClosedError(f"{self!r} is closed")
            if self._invalid:
                raise InvalidImageError(
                    f"{self!r} does not hold a valid image: its FlashCopy was "
                    "withdrawn before the copy completed")
            if n == 0:
                return 0
            t0 = offset >> shift
            t1 = ((offset + n - 1) >> shift) + 1
            if self._reads_allocate:
                # the tracks read from this volume (not those redirected)
                if tr is None:
                    self._reserve_runs(NULL, t0, t1, t1 - t0)
                else:
                    self._reserve_runs(tr.to_copy.w, t0, t1, t1 - t0, True)
            if tr is not None and S._reads_allocate and S.base != NULL:
                S._reserve_runs(tr.to_copy.w, t0, t1, t1 - t0)
            if tr is not None and bm_any_range(tr.to_copy.w, t0, t1):
                if S.base == NULL:
                    raise VolumeClosedError(f"source {S!r} of this target is closed")
                w = tr.to_copy.w
                if n >= NOGIL_BYTES:
                    with nogil:
                        copy_redirected(dst, self.base, S.base, w, offset, n, shift)
                else:
                    copy_redirected(dst, self.base, S.base, w, offset, n, shift)
            elif n >= NOGIL_BYTES:
                with nogil:
                    memcpy(dst, self.base + offset, n)
            else:
                memcpy(dst, self.base + offset, n)
        finally:
            unlock_two(self, S)
        return 0

    def read(self, Py_ssize_t offset, Py_ssize_t length):
        """Return ``length`` bytes at ``offset`` as a new uint8 array: the
        volume's logical image (a FlashCopy target reads not-yet-copied tracks
        from its source)."""
        cdef Py_buffer view
        self._check_range(offset, length)
        out = np.empty(length, dtype=np.uint8)
        get_write_buffer(out, &view)
        try:
            self._read(offset, <uint8_t*>view.buf, length)
        finally:
            PyBuffer_Release(&view)
        return out

    def readinto(self, Py_ssize_t offset, out):
        """Read ``len(out)`` bytes at ``offset`` into a writable uint8 buffer."""
        cdef Py_buffer view
        get_write_buffer(out, &view)
        try:
            self._read(offset, <uint8_t*>view.buf, view.len)
        finally:
            PyBuffer_Release(&view)

    def write_batch(self, offsets, data, int origin=ORIGIN_HOST):
        """Write ``data[i]`` at ``offsets[i]`` for every i, in order.

        ``data`` is a 2-D C-contiguous uint8 array, one row per offset. The
        whole batch is checked (ranges, types, state) before any byte is
        written, and this volume's lock is held across it. ``origin``
        ``PPRC``: the rows are PPRC updates at a secondary (a remote unit
        applying a batch of its drain).
        """
        if origin != ORIGIN_HOST and origin != ORIGIN_PPRC:
            raise ValueError(f"origin must be HOST or PPRC, got {origin}")
        cdef const int64_t[::1] offs
        cdef Py_buffer view
        cdef Py_ssize_t i, k, L, off
        cdef RelationshipBase tr = None
        offs = as_offsets(offsets)
        if not isinstance(data, np.ndarray):
            raise TypeError(f"data must be a 2-D uint8 numpy array, not {type(data).__name__}")
        if data.ndim != 2:
            raise ValueError("data must be a 2-D uint8 array, one row per offset")
        k = offs.shape[0]
        if data.shape[0] != k:
            raise ValueError(f"{k} offsets but {data.shape[0]} rows of data")
        L = data.shape[1]
        for i in range(k):
            self._check_range(offs[i], L)
        get_read_buffer(data, &view)
        try:
            tr = self._lock_io()
            try:
                for i in range(k):
                    off = offs[i]
                    self._check_writable(off >> self.track_shift,
                                         ((off + L - 1) >> self.track_shift) + 1 if L else 0,
                                         origin)
                    if self._invalid:
                        self._check_valid_write(off, L)
                if L and self._needs_space(tr):
                    # every block the batch needs, before its first byte lands
                    for i in range(k):
                        self._reserve_write(offs[i], L)
                for i in range(k):
                    self._write(offs[i], <const uint8_t*>view.buf + i * L, L, origin)
            finally:
                unlock_two(self, tr.source if tr is not None else None)
        finally:
            PyBuffer_Release(&view)

    def read_batch(self, offsets, Py_ssize_t length):
        """Read ``length`` bytes at each offset; returns a (k, length) array."""
        cdef const int64_t[::1] offs = as_offsets(offsets)
        cdef Py_ssize_t i, k = offs.shape[0]
        cdef Py_buffer view
        for i in range(k):
            self._check_range(offs[i], length)
        out = np.empty((k, length), dtype=np.uint8)
        get_write_buffer(out, &view)
        try:
            for i in range(k):
                self._read(offs[i], <uint8_t*>view.buf + i * length, length)
        finally:
            PyBuffer_Release(&view)
        return out


# Cython records no annotation for a C-typed argument: the host I/O methods
# get those of the stub (_core.pyi) here, for help(), inspect and type hints.
VolumeBase.write.__annotations__ = {
    "offset": "int", "data": "bytes | bytearray | memoryview | np.ndarray", "return": "None"}
VolumeBase.read.__annotations__ = {"offset": "int", "length": "int", "return": "np.ndarray"}
VolumeBase.readinto.__annotations__ = {
    "offset": "int", "out": "bytearray | memoryview | np.ndarray", "return": "None"}


cdef enum:
    MAX_RELS = 16    # FlashCopy targets per source the drain fast path takes (12 allowed)


cdef void copy_changed_pages(uint8_t* dst, const uint8_t* src, Py_ssize_t n) noexcept nogil:
    """Make dst equal to src, writing only the 4 KiB pages that differ. On a
    memory-mapped file an unchanged page then stays clean: a 4 KiB host write
    costs the disk one page of writeback, not a whole track's."""
    cdef Py_ssize_t off = 0, step
    while off < n:
        step = n - off if n - off < 4096 else 4096
        if memcmp(dst + off, src + off, step) != 0:
            memcpy(dst + off, src + off, step)
        off += step


cdef object _hook_error = None


cdef int call_cow_hook(void* volume) noexcept with gil:
    """Call the crash tests' hook (fastfc.faults point "cow") on ``volume``
    from a kernel; an exception it raises is kept for :func:`raise_hook_error`
    (to raise once the kernel has let its locks go) and -1 returned."""
    global _hook_error
    hook = _cow_hook
    if hook is not None:
        try:
            hook(<object>volume)
        except BaseException as e:
            _hook_error = e
            return -1
    return 0


cdef int raise_hook_error() except -1:
    global _hook_error
    e, _hook_error = _hook_error, None
    if e is not None:
        raise e
    return 0


cdef Py_ssize_t apply_runs(uint8_t* dst, const uint8_t* src, uint64_t* owed,
                           Py_ssize_t a, Py_ssize_t n, Py_ssize_t max_tracks, int shift,
                           int nrel, uint8_t** tgt_base, uint64_t** tgt_to_copy,
                           uint64_t** tgt_changed, Py_ssize_t* resume,
                           bint pages, void* hooked, int dst_fd, int* tgt_fd,
                           int* err) noexcept nogil:
    """Copy the runs set in ``owed`` from ``a`` on (below ``n``, at most
    ``max_tracks``) from src to dst, each after copy-on-write of dst's old
    tracks to its FlashCopy targets and with change recording, clearing the
    bits. ``pages``: the volumes are files; write only the pages that change.
    ``hooked``: dst's volume while the cow hook is installed (else NULL),
    called after each copy-on-write and before the data lands.
    ``dst_fd`` / ``tgt_fd[k]`` (with ``pages``, >= 0): that volume is on a
    disk and its changed pages go to its file with ``pwrite`` (the
    copy-on-write to the target before dst's), not stores through the
    mapping. Returns the tracks copied, -1 if the hook raised (the run it
    was called for not applied), -2 if a ``pwrite`` failed (``err[0]`` its
    errno; the run it was in stays owed, its bits set, a track's to_copy bit
    cleared only once its old data is in the target); ``resume[0]`` is where
    to carry on."""
    cdef Py_ssize_t b, t, done = 0, res2
    cdef int k, e
    while 0 <= a < n and done < max_tracks:
        b = bm_next_clear(owed, n, a)
        if b < 0:
            b = n
        if b - a > max_tracks - done:
            b = a + (max_tracks - done)
        for k in range(nrel):
            if tgt_changed[k] != NULL:
                bm_set_range(tgt_changed[k], a, b)
            if bm_any_range(tgt_to_copy[k], a, b):
                if pages:
                    for t in range(a, b):
                        if bm_test(tgt_to_copy[k], t):
                            if tgt_fd != NULL and tgt_fd[k] >= 0:
                                e = put_changed_pages(tgt_fd[k], tgt_base[k] + (t << shift),
                                                      dst + (t << shift),
                                                      (<Py_ssize_t>1) << shift,
                                                      (<off_t>t) << shift)
                                if e:
                                    err[0] = e
                                    resume[0] = a
                                    return -2
                            else:
                                copy_changed_pages(tgt_base[k] + (t << shift),
                                                   dst + (t << shift), (<Py_ssize_t>1) << shift)
                            bm_clear(tgt_to_copy[k], t)
                else:
                    copy_set_runs(tgt_base[k], dst, tgt_to_copy[k], a, b, b - a, shift, &res2)
                if hooked != NULL and call_cow_hook(hooked) < 0:
                    resume[0] = a
                    return -1
        if pages and dst_fd >= 0:
            e = put_changed_pages(dst_fd, dst + (a << shift), src + (a << shift),
                                  (b - a) << shift, (<off_t>a) << shift)
            if e:
                err[0] = e
                resume[0] = a
                return -2
        elif pages:
            copy_changed_pages(dst + (a << shift), src + (a << shift), (b - a) << shift)
        else:   # (streamed when large: B's copy is not read back soon)
            copy_big(dst + (a << shift), src + (a << shift), (b - a) << shift)
        bm_clear_range(owed, a, b)
        done += b - a
        a = bm_next_set(owed, n, b)
    resume[0] = a if 0 <= a < n else -1
    return done


def pprc_copy_tracks(VolumeBase A, VolumeBase B, TrackBitmap owed, Py_ssize_t start,
                     Py_ssize_t max_tracks, Py_ssize_t stop=-1):
    """Apply A's tracks set in ``owed`` (from ``start`` on, at most
    ``max_tracks``) to B as PPRC updates, clearing their bits: the in-process
    fast path of a Global Copy drain.

    The caller holds A's lock. Each update follows B's I/O path rules for a
    PPRC update: refused whole if B is closed or write-inhibited (a revertible
    FlashCopy source); copy-on-write to B's FlashCopy targets and change
    recording before the data lands. The whole batch runs in one ``nogil``
    block: re-taking the GIL after every track would queue behind busy
    Python threads (a convoy). Returns ``(tracks sent, resume)``, resume being
    ``A.n_tracks`` when no set bit is left after ``start``. ``stop``
    (default: the end) bounds the tracks considered.
    """
    cdef Py_ssize_t n = A.n_tracks, a, done = 0, resume = -1
    cdef int shift = A.track_shift, nrel, k
    cdef void* hooked
    cdef RelationshipBase r
    cdef list rels
    cdef uint64_t* w = owed.w
    cdef uint8_t* tgt_base[MAX_RELS]
    cdef uint64_t* tgt_to_copy[MAX_RELS]
    cdef uint64_t* tgt_changed[MAX_RELS]
    cdef int tgt_fd[MAX_RELS]
    cdef int dst_fd, err = 0
    if owed.n_bits != n or B.n_tracks != n or B.track_shift != shift:
        raise ValueError("pprc_copy_tracks needs volumes and bitmap of one geometry")
    if A.base == NULL:
        raise VolumeClosedError(f"{A!r} is closed")
    if 0 <= stop < n:
        n = stop
    B._acquire()
    try:
        if B._tgt_rel is not None:
            raise StateError(f"{B!r} is a FlashCopy target and cannot take PPRC updates")
        a = bm_next_set(w, n, start)
        if a < 0 or a >= n:
            return 0, A.n_tracks
        B._check_writable(0, n, ORIGIN_PPRC)
        rels = B._src_rels
        nrel = len(rels)
        if nrel > MAX_RELS:
            raise StateError(f"{B!r} has more FlashCopy targets than the fast path handles")
        for k in range(nrel):
            r = <RelationshipBase>rels[k]
            tgt_base[k] = r.target.base
            tgt_to_copy[k] = r.to_copy.w
            tgt_changed[k] = r.src_changed.w if r.src_changed is not None else NULL
            tgt_fd[k] = r.target._fd if r.target._file_backed else -1
        dst_fd = B._fd if B._file_backed else -1
        # thin volumes: the blocks of every track this call may write (on B,
        # and on B's targets for their copy-on-write) before any byte lands
        B._reserve_runs(w, a, n, max_tracks)
        if A._reads_allocate:
            A._reserve_runs(w, a, n, max_tracks)
        for k in range(nrel):
            r = <RelationshipBase>rels[k]
            if r.target.thin:
                r.target._reserve_runs(w, a, n, max_tracks)
        hooked = <void*>B if _cow_hook is not None else NULL
        with nogil:
            done = apply_runs(B.base, A.base, w, a, n, max_tracks, shift, nrel,
                              tgt_base, tgt_to_copy, tgt_changed, &resume,
                              B._file_backed, hooked, dst_fd, tgt_fd, &err)
        if done == -2:
            raise_write_error(B, err, "a PPRC update (the tracks not applied stay owed)")
        if done < 0:
            raise_hook_error()
    finally:
        B._release()
    return done, (resume if resume >= 0 else A.n_tracks)



cdef inline double monotonic() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return ts.tv_sec + ts.tv_nsec * 1e-9


# Coordinations carried out (tests prove the production path runs).
cdef long long _coordinations = 0


def coordinations():
    """How many consistency groups :func:`coordinate_pairs` has begun."""
    return _coordinations


cdef inline void set_owner(list vols, Py_ssize_t n, unsigned long me) noexcept:
    """Mark raw-taken locks as held by thread ``me`` (re-entrant for hooks),
    or (``me`` 0) as held by no Python-visible owner again."""
    cdef Py_ssize_t i
    cdef VolumeBase v
    for i in range(n):
        v = <VolumeBase>vols[i]
        v._owner = me
        v._depth = 1 if me else 0


cdef inline void undo_begin(list hooks, Py_ssize_t nh) noexcept:
    cdef Py_ssize_t k
    cdef MirrorBase m
    for k in range(nh):
        m = <MirrorBase>hooks[k]
        m.spare = m.oos
        m.oos = m.cg
        m.cg = None


def coordinate_pairs(list primaries, list hooks, double timeout, before=None, after=None):
    """Hold host writes on every primary at one instant and begin a
    consistency group on every mirror hook, in one C call. The only
    coordination there is: Global Mirror runs it with or without hooks.

    Takes the primaries' locks in the order given (volume-id order); calls
    ``before()`` if given (the ``coordinate`` fault point); swaps each hook's
    ``oos`` for its (empty) ``spare``, the old ``oos`` becoming ``cg``; calls
    ``after()`` if given (``on_coordinate``: the primaries' locks count as
    this thread's, so it may read them); releases. Without hooks the hold
    runs no Python bytecode.

    The locks are taken with non-blocking tries. When one is busy, the
    locks taken by tries are released at once and the busy one is waited
    for (GIL released) and then kept, so that a writer that keeps winning
    it cannot starve the coordination; kept locks later in the order are
    given back first, so waiting never breaks the lock order. The pass
    then starts again, until ``timeout`` seconds have passed.

    Returns ``(status, seconds)``: status 0 done (seconds: the hold, from
    the first lock held to the end of the swap), 1 the locks could not all
    be taken in time, 2 they were, but the hold (``before()`` included)
    lasted longer than ``timeout``. Nothing changes unless 0. If ``before``
    or ``after`` raises, nothing changes and the exception propagates
    (after the locks are released).
    """
    global _coordinations
    cdef Py_ssize_t i, k, n = len(primaries), nh = len(hooks), busy
    cdef VolumeBase v
    cdef MirrorBase m
    cdef double t0 = monotonic(), start, hold = 0.0, left
    cdef long long us
    cdef bint got, swapped
    cdef unsigned long me = PyThread_get_thread_ident()
    cdef char* held           # per primary: 0 free, 1 taken by a try, 2 kept
    cdef double* since        # when a kept lock was taken
    for k in range(nh):
        m = <MirrorBase>hooks[k]
        if m.oos is None or m.spare is None or m.cg is not None:
            raise StateError("a pair is not ready to begin a consistency group")
    for i in range(n):
        v = <VolumeBase>primaries[i]
        if v._owner == me:
            raise RuntimeError("coordination must not run with a primary's lock held")
        if v.base == NULL:
            raise VolumeClosedError(f"{v!r} is closed")
    held = <char*>calloc(n + 1, 1)
    since = <double*>calloc(n + 1, sizeof(double))
    if held == NULL or since == NULL:
        free(held)
        free(since)
        raise MemoryError("coordination: out of memory")
    try:
        while True:
            # one pass, GIL held throughout: the hold
            start = monotonic()
            busy = -1
            for i in range(n):
                if held[i]:
                    if since[i] < start:
                        start = since[i]
                    continue
                v = <VolumeBase>primaries[i]
                if not PyThread_acquire_lock(v._lk, NOWAIT_LOCK):
                    busy = i
                    break
                held[i] = 1
            if busy < 0:
                swapped = 0
                set_owner(primaries, n, me)
                try:
                    for i in range(n):      # closed while we waited for a lock
                        v = <VolumeBase>primaries[i]
                        if v.base == NULL:
                            raise VolumeClosedError(f"{v!r} is closed")
                    if before is not None:
                        before()
                    for k in range(nh):
                        m = <MirrorBase>hooks[k]
                        m.cg = m.oos
                        m.oos = m.spare
                        m.spare = None
                    swapped = 1
                    hold = monotonic() - start
                    if hold > timeout:
                        undo_begin(hooks, nh)
                        swapped = 0
                        return 2, hold
                    if after is not None:
                        after()
                    _coordinations += 1
                    return 0, hold
                except BaseException:
                    if swapped:          # no CG left begun: its tracks stay owed
                        undo_begin(hooks, nh)
                    raise
                finally:
                    set_owner(primaries, n, 0)
            # a writer holds lock ``busy``: give back what the tries took and
            # the kept locks after it, then wait for it outside the hold
            for i in range(n - 1, -1, -1):
                if held[i] == 1 or (held[i] == 2 and i > busy):
                    PyThread_release_lock((<VolumeBase>primaries[i])._lk)
                    held[i] = 0
            left = timeout - (monotonic() - t0)
            if left <= 0:
                return 1, monotonic() - t0
            us = <long long>(left * 1e6)
            v = <VolumeBase>primaries[busy]
            with nogil:
                got = PyThread_acquire_lock_timed(v._lk, us, 0) == PY_LOCK_ACQUIRED
            if not got:
                return 1, monotonic() - t0
            held[busy] = 2
            since[busy] = monotonic()
    finally:
        for i in range(n - 1, -1, -1):
            if held[i]:
                PyThread_release_lock((<VolumeBase>primaries[i])._lk)
        free(held)
        free(since)


ctypedef struct DrainJob:
    # one pair's share of a drain, as the nogil loop needs it: the volumes'
    # lock fields and base pointers by address (a close sets base to NULL),
    # the bitmap's words, B's FlashCopy targets as taken under B's lock
    PyThread_type_lock alk
    PyThread_type_lock blk
    unsigned long* aowner
    unsigned long* bowner
    int* adepth
    int* bdepth
    uint8_t** abase
    uint8_t** bbase
    int* binhibits
    int* bversion
    int version
    bint bfile
    int dst_fd
    uint64_t* w
    Py_ssize_t n
    Py_ssize_t chunk
    int shift
    int nrel
    void* hooked
    uint8_t* tgt_base[MAX_RELS]
    uint64_t* tgt_to_copy[MAX_RELS]
    uint64_t* tgt_changed[MAX_RELS]
    int tgt_fd[MAX_RELS]
    Py_ssize_t done
    int err


cdef int _drain_setup(VolumeBase A, VolumeBase B, TrackBitmap owed, Py_ssize_t chunk,
                      DrainJob* j) except -1:
    """Fill ``j`` for the pair A -> B (GIL held; takes B's lock briefly).
    Returns 0, or 2 when B's state asks for the per-update path."""
    cdef Py_ssize_t n = A.n_tracks
    cdef int k, nrel
    cdef RelationshipBase r
    cdef list rels
    cdef unsigned long me = PyThread_get_thread_ident()
    if owed.n_bits != n or B.n_tracks != n or B.track_shift != A.track_shift:
        raise ValueError("pprc_drain needs volumes and bitmap of one geometry")
    if A._owner == me or B._owner == me:
        raise RuntimeError("pprc_drain must run without the volumes' locks held")
    j.done = 0
    j.err = 0
    B._acquire()
    try:
        if B._tgt_rel is not None or B.base == NULL or B._inhibits or A.base == NULL \
                or B.thin or A._reads_allocate:
            return 2      # (thin: pprc_copy_tracks reserves blocks first)
        rels = B._src_rels
        nrel = len(rels)
        if nrel > MAX_RELS:
            return 2
        for k in range(nrel):
            r = <RelationshipBase>rels[k]
            if r.target.base == NULL or r.target.thin:
                return 2
            j.tgt_base[k] = r.target.base
            j.tgt_to_copy[k] = r.to_copy.w
            j.tgt_changed[k] = r.src_changed.w if r.src_changed is not None else NULL
            # (a target closed later bumps the version: its fd is not used then)
            j.tgt_fd[k] = r.target._fd if r.target._file_backed else -1
        j.nrel = nrel
        j.dst_fd = B._fd if B._file_backed else -1
        j.bfile = B._file_backed
        j.version = B._rels_version
    finally:
        B._release()
    j.alk = A._lk
    j.blk = B._lk
    j.aowner = &A._owner
    j.bowner = &B._owner
    j.adepth = &A._depth
    j.bdepth = &B._depth
    j.abase = &A.base
    j.bbase = &B.base
    j.binhibits = &B._inhibits
    j.bversion = &B._rels_version
    j.w = owed.w
    j.n = n
    j.chunk = chunk
    j.shift = A.track_shift
    j.hooked = <void*>B if _cow_hook is not None else NULL
    return 0


cdef int _drain_run(DrainJob* j, double deadline, unsigned long me) noexcept nogil:
    """Send the pair's owed tracks, a chunk at a time under A's and then B's
    lock (no GIL needed); ``j.done`` counts the tracks sent. Returns the
    status of :func:`pprc_drain` (3: the cow hook raised, 4: a pwrite
    failed, ``j.err`` its errno)."""
    cdef Py_ssize_t a = 0, resume = 0, got
    cdef int status = 0
    while True:
        PyThread_acquire_lock(j.alk, WAIT_LOCK)
        j.aowner[0] = me
        j.adepth[0] = 1
        PyThread_acquire_lock(j.blk, WAIT_LOCK)
        j.bowner[0] = me
        j.bdepth[0] = 1
        a = bm_next_set(j.w, j.n, a)
        if a < 0:
            resume = -1
        elif (j.abase[0] == NULL or j.bbase[0] == NULL or j.binhibits[0]
                or j.bversion[0] != j.version):
            status = 2
        else:
            got = apply_runs(j.bbase[0], j.abase[0], j.w, a, j.n, j.chunk, j.shift, j.nrel,
                             j.tgt_base, j.tgt_to_copy, j.tgt_changed, &resume,
                             j.bfile, j.hooked, j.dst_fd, j.tgt_fd, &j.err)
            if got == -2:
                status = 4
            elif got < 0:
                status = 3
            else:
                j.done += got
        j.bowner[0] = 0
        j.bdepth[0] = 0
        PyThread_release_lock(j.blk)
        j.aowner[0] = 0
        j.adepth[0] = 0
        PyThread_release_lock(j.alk)
        if status or resume < 0:
            break
        a = resume
        if deadline >= 0 and monotonic() > deadline:
            status = 1
            break
    return status


cdef int _drain_raise(VolumeBase B, int status, DrainJob* j) except -1:
    if status == 3:         # the cow hook raised: what was sent stays sent
        raise_hook_error()
    if status == 4:         # a pwrite failed: what was sent stays sent, the rest owed
        raise_write_error(B, j.err, "a PPRC update (the tracks not applied stay owed)")
    return 0


def pprc_drain(VolumeBase A, VolumeBase B, TrackBitmap owed, Py_ssize_t chunk,
               double seconds=-1.0):
    """Send every track set in ``owed`` from A to B as PPRC updates (the
    in-process fast path of a consistency-group drain), without the GIL.

    Works a chunk of at most ``chunk`` tracks at a time under A's and then
    B's lock (the order every PPRC update uses), releasing both between
    chunks so host writes to A wait at most one chunk. The caller must hold
    neither lock. Stops early, with everything sent so far applied whole,
    when ``seconds`` (if >= 0) have passed, or when B turns write-inhibited,
    is closed, or its FlashCopy relationships change. Returns ``(tracks sent,
    status)``: 0 done, 1 time limit, 2 stopped for B's state (the caller
    falls back to the per-update path, which reports why).
    """
    cdef DrainJob j
    cdef double deadline = monotonic() + seconds if seconds >= 0 else -1.0
    cdef unsigned long me = PyThread_get_thread_ident()
    cdef int status = _drain_setup(A, B, owed, chunk, &j)
    if status:
        return 0, status
    with nogil:
        status = _drain_run(&j, deadline, me)
    _drain_raise(B, status, &j)
    return j.done, status


def pprc_drain_many(list primaries, list secondaries, list owed, Py_ssize_t chunk_bytes,
                    double seconds=-1.0, Py_ssize_t start=0, list sent=None,
                    TrackBitmap link_down=None):
    """:func:`pprc_drain` over many pairs in one call (a consistency
    group's drain of a secondary group): pair ``k`` sends the tracks set in
    ``owed[k]`` from ``primaries[k]`` to ``secondaries[k]``, for ``k`` from
    ``start`` on, in order, each under its own locks as :func:`pprc_drain`
    takes them, holding them for at most ``chunk_bytes`` of its tracks at a
    time, with one time limit of ``seconds`` (if >= 0) for them all.

    Appends to ``sent`` (if given) the tracks sent by each pair it tried.
    Stops at the first pair whose status is not 0 (1: the time limit
    passed; 2: B's state stopped it, or ``link_down`` (the link's
    ``down_flag()``) had its bit set when the pair was to begin, and the
    caller drains that pair by the per-update path, which says why). Returns ``(k, status)``: that pair's
    index and status, or ``(len(primaries), 0)`` when every pair is done.
    An exception (a copy-on-write hook, a failed pwrite) propagates from the
    pair where it happened; the tracks sent stay sent.
    """
    cdef Py_ssize_t k, m, n = len(primaries), stop
    cdef double deadline = monotonic() + seconds if seconds >= 0 else -1.0
    cdef unsigned long me = PyThread_get_thread_ident()
    cdef int status = 0
    cdef VolumeBase A
    cdef DrainJob* jobs
    # a link that goes down stops the drain before the next pair, as the
    # per-pair path (which asks link.direct() for each pair) would
    cdef volatile uint64_t* down = NULL if link_down is None else link_down.w
    if len(secondaries) != n or len(owed) != n:
        raise ValueError("pprc_drain_many needs as many secondaries and bitmaps as primaries")
    if start >= n:
        return n, 0
    jobs = <DrainJob*>calloc(n - start, sizeof(DrainJob))
    if jobs == NULL:
        raise MemoryError("pprc_drain_many: out of memory")
    try:
        # every pair's setup with the GIL, up to the first that B's state stops
        stop = n
        for k in range(start, n):
            A = <VolumeBase?>primaries[k]
            if _drain_setup(A, <VolumeBase?>secondaries[k], <TrackBitmap?>owed[k],
                            max(1, chunk_bytes >> A.track_shift), &jobs[k - start]):
                stop = k
                status = 2
                break
        # then the tracks of them all in one pass without the GIL
        m = stop
        with nogil:
            for k in range(start, stop):
                if down != NULL and down[0] & 1:
                    status = 2
                    m = k
                    break
                status = _drain_run(&jobs[k - start], deadline, me)
                if status:
                    m = k
                    break
            else:
                status = 2 if stop < n else 0
        if sent is not None:
            for k in range(start, min(m + 1, n)):
                sent.append(jobs[k - start].done)
        if m < stop:
            _drain_raise(<VolumeBase>secondaries[m], status, &jobs[m - start])
        return m, status
    finally:
        free(jobs)


# ---------------------------------------------------------------------------
# Batched steps of a consistency group (a secondary group's share of it)
# ---------------------------------------------------------------------------

def first_closed(list volumes):
    """The index of the first closed volume of ``volumes``, or -1."""
    cdef Py_ssize_t k
    for k in range(len(volumes)):
        if (<VolumeBase?>volumes[k]).base == NULL:
            return k
    return -1


def zero_bitmaps(list bitmaps):
    """Clear every bitmap of ``bitmaps`` (one call for a store's pool)."""
    cdef TrackBitmap bm
    for o in bitmaps:
        bm = <TrackBitmap?>o
        memset(bm.w, 0, bm.n_words * 8)


def prepare_revertible_many(list rels, Py_ssize_t start, sequence, list fresh):
    """The in-memory step of ``FlashCopy.resync(revertible=True,
    sequence=sequence)`` for ``rels[start:]``, in order, each under its
    source's and target's locks: the revert image keeps the current
    bitmaps and sequence, the new ``to_copy`` is ``to_copy | src_changed |
    tgt_changed`` (into ``fresh[3k]``), the change bitmaps are the empty
    ``fresh[3k+1]`` and ``fresh[3k+2]``, the source is write-inhibited.

    The caller has checked what holds for the whole group (the sequence
    number, a store that records nothing and is writable, no fault armed at
    ``prepare``). Stops before the first relationship whose own state asks
    for the per-relationship method (withdrawn, without change recording,
    already revertible, a closed volume, a background copy to start),
    which then raises or does the step as usual. Returns the index it
    stopped at (``len(rels)`` when done).
    """
    cdef Py_ssize_t k, n = len(rels)
    cdef RelationshipBase r
    cdef VolumeBase S, T
    cdef TrackBitmap out, sc, tc
    if len(fresh) < 3 * n:
        raise ValueError("prepare_revertible_many needs three fresh bitmaps per relationship")
    for k in range(start, n):
        o = rels[k]
        r = <RelationshipBase?>o
        S, T = r.source, r.target
        if (not r.active or r.revertible or r.src_changed is None or r.tgt_changed is None
                or S is None or T is None or S.base == NULL or T.base == NULL):
            return k
        out = <TrackBitmap?>fresh[3 * k]
        sc = <TrackBitmap?>fresh[3 * k + 1]
        tc = <TrackBitmap?>fresh[3 * k + 2]
        if (out.n_bits != r.to_copy.n_bits or sc.n_bits != out.n_bits
                or tc.n_bits != out.n_bits or r.src_changed.n_bits != out.n_bits
                or r.tgt_changed.n_bits != out.n_bits):
            raise ValueError("prepare_revertible_many: bitmaps of different sizes")
        lock_two(S, T)
        try:
            if not r.active or r.revertible or S.base == NULL or T.base == NULL:
                return k
            bm_or3_words(out.w, r.to_copy.w, r.src_changed.w, r.tgt_changed.w, out.n_words)
            o._revert_image = (r.to_copy, r.src_changed, r.tgt_changed, o.sequence)
            r.revertible = True
            S._inhibits += 1
            r.to_copy = out
            r.src_changed = sc
            r.tgt_changed = tc
            S._rels_version += 1    # a drain that took the old bitmaps stops
            o.sequence = sequence
            o._cursor = 0
        finally:
            unlock_two(S, T)
    return n


def end_revertible_many(list rels, Py_ssize_t start, bint commit, list dropped):
    """The in-memory step of ``FlashCopy.commit()`` (``commit``) or
    ``revert()`` for ``rels[start:]``, in order, each under its source's
    and target's locks: the bitmaps that drop out (the revert image's on
    commit, the current ones on revert) are appended to ``dropped`` for the
    store's pool, and the source's write-inhibit is released.

    As :func:`prepare_revertible_many`, the caller has checked the group
    (a store that records nothing and is writable, no fault armed at
    ``commit`` / ``revert``), and it stops before the first relationship
    whose own state asks for the per-relationship method (withdrawn, not
    revertible, a closed volume, a background copy to start). Returns the
    index it stopped at (``len(rels)`` when done).
    """
    cdef Py_ssize_t k, n = len(rels)
    cdef RelationshipBase r
    cdef VolumeBase S, T
    cdef tuple image
    for k in range(start, n):
        o = rels[k]
        r = <RelationshipBase?>o
        S, T = r.source, r.target
        if (not r.active or not r.revertible or S is None or T is None
                or S.base == NULL or T.base == NULL or o.background_copy):
            return k
        lock_two(S, T)
        try:
            image = o._revert_image
            if not r.active or not r.revertible or image is None or S.base == NULL \
                    or T.base == NULL:
                return k
            if commit:
                dropped.extend(image[:3])
            else:
                dropped.append(r.to_copy)
                dropped.append(r.src_changed)
                dropped.append(r.tgt_changed)
                r.to_copy, r.src_changed, r.tgt_changed, o.sequence = image
                S._rels_version += 1
            o._revert_image = None
            r.revertible = False
            S._inhibits -= 1
        finally:
            unlock_two(S, T)
    return n


def cg_end_many(list primaries, list hooks):
    """Close the consistency group of every mirror hook after a drain that
    succeeded (``PPRCPair._cg_end(True)``), each under its primary's lock:
    the emptied CG bitmap becomes the spare, no CG is in flight. (A failed
    drain goes through the per-pair method, which gives the tracks back.)"""
    cdef Py_ssize_t k, n = len(hooks)
    cdef VolumeBase A
    cdef MirrorBase m
    if len(primaries) != n:
        raise ValueError("cg_end_many needs one primary per hook")
    for k in range(n):
        A = <VolumeBase?>primaries[k]
        o = hooks[k]
        m = <MirrorBase?>o
        A._acquire()
        try:
            if m.cg is not None:
                if o.side:
                    o.side = {}
                o.cg_bytes = 0
                m.spare = m.cg
                m.cg = None
        finally:
            A._release()


def pool_bitmaps(bitmaps, dict free, Py_ssize_t free_bytes, Py_ssize_t cap):
    """Put the bitmaps of ``bitmaps`` (None skipped) in ``free`` (n_bits ->
    list), while ``free_bytes`` stays within ``cap``; returns the new
    ``free_bytes``. (A store's pool: one call for a CG's bitmaps.)"""
    cdef TrackBitmap bm
    cdef Py_ssize_t last = -1, nb
    cdef list pool = None
    for o in bitmaps:
        if o is None:
            continue
        bm = <TrackBitmap?>o
        nb = bm.n_words * 8
        if free_bytes + nb > cap:
            continue
        if bm.n_bits != last or pool is None:
            pool = free.get(bm.n_bits)
            if pool is None:
                pool = free[bm.n_bits] = []
            last = bm.n_bits
        pool.append(bm)
        free_bytes += nb
    return free_bytes
