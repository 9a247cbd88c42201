"""Train a small model under Accelerate's FSDP2 on CPU (gloo), save or load a sharded checkpoint.

    python -m torch.distributed.run --nproc_per_node N -m tests.workers.fsdp_run save CKPT REF_DIR
    python -m torch.distributed.run --nproc_per_node N -m tests.workers.fsdp_run load CKPT REF_DIR

`save`: STEPS AdamW steps, `save_sharded` into CKPT, then the full (gathered) model and optimizer state
into REF_DIR/saved-{model,optim}.safetensors and the hyperparameters into REF_DIR/saved-hparams.json;
then CONTINUE more steps and the weights after them into REF_DIR/continued-N.safetensors.
`load`: a model with other initial weights and a fresh optimizer, `load_sharded` (with pickle.load and
torch.load made to fail), the full state into REF_DIR/loaded-N-{model,optim}.safetensors and
loaded-N-hparams.json, then the same CONTINUE steps into REF_DIR/resumed-N.safetensors.
Rank 0 writes; N is the world size.
"""

from __future__ import annotations

import json
import os
import pickle
import sys
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from acctrain.barrier import wait_for_everyone
from acctrain.cli import free_before_exit
from acctrain.checkpoint.sharded import is_fsdp, load_sharded, save_sharded, use_fsdp2_on_cpu

VOCAB, STEPS, CONTINUE, GLOBAL_ROWS = 32, 3, 2, 8


class OddModel(nn.Module):
    """Shapes that do not split evenly at 2 processes: 7 rows (4 + 3) and 1 row (rank 1 holds none)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 12)
        self.hidden = nn.Linear(12, 7)
        self.norm = nn.LayerNorm(7)
        self.head = nn.Linear(7, VOCAB)
        self.temperature = nn.Parameter(torch.ones(1))
        self.register_buffer("offset", torch.linspace(-1, 1, VOCAB))  # persistent, not sharded

    def forward(self, ids):
        return self.head(self.norm(torch.tanh(self.hidden(self.embed(ids))))) * self.temperature + self.offset


def make_model(seed: int) -> OddModel:
    torch.manual_seed(seed)
    return OddModel()


def batch(step: int, rank: int, world: int):
    """This rank's rows of a fixed global batch: the same data in total at any world size."""
    g = torch.Generator().manual_seed(1000 + step)
    ids = torch.randint(0, VOCAB, (GLOBAL_ROWS, 6), generator=g)
    labels = torch.randint(0, VOCAB, (GLOBAL_ROWS, 6), generator=g)
    return ids[rank::world], labels[rank::world]


def train(accelerator, model, optimizer, steps: range):
    for step in steps:
        ids, labels = batch(step, accelerator.process_index, accelerator.num_processes)
        loss = F.cross_entropy(model(ids).flatten(0, 1), labels.flatten())
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()


def full_state(model, optimizer):
    """Gathered model and optimizer tensors with flat names, plus the optimizer's non-tensor values."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
    from torch.distributed.tensor import DTensor

    msd, osd = get_state_dict(model, optimizer, options=StateDictOptions(flatten_optimizer_state_dict=True))
    full = lambda t: (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone().contiguous()  # noqa: E731
    model_t = {k: full(v) for k, v in msd.items()}
    optim_t = {k: full(v) for k, v in osd.items() if isinstance(v, torch.Tensor)}
    hparams = {k: list(v) if isinstance(v, tuple) else v for k, v in osd.items() if not isinstance(v, torch.Tensor)}
    hparams["__types__"] = {k: type(v).__name__ for k, v in osd.items() if not isinstance(v, torch.Tensor)}
    return model_t, optim_t, hparams


@contextmanager
def no_unpickling():
    """Fail loudly if anything unpickles a file while loading (DCP's own .metadata reader uses pickle.load)."""
    def refuse(*args, **kwargs):
        raise AssertionError("unpickling during load_sharded")

    saved = pickle.load, torch.load
    pickle.load, torch.load = refuse, refuse
    try:
        yield
    finally:
        pickle.load, torch.load = saved


def write(accelerator, ref: Path, name: str, model, optimizer, with_optim: bool = True):
    model_t, optim_t, hparams = full_state(model, optimizer)  # collective: every rank
    if accelerator.is_main_process:
        save_file(model_t, str(ref / f"{name}-model.safetensors") if with_optim else str(ref / f"{name}.safetensors"))
        if with_optim:
            save_file(optim_t, str(ref / f"{name}-optim.safetensors"))
            (ref / f"{name}-hparams.json").write_text(json.dumps(hparams, sort_keys=True))


def main(mode: str, ckpt: str, ref_dir: str):
    from accelerate import Accelerator, FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin(fsdp_version=2)
    accelerator = Accelerator(cpu=True, fsdp_plugin=plugin)
    assert accelerator.num_processes == int(os.environ["WORLD_SIZE"]), accelerator.num_processes
    use_fsdp2_on_cpu(accelerator, plugin)
    assert is_fsdp(accelerator) and accelerator.is_fsdp2
    world, ref = accelerator.num_processes, Path(ref_dir)

    model = make_model(seed=0 if mode == "save" else 7)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05, betas=(0.8, 0.95), weight_decay=0.1)
    model, optimizer = accelerator.prepare(model, optimizer)
    from torch.distributed.tensor import DTensor

    assert all(isinstance(p, DTensor) for p in model.parameters()), "parameters are not sharded"

    if mode == "save":
        train(accelerator, model, optimizer, range(STEPS))
        save_sharded(accelerator, model, optimizer, ckpt)
        write(accelerator, ref, "saved", model, optimizer)
        train(accelerator, model, optimizer, range(STEPS, STEPS + CONTINUE))
        write(accelerator, ref, f"continued-{world}", model, optimizer, with_optim=False)
    else:
        with no_unpickling():
            load_sharded(accelerator, model, optimizer, ckpt)
        write(accelerator, ref, f"loaded-{world}", model, optimizer)
        train(accelerator, model, optimizer, range(STEPS, STEPS + CONTINUE))
        write(accelerator, ref, f"resumed-{world}", model, optimizer, with_optim=False)
    wait_for_everyone(accelerator)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:4])
    free_before_exit()  # FSDP2's device mesh, freed at interpreter exit, can abort the process
