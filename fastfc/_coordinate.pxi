# Included by _core.pyx: coordinate_pairs, the start of a consistency group
# across primaries, and its helpers.

cdef inline double monotonic() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return ts.tv_sec + ts.tv_nsec * 1e-9


# Coordinations carried out (tests prove the production path runs).
cdef long long _coordinations = 0


# Primaries whose locks coordinations took (tests prove a gated one takes
# only those of the pairs that changed).
cdef long long _coordination_locks = 0


def coordinations():
    """How many consistency groups :func:`coordinate_pairs` has begun."""
    return _coordinations


def coordination_locks():
    """How many primaries' locks :func:`coordinate_pairs` has taken, or
    tried to: every primary's without a write gate, with one only those of
    the pairs marked on it."""
    return _coordination_locks


cdef inline void undo_begin(list hooks, Py_ssize_t nh, list begun) noexcept:
    cdef Py_ssize_t k, i
    cdef MirrorBase m
    for i in range(nh if begun is None else len(begun)):
        k = i if begun is None else <Py_ssize_t>begun[i]
        m = <MirrorBase>hooks[k]
        m.spare = m.oos
        m.oos = m.cg
        m.cg = None
    if begun is not None:
        del begun[:]


def coordinate_pairs(list primaries, list hooks, double timeout, before=None, after=None,
                     list begun=None, WriteGate gate=None):
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

    ``begun`` (a list, emptied first): begin a CG only on the hooks with a
    track out of sync (a hook with none has nothing for the CG: it keeps
    its ``oos``, ``cg`` stays None) and append their indices to it, in
    order; the caller's drain then visits only those. Without it every
    hook begins one.

    ``gate`` (a :class:`WriteGate` over ``primaries``, in that order, and
    ``hooks``; needs ``begun``): the writes are held by closing the gate,
    which every taking of a primary's lock passes, and waiting for those in
    flight to end, in place of taking every primary's lock; only the pairs
    marked on the gate since the last coordination are looked at, and
    their primaries' locks taken as above (a pair not marked has no track
    out of sync). The same instant, at O(pairs that changed). ``after()``
    may read any primary (the gate lets this thread pass). The hold counts
    from the moment nothing is in flight; waiting for that counts as
    waiting for a lock.

    Returns ``(status, seconds)``: status 0 done (seconds: the hold, from
    the first lock held to the end of the swap), 1 the locks could not all
    be taken in time, 2 they were, but the hold (``before()`` included)
    lasted longer than ``timeout``. Nothing changes unless 0. If ``before``
    or ``after`` raises, nothing changes and the exception propagates
    (after the locks are released).
    """
    global _coordination_locks
    cdef Py_ssize_t i, k, n = len(primaries), nh = len(hooks), nd
    cdef unsigned long me = PyThread_get_thread_ident()
    cdef double t0 = monotonic(), start
    cdef list slots, locked, ks
    if gate is None:
        ready(primaries, hooks, None, me)
        if begun is not None:
            del begun[:]
        _coordination_locks += n
        return hold_and_begin(primaries, hooks, None, timeout, before, after, begun, t0, me,
                              -1.0)
    if begun is None:
        raise ValueError("a gated coordination begins CGs only where tracks are out of "
                         "sync: pass begun")
    if gate.size != n or nh != n:
        raise ValueError(f"the write gate has {gate.size} primaries, not {n} (or "
                         f"{nh} hooks)")
    if gate.closed:
        raise StateError("the write gate is closed already: one coordination at a time")
    del begun[:]
    try:
        if not gate_close(gate, me, t0 + timeout):
            if gate_held_by(gate, me):
                raise RuntimeError("coordination must not run with a primary's lock held")
            return 1, monotonic() - t0
        start = monotonic()
        nd = gate.n_dirty
        slots = sorted([gate.dirty[i] for i in range(nd)])     # volume-id order
        locked = [gate.volumes[i] for i in slots]
        ks = sorted([gate.hook_of[i] for i in slots])
        ready(locked, hooks, ks, me)
        _coordination_locks += len(locked)
        result = hold_and_begin(locked, hooks, ks, timeout, before, after, begun, t0, me,
                                start)
        if result[0] == 0:
            gate_unmark(gate, nd)
        return result
    finally:
        if gate.closer == me:
            gate_open(gate)


cdef int ready(list primaries, list hooks, list ks, unsigned long me) except -1:
    """Refuse to coordinate hooks (``ks``: those indices; None: all) not
    ready to begin a CG, or primaries closed or locked by this thread."""
    cdef Py_ssize_t i, k
    cdef VolumeBase v
    cdef MirrorBase m
    for i in range(len(hooks) if ks is None else len(ks)):
        k = i if ks is None else <Py_ssize_t>ks[i]
        m = <MirrorBase>hooks[k]
        if m.oos is None or m.spare is None or m.cg is not None:
            raise StateError("a pair is not ready to begin a consistency group")
    for i in range(len(primaries)):
        v = <VolumeBase>primaries[i]
        if v._owner == me:
            raise RuntimeError("coordination must not run with a primary's lock held")
        if v.base == NULL:
            raise VolumeClosedError(f"{v!r} is closed")
    return 0


cdef hold_and_begin(list primaries, list hooks, list ks, double timeout, before, after,
                    list begun, double t0, unsigned long me, double held_since):
    """The hold of :func:`coordinate_pairs` over ``primaries`` (taking their
    locks) and the hooks ``ks`` (indices; None: every hook), the hold
    counting from ``held_since`` at the latest (if >= 0: a gate closed)."""
    global _coordinations
    cdef Py_ssize_t i, j, k, n = len(primaries), nh, busy, closed
    cdef VolumeBase v
    cdef MirrorBase m
    cdef double start, hold = 0.0, left
    cdef long long us
    cdef bint got, swapped
    cdef char* held           # per primary: 0 free, 1 taken by a try, 2 kept
    cdef double* since        # when a kept lock was taken
    cdef TrackBitmap oos
    nh = len(hooks) if ks is None else len(ks)
    held = <char*>calloc(n + 1, 1)
    since = <double*>calloc(n + 1, sizeof(double))
    if held == NULL or since == NULL:
        free(held)
        free(since)
        raise MemoryError("coordination: out of memory")
    try:
        while True:
            # one pass, GIL held throughout: the hold
            start = monotonic() if held_since < 0 else held_since
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
                # the locks count as this thread's (re-entrant for the hooks),
                # in one pass with the look for a volume closed while we
                # waited for a lock; the owners are cleared as the locks are
                # released (finally, below)
                closed = -1
                for i in range(n):
                    v = <VolumeBase>primaries[i]
                    v._owner = me
                    v._depth = 1
                    if v.base == NULL and closed < 0:
                        closed = i
                try:
                    if closed >= 0:
                        raise VolumeClosedError(f"{primaries[closed]!r} is closed")
                    if before is not None:
                        before()
                    for j in range(nh):
                        k = j if ks is None else <Py_ssize_t>ks[j]
                        m = <MirrorBase>hooks[k]
                        if begun is not None:
                            oos = m.oos
                            if bms_next_set(oos.w, oos.s, oos.n_bits, 0) < 0:
                                continue
                            begun.append(k)
                        m.cg = m.oos
                        m.oos = m.spare
                        m.spare = None
                    swapped = 1
                    hold = monotonic() - start
                    if hold > timeout:
                        undo_begin(hooks, nh, begun)
                        swapped = 0
                        return 2, hold
                    if after is not None:
                        after()
                    _coordinations += 1
                    return 0, hold
                except BaseException:
                    if swapped:          # no CG left begun: its tracks stay owed
                        undo_begin(hooks, nh, begun)
                    raise
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
                v = <VolumeBase>primaries[i]
                v._owner = 0         # (held by no Python-visible owner again)
                v._depth = 0
                PyThread_release_lock(v._lk)
        free(held)
        free(since)
