"""Evaluation: the exact mean loss over an eval set and the run's metrics, every sample once over all ranks,
none padded.

Each batch's sample count comes from the eval plan (`data.eval_loader`'s index lists), never from the
batch itself: `len(batch[0])` of a bare tensor batch is its feature size, not its sample count. The
metrics' sums (acctrain.metrics) travel with the loss's in one all-reduce.

Every rank runs as many forwards as the rank with the most eval batches (`eval_batches`): a rank whose shard
has fewer runs extra batches that count nothing. Forwards can be collectives: FSDP gathers each wrapped
block's parameters in its forward, and DDP broadcasts buffers in the first forward after a training step, so
a rank that stopped early would leave the others waiting forever (37 samples, 2 ranks, micro-batches of 4 is
5 batches each; 9 samples is 1 and 2).
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Sequence

import torch
from accelerate import Accelerator
from torch.utils.data import default_collate

from acctrain import watchdog
from acctrain.data import eval_loader, most_eval_batches, note_samples, to_device
from acctrain import metrics as metrics_module
from acctrain.errors import ConfigError
from acctrain.metrics import EvalBatch, Metric, TorchMetric

LossFn = Callable[[Any, int], tuple[torch.Tensor, Any, bool]]
"""(batch, num_samples) -> (summed loss, item count, token-weighted?), as `loss_scaling.normalise` returns."""


def eval_batches(accelerator: Accelerator, dataset: Sequence, micro_batch: int,
                 collate_fn: Callable | None) -> Iterator[tuple[int, Any]]:
    """(sample count, batch on the device) of this rank's contiguous eval shard, then batches of one sample that
    count 0 until the rank has run as many as the rank with the most (see the module's docstring)."""
    rank, world, device = accelerator.process_index, accelerator.num_processes, accelerator.device
    loader = eval_loader(dataset, rank, world, micro_batch, collate_fn)
    batches = iter(loader)
    for indices in loader.batch_sampler:
        try:
            batch = next(batches)
        except Exception as err:  # no cost per batch: only when raised
            note_samples(err, indices, "the evaluated dataset")
            raise
        yield len(indices), to_device(batch, device)
    for _ in range(most_eval_batches(len(dataset), world, micro_batch) - len(loader.batch_sampler)):
        yield 0, to_device((collate_fn or default_collate)([dataset[0]]), device)


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module):
    """The model in eval mode, and after, each module's own mode back (a BatchNorm that BnFreeze keeps in eval
    mode inside a training model stays so)."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        model.train(modes[0][1])  # through train(), for modules that override it
        for module, training in modes:
            module.training = training


@torch.no_grad()
def evaluate(accelerator: Accelerator, model: torch.nn.Module, dataset: Sequence, micro_batch: int,
             collate_fn: Callable | None, loss: LossFn, dtype: torch.dtype, metrics: Sequence[Metric] = (),
             module: torch.nn.Module | None = None) -> dict[str, float]:
    """`eval/loss`, the mean loss over `dataset`'s items (samples, or tokens for a `(loss_sum, num_items)`
    loss), and `eval/<name>` of each metric, over all ranks. `module` is the model whose forward output the
    metrics see (the unwrapped model: its forward hook catches what the loss function's call returned)."""
    totals = torch.zeros(2 + sum(m.size for m in metrics), dtype=dtype, device=accelerator.device)
    for metric in metrics:  # a torchmetrics state on the device, also on a rank with no sample to update it
        if isinstance(metric, TorchMetric):
            metric.metric.to(accelerator.device)
    outputs: list[Any] = [None]
    hook = (module or model).register_forward_hook(lambda _m, _args, out: outputs.__setitem__(0, out)) if metrics else None
    try:
        with eval_mode(model):
            for num_samples, batch in eval_batches(accelerator, dataset, micro_batch, collate_fn):
                outputs[0] = None  # this batch's output, never the one before
                with watchdog.waiting("an evaluation forward (FSDP's gathers, DDP's buffers)"):
                    loss_sum, items, _ = loss(batch, num_samples)
                watchdog.at("evaluation")
                if not num_samples:  # a batch that only keeps this rank in step with the others
                    continue
                loss_sum = loss_sum.detach().to(dtype)
                items = items.to(dtype) if torch.is_tensor(items) else loss_sum.new_full((), items)  # a fill, no copy
                sums = [loss_sum[None], items[None]]
                if metrics:
                    seen = EvalBatch(outputs[0], batch, loss_sum, items)
                    sums += [m.update(seen).to(totals).reshape(-1) for m in metrics]
                totals += torch.cat(sums)
    finally:
        if hook is not None:
            hook.remove()
    with watchdog.waiting("evaluation's all-reduce"):
        totals = accelerator.reduce(totals, reduction="sum").cpu()  # note: host-device sync, once
    loss_sum, items = totals[:2].tolist()
    values = {"eval/loss": loss_sum / items if items else float("nan")}
    offset = 2
    for metric in metrics:
        values[f"eval/{metric.name}"] = metric.compute(totals[offset:offset + metric.size])
        offset += metric.size
    return values


# ------------------------------------------------------------------------------------ what evaluations give

def metric_names(measures: Sequence[Metric], callbacks: Any, has_eval_data: bool) -> list[str]:
    """What each evaluation gives: eval/loss, the metrics, and what callbacks add (`Callback.adds_metrics`)."""
    names = ["eval/loss", *(f"eval/{m.name}" for m in measures)] if has_eval_data else []
    for cb in callbacks.items:
        names += cb.adds_metrics(list(names))
    return names


def check_watched(config: Any, callbacks: Any, schedule: Any, measures: Sequence[Metric], has_eval_data: bool) -> None:
    """Refuse a metric name that settings or callbacks watch and no evaluation gives, naming the field and the
    metrics there are: when the Engine is made and when `replan` starts a phase, before anything is written."""
    from acctrain.callbacks import EarlyStopping, SaveBest

    if not has_eval_data:
        refuse_without_eval_data(config, schedule, measures)
    watched = {"keep_best": config.keep_best} if config.keep_best else {}
    for cb in callbacks.items:
        if isinstance(cb, (EarlyStopping, SaveBest)):
            watched[f"{type(cb).__name__}.metric"] = cb.metric
    metrics_module.check_watched(watched, metric_names(measures, callbacks, has_eval_data))
    if schedule.name == "reduce_on_plateau" and has_eval_data:
        own = ["eval/loss", *(f"eval/{m.name}" for m in measures)]
        metrics_module.check_watched({"schedule_args.metric": schedule.watches}, own, "reduce_on_plateau "
                                     "is stepped before callbacks add theirs: watch eval/loss or one of metrics=")


def refuse_without_eval_data(config: Any, schedule: Any, measures: Sequence[Metric]) -> None:
    """Refuse the settings that need evaluations, naming each, when the Engine has no eval data."""
    if config.load_best_at_end:
        raise ConfigError("load_best_at_end", "the best checkpoint is chosen by evaluations: pass eval_data to "
                          "the Engine, or set load_best_at_end=false.")
    if config.keep_best:
        raise ConfigError("keep_best", f"{config.keep_best!r} needs evaluations: pass eval_data to the Engine.")
    if schedule.name == "reduce_on_plateau":
        raise ConfigError("scheduler", "reduce_on_plateau reacts to eval/loss: pass eval_data to the Engine.")
    if measures:
        raise ConfigError("metrics", f"{[m.name for m in measures]} are computed by evaluations: pass "
                          "eval_data to the Engine, or leave metrics out.")


def check_keep_best(keep_best: str, metrics: dict[str, float]) -> None:
    """Refuse a keep_best that evaluation does not give (rotation would protect nothing and delete the best)."""
    if keep_best and any(k.startswith("eval/") for k in metrics) and keep_best not in metrics:
        raise ConfigError("keep_best", f"no evaluation gives {keep_best!r}; the metrics are {sorted(metrics)}: use "
                          "one of them, or a callback that adds it in after_evaluate.")
