"""pytest-benchmark suite over the cases in ``benches/engine_cases.py``:
fastfc against the pure-NumPy engine, numba kernels and the physical limit.

Run with ``.venv/bin/python -m pytest benches --benchmark-only`` (together
with ``test_bench_core.py``). As there, each case times fastfc and then each
baseline as adjacent tests in one benchmark group, and the session ends with
the table of ratios (``conftest.py``); ``python -m fastfc bench`` measures
the same cases interleaved round by round. Nothing here asserts on time.
"""

from __future__ import annotations

import gc

import pytest

from benches.cases import Bench, Case
from benches.conftest import record
from benches.engine_cases import ENGINE_CASES, NUMBA_CASES, PHYSICAL_CASES

_current: dict[str, Bench] = {}

# the baseline roles of each case (known before a bench is built)
ROLES = {c.name: ["pure-NumPy engine"] for c in ENGINE_CASES}
ROLES.update({
    "numba_copy_runs_all": ["numba copy_set_runs"],
    "numba_copy_runs_10pct": ["numba copy_set_runs"],
    "numba_cow_batch": ["numba cow_write_batch"],
    "numba_cow_per_call": ["numba cow_write"],
    "physical_2threads": ["np.copyto, 2 threads", "memcpy, 2 threads", "np.copyto, 1 thread",
                          "memcpy, 1 thread"],
})


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


def _needs_numba(c: Case) -> bool:
    return c.name.startswith("numba_")


PARAMS = [pytest.param(c, role, id=f"{c.name}-{role}")
          for c in ENGINE_CASES + NUMBA_CASES + PHYSICAL_CASES
          for role in ["fastfc", *ROLES[c.name]]]


@pytest.mark.parametrize(("c", "role"), PARAMS)
def test_case(benchmark, c: Case, role: str) -> None:
    if _needs_numba(c):
        pytest.importorskip("numba")
    bench = _bench(c)
    assert role in bench.roles, (c.name, role, bench.roles)
    target = f"target {c.target_text} x" if c.target else "no target; vs"
    benchmark.group = f"{c.name}: {c.figure} ({target} {c.baseline_desc})"
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
