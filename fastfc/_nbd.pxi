# Included by _core.pyx: the NBD server's transmission phase (fastfc/tools/nbd.py)
# for its small READs and WRITEs, one C call per batch of requests, and the
# request counters of a connection in C arrays.
#
# nbd_batch carries out the whole small requests at the front of a
# connection's receive buffer through the volume's own host I/O path
# (VolumeBase._write and _read: copy-on-write, out-of-sync bits, locks, the
# write gate, hooks), writes their replies into the batch's output and
# notes them in the connection's RequestTally; it stops at the first request
# it does not take and hands it back to the Python loop, which keeps every
# other case (FUA, FLUSH, zeroes, BLOCK_STATUS, large requests, refusals,
# protocol errors) as it was. The GIL is held throughout: the volume path
# raises Python exceptions and calls Python hooks (a collision with a CG,
# a Metro Mirror's synchronous write, the fault hooks), and a session's
# write gate is state the GIL guards.

from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_GET_SIZE, PyByteArray_Resize
from libc.stdlib cimport realloc
from libc.stdint cimport uint32_t

#: upper bounds (seconds) of the NBD request-latency histogram's buckets (+Inf after)
NBD_LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                       0.1, 0.25, 0.5, 1.0, 2.5)

cdef enum:
    NBD_N_OPS = 4            # read, write, flush, write_zeroes (nbd.OPS)
    NBD_N_BOUNDS = 14
    NBD_N_BUCKETS = 15
    NBD_OP_READ = 0
    NBD_OP_WRITE = 1
    NBD_HEADER = 28          # a request's header
    NBD_SIMPLE = 16          # a simple reply
    NBD_DATA_CHUNK = 28      # a structured reply's OFFSET_DATA chunk header

cdef double _nbd_bounds[14]
for _i in range(NBD_N_BOUNDS):
    _nbd_bounds[_i] = NBD_LATENCY_BUCKETS[_i]

cdef uint32_t NBD_REQUEST_MAGIC = 0x25609513
cdef uint32_t NBD_SIMPLE_REPLY_MAGIC = 0x67446698
cdef uint32_t NBD_STRUCTURED_REPLY_MAGIC = 0x668E33EF

#: what :func:`nbd_batch` stopped at
NBD_DECLINED = 0     # the request at ``start`` (or a part of one) is the Python loop's
NBD_TURN = 1         # the request at ``start`` is one it takes: ask for the turn first
NBD_FULL = 2         # the replies reached ``reply_limit``: send them, then go on
NBD_FAILED = 3       # the volume refused the request just before ``start``


cdef inline uint32_t _be32(const uint8_t* p) noexcept nogil:
    return (<uint32_t>p[0] << 24) | (<uint32_t>p[1] << 16) | (<uint32_t>p[2] << 8) | p[3]


cdef inline uint64_t _be64(const uint8_t* p) noexcept nogil:
    return (<uint64_t>_be32(p) << 32) | _be32(p + 4)


cdef inline void _put32(uint8_t* p, uint32_t v) noexcept nogil:
    p[0] = v >> 24
    p[1] = (v >> 16) & 0xFF
    p[2] = (v >> 8) & 0xFF
    p[3] = v & 0xFF


cdef inline void _put64(uint8_t* p, uint64_t v) noexcept nogil:
    _put32(p, <uint32_t>(v >> 32))
    _put32(p + 4, <uint32_t>v)


