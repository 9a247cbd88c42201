"""Pytest fixtures for the whole suite. Shared helpers (launching runs, tiny models, TensorBoard reads) are in
tests/support/.

The `processes` marker (pyproject.toml) is kept honest here: a test that starts a process from test code
(tests/, tests/support/: torchrun, accelerate launch, `python -c`, bash, SLURM's commands) without the marker
fails, naming the command, so the in-process lane `pytest -m "not processes"` stays in-process. Processes that
libraries start for themselves (torch's compile workers, Accelerate's nvidia-smi) do not count.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

TESTS = os.path.dirname(os.path.realpath(__file__)) + os.sep
_SPAWNING = {"subprocess.Popen", "os.system", "os.posix_spawn", "os.spawn"}
_started: list[str] = []
"""The commands test code started during the current test phase (setup or call)."""


def _started_by_test_code() -> bool:
    """Whether the first caller outside the subprocess module is a file under tests/."""
    frame = sys._getframe(2)  # the hook itself and _audit are frames 0 and 1
    while frame is not None and frame.f_code.co_filename == subprocess.__file__:
        frame = frame.f_back
    return frame is not None and os.path.realpath(frame.f_code.co_filename).startswith(TESTS)


def _audit(event: str, args: tuple) -> None:
    if event in _SPAWNING and _started_by_test_code():
        argv = args[1] if event == "subprocess.Popen" else args[-2] if event == "os.posix_spawn" else args
        command = " ".join(map(str, argv)) if isinstance(argv, (list, tuple)) else str(argv)
        _started.append(command[:300])


sys.addaudithook(_audit)  # for the whole session: audit hooks cannot be removed


def _check_processes_marker(item: pytest.Item, phase: str) -> None:
    if _started and item.get_closest_marker("processes") is None:
        started = "\n  ".join(_started[:3])
        pytest.fail(f"{item.nodeid} started {len(_started)} process(es) during {phase} but is not marked "
                    f"`processes` (add @pytest.mark.processes, or pytestmark = pytest.mark.processes for a file "
                    f"of such tests):\n  {started}", pytrace=False)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item):
    _started.clear()  # module fixtures set up here launch for the first test that asks for them
    result = yield
    _check_processes_marker(item, "setup")
    return result


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    _started.clear()
    result = yield
    _check_processes_marker(item, "the test")
    return result


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
