"""Train TinyTokenModel with fused AdamW, with the step's verdict read at once or a step late, and record the run.

In-process: `run(out_dir, on_device=..., nan_at=...)`. As a module under torchrun (1 or more processes), from the
repository root:
    python -m torch.distributed.run --nproc_per_node 2 -m tests.workers.verdict_run '{"out_dir": ..., "on_device": true}'
With `on_device=False` a do-nothing `after_step` callback makes the Engine read each step's verdict at once
(the synchronous path); without it, a fused optimizer and no callback in the step, it reads it a step late.
Rank 0 writes `{out_dir}/result.json` (state, world size, which path ran) and `result.safetensors` (weights).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from acctrain.cli import free_before_exit
from acctrain import Callback, Engine, TrainConfig
from tests.support.tiny import RUN_ON_CPU, VarLenTokens, collate, make_model, token_loss


class EveryStep(Callback):
    """A callback in the step: the Engine then reads each step's verdict at once."""

    def after_step(self, engine):
        pass


def run(out_dir: str, on_device: bool = True, nan_at: int | None = None, steps: int = 8, **config) -> dict:
    calls = {"train": 0}

    def loss_fn(model, batch):  # NaN for every micro-batch of optimizer step `nan_at` (counted without a callback)
        loss_sum, count = token_loss(model, batch)
        calls["train"] += model.training
        step = (calls["train"] - 1) // micro_per_step + 1
        return (loss_sum * float("nan"), count) if model.training and step == nan_at else (loss_sum, count)

    cfg = TrainConfig(**{**dict(output_dir=out_dir, global_batch_size=8, micro_batch_size=2, max_steps=steps,
                                lr=1e-2, scheduler="warmup_linear", warmup_steps=2, log_every=2, save_every=3,
                                eval_every=4, cpu=RUN_ON_CPU), **config})
    micro_per_step = cfg.global_batch_size // cfg.micro_batch_size // int(os.environ.get("WORLD_SIZE", "1"))
    fused = lambda groups: torch.optim.AdamW(groups, lr=cfg.lr, fused=True)  # noqa: E731
    engine = Engine(make_model(0), cfg, VarLenTokens(48), VarLenTokens(6), loss_fn=loss_fn, collate_fn=collate,
                    optimizer=fused, callbacks=[] if on_device else [EveryStep()])
    engine.fit()
    result = {"state": vars(engine.state), "world_size": engine.accelerator.num_processes,
              "verdict_on_device": engine.step_ops.skips_on_device and on_device}
    if engine.accelerator.is_main_process:
        save_file({n: p.detach().cpu().clone() for n, p in engine.unwrapped_model.named_parameters()},
                  os.path.join(out_dir, "result.safetensors"))
        Path(out_dir, "result.json").write_text(json.dumps(result))
    engine.close()
    return result


if __name__ == "__main__":
    run(**json.loads(sys.argv[1]))
    free_before_exit()
