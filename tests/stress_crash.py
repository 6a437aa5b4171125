"""A longer crash campaign than the test suite's (not collected by pytest).

    python tests/stress_crash.py [--rounds 20] [--random 300] [pytest args...]

Runs tests/test_crash.py with ``FASTFC_CRASH_ROUNDS`` kills per named point
and ``FASTFC_CRASH_RANDOM`` kills at random moments, and prints the tally of
kills tried and survived per point.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import pytest


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=20, help="kills per named-point test")
    ap.add_argument("--random", type=int, default=300, help="kills at random moments")
    args, rest = ap.parse_known_args()
    os.environ["FASTFC_CRASH_ROUNDS"] = str(args.rounds)
    os.environ["FASTFC_CRASH_RANDOM"] = str(args.random)
    here = Path(__file__).parent
    return pytest.main(["-q", "-p", "no:cacheprovider", str(here / "test_crash.py"), *rest])


if __name__ == "__main__":
    sys.exit(main())
