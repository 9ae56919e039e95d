"""When the compute thread waits for decode steps of sessions that recently shared its forward (plain data)."""

from __future__ import annotations

import gc

import pytest

from swarm.server.step_gathering import ACTIVE_FORWARDS, GATHER_FRACTION, MAX_GATHER_WAIT, StepGathering


class Session:
    """Stands in for a session's cache: hashable, weakly referenceable."""


def test_a_lone_session_never_waits():
    gathering, alone = StepGathering(), Session()
    gathering.ran("k", [alone], 0.020, now=10.0)
    assert gathering.wait_for({"k": {alone}}, now=10.001) == 0.0


def test_waits_for_missing_partners_until_all_are_queued():
    gathering = StepGathering()
    a, b, c = Session(), Session(), Session()
    gathering.ran("k", [a, b, c], 0.020, now=10.0)
    assert gathering.wait_for({"k": {a}}, now=10.005) == pytest.approx(GATHER_FRACTION * 0.020)
    assert gathering.wait_for({"k": {a, b, c}}, now=10.006) == 0.0
    assert gathering.wait_for({"other key": {a}}, now=10.006) == 0.0  # no forward of that key yet
    gathering.ran("slow", [a, b], 10.0, now=20.0)
    assert gathering.wait_for({"slow": {a}}, now=20.0) == MAX_GATHER_WAIT


def test_sessions_that_ran_in_separate_forwards_are_gathered():
    """Two groups that drifted apart (the late one ran after the early one) are waited for together."""
    gathering = StepGathering()
    early, late = Session(), Session()
    gathering.ran("k", [early], 0.010, now=10.0)
    gathering.ran("k", [late], 0.010, now=10.012)
    assert gathering.wait_for({"k": {early}}, now=10.015) > 0


def test_sessions_that_stopped_are_not_waited_for():
    gathering = StepGathering()
    active, idle = Session(), Session()
    gathering.ran("k", [active, idle], 0.020, now=10.0)
    gathering.ran("k", [active], 0.020, now=10.0 + ACTIVE_FORWARDS * 0.020)
    later = 10.0 + ACTIVE_FORWARDS * 0.020 + 0.001
    assert gathering.wait_for({"k": {active}}, now=later) == 0.0  # idle: not seen for ACTIVE_FORWARDS forwards


def test_a_closed_session_is_forgotten_and_not_kept_alive():
    gathering = StepGathering()
    active, closed = Session(), Session()
    gathering.ran("k", [active, closed], 0.020, now=10.0)
    assert gathering.wait_for({"k": {active}}, now=10.001) > 0
    del closed
    gc.collect()  # only the gathering referred to it: its cache is freed as usual
    assert gathering.wait_for({"k": {active}}, now=10.001) == 0.0
