"""Sharded, pickle-free checkpoints for models under FSDP2.

Every rank writes only its own slices, with `torch.distributed.checkpoint` (DCP) and the
`HuggingFaceStorageWriter` (safetensors, torch >= 2.8). A checkpoint directory holds:

    model/shard-0000R-model-00001-of-00001.safetensors   rank R's slices of the parameters
    optim/shard-0000R-model-00001-of-00001.safetensors   rank R's slices of exp_avg, exp_avg_sq, step, ...
    sharded.json                                         format, world size, optimizer hyperparameters

Each shard's safetensors header records where its slices sit in the full tensors (`DCP_SHARDING_INFO`),
so `HuggingFaceStorageReader` rebuilds the layout from the files alone: DCP's pickled `.metadata` is
never written, nothing is unpickled at load, and a checkpoint saved at N processes loads at any M.

Usage (all ranks call save/load; the directory must be visible to all of them):

    model, optimizer = accelerator.prepare(model, optimizer)      # FSDP2: parameters are DTensors
    if is_fsdp(accelerator):
        load_sharded(accelerator, model, optimizer, "ckpt/step-100")   # before training, any world size
        ...
        save_sharded(accelerator, model, optimizer, "ckpt/step-200")   # at a window boundary
    if is_sharded_checkpoint("ckpt/step-200"):                      # acctrain export CHECKPOINT OUT
        weights = full_state("ckpt/step-200")                       # offline, one process, no group

On CPU, Accelerate 1.15 silently drops `fsdp_plugin` when `cpu=True` (the FSDP branch of
`AcceleratorState.__init__` covers only accelerator device types, not MULTI_CPU) and wraps the model in
DDP instead; `use_fsdp2_on_cpu` routes `prepare` through Accelerate's own FSDP2 path (tests, CPU runs).

Under HSDP (replicas x shards, acctrain.sharding) the parameters are DTensors on a 2-D mesh, Replicate() across
replicas and Shard(0) within one; DCP's save planner writes each replicated slice once, spreading the writes over
the replicas (one replica's files may hold some parameters' slices, the other's the rest): the files together hold
each element once, as at plain FSDP, and a load reads them at any layout.
"""

from __future__ import annotations

import json
import math
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import HuggingFaceStorageReader, HuggingFaceStorageWriter
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from acctrain import barrier, private_apis

FORMAT = "acctrain-sharded-1"
MANIFEST = "sharded.json"
# Flat keys ("state.<fqn>.exp_avg", "param_groups.<fqn>.lr"): tensors go to DCP, the rest to JSON.
_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)


def is_fsdp(accelerator) -> bool:
    """True when `prepare` shards models with FSDP (then checkpoints must go through this module)."""
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP


def use_fsdp2_on_cpu(accelerator, fsdp_plugin, parallelism=None) -> None:
    """Make an `Accelerator(cpu=True)` running as several processes prepare models with FSDP2.

    Call right after creating the Accelerator, before `prepare`. Accelerate 1.16 ignores `fsdp_plugin`
    on MULTI_CPU; this sets the state it would have set on a GPU (`distributed_type = FSDP`, the plugin).
    `parallelism` (an Accelerate `ParallelismConfig`, HSDP's replicate x shard sizes) is attached with its
    device mesh, which `prepare` hands to `fully_shard`: Accelerate refuses it in the constructor on MULTI_CPU.
    """
    from accelerate.utils import DistributedType

    if accelerator.distributed_type != DistributedType.MULTI_CPU:
        raise RuntimeError(f"use_fsdp2_on_cpu needs a MULTI_CPU Accelerator, got {accelerator.distributed_type}")
    if getattr(fsdp_plugin, "fsdp_version", 1) != 2:
        raise ValueError("use_fsdp2_on_cpu supports fsdp_version=2 only")
    if accelerator.mixed_precision != "no":
        fsdp_plugin.set_mixed_precision(accelerator.mixed_precision)
    private_apis.set_accelerate_fsdp_state(accelerator, fsdp_plugin)
    # Public state attributes, as Accelerator.__init__ sets them on GPUs; None drops an earlier Engine's mesh.
    accelerator.state.parallelism_config = parallelism
    accelerator.state.device_mesh = parallelism.get_device_mesh("cpu") if parallelism is not None else None


@contextmanager
def _single_process_ok():
    """DCP warns on every call made without a process group (one process: expected here)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _state(model, optimizer):
    """The model's and optimizer's state as flat dicts of (sharded) tensors, plus the optimizer's non-tensors."""
    if optimizer is None:
        return get_model_state_dict(model, options=_OPTIONS), {}, {}
    model_sd, optim_sd = get_state_dict(model, optimizer, options=_OPTIONS)
    tensors = {k: v for k, v in optim_sd.items() if isinstance(v, torch.Tensor)}
    others = {k: v for k, v in optim_sd.items() if not isinstance(v, torch.Tensor)}
    return model_sd, tensors, others


def _unshared(state: dict) -> dict:
    """`state` with each tensor whose memory an earlier one holds (tied weights: GPT-2's input and output
    embeddings) replaced by a copy of it: the safetensors shards refuse tensors that share memory. As in the
    unsharded checkpoint, each name is written with its own bytes (a load writes the tied parameter twice)."""
    seen, out = set(), {}
    for key, value in state.items():
        local = value.to_local() if hasattr(value, "to_local") else value  # a DTensor's shard on this rank
        memory = local.untyped_storage().data_ptr()
        out[key] = value.clone() if memory and memory in seen else value
        seen.add(memory)
    return out


