"""The fastai toolkit: LR finder, freezing, BnFreeze, discriminative lrs, recipes, callbacks that cancel."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from torch import nn

from acctrain import Callback, Engine, TrainConfig
from acctrain.callbacks import BnFreeze, CancelEpoch, CancelFit, CancelStep, EarlyStopping, ShortEpoch
from acctrain.errors import ConfigError
from acctrain.summary import model_summary
from tests.support import launch
from tests.support.tiny import VarLenTokens, collate, make_model, token_loss
from tests.workers.toolkit_run import OnRank, Steps


def engine(tmp_path, model=None, callbacks=(), data=None, **config):
    cfg = TrainConfig(output_dir=str(tmp_path), global_batch_size=8, micro_batch_size=4, log_every=100,
                      **{"epochs": 2, **config})
    return Engine(model or make_model(0), cfg, data or VarLenTokens(32), VarLenTokens(8), loss_fn=token_loss,
                  collate_fn=collate, callbacks=list(callbacks))


class GroupLrs(Callback):
    """Every param group's lr when the optimizer steps."""

    def __init__(self):
        self.lrs = []

    def before_optimizer_step(self, engine):
        self.lrs.append({g.get("name"): g["lr"] for g in engine.optimizer.param_groups})


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ----------------------------------------------------------------------------------------- LR finder


def test_lr_find_follows_the_exponential_and_restores_everything(tmp_path):
    e = engine(tmp_path, epochs=5)
    before, opt_before = snapshot(e.unwrapped_model), json.dumps(e.torch_optimizer.state_dict(), default=str)
    torch.manual_seed(123)
    suggestions = e.lr_find(num_it=20, stop_div=False)
    after_draw = torch.rand(3)
    torch.manual_seed(123)
    assert torch.equal(after_draw, torch.rand(3))  # the global RNG is restored too
    after = snapshot(e.unwrapped_model)
    assert all(torch.equal(before[k], after[k]) for k in before)  # bitwise unchanged
    assert json.dumps(e.torch_optimizer.state_dict(), default=str) == opt_before
    assert e.state.step == 0
    lrs, losses = e.lr_find_result
    assert lrs == pytest.approx([1e-7 * (10 / 1e-7) ** (i / 20) for i in range(20)], rel=1e-12)
    for value in suggestions:
        assert min(lrs) <= value <= max(lrs) or value == pytest.approx(min(lrs) / 10)  # minimum() is lr_min/10
    assert suggestions._fields == ("valley", "slide", "minimum", "steep")
    assert (tmp_path / "lr_find.png").read_bytes()[:4] == b"\x89PNG"


def test_lr_find_stops_when_the_loss_diverges(tmp_path):
    e = engine(tmp_path, epochs=20)
    e.lr_find(num_it=100, end_lr=1e4)
    lrs, losses = e.lr_find_result
    assert len(lrs) < 100
    best = min(losses[:-1])
    assert not math.isfinite(losses[-1]) or losses[-1] > 4 * best
    assert all(loss <= 4 * min(losses[: i + 1]) for i, loss in enumerate(losses[:-1]))


# ----------------------------------------------------------------------------------------- freezing


def test_frozen_parameters_stay_bitwise_unchanged(tmp_path):
    e = engine(tmp_path / "a", weight_decay=0.1, max_steps=4)
    e.fit()  # AdamW now holds momentum for every parameter
    frozen = e.freeze(["embed", "hidden"])
    assert frozen == ["embed.weight", "hidden.bias", "hidden.weight"]
    before = snapshot(e.unwrapped_model)
    e.fit_one_cycle(1, 1e-2, output_dir=str(tmp_path / "b"))
    after = snapshot(e.unwrapped_model)
    for name in before:
        assert torch.equal(before[name], after[name]) == (name in frozen), name
    e.unfreeze()
    e.fit_one_cycle(1, 1e-2, output_dir=str(tmp_path / "c"))
    assert not torch.equal(after["embed.weight"], e.unwrapped_model.embed.weight)


