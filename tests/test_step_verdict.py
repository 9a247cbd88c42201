"""The step's verdict read a step late (no host sync per step on a GPU) gives the run of reading it at once.

With a fused optimizer and no callback inside the step, the Engine skips a non-finite update on the device
and counts the step a step later (acctrain.readback). Everything a user sees must be the same as when the
verdict is read at once: weights, counters, the schedule, the log rows, checkpoints, the NaN policy's
messages and halts, and agreement across processes. Both paths run here on the CPU with fused AdamW.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from acctrain.errors import NonFiniteError
from tests.support import ckpts, launch, logged
from tests.workers import verdict_run

WORKER = ["-m", "tests.workers.verdict_run"]  # run from ROOT as a module (torchrun -m)
TAGS = ("train/loss", "train/grad_norm", "train/lr", "train/skipped_steps", "train/epoch", "eval/loss")
CHECKPOINTS = ["step-00000006", "step-00000008"]  # verdict_run: save_every=3 over 8 steps, keep_last=2


def same_run(a_dir, b_dir):
    """Bitwise equal final weights and checkpoints, and the same logged value for every step and tag."""
    a, b = load_file(a_dir / "result.safetensors"), load_file(b_dir / "result.safetensors")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert ckpts(a_dir) == ckpts(b_dir) == CHECKPOINTS  # not two empty lists: the bytes below are compared
    for step in ckpts(a_dir):
        for name in ("model.safetensors", "optimizer.safetensors"):
            assert (a_dir / "checkpoints" / step / name).read_bytes() == (b_dir / "checkpoints" / step / name).read_bytes()
    for tag in TAGS:  # repr: a NaN loss equals a NaN loss
        assert {k: repr(v) for k, v in logged(a_dir, tag).items()} == {k: repr(v) for k, v in logged(b_dir, tag).items()}, tag


@pytest.mark.parametrize("nan_at", [None, 3], ids=["finite", "nan-at-step-3"])
def test_verdict_on_device_is_the_run_of_the_synchronous_verdict(tmp_path, nan_at):
    late = verdict_run.run(str(tmp_path / "late"), on_device=True, nan_at=nan_at)
    now = verdict_run.run(str(tmp_path / "now"), on_device=False, nan_at=nan_at)
    assert late["verdict_on_device"] and not now["verdict_on_device"]
    assert late["state"] == now["state"]
    assert late["state"]["skipped_steps"] == (nan_at is not None) and late["state"]["schedule_step"] == 8 - (nan_at is not None)
    same_run(tmp_path / "late", tmp_path / "now")
    if nan_at:
        assert logged(tmp_path / "late", "train/skipped_steps") == {s: float(s >= 3) for s in range(1, 9)}


def test_nan_policy_halt_on_the_device_path_names_the_step_and_applies_nothing_after_it(tmp_path, capsys):
    with pytest.raises(NonFiniteError, match=r"non-finite loss at optimizer step 5 .*nan_policy=halt.*step-00000003"):
        verdict_run.run(str(tmp_path), on_device=True, nan_at=5, nan_policy="halt")
    assert ckpts(tmp_path) == ["step-00000003"]


@pytest.mark.processes
def test_two_processes_agree_on_the_device_path(tmp_path):
    for name, on_device in (("late", True), ("now", False)):
        launch([*WORKER, json.dumps({"out_dir": str(tmp_path / name), "on_device": on_device, "nan_at": 3})], nproc=2)
    late, now = (json.loads((tmp_path / n / "result.json").read_text()) for n in ("late", "now"))
    assert late["world_size"] == now["world_size"] == 2
    assert late["verdict_on_device"] and late["state"] == now["state"] and late["state"]["skipped_steps"] == 1
    same_run(tmp_path / "late", tmp_path / "now")
