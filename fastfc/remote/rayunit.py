"""Secondary units as Ray actors.

Each unit is a named actor in the ``fastfc`` namespace (``max_restarts=0``:
a crash is seen within milliseconds as a dead actor, never as a silent
retry) holding a :class:`~fastfc.remote.server.UnitServer`. Callers find it
by name on every call after a failure, so proxies survive a restart. Every
``ray.get`` has a timeout (:data:`CALL_TIMEOUT`).

**Units live on their own.** A unit is a *detached* actor by default: it
belongs to the Ray cluster, not to the process that started it, so it keeps
serving reads, recovery (:func:`fastfc.remote.recover`) and failover when
that process (the primary) dies, and a new primary finds it by name
(:meth:`SecondaryUnit.attach`). Nothing ends it but :meth:`SecondaryUnit.stop`
(a clean close), :meth:`SecondaryUnit.kill` (a crash), :func:`stop_units`,
or the end of the cluster. (A cluster that ``ray.init()`` started inside
the primary's process ends with it, units and all: for site loss the
cluster runs on its own, ``ray start``; see docs/guide/remote.md.) A unit
whose cluster's GCS stays unreachable for Ray's reconnect timeout ends
itself (:func:`watch_cluster`), freeing its directory for a new cluster.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time
from typing import Any, Callable

from fastfc._optional import require
from fastfc.errors import FastFCError
from fastfc.remote import client
from fastfc.remote.client import UnitDownError, UnitHandle
from fastfc.remote.server import KilledHere, UnitServer, check_durability
from fastfc.storage.site import Pending

ray = require("ray", "remote", "fastfc.remote.SecondaryUnit")
from ray.exceptions import GetTimeoutError, RayActorError, RayError, RayTaskError  # noqa: E402

NAMESPACE = "fastfc"
CALL_TIMEOUT = 30.0      # seconds any call may take before the unit counts as down
START_TIMEOUT = 60.0


class _UnitActor:
    """The actor: a UnitServer, plus a kill point for crash tests.

    The unit is opened by :meth:`open`, not in ``__init__``: an error in an
    actor's creation reaches the caller only as ``ActorDiedError`` text,
    while one of a method arrives as itself (``UnitBusyError`` naming the
    holder, ``CorruptUnitError``, ...)."""

    def __init__(self, path: str, durability: str = "process") -> None:
        self._armed: tuple[str, int] | None = None
        self._path = path
        self._durability = durability
        self.server: UnitServer | None = None

    def open(self) -> None:
        self.server = UnitServer(self._path, durability=self._durability,
                                 kill_point=self._kill_point, kill_armed=self._kill_armed)
        host, port = ray.get_runtime_context().gcs_address.rsplit(":", 1)
        threading.Thread(target=watch_cluster, args=((host, int(port)), gcs_timeout()),
                         name="fastfc-gcs-watch", daemon=True).start()

    def _kill_point(self, where: str, i: int) -> None:
        if self._armed == (where, i):
            os.kill(os.getpid(), signal.SIGKILL)     # a crash, mid-call

    def _kill_armed(self, where: str) -> bool:
        return self._armed is not None and self._armed[0] == where

    def arm_kill(self, where: str, i: int) -> None:
        self._armed = (where, i)

    def host(self) -> tuple[str, int]:
        return socket.gethostname(), os.getpid()

    def close(self) -> None:
        """Close the unit cleanly (what :meth:`SecondaryUnit.stop` asks
        before it ends the actor): nothing is left for the next open to
        recover."""
        if self.server is not None:
            s, self.server = self.server, None
            s.close()

    def call(self, method: str, *args: Any) -> Any:
        if self.server is None:
            raise FastFCError(f"unit {self._path} is not open yet")
        return getattr(self.server, method)(*args)


_Actor = ray.remote(max_restarts=0, max_task_retries=0)(_UnitActor)


def gcs_timeout() -> float:
    """How long a Ray process may go without reaching its cluster's GCS
    before it ends: Ray's ``gcs_rpc_server_reconnect_timeout_s`` (60 s
    unless ``RAY_gcs_rpc_server_reconnect_timeout_s`` says otherwise)."""
    return float(os.environ.get("RAY_gcs_rpc_server_reconnect_timeout_s", 60))


def watch_cluster(gcs: tuple[str, int], timeout: float, *, every: float = 1.0,
                  end: Callable[[], None] = lambda: os.kill(os.getpid(), signal.SIGKILL)
                  ) -> None:
    """A unit's own check of its cluster: once the GCS at ``gcs`` has
    refused or ignored connections for ``timeout`` seconds, ``end`` the
    process (default: at once, as a crash, which every unit survives), so
    that the unit's lock is free for a unit started on its directory by a
    new cluster. Ray ends a process that lost the GCS only when that
    process next needs it: an idle unit's worker was seen still running a
    minute after its head's node was lost, holding the lock."""
    last_seen = time.monotonic()
    while True:
        try:
            socket.create_connection(gcs, timeout=min(every, 5.0)).close()
            last_seen = time.monotonic()
        except OSError:
            if time.monotonic() - last_seen >= timeout:
                print(f"fastfc unit: the cluster's GCS at {gcs[0]}:{gcs[1]} has not "
                      f"answered for {timeout:g} s: ending", file=sys.stderr, flush=True)
                end()
                return
        time.sleep(every)


