"""The run's first micro-batches, tried before anything is written: read, collate, forward, loss.

    first_micro_batches(accelerator, model, train_data, eval_data, plan, collate_fn, loss_of)

A model that returns no loss, a `loss_fn` that breaks its contract, or samples that do not collate would
otherwise fail only once the run has made its output_dir, its lock and its TensorBoard files (or, for the
eval data, after a whole stretch of training). Each rank tries its own first training micro-batch of the run
(the plan's) and its first eval micro-batch, in eval mode and without gradients, eager even when compiled
(`torch.compiler.set_stance`), with every RNG put back after: nothing of the run changes, no BatchNorm
statistic, no dropout draw, no compiled graph. An error is raised as it is (its type and message), with a
note naming the samples and, for samples that do not stack, the fix. The ranks agree first, so that every
rank raises: the failing ones their own error, the others a DataError naming them. Costs two forwards of one
micro-batch per fit.

Your dataset's `__getitem__` (for those samples) and your `loss_fn` are called once more than training calls
them, under `torch.no_grad()` and with the model in eval mode: code that counts its calls can tell this one
apart by `torch.is_grad_enabled()`. A stream is not tried: reading it would consume it (its first batch fails
at the first step instead).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from accelerate import Accelerator
from torch.utils.data import default_collate

from acctrain.agreement import raise_on_every_rank
from acctrain.data import DataPlan, describe_sample, note_samples, read_samples, to_device
from acctrain.evaluation import eval_mode
from acctrain.state import rng_from_files, rng_to_files


NOTHING = " Nothing was written."


@torch.no_grad()  # the reads too: a dataset or loss_fn can tell this call from training by torch.is_grad_enabled()
def first_micro_batches(accelerator: Accelerator, model: torch.nn.Module, train_data: Sequence,
                        eval_data: Sequence | None, plan: DataPlan, collate_fn: Callable | None,
                        loss_of: Callable[[torch.nn.Module, Any, int], Any]) -> None:
    """Try this rank's first training and eval micro-batches (see the module's docstring); `loss_of(model, batch,
    n)` is the loop's loss on a batch of n counted samples, checked against the loss contract."""
    rng = rng_to_files()  # a dataset's augmentation may draw: the run's RNGs stay as they were
    try:
        if not plan.stream:
            micro = next(iter(plan.rank_windows(0, accelerator.process_index, 0, 1))).micro_batches[0]
            _try(accelerator, model, train_data, "train_data", micro.indices, micro.num_samples, collate_fn, loss_of)
        if eval_data is not None and len(eval_data):
            rank, world = accelerator.process_index, accelerator.num_processes
            start, stop = len(eval_data) * rank // world, len(eval_data) * (rank + 1) // world
            indices = list(range(start, min(stop, start + plan.micro_batch))) or [0]  # a rank without samples
            _try(accelerator, model, eval_data, "eval_data", indices, stop - start and len(indices), collate_fn,
                 loss_of)  # runs a forward on sample 0, as evaluation does (acctrain.evaluation)
    finally:
        rng_from_files(*rng)


def _try(accelerator: Accelerator, model: torch.nn.Module, dataset: Sequence, what: str, indices: list[int],
         num_samples: int, collate_fn: Callable | None, loss_of: Callable) -> None:
    batch, samples, problem = None, None, None
    try:
        samples = read_samples(dataset, indices)
        batch = to_device((collate_fn or default_collate)(samples), accelerator.device)
    except Exception as err:
        note_samples(err, indices, f"{what} (its first micro-batch, before anything was written)")
        problem = err
    # before a forward that may be a collective (FSDP)
    raise_on_every_rank(accelerator, problem, f"the first micro-batch failed (reading {what})", then=NOTHING)
    try:
        with eval_mode(model), torch.compiler.set_stance("force_eager"):  # compiling is the first step's work
            loss_of(model, batch, num_samples)
    except torch.OutOfMemoryError:
        raise
    except Exception as err:
        shown = ("; ".join(describe_sample(s) for s in samples[:2]) + (" ..." if len(samples) > 2 else "")
                 if isinstance(samples, list) else describe_sample(samples))
        err.add_note(f"acctrain: the first micro-batch of {what} (samples {indices}: {shown}) failed in the model's "
                     "forward or the loss, before anything was written; fix this and run again.")
        problem = err
    raise_on_every_rank(accelerator, problem, f"the first micro-batch failed (the forward and loss on {what})",
                        then=NOTHING)

