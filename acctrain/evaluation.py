"""Evaluation: the exact mean loss over an eval set, every sample once over all ranks, none padded.

Each batch's sample count comes from the eval plan (`data.eval_loader`'s index lists), never from the
batch itself: `len(batch[0])` of a bare tensor batch is its feature size, not its sample count.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from accelerate import Accelerator
from accelerate.utils import send_to_device

from acctrain.data import eval_loader

LossFn = Callable[[Any, int], tuple[torch.Tensor, Any, bool]]
"""(batch, num_samples) -> (summed loss, item count, token-weighted?), as `loss_scaling.normalise` returns."""


@torch.no_grad()
def eval_loss(accelerator: Accelerator, model: torch.nn.Module, dataset: Sequence, micro_batch: int,
              collate_fn: Callable | None, loss: LossFn, dtype: torch.dtype) -> float:
    """The mean loss over `dataset`'s items (samples, or tokens for a `(loss_sum, num_items)` loss), all ranks."""
    loader = eval_loader(dataset, accelerator.process_index, accelerator.num_processes, micro_batch, collate_fn)
    totals = torch.zeros(2, dtype=dtype, device=accelerator.device)
    training = model.training
    model.eval()
    try:
        for indices, batch in zip(loader.batch_sampler, loader):
            batch = send_to_device(batch, accelerator.device, non_blocking=True)
            loss_sum, items, _ = loss(batch, len(indices))
            totals += torch.stack([loss_sum.detach().to(totals.dtype), torch.as_tensor(items).to(totals)])
    finally:
        model.train(training)
    loss_sum, items = accelerator.reduce(totals, reduction="sum").tolist()  # note: host-device sync, once
    return loss_sum / items if items else float("nan")
