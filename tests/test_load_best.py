"""`load_best_at_end`: the best checkpoint's weights in the model after fit, on 1 and 2 processes; refused at start-up
without `keep_best` or without eval data."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from acctrain import ConfigError, TrainConfig
from tests.support import ckpts, launch, logged
from tests.workers import ema_run

# Evaluate and save every 2 steps, keep the newest and the best by the *highest* eval loss: the loss falls, so the
# best checkpoint is an early one, not the last, whose weights the model would hold anyway.
BEST = {"steps": 10, "save_every": 2, "eval_every": 2, "keep_last": 1, "keep_best": "eval/loss",
        "keep_best_mode": "max", "load_best_at_end": True}


def check_best(out, params: dict) -> None:
    losses = logged(out, "eval/loss")
    best = f"step-{max(losses, key=losses.get):08d}"
    assert ckpts(out) == sorted([best, "step-00000010"]) and best != "step-00000010"
    saved = load_file(out / "checkpoints" / best / "model.safetensors")
    assert params.keys() == saved.keys()
    assert all(torch.equal(params[n], saved[n]) for n in saved)
    last = load_file(out / "checkpoints" / "step-00000010" / "model.safetensors")  # the end of training, kept
    assert not all(torch.equal(last[n], saved[n]) for n in saved)


def test_one_process_ends_with_the_best_checkpoints_weights(tmp_path):
    result = ema_run.run(str(tmp_path), **BEST)
    assert result["state"]["step"] == 10  # the step counter (and the optimizer) stay those of the end
    params = {k[len("param."):]: v for k, v in result["tensors"].items() if k.startswith("param.")}
    check_best(tmp_path, params)
    losses = logged(tmp_path, "eval/loss")
    assert result["best_checkpoint"].endswith(f"step-{max(losses, key=losses.get):08d}")


@pytest.mark.processes
def test_two_processes_end_with_the_best_checkpoints_weights_on_every_rank(tmp_path):
    launch(["-m", "tests.workers.ema_run", json.dumps({"out_dir": str(tmp_path), **BEST})], nproc=2)
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["num_processes"] == result["world_size_env"] == 2
    for rank in (0, 1):
        tensors = load_file(tmp_path / f"result-rank{rank}.safetensors")
        check_best(tmp_path, {k[len("param."):]: v for k, v in tensors.items() if k.startswith("param.")})


@pytest.mark.processes
def test_fsdp_ends_with_the_best_checkpoints_weights_on_every_rank(tmp_path):
    """Under FSDP the checkpoints are sharded: the best one's shards are loaded into every rank's shards."""
    from acctrain.checkpoint.sharded import full_state

    launch(["-m", "tests.workers.ema_run", json.dumps({"out_dir": str(tmp_path), "fsdp": True, **BEST})], nproc=2)
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["num_processes"] == result["world_size_env"] == 2
    losses = logged(tmp_path, "eval/loss")
    best = f"step-{max(losses, key=losses.get):08d}"
    assert ckpts(tmp_path) == sorted([best, "step-00000010"]) and best != "step-00000010"
    saved, last = full_state(tmp_path / "checkpoints" / best), full_state(tmp_path / "checkpoints" / "step-00000010")
    assert not all(torch.equal(last[n], saved[n]) for n in saved)
    for rank in (0, 1):
        tensors = load_file(tmp_path / f"result-rank{rank}.safetensors")
        params = {k[len("param."):]: v for k, v in tensors.items() if k.startswith("param.")}
        assert params.keys() == saved.keys() and all(torch.equal(params[n], saved[n]) for n in saved)


def test_load_best_at_end_is_refused_without_keep_best_or_eval_data(tmp_path):
    with pytest.raises(ConfigError, match="load_best_at_end: needs keep_best"):
        TrainConfig(output_dir=str(tmp_path), load_best_at_end=True)
    with pytest.raises(ConfigError, match="load_best_at_end: the best checkpoint is chosen by evaluations"):
        ema_run.run(str(tmp_path / "run"), with_eval=False, keep_best="eval/loss", load_best_at_end=True)
    assert not (tmp_path / "run").exists()  # refused before anything is written


def test_load_best_at_end_by_an_ema_metric_is_refused_with_the_export_to_use(tmp_path):
    with pytest.raises(ConfigError, match=r"load_best_at_end: would load the trained weights of the checkpoint whose "
                                          r"EMA scored best by eval_ema/loss.*acctrain export RUN_DIR OUT --ema"):
        TrainConfig(output_dir=str(tmp_path), keep_best="eval_ema/loss", load_best_at_end=True)
