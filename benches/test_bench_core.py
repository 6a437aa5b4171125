"""pytest-benchmark suite over the cases in ``benches/cases.py``.

Run with ``.venv/bin/python -m pytest benches --benchmark-only``. Each case
times fastfc and then each of its baselines as adjacent tests in one
benchmark group; the session ends with a table of ratios (medians, see
``conftest.py``). ``benches/run.py`` measures the same cases interleaved
round by round, which is the steadier figure on a noisy machine.

``benches/`` is outside the test paths (``pyproject.toml``: testpaths =
tests), so a plain ``pytest`` never runs these; nothing here asserts on time.
"""

from __future__ import annotations

import gc

import pytest

from benches.cases import CASES, Bench, Case, metadata_rows
from benches.conftest import record

# Build each case's bench once, and only one at a time: a 1 GiB case must be
# closed before the next allocates its volumes.
_current: dict[str, Bench] = {}


def _bench(c: Case) -> Bench:
    if c.name not in _current:
        for b in _current.values():
            b.close()
        _current.clear()
        gc.collect()
        _current[c.name] = c.make(False)
    return _current[c.name]


@pytest.fixture(scope="module", autouse=True)
def _close_benches():
    yield
    for b in _current.values():
        b.close()
    _current.clear()


def _roles(c: Case) -> list[str]:
    # The roles are known only once a bench is built (numba may be missing);
    # list the usual ones and skip a baseline the bench does not have.
    names = {
        "count_2p27": ["np.bitwise_count().sum()", "numba popcount loop"],
        "find_next_set_2p27": ["np.argmax(words)", "numba scan"],
        "count_2p20": ["np.bitwise_count().sum()", "numba popcount loop"],
        "find_next_set_2p20": ["np.argmax(words)", "numba scan"],
        "commit_2p24": ["commit() at 2^10 tracks"],
        "revert_2p24": ["revert() at 2^10 tracks"],
    }
    default = {"write_4k_3tgt_copied": ["slice assignment"],
               "write_4k_cow": ["slice assignment + np.copyto(track)"],
               "establish_2p24": ["np.copyto(bitmap bytes)"],
               "resync_revertible_2p24": ["np.copyto(bitmap bytes)"]}
    return ["fastfc", *names.get(c.name, default.get(c.name, ["np.copyto"]))]


PARAMS = [pytest.param(c, role, id=f"{c.name}-{role}") for c in CASES for role in _roles(c)]


@pytest.mark.parametrize(("c", "role"), PARAMS)
def test_case(benchmark, c: Case, role: str) -> None:
    bench = _bench(c)
    if role not in bench.roles:
        pytest.skip(f"{c.name} has no baseline {role!r} here (numba missing?)")
    benchmark.group = f"{c.name}: {c.figure} (target {c.target_text} x {c.baseline_desc})"
    benchmark.extra_info.update(role=role, ops_per_call=bench.ops, nbytes=bench.nbytes,
                                target=c.target, higher_is_better=c.higher_is_better)
    gc.collect()
    gc_was_on = gc.isenabled()
    gc.disable()
    try:
        benchmark.pedantic(bench.callable(role), setup=lambda: bench.before(role),
                           rounds=c.rounds * c.block, warmup_rounds=c.warmup,
                           iterations=1)
    finally:
        if gc_was_on:
            gc.enable()
    if role == "fastfc":
        bench.check()
    stats = getattr(benchmark, "stats", None)
    if stats is not None:
        record(c, role, stats.stats.median)


def test_metadata_bytes(benchmark) -> None:
    """FlashCopy.metadata_bytes stays within 3 bits per track per relationship
    (plus the revert image while revertible). Not a timing: an exact count."""
    rows = benchmark.pedantic(metadata_rows, rounds=1, iterations=1)
    for m in rows:
        assert m["ok"], m
