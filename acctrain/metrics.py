"""Eval metrics, exact over all ranks: sums per batch, one all-reduce, every sample counted once.

    engine = Engine(model, cfg, train, eval_set, loss_fn,
                    metrics=[Accuracy(), Accuracy(top_k=5), Perplexity(), Mean("abs_err", lambda b: (b.logits - b.labels).abs())])
    engine.fit()   # each evaluation logs eval/loss, eval/accuracy, eval/top5_accuracy, eval/perplexity, eval/abs_err

A metric turns each eval batch into a short vector of sums (correct and counted items; a sum and a count),
added up over the rank's batches. The evaluation reduces the loss's sums and every metric's in one
all-reduce, then each metric computes its value from the totals. Sums do not depend on how the samples fall
into batches and ranks, and the eval plan gives each sample to exactly one rank with no padding, so every
value is the single-process one (up to summation order), at any world size. A mean of per-batch or per-rank
values is not, and neither is Accelerate's `gather_for_metrics` of values already reduced per batch.

What a metric sees of a batch is an `EvalBatch`: the model's output, captured from the forward the loss
function runs (no second forward), the batch itself, and `logits` and `labels` read from them by the
conventions below. A torchmetrics metric (when torchmetrics is installed) is accepted as is: it is updated
with `(logits, labels)`; its summed states ride the same all-reduce (`TorchMetric`).

Names: a metric logs as `eval/<name>`; `metrics={"f1": MulticlassF1Score(10)}` names them. `keep_best`,
`EarlyStopping`, `SaveBest` and reduce_on_plateau's `metric` may watch any of them; an unknown name is
refused when the Engine is made (`check_watched`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from acctrain import private_apis
from acctrain.errors import ConfigError


@dataclass
class EvalBatch:
    """One eval micro-batch as a metric sees it."""

    outputs: Any
    """What the model's forward returned for this batch (the last call, if the loss function made several)."""
    batch: Any
    """The batch, on the device."""
    loss_sum: torch.Tensor
    """The batch's summed loss (per-sample means times the sample count; token losses summed)."""
    items: torch.Tensor | int
    """The items `loss_sum` sums over: samples, or tokens for a `(loss_sum, num_items)` loss."""

    @property
    def logits(self) -> torch.Tensor:
        """The output tensor: the output itself, its `logits` (a dict or a Hugging Face ModelOutput), or its first element."""
        out = self.outputs
        if out is None:
            raise TypeError("a metric needs the model's output, but the loss function did not call the model on this "
                            "batch (metrics read the output of the forward that loss_fn runs): call model(...) in "
                            "loss_fn, or give the metric a function of the EvalBatch's batch")
        if torch.is_tensor(out):
            return out
        if isinstance(out, Mapping) and "logits" in out:
            return out["logits"]
        if hasattr(out, "logits"):
            return out.logits
        if isinstance(out, (tuple, list)) and out and torch.is_tensor(out[0]):
            return out[0]
        raise TypeError(f"a metric needs the model's output as a tensor, or with `logits`; the model returned "
                        f"{type(out).__name__}: give the metric its own function of the EvalBatch")

    @property
    def labels(self) -> torch.Tensor:
        """The targets: `batch["labels"]` of a dict batch, else the last element of a tuple batch."""
        batch = self.batch
        if isinstance(batch, Mapping) and "labels" in batch:
            return batch["labels"]
        if isinstance(batch, (tuple, list)) and len(batch) >= 2:
            return batch[-1]
        raise TypeError("a metric needs the labels: a dict batch with 'labels', or a tuple batch (inputs..., labels); "
                        "give the metric its own function of the EvalBatch")


class Metric:
    """A metric from sums: `update` gives a batch's `size` sums (float64 is exact for counts up to 2**53),
    `compute` the value from their totals over the eval set and all ranks."""

    name: str = "metric"
    size: int = 2

    def update(self, batch: EvalBatch) -> torch.Tensor:
        raise NotImplementedError

    def compute(self, totals: torch.Tensor) -> float:
        total, count = totals.tolist()
        return total / count if count else float("nan")


