"""micro_batch_size='auto' where each rank fits a different micro-batch: all ranks must train with the smallest.

    python -m torch.distributed.run --nproc_per_node 2 -m tests.workers.auto_micro_run OUT_DIR cpu|cuda

cpu: the search itself (acctrain.memory.fit_micro_batch, over gloo) with `Limited` models, which run out of
memory above a number of samples per forward (rank 0: LIMITS[0], rank 1: LIMITS[1]) by raising torch's
OutOfMemoryError, as the CUDA allocator does; 'auto' itself is refused off CUDA before any search.
cuda: an Engine with micro_batch_size='auto' on each rank's GPU, whose `Greedy` model allocates a share of the
GPU's free memory per sample (rank 1 four times rank 0's).
Each rank writes `{OUT_DIR}/rank{R}.json`: the plan's micro-batch and accumulation, and what the search left.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path

import torch
from torch import nn

from acctrain import Engine, TrainConfig, memory, runtime
from acctrain.cli import free_before_exit
from acctrain.data import DataPlan

GLOBAL_BATCH = 48
LIMITS = (100, 5)  # rank 0 fits its whole per-rank batch (24), rank 1 at most 5 samples: 24, 12, 6 fail, 3 fits


class Limited(nn.Module):
    """A small MLP with BatchNorm that runs out of memory above `limit` samples per forward."""

    def __init__(self, limit: int):
        super().__init__()
        self.limit = limit
        self.net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > self.limit:
            raise torch.OutOfMemoryError(f"{x.shape[0]} samples need more memory than there is (limit {self.limit})")
        return self.net(x)


class Greedy(nn.Module):
    """A linear model whose forward also allocates `bytes_per_sample` bytes of GPU memory per sample."""

    def __init__(self, bytes_per_sample: int):
        super().__init__()
        self.bytes_per_sample = bytes_per_sample
        self.linear = nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        held = torch.empty(x.shape[0] * self.bytes_per_sample, dtype=torch.uint8, device=x.device)
        del held  # the allocation is what may fail; training needs only the linear layer
        return self.linear(x)


def samples(n: int = 96) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(4, generator=g), torch.randn(1, generator=g)) for _ in range(n)]


def mse(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return ((model(x) - y) ** 2).mean()


def search(out_dir: str) -> dict:
    """The search and the agreement, on CPU: fit_micro_batch called as the Engine calls it on a GPU."""
    rank = int(os.environ.get("RANK", "0"))
    cfg = TrainConfig(output_dir=out_dir, global_batch_size=GLOBAL_BATCH, micro_batch_size="auto", cpu=True)
    accelerator = runtime.make_accelerator(dataclasses.replace(cfg, micro_batch_size=1))  # 'auto' is refused on CPU
    torch.manual_seed(0)
    model = Limited(LIMITS[rank] if accelerator.num_processes > 1 else 12)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = samples()
    plan = memory.fit_micro_batch(DataPlan.for_run(data, None, cfg, accelerator.num_processes), accelerator, model,
                                  data, None, mse)
    return {"rank": rank, "num_processes": accelerator.num_processes, "micro_batch": plan.micro_batch,
            "accumulation": plan.accumulation, "unchanged": all(torch.equal(v, before[k])
                                                                for k, v in model.state_dict().items()),
            "grads_left": sum(p.grad is not None for p in model.parameters())}


def on_gpus(out_dir: str) -> dict:
    """The Engine with micro_batch_size='auto' on each rank's GPU; rank 1's model needs 4x the memory per sample."""
    rank = int(os.environ.get("RANK", "0"))
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    free = torch.cuda.mem_get_info()[0]
    cfg = TrainConfig(output_dir=out_dir, global_batch_size=128, micro_batch_size="auto", max_steps=2, log_every=1)
    torch.manual_seed(0)
    engine = Engine(Greedy(free // (24 if rank == 0 else 6)), cfg, samples(256), loss_fn=mse)
    engine.fit()
    return {"rank": rank, "num_processes": engine.accelerator.num_processes, "micro_batch": engine.plan.micro_batch,
            "accumulation": engine.plan.accumulation, "steps": engine.state.step}


if __name__ == "__main__":
    out, mode = sys.argv[1:]
    result = search(out) if mode == "cpu" else on_gpus(out)
    Path(out).mkdir(parents=True, exist_ok=True)
    Path(out, f"rank{result['rank']}.json").write_text(json.dumps(result))
    free_before_exit()
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