cdef class RequestTally:
    """The requests of one NBD connection (or, summed, of an export): per
    op (``read``, ``write``, ``flush``, ``write_zeroes``), how many were
    answered, how many with an error, the bytes of those answered without,
    and their latency (from the request's header in to its reply out) as
    a histogram over :data:`NBD_LATENCY_BUCKETS` and a sum; in C arrays.

    Replies that :func:`nbd_batch` put in a batch's output wait here until
    the output is sent (:meth:`settle`). A connection's tally is written by
    its thread alone under the GIL; a reader (a metrics scrape) sees values
    a moment old, never a torn one."""

    cdef long long _requests[4]
    cdef long long _errors[4]
    cdef long long _bytes[4]
    cdef long long _buckets[4][15]
    cdef double _seconds[4]
    # replies in a batch's output not yet sent: op, bytes, error, start time
    cdef int* _p_op
    cdef int* _p_err
    cdef long long* _p_n
    cdef double* _p_t0
    cdef Py_ssize_t _n_pending
    cdef Py_ssize_t _cap

    def __dealloc__(self):
        free(self._p_op)
        free(self._p_err)
        free(self._p_n)
        free(self._p_t0)

    cdef inline void _count(self, int op, long long nbytes, int err, double seconds) noexcept:
        cdef int k = 0
        self._requests[op] += 1
        if err:
            self._errors[op] += 1
        else:
            self._bytes[op] += nbytes
        while k < NBD_N_BOUNDS and _nbd_bounds[k] < seconds:   # (bisect_left)
            k += 1
        self._buckets[op][k] += 1
        self._seconds[op] += seconds

    cdef int _pend(self, int op, long long nbytes, int err, double t0) except -1:
        cdef Py_ssize_t cap
        if self._n_pending == self._cap:
            cap = self._cap * 2 if self._cap else 64
            self._p_op = <int*>_grow(self._p_op, cap * sizeof(int))
            self._p_err = <int*>_grow(self._p_err, cap * sizeof(int))
            self._p_n = <long long*>_grow(self._p_n, cap * sizeof(long long))
            self._p_t0 = <double*>_grow(self._p_t0, cap * sizeof(double))
            self._cap = cap
        self._p_op[self._n_pending] = op
        self._p_err[self._n_pending] = err
        self._p_n[self._n_pending] = nbytes
        self._p_t0[self._n_pending] = t0
        self._n_pending += 1
        return 0

    def add(self, int op, long long nbytes, int err, double seconds):
        """One request answered (``err`` its NBD error, 0: none)."""
        if not 0 <= op < NBD_N_OPS:
            raise ValueError(f"no request op {op}")
        self._count(op, nbytes, err, seconds)

    def settle(self, double now):
        """The replies :func:`nbd_batch` wrote went out at ``now`` (the
        monotonic clock, :func:`time.perf_counter`): count them."""
        cdef Py_ssize_t i
        for i in range(self._n_pending):
            self._count(self._p_op[i], self._p_n[i], self._p_err[i], now - self._p_t0[i])
        self._n_pending = 0

    @property
    def pending(self):
        """Replies written by :func:`nbd_batch` and not yet settled."""
        return self._n_pending

    def merge(self, RequestTally other not None):
        """Add ``other``'s counts to these."""
        cdef int i, k
        for i in range(NBD_N_OPS):
            self._requests[i] += other._requests[i]
            self._errors[i] += other._errors[i]
            self._bytes[i] += other._bytes[i]
            self._seconds[i] += other._seconds[i]
            for k in range(NBD_N_BUCKETS):
                self._buckets[i][k] += other._buckets[i][k]

    @property
    def requests(self):
        return [self._requests[i] for i in range(NBD_N_OPS)]

    @property
    def errors(self):
        return [self._errors[i] for i in range(NBD_N_OPS)]

    @property
    def bytes(self):
        return [self._bytes[i] for i in range(NBD_N_OPS)]

    @property
    def seconds(self):
        return [self._seconds[i] for i in range(NBD_N_OPS)]

    @property
    def buckets(self):
        return [[self._buckets[i][k] for k in range(NBD_N_BUCKETS)] for i in range(NBD_N_OPS)]


cdef void* _grow(void* p, size_t size) except NULL:
    cdef void* q = realloc(p, size)
    if q == NULL:
        raise MemoryError("could not grow an NBD connection's reply log")
    return q


cdef inline uint8_t* _out_grow(bytearray out, Py_ssize_t n) except NULL:
    """Make ``out`` ``n`` bytes longer; a pointer to the new bytes."""
    cdef Py_ssize_t pos = PyByteArray_GET_SIZE(out)
    PyByteArray_Resize(out, pos + n)
    return <uint8_t*>PyByteArray_AS_STRING(out) + pos