class Accuracy(Metric):
    """The fraction of items whose label is among the `top_k` largest logits; items labelled `ignore_index`
    do not count. `shift=True` compares the logits at position t with the label at t+1 (a causal LM whose
    labels are its inputs, as Hugging Face's)."""

    def __init__(self, top_k: int = 1, ignore_index: int = -100, shift: bool = False, name: str | None = None):
        if not (isinstance(top_k, int) and top_k >= 1):
            raise ValueError(f"Accuracy top_k must be an int >= 1, got {top_k!r}")
        self.top_k, self.ignore_index, self.shift = top_k, ignore_index, shift
        self.name = name or ("accuracy" if top_k == 1 else f"top{top_k}_accuracy")

    def update(self, batch: EvalBatch) -> torch.Tensor:
        logits, labels = batch.logits, batch.labels
        if self.shift:
            logits, labels = logits[..., :-1, :], labels[..., 1:]
        if logits.shape[:-1] != labels.shape:
            raise ValueError(f"{self.name}: logits {tuple(logits.shape)} do not fit labels {tuple(labels.shape)}: "
                             "expected logits (..., classes) for labels (...)")
        counted = labels != self.ignore_index
        top = logits.topk(min(self.top_k, logits.shape[-1]), dim=-1).indices
        hit = (top == labels.unsqueeze(-1)).any(-1) & counted
        return torch.stack([hit.sum(), counted.sum()]).to(torch.float64)


class Perplexity(Metric):
    """exp of the mean loss per item: per token for a `(loss_sum, num_items)` loss (exact over all ranks)."""

    name = "perplexity"

    def update(self, batch: EvalBatch) -> torch.Tensor:
        return torch.stack([batch.loss_sum.detach().to(torch.float64), torch.as_tensor(batch.items).to(batch.loss_sum.device, torch.float64)])

    def compute(self, totals: torch.Tensor) -> float:
        mean = super().compute(totals)
        return math.exp(mean) if mean < 709 else float("inf")  # exp overflows a float beyond 709.78


class Mean(Metric):
    """The mean of a per-sample value over the eval set: `fn(batch)` gives one value per sample (or per item:
    a tensor of any shape, every element counted)."""

    def __init__(self, name: str, fn: Callable[[EvalBatch], torch.Tensor]):
        self.name, self.fn = name, fn

    def update(self, batch: EvalBatch) -> torch.Tensor:
        values = self.fn(batch).detach().to(torch.float64)
        return torch.stack([values.sum(), values.new_tensor(values.numel())])


class TorchMetric(Metric):
    """A torchmetrics metric, updated with `inputs(batch)` (default `(logits, labels)`).

    One whose states are all summed tensors (counts, confusion matrices, sums of errors: accuracy, F1,
    precision, recall, MSE, ...) is a metric from sums like the others: each batch's states, those of the
    metric reset and updated with that batch alone, ride the evaluation's one all-reduce, and torchmetrics
    computes the value from their totals with its own synchronisation turned off. Any other (a `cat` state,
    as AUROC's without thresholds) is updated batch after batch and computed by torchmetrics, which gathers
    its state over the ranks itself (exact too: each sample is on one rank only).
    """

    def __init__(self, metric: Any, name: str, inputs: Callable[[EvalBatch], tuple] | None = None):
        self.metric, self.name = metric, name
        self.inputs = inputs or (lambda b: (b.logits, b.labels))
        self.states = _summed_states(metric)
        """Each state's default (its shape and dtype), when all of them are summed; else None."""
        if self.states is not None:  # the evaluation's all-reduce sums them
            metric.sync_on_compute = False
            private_apis.set_metric_sync(metric, False)
        self.size = sum(default.numel() for default in self.states.values()) if self.states is not None else 0

    def update(self, batch: EvalBatch) -> torch.Tensor:
        metric = self.metric  # on the device: acctrain.evaluation puts it there first
        if self.states is None:
            metric.update(*self.inputs(batch))
            return batch.loss_sum.new_zeros(0, dtype=torch.float64)
        metric.reset()
        metric.update(*self.inputs(batch))
        return torch.cat([getattr(metric, state).reshape(-1).to(torch.float64) for state in self.states])

    def compute(self, totals: torch.Tensor) -> float:
        metric = self.metric
        if self.states is not None:
            metric.reset()
            offset = 0
            for state, default in self.states.items():
                chunk = totals[offset:offset + default.numel()].reshape(default.shape)
                setattr(metric, state, chunk.to(metric.device, default.dtype))
                offset += default.numel()
            private_apis.set_metric_update_count(metric, 1)  # the totals stand for the updates (else torchmetrics warns)
        value = metric.compute()  # note: without summed states, torchmetrics' own collectives and host sync
        metric.reset()
        if value.numel() != 1:
            raise ValueError(f"metric {self.name!r}: torchmetrics returned a tensor of shape {tuple(value.shape)}; "
                             "an eval metric is one number (e.g. average='macro' instead of None)")
        return float(value)


