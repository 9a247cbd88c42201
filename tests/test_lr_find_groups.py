"""lr_find with discriminative lrs: the recorded lr is that of the groups with multiplier 1 (what `lr=` sets)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from acctrain import Engine, TrainConfig


def test_lr_find_records_the_lr_of_the_multiplier_one_groups(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))  # "0" (backbone) comes first
    data = torch.utils.data.TensorDataset(torch.randn(32, 4), torch.randint(0, 2, (32,)))
    seen = []

    def loss_fn(model, batch):
        x, y = batch
        seen.append({g["name"]: g["lr"] for g in engine.torch_optimizer.param_groups})
        return F.cross_entropy(model(x), y)

    cfg = TrainConfig(output_dir=str(tmp_path), global_batch_size=8, micro_batch_size=8, lr=1e-3, cpu=True,
                      param_groups={"0": 0.1})
    engine = Engine(model, cfg, data, loss_fn=loss_fn)
    assert engine.torch_optimizer.param_groups[0]["name"] == "0"  # the 0.1 group is group 0
    before = {k: v.clone() for k, v in model.state_dict().items()}
    engine.lr_find(start_lr=1e-4, end_lr=1e-1, num_it=8, stop_div=False, plot=None)
    lrs, _ = engine.lr_find_result
    expected = [1e-4 * (1e-1 / 1e-4) ** (i / 8) for i in range(8)]
    assert lrs == pytest.approx(expected, rel=1e-12)
    for step, recorded in zip(seen, lrs):  # the multiplier-1 groups trained at the recorded lr, "0" at a tenth
        assert step["default"] == pytest.approx(recorded, rel=1e-12)
        assert step["0"] == pytest.approx(0.1 * recorded, rel=1e-12)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # put back by trial()
    assert engine.state.step == 0 and engine.torch_optimizer.param_groups[0]["lr"] == pytest.approx(1e-4)
