"""Mixed precision: bf16 autocast trains on CPU; fp16 needs CUDA (and is refused on CPU, see test_config)."""

from __future__ import annotations

import pytest
import torch

from acctrain import Callback, Engine, TrainConfig
from tiny import VarLenTokens, collate, make_model, rel_diff, token_loss


class Losses(Callback):
    def __init__(self):
        self.values = []

    def after_step(self, engine):
        self.values.append(float(engine.step_loss))


def train(tmp_path, precision: str, steps: int = 12, model=None, loss_fn=token_loss, device_check=None):
    model = model or make_model(0)
    dtypes = []
    model.hidden.register_forward_hook(lambda mod, inp, out: dtypes.append(out.dtype))
    losses = Losses()
    cfg = TrainConfig(output_dir=str(tmp_path / precision), global_batch_size=8, micro_batch_size=4, max_steps=steps,
                      lr=1e-2, mixed_precision=precision, scheduler="constant")
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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 loss scaling needs a CUDA GPU")
def test_fp16_overflow_step_is_skipped_and_does_not_advance_schedule(tmp_path):
    calls = {"n": 0}

    def loss_with_overflow(model, batch):
        loss_sum, count = token_loss(model, batch)
        calls["n"] += 1
        return (loss_sum * float("inf"), count) if calls["n"] == 5 else (loss_sum, count)  # step 3, 1st micro

    engine, _, _ = train(tmp_path, "fp16", steps=6, loss_fn=loss_with_overflow)
    assert engine.state.step == 6
    assert engine.state.skipped_steps == 1
    assert engine.state.schedule_step == 5
