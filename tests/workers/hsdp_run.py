"""grad_run's problem (TinyTokenModel, SGD, clipping) trained by the Engine under a chosen layout, recording what
tests/test_hsdp.py compares: final weights, gradient norms, and how the parameters are really placed.

    python -m torch.distributed.run --nproc_per_node 4 -m tests.workers.hsdp_run OUT_DIR NAME JSON [SECOND_JSON]

JSON holds extra TrainConfig fields, e.g. `hsdp '{"fsdp": true, "fsdp_shard_size": 2}'`, or `ddp '{}'`. One Engine
per launch, except SECOND_JSON: a second FSDP Engine in the same processes with other FSDP settings, refused (rank 0
writes OUT_DIR/second-refused.json with the ConfigError's field). Rank 0 writes OUT_DIR/NAME.json (world size, grad norms, placements, mesh, the start-up
summary's sharding line, seconds per step) and OUT_DIR/NAME.safetensors (final weights, gathered; and every
rank's local slice of hidden.weight as local.RANK, to show which ranks hold the same slice).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from acctrain import Callback, Engine, TrainConfig
from acctrain.cli import free_before_exit
from acctrain.errors import ConfigError
from acctrain.summary import fsdp_layout
from tests.support.runs import CLIP
from tests.support.tiny import VarLenTokens, collate, make_model, token_loss
from tests.workers.grad_run import DATASET_LEN, EPOCHS, GLOBAL_BATCH, LR


class Norms(Callback):
    """Each step's pre-clip gradient norm, and the wall time of the steps after the first (one warm-up step)."""

    def __init__(self):
        self.grad_norms, self.started = [], None

    def before_optimizer_step(self, engine):
        self.grad_norms.append(float(engine.grad_norm))  # note: a host sync, as the loop's own logging does
        if self.started is None:
            self.started = time.perf_counter()


def run(out_dir: str, name: str, options: dict) -> None:
    micro, width = options.pop("micro", 1), options.pop("width", 16)
    config = TrainConfig(output_dir=os.path.join(out_dir, f"run-{name}"), global_batch_size=GLOBAL_BATCH,
                         micro_batch_size=micro, epochs=EPOCHS, lr=LR, weight_decay=0.0,
                         max_grad_norm=CLIP, scheduler="constant", log_every=100, save_every_minutes=0,
                         cpu_threads=1, **options)
    norms = Norms()
    engine = Engine(make_model(0, width=width), config, VarLenTokens(DATASET_LEN), loss_fn=token_loss,
                    optimizer=lambda groups: torch.optim.SGD(groups, lr=LR), callbacks=[norms], collate_fn=collate)
    engine.fit()
    seconds_per_step = (time.perf_counter() - norms.started) / max(1, len(norms.grad_norms) - 1)
    model = engine.unwrapped_model
    hidden = model.hidden.weight
    local = hidden.to_local() if hasattr(hidden, "to_local") else hidden
    slices = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(slices, local.detach().contiguous())  # every rank's own slice, to compare the replicas'
    params = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone() for n, p in model.named_parameters()}
    gathered = after_a_forward(model)
    meta = {
        "world_size_env": int(os.environ["WORLD_SIZE"]),
        "num_processes": engine.accelerator.num_processes,
        "distributed_type": str(engine.accelerator.distributed_type),
        "grad_norms": norms.grad_norms,
        "placements": {n: [str(k) for k in p.placements] for n, p in model.named_parameters() if hasattr(p, "placements")},
        "mesh": (dict(zip(hidden.device_mesh.mesh_dim_names or ("world",), hidden.device_mesh.mesh.shape))
                 if hasattr(hidden, "device_mesh") else None),
        "summary": fsdp_layout(model),
        "seconds_per_step": seconds_per_step,
        "after_forward": gathered,
    }
    if engine.accelerator.is_main_process:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        save_file({**params, **{f"local.{rank}": s for rank, s in enumerate(slices)}},
                  os.path.join(out_dir, f"{name}.safetensors"))
        Path(out_dir, f"{name}.json").write_text(json.dumps(meta))
    # Not engine.close(): it ends the process group, and a second Engine re-forming it at 4 processes never joined.


def after_a_forward(model) -> str:
    """The type of `hidden.weight` (an FSDP unit of its own under the test's wrap policy) between a forward and its
    backward: DTensor (its shard) when FSDP2 reshards after the forward, a plain Parameter (gathered) when not."""
    loss = model(torch.arange(6).view(1, 6)).sum()
    kind = type(model.hidden.weight).__name__
    (loss * 0).backward()  # every rank: FSDP's backward collectives; the gradients are dropped with the run
    return kind


if __name__ == "__main__":
    run(sys.argv[1], sys.argv[2], json.loads(sys.argv[3]))
    if len(sys.argv) > 4:  # a second Engine in these processes, with other FSDP settings: refused
        try:
            run(sys.argv[1], "second", json.loads(sys.argv[4]))
        except ConfigError as err:
            if dist.get_rank() == 0:
                Path(sys.argv[1], "second-refused.json").write_text(json.dumps({"field": err.field, "message": str(err)}))
    free_before_exit()  # FSDP2's device mesh, freed at interpreter exit, can abort the process
    if dist.is_initialized():
        dist.destroy_process_group()
