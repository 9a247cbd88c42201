"""The optimizer: a default AdamW, or the user's optimizer or optimizer factory.

Weight decay applies to weight matrices and embeddings only: parameters with fewer than two dimensions
(biases, LayerNorm/BatchNorm weights) go into a group with no decay, as in nanoGPT and the HF Trainer.
Each group records its `base_lr`, which the schedule multiplies at every optimizer step.
"""

from __future__ import annotations

from typing import Callable

import torch


def param_groups(model: torch.nn.Module, lr: float, weight_decay: float) -> list[dict]:
    """Trainable parameters split into a decayed and a non-decayed group."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    groups = [
        {"params": decay, "weight_decay": weight_decay, "lr": lr},
        {"params": no_decay, "weight_decay": 0.0, "lr": lr},
    ]
    return [g for g in groups if g["params"]]


def build_optimizer(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | Callable[[list[dict]], torch.optim.Optimizer] | None,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float],
) -> torch.optim.Optimizer:
    """The user's optimizer as given, a factory called with the default param groups, or AdamW."""
    if isinstance(optimizer, torch.optim.Optimizer):
        opt = optimizer
    elif optimizer is not None:
        opt = optimizer(param_groups(model, lr, weight_decay))
        if not isinstance(opt, torch.optim.Optimizer):
            raise TypeError(f"optimizer factory returned {type(opt).__name__}, not a torch.optim.Optimizer.")
    else:
        # foreach is torch's fast multi-tensor path on CPU and GPU alike
        opt = torch.optim.AdamW(param_groups(model, lr, weight_decay), lr=lr, betas=betas, foreach=True)
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
