"""The gradient operations of one optimizer step, chosen once at start-up: no_sync, backward, clip, step.

    ops = step_ops_for(accelerator, model, torch_optimizer, prepared_optimizer)
    with ops.no_sync(is_last):
        ops.backward(loss, scale)          # the gradient of loss x scale
    norm = ops.clip(max_norm)              # the global norm of the true (unscaled) gradients
    ops.step(apply=finite_and_not_cancelled)
    ops.zero_grad()

Two kinds with the same operations, so the Engine's step has no branch on the setup:

- `TorchStep`: one process or plain DDP. torch's own calls; Accelerate's wrappers add only checks there
  (BENCHMARKS.md: the Engine's step overhead). With fp16 it holds Accelerate's GradScaler and follows
  torch's AMP recipe (nanoGPT's step): scale the loss, `unscale_` before clipping, step only when the
  gradients are finite, and `update()` exactly once per optimizer step, whether the update was applied,
  skipped for an overflow, cancelled or refused by the NaN policy. Skipping `update()` on a skipped step
  is what made fp16 crash at its first overflow ("unscale_() has already been called ... since the last
  update()").
- `AccelerateStep`: FSDP, DeepSpeed, XLA and the rest go through Accelerate's backward, clip and step.

Whether to apply a step is the Engine's decision, made on the host from the clipped norm: under a
GradScaler a finite norm means `unscale_` found no inf/NaN, so the optimizer steps directly (no second
host sync inside `GradScaler.step`), and a non-finite norm is an overflow whose `update()` lowers the scale.
"""

from __future__ import annotations

import contextlib

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType

class TorchStep:
    """One process or plain DDP: torch's calls, with an optional GradScaler (fp16)."""

    collective_passes = False
    """Only the last micro-batch's backward waits for the other ranks (DDP's gradient all-reduce); clipping is local."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 scaler: torch.amp.GradScaler | None = None):
        self.model, self.optimizer, self.scaler = model, optimizer, scaler
        self.params = list(model.parameters())
        self._ddp = isinstance(model, torch.nn.parallel.DistributedDataParallel)
        self._seeds: dict[tuple, torch.Tensor] = {}  # backward's initial gradient, per scale (a step has one or two)

    def no_sync(self, is_last: bool):
        """Hold back DDP's gradient all-reduce on all but the window's last micro-batch."""
        return self.model.no_sync() if self._ddp and not is_last else contextlib.nullcontext()

    def backward(self, loss: torch.Tensor, scale: float) -> None:
        """The gradient of `loss x scale`: the factor is backward's initial gradient, so the step adds no
        multiplication, and no node to the graph, for it (the same numbers: the node would multiply 1 by it)."""
        loss = loss if self.scaler is None else self.scaler.scale(loss)
        key = (scale, loss.shape, loss.dtype, loss.device)
        seed = self._seeds.get(key)
        if seed is None:
            seed = self._seeds[key] = torch.full(loss.shape, scale, dtype=loss.dtype, device=loss.device)
        loss.backward(seed)

    def clip(self, max_norm: float) -> torch.Tensor:
        """Clip to `max_norm` (inf: only measure); returns the global norm, still on the device."""
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)  # clip and the finite check see the true gradients
        # DDP's gradients are identical on all ranks after the all-reduce: the local norm is the global one
        return torch.nn.utils.clip_grad_norm_(self.params, max_norm, foreach=True)

    def step(self, apply: bool) -> None:
        if apply:
            self.optimizer.step()
        if self.scaler is not None:
            self.scaler.update()  # once per optimizer step: lowers the scale after an overflow, else may grow it

    @property
    def skips_on_device(self) -> bool:
        """Whether `step_if_finite` can decide on the device: torch's fused Adam or AdamW (the default on CUDA)
        takes `found_inf`, the protocol GradScaler uses with it, and no GradScaler is in the way. Not any
        optimizer with `_step_supports_amp_scaling`: fused SGD would keep uninitialised momentum after a
        skipped first step, and optimizers on the older `grad_scaler=` protocol ignore `found_inf`."""
        fused_adam = isinstance(self.optimizer, torch.optim.Adam) and bool(self.optimizer.defaults.get("fused"))
        return self.scaler is None and fused_adam

    def step_if_finite(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        """Apply the update unless the loss or the gradient norm is inf/NaN, decided on the device: no host sync."""
        finite = torch.isfinite(loss) & torch.isfinite(grad_norm)
        self.optimizer.found_inf = (~finite).to(torch.float32)  # 1: the fused kernel leaves params and state as they are
        try:
            self.optimizer.step()
        finally:
            del self.optimizer.found_inf

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)


class AccelerateStep:
    """FSDP, DeepSpeed, XLA, ...: Accelerate's backward, clip and step (its GradScaler inside)."""

    collective_passes = True
    """Every forward and backward, and the clip, may wait for the other ranks (FSDP's gathers, the global norm)."""

    def __init__(self, accelerator: Accelerator, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 prepared_optimizer):
        self.accelerator, self.model, self.optimizer = accelerator, model, optimizer
        self.prepared_optimizer, self.scaler = prepared_optimizer, accelerator.scaler

    def no_sync(self, is_last: bool):
        return contextlib.nullcontext() if is_last else self.accelerator.no_sync(self.model)

    def backward(self, loss: torch.Tensor, scale: float) -> None:
        self.accelerator.backward(loss * scale)  # Accelerate's accumulation is 1: the Engine scales the loss itself

    def clip(self, max_norm: float) -> torch.Tensor:
        # unscales fp16 gradients first; FSDP's norm spans the shards
        norm = self.accelerator.clip_grad_norm_(self.model.parameters(), max_norm)
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP2: a replicated DTensor

    def step(self, apply: bool) -> None:
        if apply:
            self.prepared_optimizer.step()  # with a GradScaler: its step and its update
        elif self.scaler is not None:
            self.scaler.update()  # exactly once per optimizer step, applied or not

    skips_on_device = False

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)


def step_ops_for(accelerator: Accelerator, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 prepared_optimizer) -> TorchStep | AccelerateStep:
    """torch's calls where Accelerate's wrappers add nothing (one process, DDP on CPU or GPU), else Accelerate's."""
    if accelerator.distributed_type in (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU):
        return TorchStep(model, optimizer, accelerator.scaler)
    return AccelerateStep(accelerator, model, optimizer, prepared_optimizer)
