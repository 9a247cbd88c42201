"""Inference over a dataset on every rank: each sample's output once, in dataset order.

    outputs = engine.predict(test_set)                       # a tensor (n, ...) on the CPU, on every rank
    path = engine.predict(test_set, out_dir="preds")         # large outputs: written per rank, read back lazily
    outputs = read_predictions(path)                         # the same tensor (or list), in dataset order

Each rank runs a contiguous shard of the dataset (the eval plan: every sample on one rank, none padded),
under no_grad, in eval mode, through the prepared model (so with the run's mixed precision), and keeps the
output of each sample; a rank with fewer batches runs extra ones whose outputs it drops, so that every rank
runs as many forwards (acctrain.evaluation: FSDP's forwards are collectives). In memory, a rank keeps its
outputs on the device; they are gathered to every rank as tensors (their bytes and shapes, nothing
pickled), joined in rank order, which is dataset order, and come back on the CPU: the device holds all of
them once, padded to the largest rank's, while they are gathered. With `out_dir`, each batch's output goes
to the host at once, each rank writes its shard as safetensors and the main process an index; nothing is
gathered.

What the output of a sample is: the model's output tensor, its `logits` (a dict or a Hugging Face
ModelOutput), or its first element (a tuple), split along the first dimension (a batch's output must have a
row per sample). Samples whose outputs have the same shape are stacked into one tensor; otherwise (e.g. the
logits of batches padded to different lengths) a list of per-sample tensors comes back.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from accelerate import Accelerator
from safetensors import safe_open
from safetensors.torch import save_file

from acctrain import barrier
from acctrain.agreement import raise_on_every_rank
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
    batches: list[torch.Tensor] = []  # this rank's outputs, batch by batch: on the device, or the host for out_dir
    template, problem = None, None  # an output's dtype and dimensions, even on a rank without samples
    with eval_mode(model):
        for num_samples, batch in eval_batches(accelerator, dataset, micro_batch, collate_fn):
            out = EvalBatch(_called(forward, model, batch), None, None, 0).logits.detach()
            template = out[:0] if out.dim() else out.reshape(1)[:0]
            if not num_samples:  # a batch that only keeps this rank in step with the others (acctrain.evaluation)
                continue
            if out.dim() == 0 or out.shape[0] != num_samples:  # said on every rank below, not raised alone
                problem = problem or (f"predict splits the output along its first dimension, one row per sample, "
                                      f"but a batch of {num_samples} samples gave shape {tuple(out.shape)}: pass "
                                      "forward= that returns a tensor (samples, ...)")
                continue
            batches.append(out.cpu() if out_dir is not None else out)  # note: host-device sync per batch (out_dir)
    raise_on_every_rank(accelerator, ValueError(problem) if problem else None,
                        "predict's outputs cannot be gathered: the outputs failed", ValueError)
    if out_dir is not None:
        return _write(accelerator, batches, Path(out_dir), len(dataset))
    if accelerator.num_processes > 1 and template is not None:
        batches = _gathered(accelerator, batches, template)
    return _joined([b.cpu() for b in batches])  # note: host-device sync


def _called(forward: Callable, model: torch.nn.Module, batch: Any) -> Any:
    """`forward(model, batch)`; when the default forward calls the model with what its forward does not take, a
    TypeError saying so and naming `forward=`."""
    try:
        return forward(model, batch)
    except TypeError as err:
        if forward is not default_forward or not _refuses(model, batch):
            raise
        given = (f"model(**batch) with the keys {sorted(k for k in batch if k != 'labels')} (labels left out)"
                 if isinstance(batch, Mapping) else "model(*inputs) of a tuple batch (its last element left out as "
                 "the labels)" if isinstance(batch, (tuple, list)) else "model(batch)")
        raise TypeError(f"predict called {given}, which {_name(model)}.forward{inspect.signature(_forward_of(model))} "
                        f"does not take ({err}); pass forward= to predict, e.g. predict(dataset, forward=lambda model, "
                        "batch: model(batch['input_ids']))") from err


def _forward_of(model: torch.nn.Module) -> Callable:
    inner = getattr(model, "module", model)  # DDP's wrapped module
    return inner.forward


def _name(model: torch.nn.Module) -> str:
    return type(getattr(model, "module", model)).__name__


def _refuses(model: torch.nn.Module, batch: Any) -> bool:
    """Whether the model's forward signature refuses the arguments the default forward gives it."""
    try:
        signature = inspect.signature(_forward_of(model))
    except (TypeError, ValueError):
        return False
    try:
        if isinstance(batch, Mapping):
            signature.bind(**{k: v for k, v in batch.items() if k != "labels"})
        elif isinstance(batch, (tuple, list)):
            signature.bind(*(batch[:-1] if len(batch) > 1 else batch))
        else:
            signature.bind(batch)
    except TypeError:
        return True
    return False


