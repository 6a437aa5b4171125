# cython: language_level=3
"""fastfc's kernels: track bitmaps, copy kernels and the hot host I/O path.

Everything here is private; the public classes in ``fastfc.storage.volume`` and
``fastfc.copyservices.flashcopy`` subclass the ``cdef`` bases so that a host read or write
is one C method from the Python call to the ``memcpy``.

Locking (docs/design.md, "Locking"): each volume has one re-entrant lock. A volume's
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

from fastfc.errors import (InvalidImageError, LimitError, NoSpaceError, StateError,
                           VolumeClosedError, WriteInhibitedError)

# Copies of at least this many bytes release the GIL (docs/design.md, "When
# copies release the GIL": below it the release costs more than it frees).
cdef Py_ssize_t NOGIL_BYTES = 65536
# Bitmap operations release the GIL only from this many words (64 KiB) up:
# a thread that gives the GIL up waits for busy Python threads to hand it
# back (up to the switch interval each time), far longer than a small scan.
cdef Py_ssize_t NOGIL_WORDS = 8192
#: Bitmaps of this many words or more keep a summary (see TrackBitmap)
cdef Py_ssize_t SUMMARY_WORDS = 64
# Host writes to a volume on a disk store through the mapping without the GIL,
# whatever their size (docs/design.md, "Host writes to volumes on a disk":
# pwrite, or keeping the GIL below NOGIL_BYTES, measured worse).
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
cdef class WriteGate
cdef class PointChainBase
cdef class PointRestoreBase


include "_bitmap.pxi"
include "_copy.pxi"
include "_relationship.pxi"
include "_volume.pxi"
include "_cascade.pxi"
include "_gate.pxi"
include "_pprc.pxi"
include "_coordinate.pxi"
include "_points_log.pxi"
include "_points.pxi"
include "_points_restore.pxi"
include "_points_target.pxi"
include "_nbd.pxi"
