"""Record the lr and momentum actually set on the optimizer at every optimizer step of a real run.

    python -m torch.distributed.run --nproc_per_node 2 -m tests.workers.schedule_run OUT NAME:MICRO [NAME:MICRO ...]
NAME is a TrainConfig.scheduler (`warmup_linear` with warmup 2 over 8 steps, `one_cycle` over 20 steps,
lr 1e-2) or `torch_step` (a torch StepLR given to the Engine). Writes `{OUT}/{NAME}-{MICRO}.json` from rank 0.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from acctrain import Callback, Engine, TrainConfig
from tests.support.tiny import VarLenTokens, collate, make_model, token_loss

# name -> (dataset length, global batch, epochs, config overrides): 8 and 20 optimizer steps
RUNS = {
    "warmup_linear": (64, 16, 2, {"scheduler": "warmup_linear", "warmup_steps": 2, "lr": 1.0}),
    "one_cycle": (80, 8, 2, {"scheduler": "one_cycle", "lr": 1e-2}),
    "torch_step": (64, 16, 2, {"scheduler": "constant", "lr": 0.1}),
}


class ReadBack(Callback):
    """What the optimizer holds when it steps: every group's lr and momentum (Adam beta1)."""

    def __init__(self):
        self.lrs, self.moms = [], []

    def before_optimizer_step(self, engine):
        groups = engine.optimizer.param_groups
        self.lrs.append([g["lr"] for g in groups])
        self.moms.append([g["betas"][0] if "betas" in g else g.get("momentum") for g in groups])


def two_group_adamw(model, lr):
    """Discriminative lrs: the head at the base lr, the rest at a tenth of it."""
    head = [p for n, p in model.named_parameters() if n.startswith("head.")]
    body = [p for n, p in model.named_parameters() if not n.startswith("head.")]
    return torch.optim.AdamW([{"params": head, "lr": lr}, {"params": body, "lr": lr / 10}], lr=lr)


def run(out_dir: str, name: str, micro: int) -> dict:
    n, global_batch, epochs, overrides = RUNS[name]
    cfg = TrainConfig(output_dir=os.path.join(out_dir, f"{name}-{micro}"), global_batch_size=global_batch,
                      micro_batch_size=micro, epochs=epochs, log_every=100, **overrides)
    model = make_model(0)
    optimizer, schedule = two_group_adamw(model, cfg.lr), None
    if name == "torch_step":
        schedule = torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.5)
    reader = ReadBack()
    engine = Engine(model, cfg, VarLenTokens(n), loss_fn=token_loss, optimizer=optimizer, callbacks=[reader],
                    collate_fn=collate, schedule=schedule)
    engine.fit()
    result = {"num_processes": engine.accelerator.num_processes, "world_size_env": int(os.environ.get("WORLD_SIZE", 1)),
              "accumulation": engine.plan.accumulation, "lrs": reader.lrs, "moms": reader.moms}
    if engine.accelerator.is_main_process:
        Path(out_dir, f"{name}-{micro}.json").write_text(json.dumps(result))
    return result


if __name__ == "__main__":
    out, *runs = sys.argv[1:]
    for item in runs:
        name, micro = item.split(":")
        run(out, name, int(micro))
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
