"""fastfc: FlashCopy and PPRC-style point-in-time copies and mirrors of
NumPy-backed volumes, at memory speed.

The package is built in floors, from the ground up, each importing only the
floors below it:

- ``_core`` (Cython kernels: track bitmaps, copy kernels, the host I/O
  path), ``errors`` (the exception hierarchy) and ``names``;
- ``storage``: volumes (``storage.volume``), the metadata store every step
  writes through (``store``), the links that carry PPRC updates (``link``)
  and secondary sites (``site``); beside it ``faults``, fault injection;
- ``copyservices``: FlashCopy (``copyservices.flashcopy``) and PPRC pairs
  (``pprc``), and over them Global Mirror sessions (``globalmirror``), which
  drive their B and C volumes through one interface (``secondary``): in
  this process (``local_secondary``) or in other processes (``sitemirror``);
  ``resolution`` holds the rule that ends an interrupted consistency group;
- ``durable``: storage units on disk (``durable.unit``, ``sqlite``,
  ``lock``);
- ``tools``: the ``fastfc`` command (``tools.cli``) and its NBD server
  (``nbd``), the ``demo`` and the ``testing`` helpers; and ``remote``,
  secondary units in Ray actors (``from fastfc import remote`` needs the
  ``remote`` extra; ``import fastfc`` does not import it).

What a user needs is importable from ``fastfc`` itself (``__all__``).
"""

from fastfc import faults
from fastfc._core import TrackBitmap, copy_threads, set_copy_threads
from fastfc._optional import MissingDependencyError
from fastfc.errors import (AlreadyExistsError, CorruptUnitError, DrainAborted, FastFCError,
                           FencedError, ImmutablePointError, IncompleteCopyError,
                           InjectedFault, InvalidImageError,
                           LimitError, LinkDownError, NoSpaceError, ReadOnlyUnitError,
                           StateError, UnitBusyError, UnitClosedError, UnitDownError,
                           VolumeClosedError, WriteInhibitedError)
from fastfc.copyservices.flashcopy import FlashCopy, FlashCopyState, establish_group
from fastfc.copyservices.points import (PointChain, PointRestore, RecoveryPoint,
                                        take_points)
from fastfc.copyservices.globalmirror import CGResult, GlobalMirror, GMState, GMStats
from fastfc.copyservices.point_schedule import PointSchedule
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
    "ReadOnlyUnitError", "NoSpaceError", "DrainAborted", "AlreadyExistsError",
    "UnitDownError", "FencedError", "MissingDependencyError",
    "set_copy_threads", "copy_threads",
    "PointChain", "RecoveryPoint", "PointRestore", "take_points", "ImmutablePointError",
    "PointSchedule",
]
