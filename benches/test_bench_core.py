"""pytest-benchmark suite over the cases in ``benches/cases.py``.

Run with ``.venv/bin/python -m pytest benches --benchmark-only``. Each case
times fastfc and then each of its baselines as adjacent tests in one
benchmark group; the session ends with a table of ratios (medians, see
``conftest.py``). ``python -m benches core`` measures the same cases
interleaved round by round, which is the steadier figure on a noisy machine.

``benches/`` is outside the test paths (``pyproject.toml``: testpaths =
tests), so a plain ``pytest`` never runs these; nothing here asserts on time.
"""

from __future__ import annotations

import pytest

from benches.cases import CASES, Case, metadata_rows
from benches.conftest import bench_for, time_role


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
    bench = bench_for(c)
    if role not in bench.roles:
        pytest.skip(f"{c.name} has no baseline {role!r} here (numba missing?)")
    time_role(benchmark, c, bench, role,
              f"{c.name}: {c.figure} (target {c.target_text} x {c.baseline_desc})")


def test_metadata_bytes(benchmark) -> None:
    """FlashCopy.metadata_bytes stays within 3 bits per track per relationship
    (plus the revert image while revertible). Not a timing: an exact count."""
    rows = benchmark.pedantic(metadata_rows, rounds=1, iterations=1)
    for m in rows:
        assert m["ok"], m
