"""Memory switches: activation checkpointing of a model's repeated blocks, and the largest micro-batch that fits.

    checkpoint_activations(model, block="")      # before compile and prepare; returns e.g. "4 x Block"
    plan = fit_micro_batch(plan, accelerator, model, train_data, collate_fn, loss_fn)   # micro_batch_size='auto'

**Activation checkpointing** keeps only each block's inputs in the forward and runs the block again in the
backward, where its activations are needed: the activations of one block at a time instead of all of them,
for about one more forward of compute. Each block's `forward` is replaced, on the instance, by
`torch.utils.checkpoint.checkpoint(forward, ..., use_reentrant=False)`: parameter names and state dicts stay
as they were (torch's `checkpoint_wrapper` would add `_checkpoint_wrapped_module.` to every name), module
hooks stay outside the checkpoint (so under FSDP2 the recompute runs on parameters that its pre-backward hook
has gathered, without a second all-gather), and the RNG state of the forward is replayed in the recompute
(`preserve_rng_state`), so dropout draws the same masks and the gradients are those of the run without it.
A Hugging Face model that supports it checkpoints its own layers (`activation_checkpointing_enable`, or
`gradient_checkpointing_enable` before Transformers 5): it knows which layers to take, and turns the KV cache
off in training, which a recompute would otherwise update twice.

**micro_batch_size='auto'** (CUDA): every rank tries a forward and backward of the run's first samples at the
largest divisor of its per-rank batch, and at the next smaller divisor (at most half) after each out-of-memory
error, holding room for an Adam-like optimizer state meanwhile; all ranks then take the smallest of their
answers, and the accumulation follows (global / (micro x world)). The global batch, and so the samples of
every optimizer step, do not depend on it: a resume continues the same plan whatever micro-batch it finds.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
from collections import Counter
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import nn

from acctrain import loss_scaling
from acctrain.data import DataPlan, is_stream, per_rank_batch, to_device
from acctrain.errors import ConfigError

if TYPE_CHECKING:
    from accelerate import Accelerator

AUTO = "auto"
BLOCK_FIELD = "activation_checkpointing_block"

# ------------------------------------------------------------------------------------ activation checkpointing


def checkpoint_activations(model: nn.Module, block: str = "") -> str:
    """Checkpoint the activations of `model`'s blocks: those of class `block`, else the repeated ones (see
    `repeated_block_classes`), else a Hugging Face model's own layers. Returns what was checkpointed, e.g.
    "4 x Block". Call it before `torch.compile` and `accelerator.prepare`; calling it again changes nothing."""
    if _checkpoints_itself(model):
        if block:
            raise ConfigError(BLOCK_FIELD, f"{type(model).__name__} is a Hugging Face model that checkpoints its own "
                              "layers (activation_checkpointing_enable, which also keeps its KV cache off in training); "
                              "leave activation_checkpointing_block empty.")
        return _enable_hf_checkpointing(model)
    blocks = find_blocks(model, block)
    for module in blocks:
        if not hasattr(module, "_acctrain_unchecked_forward"):
            module._acctrain_unchecked_forward = module.forward  # bound: a deepcopy of the model rebinds it
            module.forward = _checkpointed_forward.__get__(module)
    return _count(blocks)


def _checkpointed_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """A block's forward that keeps only its inputs for the backward, and recomputes the rest there."""
    if not torch.is_grad_enabled():  # evaluation, predict: no backward to recompute for
        return self._acctrain_unchecked_forward(*args, **kwargs)
    return torch.utils.checkpoint.checkpoint(self._acctrain_unchecked_forward, *args, use_reentrant=False, **kwargs)


def find_blocks(model: nn.Module, block: str = "") -> list[nn.Module]:
    """The modules to checkpoint: every module of class `block` (its name, or module.qualname), else of the
    repeated block classes; a module inside another one found is left to it (no checkpoint inside a checkpoint)."""
    if block:
        found = [m for m in model.modules() if block in (type(m).__name__, _qualified(type(m)))]
        if not found:
            raise ConfigError(BLOCK_FIELD, f"{type(model).__name__} has no module of class {block!r}; its classes "
                              f"of modules with submodules are: {', '.join(composite_classes(model))}.")
    else:
        classes = repeated_block_classes(model)
        if not classes:
            raise ConfigError(BLOCK_FIELD, f"found no repeated block in {type(model).__name__}: no class of module "
                              "with submodules appears twice in one nn.ModuleList or nn.Sequential. Name the block "
                              "class to checkpoint, activation_checkpointing_block=NAME, one of: "
                              f"{', '.join(composite_classes(model))}.")
        found = [m for m in model.modules() if type(m) in classes]
    inside = {id(sub) for m in found for sub in m.modules() if sub is not m}
    return [m for m in found if id(m) not in inside]


