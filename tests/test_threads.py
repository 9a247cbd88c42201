"""CPU threads under a launcher: `accelerate launch` sets OMP_NUM_THREADS=1 even for one process; that default
is the launcher's, not the user's, so the Engine uses the cores the process has; a value the user sets is kept."""

import os
import subprocess
import sys

import pytest

from tests.support import ROOT

pytestmark = pytest.mark.processes

SCRIPT = "import os, torch; from acctrain import runtime; print('threads', runtime.cpu_threads(0), os.environ['OMP_NUM_THREADS'])"


def threads_under_accelerate_launch(tmp_path, **env) -> tuple[int, str]:
    script = tmp_path / "threads.py"
    script.write_text(SCRIPT)
    launcher = os.path.join(os.path.dirname(sys.executable), "accelerate")
    environ = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"} | env
    out = subprocess.run([launcher, "launch", "--config_file", str(ROOT / "launch" / "single_process.yaml"), str(script)],
                         cwd=tmp_path, env=environ, capture_output=True, text=True, timeout=120, check=True)
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("threads")][-1]
    _, threads, omp = line.split()
    return int(threads), omp


def test_the_launchers_default_of_one_thread_is_not_taken(tmp_path):
    threads, omp = threads_under_accelerate_launch(tmp_path)
    assert omp == "1"  # what accelerate launch set
    assert threads == len(os.sched_getaffinity(0)) >= 1


def test_a_thread_count_the_user_sets_is_kept(tmp_path):
    assert threads_under_accelerate_launch(tmp_path, OMP_NUM_THREADS="1") == (1, "1")
