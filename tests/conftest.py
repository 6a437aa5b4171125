"""Shared test configuration.

Hypothesis profiles are chosen by the ``HYPOTHESIS_PROFILE`` environment
variable: ``dev`` (quick, the default) or ``ci`` (thorough; ``.ci/run`` sets
it). Neither has a deadline: the machine is shared and noisy, and a slow
example is not a wrong one.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, Phase, settings

from fastfc import faults

# No "explain" phase: on a failing state machine it replays hundreds of
# variants and can take minutes; the shrunk example is what we read.
PHASES = [Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink]

settings.register_profile(
    "dev",
    max_examples=40,
    stateful_step_count=40,
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


@pytest.fixture(autouse=True)
def _no_armed_faults():
    """No test sees (or leaves behind) a fault another test armed."""
    faults.clear()
    yield
    faults.clear()
