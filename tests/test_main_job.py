"""The main job end to end at a tiny size: `python train.py`, `torchrun` and `accelerate launch` with 2 processes.

Each run's printed plan, progress, checkpoint and TensorBoard events are checked, and the 1- and
2-process runs must end with the same weights (same global samples per step, same schedule).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from acctrain.bytelm import ByteLM, ModelConfig
from tests.support import CPU_ARGS, ROOT, STEPS, TINY, launch, scalars
from tests.support.tiny import rel_diff

pytestmark = pytest.mark.processes  # every test here starts processes

TINY_MODEL = ModelConfig(d_model=32, n_layers=1, n_heads=2, context_len=32)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("job")
    single = subprocess.run(
        [sys.executable, "train.py", f"output_dir={base / 'one'}", *TINY], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert single.returncode == 0, single.stdout + single.stderr
    torchrun = launch(["train.py", f"output_dir={base / 'torchrun'}", *TINY], nproc=2, launcher="torchrun")
    accel = launch(["train.py", f"output_dir={base / 'accelerate'}", *TINY], nproc=2, launcher="accelerate")
    return {"one": (single, base / "one"), "torchrun": (torchrun, base / "torchrun"), "accelerate": (accel, base / "accelerate")}


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    latest = (out / "checkpoints" / "latest").read_text().strip()
    assert latest == f"step-{STEPS:08d}"
    return load_file(out / "checkpoints" / latest / "model.safetensors")


@pytest.mark.parametrize("name,world", [("one", 1), ("torchrun", 2), ("accelerate", 2)])
def test_prints_plan_progress_once_and_result(runs, name, world):
    proc, out = runs[name]
    text = proc.stdout
    assert text.count("run plan: ") == 1
    assert f"world_size={world}," in text
    assert f"accumulation={2 // world}," in text
    # the backend and each local rank's device: gloo or nccl with more than one process
    device = "cpu" if CPU_ARGS or not torch.cuda.is_available() else ",".join(f"cuda:{r}" for r in range(world))
    backend = "none" if world == 1 else ("gloo" if device == "cpu" else "nccl")
    assert f", backend={backend}, devices={device}," in text, text
    for step in range(2, STEPS + 1, 2):
        assert text.count(f"step {step}/{STEPS} |") == 1  # main process only, no duplicated lines
    assert text.count("eval at step 3 |") == 1 and text.count("eval at step 6 |") == 1
    assert "done: train loss" in text and f"step-{STEPS:08d}" in text


@pytest.mark.parametrize("name", ["one", "torchrun", "accelerate"])
def test_checkpoint_holds_plain_unwrapped_state_dict(runs, name):
    weights = final_weights(runs[name][1])
    model = ByteLM(TINY_MODEL)
    assert set(weights) == set(model.state_dict())  # no "module." prefixes, tied weights kept
    model.load_state_dict(weights, strict=True)


@pytest.mark.parametrize("name", ["torchrun", "accelerate"])
def test_two_processes_end_with_the_single_process_weights(runs, name):
    assert rel_diff(final_weights(runs[name][1]), final_weights(runs["one"][1])) < 1e-5


@pytest.mark.parametrize("name", ["one", "torchrun"])
def test_tensorboard_logs_every_step(runs, name):
    out = runs[name][1]
    loss, lr, norm = (scalars(out, f"train/{t}") for t in ("loss", "lr", "grad_norm"))
    assert [s for s, _ in loss] == [s for s, _ in lr] == [s for s, _ in norm] == list(range(1, STEPS + 1))
    # default warmup_linear with no warmup: the update of step k+1 uses lr * (total - k) / total
    assert [v for _, v in lr] == pytest.approx([1e-3 * (STEPS - k) / STEPS for k in range(STEPS)], rel=1e-6)
    assert loss[-1][1] < loss[0][1]  # visibly learning
    assert [s for s, _ in scalars(out, "eval/loss")] == [3, 6]


def test_losses_match_across_world_sizes(runs):
    one = [v for _, v in scalars(runs["one"][1], "train/loss")]
    two = [v for _, v in scalars(runs["torchrun"][1], "train/loss")]
    assert two == pytest.approx(one, rel=1e-5)


def test_config_error_exits_cleanly_without_writing(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "train.py", f"output_dir={out}", "micro_batch_size=3", *TINY[:1]],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "config error: global_batch_size" in proc.stderr
    assert not out.exists()


def test_world_size_that_does_not_divide_the_global_batch(tmp_path):
    out = tmp_path / "out"
    proc = launch(["train.py", f"output_dir={out}", "global_batch_size=4", "micro_batch_size=4", *TINY[:1]],
                  nproc=2, check=False)
    assert proc.returncode != 0
    assert "config error: global_batch_size: 4 is not divisible by micro_batch_size x world size = 4 x 2" in proc.stderr
    assert not out.exists()
