"""Count the AVX-512 (EVEX-encoded) and AVX (VEX-encoded) instructions of a
built extension, per function, from ``objdump -d``.

Usage::

    python scripts/isa_count.py fastfc/_core.*.so [--all]

A portable build has EVEX instructions only in the ``*_avx512`` kernels and
VEX ones only in the ``*_avx2`` / ``*_avx512`` kernels; ``--all`` lists every
function that has any.
"""

from __future__ import annotations

import collections
import re
import subprocess
import sys

_FUNC = re.compile(r"^[0-9a-f]+ <(.+)>:$")


def count(path: str) -> dict[str, collections.Counter]:
    """``{function: Counter(evex=..., vex=...)}`` for the functions that have any."""
    out = subprocess.run(["objdump", "-d", path], check=True, capture_output=True,
                         text=True).stdout
    per: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    func = "?"
    for line in out.splitlines():
        m = _FUNC.match(line)
        if m:
            func = m.group(1)
            continue
        parts = line.split("\t")
        if len(parts) < 3 or not parts[1].strip():
            continue            # a continuation of the previous instruction's bytes
        first = parts[1].split()[0]
        if first == "62":
            per[func]["evex"] += 1
        elif first in ("c4", "c5"):
            per[func]["vex"] += 1
    return dict(per)


def main(argv: list[str]) -> int:
    path = argv[0]
    per = count(path)
    evex = sum(c["evex"] for c in per.values())
    vex = sum(c["vex"] for c in per.values())
    print(f"{path}: {evex} AVX-512 (EVEX) and {vex} AVX (VEX) instructions")
    for func, c in sorted(per.items(), key=lambda kv: -(kv[1]["evex"] + kv[1]["vex"])):
        if "--all" in argv or c["evex"]:
            print(f"  {c['evex']:5d} evex {c['vex']:5d} vex  {func}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
