"""A pure-Python reference model of FlashCopy, for differential tests.

It stores whole logical images and nothing else: a target's image is a copy
of its source's image taken at establish; a host write changes the image of
the volume written and no other; a revertible resync saves the previous
target image and revert puts it back; reverse restore copies the target's
image onto the source; a withdraw that leaves tracks behind makes the target
invalid. A target may be the source of another (a cascade): every image
is its own bytes, so a change of a middle volume's image (its resync,
revert, a new FlashCopy onto it, or a forced withdraw that leaves it
invalid) leaves its targets' images as they were. There are no bitmaps, no copy-on-write, no redirected reads: the
model cannot share a bug with the engine's track bookkeeping.

What the model cannot know without tracking tracks is how far a physical
copy has got (it matters only for ``withdraw`` without ``force`` and for a
non-persistent relationship ending by itself). It keeps a three-valued
``remaining``: ``NONE`` (every track is known to be on the target), ``SOME``
(tracks are known to be left) or ``UNKNOWN`` (a partial copy or a
copy-on-write may have finished the job); callers settle ``UNKNOWN`` from
the engine and verify the consequence through the images.

Only the exception classes come from ``fastfc``.
"""

from __future__ import annotations

from fastfc.errors import (IncompleteCopyError, InjectedFault, InvalidImageError,
                           LimitError, StateError, WriteInhibitedError)

MAX_TARGETS = 12

NONE, SOME, UNKNOWN = "none", "some", "unknown"


