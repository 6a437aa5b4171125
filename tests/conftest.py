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
    # pytest-xdist's workers (``-n 3``, as the README's test command runs)
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
        items[:] = _in_running_order(items)
        return
    # (the quick loop keeps the collection order: ordered as above it took
    # 65.6-67.1 s against 60.5-63.5 s, back to back on a quiet machine)
    slow = [item for item in items if item.get_closest_marker("slow")]
    if slow:
        items[:] = [item for item in items if not item.get_closest_marker("slow")]
        config.hook.pytest_deselected(items=slow)
        _left_out[:] = slow


# Seconds each of the longest tests takes (under the ``ci`` profile, --run-slow,
# -n 2, on the development machine; parametrized tests by their longest case).
# Only the order of the run uses them (see _in_running_order); a test not
# named here counts as LONG if it is _long() and as nothing otherwise.
KNOWN_SECONDS = {
    "test_model.py::TestFlashCopyModel::runTest": 79,
    "test_gm_model.py::TestGlobalMirrorModel::runTest": 44,
    "test_serve_points.py::TestServedPointsModel::runTest": 12,
    "test_target_points.py::TestTargetPointsModel::runTest": 10,
    "test_remote_powercut.py::test_power_units_survive_more_cuts": 9,
    "test_cascade.py::TestCascadeModel::runTest": 88,
    "test_serve_sessions.py::test_sessions_run_in_the_server_and_survive_restarts": 35,
    "test_cli_bench.py::test_serve_gm_suite_quick_end_to_end": 29,
    "test_powercut.py::test_power_durability_survives_more_cuts": 24,
    "test_remote_ray.py": 78,          # its tests share one Ray cluster (per worker)
    "test_remote_nodes.py::test_two_nodes_site_a_lost_recovered_from_site_b_then_the_head_lost": 45,
    "test_mypy.py::test_mypy_finds_no_errors_in_the_package": 21,
    "test_gm_sparse.py::test_a_sparse_session_equals_one_that_steps_every_triplet": 20,
    "test_serve_sessions.py::test_without_a_server": 18,
    "test_serve_copies.py::test_a_sessions_pairs_are_its_loops_alone": 16,
    "test_bitmap.py::TestBitmapMachine::runTest": 13,
    "test_remote_powercut.py::test_power_units_survive_more_live_cuts": 28,
    "test_cli_bench.py::test_the_runner_quick_on_one_case": 11,
    "test_cli_bench.py::test_serve_suite_quick_end_to_end": 11,
    "test_powercut.py::test_power_durability_survives_cuts": 11,
    "test_gm_batched.py::test_batched_cg_equals_the_per_relationship_path": 10,
    "test_resolution.py::test_resolve_is_the_plain_rule": 10,
    "test_flash_batches.py::test_batches_read_back_as_the_same_rows_as_single_saves": 8,
    "test_serve_copies.py::test_copy_rate_holds_and_the_next_server_finishes": 8,
    "test_serve_points.py::test_point_verbs_run_in_a_running_server": 7,
    "test_serve_points.py::TestServedPointsModel::runTest": 12,
    "test_serve_copies.py::test_without_a_server_commands_say_what_moves_the_copy_on": 8,
    "test_stub.py::test_core_stub_matches_the_extension": 8,
    "test_serve_concurrency.py::test_lookers_and_changers_run_while_formcg_runs_and_ctrl_c_stops_it": 7,
    "test_powercut.py::test_power_survives_cuts_on_every_path": 7,
    "test_points_powercut.py::test_durable_points_survive_a_power_cut_before_every_sync": 18,
    "test_points_powercut.py::test_durable_points_survive_a_power_cut_at_any_sync": 4,
    "test_full_filesystem.py::test_scattered_thin_writes_with_readers_until_full_never_sigbus": 6,
    "test_serve_copies.py::test_global_copy_drains_and_keeps_draining": 6,
    "test_resolution.py::test_the_action_ends_every_c_on_one_cg": 6,
    "test_serve_hostile.py::test_ctrl_c_of_a_forwarded_formcg_stops_its_loop_in_the_server": 6,
    "test_control.py::test_the_fastfc_command_itself_forwards": 6,
    "test_crash.py::test_kill_at_random_moments": 5,
    "test_serve_core_batch.py::test_random_streams_get_the_same_replies_bytes_and_counts_either_way": 4,
    "test_serve_block_status.py::test_an_incremental_backup_under_writes_races_none": 11,
    "test_promise.py::test_promise_under_random_faults": 10,     # each, under the ci profile
    "test_guide.py::test_walkthrough": 6,                        # each page's walk-through
}
LONG = 2.0
#: the modules that run Ray clusters: one worker runs them all, one after
#: another (two clusters at once on two cores: a detached unit of the
#: two-node test's cluster outlived its lost head by more than 60 s, twice
#: in three CI runs with three workers; never when run alone)
RAY_MODULES = ("test_remote_ray.py", "test_remote_nodes.py")


def _estimate(item) -> tuple[str, float]:
    """The group ``item`` runs in (its module for the Ray tests, else
    itself) and its seconds."""
    path, _, name = item.nodeid.partition("::")
    mod = path.rsplit("/", 1)[-1]
    if mod in RAY_MODULES:
        return "ray", KNOWN_SECONDS.get(mod, KNOWN_SECONDS.get(f"{mod}::{name}", LONG))
    if mod in KNOWN_SECONDS:
        return mod, KNOWN_SECONDS[mod]
    base = f"{mod}::{name.split('[', 1)[0]}"
    return item.nodeid, KNOWN_SECONDS.get(base, LONG if _long(item) else 0.0)


def _in_running_order(items):
    """The longest tests first, shared so that every xdist worker starts on
    its share of them. ``--dist worksteal`` (addopts) hands worker k the k-th
    of n equal slices of the collection, each run from its front, and an
    idle worker takes the back half of another's queue: each slice is its
    long tests, longest first (dealt to the slice with the least seconds so
    far), then short ones; a long test then never starts late and stretches
    the run after the other worker is done. Tests of one group (the Ray
    tests: one cluster per worker that runs them) stay together."""
    groups: dict[str, list] = {}
    secs: dict[str, float] = {}
    for item in items:
        key, s = _estimate(item)
        groups.setdefault(key, []).append(item)
        secs[key] = (secs.get(key, 0.0) + s if key == "ray" and item.nodeid.startswith(
            "tests/test_remote_nodes") else max(secs.get(key, 0.0), s))
    order = sorted(groups, key=lambda k: -secs[k])          # stable: collection order
    n = max(1, int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
    size = [len(items) // n + (1 if k < len(items) % n else 0) for k in range(n)]
    slices: list[list] = [[] for _ in range(n)]
    load = [0.0] * n
    for key in order:
        group = groups[key]
        room = [k for k in range(n) if len(slices[k]) + len(group) <= size[k]] or range(n)
        k = min(room, key=lambda k: (load[k], len(slices[k])))
        slices[k].extend(group)
        load[k] += secs[key]
    return [item for sl in slices for item in sl]


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