def _gathered(accelerator: Accelerator, batches: list[torch.Tensor], template: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's output batches, in rank order, on every rank: their bytes and shapes in three all-gathers of
    tensors (sizes, then shapes and bytes padded to the largest rank's), nothing pickled."""
    dtype, ndim = template.dtype, template.dim()
    flat = torch.cat([template.reshape(-1), *(b.reshape(-1) for b in batches)]).view(torch.uint8)
    shapes = torch.tensor([list(b.shape) for b in batches] or [[0] * ndim], dtype=torch.int64)[:len(batches)]
    header = torch.tensor([flat.numel(), len(batches), ndim, _DTYPES.index(dtype) if dtype in _DTYPES else -1],
                          device=accelerator.device)
    headers = accelerator.gather(header).view(-1, 4).tolist()  # note: host-device sync
    if len({(h[2], h[3]) for h in headers}) != 1 or headers[0][3] < 0:
        raise TypeError(f"predict gathers outputs of one dtype and number of dimensions on every rank; rank "
                        f"{accelerator.process_index} has {dtype} with {ndim} dimensions ({len(headers)} ranks: "
                        f"{[(h[2], str(_DTYPES[h[3]]) if h[3] >= 0 else 'other') for h in headers]})")
    most_bytes, most_batches = max(h[0] for h in headers), max(h[1] for h in headers)
    padded_flat = flat.new_zeros(most_bytes)
    padded_flat[:flat.numel()] = flat
    padded_shapes = torch.zeros(max(most_batches, 1), ndim, dtype=torch.int64)
    padded_shapes[:len(batches)] = shapes
    all_flat = accelerator.gather(padded_flat.to(accelerator.device)).cpu().view(-1, most_bytes)  # note: sync
    all_shapes = accelerator.gather(padded_shapes.to(accelerator.device)).cpu().view(len(headers), -1, ndim)
    joined = []
    for rank, (num_bytes, num_batches, _, _) in enumerate(headers):
        values = all_flat[rank, :num_bytes].view(dtype)
        sizes = [int(torch.Size(shape).numel()) for shape in all_shapes[rank, :num_batches].tolist()]
        pieces = torch.split(values, sizes)
        joined += [piece.view(shape) for piece, shape in zip(pieces, all_shapes[rank, :num_batches].tolist())]
    return joined


_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
           torch.int8, torch.uint8, torch.bool)


def read_predictions(path: str | Path) -> Any:
    """The outputs `predict(..., out_dir=path)` wrote, joined in dataset order: a tensor, or a list."""
    path = Path(path)
    index = json.loads((path / INDEX).read_text())
    batches: list[torch.Tensor] = []
    for shard in index["shards"]:
        with safe_open(path / shard["file"], framework="pt") as f:
            if "outputs" in f.keys():
                batches.append(f.get_tensor("outputs"))
            else:
                batches += [f.get_tensor(str(i))[None] for i in range(shard["start"], shard["stop"])]
    if sum(len(b) for b in batches) != index["samples"]:
        raise ValueError(f"{path}: {sum(len(b) for b in batches)} outputs, the index says {index['samples']}")
    return _joined(batches)


def _joined(batches: list[torch.Tensor]) -> Any:
    """One tensor (samples, ...) when every batch's rows have the same shape and dtype, else a list per sample."""
    if batches and all(b.shape[1:] == batches[0].shape[1:] and b.dtype == batches[0].dtype for b in batches):
        return torch.cat(batches)
    return [row for b in batches for row in b.unbind(0)] if batches else torch.empty(0)


def _write(accelerator: Accelerator, batches: list[torch.Tensor], out: Path, total: int) -> Path:
    """This rank's shard as `rank{R}.safetensors`, one tensor if their shapes agree; the main process's index."""
    rank, world = accelerator.process_index, accelerator.num_processes
    start = total * rank // world
    out.mkdir(parents=True, exist_ok=True)
    joined = _joined(batches)
    tensors = {"outputs": joined.contiguous()} if torch.is_tensor(joined) and batches else {
        str(start + i): row.contiguous() for i, row in enumerate(joined)}
    save_file(tensors, out / f"rank{rank:05d}.safetensors")
    barrier.wait_for_everyone(accelerator)
    if accelerator.is_main_process:
        shards = [{"file": f"rank{r:05d}.safetensors", "start": total * r // world, "stop": total * (r + 1) // world}
                  for r in range(world)]
        (out / INDEX).write_text(json.dumps({"samples": total, "shards": shards}, indent=1))
    barrier.wait_for_everyone(accelerator)
    return out
