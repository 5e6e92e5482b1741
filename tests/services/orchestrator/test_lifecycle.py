"""The run life cycle: which status changes are allowed."""

from __future__ import annotations

import pytest

from services.orchestrator.runs import InvalidTransition, RunStatus, check_transition


def test_a_queued_run_can_fail_before_its_first_step():
    """A run whose delegation is refused before it starts is marked failed, not left queued forever."""
    check_transition(RunStatus.QUEUED, RunStatus.FAILED)


@pytest.mark.parametrize("final", [RunStatus.SUCCEEDED, RunStatus.FAILED, RunStatus.CANCELLED])
def test_finished_runs_never_change(final):
    """Terminal statuses are final."""
    for other in RunStatus:
        if other != final:
            with pytest.raises(InvalidTransition):
                check_transition(final, other)
