"""Inference over a dataset on every rank: each sample's output once, in dataset order.

    outputs = engine.predict(test_set)                       # a tensor (n, ...) on the CPU, on every rank
    path = engine.predict(test_set, out_dir="preds")         # large outputs: written per rank, read back lazily
    outputs = read_predictions(path)                         # the same tensor (or list), in dataset order

Each rank runs a contiguous shard of the dataset (the eval plan: every sample on one rank, none padded),
under no_grad, in eval mode, through the prepared model (so with the run's mixed precision), and keeps the
output of each sample; a rank with fewer batches runs extra ones whose outputs it drops, so that every rank
runs as many forwards (acctrain.evaluation: FSDP's forwards are collectives). In memory, the shards are gathered to every rank and joined in rank order, which is
dataset order. With `out_dir`, each rank writes its shard as safetensors and the main process an index.

What the output of a sample is: the model's output tensor, its `logits` (a dict or a Hugging Face
ModelOutput), or its first element (a tuple), split along the first dimension. Samples whose outputs have
the same shape are stacked into one tensor; otherwise a list comes back.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from safetensors import safe_open
from safetensors.torch import save_file

from acctrain import barrier
from acctrain.data import is_stream
from acctrain.evaluation import eval_batches, eval_mode
from acctrain.metrics import EvalBatch

INDEX = "predictions.json"


def default_forward(model: torch.nn.Module, batch: Any) -> Any:
    """The model on a batch: `model(**batch)` without its labels (a dict), `model(inputs)` of a tuple batch
    (inputs..., labels) or `model(batch)`."""
    if isinstance(batch, Mapping):
        return model(**{k: v for k, v in batch.items() if k != "labels"})
    if isinstance(batch, (tuple, list)):
        return model(*batch[:-1]) if len(batch) > 1 else model(batch[0])
    return model(batch)


@torch.no_grad()
def predict(accelerator: Accelerator, model: torch.nn.Module, dataset: Sequence, micro_batch: int,
            collate_fn: Callable | None, forward: Callable | None = None, out_dir: str | Path | None = None) -> Any:
    """Every sample's output once, in dataset order, on every rank; see the module's docstring."""
    if is_stream(dataset):
        raise TypeError("predict needs a map-style dataset (len and indexing), so that each rank takes its own "
                        "samples in order; a stream (IterableDataset) has neither: collect its samples into a list")
    forward = forward or default_forward
    samples: list[torch.Tensor] = []
    with eval_mode(model):
        for num_samples, batch in eval_batches(accelerator, dataset, micro_batch, collate_fn):
            out = EvalBatch(forward(model, batch), None, None, 0).logits
            if num_samples:  # else a batch that only keeps this rank in step (acctrain.evaluation)
                samples += list(out.detach().cpu().unbind(0))  # note: host-device sync per batch
    if out_dir is None:
        gathered = gather_object(samples) if accelerator.num_processes > 1 else samples
        return _joined(gathered)
    return _write(accelerator, samples, Path(out_dir), len(dataset))


def read_predictions(path: str | Path) -> Any:
    """The outputs `predict(..., out_dir=path)` wrote, joined in dataset order: a tensor, or a list."""
    path = Path(path)
    index = json.loads((path / INDEX).read_text())
    samples: list[torch.Tensor] = []
    for shard in index["shards"]:
        with safe_open(path / shard["file"], framework="pt") as f:
            if "outputs" in f.keys():
                samples += list(f.get_tensor("outputs").unbind(0))
            else:
                samples += [f.get_tensor(str(i)) for i in range(shard["start"], shard["stop"])]
    if len(samples) != index["samples"]:
        raise ValueError(f"{path}: {len(samples)} outputs, the index says {index['samples']}")
    return _joined(samples)


def _joined(samples: list[torch.Tensor]) -> Any:
    """One tensor when every sample's output has the same shape and dtype, else the list."""
    if samples and all(s.shape == samples[0].shape and s.dtype == samples[0].dtype for s in samples):
        return torch.stack(samples)
    return samples if samples else torch.empty(0)


def _write(accelerator: Accelerator, samples: list[torch.Tensor], out: Path, total: int) -> Path:
    """This rank's shard as `rank{R}.safetensors`, one tensor if their shapes agree; the main process's index."""
    rank, world = accelerator.process_index, accelerator.num_processes
    start = total * rank // world
    out.mkdir(parents=True, exist_ok=True)
    joined = _joined(samples)
    tensors = {"outputs": joined} if torch.is_tensor(joined) and samples else {
        str(start + i): s.contiguous() for i, s in enumerate(samples)}
    save_file(tensors, out / f"rank{rank:05d}.safetensors")
    barrier.wait_for_everyone(accelerator)
    if accelerator.is_main_process:
        shards = [{"file": f"rank{r:05d}.safetensors", "start": total * r // world, "stop": total * (r + 1) // world}
                  for r in range(world)]
        (out / INDEX).write_text(json.dumps({"samples": total, "shards": shards}, indent=1))
    barrier.wait_for_everyone(accelerator)
    return out
