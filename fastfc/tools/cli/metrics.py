"""Metrics of ``fastfc serve --metrics-port PORT``: ``GET /metrics`` in the
Prometheus text exposition format (version 0.0.4), on 127.0.0.1 unless
``--metrics-host`` says otherwise; any other path is 404.

Per Global Mirror session of the served units (labels ``session`` and
``unit``, the unit that records it):

- ``fastfc_gm_rpo_seconds`` (gauge): now minus the coordination instant of
  its newest committed CG; absent before the first.
- ``fastfc_gm_last_cg_timestamp_seconds`` (gauge): that instant (Unix time).
- ``fastfc_gm_cg_total{outcome, cause}`` (counter): CG attempts, ``outcome``
  "committed" (``cause`` "none", or "commit_failed" for a commit failure
  resolved by commit) or "failed" (``cause`` why: drain_timeout, ...).
  Every attempt the unit ever counted, not only this server's.
- ``fastfc_gm_bytes_drained_total`` (counter), ``fastfc_gm_cg_sequence``
  (gauge), ``fastfc_gm_running`` (gauge, 1 while its loop runs here).
- ``fastfc_gm_rpo_alert`` (gauge, 1 while the RPO is above the session's
  threshold: ``mkgmir``/``chgmir --rpo-alert``), ``fastfc_gm_rpo_alerts_total``
  (counter: alerts raised in this server), and
  ``fastfc_gm_rpo_alert_threshold_seconds`` (gauge, for a session with one).

Per NBD export (label ``export``, and ``op`` for the latency): reads,
writes, bytes read and written, requests answered with an error, and the
request latency as a histogram (``fastfc_nbd_request_seconds``), counted
since the server started (:class:`fastfc.tools.nbd.RequestCounters`).

A scrape reads the counters as they are, taking none of the server's locks:
it answers while commands run and sessions form CGs.
"""

from __future__ import annotations

import logging
import math
import threading
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Iterator

import click

from fastfc.copyservices.globalmirror import Cause, GlobalMirror
from fastfc.tools.nbd import LATENCY_BUCKETS, OPS, NBDServer, RequestCounters

from .loops import RPOAlert, SessionLoops

log = logging.getLogger("fastfc.serve")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(**labels: str) -> str:
    return "{" + ",".join(f'{k}="{_escape(str(v))}"' for k, v in labels.items()) + "}"


def _number(v: float) -> str:
    if isinstance(v, float):
        if math.isnan(v):
            return "NaN"
        if math.isinf(v):
            return "+Inf" if v > 0 else "-Inf"
        return repr(v)
    return str(v)


class _Family:
    """One metric: its HELP and TYPE lines, then its samples."""

    def __init__(self, name: str, kind: str, help_text: str) -> None:
        self.name, self.kind, self.help = name, kind, help_text
        self.samples: list[str] = []

    def add(self, value: float, suffix: str = "", **labels: str) -> None:
        self.samples.append(f"{self.name}{suffix}{_labels(**labels)} {_number(value)}")

    def text(self) -> str:
        return (f"# HELP {self.name} {self.help}\n# TYPE {self.name} {self.kind}\n"
                + "".join(s + "\n" for s in self.samples))


