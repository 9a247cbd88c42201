"""Helpers the tests and their workers share; pytest fixtures stay in tests/conftest.py.

- `tests.support.tiny`: the small deterministic models and datasets (import them from there).
- `processes`: launching real multi-process runs (`launch`, `launch_env`, `free_port`, `ROOT`, `TESTS`, ...).
- `events`: what a run logged to TensorBoard (`scalars`, `logged`, `scalar_tags`).
- `runs`: the tiny main job's arguments, checkpoints and results of runs, the gradient runs' reference.
- `recording`: callbacks that record a run (`Losses`, `Recorder`) and `overflow_at`.
- `slurm_cluster`: a one-node SLURM cluster for test_launch.
"""

from tests.support.events import logged, scalar_tags, scalars
from tests.support.processes import CPU_ARGS, LAUNCH_ON_CPU, ROOT, TESTS, free_port, launch, launch_env
from tests.support.recording import Losses, Recorder, overflow_at
from tests.support.runs import CLIP, STEPS, TINY, assert_same_run, ckpts, load_result, reference

__all__ = [
    "CLIP", "CPU_ARGS", "LAUNCH_ON_CPU", "ROOT", "STEPS", "TESTS", "TINY", "Losses", "Recorder", "assert_same_run",
    "ckpts", "free_port", "launch", "launch_env", "load_result", "logged", "overflow_at", "reference", "scalar_tags",
    "scalars",
]
