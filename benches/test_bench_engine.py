"""pytest-benchmark suite over the cases in ``benches/engine_cases.py``:
fastfc against the pure-NumPy engine, numba kernels and the physical limit.

Run with ``.venv/bin/python -m pytest benches --benchmark-only`` (together
with ``test_bench_core.py``). As there, each case times fastfc and then each
baseline as adjacent tests in one benchmark group, and the session ends with
the table of ratios (``conftest.py``); ``python -m benches engine numba
physical`` measures the same cases interleaved round by round. Nothing here asserts on time.
"""

from __future__ import annotations

import pytest

from benches.cases import Case
from benches.conftest import bench_for, time_role
from benches.engine_cases import ENGINE_CASES, NUMBA_CASES, PHYSICAL_CASES

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


def _needs_numba(c: Case) -> bool:
    return c.name.startswith("numba_")


PARAMS = [pytest.param(c, role, id=f"{c.name}-{role}")
          for c in ENGINE_CASES + NUMBA_CASES + PHYSICAL_CASES
          for role in ["fastfc", *ROLES[c.name]]]


@pytest.mark.parametrize(("c", "role"), PARAMS)
def test_case(benchmark, c: Case, role: str) -> None:
    if _needs_numba(c):
        pytest.importorskip("numba")
    bench = bench_for(c)
    assert role in bench.roles, (c.name, role, bench.roles)
    target = f"target {c.target_text} x" if c.target else "no target; vs"
    time_role(benchmark, c, bench, role, f"{c.name}: {c.figure} ({target} {c.baseline_desc})")