def nbd_batch(VolumeBase vol not None, bytearray rbuf not None, Py_ssize_t start,
              Py_ssize_t end, bytearray out not None, RequestTally tally not None, bint structured, bint read_only,
              bint ask_turn, double since, Py_ssize_t keep, Py_ssize_t reply_limit):
    """Carry out the whole small requests of ``rbuf[start:end]`` (a
    connection's receive buffer), in order, until one it does not take.

    It takes a READ of at most ``keep`` bytes in range with no flag but FUA
    (of at least one byte if ``structured``), and a WRITE of at most
    ``keep`` bytes in range, without flags, whose data is all in the buffer
    (``read_only``: no write); through ``vol``'s host path
    (:meth:`VolumeBase.readinto`, :meth:`VolumeBase.write`). Each reply (a
    simple one; a READ's data in one ``OFFSET_DATA`` chunk if
    ``structured``) is appended to ``out`` and noted in ``tally`` (counted
    at :meth:`RequestTally.settle`, once sent). A request's start time is
    the clock's when it is taken, ``since`` for the first one if >= 0.

    Returns ``(start, why, failure)``: where it stopped in ``rbuf``, and why
    (:data:`NBD_DECLINED`: the request there, or less than a whole one, is
    the caller's; :data:`NBD_TURN`: it would take that request, but
    ``ask_turn`` said to stop before the first one it takes;
    :data:`NBD_FULL`: ``out`` holds ``reply_limit`` bytes or more;
    :data:`NBD_FAILED`: the volume refused the request just before
    ``start``, nothing of it replied: ``failure`` is ``(exception, op,
    handle, length, start time)`` for the caller's reply)."""
    cdef const uint8_t* r
    cdef const uint8_t* p
    cdef uint8_t* q
    cdef uint32_t flags, cmd, length
    cdef uint64_t offset, handle
    cdef uint64_t cap = <uint64_t>vol.capacity
    cdef Py_ssize_t pos, hdr = NBD_DATA_CHUNK if structured else NBD_SIMPLE
    cdef double t0
    if not 0 <= start <= end <= PyByteArray_GET_SIZE(rbuf):
        raise ValueError(f"no requests at [{start}, {end}) of a {len(rbuf)}-byte buffer")
    if keep < 0:
        raise ValueError("keep must not be negative")
    while end - start >= NBD_HEADER:
        r = <const uint8_t*>PyByteArray_AS_STRING(rbuf)
        p = r + start
        if _be32(p) != NBD_REQUEST_MAGIC:
            return start, NBD_DECLINED, None
        flags = (<uint32_t>p[4] << 8) | p[5]
        cmd = (<uint32_t>p[6] << 8) | p[7]
        offset = _be64(p + 16)
        length = _be32(p + 24)
        if length > <uint64_t>keep or length > cap or offset > cap - length:
            return start, NBD_DECLINED, None
        if cmd == 1:                 # WRITE
            if flags or read_only or end - start < NBD_HEADER + length:
                return start, NBD_DECLINED, None
        elif cmd == 0:               # READ
            if flags & ~1 or (structured and length == 0):
                return start, NBD_DECLINED, None
        else:
            return start, NBD_DECLINED, None
        if ask_turn:
            return start, NBD_TURN, None
        if since >= 0:
            t0 = since
            since = -1.0
        else:
            t0 = monotonic()
        handle = _be64(p + 8)       # (kept as the client's 8 bytes)
        if cmd == 1:
            start += NBD_HEADER + length
            try:
                vol._write(<Py_ssize_t>offset, p + NBD_HEADER, length, ORIGIN_HOST)
            except Exception as e:
                return start, NBD_FAILED, (e, NBD_OP_WRITE, handle, length, t0)
            q = _out_grow(out, NBD_SIMPLE)
            _put32(q, NBD_SIMPLE_REPLY_MAGIC)
            _put32(q + 4, 0)
            memcpy(q + 8, p + 8, 8)
            tally._pend(NBD_OP_WRITE, length, 0, t0)
        else:
            start += NBD_HEADER
            pos = PyByteArray_GET_SIZE(out)
            _out_grow(out, hdr + length)
            q = <uint8_t*>PyByteArray_AS_STRING(out) + pos
            try:
                vol._read(<Py_ssize_t>offset, q + hdr, length)
            except BaseException as e:
                PyByteArray_Resize(out, pos)      # (no reply of it goes out)
                if isinstance(e, Exception):
                    return start, NBD_FAILED, (e, NBD_OP_READ, handle, length, t0)
                raise
            # (rbuf is not out: p still points at this request's header)
            if structured:
                _put32(q, NBD_STRUCTURED_REPLY_MAGIC)
                q[4] = 0
                q[5] = 1                  # REPLY_FLAG_DONE
                q[6] = 0
                q[7] = 1                  # REPLY_TYPE_OFFSET_DATA
                memcpy(q + 8, p + 8, 8)
                _put32(q + 16, length + 8)
                _put64(q + 20, offset)
            else:
                _put32(q, NBD_SIMPLE_REPLY_MAGIC)
                _put32(q + 4, 0)
                memcpy(q + 8, p + 8, 8)
            tally._pend(NBD_OP_READ, length, 0, t0)
            if PyByteArray_GET_SIZE(out) >= reply_limit:
                return start, NBD_FULL, None
    return start, NBD_DECLINED, None
