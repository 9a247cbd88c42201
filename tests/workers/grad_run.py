"""Train TinyTokenModel with the Engine and record what the tests compare.

Run in-process (`run(...)`) for one process, or under `torchrun --nproc_per_node N` as a module, from the
repository root:
    python -m torch.distributed.run --nproc_per_node 2 -m tests.workers.grad_run OUT_DIR MICRO [CLIP ...]
Writes, from rank 0, `{OUT_DIR}/clip-{CLIP}.json` (world size, grad norms, all-reduce counts per
micro-batch) and `params.safetensors` beside it.
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
from tests.support.tiny import VarLenTokens, collate, make_model, token_loss

DATASET_LEN, GLOBAL_BATCH, EPOCHS, LR = 17, 8, 2, 0.5


class Recorder(Callback):
    """Counts gradient all-reduces per micro-batch (through a DDP comm hook) and reads each step's norm."""

    def __init__(self):
        self.allreduces = 0
        self.per_micro = []  # (step, micro index, is last micro, all-reduces during its backward)
        self.grad_norms = []
        self._before = 0

    def hook(self, state, bucket):
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        self.allreduces += 1
        return allreduce_hook(state, bucket)

    def after_loss(self, engine):
        self._before = self.allreduces

    def after_backward(self, engine):
        self.per_micro.append((engine.state.step, engine.micro_index, engine.is_last_micro, self.allreduces - self._before))

    def before_optimizer_step(self, engine):
        self.grad_norms.append(float(engine.grad_norm))


def run(out_dir: str, micro: int, clip: float, precision: str = "no", fsdp: bool = False) -> dict:
    cfg = TrainConfig(
        output_dir=os.path.join(out_dir, f"run-clip-{clip}"),
        global_batch_size=GLOBAL_BATCH,
        micro_batch_size=micro,
        epochs=EPOCHS,
        lr=LR,
        weight_decay=0.0,
        max_grad_norm=clip,
        scheduler="constant",
        mixed_precision=precision,
        log_every=100,
        fsdp=fsdp,
    )
    recorder = Recorder()
    engine = Engine(
        make_model(0),
        cfg,
        VarLenTokens(DATASET_LEN),
        loss_fn=token_loss,
        optimizer=lambda groups: torch.optim.SGD(groups, lr=LR),
        callbacks=[recorder],
        collate_fn=collate,
    )
    if isinstance(engine.model, torch.nn.parallel.DistributedDataParallel):
        engine.model.register_comm_hook(None, recorder.hook)
    engine.fit()
    result = {
        "world_size_env": int(os.environ.get("WORLD_SIZE", "1")),
        "num_processes": engine.accelerator.num_processes,
        "distributed_type": str(engine.accelerator.distributed_type),
        "accumulation": engine.plan.accumulation,
        "total_steps": engine.plan.total_steps,
        "grad_norms": recorder.grad_norms,
        "per_micro": recorder.per_micro,
        "params": {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().float().cpu().clone()
                   for n, p in engine.unwrapped_model.named_parameters()},
    }
    if engine.accelerator.is_main_process:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        save_file(result["params"], os.path.join(out_dir, f"params-clip-{clip}.safetensors"))
        meta = {k: v for k, v in result.items() if k != "params"}
        Path(out_dir, f"clip-{clip}.json").write_text(json.dumps(meta))
    return result


if __name__ == "__main__":
    out, micro, *clips = sys.argv[1:]
    fsdp = os.environ.get("GRAD_RUN_FSDP") == "1"
    for clip in clips:
        run(out, int(micro), float(clip), fsdp=fsdp)
    free_before_exit()  # FSDP2's device mesh, freed at interpreter exit, can abort the process
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