class RefVolume:
    """A logical image (``bytearray``), or ``None`` when the image is invalid."""

    def __init__(self, n_tracks: int, track_size: int, name: str = "") -> None:
        self.n_tracks = n_tracks
        self.track_size = track_size
        self.capacity = n_tracks * track_size
        self.name = name
        self.image: bytearray | None = bytearray(self.capacity)
        self.targets: list[RefFlashCopy] = []      # active, this volume the source
        self.source_rel: RefFlashCopy | None = None  # active, this volume the target

    # -- queries ---------------------------------------------------------------
    @property
    def valid(self) -> bool:
        return self.image is not None

    @property
    def write_inhibited(self) -> bool:
        return any(r.revertible for r in self.targets)

    def relationships(self) -> list[RefFlashCopy]:
        return self.targets + ([self.source_rel] if self.source_rel else [])

    def _check_span(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.capacity:
            raise IndexError(f"{length} bytes at {offset} is outside {self.capacity}")

    # -- host I/O --------------------------------------------------------------
    def read(self, offset: int, length: int) -> bytes:
        self._check_span(offset, length)
        if self.image is None:
            raise InvalidImageError(self.name)
        return bytes(self.image[offset:offset + length])

    def write(self, offset: int, data: bytes) -> None:
        self._check_span(offset, len(data))
        if self.write_inhibited:
            raise WriteInhibitedError("source of a revertible FlashCopy")
        rel = self.source_rel
        if rel is not None and (rel.revertible or rel.inhibit_target_write):
            raise WriteInhibitedError("target write refused")
        if self.image is None:
            # an invalid image takes only a rewrite of the whole volume
            if not (offset == 0 and len(data) == self.capacity):
                raise InvalidImageError(self.name)
            self.image = bytearray(self.capacity)
        if not data:
            return
        self.image[offset:offset + len(data)] = data
        for r in self.relationships():
            r.touched()


class RefFlashCopy:
    """One relationship: options, sequence number, and what revert needs."""

    def __init__(self, source: RefVolume, target: RefVolume, *, background_copy=True,
                 record=False, persistent=False, inhibit_target_write=False,
                 sequence=0) -> None:
        self.source = source
        self.target = target
        self.background_copy = background_copy
        self.record = record
        self.persistent = persistent or record
        self.inhibit_target_write = inhibit_target_write
        self.sequence = sequence
        self.revertible = False
        self.active = False
        self.remaining = SOME        # tracks left to copy: NONE / SOME / UNKNOWN
        self.changed = False         # a write reached S or T since the last establish
        self._saved: tuple | None = None   # revert image

    # -- establish -------------------------------------------------------------
    def _install(self) -> None:
        self.active = True
        self.remaining = SOME
        self.changed = False
        self.source.targets.append(self)
        self.target.source_rel = self
        self.target.image = bytearray(self.source.image)

    def touched(self) -> None:
        """A host write (of at least one byte) reached the source or target."""
        self.changed = True
        if self.remaining == SOME:
            self.remaining = UNKNOWN     # the write may have moved the last track

    # -- queries ---------------------------------------------------------------
    @property
    def state(self) -> str:
        if not self.active:
            return "withdrawn"
        if self.revertible:
            return "revertible"
        if self.remaining == NONE:
            return "copied"
        if self.remaining == SOME:
            return "copying" if self.background_copy else "nocopy"
        return "unknown"

    def _require_active(self) -> None:
        if not self.active:
            raise StateError("withdrawn")

    # -- operations ------------------------------------------------------------
    def copy(self, max_tracks: int | None = None) -> None:
        """Physical copying changes no image; only what is known of progress.
        Whether a non-persistent relationship then ends is for the caller
        (``end_if_copied``): it ends exactly when nothing is left."""
        if max_tracks is not None and max_tracks < 0:
            raise ValueError(max_tracks)
        self._require_active()
        if self.revertible:
            raise StateError("revertible")
        if max_tracks is None:
            self.remaining = NONE
        elif max_tracks > 0 and self.remaining != NONE:
            self.remaining = UNKNOWN

    def end_if_copied(self) -> None:
        if self.active and not self.persistent and self.remaining == NONE:
            self._unlink()

    def check_resync(self) -> None:
        if not self.record:
            raise StateError("needs record")
        self._require_active()
        if self.revertible:
            raise StateError("already revertible")
        if self.source.image is None:
            raise StateError("the source holds no valid image")

    def image_changes(self, changes: bool) -> None:
        """The target's image is about to change (``changes``: at some
        track): refused while it is the source of a revertible FlashCopy;
        its own targets count it as a change of their source."""
        if not changes:
            return
        if self.target.write_inhibited:
            raise WriteInhibitedError("the target is the source of a revertible FlashCopy")
        for r in self.target.targets:
            r.touched()

    def resync(self, *, revertible: bool = False, sequence: int | None = None,
               fault: bool = False) -> None:
        new_sequence = self.sequence + 1 if sequence is None else int(sequence)
        self.check_resync()
        self.image_changes(self.changed)
        if revertible and fault:
            raise InjectedFault("prepare")
        if revertible:
            self._saved = (self.target.image, self.sequence, self.remaining, self.changed)
            self.revertible = True
        if self.changed:
            self.remaining = SOME
        self.changed = False
        self.target.image = bytearray(self.source.image)
        self.sequence = new_sequence

    def check_revertible(self) -> None:
        self._require_active()
        if not self.revertible:
            raise StateError("not revertible")

    def commit(self, *, fault: bool = False) -> None:
        self.check_revertible()
        if fault:
            raise InjectedFault("commit")
        self._saved = None
        self.revertible = False

    def revert(self, *, fault: bool = False) -> None:
        self.check_revertible()
        assert self._saved is not None
        self.image_changes(self._saved[3])
        if fault:
            raise InjectedFault("revert")
        self.target.image, self.sequence, self.remaining, self.changed = self._saved
        self._saved = None
        self.revertible = False

    def reverse_restore(self) -> None:
        if not self.record:
            raise StateError("needs record")
        self._require_active()
        if self.revertible:
            raise StateError("revertible")
        if self.source.write_inhibited:
            raise WriteInhibitedError("the source is write-inhibited")
        above = self.source.source_rel
        if above is not None and above.revertible:
            raise WriteInhibitedError("the source is the target of a revertible FlashCopy")
        if self.source.image is None:
            raise StateError("the source holds no valid image")
        if self.changed:
            for other in self.source.targets:
                if other is not self:
                    other.touched()      # the restore is a write to their source
            if above is not None:
                above.touched()          # ... and to the target of the one above
        self.source.image = bytearray(self.target.image)
        self.changed = False

    def withdraw(self, force: bool = False, *, tracks_left: bool | None = None) -> None:
        """``tracks_left`` settles ``remaining == UNKNOWN`` (from the engine)."""
        self._require_active()
        if self.revertible:
            raise StateError("revertible")
        left = {NONE: False, SOME: True}.get(self.remaining, tracks_left)
        if left is None:
            raise AssertionError("withdraw with UNKNOWN progress needs tracks_left")
        if left and not force:
            raise IncompleteCopyError("tracks left to copy")
        self.image_changes(bool(left))
        if left:
            self.target.image = None
        self._unlink()

    def _unlink(self) -> None:
        self.source.targets.remove(self)
        self.target.source_rel = None
        self.active = False


def establish_group(pairs, **options) -> list[RefFlashCopy]:
    """All relationships or none; the first pair that breaks a rule decides
    the error (each pair is checked in the order the engine documents)."""
    new_targets: list[RefVolume] = []
    sources_in_group = [s for s, _ in pairs]
    for s, t in pairs:
        if s is t:
            raise ValueError("a volume cannot be a FlashCopy of itself")
        if (s.n_tracks, s.track_size) != (t.n_tracks, t.track_size):
            raise ValueError("geometry differs")
        if t.source_rel is not None or any(t is x for x in new_targets):
            raise LimitError("already a target")
        if any(t is x for x in sources_in_group) or any(s is x for x in new_targets):
            raise LimitError("a cascade's levels are established one at a time")
        above, seen = s, []
        while above is not None:
            if above is t:
                raise LimitError("a cycle of FlashCopy relationships")
            assert not any(above is x for x in seen), "the model holds a cycle"
            seen.append(above)
            above = above.source_rel.source if above.source_rel is not None else None
        if t.targets and t.write_inhibited:
            raise WriteInhibitedError("the target is the source of a revertible FlashCopy")
        if len(s.targets) + sum(x is s for x in sources_in_group) > MAX_TARGETS:
            raise LimitError("too many targets")
        if s.write_inhibited:
            raise StateError("source write-inhibited")
        new_targets.append(t)
    for s, t in pairs:      # a cycle the group's relationships close together
        above, seen = s, []
        while above is not None and not any(above is x for x in seen):
            seen.append(above)
            if above is t:
                raise LimitError("a cycle of FlashCopy relationships within the group")
            group = [x for x, y in pairs if y is above]
            above = group[0] if group else (above.source_rel.source
                                            if above.source_rel is not None else None)
    rels = [RefFlashCopy(s, t, **options) for s, t in pairs]
    for s, t in pairs:
        for r in t.targets:
            r.touched()              # a new image onto a source: a change of it
    for r in rels:
        r._install()
    return rels


def establish(source: RefVolume, target: RefVolume, **options) -> RefFlashCopy:
    return establish_group([(source, target)], **options)[0]
