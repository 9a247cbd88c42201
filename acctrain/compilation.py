"""torch.compile of the model, in place, so that checkpoints keep plain parameter names (no `_orig_mod.`).

    compile_model(model, "model")     # the whole forward compiled: the fastest steps, the longest first step
    compile_model(model, "regions")   # each block of a repeated stack compiled once and reused, the rest whole:
                                      # the same kernels in a fraction of the cold start (returns e.g. "12 x Block")

Regional compilation is Accelerate's `compile_regions` (and PyTorch's regional compilation recipe): a
`ModuleList` whose children are all of one class is a stack of repeated blocks; each block is compiled, and
since they share their code, the compiler's cache makes every block after the first cheap. Modules outside
such stacks are compiled whole. Unlike `compile_regions`, which returns a wrapped copy, this compiles the
modules in place (`Module.compile`).
"""

from __future__ import annotations

import torch


def compile_model(model: torch.nn.Module, how: bool | str) -> str:
    """Compile `model` in place as `how` says (True or "model": whole; "regions": see above); returns what was
    compiled by regions ("12 x Block", or "" when whole or off)."""
    if how is False or how == "no":
        return ""
    if how == "regions" and _has_repeated_blocks(model):
        return ", ".join(_compile_regions(model))
    model.compile()
    return ""


def _is_repeated_blocks(module: torch.nn.Module) -> bool:
    return isinstance(module, torch.nn.ModuleList) and len(module) > 0 and \
        all(type(child) is type(module[0]) for child in module)


def _has_repeated_blocks(module: torch.nn.Module) -> bool:
    return any(_is_repeated_blocks(m) for m in module.modules())


def _compile_regions(module: torch.nn.Module) -> list[str]:
    """Compile each repeated block, recurse into modules that hold a stack, compile the other modules whole."""
    if _is_repeated_blocks(module):
        for block in module:
            block.compile()
        return [f"{len(module)} x {type(module[0]).__name__}"]
    stacks = []
    for child in module.children():
        if _has_repeated_blocks(child):
            stacks += _compile_regions(child)
        else:
            child.compile()
    return stacks