def _summed_states(metric: Any) -> dict[str, torch.Tensor] | None:
    """A torchmetrics metric's state defaults by name, when every state is a tensor its ranks sum; else None."""
    from torchmetrics.utilities.data import dim_zero_sum

    defaults, reductions = private_apis.metric_states(metric)
    if all(torch.is_tensor(default) and reductions[state] is dim_zero_sum for state, default in defaults.items()):
        return dict(defaults)
    return None


def build(metrics: Sequence | Mapping | None) -> list[Metric]:
    """The run's metrics from what the Engine was given: a list, or a dict name -> metric; names unique."""
    named = metrics.items() if isinstance(metrics, Mapping) else [(None, m) for m in metrics or ()]
    built = []
    for name, metric in named:
        if _is_torchmetric(metric):
            metric = TorchMetric(metric, name or type(metric).__name__.lower())
        elif not isinstance(metric, Metric):
            raise ConfigError("metrics", f"{metric!r} is not a metric: use acctrain.metrics' Accuracy, Perplexity, "
                                         "Mean, a Metric subclass, or a torchmetrics metric")
        elif name is not None:
            metric.name = name
        built.append(metric)
    names = [m.name for m in built]
    if len(set(names)) != len(names) or "loss" in names:
        raise ConfigError("metrics", f"metric names must be unique and not 'loss', got {names}: name them with a "
                                     "dict, e.g. metrics={'top1': Accuracy(), 'top5': Accuracy(top_k=5)}")
    return built


def _is_torchmetric(metric: Any) -> bool:
    try:
        import torchmetrics  # optional: accepted when installed
    except ImportError:
        return False
    return isinstance(metric, torchmetrics.Metric)


def better(value: float, best: float | None, mode: str = "min", min_delta: float = 0.0,
           threshold: float = 0.0) -> bool:
    """Whether `value` improves on `best` (None: nothing yet): the one rule of keep_best, load_best_at_end,
    EarlyStopping, SaveBest and reduce_on_plateau. A NaN or an infinity never improves. For mode 'min' the
    value must lie below `best x (1 - threshold) - min_delta` (for 'max', above `best x (1 + threshold) +
    min_delta`): `threshold` is torch's relative rule (ReduceLROnPlateau, threshold_mode='rel'), `min_delta`
    the absolute one (EarlyStopping, Keras'); an equal value is no improvement."""
    if not math.isfinite(value):
        return False
    if best is None:
        return True
    sign = 1.0 if mode == "min" else -1.0
    return sign * (best * (1 - sign * threshold) - value) > min_delta


def check_watched(watched: dict[str, str], known: Sequence[str],
                  hint: str = "add one with the Engine's metrics=, or a callback's adds_metrics") -> None:
    """Refuse, naming the field, any watched metric name (field -> name) that is not among `known`."""
    for field, name in watched.items():
        if name not in known:
            raise ConfigError(field, f"watches {name!r}, which no evaluation gives; the metrics are {sorted(known)} "
                                     f"({hint})")
