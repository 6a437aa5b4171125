# Included by _core.pyx: kernel selection (_kernels.h), the environment's
# problems, the copy kernels and the copy threads (_pool.h), the pwrite helpers,
# and the buffers a host read or write borrows.

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


# -- the copy of large runs (_kernels.h, "Which kernel copies a large run") ---

COPY_KERNELS = ("memcpy", "stream", "stream1")
_COPY_HOW = {FASTFC_COPY_UNCHOSEN: "not chosen yet", FASTFC_COPY_FORCED: "forced",
             FASTFC_COPY_NO_BUFFER: "default: no memory to measure in",
             FASTFC_COPY_NO_STREAMS: "default: no streaming stores on this CPU"}
COPY_MARGIN = FASTFC_COPY_MARGIN


def copy_kernel(bint choose=True):
    """How runs of 64 KiB or more are copied: ``{"kernel": "memcpy" |
    "stream" | "stream1", "why": ..., "ms_per_gib": {candidate: ms},
    "cost_ms": ...}``.

    ``memcpy`` is the C library's; ``stream`` non-temporal stores in four
    4 KiB streams; ``stream1`` non-temporal stores in one stream. Unless
    ``FASTFC_COPY`` names one, the first large copy of the process measures
    the three (``cost_ms``, about 40 ms, once) and keeps the fastest, memcpy
    unless another is at least ``COPY_MARGIN`` faster. ``choose=True``
    measures now if that has not happened yet."""
    if choose:
        with nogil:
            fastfc_copy_choose()
    cdef int k
    cdef double scale = (1 << 30) / <double>FASTFC_CAL_BYTES * 1e3
    times = {fastfc_copy_names[k].decode(): round(fastfc_copy.seconds[k] * scale, 1)
             for k in range(FASTFC_N_COPY) if fastfc_copy.seconds[k] > 0}
    if fastfc_copy.how == FASTFC_COPY_MEASURED:
        kind = fastfc_copy_names[fastfc_copy.kind].decode()
        if kind == "memcpy":
            why = (f"measured: no candidate {COPY_MARGIN:.0%} faster than memcpy")
        else:
            why = f"measured: {times[kind] / times['memcpy']:.2f} x memcpy's time"
        why += (f" ({FASTFC_CAL_ROUNDS} rounds over {FASTFC_CAL_BYTES >> 20} MiB in "
                f"{FASTFC_CAL_PIECE >> 20} MiB pieces)")
    elif fastfc_copy.how == FASTFC_COPY_FORCED:
        why = _copy_forced_by
    else:
        why = _COPY_HOW[fastfc_copy.how]
    chosen = fastfc_copy.state == 2
    return {"kernel": fastfc_copy_names[fastfc_copy.kind].decode() if chosen else None,
            "why": why, "ms_per_gib": times, "cost_ms": round(fastfc_copy.cost * 1e3, 1)}


_copy_forced_by = "forced"


def _copy_runs():
    """How many large runs each copy kernel has copied so far, ``{kernel:
    count}`` (for tests: the kernel chosen is the one used)."""
    return {COPY_KERNELS[k]: fastfc_copy.runs[k] for k in range(FASTFC_N_COPY)}


def _use_copy(str kernel, str why="forced by _use_copy"):
    """Copy large runs with ``kernel`` (one of :data:`COPY_KERNELS`) from now
    on, or ``"auto"``: measure again at the next large copy. For tests and
    benchmarks; no copy may be running in another thread meanwhile. Returns
    :func:`copy_kernel` without choosing."""
    global _copy_forced_by
    if kernel == "auto":
        fastfc_copy_force(-1)
    elif kernel in COPY_KERNELS:
        _copy_forced_by = why
        fastfc_copy_force(COPY_KERNELS.index(kernel))
    else:
        raise ValueError(f"copy kernel must be one of auto, {', '.join(COPY_KERNELS)}, "
                         f"got {kernel!r}")
    return copy_kernel(choose=False)


