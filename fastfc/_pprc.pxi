# Included by _core.pyx: PPRC updates (apply, pprc_copy_tracks) and the drain
# of a consistency group (pprc_drain, pprc_drain_many).

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


cdef int call_run_hook(void* hook, void* key) noexcept with gil:
    """Call a link's fault point (``Link.fault_point(key)``, fastfc.faults
    point "link") before a run of tracks moves, as a send would; an
    exception it raises is kept for :func:`raise_hook_error` and -1
    returned."""
    global _hook_error
    try:
        (<object>hook)(<object>key)
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
                           uint64_t** tgt_changed, uint64_t** tgt_changed_s,
                           Py_ssize_t* resume,
                           bint pages, void* hooked, int dst_fd, int* tgt_fd,
                           int* err, void* run_hook=NULL, void* key=NULL,
                           Py_ssize_t* runs=NULL, long long* dst_bytes=NULL,
                           long long** tgt_bytes=NULL) noexcept nogil:
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
    to carry on. ``run_hook(key)`` (a link's fault point), while a fault is
    armed, is called before each run as before a send (-1 if it raised, the
    run not applied); ``runs[0]`` counts the runs applied (the sends).
    ``dst_bytes[0]`` and ``tgt_bytes[k][0]`` (if not NULL) count the bytes
    copied into dst and into each target (the volumes' ``copied_bytes``)."""
    cdef Py_ssize_t b, t, done = 0, res2
    cdef int k, e
    while 0 <= a < n and done < max_tracks:
        b = bm_next_clear(owed, n, a)
        if b < 0:
            b = n
        if b - a > max_tracks - done:
            b = a + (max_tracks - done)
        if run_hook != NULL and _faults_armed and call_run_hook(run_hook, key) < 0:
            resume[0] = a
            return -1
        for k in range(nrel):
            if tgt_changed[k] != NULL:
                bms_set_range(tgt_changed[k], tgt_changed_s[k], a, b)
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
                            if tgt_bytes != NULL:
                                tgt_bytes[k][0] += (<long long>1) << shift
                else:
                    res2 = copy_set_runs(tgt_base[k], dst, tgt_to_copy[k], a, b, b - a, shift,
                                         &res2)
                    if tgt_bytes != NULL:
                        tgt_bytes[k][0] += (<long long>res2) << shift
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
        if dst_bytes != NULL:
            dst_bytes[0] += (<long long>(b - a)) << shift
        done += b - a
        if runs != NULL:
            runs[0] += 1
        a = bm_next_set(owed, n, b)
    resume[0] = a if 0 <= a < n else -1
    return done


def pprc_copy_tracks(VolumeBase A, VolumeBase B, TrackBitmap owed, Py_ssize_t start,
                     Py_ssize_t max_tracks, Py_ssize_t stop=-1, run_hook=None):
    """Apply A's tracks set in ``owed`` (from ``start`` on, at most
    ``max_tracks``) to B as PPRC updates, clearing their bits: the in-process
    fast path of a Global Copy drain.

    The caller holds A's lock. Each update follows B's I/O path rules for a
    PPRC update: refused whole if B is closed or write-inhibited (a revertible
    FlashCopy source); copy-on-write to B's FlashCopy targets and change
    recording before the data lands. The whole batch runs in one ``nogil``
    block: re-taking the GIL after every track would queue behind busy
    Python threads (a convoy). Returns ``(tracks sent, resume)``, resume being
    ``A.n_grains`` when no set bit is left after ``start``. ``stop``
    (default: the end) bounds the tracks considered. ``run_hook(A)`` (the
    link's fault point) is called before each run while a fault is armed;
    what it raises propagates, the runs before it applied.
    """
    cdef Py_ssize_t n = A.n_grains, a, done = 0, resume = -1
    cdef int shift = A.grain_shift, nrel, k
    cdef void* hooked
    cdef RelationshipBase r
    cdef list rels
    cdef uint64_t* w = owed.w
    cdef uint8_t* tgt_base[MAX_RELS]
    cdef uint64_t* tgt_to_copy[MAX_RELS]
    cdef uint64_t* tgt_changed[MAX_RELS]
    cdef uint64_t* tgt_changed_s[MAX_RELS]
    cdef int tgt_fd[MAX_RELS]
    cdef long long* tgt_bytes[MAX_RELS]
    cdef int dst_fd, err = 0
    if owed.n_bits != n or B.n_grains != n or B.grain_shift != shift:
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
            return 0, A.n_grains
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
            tgt_changed_s[k] = r.src_changed.s if r.src_changed is not None else NULL
            tgt_fd[k] = r.target._fd if r.target._file_backed else -1
            tgt_bytes[k] = &r.target.copied_bytes
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
                              tgt_base, tgt_to_copy, tgt_changed, tgt_changed_s, &resume,
                              B._file_backed, hooked, dst_fd, tgt_fd, &err,
                              <void*>run_hook if run_hook is not None else NULL, <void*>A,
                              NULL, &B.copied_bytes, tgt_bytes)
        if done == -2:
            raise_write_error(B, err, "a PPRC update (the tracks not applied stay owed)")
        if done < 0:
            raise_hook_error()
    finally:
        B._release()
    return done, (resume if resume >= 0 else A.n_grains)


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
    void* run_hook
    void* akey
    Py_ssize_t runs
    uint8_t* tgt_base[MAX_RELS]
    uint64_t* tgt_to_copy[MAX_RELS]
    uint64_t* tgt_changed[MAX_RELS]
    uint64_t* tgt_changed_s[MAX_RELS]
    int tgt_fd[MAX_RELS]
    long long* tgt_bytes[MAX_RELS]
    long long* dst_bytes
    Py_ssize_t done
    int err


cdef int _drain_setup(VolumeBase A, VolumeBase B, TrackBitmap owed, Py_ssize_t chunk,
                      DrainJob* j, object run_hook=None) except -1:
    """Fill ``j`` for the pair A -> B (GIL held; takes B's lock briefly).
    Returns 0, or 2 when B's state asks for the per-update path."""
    cdef Py_ssize_t n = A.n_grains
    cdef int k, nrel
    cdef RelationshipBase r
    cdef list rels
    cdef unsigned long me = PyThread_get_thread_ident()
    if owed.n_bits != n or B.n_grains != n or B.grain_shift != A.grain_shift:
        raise ValueError("pprc_drain needs volumes and bitmap of one geometry")
    if A._owner == me or B._owner == me:
        raise RuntimeError("pprc_drain must run without the volumes' locks held")
    j.done = 0
    j.err = 0
    j.runs = 0
    j.run_hook = <void*>run_hook if run_hook is not None else NULL
    j.akey = <void*>A
    B._acquire()
    try:
        if B._tgt_rel is not None or B.base == NULL or B._inhibits or A.base == NULL \
                or B.thin or A._reads_allocate or gated(B._src_rels):
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
            j.tgt_changed_s[k] = r.src_changed.s if r.src_changed is not None else NULL
            # (a target closed later bumps the version: its fd is not used then)
            j.tgt_fd[k] = r.target._fd if r.target._file_backed else -1
            j.tgt_bytes[k] = &r.target.copied_bytes
        j.nrel = nrel
        j.dst_fd = B._fd if B._file_backed else -1
        j.dst_bytes = &B.copied_bytes
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
    j.shift = A.grain_shift
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
                             j.tgt_base, j.tgt_to_copy, j.tgt_changed, j.tgt_changed_s, &resume,
                             j.bfile, j.hooked, j.dst_fd, j.tgt_fd, &j.err,
                             j.run_hook, j.akey, &j.runs, j.dst_bytes, j.tgt_bytes)
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
    if status == 3:         # a hook raised: what was sent stays sent
        raise_hook_error()
    if status == 4:         # a pwrite failed: what was sent stays sent, the rest owed
        raise_write_error(B, j.err, "a PPRC update (the tracks not applied stay owed)")
    return 0


