"""Evaluation: the exact mean loss over an eval set and the run's metrics, every sample once over all ranks,
none padded.

Each batch's sample count comes from the eval plan (`data.eval_loader`'s index lists), never from the
batch itself: `len(batch[0])` of a bare tensor batch is its feature size, not its sample count. The
metrics' sums (acctrain.metrics) travel with the loss's in one all-reduce.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from accelerate import Accelerator
from accelerate.utils import send_to_device

from acctrain.data import eval_loader
from acctrain.metrics import EvalBatch, Metric

LossFn = Callable[[Any, int], tuple[torch.Tensor, Any, bool]]
"""(batch, num_samples) -> (summed loss, item count, token-weighted?), as `loss_scaling.normalise` returns."""


@torch.no_grad()
def evaluate(accelerator: Accelerator, model: torch.nn.Module, dataset: Sequence, micro_batch: int,
             collate_fn: Callable | None, loss: LossFn, dtype: torch.dtype, metrics: Sequence[Metric] = (),
             module: torch.nn.Module | None = None) -> dict[str, float]:
    """`eval/loss`, the mean loss over `dataset`'s items (samples, or tokens for a `(loss_sum, num_items)`
    loss), and `eval/<name>` of each metric, over all ranks. `module` is the model whose forward output the
    metrics see (the unwrapped model: its forward hook catches what the loss function's call returned)."""
    loader = eval_loader(dataset, accelerator.process_index, accelerator.num_processes, micro_batch, collate_fn)
    totals = torch.zeros(2 + sum(m.size for m in metrics), dtype=dtype, device=accelerator.device)
    outputs: list[Any] = [None]
    hook = (module or model).register_forward_hook(lambda _m, _args, out: outputs.__setitem__(0, out)) if metrics else None
    training = model.training
    model.eval()
    try:
        for indices, batch in zip(loader.batch_sampler, loader):
            batch = send_to_device(batch, accelerator.device, non_blocking=True)
            loss_sum, items, _ = loss(batch, len(indices))
            sums = [loss_sum.detach().to(totals.dtype), torch.as_tensor(items).to(totals)]
            if metrics:
                seen = EvalBatch(outputs[0], batch, loss_sum, items)
                sums += [m.update(seen).to(totals) for m in metrics]
            totals += torch.cat([s.reshape(-1) for s in sums])
    finally:
        model.train(training)
        if hook is not None:
            hook.remove()
    totals = accelerator.reduce(totals, reduction="sum").cpu()  # note: host-device sync, once
    loss_sum, items = totals[:2].tolist()
    values = {"eval/loss": loss_sum / items if items else float("nan")}
    offset = 2
    for metric in metrics:
        values[f"eval/{metric.name}"] = metric.compute(totals[offset:offset + metric.size])
        offset += metric.size
    return values


def eval_loss(accelerator: Accelerator, model: torch.nn.Module, dataset: Sequence, micro_batch: int,
              collate_fn: Callable | None, loss: LossFn, dtype: torch.dtype) -> float:
    """The mean loss over `dataset`'s items (samples, or tokens for a `(loss_sum, num_items)` loss), all ranks."""
    return evaluate(accelerator, model, dataset, micro_batch, collate_fn, loss, dtype)["eval/loss"]
