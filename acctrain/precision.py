"""What each precision needs of the device, and what FP8 converts.

    check(mixed_precision, on_cpu)      # before the Accelerator: refuse what would fail or silently differ
    handlers(mixed_precision)           # Accelerate's recipe for it (fp8: torchao's Float8Linear)
    describe(mixed_precision, model)    # after prepare, for the run plan: "fp8 (10 of 12 Linear layers in FP8; ...)"

FP8 trains through torchao, as Accelerate's `AORecipeKwargs` sets it up: every `nn.Linear` whose sizes are
multiples of 16 becomes a `Float8Linear` (its matmuls in FP8 with dynamic scales), except the model's first and
last Linear layers (for stability); everything else runs under bf16 autocast. The weights and the optimizer state
stay in fp32 (a Float8Linear keeps the Linear's own parameters), so a checkpoint holds the same tensors under the
same names in every precision: an FP8 run resumes in bf16 and the reverse.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from acctrain.errors import ConfigError

FP8_CAPABILITY = (8, 9)
"""The first CUDA compute capability with FP8 tensor cores (Ada: L4, L40S; then Hopper, Blackwell)."""


def check(mixed_precision: str, on_cpu: bool) -> None:
    """Refuse a precision this device cannot train in (before anything is written)."""
    if mixed_precision == "fp16" and on_cpu:
        # On CPU Accelerate would silently train in fp32 (no autocast, no GradScaler).
        raise ConfigError("mixed_precision", "fp16 needs a CUDA GPU; use mixed_precision=bf16 on CPU.")
    if mixed_precision != "fp8":
        return
    if on_cpu:
        raise ConfigError("mixed_precision", "fp8 needs a CUDA GPU of compute capability 8.9 or later (L4, L40S, "
                          "H100, H200, B200); this run is on the CPU. Use mixed_precision=bf16.")
    device = int(os.environ.get("LOCAL_RANK", "0"))
    capability = torch.cuda.get_device_capability(device)
    if capability < FP8_CAPABILITY:
        raise ConfigError("mixed_precision", f"fp8 needs a GPU of compute capability 8.9 or later, but "
                          f"{torch.cuda.get_device_name(device)} has {capability[0]}.{capability[1]} (no FP8 tensor "
                          "cores). Use mixed_precision=bf16.")
    if importlib.util.find_spec("torchao") is None:
        raise ConfigError("mixed_precision", "fp8 trains through torchao, which is not installed: "
                          "pip install \"acctrain[fp8]\" (or torchao), or use mixed_precision=bf16.")


def handlers(mixed_precision: str) -> list:
    """Accelerate's kwargs handlers for the precision: torchao's recipe for fp8 (named, so that an installed
    Transformer Engine is not picked instead), none otherwise."""
    if mixed_precision != "fp8":
        return []
    from accelerate.utils import AORecipeKwargs

    return [AORecipeKwargs()]


def describe(mixed_precision: str, model: torch.nn.Module) -> str:
    """The precision as the run plan says it: "bf16", or "fp8 (10 of 12 Linear layers in FP8; bf16: ...)"."""
    return f"fp8 ({fp8_layers(model)})" if mixed_precision == "fp8" else mixed_precision


def fp8_layers(model: torch.nn.Module) -> str:
    """Which Linear layers run in FP8: "10 of 12 Linear layers in FP8; bf16: embed_proj, head"."""
    from torchao.float8.float8_linear import Float8Linear

    linears = [(name, module) for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]
    kept = [name for name, module in linears if not isinstance(module, Float8Linear)]
    converted = len(linears) - len(kept)
    return f"{converted} of {len(linears)} Linear layers in FP8" + (f"; bf16: {', '.join(kept)}" if kept else "")
