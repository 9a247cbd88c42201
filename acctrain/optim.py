"""The optimizer: a default AdamW, or the user's optimizer or optimizer factory.

Weight decay applies to weight matrices and embeddings only: parameters with fewer than two dimensions
(biases, LayerNorm/BatchNorm weights) go into a group with no decay, as in nanoGPT and the HF Trainer.
`lr_mults` (the config's `param_groups`) gives parameters matching a name pattern their own lr
multiplier: discriminative learning rates. Each group records its `base_lr`, which the schedule
multiplies at every optimizer step.
"""

from __future__ import annotations

import fnmatch
from typing import Callable

import torch

from acctrain.errors import ConfigError


def matches(name: str, pattern: str) -> bool:
    """A parameter name matches a module prefix ('backbone' -> 'backbone.*') or a glob ('*.bias')."""
    return name == pattern or name.startswith(pattern + ".") or fnmatch.fnmatchcase(name, pattern)


def param_groups(model: torch.nn.Module, lr: float, weight_decay: float, lr_mults: dict[str, float] = {}) -> list[dict]:
    """All parameters, grouped by the first `lr_mults` pattern they match (else 'default'), each split into
    a decayed and a non-decayed group. Frozen parameters are included: freezing happens in the Engine."""
    groups: dict[tuple[str, bool], list] = {}
    for name, param in model.named_parameters():
        pattern = next((p for p in lr_mults if matches(name, p)), "default")
        groups.setdefault((pattern, param.ndim >= 2), []).append(param)
    for pattern in lr_mults:
        if not any(key[0] == pattern for key in groups):
            raise ConfigError(f"param_groups.{pattern}", "matches no parameter name; use a module prefix like "
                              "'backbone' or a glob like 'encoder.layers.*'.")
    return [
        {"params": params, "name": pattern if decay else f"{pattern}/no_decay", "lr_mult": lr_mults.get(pattern, 1.0),
         "weight_decay": weight_decay if decay else 0.0, "lr": lr * lr_mults.get(pattern, 1.0)}
        for (pattern, decay), params in groups.items()
    ]


def build_optimizer(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | Callable[[list[dict]], torch.optim.Optimizer] | None,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float],
    lr_mults: dict[str, float] = {},
    fused: bool = False,
) -> torch.optim.Optimizer:
    """The user's optimizer as given, a factory called with the default param groups, or AdamW.

    The default AdamW is `fused` (one kernel for the whole update; the Engine asks for it on CUDA) or else
    `foreach` (torch's multi-tensor path, the fast one on CPU).
    """
    if isinstance(optimizer, torch.optim.Optimizer):
        opt = optimizer
    elif optimizer is not None:
        opt = optimizer(param_groups(model, lr, weight_decay, lr_mults))
        if not isinstance(opt, torch.optim.Optimizer):
            raise TypeError(f"optimizer factory returned {type(opt).__name__}, not a torch.optim.Optimizer.")
    else:
        groups = param_groups(model, lr, weight_decay, lr_mults)
        opt = torch.optim.AdamW(groups, lr=lr, betas=betas, **({"fused": True} if fused else {"foreach": True}))
    for group in opt.param_groups:
        group.setdefault("base_lr", group["lr"])
    return opt


def set_momentum(group: dict, momentum: float) -> None:
    """Set SGD momentum or Adam's beta1 of one param group."""
    if "betas" in group:
        group["betas"] = (momentum, *group["betas"][1:])
    elif "momentum" in group:
        group["momentum"] = momentum


def get_momentum(group: dict) -> float | None:
    """SGD momentum or Adam's beta1 of one param group (None for optimizers without one)."""
    if "betas" in group:
        return group["betas"][0]
    return group.get("momentum")
