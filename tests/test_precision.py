"""Mixed precision: bf16 autocast trains on CPU; the fp16 step's loss-scaling logic, on the CPU.

fp16 autocast needs CUDA (it is refused on CPU, see test_config; the CUDA runs are in test_gpu). The
GradScaler logic of the step (scale, unscale before clipping, skip on overflow, `update()` exactly once per
optimizer step, the floor, the state in checkpoints) is the same code with torch's CPU GradScaler, so it
is tested here by `ScaledEngine`, which gives the Engine's own step a `GradScaler("cpu")`.
"""

from __future__ import annotations

import pytest
import torch

from acctrain import Callback, Engine, TrainConfig
from acctrain.errors import NonFiniteError, Preempted
from acctrain.step_ops import TorchStep
from tests.support import Losses, Recorder, overflow_at
from tests.support.tiny import VarLenTokens, collate, make_model, rel_diff, token_loss


def train(tmp_path, precision: str, steps: int = 12, model=None, loss_fn=token_loss, device_check=None):
    model = model or make_model(0)
    dtypes = []
    model.hidden.register_forward_hook(lambda mod, inp, out: dtypes.append(out.dtype))
    losses = Losses()
    cfg = TrainConfig(output_dir=str(tmp_path / precision), global_batch_size=8, micro_batch_size=4, max_steps=steps,
                      lr=1e-2, mixed_precision=precision, scheduler="constant", cpu=True)  # CPU autocast
    engine = Engine(model, cfg, VarLenTokens(64), loss_fn=loss_fn, collate_fn=collate, callbacks=[losses])
    engine.fit()
    return engine, dtypes, losses.values


def test_bf16_trains_on_cpu_with_fp32_master_weights(tmp_path):
    engine, dtypes, losses = train(tmp_path, "bf16")
    assert set(dtypes) == {torch.bfloat16}  # autocast really ran the matmuls in bf16
    assert all(p.dtype == torch.float32 for p in engine.unwrapped_model.parameters())
    assert sum(losses[-3:]) < sum(losses[:3])
    _, fp32_dtypes, fp32_losses = train(tmp_path, "no")
    assert set(fp32_dtypes) == {torch.float32}
    assert rel_diff(dict(engine.unwrapped_model.named_parameters()), dict(make_model(0).named_parameters())) > 0
    assert losses == pytest.approx(fp32_losses, rel=2e-2)  # same run, bf16 rounding only


class ScaledEngine(Engine):
    """The Engine with torch's CPU GradScaler in its step: fp16's loss-scaling path without a GPU."""

    scaler_args: dict = {}

    def _step_ops(self):
        ops = super()._step_ops()
        assert isinstance(ops, TorchStep) and ops.scaler is None  # the path fp16 takes on one GPU or DDP
        ops.scaler = torch.amp.GradScaler("cpu", **self.scaler_args)
        return ops


def scaled_run(out, engine_cls=ScaledEngine, loss_fn=token_loss, steps=6, recorder=None, **config):
    cfg = TrainConfig(**{**dict(output_dir=str(out), global_batch_size=8, micro_batch_size=4, max_steps=steps, lr=1e-2,
                                scheduler="warmup_linear", warmup_steps=2, cpu=True, log_every=1), **config})
    recorder = recorder or Recorder()
    engine = engine_cls(make_model(0), cfg, VarLenTokens(64), loss_fn=loss_fn, collate_fn=collate, callbacks=[recorder])
    engine.fit()
    return engine, recorder


def test_overflow_under_a_grad_scaler_is_skipped_lowers_the_scale_and_training_goes_on(tmp_path):
    engine, rec = scaled_run(tmp_path / "scaled", loss_fn=overflow_at(3))
    assert engine.state.step == 6 and engine.state.skipped_steps == 1 and engine.state.schedule_step == 5
    assert rec.scales == [65536.0, 65536.0, 32768.0, 32768.0, 32768.0, 32768.0]  # lowered once, at the overflow
    assert rec.skipped == [0, 0, 1, 1, 1, 1]
    assert engine.metrics.last["train/skipped_steps"] == 1
    # The reference: the same run without a scaler, with step 3's update cancelled (data consumed, schedule
    # held). Scaling by a power of two is exact in fp32, so the weights are bitwise the same.
    ref, _ = scaled_run(tmp_path / "reference", engine_cls=Engine, recorder=Recorder(cancel_at=3))
    assert ref.state.schedule_step == 5
    scaled, expected = engine.unwrapped_model.state_dict(), ref.unwrapped_model.state_dict()
    assert all(torch.equal(scaled[k], expected[k]) for k in expected), rel_diff(scaled, expected)