def _decide_copy(seconds, str default="memcpy", double margin=COPY_MARGIN):
    """The copy kernel the measurement would keep, given ``{kernel: best
    seconds}`` (a candidate missing or <= 0: not measured): the fastest if
    it beats ``default`` by more than ``margin``, else ``default``. Pure (the
    C decision itself), for tests with made-up times."""
    cdef double t[3]
    cdef int k
    unknown = set(seconds) - set(COPY_KERNELS)
    if unknown or default not in COPY_KERNELS:
        raise ValueError(f"copy kernels are {', '.join(COPY_KERNELS)}, got "
                         f"{sorted(unknown) or default!r}")
    for k in range(FASTFC_N_COPY):
        t[k] = float(seconds.get(COPY_KERNELS[k], 0.0))
    return COPY_KERNELS[fastfc_copy_decide(t, FASTFC_N_COPY, COPY_KERNELS.index(default),
                                           margin)]


def _copy_with(str kernel, uint8_t[::1] dst, const uint8_t[::1] src):
    """Copy ``src`` into the start of ``dst`` with the named copy kernel,
    whatever is chosen (a test and benchmark hook)."""
    if kernel not in COPY_KERNELS:
        raise ValueError(f"copy kernel must be one of {', '.join(COPY_KERNELS)}, got {kernel!r}")
    cdef int k = COPY_KERNELS.index(kernel)
    if src.shape[0] > dst.shape[0]:
        raise ValueError(f"dst holds {dst.shape[0]} bytes, src {src.shape[0]}")
    if src.shape[0] == 0:
        return
    with nogil:
        fastfc_copy_with(k, &dst[0], &src[0], src.shape[0])


def _select_copy_at_import():
    fastfc_copy_init()
    env = os.environ.get("FASTFC_COPY", "")
    kernel = env.strip().lower() or "auto"
    if kernel != "auto" and kernel not in COPY_KERNELS:
        _environment_problem(f"FASTFC_COPY must be one of auto, {', '.join(COPY_KERNELS)}, "
                             f"got {env!r}")
        kernel = "auto"
    if kernel != "auto":
        _use_copy(kernel, why="forced by FASTFC_COPY")


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


# A bad FASTFC_KERNELS, FASTFC_COPY or FASTFC_COPY_THREADS does not stop the
# import: the value is ignored (the default used), a RuntimeWarning says so at
# the first volume made (not during the import, so that the command line, which
# refuses such a value as a usage error, prints one line), and
# environment_problems() names it.
_environment_problems = []
cdef bint _environment_unwarned = False


cdef _environment_problem(str problem):
    global _environment_unwarned
    if problem not in _environment_problems:
        _environment_problems.append(problem)
        _environment_unwarned = True


def environment_problems():
    """What is wrong with the ``FASTFC_KERNELS``, ``FASTFC_COPY`` and
    ``FASTFC_COPY_THREADS`` values this process saw (each ignored, its
    default used): one line each."""
    return tuple(_environment_problems)


cdef _warn_environment():
    global _environment_unwarned
    _environment_unwarned = False
    for problem in _environment_problems:
        warnings.warn(f"{problem}: ignored, the default is used", RuntimeWarning)


_select_at_import()
_select_copy_at_import()


# --------------------------------------------------------------------------
# Copy kernels (no GIL)
# --------------------------------------------------------------------------

# copy_large (from _bitops.pxd / _kernels.h) copies with the kernel measured
# fastest on this CPU (copy_kernel()): memcpy, or non-temporal stores where
# they win (a track copied to a FlashCopy target or a secondary is not read
# back soon).

# Runs of at least this many bytes are copied with copy_large; shorter ones
# with memcpy, whose cached stores win when the destination is in cache anyway.
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
        copy_large(dst, src, n)
    else:
        memcpy(dst, src, n)


cdef inline void copy_big(uint8_t* dst, const uint8_t* src, size_t n) noexcept nogil:
    """Copy ``n`` bytes, with the measured kernel (:func:`copy_kernel`) when
    large, split across the copy threads when it is worth it
    (:func:`set_copy_threads`)."""
    if n >= <size_t>STREAM_BYTES and fastfc_copy.state != 2:
        fastfc_copy_choose()     # once, on this thread alone, before any split
    if n >= 2 * PAR_PIECE and fastfc_pool_threads > 1:
        fastfc_pool_copy(dst, src, n, PAR_PIECE, _stream_piece)
    elif n >= <size_t>STREAM_BYTES:
        copy_large(dst, src, n)
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
        if n >= <size_t>STREAM_BYTES and fastfc_copy.state != 2:
            fastfc_copy_choose()     # as copy_big does
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