def pprc_drain(VolumeBase A, VolumeBase B, TrackBitmap owed, Py_ssize_t chunk,
               double seconds=-1.0, run_hook=None):
    """Send every track set in ``owed`` from A to B as PPRC updates (the
    in-process fast path of a consistency-group drain), without the GIL.

    Works a chunk of at most ``chunk`` tracks at a time under A's and then
    B's lock (the order every PPRC update uses), releasing both between
    chunks so host writes to A wait at most one chunk. The caller must hold
    neither lock. Stops early, with everything sent so far applied whole,
    when ``seconds`` (if >= 0) have passed, or when B turns write-inhibited,
    is closed, or its FlashCopy relationships change. Returns ``(tracks sent,
    status)``: 0 done, 1 time limit, 2 stopped for B's state (the caller
    falls back to the per-update path, which reports why). ``run_hook`` as
    for :func:`pprc_drain_many`.
    """
    cdef DrainJob j
    cdef double deadline = monotonic() + seconds if seconds >= 0 else -1.0
    cdef unsigned long me = PyThread_get_thread_ident()
    cdef int status = _drain_setup(A, B, owed, chunk, &j, run_hook)
    if status:
        return 0, status
    with nogil:
        status = _drain_run(&j, deadline, me)
    _drain_raise(B, status, &j)
    return j.done, status