def _shapes(state: dict) -> dict:
    return {k: list(v.shape) for k, v in state.items()}  # a DTensor's shape is the full one


def save_sharded(accelerator, model, optimizer, directory) -> None:
    """Write `model` (and `optimizer`, unless None) into a new `directory`; every rank must call this."""
    directory = Path(directory)
    for part in ("model", "optim", MANIFEST):
        # Shards left over from an earlier save at another world size would be read back as part of this one.
        if (directory / part).exists():
            raise FileExistsError(f"{directory / part} exists; save_sharded writes only into a new directory")
    barrier.wait_for_everyone(accelerator)  # every rank has checked before any rank writes
    model_sd, optim_tensors, optim_others = _state(model, optimizer)
    model_sd, optim_tensors = _unshared(model_sd), _unshared(optim_tensors)
    if accelerator.is_main_process:
        directory.mkdir(parents=True, exist_ok=True)
        manifest = {"format": FORMAT, "world_size": accelerator.num_processes, "model": _shapes(model_sd),
                    "optim": _shapes(optim_tensors) if optimizer is not None else None,
                    "optim_hyperparameters": optim_others}
        # json refuses anything that is not plain data, so no object can slip in as a pickle.
        (directory / MANIFEST).write_text(json.dumps(manifest, sort_keys=True))
    with _single_process_ok():
        dcp.save(model_sd, storage_writer=HuggingFaceStorageWriter(str(directory / "model"), save_distributed=True))
        if optimizer is not None:
            dcp.save(optim_tensors, storage_writer=HuggingFaceStorageWriter(str(directory / "optim"), save_distributed=True))
    barrier.wait_for_everyone(accelerator)


def is_sharded_checkpoint(directory) -> bool:
    """True for a directory written by `save_sharded` (for `acctrain export` to join its shards: `full_state`)."""
    return (Path(directory) / MANIFEST).is_file()


def read_manifest(directory) -> dict:
    """The JSON manifest of a sharded checkpoint (format, world size at save, tensor shapes, hyperparameters)."""
    manifest = json.loads((Path(directory) / MANIFEST).read_text())
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{directory} is not a sharded acctrain checkpoint: {manifest.get('format')!r}")
    return manifest


def _reader(path: Path, shapes: dict) -> HuggingFaceStorageReader:
    """A reader for the shards in `path`, once they are known to hold exactly the tensors in `shapes`, whole.

    The reader infers each tensor's size from the shards it finds: a lost shard file would otherwise
    shrink a tensor or leave part of it at its fresh values, without an error from DCP.
    """
    reader = HuggingFaceStorageReader(str(path))
    stored = reader.read_metadata().state_dict_metadata
    if stored.keys() != shapes.keys():
        raise ValueError(f"{path}: tensors missing {sorted(shapes.keys() - stored.keys())[:5]}, "
                         f"unexpected {sorted(stored.keys() - shapes.keys())[:5]}")
    for key, md in stored.items():
        chunks = {(tuple(c.offsets), tuple(c.sizes)) for c in md.chunks}
        held = sum(math.prod(sizes) for _, sizes in chunks)
        if list(md.size) != shapes[key] or held != math.prod(shapes[key]):
            raise ValueError(f"{path}: shards hold {held} elements of {key!r} {list(md.size)}, expected {shapes[key]}")
    return reader


def _restore_types(saved, current):
    """JSON turns tuples (AdamW's betas) into lists; give values back the type the optimizer uses now."""
    if isinstance(current, tuple) and isinstance(saved, list):
        return tuple(saved)
    return saved


def load_sharded(accelerator, model, optimizer, directory) -> None:
    """Load a `save_sharded` checkpoint into `model` (and `optimizer`, unless None), at any world size.

    Every rank must call this, after `prepare` and before training. Only safetensors and JSON are read.
    """
    directory = Path(directory)
    manifest = read_manifest(directory)
    if optimizer is not None and manifest["optim"] is None:
        raise ValueError(f"{directory} holds no optimizer state")
    model_sd, optim_tensors, optim_others = _state(model, optimizer)  # the targets, sharded as now
    with _single_process_ok():
        dcp.load(model_sd, storage_reader=_reader(directory / "model", manifest["model"]))
        if optimizer is not None:
            dcp.load(optim_tensors, storage_reader=_reader(directory / "optim", manifest["optim"]))
    if optimizer is None:
        set_model_state_dict(model, model_sd, options=_OPTIONS)
        return
    saved = manifest["optim_hyperparameters"]
    if saved.keys() != optim_others.keys():
        raise ValueError(f"optimizer hyperparameters differ: missing {sorted(optim_others.keys() - saved.keys())[:5]}, "
                         f"unexpected {sorted(saved.keys() - optim_others.keys())[:5]}")
    optim_sd = dict(optim_tensors)
    optim_sd.update({k: _restore_types(v, optim_others[k]) for k, v in saved.items()})
    set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd, options=_OPTIONS)


def full_state(directory) -> dict[str, torch.Tensor]:
    """The model shards of a checkpoint joined: whole tensors (on the CPU) with plain parameter names.

    Offline: one process, no process group. Holds the full model in memory once.
    """
    manifest = read_manifest(directory)
    reader = _reader(Path(directory) / "model", manifest["model"])
    full = {k: torch.empty(md.size, dtype=md.properties.dtype)
            for k, md in reader.read_metadata().state_dict_metadata.items()}
    with _single_process_ok():
        dcp.load(full, storage_reader=reader, no_dist=True)
    return full
