"""What loss_fn may return, and what the Engine says when it returns something else (acctrain.loss_scaling)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from acctrain import Engine, TrainConfig
from acctrain.errors import NonFiniteError
from tests.support.tiny import VarLenTokens, collate, make_model, token_loss

CONTRACT = "loss_fn must return a tensor (the mean loss over the micro-batch) or (loss_sum, num_items)"


def config(tmp_path, **kw) -> TrainConfig:
    return TrainConfig(**{"output_dir": str(tmp_path / "out"), "global_batch_size": 8, "micro_batch_size": 4,
                          "max_steps": 2, "lr": 0.1, "scheduler": "constant", "cpu": True, **kw})


def engine(tmp_path, loss_fn, **kw) -> Engine:
    return Engine(make_model(), config(tmp_path, **kw), VarLenTokens(32), loss_fn=loss_fn, collate_fn=collate)


def logits_of(model, batch):
    return model(batch["input_ids"]).flatten(0, 1).float(), batch["labels"].flatten()


def mean_loss(model, batch):
    logits, labels = logits_of(model, batch)
    return nn.functional.cross_entropy(logits, labels, ignore_index=-100)


WRONG = {  # what a loss_fn returned -> what the message must say it was
    "None": (lambda m, b: None, "NoneType"),
    "a float": (lambda m, b: mean_loss(m, b).item(), "float"),
    "an int": (lambda m, b: 3, "int"),
    "a string": (lambda m, b: "loss", "str"),
    "a dict (a model output)": (lambda m, b: {"loss": mean_loss(m, b)}, "a dict or model output"),
    "a numpy number": (lambda m, b: np.float32(1.0), "float32"),
    "three values": (lambda m, b: (*token_loss(m, b), 1), "a tuple of 3 values"),
    "per-token losses": (lambda m, b: nn.functional.cross_entropy(*logits_of(m, b), reduction="none"), "shape"),
    "a count as a string": (lambda m, b: (token_loss(m, b)[0], "12"), "num_items as str"),
    "an integer tensor": (lambda m, b: torch.tensor(3), "torch.int64"),
}


@pytest.mark.parametrize("case", list(WRONG))
def test_a_wrong_return_is_named_and_nothing_is_saved(tmp_path, case):
    loss_fn, said = WRONG[case]
    e = engine(tmp_path, loss_fn)
    with pytest.raises(TypeError) as err:
        e.fit()
    assert CONTRACT in str(err.value) and said in str(err.value)
    assert not (tmp_path / "out" / "checkpoints").exists() or not any((tmp_path / "out" / "checkpoints").iterdir())
    e.close()


def test_a_count_given_as_a_python_number_trains_as_a_tensor_count(tmp_path):
    """(loss_sum, int): the same weights, bitwise, as (loss_sum, tensor) on one process (it used to crash there)."""
    def host_count(model, batch):
        loss_sum, count = token_loss(model, batch)
        return loss_sum, int(count)

    weights = []
    for name, loss_fn in (("tensor", token_loss), ("int", host_count)):
        e = engine(tmp_path / name, loss_fn)
        e.fit()
        weights.append({k: v.clone() for k, v in e.unwrapped_model.state_dict().items()})
        e.close()
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


@pytest.mark.parametrize("count", [0, torch.tensor(0)])
def test_a_step_with_no_items_says_so(tmp_path, count):
    """Every micro-batch counts 0 items: the NaN policy stops the run and says the step was empty."""
    def nothing_counted(model, batch):
        return token_loss(model, batch)[0] * 0, count

    e = engine(tmp_path, nothing_counted, nan_policy="halt")
    with pytest.raises(NonFiniteError, match="the step has 0 items"):
        e.fit()
    e.close()
