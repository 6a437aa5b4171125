"""What the command line prints: tables and JSON on stdout, progress on
stderr, sizes and counts in words."""

from __future__ import annotations

import json
import os
import time
from typing import Any

import click


def console(stderr: bool = False):
    """A rich console on the current stdout (or stderr). Piped output is
    not wrapped at 80 columns: a table row stays one line for grep."""
    import sys
    from rich.console import Console
    stream = sys.stderr if stderr else sys.stdout
    # bound now, not looked up at each write: under a server (control.py) the
    # stream is routed by thread, and a live progress bar redraws from its own
    # the environment as this thread sees it now (a server's command sees its
    # client's COLUMNS, TERM, ...), for the console's own threads too
    out = Console(file=getattr(stream, "routed", stream), highlight=False,
                  _environ=dict(os.environ))
    if not out.is_terminal and "COLUMNS" not in os.environ:
        out.width = 1000     # long unit paths too: a row is one line, whatever it holds
    return out


def table(*columns: str, **kw):
    """A rich table with a rule under its header and no frame."""
    from rich import box
    from rich.table import Table
    t = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, **kw)
    for c in columns:
        t.add_column(c)
    return t


def json_out(obj) -> None:
    click.echo(json.dumps(obj, indent=2))


def human(n: float) -> str:
    """A byte count in binary units: ``64 KiB``, ``8.1 MiB``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:g} {unit}" if n == int(n) else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3f}"


def plural(count: float, noun: str) -> str:
    """``1 track``, ``3 tracks``."""
    return f"{count} {noun}{'' if count == 1 else 's'}"


def eta(seconds: float) -> str:
    """A duration as a person reads it: ``40 s``, ``12 min``, ``1.5 h``."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def fc_id(fc) -> str:
    """A FlashCopy relationship as the command line names it: ``S:T``."""
    return f"{fc.source.name}:{fc.target.name}"


def pair_id(pair) -> str:
    """A PPRC pair as the command line names it: ``PRIMARY:SECONDARY``."""
    return f"{pair.primary.name}:{pair.secondary.name}"


def each(items: list, step, said) -> list:
    """Do ``step`` to each item in turn, saying ``said(item, what step
    returned)`` after each: one line per relationship or pair, so a failure
    midway leaves the ones before it said (nothing if it says None: --json).
    Returns ``items``."""
    for item in items:
        line = said(item, step(item))
        if line is not None:
            click.echo(line)
    return items


class Progress:
    """Progress on stderr: rich bars on a terminal; in a pipe, plain lines
    (no live-display control codes), at most one a second per task, and
    only for work that takes more than a second. ``unit`` is what is
    counted; ``size`` its bytes, for the rate and the ETA."""

    EVERY = 1.0

    def __init__(self, unit: str = "tracks") -> None:
        self.unit = unit
        self.console = console(stderr=True)
        self.live = self.console.is_terminal
        self._bar: Any = None
        self._tasks: dict[int, dict] = {}

    def __enter__(self) -> "Progress":
        if self.live:
            from rich.progress import (BarColumn, MofNCompleteColumn, TextColumn,
                                       TimeElapsedColumn, TimeRemainingColumn)
            from rich.progress import Progress as Bars
            self._bar = Bars(TextColumn("{task.description}"), BarColumn(),
                             MofNCompleteColumn(), TextColumn(self.unit),
                             TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                             console=self.console, transient=True)
            self._bar.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)

    def add(self, description: str, total: float, *, size: int = 0,
            rate: float | None = None) -> int:
        """A task of ``total`` units of ``size`` bytes; ``rate`` (bytes/s)
        caps it, so its ETA is known from the start and said at once."""
        task = self._bar.add_task(description, total=total) if self._bar is not None \
            else len(self._tasks)
        now = time.monotonic()
        self._tasks[task] = {"what": description, "total": total, "size": size,
                             "start": now, "said": now, "done": 0}
        if rate and self._bar is None and total:
            seconds = total * size / rate
            if seconds > self.EVERY:
                self._say(f"{description}: {plural(total, self.unit[:-1])} "
                          f"({human(total * size)}) at {human(rate)}/s, ETA {eta(seconds)}")
        return task

    def update(self, task: int, completed: float, description: str | None = None) -> None:
        t = self._tasks[task]
        t["done"] = completed
        if self._bar is not None:
            self._bar.update(task, completed=completed,
                             **({} if description is None else {"description": description}))
            return
        now = time.monotonic()
        if now - t["said"] >= self.EVERY:
            t["said"] = now
            self._say(self._line(t, description))

    def _line(self, t: dict, description: str | None) -> str:
        spent = time.monotonic() - t["start"]
        line = f"{description or t['what']}: {t['done']:g}/{t['total']:g} {self.unit}"
        if t["size"] and t["done"] and spent > 0:
            per_s = t["done"] / spent
            line += f", {human(int(per_s * t['size']))}/s, " \
                    f"ETA {eta((t['total'] - t['done']) / per_s)}"
        return line

    def _say(self, line: str) -> None:
        click.echo(line, err=True)