def _ensure_ray() -> None:
    if not ray.is_initialized():
        # honours RAY_ADDRESS / an existing cluster; else starts a local one
        ray.init(namespace=NAMESPACE, include_dashboard=False,
                 ignore_reinit_error=True, log_to_driver=False)


def _unwrap(e: BaseException, unit: str, method: str) -> BaseException:
    if isinstance(e, RayTaskError):
        cause = e.cause if getattr(e, "cause", None) is not None else e
        if isinstance(cause, (FastFCError, ValueError, TypeError, KeyError, IndexError)):
            return cause
        return FastFCError(f"unit {unit}: {method} failed: {cause}")
    if isinstance(e, GetTimeoutError):
        return UnitDownError(f"unit {unit} did not answer {method} within {CALL_TIMEOUT:.0f} s")
    return UnitDownError(f"unit {unit} is down ({type(e).__name__} during {method})")


class _RayPending(Pending):
    def __init__(self, tr: "RayTransport", unit: str, method: str, ref: Any,
                 handle: Any) -> None:
        self.tr, self.unit, self.method, self.ref, self.handle = tr, unit, method, ref, handle

    def result(self) -> Any:
        try:
            return ray.get(self.ref, timeout=CALL_TIMEOUT)
        except (RayError, RayActorError) as e:
            if isinstance(e, RayActorError):
                # dead: free its name at once, for start() to reuse
                try:
                    ray.kill(self.handle, no_restart=True)
                except (RayError, ValueError):
                    pass
            if not isinstance(e, RayTaskError):
                self.tr.forget(self.unit)
            raise _unwrap(e, self.unit, self.method) from None


class _Failed(Pending):
    def __init__(self, error: BaseException) -> None:
        self.error = error

    def result(self) -> Any:
        raise self.error


class RayTransport(client.Transport):
    kind = "ray"

    def __init__(self) -> None:
        self._handles: dict[str, Any] = {}

    def forget(self, unit: str) -> None:
        self._handles.pop(unit, None)

    def handle(self, unit: str) -> Any:
        h = self._handles.get(unit)
        if h is None:
            _ensure_ray()
            try:
                h = ray.get_actor(unit, namespace=NAMESPACE)
            except ValueError:
                raise UnitDownError(f"unit {unit} is not running (start it with "
                                    "SecondaryUnit.start)") from None
            self._handles[unit] = h
        return h

    def call(self, unit: str, method: str, *args: Any) -> Pending:
        try:
            h = self.handle(unit)
            ref = h.call.remote(method, *args)
        except UnitDownError as e:
            return _Failed(e)
        except RayError as e:
            self.forget(unit)
            return _Failed(_unwrap(e, unit, method))
        return _RayPending(self, unit, method, ref, h)


_transport = RayTransport()
client._transports["ray"] = _transport


