"""A 2-process run whose first micro-batch fails on one rank only, for the preflight's tests.

    torchrun --nproc_per_node 2 -m tests.workers.first_batch_run '{"out_dir": ..., "rank": 1, "fault": "collate"}'

Faults (on `rank` only): "collate" (its samples have no common shape: the default collate fails), "forward"
(the loss function raises). Each rank prints `error: <type>: <message>` and exits 1.
"""

from __future__ import annotations

import json
import os
import sys

import torch

from acctrain import Engine, TrainConfig
from acctrain.cli import free_before_exit
from tests.support.tiny import RUN_ON_CPU, make_model, token_loss


class Blocks(torch.utils.data.Dataset):
    """Rows of 6 tokens; with ragged=True, rows of 2 to 7 tokens."""

    def __init__(self, n: int, ragged: bool):
        self.n, self.ragged = n, ragged

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        length = 2 + i % 6 if self.ragged else 6
        ids = torch.arange(length) % 32
        return {"input_ids": ids, "labels": ids}


def main(options: dict) -> int:
    rank = int(os.environ.get("RANK", "0"))
    bad = rank == options["rank"]

    def loss_fn(model, batch):
        if bad and options["fault"] == "forward":
            raise RuntimeError("this loss fails on purpose")
        return token_loss(model, batch)

    cfg = TrainConfig(output_dir=options["out_dir"], global_batch_size=8, micro_batch_size=2, max_steps=2,
                      cpu=RUN_ON_CPU)
    engine = Engine(make_model(0), cfg, Blocks(32, ragged=bad and options["fault"] == "collate"), loss_fn=loss_fn)
    assert engine.accelerator.num_processes == int(os.environ["WORLD_SIZE"])
    try:
        engine.fit()
    except Exception as err:
        print(f"error on rank {rank}: {type(err).__name__}: {err}", flush=True)
        return 1
    finally:
        free_before_exit()
    return 0


if __name__ == "__main__":
    sys.exit(main(json.loads(sys.argv[1])))
