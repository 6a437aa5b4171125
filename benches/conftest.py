"""Collects the medians of the pytest-benchmark cases and prints each figure
as a ratio against its baseline at the end of the session."""

from __future__ import annotations

from benches.cases import Case

_medians: dict[str, tuple[Case, dict[str, float]]] = {}


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
    tr.section("fastfc ratios (medians; benches/run.py interleaves for steadier figures)")
    tr.write_line(f"{'figure':24} {'fastfc':>12} {'baseline':>12} {'ratio':>7} "
                  f"{'target':>8}  met?   baseline is")
    for name, f, b, bname, ratio, target, met in rows:
        tr.write_line(f"{name:24} {f * 1e6:10.1f}us {b * 1e6:10.1f}us {ratio:7.3f} "
                      f"{target:>8}  {met:7} {bname}")
