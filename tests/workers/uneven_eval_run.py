"""Evaluation and predict when ranks hold different numbers of eval batches, on 2 processes.

    python -m torch.distributed.run --nproc_per_node 2 -m tests.workers.uneven_eval_run OUT_DIR MODE

MODE `fsdp`: FSDP2 with each Block its own unit (FSDP_AUTO_WRAP_POLICY=TRANSFORMER_BASED_WRAP in the
environment), so every forward gathers parameters: 9 eval samples in micro-batches of 4 are 1 batch on rank 0
and 2 on rank 1. MODE `ddp`: a model with a buffer, which DDP broadcasts in its first forward, and 1 eval
sample: rank 1 has none. Without every rank running as many forwards, both hang. Each rank writes
`{OUT_DIR}/rank{R}.json`: its evaluation and predictions, and the references from the same initial weights.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from torch import nn

from acctrain import Engine, TrainConfig
from acctrain.cli import free_before_exit
from acctrain.metrics import Accuracy
from tests.workers.metrics_run import CLASSES, FEATURES, data, loss_fn


class Block(nn.Module):
    def __init__(self, width_in: int, width_out: int):
        super().__init__()
        self.linear = nn.Linear(width_in, width_out)

    def forward(self, x):
        return torch.tanh(self.linear(x))


class Blocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.first, self.second, self.head = Block(FEATURES, 16), Block(16, 16), nn.Linear(16, CLASSES)
        self.register_buffer("offset", torch.linspace(-0.5, 0.5, CLASSES))

    def forward(self, x):
        return self.head(self.second(self.first(x))) + self.offset


def model() -> Blocks:
    torch.manual_seed(0)
    return Blocks()


@torch.no_grad()
def reference(eval_set) -> dict:
    m = model()
    x, y = torch.stack([s[0] for s in eval_set]), torch.stack([s[1] for s in eval_set])
    logits = m(x)
    return {"eval/loss": float(nn.functional.cross_entropy(logits, y)),
            "eval/accuracy": float((logits.argmax(1) == y).double().mean()), "predictions": logits.tolist()}


def main(out_dir: str, mode: str) -> None:
    eval_set = data(9 if mode == "fsdp" else 1, 1)
    cfg = TrainConfig(output_dir=out_dir, global_batch_size=8, micro_batch_size=4, max_steps=1, log_with="",
                      fsdp=mode == "fsdp", save_every_minutes=0)
    engine = Engine(model(), cfg, data(16, 0), eval_set, loss_fn=loss_fn, metrics=[Accuracy()])
    rank = engine.accelerator.process_index
    result = {"world": [engine.accelerator.num_processes, int(os.environ["WORLD_SIZE"])],
              "fsdp_units": sum(hasattr(m, "unshard") for m in engine.unwrapped_model.modules()),
              "eval": engine.evaluate(), "predictions": engine.predict(eval_set).tolist(),
              "reference": reference(eval_set)}
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    engine.close()
    free_before_exit()


if __name__ == "__main__":
    main(*sys.argv[1:])
