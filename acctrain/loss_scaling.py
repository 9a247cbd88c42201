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

from acctrain import private_apis


def normalise(out: Any, num_samples: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | int, bool]:
    """(summed loss, item count, token-weighted?) of one micro-batch from what the loss function returned.

    A tensor is a mean over the micro-batch's samples; a pair is `(loss_sum, num_items)`, the count a tensor
    or a number (made a tensor here, so one process and many take the same path). A padding micro-batch
    (`num_samples == 0`, a rank with no sample in a short window) counts as zero.
    """
    weighted = isinstance(out, (tuple, list))
    loss_sum, items = out if weighted and len(out) == 2 else (out, None)
    _check_loss(out, loss_sum, items, weighted)
    if weighted:  # a fill on the loss's device, not a host-to-device copy (that would wait for the GPU)
        items = items.to(dtype) if torch.is_tensor(items) else loss_sum.new_full((), float(items), dtype=dtype)
    else:
        loss_sum, items = out * num_samples, num_samples
    if num_samples == 0:  # it only joins the all-reduce
        loss_sum, items = loss_sum * 0, items * 0
    return loss_sum, items, weighted


LOSS_CONTRACT = "loss_fn must return a tensor (the mean loss over the micro-batch) or (loss_sum, num_items)"


def _check_loss(out: Any, loss_sum: Any, items: Any, weighted: bool) -> None:
    """Refuse what the loss function returned unless it keeps the contract, saying what it returned instead."""
    if weighted and len(out) != 2:
        problem = f"a {type(out).__name__} of {len(out)} values"
    elif not torch.is_tensor(loss_sum):
        what = "a dict or model output (return its loss)" if isinstance(loss_sum, Mapping) else type(loss_sum).__name__
        problem = f"{'loss_sum as ' if weighted else ''}{what}"
    elif loss_sum.numel() != 1 or not loss_sum.is_floating_point():
        problem = f"a {loss_sum.dtype} tensor of shape {tuple(loss_sum.shape)}; the loss must be one float value"
    elif weighted and not (torch.is_tensor(items) and items.numel() == 1
                           or isinstance(items, (int, float)) and not isinstance(items, bool)):
        problem = f"num_items as {type(items).__name__}; it must be a number or a one-element tensor"
    else:
        return
    raise TypeError(f"{LOSS_CONTRACT}; it returned {problem}.")


def micro_scale(world_size: int, window_samples: int) -> float:
    """The factor of each micro-batch's summed loss before backward (DDP then averages over ranks)."""
    return world_size / window_samples


def correct(params, factor: torch.Tensor) -> None:
    """Token-weighted: scale the step's gradients by window_samples / global item count, on the device."""
    grads = [p.grad for p in params if p.grad is not None]
    if grads:
        from torch.distributed.tensor.experimental import implicit_replication

        with implicit_replication():  # FSDP's DTensor gradients times a plain (replicated) scalar
            private_apis.foreach_mul_(grads, factor.to(grads[0].dtype))


def model_loss(model: torch.nn.Module, batch: Any) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The model's own loss, as HF Transformers models return it when the batch holds labels.

    With labels per token (2-D or more), that loss is the mean over the micro-batch's counted label tokens
    (not -100; after the shift a causal LM makes inside), so it is returned as (that mean x their count,
    their count): the token-weighted form, exact over micro-batches of different token counts. Labels per
    sample (classification) leave it a per-sample mean.
    """
    outputs = model(**batch) if isinstance(batch, Mapping) else model(batch)
    loss = outputs.get("loss") if isinstance(outputs, Mapping) else getattr(outputs, "loss", None)
    if loss is None:
        raise ValueError(
            "the model returned no loss: give the batch a 'labels' entry (HF models) or pass loss_fn=..."
        )
    labels = batch.get("labels") if isinstance(batch, Mapping) else None
    if not torch.is_tensor(labels) or labels.dim() < 2:
        return loss
    counted = (labels[..., 1:] if _shifts_labels(model) else labels) != -100
    items = counted.sum()
    return loss * items, items


def _shifts_labels(model: torch.nn.Module) -> bool:
    """Whether the model's own loss predicts labels[1:] from the tokens before them (a causal LM)."""
    model = getattr(model, "module", model)  # DDP wraps it
    loss_function = getattr(model, "loss_function", None)  # Transformers >= 4.46: the loss it computes
    if loss_function is not None:
        return getattr(loss_function, "__name__", "") == "ForCausalLMLoss"
    try:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    except ImportError:
        return False
    return type(model).__name__ in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()
