"""Exact loss scaling: an optimizer step's gradient equals the full-batch gradient, for any number of processes,
micro-batches, short last windows and token-weighted losses.

    loss_sum, items, weighted = normalise(loss_fn(model, batch), num_samples, dtype)   # each micro-batch
    backward(loss_sum * micro_scale(world, window_samples))
    ... after the step's all-reduce of the item count:
    if weighted: correct(params, window_samples / global_items)

Each micro-batch backpropagates its summed loss times world / window_samples. DDP averages gradients over
ranks, so the synced gradient is sum(grad loss_sum) / window_samples: exact for per-sample means (a short
last window included), and for token-weighted losses (`(loss_sum, num_items)`) rescaled once per step to
the true item count of the whole step, summed over micro-batches and ranks. Dividing each micro-batch by
its own count, or each rank by its own, is the 2024 gradient-accumulation bug.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch


def normalise(out: Any, num_samples: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | float, bool]:
    """(summed loss, item count, token-weighted?) of one micro-batch from what the loss function returned.

    A tensor is a mean over the micro-batch's samples; a pair is `(loss_sum, num_items)`. A padding
    micro-batch (`num_samples == 0`, a rank with no sample in a short window) counts as zero.
    """
    if isinstance(out, (tuple, list)):
        loss_sum, items = out
        items = items.to(dtype) if torch.is_tensor(items) else float(items)
        weighted = True
    else:
        loss_sum, items, weighted = out * num_samples, num_samples, False
    if num_samples == 0:  # it only joins the all-reduce
        loss_sum, items = loss_sum * 0, items * 0
    return loss_sum, items, weighted


def micro_scale(world_size: int, window_samples: int) -> float:
    """The factor of each micro-batch's summed loss before backward (DDP then averages over ranks)."""
    return world_size / window_samples


def correct(params, factor: torch.Tensor) -> None:
    """Token-weighted: scale the step's gradients by window_samples / global item count, on the device."""
    grads = [p.grad for p in params if p.grad is not None]
    if grads:
        from torch.distributed.tensor.experimental import implicit_replication

        with implicit_replication():  # FSDP's DTensor gradients times a plain (replicated) scalar
            torch._foreach_mul_(grads, factor.to(grads[0].dtype))


def model_loss(model: torch.nn.Module, batch: Any) -> torch.Tensor:
    """The model's own loss, as HF Transformers models return it when the batch holds labels."""
    outputs = model(**batch) if isinstance(batch, Mapping) else model(batch)
    loss = outputs.get("loss") if isinstance(outputs, Mapping) else getattr(outputs, "loss", None)
    if loss is None:
        raise ValueError(
            "the model returned no loss: give the batch a 'labels' entry (HF models) or pass loss_fn=..."
        )
    return loss
