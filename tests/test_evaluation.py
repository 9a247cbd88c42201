"""evaluate(): the exact mean over the eval set, whatever a batch looks like (acctrain.evaluation)."""

from __future__ import annotations

import pytest
import torch

from acctrain import Engine, TrainConfig

FEATURES = 5  # not the micro-batch size: a batch's len(batch[0]) is the feature count of a bare tensor batch


def samples(n: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(FEATURES + 1, generator=g) for _ in range(n)]  # features, then the target


def per_sample_loss(model, rows: torch.Tensor) -> torch.Tensor:
    return (model(rows[:, :FEATURES]).squeeze(-1) - rows[:, FEATURES]) ** 2


SHAPES = {  # how the batch reaches loss_fn -> the loss_fn for it
    "a bare tensor": (lambda rows: rows, lambda m, b: per_sample_loss(m, b).mean()),
    "a tuple": (lambda rows: (rows[:, :FEATURES], rows[:, FEATURES]),
                lambda m, b: ((m(b[0]).squeeze(-1) - b[1]) ** 2).mean()),
    "a dict": (lambda rows: {"rows": rows}, lambda m, b: per_sample_loss(m, b["rows"]).mean()),
}


@pytest.mark.parametrize("shape", list(SHAPES))
def test_eval_loss_is_the_exact_mean_over_samples(tmp_path, shape):
    shaped, loss_fn = SHAPES[shape]
    torch.manual_seed(0)
    model = torch.nn.Linear(FEATURES, 1)
    eval_set = samples(10, seed=1)  # micro-batches of 4, 4 and 2: a short last batch weighs less
    cfg = TrainConfig(output_dir=str(tmp_path / "out"), global_batch_size=4, micro_batch_size=4, max_steps=1,
                      cpu=True)
    e = Engine(model, cfg, samples(8, seed=2), eval_set, loss_fn=loss_fn,
               collate_fn=lambda items: shaped(torch.stack(items)))
    got = e.evaluate()["eval/loss"]
    with torch.no_grad():
        exact = float(per_sample_loss(e.unwrapped_model, torch.stack(eval_set)).double().mean())
    assert got == pytest.approx(exact, rel=1e-6)
    e.close()
