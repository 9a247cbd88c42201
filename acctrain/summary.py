"""Model summary: parameter counts per top-level module, trainable and frozen, and the size in bytes.

    print(model_summary(model))                 # frozen = requires_grad False
    print(model_summary(model, engine.is_frozen))
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
    return "\n".join(lines)
