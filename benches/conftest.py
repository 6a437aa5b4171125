"""What the pytest-benchmark suites share: one bench built at a time, the
timed run of one role, and the table of ratios (medians) printed at the end
of the session."""

from __future__ import annotations

import gc

import pytest

from benches.cases import Bench, Case

_medians: dict[str, tuple[Case, dict[str, float]]] = {}

# Build each case's bench once, and only one at a time: a 1 GiB case must be
# closed before the next allocates its volumes.
_current: dict[str, Bench] = {}


def bench_for(c: Case) -> Bench:
    """The bench of case ``c``, closing any other first."""
    if c.name not in _current:
        _close_all()
        gc.collect()
        _current[c.name] = c.make(False)
    return _current[c.name]


def _close_all() -> None:
    for b in _current.values():
        b.close()
    _current.clear()


@pytest.fixture(scope="module", autouse=True)
def _close_benches():
    yield
    _close_all()


def time_role(benchmark, c: Case, bench: Bench, role: str, group: str) -> None:
    """Time ``role`` of ``bench`` (garbage collector off), check fastfc's
    result, and record the median for the table of ratios."""
    benchmark.group = group
    benchmark.extra_info.update(role=role, ops_per_call=bench.ops, nbytes=bench.nbytes,
                                target=c.target, higher_is_better=c.higher_is_better)
    gc.collect()
    gc_was_on = gc.isenabled()
    gc.disable()
    try:
        benchmark.pedantic(bench.callable(role), setup=lambda: bench.before(role),
                           rounds=c.rounds * c.block, warmup_rounds=c.warmup, iterations=1)
    finally:
        if gc_was_on:
            gc.enable()
    if role == "fastfc":
        bench.check()
    stats = getattr(benchmark, "stats", None)
    if stats is not None:
        record(c, role, stats.stats.median)


def record(c: Case, role: str, median_s: float) -> None:
    _medians.setdefault(c.name, (c, {}))[1][role] = median_s


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    rows = []
    for name, (c, med) in _medians.items():
        base = {k: v for k, v in med.items() if k != "fastfc"}
        if "fastfc" not in med or not base:
            continue
        bname = min(base, key=base.get)
        ratio = c.ratio(med["fastfc"], base[bname])
        rows.append((name, med["fastfc"], base[bname], bname, ratio, c.target_text,
                     "met" if c.met(ratio) else "NOT MET"))
    if not rows:
        return
    tr = terminalreporter
    tr.section("fastfc ratios (medians; python -m benches interleaves for steadier figures)")
    tr.write_line(f"{'figure':24} {'fastfc':>12} {'baseline':>12} {'ratio':>7} "
                  f"{'target':>8}  met?   baseline is")
    for name, f, b, bname, ratio, target, met in rows:
        tr.write_line(f"{name:24} {f * 1e6:10.1f}us {b * 1e6:10.1f}us {ratio:7.3f} "
                      f"{target:>8}  {met:7} {bname}")