def exposition(sessions: list[tuple[str, GlobalMirror]], loops: SessionLoops | None,
               exports: dict[str, RequestCounters]) -> str:
    """The text of one scrape: ``sessions`` as (unit path, session),
    ``loops`` the server's (None: none), ``exports`` the NBD counters."""
    F = _Family
    rpo = F("fastfc_gm_rpo_seconds", "gauge",
            "Seconds since the coordination instant of the newest committed CG.")
    last = F("fastfc_gm_last_cg_timestamp_seconds", "gauge",
             "Unix time of the coordination instant of the newest committed CG.")
    cgs = F("fastfc_gm_cg_total", "counter", "CG attempts by outcome and cause.")
    drained = F("fastfc_gm_bytes_drained_total", "counter", "Bytes sent to the B volumes.")
    seq = F("fastfc_gm_cg_sequence", "gauge", "Sequence number of the newest committed CG.")
    running = F("fastfc_gm_running", "gauge", "1 while the session's loop runs in this server.")
    alert = F("fastfc_gm_rpo_alert", "gauge",
              "1 while the RPO is above the session's alert threshold.")
    alerts = F("fastfc_gm_rpo_alerts_total", "counter",
               "RPO alerts raised in this server (the RPO went above the threshold).")
    threshold = F("fastfc_gm_rpo_alert_threshold_seconds", "gauge",
                  "The session's RPO alert threshold.")
    states: dict[GlobalMirror, RPOAlert] = loops.alerts() if loops is not None else {}
    for unit, gm in sessions:
        st = gm.stats
        lab = {"session": gm.name, "unit": unit}
        r = st.rpo
        if r is not None:
            rpo.add(r, **lab)
        if st.last_cg_time is not None:
            last.add(st.last_cg_time, **lab)
        cgs.add(st.successes - st.commit_failures_resolved, outcome="committed", cause="none",
                **lab)
        cgs.add(st.commit_failures_resolved, outcome="committed",
                cause=Cause.COMMIT_FAILED.value, **lab)
        for cause, n in sorted(st.failures.items()):
            cgs.add(n, outcome="failed", cause=cause, **lab)
        drained.add(st.bytes_drained, **lab)
        seq.add(st.sequence, **lab)
        running.add(int(loops is not None and loops.running(gm)), **lab)
        a = states.get(gm)
        alert.add(int(a is not None and a.alerting), **lab)
        alerts.add(0 if a is None else a.alerts, **lab)
        if a is not None and a.threshold is not None:
            threshold.add(a.threshold, **lab)
    families = [rpo, last, cgs, drained, seq, running, alert, alerts, threshold]

    reads = F("fastfc_nbd_reads_total", "counter", "NBD read requests answered.")
    writes = F("fastfc_nbd_writes_total", "counter", "NBD write requests answered.")
    rbytes = F("fastfc_nbd_read_bytes_total", "counter", "Bytes read without error.")
    wbytes = F("fastfc_nbd_write_bytes_total", "counter", "Bytes written without error.")
    errors = F("fastfc_nbd_errors_total", "counter", "NBD requests answered with an error.")
    latency = F("fastfc_nbd_request_seconds", "histogram",
                "Seconds from an NBD request's header in to its reply out.")
    bounds = [_number(b) for b in LATENCY_BUCKETS] + ["+Inf"]
    for name in sorted(exports):
        c = exports[name]
        reads.add(c.requests[OPS.index("read")], export=name)
        writes.add(c.requests[OPS.index("write")], export=name)
        rbytes.add(c.bytes[OPS.index("read")], export=name)
        wbytes.add(c.bytes[OPS.index("write")], export=name)
        for i, op in enumerate(OPS):
            if c.errors[i]:
                errors.add(c.errors[i], export=name, op=op)
            if not c.requests[i] and op not in ("read", "write"):
                continue
            total = 0
            for le, n in zip(bounds, c.buckets[i]):
                total += n
                latency.add(total, "_bucket", export=name, op=op, le=le)
            latency.add(c.seconds[i], "_sum", export=name, op=op)
            latency.add(c.requests[i], "_count", export=name, op=op)
    families += [reads, writes, rbytes, wbytes, errors, latency]
    return "".join(f.text() for f in families)


class MetricsServer:
    """``GET /metrics`` over HTTP, on a daemon thread: each scrape is
    ``collect()``'s text. ``address`` is where it listens (``port`` 0:
    a free one)."""

    def __init__(self, collect: Callable[[], str], host: str = "127.0.0.1",
                 port: int = 0) -> None:
        self.collect = collect

        class Handler(BaseHTTPRequestHandler):
            server_version = "fastfc-metrics"

            def do_GET(self) -> None:     # noqa: N802 (the http.server name)
                if self.path.split("?", 1)[0] != "/metrics":
                    self.send_error(404, "only /metrics is here")
                    return
                try:
                    body = collect().encode()
                except Exception:       # a scrape racing a session's removal: say so
                    log.exception("metrics scrape failed")
                    self.send_error(500, "the metrics could not be collected")
                    return
                self.send_response(200)
                self.send_header("Content-Type", CONTENT_TYPE)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:   # noqa: A002
                log.debug("metrics: %s %s", self.address_string(), format % args)

        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.httpd.daemon_threads = True
        self.address: tuple[str, int] = self.httpd.server_address[:2]  # type: ignore[assignment]
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.address
        return f"http://{host if ':' not in host else f'[{host}]'}:{port}/metrics"

    def start(self) -> None:
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={
            "poll_interval": 0.2}, name="fastfc-metrics", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self.httpd.shutdown()
            self._thread.join()
        self.httpd.server_close()


def sessions_of(units: Any) -> list[tuple[str, GlobalMirror]]:
    """Every session the open ``units`` (a :class:`~.units.Units`) restored,
    with the path of the unit recording it; read without the server's lock
    (a unit or session that a command adds or removes meanwhile is in the
    next scrape)."""
    seen: dict[int, tuple[str, GlobalMirror]] = {}
    for unit in list(units.open.values()):
        for gm in list(unit.sessions.values()):
            seen.setdefault(id(gm), (str(unit.path), gm))
    return list(seen.values())


@contextmanager
def serving(units: Any, loops: SessionLoops | None, nbd: NBDServer, host: str,
            port: int) -> Iterator[MetricsServer]:
    """A server's service: metrics of ``units``' sessions and ``nbd``'s
    exports on ``host``:``port`` while the ``with`` block runs. Says where
    on stderr (and the ``fastfc.serve`` log)."""
    server = MetricsServer(lambda: exposition(sessions_of(units), loops, nbd.counters()),
                           host, port)
    server.start()
    click.echo(f"metrics on {server.url}", err=True)
    log.info("metrics on %s", server.url)
    try:
        yield server
    finally:
        server.stop()
