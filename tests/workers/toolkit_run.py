"""The fastai toolkit on several processes: the LR finder, EarlyStopping and cancels raised on one rank.

    python -m torch.distributed.run --nproc_per_node 2 -m tests.workers.toolkit_run OUT_DIR
Each rank writes `{OUT_DIR}/rank{R}.json` with what it saw, so the test can compare ranks.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from acctrain import Callback, Engine, TrainConfig
from acctrain.callbacks import CancelFit, CancelStep, EarlyStopping
from tests.support.tiny import VarLenTokens, collate, make_model, token_loss


class OnRank(Callback):
    """Raise `cancel` in event `event` at optimizer step `step` (1-based), on rank `rank` only."""

    def __init__(self, event, step, rank, cancel):
        self.event, self.step, self.rank, self.cancel = event, step, rank, cancel
        setattr(self, event, self._maybe)

    def _maybe(self, engine):
        current = engine.state.step + (0 if self.event == "after_step" else 1)
        if current == self.step and engine.accelerator.process_index == self.rank:
            raise self.cancel()


class Steps(Callback):
    def __init__(self):
        self.applied = []

    def after_step(self, engine):
        self.applied.append([engine.state.step, engine.state.schedule_step])


def engine(out, callbacks=(), **config):
    cfg = TrainConfig(output_dir=out, global_batch_size=8, micro_batch_size=2, log_every=100, **config)
    return Engine(make_model(0), cfg, VarLenTokens(64), VarLenTokens(8), loss_fn=token_loss, collate_fn=collate,
                  callbacks=list(callbacks))


def main(out: str) -> None:
    result = {}
    e = engine(os.path.join(out, "lr_find"), epochs=4)
    result["world_size"] = [e.accelerator.num_processes, int(os.environ["WORLD_SIZE"])]
    before = {k: v.clone() for k, v in e.unwrapped_model.state_dict().items()}
    suggestions = e.lr_find(num_it=60, end_lr=1e4)
    result["lr_find"] = {"suggestions": suggestions._asdict(), "lrs": e.lr_find_result[0],
                         "losses": e.lr_find_result[1],
                         "unchanged": all(torch.equal(before[k], v) for k, v in e.unwrapped_model.state_dict().items())}

    stopper = EarlyStopping(patience=2)
    steps = Steps()
    e = engine(os.path.join(out, "early"), [stopper, steps], epochs=3, eval_every=1, lr=1e-12, scheduler="constant")
    e.fit()
    result["early_stopping"] = {"stopped_at": e.state.step, "steps": steps.applied}

    steps = Steps()
    cancels = [steps, OnRank("before_step", 2, 0, CancelStep), OnRank("after_step", 5, 1, CancelFit)]
    e = engine(os.path.join(out, "cancel"), cancels, epochs=2, scheduler="constant")
    e.fit()
    result["cancel"] = {"state": vars(e.state), "steps": steps.applied}
    Path(out, f"rank{e.accelerator.process_index}.json").write_text(json.dumps(result))
    e.close()


if __name__ == "__main__":
    main(sys.argv[1])
