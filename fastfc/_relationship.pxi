# Included by _core.pyx: the bases of a FlashCopy relationship and of a PPRC
# pair's primary hook, and the batched steps of a consistency group.

# --------------------------------------------------------------------------
# Volumes, relationships and mirror hooks
# --------------------------------------------------------------------------

# Set by fastfc.faults (set_faults_armed): whether any fault is armed. A step
# calls its fault-point callback (faults.hit) only then: unarmed, the
# callback would return at once, so the test is its fast path moved into C,
# where a loop without the GIL can make it too. Which code runs never depends
# on it.
cdef bint _faults_armed = False


def set_faults_armed(bint on):
    """Tell the kernels whether a fault is armed (fastfc.faults keeps it)."""
    global _faults_armed
    _faults_armed = on


cdef class MirrorBase:
    """Primary-side hook of a PPRC pair, consulted by every host write.

    ``oos``: tracks owed to the secondary, set by every write before its data
    lands (a Metro Mirror pair clears them again once the secondary has it).
    ``cg``: tracks owed to the consistency group being drained, or None; a
    write touching one first calls ``_collide`` so the CG version is saved.
    ``sync``: Metro Mirror; each write calls ``_sync_write(offset, length,
    pending)`` before it completes, with the primary's lock held; ``pending``
    tells whether a track of the write was already out of sync before it.
    ``side``: the CG versions of tracks saved on collision (track -> bytes),
    ``cg_bytes``: bytes of the CG in flight that collisions sent early; both
    emptied when the CG ends (:meth:`_cg_end_step`).
    """

    cdef public TrackBitmap oos
    cdef public TrackBitmap cg
    cdef public TrackBitmap spare
    cdef public bint sync
    cdef public dict side
    cdef public long long cg_bytes

    @property
    def out_of_sync_tracks(self):
        """Tracks still owed to the secondary, in whole or in part: out of
        sync, and (a CG in flight) the CG's tracks not yet sent and those in
        the side file. (The bitmaps are in grains; a subclass names its
        ``primary`` volume, whose geometry converts them.)"""
        cdef Py_ssize_t per = 1
        primary = getattr(self, "primary", None)
        if primary is not None:
            per = primary.grains_per_track
        if self.cg is None:
            return self.oos.count_groups(per)
        owed = self.oos | self.cg
        for g in self.side:
            owed.set(g)
        return owed.count_groups(per)

    def _collide(self, Py_ssize_t t0, Py_ssize_t t1):
        pass

    def _sync_write(self, Py_ssize_t offset, Py_ssize_t length, bint pending):
        pass

    cdef int _cg_end_step(self, bint ok) except -1:
        """Close the CG in flight (if any): a failed drain (``ok`` false)
        gives its tracks, those in the side file too, back to ``oos``; the
        emptied CG bitmap becomes the spare. The primary's lock is held."""
        cdef TrackBitmap cg = self.cg
        if cg is None:
            return 0
        if not ok:
            self.oos.or_(cg)
            if self.side:
                for t in self.side:
                    self.oos.set(t)
            memset(cg.w, 0, cg.n_words * 8)
            if cg.s != NULL:
                memset(cg.s, 0, ((cg.n_words + 63) >> 6) * 8)
        if self.side:
            self.side = {}
        self.cg_bytes = 0
        self.spare = cg
        self.cg = None
        return 0


cdef class SequenceCell:
    """The CG sequence number that the B->C relationships of one secondary
    group carry together when a consistency group did not step them (their
    B did not change, so their C already holds that CG's image): a
    relationship whose ``seq_cell`` is this cell reports its ``value`` as
    its ``sequence``, and a CG committed on the group sets it once, whatever
    the number of relationships that follow it. Guarded by the session's
    attempt lock (:class:`~fastfc.copyservices.groups.FlashCopyGroup`)."""

    cdef public long long value
    # set while the group's FlashCopy phase is in flight: the B of every
    # relationship that follows the cell is write-inhibited, as the B of a
    # prepared relationship is (its own inhibit)
    cdef public bint inhibit
    # the relationships that left the cell (a step or a number of their
    # own) since the group last looked: it steps them at its next CG
    cdef public list left

    def __init__(self, long long value=0):
        self.value = value
        self.inhibit = False
        self.left = []

    def __repr__(self):
        return f"<SequenceCell {self.value}{' inhibit' if self.inhibit else ''}>"


