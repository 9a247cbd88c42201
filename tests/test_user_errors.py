"""Errors from the user's model, loss and data come before anything is written, and name the fix; predict names
`forward=`; evaluate() outside fit only evaluates."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from torch import nn

from acctrain import Engine, TrainConfig
from acctrain.callbacks import EarlyStopping
from acctrain.data import DataPlan
from acctrain.ema import EMA
from acctrain.preflight import first_micro_batches
from tests.support import launch, logged
from tests.support.tiny import RUN_ON_CPU, VarLenTokens, collate, make_model, token_loss


def engine_for(out, train, steps: int = 2, eval_data=None, **kwargs) -> Engine:
    config = {k: kwargs.pop(k) for k in list(kwargs) if k in TrainConfig.__dataclass_fields__}
    cfg = TrainConfig(output_dir=str(out), global_batch_size=8, micro_batch_size=2, max_steps=steps, cpu=RUN_ON_CPU,
                      **config)
    return Engine(make_model(0), cfg, train, eval_data, **kwargs)


# ------------------------------------------------------------------------------------------- 6. before anything


@pytest.mark.parametrize("case, error, message", [
    ("no loss", TypeError, "TinyTokenModel.forward() got an unexpected keyword argument 'labels'"),
    ("loss returns a dict", TypeError, "loss_fn must return a tensor"),
    ("ragged samples", RuntimeError, "stack expects each tensor to be equal size"),
    ("dataset raises", KeyError, "'no such row'"),
])
def test_the_first_micro_batch_fails_before_anything_is_written(tmp_path, case, error, message):
    out = tmp_path / "run"
    kwargs = {"no loss": {"collate_fn": collate}, "loss returns a dict": {"collate_fn": collate,
              "loss_fn": lambda model, batch: {"loss": 1.0}}, "ragged samples": {"loss_fn": token_loss},
              "dataset raises": {"loss_fn": token_loss, "collate_fn": collate}}[case]
    engine = engine_for(out, Raising(26) if case == "dataset raises" else VarLenTokens(26), **kwargs)
    first = next(iter(engine.plan.rank_windows(0, 0, 0, 1))).micro_batches[0].indices
    with pytest.raises(error) as err:
        engine.fit()
    assert message in str(err.value)
    said = str(err.value) + "".join(getattr(err.value, "__notes__", []))  # the error as raised, and acctrain's note
    assert f"{first}" in said and "before anything was written" in said
    assert not out.exists()  # no output_dir, no .lock, no TensorBoard files
    if case == "ragged samples":
        assert "collate_fn=acctrain.hf_data.PadCollator(pad_token_id)" in said
    if case in ("no loss", "loss returns a dict"):
        assert "failed in the model's forward or the loss" in said


class Raising(VarLenTokens):
    """A dataset whose reads fail."""

    def __getitem__(self, i):
        raise KeyError("no such row")


class OneOddSample(torch.utils.data.Dataset):
    """Rows of 6 tokens, but row `odd` has 3."""

    def __init__(self, n: int, odd: int):
        self.n, self.odd = n, odd

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        ids = torch.arange(3 if i == self.odd else 6) % 32
        return {"input_ids": ids, "labels": ids}


@pytest.mark.parametrize("num_workers", [0, 1])
def test_a_sample_that_does_not_collate_later_in_training_is_named_by_its_index(tmp_path, num_workers):
    engine = engine_for(tmp_path / "run", OneOddSample(32, odd=0), steps=4, loss_fn=token_loss,
                        num_workers=num_workers)
    step, micro = next((k, mb) for k in range(4) for mb in engine.plan.split(engine.plan.window(0, k), 0)
                       if 0 in mb.indices)
    assert step > 0 or micro.indices != next(iter(engine.plan.rank_windows(0, 0, 0, 1))).micro_batches[0].indices
    with pytest.raises(RuntimeError) as err:
        engine.fit()
    notes = "".join(err.value.__notes__)
    assert (f"acctrain: reading (dataset[i]) or collating (collate_fn) the samples at indices {micro.indices} of "
            f"train_data (optimizer step {step + 1}) failed. Samples of different sizes need a collate_fn= that pads "
            "them") in notes


def test_eval_samples_that_do_not_collate_are_found_before_anything_is_written(tmp_path):
    out = tmp_path / "run"
    engine = engine_for(out, OneOddSample(32, odd=-1), eval_data=OneOddSample(8, odd=1), loss_fn=token_loss)
    with pytest.raises(RuntimeError) as err:
        engine.fit()
    assert "the samples at indices [0, 1] of eval_data (its first micro-batch" in "".join(err.value.__notes__)
    assert not out.exists()


class Drawing(torch.utils.data.Dataset):
    """Samples whose reading draws from every RNG (an augmentation)."""

    def __len__(self):
        return 16

    def __getitem__(self, i):
        noise = torch.rand(1).item() + np.random.rand() + random.random()
        return torch.full((4,), float(i) + 0 * noise)


def test_the_first_micro_batch_leaves_the_weights_statistics_rngs_and_mode_as_they_were(tmp_path):
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Dropout(0.5), nn.Linear(4, 1))
    cfg = TrainConfig(output_dir=str(tmp_path / "run"), global_batch_size=4, micro_batch_size=2, max_steps=1,
                      cpu=RUN_ON_CPU)
    engine = Engine(model, cfg, Drawing(), loss_fn=lambda m, b: m(b).square().mean())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rngs = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    first_micro_batches(engine.accelerator, engine.unwrapped_model, engine.train_data, Drawing(),
                        DataPlan.for_run(engine.train_data, None, cfg, 1), None, engine._loss_of)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # BatchNorm's running stats too
    assert torch.equal(rngs[0], torch.get_rng_state()) and (rngs[1] == np.random.get_state()[1]).all()
    assert rngs[2] == random.getstate() and model.training


@pytest.mark.processes
@pytest.mark.parametrize("fault", ["collate", "forward"])
def test_a_first_micro_batch_failing_on_one_rank_stops_every_rank_before_anything_is_written(tmp_path, fault):
    out = tmp_path / "run"
    proc = launch(["-m", "tests.workers.first_batch_run", json.dumps({"out_dir": str(out), "rank": 1,
                                                                      "fault": fault})], check=False, timeout=180)
    assert proc.returncode != 0
    text = proc.stdout + proc.stderr
    assert "error on rank 1: RuntimeError" in text
    assert "error on rank 0: DataError: the first micro-batch failed " \
        f"({'reading train_data' if fault == 'collate' else 'the forward and loss on train_data'}) on rank(s) [1]" in text
    assert not out.exists()


# ------------------------------------------------------------------------------------------- 7. predict


class Pairs(torch.utils.data.Dataset):
    def __len__(self):
        return 8

    def __getitem__(self, i):
        return {"x": torch.full((4,), float(i)), "y": torch.tensor(float(i))}


def test_predict_on_dicts_the_model_does_not_take_names_forward(tmp_path):
    model = nn.Linear(4, 1)
    cfg = TrainConfig(output_dir=str(tmp_path / "run"), global_batch_size=4, micro_batch_size=4, max_steps=1,
                      cpu=RUN_ON_CPU)
    engine = Engine(model, cfg, Pairs(), loss_fn=lambda m, b: (m(b["x"])[:, 0] - b["y"]).square().mean())
    with pytest.raises(TypeError) as err:
        engine.predict(Pairs())
    assert str(err.value).startswith("predict called model(**batch) with the keys ['x', 'y'] (labels left out), "
                                     "which Linear.forward(input: torch.Tensor) -> torch.Tensor does not take")
    assert "pass forward= to predict" in str(err.value)
    got = engine.predict(Pairs(), forward=lambda m, b: m(b["x"]))
    assert torch.allclose(got, model(torch.stack([Pairs()[i]["x"] for i in range(8)])), atol=1e-6)


# ------------------------------------------------------------------------------------------- 8. evaluate after fit


def test_evaluate_after_fit_evaluates_without_firing_the_training_watchers(tmp_path, capsys):
    out = tmp_path / "run"
    stopper, ema = EarlyStopping(patience=1, min_delta=10.0), EMA(0.5)  # stops at its second evaluation
    engine = engine_for(out, VarLenTokens(26), steps=12, eval_data=VarLenTokens(6), loss_fn=token_loss,
                        collate_fn=collate, callbacks=[stopper, ema], eval_every=2, scheduler="reduce_on_plateau")
    engine.fit()
    schedule = json.dumps(engine.schedule.state_dict(), sort_keys=True)
    assert capsys.readouterr().out.count("early stopping at step") == 1
    stopped_at, points = engine.state.step, logged(out, "eval/loss")
    again = engine.evaluate()
    printed = capsys.readouterr().out
    assert "early stopping" not in printed and f"evaluated at step {stopped_at} (outside fit: not logged)" in printed
    assert set(again) == {"eval/loss", "eval_ema/loss"} and again["eval/loss"] == pytest.approx(points[stopped_at])
    assert logged(out, "eval/loss") == points and stopper.wait == 1  # no second point, no second count
    assert json.dumps(engine.schedule.state_dict(), sort_keys=True) == schedule  # reduce_on_plateau not stepped


def test_a_refused_fsdp_engine_leaves_the_next_engine_of_the_process_as_configured(tmp_path):
    """Accelerate sets ACCELERATE_USE_FSDP for an Accelerator given an FSDP plugin: a later Engine of the process
    (a notebook) must not read it as the launcher's FSDP config."""
    from acctrain import ConfigError, Engine, TrainConfig
    from tests.support.tiny import VarLenTokens, collate, make_model, token_loss

    def engine(fsdp: bool):
        cfg = TrainConfig(output_dir=str(tmp_path / f"fsdp-{fsdp}"), global_batch_size=8, micro_batch_size=4,
                          max_steps=1, cpu=True, fsdp=fsdp)
        return Engine(make_model(), cfg, VarLenTokens(16), loss_fn=token_loss, collate_fn=collate)

    with pytest.raises(ConfigError, match="fsdp=true needs a distributed launch"):
        engine(fsdp=True)
    assert engine(fsdp=False).fit()["train/loss"] > 0