def test_discriminative_groups_get_their_multiplied_lrs(tmp_path):
    lrs = GroupLrs()
    e = engine(tmp_path, callbacks=[lrs], param_groups={"embed": 0.1, "head": 2.0}, scheduler="warmup_linear",
               warmup_steps=2)
    e.fit()
    assert {g["name"] for g in e.optimizer.param_groups} == {"embed", "head", "head/no_decay", "default",
                                                              "default/no_decay"}
    for step in lrs.lrs[1:]:
        assert step["embed"] == pytest.approx(0.1 * step["default"], rel=1e-12)
        assert step["head"] == step["head/no_decay"] == pytest.approx(2.0 * step["default"], rel=1e-12)


class BnModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(32, 16)
        self.body = nn.Sequential(nn.Linear(16, 16), nn.BatchNorm1d(16))
        self.head = nn.Sequential(nn.Linear(16, 16), nn.BatchNorm1d(16), nn.Linear(16, 32))

    def forward(self, ids):
        x = self.embed(ids)
        b, t, d = x.shape
        x = self.body(x.reshape(b * t, d))
        return self.head(x).reshape(b, t, -1)


@pytest.mark.parametrize("bn_freeze", [True, False])
def test_bn_freeze_keeps_frozen_running_statistics(tmp_path, bn_freeze):
    torch.manual_seed(0)
    e = engine(tmp_path, model=BnModel(), callbacks=[BnFreeze()] if bn_freeze else [])
    e.freeze(["embed", "body"])
    body_bn, head_bn = e.unwrapped_model.body[1], e.unwrapped_model.head[1]
    body_stats = (body_bn.running_mean.clone(), body_bn.running_var.clone())
    head_stats = head_bn.running_mean.clone()
    head_weight = e.unwrapped_model.head[0].weight.detach().clone()
    e.fit()
    assert torch.equal(body_bn.running_mean, body_stats[0]) == bn_freeze
    assert torch.equal(body_bn.running_var, body_stats[1]) == bn_freeze
    assert not torch.equal(head_bn.running_mean, head_stats)  # unfrozen layers go on learning
    assert not torch.equal(e.unwrapped_model.head[0].weight, head_weight)


# ----------------------------------------------------------------------------------------- recipes


def test_fine_tune_runs_two_phases_with_fastai_lrs(tmp_path):
    lrs = GroupLrs()
    model = make_model(0)
    e = engine(tmp_path, model=model, callbacks=[lrs], param_groups={"embed": 1.0, "hidden": 1.0, "norm": 1.0})
    body_before = {k: v.clone() for k, v in snapshot(model).items() if not k.startswith("head")}
    base_lr, steps = 1e-2, 4  # 32 samples / 8 per step: 4 steps per epoch
    e.fine_tune(1, base_lr=base_lr, freeze_epochs=1, lr_mult=100, body=["embed", "hidden", "norm"])
    phase1, phase2 = lrs.lrs[:steps], lrs.lrs[steps:]
    assert len(phase2) == steps
    # phase 1: one cycle at base_lr, pct_start 0.99, div 25: starts at base_lr/25 and climbs
    assert phase1[0]["default"] == pytest.approx(base_lr / 25, rel=1e-9)
    assert phase1[-1]["default"] > phase1[0]["default"]
    # phase 2: one cycle at base_lr/2 for the head and base_lr/2/lr_mult for the body, div 5
    assert phase2[0]["default"] == pytest.approx(base_lr / 2 / 5, rel=1e-9)
    assert phase2[0]["embed"] == pytest.approx(base_lr / 2 / 100 / 5, rel=1e-9)
    assert max(s["default"] for s in phase2) <= base_lr / 2 * (1 + 1e-9)
    assert (tmp_path / "phase1" / "checkpoints" / "step-00000004").is_dir()
    assert (tmp_path / "phase2" / "checkpoints" / "step-00000004").is_dir()
    after = snapshot(e.unwrapped_model)
    assert any(not torch.equal(body_before[k], after[k]) for k in body_before)  # phase 2 trained the body


class CrashAfter(Callback):
    """A crash (not a cancel) after the n-th optimizer step of this engine, whatever the phase."""

    def __init__(self, n):
        self.n, self.calls = n, 0

    def after_step(self, engine):
        self.calls += 1
        if self.calls == self.n:
            raise KeyboardInterrupt


