# Included by _core.pyx: taking a volume's lock (VolumeBase._acquire,
# _release, _lock), and the write gate of a Global Mirror session that every
# taking of a primary's lock passes first.

cdef extern from "<unistd.h>" nogil:
    int usleep(unsigned int usec)


cdef class WriteGate:
    """One gate for the primaries (A volumes) of a Global Mirror session in
    memory: what :func:`coordinate_pairs` closes in place of taking every
    primary's lock, so that coordinating a consistency group costs
    O(primaries that changed), not O(primaries).

    Every taking of a primary's lock on the GIL's paths (a host write, a
    read, a pair's or a relationship's step: ``VolumeBase._acquire`` and
    ``_lock``) passes the gate first, and counts as *in flight* until that
    lock is let go. While the gate is closed, a thread that would take one
    waits at the gate (the GIL released), as it would wait for the lock
    during a hold, unless it is the thread that closed it or it holds a
    primary's lock of this gate already (it is in flight: holding it up
    would only deadlock). The closer waits for the writes in flight to end;
    then no primary is locked on those paths, and none can be until the gate
    opens: the same instant that holding every primary's lock makes. (Locks
    taken without the GIL, by a drain's kernel, pass no gate: such a holder
    never sets an out-of-sync bit, and coordination takes the locks of the
    primaries it changes, the per-lock way.)

    The first taking of a primary's lock since the last coordination marks
    its slot (``marked``), so coordination knows, without looking at every
    pair, which pairs may have tracks out of sync: every bit of a pair's
    out-of-sync bitmap is set under its primary's lock (host writes, a
    failed CG's tracks given back). A pair whose slot is not marked has
    none. Every slot is marked when the gate is made.

    ``volumes[s]``: the primary of slot ``s`` (slots in volume-id order, the
    order of the lock); ``hook_of[s]``: its pair's index in the session's
    list of pairs. Everything here is guarded by the GIL.
    """

    cdef readonly Py_ssize_t size
    cdef readonly bint closed
    cdef unsigned long closer
    cdef readonly Py_ssize_t inflight
    cdef bint waiting
    cdef Py_ssize_t waiters             # threads held at the gate now
    cdef PyThread_type_lock turnstile   # held while closed: waiters pass through it
    cdef PyThread_type_lock drained     # released when the last one in flight leaves
    cdef list volumes
    cdef Py_ssize_t* hook_of
    cdef char* marked
    cdef Py_ssize_t* dirty              # the marked slots, in marking order
    cdef readonly Py_ssize_t n_dirty

    def __cinit__(self, *args, **kwargs):
        self.turnstile = PyThread_allocate_lock()
        self.drained = PyThread_allocate_lock()
        if self.turnstile == NULL or self.drained == NULL:
            raise MemoryError("could not allocate a write gate's locks")
        PyThread_acquire_lock(self.drained, WAIT_LOCK)   # (not signalled)

    def __init__(self, list volumes, list hook_of):
        """``volumes``: the primaries in volume-id order; ``hook_of[s]``: the
        index of the pair of ``volumes[s]`` in the session's pairs. The
        volumes are not attached: :meth:`attach` does it."""
        cdef Py_ssize_t s, n = len(volumes)
        if len(hook_of) != n:
            raise ValueError("a write gate needs one pair index per primary")
        for s in range(1, n):
            if (<VolumeBase?>volumes[s - 1]).vid >= (<VolumeBase?>volumes[s]).vid:
                raise ValueError("a write gate's primaries must be in volume-id order")
        self.size = n
        self.volumes = list(volumes)
        self.hook_of = <Py_ssize_t*>calloc(n + 1, sizeof(Py_ssize_t))
        self.marked = <char*>calloc(n + 1, 1)
        self.dirty = <Py_ssize_t*>calloc(n + 1, sizeof(Py_ssize_t))
        if self.hook_of == NULL or self.marked == NULL or self.dirty == NULL:
            raise MemoryError("could not allocate a write gate")
        for s in range(n):
            self.hook_of[s] = hook_of[s]
            self.marked[s] = 1
            self.dirty[s] = s
        self.n_dirty = n

    def __dealloc__(self):
        if self.turnstile != NULL:
            PyThread_free_lock(self.turnstile)
        if self.drained != NULL:
            PyThread_release_lock(self.drained)
            PyThread_free_lock(self.drained)
        free(self.hook_of)
        free(self.marked)
        free(self.dirty)

    def attach(self):
        """Make every primary pass this gate (a volume passes one gate: the
        newest session's over it)."""
        cdef Py_ssize_t s
        cdef VolumeBase v
        for s in range(self.size):
            v = <VolumeBase>self.volumes[s]
            v._gate = self
            v._gate_slot = s

    def detach(self):
        """Let the primaries go (the session ends): they pass no gate."""
        cdef VolumeBase v
        for o in self.volumes:
            v = <VolumeBase>o
            if v._gate is self:
                v._gate = None

    def marked_slots(self):
        """The slots marked since the last coordination, in order (tests)."""
        return sorted(self.dirty[i] for i in range(self.n_dirty))

    def mark_all(self):
        """Mark every slot: the next coordination looks at every pair."""
        cdef Py_ssize_t s
        for s in range(self.size):
            gate_mark(self, s)

    def __repr__(self):
        return (f"<WriteGate {self.size} primaries, {'closed' if self.closed else 'open'}, "
                f"{self.inflight} in flight, {self.n_dirty} marked>")


