"""The run's first micro-batch, tried before anything is written: read, collate, forward, loss.

    first_micro_batch(accelerator, model, train_data, plan, collate_fn, loss_of)   # raises a DataError, or returns

A model that returns no loss, a `loss_fn` that breaks its contract, or samples that do not collate would
otherwise fail only once the run has made its output_dir, its lock and its TensorBoard files. An error of the
dataset, the model or the loss is raised as it is, with a note naming the samples; samples that do not collate
raise a DataError naming their indices and the fix. Each rank
tries its own first micro-batch of step 1 (the plan's), in eval mode and without gradients, eager even
when compiled (`torch.compiler.set_stance`), with every RNG put back after: nothing of the run changes, no
BatchNorm statistic, no dropout draw, no compiled graph. The ranks then agree, so that every rank raises
(the failing ones their own error, the others naming them). Costs one forward of one micro-batch per fit.

Your dataset's `__getitem__` (for those samples) and your `loss_fn` are called once more than training calls
them, under `torch.no_grad()` and with the model in eval mode: code that counts its calls can tell this one
apart by `torch.is_grad_enabled()`. A stream is not tried: reading it would consume it (its first batch fails
at the first step instead).
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Sequence

import torch
from accelerate import Accelerator

from acctrain.data import DataPlan, NamedCollate, Samples, describe_sample
from acctrain.errors import DataError
from acctrain.evaluation import eval_mode
from acctrain.state import rng_from_files, rng_to_files


@torch.no_grad()  # the reads too: a dataset or loss_fn can tell this call from training by torch.is_grad_enabled()
def first_micro_batch(accelerator: Accelerator, model: torch.nn.Module, dataset: Sequence, plan: DataPlan,
                      collate_fn: Callable | None, loss_of: Callable[[torch.nn.Module, Any, int], Any],
                      to_device: Callable[[Any], Any]) -> None:
    """Try this rank's first micro-batch of the run (see the module's docstring); `loss_of(model, batch, n)`
    is the loop's loss on a batch of n counted samples, checked against the loss contract."""
    if plan.stream:
        return
    micro = next(iter(plan.rank_windows(0, accelerator.process_index, 0, 1))).micro_batches[0]
    rng = rng_to_files()  # a dataset's augmentation may draw: the run's RNGs stay as they were
    batch, problem = None, None
    try:
        try:
            samples = [dataset[i] for i in micro.indices]
        except Exception as err:
            problem = _named(err, f"reading samples {micro.indices} of train_data (dataset[i]) failed")
        if problem is None:
            try:
                batch = to_device(NamedCollate(collate_fn)(Samples(samples, micro.indices)))
            except DataError as err:
                problem = err
        _agree(accelerator, problem, "collate")  # before a forward that may be a collective (FSDP)
        try:
            with contextlib.ExitStack() as stack:
                stack.enter_context(eval_mode(model))
                stack.enter_context(torch.compiler.set_stance("force_eager"))  # compiling is the first step's work
                loss_of(model, batch, micro.num_samples)
        except torch.OutOfMemoryError:
            raise
        except Exception as err:
            what = "; ".join(describe_sample(s) for s in samples[:2])
            problem = _named(err, f"the first micro-batch (samples {micro.indices} of train_data: {what}"
                                  f"{' ...' if len(samples) > 2 else ''}) failed in the model's forward or the loss")
        _agree(accelerator, problem, "forward and loss")
    finally:
        rng_from_files(*rng)


def _named(err: Exception, what: str) -> Exception:
    """The error as raised (its type and message: a TypeError of the loss contract stays one), with a note (shown
    under its message in the traceback) saying where it came from and that nothing was written."""
    err.add_note(f"acctrain: {what}, before anything was written; fix this and run again.")
    return err


def _agree(accelerator: Accelerator, problem: Exception | None, stage: str) -> None:
    """Raise on every rank when any rank met a problem: its own error on a failing rank, the failing ranks'
    numbers on the others (one small all-gather, with several processes)."""
    failed = [accelerator.process_index] if problem is not None else []
    if accelerator.num_processes > 1:
        flags = torch.tensor([float(problem is not None)], device=accelerator.device)
        # note: host-device sync, once per fit
        failed = [rank for rank, flag in enumerate(accelerator.gather(flags).tolist()) if flag]
    if problem is not None:
        raise problem
    if failed:
        raise DataError(f"the first micro-batch failed ({stage}) on rank(s) {failed}; their error says why. Nothing "
                        "was written.")
