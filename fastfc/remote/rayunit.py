"""Secondary units as Ray actors.

Each unit is a named actor in the ``fastfc`` namespace (``max_restarts=0``:
a crash is seen within milliseconds as a dead actor, never as a silent
retry) holding a :class:`~fastfc.remote.server.UnitServer`. Callers find it
by name on every call after a failure, so proxies survive a restart. Every
``ray.get`` has a timeout (:data:`CALL_TIMEOUT`).

**Ray is the control plane.** Starting, placing, finding, stopping and
killing units go through Ray; the session's calls go over each unit's
direct stream (:mod:`fastfc.remote.stream`: TCP on the node's IP, and a
Unix socket for callers on the same node), whose address and token the
actor hands out over Ray. A broken stream makes the unit found by name
again at the next call. :data:`STREAM` False sends the calls through Ray.

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
from typing import Any, Callable, NoReturn

from fastfc._optional import require
from fastfc.errors import FastFCError
from fastfc.remote import client
from fastfc.remote.client import UnitDownError, UnitHandle
from fastfc.remote.server import KilledHere, UnitServer, check_durability
from fastfc.remote.stream import PASSED_THROUGH, StreamClient, StreamServer
from fastfc.storage.site import Pending

ray = require("ray", "remote", "fastfc.remote.SecondaryUnit")
from ray.exceptions import GetTimeoutError, RayActorError, RayError, RayTaskError  # noqa: E402

NAMESPACE = "fastfc"
CALL_TIMEOUT = 30.0      # seconds any call may take before the unit counts as down
START_TIMEOUT = 60.0
# the session's calls over each unit's direct stream (False: through Ray's
# actor calls, as before the stream; read when a unit is first called and,
# in the unit's process, when it opens: a unit started with it False serves
# no stream). The environment's FASTFC_RAY_STREAM=0 sets it False.
STREAM = os.environ.get("FASTFC_RAY_STREAM", "1") != "0"
# a unit on this process' Ray node is reached over its stream's Unix socket
# (False: over TCP, as from another node)
STREAM_LOCAL = True
# the calls a unit's stream serves (everything a UnitSite or proxy asks);
# starting, stopping, killing and kill points stay on Ray
STREAM_CALLS = frozenset({"info", "create_volume", "volume", "read", "setup", "apply",
                          "prepare", "finish", "record_decision", "status", "rejoin",
                          "digests", "restore_b"})


class _UnitActor:
    """The actor: a UnitServer, its direct stream, and a kill point for
    crash tests.

    The unit is opened by :meth:`open`, not in ``__init__``: an error in an
    actor's creation reaches the caller only as ``ActorDiedError`` text,
    while one of a method arrives as itself (``UnitBusyError`` naming the
    holder, ``CorruptUnitError``, ...).

    ``open`` also starts the unit's stream (:class:`StreamServer` on the
    node's IP as Ray reports it, a free port, a fresh token), which
    :meth:`stream` tells callers over Ray. Its calls run on the stream's
    threads, Ray's on the actor's: ``_lock`` makes them one at a time
    around the server, as UnitServer expects."""

    def __init__(self, path: str, durability: str = "process", stream_port: int = 0) -> None:
        self._armed: tuple[str, int] | None = None
        self._path = path
        self._durability = durability
        self._stream_port = stream_port
        self.server: UnitServer | None = None
        self._stream: StreamServer | None = None
        self._lock = threading.Lock()

    def open(self) -> None:
        with self._lock:
            self.server = UnitServer(self._path, durability=self._durability,
                                     kill_point=self._kill_point, kill_armed=self._kill_armed)
        host, port = ray.get_runtime_context().gcs_address.rsplit(":", 1)
        threading.Thread(target=watch_cluster, args=((host, int(port)), gcs_timeout()),
                         name="fastfc-gcs-watch", daemon=True).start()
        if STREAM:
            self._stream = StreamServer(self._serve_stream,
                                        host=ray.util.get_node_ip_address(),
                                        port=self._stream_port)

    def stream(self) -> dict[str, Any]:
        """Where the unit's stream listens (``address``, TCP; ``local``, its
        Unix socket, for callers on ``node``) and its ``token`` (the
        control plane hands it to callers)."""
        if self._stream is None:
            raise FastFCError(f"unit {self._path} is not open yet")
        return {"address": self._stream.address, "local": self._stream.local_path,
                "node": ray.get_runtime_context().get_node_id(), "token": self._stream.token}

    def _serve_stream(self, method: str, args: tuple) -> Any:
        if method not in STREAM_CALLS:
            raise ValueError(f"a unit's stream does not serve {method!r}")
        return self.call(method, *args)

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
        recover. Its stream stops first."""
        if self._stream is not None:
            self._stream.close()
        with self._lock:
            if self.server is not None:
                s, self.server = self.server, None
                s.close()

    def call(self, method: str, *args: Any) -> Any:
        with self._lock:
            if self.server is None:
                raise FastFCError(f"unit {self._path} is not open")
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
        if isinstance(cause, PASSED_THROUGH):
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
            self.failed(e)

    def failed(self, e: BaseException) -> NoReturn:
        """Raise what the call's Ray error means for the caller."""
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
    """Units found by name through Ray. With :data:`STREAM`, a unit's
    calls go over its direct stream (:class:`StreamClient`, one per unit
    and process, connected when the unit is first called: its address and
    token asked of the actor over Ray); a broken stream forgets the unit,
    so the next call finds it by name again (a restarted unit, a new
    stream). ``_lock`` guards ``_handles`` and ``_streams``."""

    kind = "ray"

    def __init__(self) -> None:
        self._handles: dict[str, Any] = {}
        self._streams: dict[str, StreamClient] = {}
        self._lock = threading.RLock()

    def forget(self, unit: str) -> None:
        with self._lock:
            self._handles.pop(unit, None)
            c = self._streams.pop(unit, None)
        if c is not None:
            c.close()

    def _dropped(self, c: StreamClient) -> None:
        """A stream broke: its unit is found by name again at the next call."""
        with self._lock:
            if self._streams.get(c.unit) is c:
                del self._streams[c.unit]
                self._handles.pop(c.unit, None)

    def handle(self, unit: str) -> Any:
        with self._lock:
            h = self._handles.get(unit)
        if h is None:
            _ensure_ray()
            try:
                h = ray.get_actor(unit, namespace=NAMESPACE)
            except ValueError:
                raise UnitDownError(f"unit {unit} is not running (start it with "
                                    "SecondaryUnit.start)") from None
            with self._lock:
                h = self._handles.setdefault(unit, h)
        return h

    def stream(self, unit: str) -> StreamClient:
        """The unit's stream, connected if it is not yet (UnitDownError if
        the unit does not answer)."""
        with self._lock:
            c = self._streams.get(unit)
        if c is not None:
            return c
        h = self.handle(unit)
        try:
            where = ray.get(h.stream.remote(), timeout=CALL_TIMEOUT)
        except (RayError, RayActorError) as e:
            _RayPending(self, unit, "stream", None, h).failed(e)
        address = where["address"]
        if (STREAM_LOCAL and where["local"]
                and where["node"] == ray.get_runtime_context().get_node_id()):
            address = where["local"]
        c = StreamClient(unit, address, where["token"], lambda: CALL_TIMEOUT, self._dropped)
        with self._lock:
            other = self._streams.setdefault(unit, c)
        if other is not c:
            c.close()
        return other

    def call(self, unit: str, method: str, *args: Any) -> Pending:
        try:
            if STREAM:
                return self.stream(unit).call(method, args)
            h = self.handle(unit)
            ref = h.call.remote(method, *args)
        except FastFCError as e:        # UnitDownError, or the unit's refusal
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
              durability: str = "process", stream_port: int = 0) -> "SecondaryUnit":
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
        the unit's host; see :class:`~fastfc.remote.server.UnitServer`).

        ``stream_port``: the TCP port of the unit's direct stream on its
        node (the session's calls travel over it; Ray hands callers its
        address and token): 0 (default) takes any free one at each start;
        a fixed one for a firewall to let through (docs/guide/remote.md)."""
        check_durability(durability)
        if not isinstance(stream_port, int) or not 0 <= stream_port <= 65535:
            raise ValueError(f"stream_port must be a TCP port (0..65535, 0: any free "
                             f"one), got {stream_port!r}")
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
        actor: Any = _Actor.options(**opts).remote(str(path), durability, stream_port)
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
