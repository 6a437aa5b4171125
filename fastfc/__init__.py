"""fastfc: FlashCopy and PPRC-style point-in-time copies and mirrors of
NumPy-backed volumes, at memory speed.

Layers, from the ground up: ``_core`` (Cython kernels: track bitmaps, copy
kernels, the host I/O path) and ``errors``; ``volume`` and ``faults``;
``flashcopy``; ``link`` and ``pprc`` (mirroring); ``globalmirror``; ``store`` and ``unit`` (durable storage units).
"""

from fastfc import faults
from fastfc._core import TrackBitmap, copy_threads, set_copy_threads
from fastfc.errors import (CorruptUnitError, FastFCError, IncompleteCopyError,
                           InjectedFault, InvalidImageError, LimitError,
                           LinkDownError, NoSpaceError, ReadOnlyUnitError, StateError,
                           UnitBusyError, UnitClosedError, VolumeClosedError,
                           WriteInhibitedError)
from fastfc.copyservices.flashcopy import FlashCopy, FlashCopyState, establish_group
from fastfc.copyservices.globalmirror import CGResult, GlobalMirror, GMState, GMStats
from fastfc.storage.link import Link, LocalLink
from fastfc.copyservices.pprc import PPRCMode, PPRCPair, PPRCState
from fastfc.durable.unit import StorageUnit
from fastfc.storage.volume import Volume

__version__ = "0.1.0"

__all__ = [
    "TrackBitmap", "Volume", "FlashCopy", "FlashCopyState", "establish_group", "faults",
    "PPRCPair", "PPRCMode", "PPRCState", "Link", "LocalLink",
    "GlobalMirror", "GMState", "GMStats", "CGResult", "StorageUnit",
    "FastFCError", "VolumeClosedError", "WriteInhibitedError", "StateError",
    "IncompleteCopyError", "LimitError", "InvalidImageError", "InjectedFault",
    "LinkDownError", "CorruptUnitError", "UnitClosedError", "UnitBusyError",
    "ReadOnlyUnitError", "NoSpaceError", "set_copy_threads", "copy_threads",
]