cdef extern from "<unistd.h>" nogil:
    ssize_t pread(int fd, void* buf, size_t count, off_t offset)


cdef int pread_all(int fd, uint8_t* buf, Py_ssize_t n, off_t off) noexcept nogil:
    """Read ``n`` bytes at ``off`` of ``fd`` (retrying short reads and EINTR).
    Returns 0, or the errno of the failure (EIO for a read past the end)."""
    cdef ssize_t got
    while n > 0:
        got = pread(fd, buf, <size_t>n, off)
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


from libc.errno cimport EINVAL

cdef extern from "<sys/mman.h>" nogil:
    int mincore(void* addr, size_t length, unsigned char* vec)
    int c_madvise "madvise"(void* addr, size_t length, int advice)

cdef extern from "<unistd.h>" nogil:
    long syscall(long number, ...)

cdef struct cachestat_range:
    uint64_t off
    uint64_t len

cdef struct cachestat_t:
    uint64_t nr_cache
    uint64_t nr_dirty
    uint64_t nr_writeback
    uint64_t nr_evicted
    uint64_t nr_recently_evicted

cdef enum:
    POPULATE_READ = 22      # MADV_POPULATE_READ (Linux 5.14)
    NR_CACHESTAT = 451      # cachestat(2) (Linux 6.5; one number on every architecture)
    RESIDENT_SPAN = 1 << 26  # bytes looked at per cachestat and mincore call


cdef long cached_pages(int fd, Py_ssize_t off, Py_ssize_t n) noexcept nogil:
    """Pages of ``fd``'s bytes ``[off, off + n)`` in the page cache
    (``cachestat``: a walk of the cached pages only), or -1 if unknown."""
    cdef cachestat_range r
    cdef cachestat_t cs
    r.off = off
    r.len = n
    if syscall(NR_CACHESTAT, fd, &r, &cs, 0) != 0:
        return -1
    return <long>cs.nr_cache


def map_resident_pages(mapping, int fd):
    """Map, in this process's page table, every page of the file mapping
    ``mapping`` (an ``mmap`` of ``fd`` from offset 0) that is in the
    page cache now, and no other: ``cachestat`` skips the spans with none
    cached (so a cold or sparse volume costs a call per 64 MiB, not a look
    at each page), ``mincore`` finds them in the others, and
    ``MADV_POPULATE_READ`` maps each run of them (read-only until a store:
    the page stays clean). Returns the number of pages mapped, or -1 when
    this kernel lacks ``cachestat`` or the advice (nothing more is done).
    No page is read from the disk but those evicted in between."""
    cdef Py_buffer view
    cdef Py_ssize_t page = 4096, n, pos, span, i, run, pages, mapped = 0
    cdef unsigned char* vec
    cdef uint8_t* base
    cdef long cached
    cdef int bad = 0
    PyObject_GetBuffer(mapping, &view, PyBUF_SIMPLE)
    try:
        base = <uint8_t*>view.buf
        n = view.len
        with nogil:
            cached = cached_pages(fd, 0, n)
        if cached <= 0:
            return -1 if cached < 0 else 0
        vec = <unsigned char*>calloc(RESIDENT_SPAN // page, 1)
        if vec == NULL:
            raise MemoryError()
        try:
            with nogil:
                pos = 0
                while pos < n and not bad:
                    span = n - pos if n - pos < RESIDENT_SPAN else RESIDENT_SPAN
                    pages = (span + page - 1) // page
                    if cached_pages(fd, pos, span) <= 0:
                        pos += span
                        continue
                    if mincore(base + pos, <size_t>span, vec) != 0:
                        break
                    run = -1
                    for i in range(pages + 1):
                        if i < pages and vec[i] & 1:
                            if run < 0:
                                run = i
                        elif run >= 0:
                            if c_madvise(base + pos + run * page,
                                         <size_t>((i - run) * page), POPULATE_READ) != 0:
                                bad = errno == EINVAL
                                if bad:
                                    break
                            else:
                                mapped += i - run
                            run = -1
                    pos += span
        finally:
            free(vec)
    finally:
        PyBuffer_Release(&view)
    return -1 if bad else mapped


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
