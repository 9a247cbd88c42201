"""Pytest fixtures for the whole suite. Shared helpers (launching runs, tiny models, TensorBoard reads) are in
tests/support/."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Accelerate keeps process-wide singletons; each in-process test starts from a clean one."""
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture(scope="module")
def six(tmp_path_factory):
    """An uninterrupted run of tests/workers/resume_run.py to step 6 with checkpoints at 3 and 6 (tests work on
    copies of its directory: tests.support.runs.copy_of)."""
    from tests.workers import resume_run

    out = tmp_path_factory.mktemp("six")
    return out, resume_run.run(str(out), steps=6, save_every=3)