cdef inline bint gated(list rels) noexcept:
    """Whether a relationship of ``rels`` (a volume's, as source) follows a
    :class:`SequenceCell` whose phase is in flight: the volume is
    write-inhibited then. Lock held."""
    cdef RelationshipBase r
    for o in rels:
        r = <RelationshipBase>o
        if r.seq_cell is not None and r.seq_cell.inhibit:
            return True
    return False


def follow_cell(list rels, SequenceCell cell):
    """Make each relationship of ``rels`` that is active, not revertible
    and on the cell's number follow ``cell`` (a group's step, after a
    commit); returns how many did not (a list of their indices)."""
    cdef RelationshipBase r
    cdef Py_ssize_t k
    cdef list left = []
    for k in range(len(rels)):
        r = <RelationshipBase?>rels[k]
        if r.active and not r.revertible and r._seq() == cell.value:
            r.seq_cell = cell
        else:
            left.append(k)
    return left


def source_gated(list rels):
    """:func:`gated` for Python (``Volume.write_inhibited``)."""
    return gated(rels)


cdef class RelationshipBase:
    """The bitmaps and flags of a FlashCopy relationship, read by the I/O path,
    and the steps that change them (resync, commit, revert), which a
    relationship's own methods run as a batch of one and a consistency group
    as one batch (:func:`prepare_revertible_many`, :func:`end_revertible_many`).

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
    cdef public bint record
    cdef public bint background_copy
    # the sequence number: its own, or (seq_cell not None) its group's
    cdef long long _sequence
    cdef public SequenceCell seq_cell
    # where background copy carries on
    cdef public Py_ssize_t _cursor
    # the revert image of a revertible resync (none while rv_to_copy is None)
    cdef TrackBitmap rv_to_copy
    cdef TrackBitmap rv_src_changed
    cdef TrackBitmap rv_tgt_changed
    cdef long long rv_sequence

    @property
    def sequence(self):
        """The sequence number (set at each establish or resync): the
        relationship's own, or while it follows a :class:`SequenceCell`
        (``seq_cell``), the cell's. Setting it gives the relationship its
        own number again."""
        return self._seq()

    @sequence.setter
    def sequence(self, long long value):
        self._sequence = value
        self._leave_cell()

    cdef inline void _leave_cell(self) noexcept:
        if self.seq_cell is not None:
            self.seq_cell.left.append(self)
            self.seq_cell = None

    cdef inline long long _seq(self) noexcept:
        return self.seq_cell.value if self.seq_cell is not None else self._sequence

    @property
    def _revert_image(self):
        """``(to_copy, src_changed, tgt_changed, sequence)`` as they were
        before a revertible resync, or None."""
        if self.rv_to_copy is None:
            return None
        return (self.rv_to_copy, self.rv_src_changed, self.rv_tgt_changed, self.rv_sequence)

    @_revert_image.setter
    def _revert_image(self, image):
        if image is None:
            self.rv_to_copy = self.rv_src_changed = self.rv_tgt_changed = None
            self.rv_sequence = 0
        else:
            self.rv_to_copy, self.rv_src_changed, self.rv_tgt_changed, self.rv_sequence = image

    cpdef tuple step_state(self):
        """What a step changes, as it is (for ``FlashCopy.undo_step``):
        ``(to_copy, src_changed, tgt_changed, sequence, revert image,
        revertible, cursor)``."""
        image = None if self.rv_to_copy is None else (
            self.rv_to_copy, self.rv_src_changed, self.rv_tgt_changed, self.rv_sequence)
        return (self.to_copy, self.src_changed, self.tgt_changed, self._seq(),
                image, self.revertible, self._cursor)

    def _copy_chunk(self, Py_ssize_t start, Py_ssize_t max_tracks):
        """Copy up to ``max_tracks`` set tracks from ``start`` on, under the
        locks; return ``(tracks copied, resume position)``."""
        cdef VolumeBase S = self.source, T = self.target
        cdef Py_ssize_t done = 0, resume = 0, n
        cdef uint64_t* w
        cdef int shift
        cdef bint chain = lock_rel(S, T)
        try:
            if not self.active or self.revertible:
                return 0, start
            if S.base == NULL or T.base == NULL:
                raise VolumeClosedError("background copy needs both volumes open")
            n = S.n_grains
            shift = S.grain_shift
            w = self.to_copy.w
            T._reserve_runs(w, start, n, max_tracks)
            if S._reads_allocate:
                S._reserve_runs(w, start, n, max_tracks)
            if chain:      # the source is a target too: its logical grains
                done = copy_logical(T.base, S, w, start, n, max_tracks, True, &resume)
            else:
                with nogil:
                    done = copy_set_runs(T.base, S.base, w, start, n, max_tracks, shift,
                                         &resume)
            T.copied_bytes += done << shift
        finally:
            unlock_rel(S, T, chain)
        return done, resume

    def _copy_tracks_where(self, TrackBitmap mask, bint to_source):
        """Copy every track set in ``mask`` between the volumes (target ->
        source when ``to_source``), clearing ``mask``. Caller holds the locks."""
        cdef VolumeBase S = self.source, T = self.target
        cdef Py_ssize_t resume, done
        cdef uint8_t* dst = S.base if to_source else T.base
        cdef const uint8_t* src = T.base if to_source else S.base
        cdef Py_ssize_t n = S.n_grains
        cdef int shift = S.grain_shift
        S._reserve_runs(mask.w, 0, n, n)   # no-op unless thin
        T._reserve_runs(mask.w, 0, n, n)
        if to_source and S._chain is not None:
            # the source's recovery points keep the grains it loses
            S._chain._save_mask(S.base, mask.w)
        if S._tgt_rel is not None:
            # a cascade (the chain's locks held): the source's logical grains
            # go to the target; grains written onto the source are its own now
            if not to_source:
                done = copy_logical(dst, S, mask.w, 0, n, n, True, &resume)
                T.copied_bytes += done << shift
                return done
            S._tgt_rel.to_copy.andnot(mask)
            if S._tgt_rel.tgt_changed is not None:
                S._tgt_rel.tgt_changed.or_(mask)
        with nogil:
            done = copy_set_runs(dst, src, mask.w, 0, n, n, shift, &resume)
        if to_source:
            S.copied_bytes += done << shift
        else:
            T.copied_bytes += done << shift
        return done

    # -- the steps (locks held; the checks first, in the order the methods
    # have always made them, then the change, which cannot fail) -----------
    cdef object _closed_volume(self):
        for v in (self.source, self.target):
            if (<VolumeBase>v).base == NULL:
                return VolumeClosedError(f"{v!r} is closed")
        return None

    cdef object _prepare_refusal(self, object before):
        """Why a resync cannot run now (the exception), or None. Calls
        ``before(self)`` (the store's check, a durable store's undo record)
        where the store is checked. Locks held."""
        if not self.record:
            return StateError(f"{self!r} was established without record=True; "
                              "incremental resync needs change recording")
        if not self.active:
            return StateError(f"{self!r} has been withdrawn")
        if self.revertible:
            return StateError(f"{self!r} is already revertible; commit or revert first")
        if self.source._invalid:     # (a cascade's middle volume)
            return StateError(f"{self.source!r} holds no valid image (a FlashCopy onto it "
                              "was withdrawn before completing)")
        if before is not None:
            before(self)
        err = self._closed_volume()
        if err is None and self.target._src_rels:
            err = cascade_refusal(self.target, self._resync_changes())
        return err

    cdef TrackBitmap _resync_changes(self):
        """The grains where a resync changes the target's logical image
        (changed since the last establish and on the target): its own
        targets take them first (a cascade)."""
        return (self.src_changed | self.tgt_changed).andnot(self.to_copy)

    cdef int _prepare_step(self, TrackBitmap out, TrackBitmap sc, TrackBitmap tc,
                           long long sequence, bint revertible) except -1:
        """Resync: ``to_copy | src_changed | tgt_changed`` into ``out``, the
        empty ``sc`` and ``tc`` the change bitmaps, ``sequence`` the number;
        with ``revertible`` the bitmaps and number as they were are kept as
        the revert image and the source is write-inhibited. Locks held."""
        if self.target._src_rels:
            cascade_save(self.target, self._resync_changes())
        bm_or3_words(out.w, self.to_copy.w, self.src_changed.w, self.tgt_changed.w,
                     out.n_words)
        if out.s != NULL:
            bm_or3_words(out.s, self.to_copy.s, self.src_changed.s, self.tgt_changed.s,
                         (out.n_words + 63) >> 6)
        if revertible:
            self.rv_to_copy = self.to_copy
            self.rv_src_changed = self.src_changed
            self.rv_tgt_changed = self.tgt_changed
            self.rv_sequence = self._seq()
            self.revertible = True
            self.source._inhibits += 1
        self.to_copy = out
        self.src_changed = sc
        self.tgt_changed = tc
        # new bitmaps: a drain kernel that took the old ones by address
        # (between its chunks, without the source's lock) must stop
        self.source._rels_version += 1
        self._sequence = sequence
        self._leave_cell()
        self._cursor = 0
        return 0

    cdef object _end_refusal(self, bint commit, object before):
        """Why a commit (``commit``) or revert cannot run now, or None;
        ``before(self)`` where the store is checked. Locks held."""
        if not self.active:
            return StateError(f"{self!r} has been withdrawn")
        if not self.revertible or self.rv_to_copy is None:
            return StateError(f"cannot {'commit' if commit else 'revert'} {self!r}: it is "
                              "not revertible (resync(revertible=True) first)")
        if before is not None:
            before(self)
        err = self._closed_volume()
        if err is None and not commit and self.target._src_rels:
            err = cascade_refusal(self.target, self.to_copy.copy().andnot(self.rv_to_copy))
        return err

    cdef int _end_step(self, bint commit, list dropped) except -1:
        """Commit (keep the new image) or revert (restore the revert image),
        by reference; the bitmaps that drop out go to ``dropped`` (if not
        None); the source's write-inhibit is released. Locks held."""
        if commit:
            if dropped is not None:
                dropped.append(self.rv_to_copy)
                dropped.append(self.rv_src_changed)
                dropped.append(self.rv_tgt_changed)
        else:
            if self.target._src_rels:     # its targets keep the image it leaves
                cascade_save(self.target, self.to_copy.copy().andnot(self.rv_to_copy))
            if dropped is not None:
                dropped.append(self.to_copy)
                dropped.append(self.src_changed)
                dropped.append(self.tgt_changed)
            self.to_copy = self.rv_to_copy
            self.src_changed = self.rv_src_changed
            self.tgt_changed = self.rv_tgt_changed
            self._sequence = self.rv_sequence
            self.seq_cell = None
            self.source._rels_version += 1     # (as in resync: other bitmaps)
        self.rv_to_copy = self.rv_src_changed = self.rv_tgt_changed = None
        self.rv_sequence = 0
        self.revertible = False
        self.source._inhibits -= 1
        return 0


