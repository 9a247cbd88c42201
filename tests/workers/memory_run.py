"""Train a model of repeated blocks with and without activation checkpointing; record every step's gradient.

Run in-process (`run(...)`) for one process, or under torchrun as a module, from the repository root:
    python -m torch.distributed.run --nproc_per_node 2 -m tests.workers.memory_run OUT_DIR [fsdp]
which trains each of RUNS and writes, from rank 0, `{OUT_DIR}/{name}.safetensors` (step k's gradient of
parameter p as `step{k}.{p}`, the final parameters as `param.{p}`) and `{name}.json` (world size, plan).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from torch.distributed.fsdp import FSDPModule

from acctrain import Callback, Engine, TrainConfig, bytelm
from acctrain.bytelm import ByteLM, ModelConfig
from acctrain.cli import free_before_exit
from tests.support.tiny import VOCAB, VarLenTokens, collate, token_loss

DATASET_LEN, GLOBAL_BATCH, MICRO, EPOCHS, LR = 17, 8, 2, 2, 0.5
RUNS = [  # (model, activation checkpointing, dropout): each with dropout is compared with its twin without it
    ("blocks", True, 0.0), ("blocks", True, 0.2), ("blocks", False, 0.2), ("bytelm", True, 0.2), ("bytelm", False, 0.2)]


class Block(nn.Module):
    """norm -> MLP -> dropout, added to the input: the block that BlockModel repeats (named as the embedded model's
    block, so that one FSDP setting wraps the blocks of both: Accelerate keeps the first run's in the process)."""

    def __init__(self, width: int, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop(self.mlp(self.norm(x)))


class BlockModel(nn.Module):
    """Embedding -> 3 blocks in an nn.Sequential -> logits, per token."""

    def __init__(self, width: int = 16, dropout: float = 0.0, depth: int = 3):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, width)
        self.blocks = nn.Sequential(*(Block(width, dropout) for _ in range(depth)))
        self.head = nn.Linear(width, VOCAB)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.embed(input_ids)))


def make(model: str, dropout: float) -> nn.Module:
    torch.manual_seed(0)
    if model == "blocks":
        return BlockModel(dropout=dropout)
    return ByteLM(ModelConfig(context_len=16, d_model=16, n_layers=2, n_heads=2, dropout=dropout, vocab_size=VOCAB))


class Gradients(Callback):
    """Each step's gradients as the optimizer will apply them (reduced over ranks, unscaled; no clipping)."""

    def __init__(self):
        self.steps: list[dict[str, torch.Tensor]] = []

    def before_optimizer_step(self, engine):
        self.steps.append({n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).detach().clone()
                           for n, p in engine.unwrapped_model.named_parameters()})


def run(out_dir: str, model: str, checkpointing: bool, dropout: float, fsdp: bool = False) -> dict:
    name = f"{model}-ac{int(checkpointing)}-drop{dropout}"
    cfg = TrainConfig(output_dir=os.path.join(out_dir, name), global_batch_size=GLOBAL_BATCH, micro_batch_size=MICRO,
                      epochs=EPOCHS, lr=LR, weight_decay=0.0, max_grad_norm=0.0, scheduler="constant", log_every=100,
                      fsdp=fsdp, activation_checkpointing=checkpointing)
    if fsdp:  # each block its own FSDP unit, resharded after its forward: the recompute needs it gathered again
        os.environ.update(FSDP_AUTO_WRAP_POLICY="TRANSFORMER_BASED_WRAP", FSDP_TRANSFORMER_CLS_TO_WRAP="Block")
    grads = Gradients()
    engine = Engine(make(model, dropout), cfg, VarLenTokens(DATASET_LEN), loss_fn=token_loss,
                    optimizer=lambda groups: torch.optim.SGD(groups, lr=LR), callbacks=[grads], collate_fn=collate)
    engine.fit()
    tensors = {f"step{k}.{n}": g for k, step in enumerate(grads.steps) for n, g in step.items()}
    tensors.update({f"param.{n}": (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
                    for n, p in engine.unwrapped_model.named_parameters()})
    blocks = [m for m in engine.unwrapped_model.modules() if isinstance(m, (Block, bytelm.Block))]
    meta = {"world_size_env": int(os.environ.get("WORLD_SIZE", "1")), "num_processes": engine.accelerator.num_processes,
            "distributed_type": str(engine.accelerator.distributed_type), "steps": len(grads.steps),
            "checkpointed": engine.checkpointed_blocks, "blocks": len(blocks),
            "sharded_blocks": sum(isinstance(m, FSDPModule) for m in blocks)}
    if engine.accelerator.is_main_process:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(out_dir, f"{name}.safetensors"))
        Path(out_dir, f"{name}.json").write_text(json.dumps(meta))
    return {**meta, "tensors": tensors}


if __name__ == "__main__":
    out, *flags = sys.argv[1:]
    for model, checkpointing, dropout in RUNS:
        run(out, model, checkpointing, dropout, fsdp="fsdp" in flags)
    free_before_exit()  # FSDP2's device mesh, freed at interpreter exit, can abort the process
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
