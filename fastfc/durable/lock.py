"""The lock that gives a storage unit one owner across processes.

A unit directory holds ``unit.lock``. Opening the unit read-write takes an
exclusive ``flock`` on it, held until the unit closes, and writes who holds
it (pid, host, command line, start time) into the file, so that a refused
opener can say who is in the way. A read-only open takes a shared lock: many
readers coexist, and no writer while any is there. The kernel drops the lock
of a process that dies, however it dies, so a killed owner never leaves a
unit locked.

Where ``fcntl`` does not exist (Windows) there is no cross-process lock.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from typing import IO, Any
from pathlib import Path

from fastfc.errors import UnitBusyError

try:
    import fcntl
except ImportError:  # pragma: no cover - not on POSIX
    fcntl = None  # type: ignore[assignment]

LOCK_FILE = "unit.lock"
POLL = 0.05   # seconds between tries while waiting


class UnitLock:
    """An exclusive (``shared=False``) or shared ``flock`` on ``unit.lock``.

    ``wait`` is None (refuse at once) or the seconds to keep trying.
    Raises :class:`~fastfc.errors.UnitBusyError` naming the holder.
    """

    def __init__(self, directory: Path, *, shared: bool, wait: float | None = None) -> None:
        self.path = directory / LOCK_FILE
        self.shared = shared
        self._file: IO[bytes] | None = None
        if fcntl is None:
            return
        f: IO[bytes]
        if shared:
            try:
                f = open(self.path, "rb")
            except FileNotFoundError:
                # never opened read-write by this fastfc: nothing to share
                # with, and a read-only open creates no file
                return
        else:
            f = open(self.path, "a+b", buffering=0)   # unbuffered: a failed write leaves nothing to flush at close
        mode = (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB
        deadline = None if wait is None else time.monotonic() + max(0.0, float(wait))
        while True:
            try:
                fcntl.flock(f, mode)
                break
            except BlockingIOError:
                if deadline is None or time.monotonic() >= deadline:
                    message = self._busy_message(f)
                    f.close()
                    raise UnitBusyError(message) from None
                time.sleep(min(POLL, max(0.0, deadline - time.monotonic())))
            except BaseException:
                f.close()
                raise
        self._file = f
        if not shared:
            info = dict(pid=os.getpid(), host=socket.gethostname(),
                        command=" ".join(sys.argv) or sys.executable,
                        since=time.strftime("%Y-%m-%d %H:%M:%S"))
            try:
                f.seek(0)
                f.truncate()
                f.write(json.dumps(info).encode())
                f.flush()
            except OSError:
                # no room for it (a full filesystem): the unit must still
                # open, to free space; a refused opener then names the
                # holder by pid (from /proc/locks) instead
                try:
                    f.truncate(0)
                except OSError:
                    pass

    def _busy_message(self, f: IO[bytes]) -> str:
        unit = self.path.parent
        # does a writer hold it? (then a shared try fails too)
        writer = True
        try:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            pass
        else:
            writer = False
            fcntl.flock(f, fcntl.LOCK_UN)
        if writer:
            return f"storage unit {unit} is open read-write by {describe_holder(self.path)}"
        pids = holders(self.path)
        who = f"pid {', '.join(map(str, pids))}" if pids else "another process"
        return f"storage unit {unit} is open read-only by {who}; a writer must wait"

    def release(self) -> None:
        f, self._file = self._file, None
        if f is None:
            return
        try:
            if not self.shared:
                f.seek(0)
                f.truncate()    # no stale holder named once it is gone
        except OSError:
            pass
        finally:
            f.close()       # drops the flock


def holder_info(lock_path: Path) -> dict[str, Any] | None:
    """What the read-write holder wrote into ``unit.lock`` (None if nothing)."""
    try:
        info: dict[str, Any] | None = json.loads(lock_path.read_text() or "null")
        return info
    except (OSError, ValueError):
        return None


def describe_holder(lock_path: Path) -> str:
    info = holder_info(lock_path)
    if not info:
        pids = holders(lock_path)
        return f"pid {', '.join(map(str, pids))}" if pids else "another process"
    return (f"pid {info.get('pid')} on {info.get('host')} since {info.get('since')} "
            f"({info.get('command')})")


def holders(lock_path: Path) -> list[int]:
    """Pids holding a flock on ``lock_path``, from /proc/locks (Linux; else [])."""
    try:
        st = os.stat(lock_path)
        with open("/proc/locks") as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    pids = []
    for line in lines:
        fields = line.split()
        # "1: FLOCK  ADVISORY  READ 1234 08:01:5678 0 EOF"
        if len(fields) < 6 or fields[1] != "FLOCK":
            continue
        try:
            pid = int(fields[4])
            maj, mino, ino = fields[5].split(":")
            if int(ino) == st.st_ino:
                pids.append(pid)
        except ValueError:
            continue
    return sorted(set(pids))