def repeated_block_classes(model: nn.Module) -> list[type]:
    """The classes of modules with submodules of their own that appear at least twice among the children of one
    nn.ModuleList or nn.Sequential (transformer blocks, ResNet blocks), innermost first: a class whose modules
    hold modules of another such class (a stage of blocks) is left out for the blocks inside it."""
    found: dict[type, None] = {}  # ordered: the first container first
    for container in model.modules():
        if isinstance(container, (nn.ModuleList, nn.Sequential)):
            counts = Counter(type(child) for child in container.children() if _composite(child))
            found.update((cls, None) for cls, n in counts.items() if n >= 2)

    def holds_another(cls: type) -> bool:
        return any(isinstance(sub, tuple(c for c in found if c is not cls))
                   for m in model.modules() if type(m) is cls for sub in m.modules() if sub is not m)

    return [cls for cls in found if not holds_another(cls)]


def composite_classes(model: nn.Module) -> list[str]:
    """The class names of `model`'s modules that have submodules (the candidates for a block), in model order."""
    return list(dict.fromkeys(type(m).__name__ for m in model.modules() if _composite(m)))


def _composite(module: nn.Module) -> bool:
    """A module with submodules and a forward of its own (not a bare ModuleList or ModuleDict)."""
    return not isinstance(module, (nn.ModuleList, nn.ModuleDict)) and next(module.children(), None) is not None


def _qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _count(modules: list[nn.Module]) -> str:
    return ", ".join(f"{n} x {name}" for name, n in Counter(type(m).__name__ for m in modules).items())


def _checkpoints_itself(model: nn.Module) -> bool:
    """A Hugging Face Transformers model that supports gradient checkpointing."""
    return bool(getattr(model, "supports_gradient_checkpointing", False)) and callable(
        getattr(model, "gradient_checkpointing_enable", None))


def _enable_hf_checkpointing(model: nn.Module) -> str:
    """Turn on a Hugging Face model's own checkpointing, non-reentrant (RNG replayed, as ours)."""
    kwargs = {"use_reentrant": False}
    if callable(getattr(model, "activation_checkpointing_enable", None)):  # Transformers >= 5
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    layers = [m for m in model.modules() if m is not model and getattr(m, "gradient_checkpointing", False) is True]
    try:  # the per-layer modules, where Transformers has the class for them (not the stack that holds them)
        from transformers.modeling_layers import GradientCheckpointingLayer

        layers = [m for m in layers if isinstance(m, GradientCheckpointingLayer)] or layers
    except ImportError:
        pass
    return f"{_count(layers) or 'its layers'} (the model's own)"


def refuse_accelerate_checkpointing(fsdp_plugin: Any) -> None:
    """Refuse Accelerate's FSDP activation checkpointing (fsdp_activation_checkpointing in an accelerate config,
    FSDP_ACTIVATION_CHECKPOINTING): it wraps blocks with `preserve_rng_state=False`, so a recompute draws other
    dropout masks than the forward did and the gradients are wrong with dropout."""
    if getattr(fsdp_plugin, "activation_checkpointing", False):
        raise ConfigError("activation_checkpointing", "the Accelerate FSDP config turns on its own activation "
                          "checkpointing (fsdp_activation_checkpointing / FSDP_ACTIVATION_CHECKPOINTING), which does "
                          "not replay the RNG in the recompute (wrong gradients with dropout). Turn it off there and "
                          "set activation_checkpointing=true instead (the same memory saving, under FSDP too).")


# ------------------------------------------------------------------------------------ micro_batch_size='auto'


def check_micro_batch(config: Any, accelerator: Accelerator) -> None:
    """Refuse micro_batch_size='auto' where it cannot be found: off CUDA, and where a trial forward would need
    the other ranks (FSDP's all-gathers, DeepSpeed's engine), so that one rank's out-of-memory error would
    leave the others waiting."""
    from accelerate.utils import DistributedType

    if config.micro_batch_size != AUTO:
        return
    if accelerator.device.type != "cuda":
        raise ConfigError("micro_batch_size", f"'auto' tries micro-batches on a CUDA GPU until one fits, but this run "
                          f"is on {accelerator.device.type}; set a number (a divisor of global_batch_size / world size).")
    if accelerator.distributed_type not in (DistributedType.NO, DistributedType.MULTI_GPU):
        raise ConfigError("micro_batch_size", f"'auto' supports one GPU or DDP, not {accelerator.distributed_type.value}"
                          " (a trial there needs every rank); set a number.")