def pprc_drain_many(list primaries, list secondaries, list owed, Py_ssize_t chunk_bytes,
                    double seconds=-1.0, Py_ssize_t start=0, list sent=None,
                    TrackBitmap link_down=None, fault=None, before=None, run_hook=None,
                    list runs=None, list hooks=None, bint direct=True):
    """:func:`pprc_drain` over many pairs in one call (a consistency
    group's drain of a secondary group; a pair's own CG drain is a batch of
    one): pair ``k`` sends the tracks set in ``owed[k]`` from
    ``primaries[k]`` to ``secondaries[k]``, for ``k`` from ``start`` on, in
    order, each under its own locks as :func:`pprc_drain` takes them,
    holding them for at most ``chunk_bytes`` of its tracks at a time, with
    one time limit of ``seconds`` (if >= 0) for them all.

    Before pair ``k`` begins: ``fault("drain", primaries[k])`` while a fault
    is armed (fastfc.faults' ``hit``), then ``before(k)`` if given (a
    durability "power" drain's barriers), each with the GIL; then the time
    limit and ``link_down`` (the link's ``down_flag()``) are looked at.
    ``run_hook(primary)`` (the link's fault point) is called before each run
    of tracks while a fault is armed, as before a send.

    Appends to ``sent`` (if given) the tracks sent by each pair it tried,
    and to ``runs`` (if given) the runs (sends) each applied. Stops at the
    first pair whose status is not 0 (1: the time limit passed; 2: the pair
    is the caller's to drain by its own method, which says why if it cannot:
    B's state stopped it, the link was down, ``hooks[k]`` (the pairs, if
    given) had CG versions in its side file at the start, or ``direct`` is
    false (the link moves no tracks itself)). Returns ``(k, status)``: that
    pair's index and status, or ``(len(primaries), 0)`` when every pair is
    done. An exception (a callback, a failed pwrite) propagates from the
    pair where it happened; the tracks sent stay sent.
    """
    global _hook_error
    cdef Py_ssize_t k, m, n = len(primaries), stop
    cdef double deadline = monotonic() + seconds if seconds >= 0 else -1.0
    cdef unsigned long me = PyThread_get_thread_ident()
    cdef int status = 0
    cdef VolumeBase A
    cdef DrainJob* jobs
    cdef bint gil_hooks = before is not None or fault is not None
    # a link that goes down stops the drain before the next pair, as the
    # per-pair path (which asks link.direct() for each pair) would
    cdef volatile uint64_t* down = NULL if link_down is None else link_down.w
    if len(secondaries) != n or len(owed) != n or (hooks is not None and len(hooks) != n):
        raise ValueError("pprc_drain_many needs as many secondaries and bitmaps as primaries")
    if start >= n:
        return n, 0
    jobs = <DrainJob*>calloc(n - start, sizeof(DrainJob))
    if jobs == NULL:
        raise MemoryError("pprc_drain_many: out of memory")
    try:
        # every pair's setup with the GIL, up to the first that B's state stops
        stop = n if direct else start
        for k in range(start, stop):
            A = <VolumeBase?>primaries[k]
            if (hooks is not None and (<MirrorBase?>hooks[k]).side) or _drain_setup(
                    A, <VolumeBase?>secondaries[k], <TrackBitmap?>owed[k],
                    max(1, chunk_bytes >> A.grain_shift), &jobs[k - start], run_hook):
                stop = k
                break
        # then the tracks of them all in one pass without the GIL
        m = n
        with nogil:
            for k in range(start, n):
                if gil_hooks and (before is not None or _faults_armed):
                    with gil:
                        try:
                            if fault is not None and _faults_armed:
                                fault("drain", primaries[k])
                            if before is not None:
                                before(k)
                        except BaseException as e:
                            _hook_error = e
                            status = 3
                    if status:
                        m = k
                        break
                if deadline >= 0 and monotonic() > deadline:
                    status = 1
                    m = k
                    break
                if k >= stop or (down != NULL and down[0] & 1):
                    status = 2
                    m = k
                    break
                status = _drain_run(&jobs[k - start], deadline, me)
                if status:
                    m = k
                    break
        if sent is not None:
            for k in range(start, min(m + 1, n)):
                sent.append(jobs[k - start].done)
        if runs is not None:
            for k in range(start, min(m + 1, n)):
                runs.append(jobs[k - start].runs)
        if m < n:
            _drain_raise(<VolumeBase>secondaries[m], status, &jobs[m - start])
        return m, status
    finally:
        free(jobs)