class SecondaryUnit(UnitHandle):
    """A durable storage unit served by a Ray actor.

    Use :meth:`start`; then :meth:`create_volume` / :meth:`volume` give
    :class:`~fastfc.remote.client.RemoteVolume` proxies for a
    :class:`~fastfc.GlobalMirror`'s B and C volumes, and :meth:`kill`
    crashes the unit's process.
    """

    kind = "ray"

    @classmethod
    def start(cls, path: str | os.PathLike, *, name: str,
              resources: dict[str, float] | None = None,
              node_id: str | None = None, detached: bool = True,
              durability: str = "process") -> "SecondaryUnit":
        """Start an actor holding the durable unit at ``path`` (created if
        missing) under ``name``, calling ``ray.init()`` if needed (an
        existing cluster: call ``ray.init(address=...)`` first, or set
        ``RAY_ADDRESS``). Returns once the unit is open and reconciled
        with its own files. ``resources`` (e.g. ``{"node:10.0.0.2": 0.01}``)
        or ``node_id`` place it on another node; ``path`` is a path on that
        node. Called again after :meth:`kill`, it reopens the unit in a new
        actor under the same name.

        ``detached`` (default): the actor outlives this process (see the
        module's docstring); end it with :meth:`stop`. ``detached=False``:
        owned by this process, it dies with it.

        ``durability``: the unit's, ``"process"`` (default) or ``"power"``
        (every call that changes B or C is on the disk before it answers,
        in the order that keeps every C on one CG through a power cut of
        the unit's host; see :class:`~fastfc.remote.server.UnitServer`)."""
        check_durability(durability)
        _ensure_ray()
        opts: dict[str, Any] = {"name": name, "namespace": NAMESPACE, "num_cpus": 0}
        if detached:
            opts["lifetime"] = "detached"
        if resources:
            opts["resources"] = resources
        if node_id is not None:
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
            opts["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node_id, soft=False)
        try:
            old = ray.get_actor(name, namespace=NAMESPACE)
        except ValueError:
            old = None
        if old is not None:     # a dead actor keeps its name until killed
            try:
                ray.get(old.host.remote(), timeout=2)
            except (RayError, RayActorError):
                ray.kill(old, no_restart=True)
                _wait_name_free(name)
            else:
                raise FastFCError(f"unit {name} is running already")
        _transport.forget(name)
        actor: Any = _Actor.options(**opts).remote(str(path), durability)
        try:
            ray.get(actor.open.remote(), timeout=START_TIMEOUT)
        except (RayError, RayActorError) as e:
            ray.kill(actor, no_restart=True)
            raise _unwrap(e, name, "start") from None
        _transport._handles[name] = actor
        u = cls(name)
        u.info()
        return u

    @classmethod
    def attach(cls, name: str) -> "SecondaryUnit":
        """The unit running under ``name`` (started by any process of this
        Ray cluster, alive or not): what a new primary process calls.
        Raises :class:`UnitDownError` if no unit of that name answers."""
        _transport.forget(name)
        u = cls(name)
        u.info()
        return u

    def stop(self) -> None:
        """End the unit cleanly: close its storage unit (nothing left to
        recover at the next open), end its actor and free its name. A unit
        that is down already is left as it is (its name freed)."""
        found = self._actor_and_process()
        if found is None:
            return
        h, host, pid = found
        if pid is not None:
            try:
                ray.get(h.close.remote(), timeout=CALL_TIMEOUT)
            except (RayError, RayActorError):
                pass                    # down or hung: ended below all the same
        ray.kill(h, no_restart=True)
        _transport.forget(self.name)
        _wait_gone(host, pid)
        _wait_name_free(self.name)

    def arm_kill(self, where: str, i: int) -> None:
        """Crash the actor's process (SIGKILL) inside its next ``where``
        call (``apply``, ``prepare``, ``finish``), before step ``i``."""
        h = _transport.handle(self.name)
        ray.get(h.arm_kill.remote(where, i), timeout=CALL_TIMEOUT)

    def kill(self) -> None:
        """SIGKILL the actor's process (a crash) and return once it is gone
        and its name free for :meth:`start`."""
        found = self._actor_and_process()
        if found is None:
            return
        h, host, pid = found
        if host == socket.gethostname() and pid is not None:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            _wait_gone(host, pid)
        ray.kill(h, no_restart=True)   # on another node: Ray kills it; frees the name
        _transport.forget(self.name)
        _wait_name_free(self.name)

    def _actor_and_process(self) -> "tuple[Any, str | None, int | None] | None":
        """The unit's actor and where its process runs (host, pid; both
        None if it does not answer), or None if no actor has the name."""
        try:
            h = _transport.handle(self.name)
        except UnitDownError:
            return None
        try:
            host, pid = ray.get(h.host.remote(), timeout=CALL_TIMEOUT)
        except (RayError, RayActorError):
            host, pid = None, None
        return h, host, pid

    @property
    def up(self) -> bool:
        try:
            self.info()
        except FastFCError:
            return False
        return True


def _wait_gone(host: str | None, pid: int | None, timeout: float = 10.0) -> None:
    """Wait for a unit's process to end, if it ran on this host."""
    if host != socket.gethostname() or pid is None:
        return
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.01)


def _wait_name_free(name: str, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            ray.get_actor(name, namespace=NAMESPACE)
        except ValueError:
            return
        time.sleep(0.02)


def shutdown_units(*units: SecondaryUnit) -> None:
    """Kill the units' actors (tests' and scripts' cleanup)."""
    for u in units:
        u.kill()


def stop_units(*names: str) -> list[str]:
    """Stop (:meth:`SecondaryUnit.stop`) the units running under ``names``;
    returns those that were running. Units are detached: whatever started
    them, this ends them."""
    stopped = []
    for name in names:
        try:
            u = SecondaryUnit.attach(name)
        except UnitDownError:
            continue
        u.stop()
        stopped.append(name)
    return stopped


__all__ = ["SecondaryUnit", "KilledHere", "shutdown_units", "stop_units"]