# ---------------------------------------------------------------------------
# The steps of a consistency group, batched: a relationship's or a pair's
# own method is a batch of one of the same loop
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
        if bm.s != NULL:
            memset(bm.s, 0, ((bm.n_words + 63) >> 6) * 8)


def prepare_revertible_many(list rels, Py_ssize_t start, long long sequence, list fresh,
                            bint revertible=True, fault=None, before=None, after=None,
                            list snapshots=None):
    """Resync ``rels[start:]`` (revertibly unless ``revertible`` is false)
    with ``sequence``, in order, each under its source's and target's locks:
    ``FlashCopy.resync`` for a batch (a relationship's own resync is a batch
    of one). With ``revertible`` the revert image keeps the current bitmaps
    and sequence and the source is write-inhibited. The new ``to_copy`` is
    ``to_copy | src_changed | tgt_changed``, written into ``fresh[3k]``; the
    change bitmaps become the empty ``fresh[3k+1]`` and ``fresh[3k+2]``. The
    slots a relationship took are set to None.

    For each relationship, under its locks and before anything of it
    changes: its state is checked (change recording, withdrawn, already
    revertible), ``before(rel)`` is called if given (it may raise: the
    store's check, a durable store's record for an undo), the volumes must
    be open, and (revertible) ``fault("prepare", source)`` is called while
    any fault is armed (fastfc.faults' ``hit``). After its change, with the
    locks still held, ``after(rel)`` is called if given (a relationship's
    own step records itself there, undoing the change if the store refuses).
    With ``snapshots`` (a list), each relationship's :meth:`step_state` is
    appended to it just before its change (a durable store's undo record).

    Returns ``(k, error)``: ``(len(rels), None)`` when every relationship
    is done, else the index of the first that was not, with the exception
    that says why (refused by its state, or raised by a callback), or None
    when its fresh slots were None (a caller that gives bitmaps only to a
    step that looks able to run, so that a refused one creates none); the
    relationships before it are done. The caller checks the sequence number.
    """
    cdef Py_ssize_t k, n = len(rels)
    cdef RelationshipBase r
    cdef VolumeBase S, T
    cdef TrackBitmap out, sc, tc
    cdef bint chain
    if len(fresh) < 3 * n:
        raise ValueError("prepare_revertible_many needs three fresh bitmaps per relationship")
    for k in range(start, n):
        r = <RelationshipBase?>rels[k]
        S, T = r.source, r.target
        if r.record and r.active:
            x = fresh[3 * k]
            out = None if x is None else <TrackBitmap?>x
            x = fresh[3 * k + 1]
            sc = None if x is None else <TrackBitmap?>x
            x = fresh[3 * k + 2]
            tc = None if x is None else <TrackBitmap?>x
            if (out is not None and sc is not None and tc is not None and (
                    out.n_bits != r.to_copy.n_bits or sc.n_bits != out.n_bits
                    or tc.n_bits != out.n_bits or r.src_changed.n_bits != out.n_bits
                    or r.tgt_changed.n_bits != out.n_bits)):
                raise ValueError("prepare_revertible_many: bitmaps of different sizes")
        chain = lock_rel(S, T)
        try:
            try:
                err = r._prepare_refusal(before)
                if err is None and revertible and fault is not None and _faults_armed:
                    fault("prepare", S)
            except BaseException as e:
                err = e
            if err is not None:
                return k, err
            if out is None or sc is None or tc is None or not r.record or not r.active:
                return k, None       # no fresh bitmaps given: the caller's to give
            if T._chain is not None:
                # the target's recovery points keep the grains it will read
                # from the source (_points_target.pxi)
                try:
                    save_flips(T._chain, r.to_copy, r.to_copy, r.src_changed, r.tgt_changed)
                except BaseException as e:
                    return k, e
            if snapshots is not None:
                snapshots.append(r.step_state())
            r._prepare_step(out, sc, tc, sequence, revertible)
            if after is not None:
                try:
                    after(r)
                except BaseException as e:
                    return k, e
            fresh[3 * k] = fresh[3 * k + 1] = fresh[3 * k + 2] = None
        finally:
            unlock_rel(S, T, chain)
    return n, None