@pytest.mark.parametrize("case", ["nan-loss-finite-grads", "cancelled", "overflow-twice"])
def test_scaler_update_runs_once_per_step_whatever_happened(tmp_path, case):
    """A skipped step that missed `update()` made the next step's unscale_ raise: every path calls it once."""
    if case == "nan-loss-finite-grads":  # NaN added to step 2's loss value only: the gradients stay finite
        steps = []

        def loss_fn(model, batch):
            loss_sum, count = token_loss(model, batch)
            return loss_sum + (float("nan") if len(steps) == 2 else 0.0), count

        class Step(Callback):
            def before_step(self, engine):
                steps.append(engine.state.step + 1)

        rec = Recorder()
        cfg = TrainConfig(output_dir=str(tmp_path), global_batch_size=8, micro_batch_size=4, max_steps=4, lr=1e-2,
                          cpu=True)
        engine = ScaledEngine(make_model(0), cfg, VarLenTokens(64), loss_fn=loss_fn, collate_fn=collate,
                              callbacks=[Step(), rec])
        engine.fit()
        assert engine.state.skipped_steps == 1 and engine.state.schedule_step == 3  # the NaN policy skipped it
        assert rec.scales == [65536.0] * 4  # not an overflow: the scale stays
    elif case == "cancelled":
        engine, rec = scaled_run(tmp_path, recorder=Recorder(cancel_at=2), steps=4)
        assert engine.state.skipped_steps == 1 and rec.scales == [65536.0] * 4
    else:
        calls = {"n": 0}

        def loss_fn(model, batch):
            calls["n"] += torch.is_grad_enabled()  # training's calls, not the first micro-batch's check
            loss_sum, count = token_loss(model, batch)
            return (loss_sum * float("inf"), count) if calls["n"] in (3, 5) else (loss_sum, count)  # steps 2 and 3
        engine, rec = scaled_run(tmp_path, loss_fn=loss_fn, steps=5)
        assert rec.scales == [65536.0, 32768.0, 16384.0, 16384.0, 16384.0]
        assert engine.state.skipped_steps == 2 and engine.state.schedule_step == 3 and engine.state.skipped_in_a_row == 0


@pytest.mark.parametrize("policy", ["halt", "skip"])
def test_overflow_at_the_scale_floor_goes_to_the_nan_policy(tmp_path, policy):
    ScaledEngine.scaler_args = {"init_scale": 1.0}
    try:
        nan_always = overflow_at(2, value=float("nan"))
        if policy == "halt":
            with pytest.raises(NonFiniteError, match=r"optimizer step 2 .*loss scale at its floor.*nan_policy=halt"):
                scaled_run(tmp_path, loss_fn=nan_always, nan_policy="halt")
        else:
            engine, rec = scaled_run(tmp_path, loss_fn=nan_always, nan_policy="skip")
            assert engine.state.skipped_steps == 1 and engine.state.schedule_step == 5 and rec.scales[1] == 0.5
    finally:
        ScaledEngine.scaler_args = {}


def test_scaler_state_resumes_bit_identically(tmp_path):
    """Stopped after step 4 and resumed, the run ends with the weights, optimizer and scale of an uninterrupted one."""
    ScaledEngine.scaler_args = {"growth_interval": 3}  # stopped mid-interval: scale and growth tracker matter
    try:
        full, full_rec = scaled_run(tmp_path / "full", loss_fn=overflow_at(2), steps=8)
        with pytest.raises(Preempted):
            scaled_run(tmp_path / "split", loss_fn=overflow_at(2), steps=8, recorder=Recorder(stop_at=4))
        resumed, rec = scaled_run(tmp_path / "split", loss_fn=overflow_at(99), steps=8)
    finally:
        ScaledEngine.scaler_args = {}
    assert str(resumed.resumed_from).endswith("step-00000004")
    assert full_rec.scales[1] == 32768.0 and full_rec.scales[-1] > 32768.0  # lowered, then grown again
    assert full_rec.scales[3] == 32768.0 and rec.scales == full_rec.scales[4:]
    assert resumed.step_ops.scaler.state_dict() == full.step_ops.scaler.state_dict()
    a, b = resumed.unwrapped_model.state_dict(), full.unwrapped_model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_fp8_layers_keep_the_linear_weights_so_checkpoints_load_across_precisions(tmp_path):
    """What an FP8 run converts (Accelerate's torchao recipe: every Linear with sizes divisible by 16 but the first
    and the last) and what its checkpoint holds: the same names, shapes and fp32 tensors as the plain model, so a
    bf16 run loads an FP8 run's weights bit for bit and the reverse. The conversion is a module swap, done here on
    the CPU; the FP8 matmuls themselves need a GPU (test_gpu)."""
    pytest.importorskip("torchao", reason="fp8 trains through torchao: pip install \"acctrain[fp8]\"")
    from accelerate.utils.ao import convert_model_to_fp8_ao
    from safetensors.torch import load_file, save_file

    from acctrain.checkpoint.checkpointer import load_model_state
    from acctrain.precision import describe
    from tests.support.tiny import Stacked

    fp8 = Stacked(seed=1, width=32)
    convert_model_to_fp8_ao(fp8)  # what Accelerate's prepare does with mixed_precision=fp8
    assert describe("fp8", fp8) == "fp8 (2 of 4 Linear layers in FP8; bf16: blocks.0.1, head)"
    assert describe("bf16", fp8) == "bf16"
    save_file(fp8.state_dict(), tmp_path / "fp8.safetensors")
    plain = Stacked(seed=2, width=32)
    load_model_state(plain, load_file(tmp_path / "fp8.safetensors"))  # strict: names, shapes and dtypes
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), fp8.state_dict().values()))
    back = Stacked(seed=3, width=32)
    convert_model_to_fp8_ao(back)
    load_model_state(back, plain.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), plain.state_dict().values()))


def test_fp8_is_refused_on_the_cpu_before_anything_is_written(tmp_path):
    from acctrain.errors import ConfigError

    cfg = TrainConfig(output_dir=str(tmp_path / "out"), global_batch_size=8, micro_batch_size=4,
                      mixed_precision="fp8", cpu=True)
    with pytest.raises(ConfigError, match="compute capability 8.9 or later") as err:
        Engine(make_model(0), cfg, VarLenTokens(16), loss_fn=token_loss, collate_fn=collate)
    assert err.value.field == "mixed_precision" and "mixed_precision=bf16" in str(err.value)
    assert not (tmp_path / "out").exists()
