"""Model summary: parameter counts per top-level module, trainable and frozen, the size in bytes, and how FSDP2
shards the parameters.

    print(model_summary(model))                 # frozen = requires_grad False
    print(model_summary(model, engine.is_frozen))
    print(fsdp_layout(model))                   # 'FSDP2: 2 replicas x 2 shards', or None when not sharded
"""

from __future__ import annotations

from typing import Callable

import torch


def model_summary(model: torch.nn.Module, is_frozen: Callable[[torch.nn.Parameter], bool] | None = None) -> str:
    """A table of the model's top-level modules: type, parameters, trainable, frozen, bytes; and a total."""
    is_frozen = is_frozen or (lambda p: not p.requires_grad)
    rows, seen = [], set()

    def count(params) -> tuple[int, int, int]:
        total = trainable = size = 0
        for p in params:
            if id(p) in seen:  # a tied parameter counts once, where it first appears
                continue
            seen.add(id(p))
            total += p.numel()
            size += p.numel() * p.element_size()
            trainable += 0 if is_frozen(p) else p.numel()
        return total, trainable, size

    for name, module in model.named_children():
        rows.append((name, type(module).__name__, *count(module.parameters())))
    direct = [p for n, p in model.named_parameters(recurse=False)]
    if direct:
        rows.append(("(own)", type(model).__name__, *count(direct)))
    total = sum(r[2] for r in rows)
    trainable = sum(r[3] for r in rows)
    size = sum(r[4] for r in rows) + sum(b.numel() * b.element_size() for b in model.buffers())
    width = max([len(r[0]) for r in rows] + [6])
    lines = [f"{'module':<{width}}  {'type':<20} {'params':>12} {'trainable':>12} {'frozen':>12}"]
    for name, kind, n, t, _ in rows:
        lines.append(f"{name:<{width}}  {kind[:20]:<20} {n:>12,} {t:>12,} {n - t:>12,}")
    lines.append(f"{'total':<{width}}  {'':<20} {total:>12,} {trainable:>12,} {total - trainable:>12,}")
    lines.append(f"size: {size:,} bytes ({size / 2**20:.1f} MiB) of parameters and buffers")
    layout = fsdp_layout(model)
    if layout is not None:
        lines.append(f"sharding: {layout}")
    return "\n".join(lines)


def fsdp_layout(model: torch.nn.Module) -> str | None:
    """How the parameters are really sharded, read from their DTensor meshes (not from the config): 'FSDP2: 4
    shards', or 'FSDP2: 2 replicas x 2 shards' for HSDP's (Replicate, Shard(0)) mesh; None without DTensors."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor, Replicate

    if isinstance(model, FSDPModule):
        # A forward before training (the Engine's preflight) leaves the root's parameters gathered, as plain
        # tensors, until a backward; resharding (public, what the next forward undoes) shows the DTensors.
        model.reshard()
    param = next((p for p in model.parameters() if isinstance(p, DTensor)), None)
    if param is None:
        return None
    sizes = param.device_mesh.mesh.shape
    replicas = [size for size, kind in zip(sizes, param.placements) if isinstance(kind, Replicate)]
    shards = [size for size, kind in zip(sizes, param.placements) if kind.is_shard()]
    parts = [f"{replicas[0]} replicas"] if replicas else []
    count = shards[0] if shards else 1
    parts.append(f"{count} shard{'s' if count != 1 else ''}")
    return "FSDP2: " + " x ".join(parts)