def end_revertible_many(list rels, Py_ssize_t start, bint commit, list dropped,
                        fault=None, before=None, after=None, list snapshots=None):
    """Commit (``commit``) or revert ``rels[start:]``, in order, each under
    its source's and target's locks: ``FlashCopy.commit`` / ``revert`` for a
    batch (a relationship's own commit or revert is a batch of one). The
    bitmaps that drop out (the revert image's on commit, the current ones on
    revert) are appended to ``dropped`` (if not None), for the store's pool;
    the source's write-inhibit is released.

    For each relationship, under its locks and before anything of it
    changes: its state is checked (withdrawn, not revertible), ``before(rel)``
    is called if given, the volumes must be open, and ``fault("commit" or
    "revert", source)`` is called while any fault is armed; ``after(rel)``
    after its change, locks held; ``snapshots`` as for
    :func:`prepare_revertible_many`. Returns ``(k, error)`` as it does. Starting a background
    copy is the caller's (after the locks are let go).
    """
    cdef Py_ssize_t k, n = len(rels)
    cdef RelationshipBase r
    cdef VolumeBase S, T
    cdef bint chain
    point = "commit" if commit else "revert"
    for k in range(start, n):
        r = <RelationshipBase?>rels[k]
        S, T = r.source, r.target
        chain = lock_rel(S, T)
        try:
            try:
                err = r._end_refusal(commit, before)
                if err is None and fault is not None and _faults_armed:
                    fault(point, S)
            except BaseException as e:
                err = e
            if err is None and not commit and T._chain is not None:
                try:    # the target's recovery points keep the grains it gives back
                    save_flips(T._chain, r.to_copy, r.rv_to_copy, None, None)
                except BaseException as e:
                    err = e
            if err is not None:
                return k, err
            if snapshots is not None:
                snapshots.append(r.step_state())
            r._end_step(commit, dropped)
            if after is not None:
                try:
                    after(r)
                except BaseException as e:
                    if dropped is not None:
                        del dropped[len(dropped) - 3:]    # back in the relationship
                    return k, e
        finally:
            unlock_rel(S, T, chain)
    return n, None


