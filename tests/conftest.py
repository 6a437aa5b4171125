"""Shared test configuration.

Hypothesis profiles are chosen by the ``HYPOTHESIS_PROFILE`` environment
variable: ``dev`` (quick, the default) or ``ci`` (thorough; ``.ci/run`` sets
it). Neither has a deadline: the machine is shared and noisy, and a slow
example is not a wrong one.

Tests marked ``slow`` (crash, promise, power-cut, serve, full-filesystem,
stub and mypy tests: seconds each) are
left out of a plain ``pytest -q``, the quick loop, and run with
``--run-slow``, as the README's test command and ``.ci/run`` do. They are
deselected, not skipped, and the summary says how many; under the ``ci``
profile leaving them out is an error, so CI cannot pass without them.
"""

from __future__ import annotations

import os
import signal
import shutil
import sys
import tempfile
import unittest
from pathlib import Path

if os.environ.get("PYTHONDONTWRITEBYTECODE") and not os.environ.get("PYTHONPYCACHEPREFIX"):
    # An environment that keeps byte code out of the source tree (as some
    # sandboxes and CI images do) made every process compile fastfc and
    # every xdist worker rewrite the tests' asserts from source: seconds per
    # worker, and a third of a second per ``python -m fastfc`` the CLI, serve
    # and crash tests start (hundreds). The byte code goes to a cache outside
    # the tree instead (PYTHONPYCACHEPREFIX, inherited by the workers and the
    # children), so the tree stays clean as that environment wants. This
    # comes before the imports below: pytest rewrites the asserts of its
    # plugins' packages too (Hypothesis: ninety modules, about two seconds),
    # and caches them only when byte code may be written, so imported first
    # they were rewritten again at every start of the controlling process.
    _prefix = os.path.join(tempfile.gettempdir(), f"fastfc-tests-pycache-{os.getuid()}")
    os.environ["PYTHONPYCACHEPREFIX"] = _prefix
    del os.environ["PYTHONDONTWRITEBYTECODE"]
    sys.pycache_prefix = _prefix
    sys.dont_write_bytecode = False

import pytest
from hypothesis import HealthCheck, Phase, is_hypothesis_test, settings

# A run started in the background by a shell without job control (``cmd &``
# in a script) ignores SIGINT, and every process it starts inherits that: the
# tests that press Ctrl-C on a client or a server they start would see nothing
# happen. Python's own handler here makes the children start with the default.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

# No "explain" phase: on a failing state machine it replays hundreds of
# variants and can take minutes; the shrunk example is what we read.
PHASES = [Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink]

settings.register_profile(
    "dev",
    max_examples=25,
    stateful_step_count=25,
    deadline=None,
    phases=PHASES,
)
settings.register_profile(
    "ci",
    max_examples=600,
    stateful_step_count=100,
    deadline=None,
    phases=PHASES,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))

if "PYTEST_XDIST_WORKER" in os.environ:
    # pytest-xdist's workers (``-n 2``, as the README's test command runs)
    # are started with COLUMNS=80 and LINES=24; a test's own run of the
    # command line then wraps its tables where a plain pytest run does not
    for var in ("COLUMNS", "LINES"):
        os.environ.pop(var, None)


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true",
                     help="also run the tests marked slow (crash, promise, stub, mypy)")
    parser.addoption("--run-soak", action="store_true",
                     help="also run the tests marked soak (more seeds of randomized checks "
                          "CI runs once; implies --run-slow)")


def pytest_configure(config):
    if config.getoption("--run-soak"):
        config.option.run_slow = True
    if os.environ.get("HYPOTHESIS_PROFILE") == "ci" and not config.getoption("--run-slow"):
        raise pytest.UsageError("HYPOTHESIS_PROFILE=ci runs every test: add --run-slow")


_left_out: list = []
_soak_left_out: list = []


def _long(item) -> bool:
    """A test that takes seconds: marked slow, or a Hypothesis test (under
    the ``ci`` profile, hundreds of examples)."""
    if item.get_closest_marker("slow"):
        return True
    cls = getattr(item, "cls", None)
    return is_hypothesis_test(getattr(item, "obj", None)) or (
        cls is not None and issubclass(cls, unittest.TestCase)
        and hasattr(cls, "settings") and hasattr(cls, "runTest"))   # a state machine


def pytest_collection_modifyitems(config, items):
    if not config.getoption("--run-soak"):
        soak = [item for item in items if item.get_closest_marker("soak")]
        if soak:
            items[:] = [item for item in items if not item.get_closest_marker("soak")]
            config.hook.pytest_deselected(items=soak)
            _soak_left_out[:] = soak
    if config.getoption("--run-slow"):
        # the long tests first: the xdist workers (``--dist worksteal``) then
        # share the short ones at the end, instead of one worker finishing a
        # long test alone while the other has nothing left
        items.sort(key=lambda item: not _long(item))
        return
    slow = [item for item in items if item.get_closest_marker("slow")]
    if slow:
        items[:] = [item for item in items if not item.get_closest_marker("slow")]
        config.hook.pytest_deselected(items=slow)
        _left_out[:] = slow


def pytest_terminal_summary(terminalreporter):
    if _soak_left_out:
        terminalreporter.write_line(
            f"{len(_soak_left_out)} soak tests not run (more seeds of randomized checks this "
            "run makes once): pass --run-soak to run them too")
    if _left_out:
        terminalreporter.write_line(
            f"{len(_left_out)} slow tests not run (crash, promise, power cut, serve, mypy...): "
            "pass --run-slow to run them, as CI does")


@pytest.fixture(autouse=True)
def _no_armed_faults():
    """No test sees (or leaves behind) a fault another test armed."""
    # imported here, not at the top: under xdist the controlling process,
    # which runs no test, then starts its workers without importing fastfc
    from fastfc import faults
    faults.clear()
    yield
    faults.clear()


@pytest.fixture
def tmpfs_tmp_path(tmp_path_factory, monkeypatch):
    """A directory of the test's own on tmpfs (/dev/shm; a plain temporary
    directory where there is none), for tests whose storage units would
    otherwise spend most of their time in fsyncs on a busy disk (the fsyncs
    and msyncs are still made: tmpfs completes them at once). Volumes there
    still take the disk's I/O path, as under ``tmp_path``: the check that
    picks the in-memory path is patched for this process (its children, if
    any, see tmpfs, but for the test helpers run as children,
    tests/crash_child.py and tests/failover_child.py, which take the disk's
    path too under FASTFC_TESTS_TMPFS_AS_DISK). A module opts in by
    overriding ``tmp_path`` with it."""
    if not os.path.isdir("/dev/shm") or not os.access("/dev/shm", os.W_OK):
        yield tmp_path_factory.mktemp("tmp")
        return
    import fastfc.storage.volume as volume
    monkeypatch.setattr(volume, "_in_memory_fs", lambda path: False)
    monkeypatch.setenv("FASTFC_TESTS_TMPFS_AS_DISK", "1")
    d = Path(tempfile.mkdtemp(prefix="fastfc-tests-", dir="/dev/shm"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)
