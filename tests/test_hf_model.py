"""A Transformers model built from a config (random weights, no download) trains unchanged on its own loss."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from acctrain import Engine, TrainConfig
from tests.support import Losses
from tests.support.tiny import TokenBlocks

transformers = pytest.importorskip("transformers")


def test_gpt2_from_config_trains_on_outputs_loss(tmp_path):
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=32, vocab_size=64, n_positions=16)
    model = transformers.GPT2LMHeadModel(config)
    losses = Losses()
    cfg = TrainConfig(output_dir=str(tmp_path), global_batch_size=8, micro_batch_size=4, max_steps=15, lr=3e-3,
                      scheduler="constant")
    engine = Engine(model, cfg, TokenBlocks(64, 16, 64), callbacks=[losses])  # loss_fn=None: outputs.loss
    engine.fit()
    assert losses.values[0] == pytest.approx(torch.log(torch.tensor(64.0)).item(), rel=0.1)
    assert losses.values[-1] < 0.8 * losses.values[0]
    saved = load_file(tmp_path / "checkpoints" / "step-00000015" / "model.safetensors")
    assert set(saved) == set(engine.unwrapped_model.state_dict())  # plain names, tied weights kept


def test_model_without_loss_gets_a_clear_error(tmp_path):
    cfg = TrainConfig(output_dir=str(tmp_path), global_batch_size=4, micro_batch_size=4, max_steps=1)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_head=2, n_embd=32, vocab_size=64))
    data = [{"input_ids": torch.arange(8)} for _ in range(4)]  # no labels, so no loss
    with pytest.raises(ValueError, match="returned no loss"):
        Engine(model, cfg, data).fit()