def cg_end_many(list primaries, list hooks, bint ok=True):
    """Close the consistency group of every mirror hook, each under its
    primary's lock (``PPRCPair.cg_end`` is a batch of one): a failed drain
    (``ok`` false) gives the CG's tracks back to the out-of-sync bitmap; the
    emptied CG bitmap becomes the spare, no CG is in flight."""
    cdef Py_ssize_t k, n = len(hooks)
    cdef VolumeBase A
    cdef MirrorBase m
    if len(primaries) != n:
        raise ValueError("cg_end_many needs one primary per hook")
    for k in range(n):
        A = <VolumeBase?>primaries[k]
        m = <MirrorBase?>hooks[k]
        A._acquire()
        try:
            m._cg_end_step(ok)
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


# ---------------------------------------------------------------------------
# A durable store's record of a batched step (the FlashCopy log's row body
# and the bookkeeping of which bitmap files each row names), built in one
# call: per relationship in Python it was most of a unit's CG cost
# ---------------------------------------------------------------------------

cdef inline void _put_le64(unsigned char* p, int64_t v) noexcept:
    cdef uint64_t u = <uint64_t>v
    cdef int i
    for i in range(8):
        p[i] = <unsigned char>(u & 0xff)
        u >>= 8


def log_rows(list rels, list ids, dict rows, dict refs, undo, missing, int64_t null):
    """A durable store's record of one batched step of the relationships
    ``rels`` (whose rows have the ids ``ids``): the FlashCopy log row's body
    and the bookkeeping of which bitmap files each row names. Each of
    ``rels`` is a relationship, or its record (``FlashCopy.to_record()``:
    what a store is handed by callers that build records).

    Returns ``(body, gone)``. ``body`` packs, per relationship, ten
    little-endian int64: its id, ``sequence``, ``revertible`` (0 or 1), the
    ``file_id`` of ``to_copy``, ``src_changed``, ``tgt_changed`` and of the
    revert image's three (``null`` for none, or a bitmap without one), and
    the revert image's sequence (``null`` when not revertible).

    The bookkeeping is the store's (``SQLiteStore._set_rows``, done here for
    the key ``("fc", id)`` of each relationship): ``rows`` maps a row's key
    to the set of file ids it names, ``refs`` a file id to how many rows
    name it; ``undo`` (a dict, or None outside a transaction) gets a key's
    old set (``missing`` when it had none) the first time the key changes.
    ``gone`` is the set of file ids some row stopped naming.
    """
    cdef Py_ssize_t n = len(rels), k, j
    cdef bytearray out
    cdef unsigned char* p
    cdef RelationshipBase r
    cdef dict rec
    cdef set now, before, gone = set()
    cdef int64_t fid
    cdef tuple bms
    if len(ids) != n:
        raise ValueError("log_rows needs one row id per relationship")
    out = bytearray(n * 80)
    p = out
    for k in range(n):
        rid = ids[k]
        o = rels[k]
        _put_le64(p, rid)
        if isinstance(o, RelationshipBase):
            r = <RelationshipBase>o
            _put_le64(p + 8, r._seq())
            _put_le64(p + 16, 1 if r.revertible else 0)
            bms = (r.to_copy, r.src_changed, r.tgt_changed,
                   r.rv_to_copy, r.rv_src_changed, r.rv_tgt_changed)
            rvs = None if r.rv_to_copy is None else r.rv_sequence
        else:
            rec = <dict?>o
            _put_le64(p + 8, rec["sequence"])
            _put_le64(p + 16, 1 if rec["revertible"] else 0)
            bms = (rec["to_copy"], rec["src_changed"], rec["tgt_changed"],
                   rec["rv_to_copy"], rec["rv_src_changed"], rec["rv_tgt_changed"])
            rvs = rec["rv_sequence"]
        now = set()
        for j in range(6):
            f = None if bms[j] is None else getattr(bms[j], "file_id", None)
            if f is None:
                fid = null
            else:
                fid = f
                now.add(f)
            _put_le64(p + 24 + 8 * j, fid)
        _put_le64(p + 72, null if rvs is None else rvs)
        p += 80
        key = ("fc", rid)
        old = rows.get(key)
        if undo is not None and key not in undo:
            undo[key] = missing if old is None else old
        rows[key] = now
        if old is not None and old == now:
            continue
        before = set() if old is None else old
        for f in now:
            if f not in before:
                refs[f] = refs.get(f, 0) + 1
        for f in before:
            if f not in now:
                gone.add(f)
                c = refs.get(f, 0) - 1
                if c > 0:
                    refs[f] = c
                else:
                    refs.pop(f, None)
    return bytes(out), gone