cdef inline void gate_mark(WriteGate g, Py_ssize_t slot) noexcept:
    if not g.marked[slot]:
        g.marked[slot] = 1
        g.dirty[g.n_dirty] = slot
        g.n_dirty += 1


cdef bint gate_held_by(WriteGate g, unsigned long me) noexcept:
    """Whether thread ``me`` holds a primary's lock of ``g`` (a slow path:
    only a thread that meets the gate closed while others are in flight)."""
    cdef Py_ssize_t s
    if g.inflight == 0:
        return False
    for s in range(g.size):
        if (<VolumeBase>g.volumes[s])._owner == me:
            return True
    return False


cdef int gate_pass(WriteGate g, Py_ssize_t slot, unsigned long me, double timeout) except -1:
    """Pass ``g`` to take the lock of its primary ``slot``: wait while it is
    closed (by another thread, and this one holds none of its locks), for
    at most ``timeout`` seconds if >= 0. Returns 1 (in flight from now on,
    the slot marked), or 0 (timed out)."""
    cdef double end
    cdef long long us = -1
    cdef int got
    if g.closed and g.closer != me and not gate_held_by(g, me):
        end = monotonic() + timeout if timeout >= 0 else -1.0
        g.waiters += 1
        while g.closed and g.closer != me and not gate_held_by(g, me):
            if end >= 0:
                us = <long long>((end - monotonic()) * 1e6)
                if us <= 0:
                    g.waiters -= 1
                    return 0
            with nogil:
                got = PyThread_acquire_lock_timed(g.turnstile, us, 0) == PY_LOCK_ACQUIRED
                if got:
                    PyThread_release_lock(g.turnstile)
        g.waiters -= 1
    g.inflight += 1
    gate_mark(g, slot)
    return 1


cdef inline void gate_leave(WriteGate g) noexcept:
    g.inflight -= 1
    if g.inflight == 0 and g.waiting:
        g.waiting = False
        PyThread_release_lock(g.drained)


cdef int gate_close(WriteGate g, unsigned long me, double end) except -1:
    """Close ``g`` (this thread passes it still) and wait until nothing is in
    flight, until ``end`` (monotonic). Threads still held by the last
    closing pass before it closes. Returns 1 drained, 0 past ``end`` (the
    gate may be left closed: the caller opens it)."""
    cdef long long us
    cdef bint got
    if g.closed:
        raise StateError("the write gate is closed already: one coordination at a time")
    # threads the last hold kept waiting pass first (woken, they wait for
    # the GIL only), as a writer waiting for a lock gets it once let go
    while g.waiters > 0:
        if monotonic() >= end:
            return 0
        with nogil:
            usleep(20)
    if not PyThread_acquire_lock(g.turnstile, NOWAIT_LOCK):
        with nogil:       # (a waiter passing through it lets it go at once)
            PyThread_acquire_lock(g.turnstile, WAIT_LOCK)
    g.closed = True
    g.closer = me
    while g.inflight > 0:
        us = <long long>((end - monotonic()) * 1e6)
        if us <= 0:
            return 0
        g.waiting = True
        with nogil:
            got = PyThread_acquire_lock_timed(g.drained, us, 0) == PY_LOCK_ACQUIRED
        g.waiting = False
        if not got:
            # a release that came after the time ran out is taken back, so
            # that the lock is held again (not signalled)
            PyThread_acquire_lock(g.drained, NOWAIT_LOCK)
    return 1


cdef inline void gate_open(WriteGate g) noexcept:
    if g.closed:
        g.closed = False
        g.closer = 0
        PyThread_release_lock(g.turnstile)


cdef void gate_unmark(WriteGate g, Py_ssize_t upto) noexcept:
    """Forget the first ``upto`` marked slots (those a coordination looked
    at); slots marked after them stay marked."""
    cdef Py_ssize_t i
    for i in range(upto):
        g.marked[g.dirty[i]] = 0
    for i in range(upto, g.n_dirty):
        g.dirty[i - upto] = g.dirty[i]
    g.n_dirty -= upto


# -- a volume's lock ----------------------------------------------------------

cdef inline int volume_acquire(VolumeBase v, double timeout=-1.0) except -1:
    """Take ``v``'s re-entrant lock (its gate first, if it has one); 0 if
    ``timeout`` (>= 0, seconds) passed first, else 1."""
    cdef unsigned long me = PyThread_get_thread_ident()
    cdef WriteGate g
    cdef long long us
    cdef bint ok
    cdef double t0
    if v._owner == me:
        v._depth += 1
        return 1
    g = v._gate
    if g is not None:
        t0 = monotonic() if timeout >= 0 else 0.0
        if not gate_pass(g, v._gate_slot, me, timeout):
            return 0
        if timeout >= 0:
            timeout -= monotonic() - t0
            if timeout < 0:
                timeout = 0.0
    if not PyThread_acquire_lock(v._lk, NOWAIT_LOCK):
        us = -1 if timeout < 0 else <long long>(timeout * 1e6)
        with nogil:
            ok = PyThread_acquire_lock_timed(v._lk, us, 0) == PY_LOCK_ACQUIRED
        if not ok:
            if g is not None:
                gate_leave(g)
            return 0
    v._owner = me
    v._depth = 1
    v._held_gate = g
    return 1


cdef inline void volume_release(VolumeBase v) noexcept:
    cdef WriteGate g
    v._depth -= 1
    if v._depth == 0:
        v._owner = 0
        g = v._held_gate
        PyThread_release_lock(v._lk)
        if g is not None:
            v._held_gate = None
            gate_leave(g)