def test_fine_tune_resumes_in_its_second_phase(tmp_path):
    groups = {"embed": 1.0, "hidden": 1.0, "norm": 1.0}
    e = engine(tmp_path, callbacks=[CrashAfter(6)], param_groups=groups, save_every=1)  # phase 2, its 2nd step
    with pytest.raises(KeyboardInterrupt):
        e.fine_tune(1, base_lr=1e-2, body=["embed", "hidden", "norm"])
    phase1 = tmp_path / "phase1" / "checkpoints" / "step-00000004"
    mtime = phase1.stat().st_mtime_ns
    again = engine(tmp_path, param_groups=groups, save_every=1)
    again.fine_tune(1, base_lr=1e-2, body=["embed", "hidden", "norm"])
    assert phase1.stat().st_mtime_ns == mtime  # phase 1 was not run again
    assert str(again.resumed_from).endswith("phase2/checkpoints/step-00000001")
    assert again.state.step == 4


def test_fit_sgdr_and_flat_cos(tmp_path):
    lrs = GroupLrs()
    e = engine(tmp_path, callbacks=[lrs], data=VarLenTokens(16))  # 2 steps per epoch
    e.fit_sgdr(3, 1, lr_max=1e-2, output_dir=str(tmp_path / "sgdr"))
    values = [s["default"] for s in lrs.lrs]
    assert len(values) == 2 * 7  # 1 + 2 + 4 epochs
    assert [i for i, v in enumerate(values) if v == pytest.approx(1e-2)] == [0, 2, 6]  # restarts
    lrs.lrs.clear()
    e.fit_flat_cos(4, lr=1e-2, output_dir=str(tmp_path / "flat"))
    values = [s["default"] for s in lrs.lrs]
    # 8 steps: flat until pct_start 0.75 (6 steps), then a cosine towards lr/div_final: half-way at the last
    assert values[:7] == pytest.approx([1e-2] * 7) and values[-1] == pytest.approx(1e-2 * (1 + 1e-5) / 2, rel=1e-9)


# ----------------------------------------------------------------------------------------- callbacks


def test_cancels_in_one_process(tmp_path):
    steps = Steps()
    e = engine(tmp_path, callbacks=[steps, OnRank("before_step", 2, 0, CancelStep),
                                    OnRank("after_backward", 3, 0, CancelEpoch), OnRank("after_step", 6, 0, CancelFit)],
               epochs=3, scheduler="constant")
    e.fit()
    # step 2 is consumed but not applied; step 3 is cancelled with its epoch (4 steps each): epoch 2 starts
    # at step 4 (0-based), i.e. applied steps 5, 6; CancelFit after step 6 ends the fit
    assert [s for s, _ in steps.applied] == [1, 2, 5, 6]
    assert e.state.skipped_steps == 1 and e.state.schedule_step == 3
    assert (tmp_path / "checkpoints" / "step-00000006").is_dir()


def test_short_epoch_and_early_stopping(tmp_path):
    steps = Steps()
    e = engine(tmp_path / "a", callbacks=[ShortEpoch(0.5), steps], epochs=2, data=VarLenTokens(64))
    e.fit()  # 8 steps per epoch, half of them run
    assert [s for s, _ in steps.applied] == [1, 2, 3, 4, 9, 10, 11, 12]
    stopper = EarlyStopping(patience=2)
    e = engine(tmp_path / "b", callbacks=[stopper], epochs=5, eval_every=1, lr=1e-12, scheduler="constant")
    e.fit()
    assert e.state.step == 3 and stopper.wait == 2


@pytest.mark.processes
def test_two_processes_agree_on_lr_find_early_stopping_and_cancels(tmp_path):
    launch(["-m", "tests.workers.toolkit_run", str(tmp_path)], nproc=2)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for r in ranks:
        assert r["world_size"] == [2, 2]
        assert r["lr_find"]["unchanged"]
    assert ranks[0]["lr_find"] == ranks[1]["lr_find"]  # same lrs, losses, stop and suggestions
    assert len(ranks[0]["lr_find"]["lrs"]) < 60  # end_lr=1e4 diverges before the end
    assert ranks[0]["early_stopping"] == ranks[1]["early_stopping"]
    assert ranks[0]["early_stopping"]["stopped_at"] == 3
    # CancelStep on rank 0 at step 2, CancelFit on rank 1 after step 5: both ranks did the same
    assert ranks[0]["cancel"] == ranks[1]["cancel"]
    assert [s for s, _ in ranks[0]["cancel"]["steps"]] == [1, 2, 3, 4, 5]
    assert ranks[0]["cancel"]["state"]["skipped_steps"] == 1