def fit_micro_batch(plan: DataPlan, accelerator: Accelerator, model: nn.Module, train_data: Any,
                    collate_fn: Callable | None, loss_fn: Callable | None) -> DataPlan:
    """`plan` with the largest micro-batch that fits on every rank's GPU (a divisor of the per-rank batch).

    `model` is the unwrapped model, on its GPU: its trials involve no other rank (no DDP hook fires outside
    DDP's forward). Its weights are unchanged; its buffers (BatchNorm statistics) are put back."""
    per_rank = per_rank_batch(plan.global_batch, plan.world_size)
    samples = _first_samples(train_data, plan, per_rank)
    collate = collate_fn or torch.utils.data.default_collate
    tried = []

    def fits(size: int) -> bool:
        tried.append(size)
        ok = _fits(model, collate(samples[:size]), size, loss_fn, accelerator.device)
        if not ok and accelerator.device.type == "cuda":
            torch.cuda.empty_cache()  # the failed trial's blocks (its frame is gone now), before the next
        return ok

    with _trying(model, accelerator.device) as room_held:
        size = largest_fitting(per_rank, fits) if room_held else 0
    chosen = torch.tensor([size], device=accelerator.device)
    if accelerator.num_processes > 1:  # every rank trains with the smallest of their answers
        torch.distributed.all_reduce(chosen, op=torch.distributed.ReduceOp.MIN)
    chosen = int(chosen.item())  # note: host-device sync, once at start-up
    if not chosen:
        raise ConfigError("micro_batch_size", f"not even one sample's forward and backward fits on {accelerator.device}"
                          " of some rank; use activation_checkpointing=true, mixed_precision=bf16, fsdp=true (with a "
                          "micro_batch_size) or a smaller model.")
    if accelerator.is_main_process:
        print(f"micro_batch_size=auto: tried {', '.join(map(str, tried))} on rank 0; {chosen} fits on every rank, "
              f"accumulation {plan.global_batch // (chosen * plan.world_size)}")
    return dataclasses.replace(plan, micro_batch=chosen)


def largest_fitting(per_rank: int, fits: Callable[[int], bool]) -> int:
    """The largest divisor of `per_rank` for which `fits`, trying per_rank first and after each failure the
    largest divisor at most half the last size (0 when not even 1 fits)."""
    size = per_rank
    while size and not fits(size):
        size = max((d for d in range(1, size // 2 + 1) if per_rank % d == 0), default=0)
    return size


@contextlib.contextmanager
def _trying(model: nn.Module, device: torch.device):
    """While trying: room held for the optimizer state (it comes at the first step); yields whether that room was
    there. After: the buffers (BatchNorm
    statistics) as before, no gradient, the failed trials' cached blocks released, and the peak memory that
    training logs counted from here."""
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    try:
        room = _optimizer_room(model, device)
    except torch.cuda.OutOfMemoryError:
        room = None  # not even the optimizer state fits: nothing does (all ranks learn it from the reduction)
    try:
        yield room is not None
    finally:
        del room
        with torch.no_grad():
            for name, b in model.named_buffers():
                b.copy_(buffers[name])
        model.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)


def _fits(model: nn.Module, batch: Any, size: int, loss_fn: Callable | None, device: torch.device) -> bool:
    """Whether a forward and backward of `batch` runs without running out of GPU memory; no gradient is kept."""
    try:
        batch = to_device(batch, device)
        out = loss_fn(model, batch) if loss_fn is not None else loss_scaling.model_loss(model, batch)
        loss_sum, _, _ = loss_scaling.normalise(out, size, torch.float32)
        loss_sum.backward()
        return True
    except torch.cuda.OutOfMemoryError:
        return False  # leaving the handler frees the trial's tensors (its traceback held them)
    finally:
        model.zero_grad(set_to_none=True)


def _optimizer_room(model: nn.Module, device: torch.device) -> torch.Tensor:
    """Memory for two fp32 state tensors per trainable parameter (AdamW's exp_avg and exp_avg_sq)."""
    numel = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return torch.empty(2 * numel, dtype=torch.float32, device=device)


def _first_samples(train_data: Any, plan: DataPlan, count: int) -> list:
    """The run's first `count` samples (those of its first optimizer step, in order), repeated if fewer."""
    if is_stream(train_data):
        first = list(itertools.islice(iter(train_data), count))
    else:
        first = [train_data[i] for i in plan.window(0, 0)[:count]]
    if not first:
        raise ConfigError("train_data", "the training data has no sample to try micro-batches on.")
    return [first[i % len(first)] for i in range(count)]
