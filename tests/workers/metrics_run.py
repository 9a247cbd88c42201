"""Eval metrics and predict on 1 or 2 processes, against references computed by hand on rank 0.

    python -m torch.distributed.run --nproc_per_node 2 -m tests.workers.metrics_run OUT_DIR
Rank 0 writes `{OUT_DIR}/result.json`: the Engine's last evaluation, the hand-made references from the
final weights over the whole eval set, and whether every rank's predictions are model(x) in dataset order.
"""

from __future__ import annotations

import copy
import json
import math
import os
import sys
from pathlib import Path

import torch
from torch import nn

from acctrain import Engine, TrainConfig
from acctrain.metrics import Accuracy, Mean, Perplexity
from acctrain.predict import read_predictions
from tests.support.processes import RUN_ON_CPU

CLASSES, FEATURES, EVAL_LEN = 5, 6, 37  # 37 samples: no split into 2 ranks x micro-batches of 4 is even


def data(n: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, FEATURES, generator=g)
    y = torch.randint(0, CLASSES, (n,), generator=g)
    return list(zip(x, y))


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(FEATURES, 16), nn.Tanh(), nn.Linear(16, CLASSES))


def loss_fn(m, batch):
    x, y = batch
    return nn.functional.cross_entropy(m(x), y)


def squared_margin(b):
    """A per-sample value: the squared gap between the label's logit and the largest other."""
    picked = b.logits.gather(1, b.labels[:, None])[:, 0]
    others = b.logits.scatter(1, b.labels[:, None], float("-inf")).max(1).values
    return (picked - others) ** 2


def metrics() -> dict:
    chosen = {"accuracy": Accuracy(), "top2": Accuracy(top_k=2), "perplexity": Perplexity(),
              "margin2": Mean("margin2", squared_margin)}
    try:
        from torchmetrics.classification import MulticlassAccuracy, MulticlassAUROC
        chosen["tm_accuracy"] = MulticlassAccuracy(num_classes=CLASSES, average="micro")  # summed states
        chosen["tm_auroc"] = MulticlassAUROC(num_classes=CLASSES, thresholds=None)  # gathered (cat) states
    except ImportError:
        pass
    return chosen


@torch.no_grad()
def auroc_reference(m: nn.Module, eval_set) -> dict[str, float]:
    """torchmetrics' AUROC of `m` over the whole eval set at once, in this one process."""
    try:
        from torchmetrics.classification import MulticlassAUROC
    except ImportError:
        return {}
    x, y = torch.stack([s[0] for s in eval_set]), torch.stack([s[1] for s in eval_set])
    return {"eval/tm_auroc": float(MulticlassAUROC(num_classes=CLASSES, thresholds=None)(m(x), y))}


@torch.no_grad()
def reference(m: nn.Module, eval_set) -> dict[str, float]:
    """The metrics of `m` over the whole eval set, one sample at a time, in float64."""
    m = copy.deepcopy(m).double()
    correct = top2 = 0
    loss = margin = 0.0
    for x, y in eval_set:
        logits = m(x.double()[None])[0]
        correct += int(logits.argmax() == y)
        top2 += int(y in logits.topk(2).indices)
        loss += float(nn.functional.cross_entropy(logits[None], y[None]))
        others = logits.clone()
        others[y] = float("-inf")
        margin += float(logits[y] - others.max()) ** 2
    n = len(eval_set)
    return {"eval/accuracy": correct / n, "eval/top2": top2 / n, "eval/loss": loss / n, "eval/perplexity": math.exp(loss / n),
            "eval/margin2": margin / n, "eval/tm_accuracy": correct / n}


def ragged(m, batch):
    """Each sample's logits repeated 1 + (the batch's first label) times: outputs whose shapes differ by batch."""
    logits = m(batch[0])
    return logits[:, None, :].expand(-1, 1 + int(batch[1][0]), -1).contiguous()


def same_ragged(got, expected: torch.Tensor) -> bool:
    """A list with a (k, classes) tensor per sample, each row that sample's logits."""
    return isinstance(got, list) and len(got) == len(expected) and all(
        g.dim() == 2 and g.shape[0] >= 1 and bool((g - e).abs().max() < 1e-6) for g, e in zip(got, expected))


def run(out_dir: str) -> dict:
    eval_set = data(EVAL_LEN, 1)
    cfg = TrainConfig(output_dir=out_dir, global_batch_size=8, micro_batch_size=4, max_steps=3, lr=0.05,
                      scheduler="constant", log_with="", cpu=RUN_ON_CPU)
    engine = Engine(model(), cfg, data(64, 0), eval_set, loss_fn=loss_fn, metrics=metrics())
    engine.fit()
    rank = engine.accelerator.process_index
    inputs = torch.stack([x for x, _ in eval_set])
    with torch.no_grad():
        expected = engine.unwrapped_model(inputs)
    in_memory = engine.predict(eval_set)
    on_disk = read_predictions(engine.predict(eval_set, out_dir=Path(out_dir) / "preds"))
    result = {
        "world_size_env": int(os.environ.get("WORLD_SIZE", "1")),
        "num_processes": engine.accelerator.num_processes,
        "last_eval": engine.last_eval,
        "reference": {**reference(engine.unwrapped_model, eval_set), **auroc_reference(engine.unwrapped_model, eval_set)},
        "predict_shape": list(in_memory.shape),
        "predict_same_on_disk": bool(torch.equal(in_memory, on_disk)),
        "predict_max_diff": float((in_memory - expected).abs().max()),
        "predict_argmax": bool(torch.equal(engine.predict(eval_set, forward=lambda m, b: m(b[0]).argmax(-1)),
                                           expected.argmax(-1))),
        "predict_ragged": [same_ragged(engine.predict(eval_set, forward=ragged), expected),
                           same_ragged(read_predictions(engine.predict(eval_set, forward=ragged,
                                                                       out_dir=Path(out_dir) / "ragged")), expected)],
    }
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    engine.close()
    return result


if __name__ == "__main__":
    run(sys.argv[1])