# ----------------------------------------------------------------------------------------- summary


@pytest.mark.processes
def test_model_summary_counts_trainable_and_frozen(tmp_path):
    e = engine(tmp_path)
    e.freeze("embed")
    text = model_summary(e.unwrapped_model, e.is_frozen)
    assert "embed   Embedding                     512            0          512" in text
    assert "total                               1,360          848          512" in text
    assert "size: 5,440 bytes" in text
    out = subprocess.run([sys.executable, "-m", "acctrain.cli", "summary", "model.n_layers=1"], capture_output=True,
                         text=True, timeout=60).stdout
    assert "blocks" in out and "total" in out


def test_a_given_checkpoint_is_resumed_before_a_recipe_replans(tmp_path):
    """`resume=PATH` with fit_one_cycle/fine_tune: the first phase starts from that checkpoint's weights."""
    def engine(out, **config):
        cfg = TrainConfig(output_dir=str(out), global_batch_size=8, micro_batch_size=4, max_steps=4, lr=1e-2, cpu=True,
                          **config)
        return Engine(make_model(0), cfg, VarLenTokens(32), loss_fn=token_loss, collate_fn=collate)

    trained = engine(tmp_path / "a")
    trained.fit()
    given = engine(tmp_path / "b", resume=str(tmp_path / "a" / "checkpoints" / "step-00000004"))
    given.replan(output_dir=str(tmp_path / "c"), max_steps=2)
    assert str(given.config.resume) == "auto"  # the given checkpoint belonged to the first phase only
    expected = trained.unwrapped_model.state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in given.unwrapped_model.state_dict().items())


def test_replan_refuses_a_field_the_engine_built_a_part_from(tmp_path):
    """The batch plan, the optimizer, the Accelerator, the model's wrapping and the EMA are built once: a phase
    that changes their fields is refused, naming the field, rather than trained with the old values."""
    cfg = TrainConfig(output_dir=str(tmp_path), global_batch_size=8, micro_batch_size=4, max_steps=2, lr=1e-2, cpu=True)
    engine = Engine(make_model(0), cfg, VarLenTokens(32), loss_fn=token_loss, collate_fn=collate)
    for field, value in [("global_batch_size", 16), ("micro_batch_size", 2), ("weight_decay", 0.1),
                         ("activation_checkpointing", True), ("ema_decay", 0.99), ("log_with", "")]:
        with pytest.raises(ConfigError, match=f"^{field}: replan cannot change {field}: the Engine built its") as err:
            engine.replan(max_steps=4, **{field: value})
        assert err.value.field == field
    with pytest.raises(ConfigError, match="^weight_decay: replan cannot change weight_decay, adam_betas: the Engine "
                                          "built its optimizer from them when it was made. Set them when"):
        engine.replan(weight_decay=0.1, adam_betas=(0.8, 0.9))
    assert engine.config.max_steps == 2  # nothing of a refused phase was applied
    # unchanged values are no change, however written (a list for a tuple, None for the resolved precision)
    engine.replan(max_steps=4, global_batch_size=8, adam_betas=[0.9, 0.999], mixed_precision=None, lr=5e-3)
    engine.fit()
    assert engine.state.step == 4 and engine.plan.global_batch == 8


def test_replan_of_a_stream_plans_max_steps_and_refuses_epochs(tmp_path):
    """A stream has no length: its plan is max_steps x global batch, in a phase too; epochs alone are refused."""
    from tests.support.tiny import StreamOf

    stream = StreamOf(list(VarLenTokens(64)))
    cfg = TrainConfig(output_dir=str(tmp_path), global_batch_size=8, micro_batch_size=4, max_steps=2, lr=1e-2, cpu=True)
    engine = Engine(make_model(0), cfg, stream, loss_fn=token_loss, collate_fn=collate)
    with pytest.raises(ConfigError, match="^max_steps: train_data is a stream"):
        engine.replan(max_steps=0, epochs=3)
    assert engine.plan.total_steps == 2
    engine.replan(max_steps=5)
    assert (engine.plan.dataset_len, engine.plan.total_steps) == (40, 5)
    engine.fit()
    assert engine.state.step == 5
