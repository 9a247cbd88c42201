"""Launching real multi-process runs from a test.

Launched jobs run on GPUs (NCCL) only where the machine has a GPU for each process of the largest job a
test compares (2); elsewhere on CPU/gloo, asked for explicitly (ACCELERATE_USE_CPU=true in the environment,
which the Engine honours, or `cpu=true`), so that a workstation with one GPU runs the same suite. On a machine
without CUDA nothing is asked: the Engine must form the gloo group by itself (without cpu=True Accelerate would
run the processes as independent jobs).

Every launch runs from the repository root (ROOT). A worker under tests/workers/ is started as a module,
`launch(["-m", "tests.workers.resume_run", ...])`: both torchrun and `accelerate launch` take `-m` the way
`python -m` does, and `python -m` puts the working directory first on sys.path, so the worker imports
`tests.support.tiny` without touching sys.path.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from tests.support.tiny import RUN_ON_CPU

ROOT = Path(__file__).resolve().parents[2]
TESTS = ROOT / "tests"


LAUNCH_ON_CPU = RUN_ON_CPU
CPU_ARGS = ["cpu=true"] if LAUNCH_ON_CPU else []
"""Config overrides for a launched job's command line (train.py key=value)."""


def launch_env(env: dict | None = None) -> dict:
    """The environment of a launched job: unbuffered, one thread per process, CPU/gloo where LAUNCH_ON_CPU."""
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", **(env or {}))
    full_env.pop("ACCELERATE_USE_CPU", None)
    if LAUNCH_ON_CPU:
        full_env["ACCELERATE_USE_CPU"] = "true"  # what `accelerate launch --cpu` sets; the Engine honours it
    return full_env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args: list[str], nproc: int = 2, launcher: str = "torchrun", timeout: int = 300, env: dict | None = None,
           check: bool = True):
    """Start `args` (a script and its arguments, or `-m module` and its arguments) as `nproc` real processes
    from ROOT; fail the test on a non-zero exit."""
    port = str(free_port())
    if launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_addr", "127.0.0.1", "--master_port", port, *args]
    elif launcher == "accelerate":
        # Not `--cpu` for CPU/gloo: it makes accelerate launch start ONE process; the multi-GPU launcher (torchrun)
        # starts nproc and passes ACCELERATE_USE_CPU through from launch_env.
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(nproc),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", port, *args]
    else:
        raise ValueError(launcher)
    proc = subprocess.run(cmd, cwd=ROOT, env=launch_env(env), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0 or not check, (f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout[-4000:]}\n"
                                               f"{first_and_last(proc.stderr)}")
    return proc


def first_and_last(text: str, chars: int = 4000) -> str:
    """The start and the end of a launch's stderr: the rank that failed first writes its traceback first, and
    the other ranks' tracebacks and the launcher's summary that follow would push it out of the tail alone."""
    return text if len(text) <= 2 * chars else f"{text[:chars]}\n[... {len(text) - 2 * chars} characters ...]\n{text[-chars:]}"
