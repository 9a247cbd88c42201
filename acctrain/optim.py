"""The optimizer: a default AdamW, or the user's optimizer or optimizer factory.

Weight decay applies to weight matrices and embeddings only: parameters with fewer than two dimensions
(biases, LayerNorm/BatchNorm weights) go into a group with no decay, as in nanoGPT and the HF Trainer.
`lr_mults` (the config's `param_groups`) gives parameters matching a name pattern their own lr
multiplier: discriminative learning rates. Each group records its `base_lr`, which the schedule
multiplies at every optimizer step.
"""

from __future__ import annotations

import fnmatch
from typing import Callable, Sequence

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


def apply_schedule(groups: list[dict], factor: float, momentum: float | None) -> None:
    """Set every group's lr to its base lr x `factor`, and its momentum when the schedule gives one."""
    for group in groups:
        group["lr"] = group["base_lr"] * factor
        if momentum is not None:
            set_momentum(group, momentum)


class LrReadout:
    """The param groups' lr and momentum as log values.

    `train/lr` and `train/momentum` are the reference group's (multiplier 1, the config's `lr`). With
    discriminative lrs, each `param_groups` pattern adds `train/lr/{name}` (and momentum) once: a pattern's
    decayed and no-decay groups share their lr, so the `/no_decay` twin is not logged again.
    """

    def __init__(self) -> None:
        self._layout: tuple | None = None
        self._tags: list[tuple[int, str, str]] = []
        self._reference = 0

    def __call__(self, groups: list[dict]) -> dict[str, float]:
        # built once per layout (names and multipliers: fine_tune changes the multipliers), not formatted per step
        layout = tuple((g.get("name"), g.get("lr_mult")) for g in groups)
        if layout != self._layout:
            self._layout = layout
            self._reference = reference_group(groups)
            firsts: dict[str, int] = {}
            for i, group in enumerate(groups):
                firsts.setdefault(str(group.get("name", f"group{i}")).removesuffix("/no_decay"), i)
            self._tags = [(i, f"train/lr/{n}", f"train/momentum/{n}") for n, i in firsts.items()] if len(firsts) > 1 else []
        reference = groups[self._reference]
        values = {"train/lr": reference["lr"]}
        momentum = get_momentum(reference)
        if momentum is not None:
            values["train/momentum"] = momentum
        for i, lr_tag, momentum_tag in self._tags:
            values[lr_tag] = groups[i]["lr"]
            momentum = get_momentum(groups[i])
            if momentum is not None:
                values[momentum_tag] = momentum
        return values


def reference_group(groups: list[dict]) -> int:
    """The index of the group whose lr is the config's `lr`: multiplier 1 (the first group without multipliers)."""
    return next((i for i, g in enumerate(groups) if g.get("lr_mult", 1.0) == 1.0), 0)


def select(model: torch.nn.Module, patterns: str | Sequence[str] | None) -> list[str]:
    """The sorted names of the parameters matching any pattern (module prefix or glob), each pattern matching one
    at least. Without patterns: every parameter but those of the model's last top-level module (its head)."""
    named = [n for n, _ in model.named_parameters()]
    if patterns is None:
        patterns = [n for n, _ in model.named_children()][:-1]
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    chosen = set()
    for pattern in patterns:
        hits = [n for n in named if matches(n, pattern)]
        if not hits:
            raise ValueError(f"freeze: {pattern!r} matches no parameter; names look like {named[:3]}")
        chosen.update(hits)
    return sorted(chosen)


def settings(groups: list[dict]) -> list[dict]:
    """Each group's settings but its parameters and lr (the schedule sets the lr at every step)."""
    return [{k: v for k, v in g.items() if k not in ("params", "lr", "initial_lr")} for g in groups]


def reapply(groups: list[dict], wanted: list[dict], momentum_scheduled: bool) -> list[str]:
    """Give the groups this run's settings again after a checkpoint replaced them; returns what differed.

    A momentum schedule sets beta1 (or SGD's momentum) at every step, so a difference there is not news.
    """
    changed = []
    for i, (group, mine) in enumerate(zip(groups, wanted)):
        for key, value in mine.items():
            saved = group.get(key)
            scheduled = momentum_scheduled and key in ("betas", "momentum")
            if (saved[1:] != value[1:] if scheduled and key == "betas" else saved != value and not scheduled):
                changed.append(f"{group.get('name', f'group{i}')}.{key} {saved} -> {value}")
            group[key] = value
    return changed
