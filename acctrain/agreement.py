"""What every rank agrees on: the end of an optimizer step and the decision taken from it, and errors.

    totals = reduce_step(accelerator, loss_sum, items, Requests(stop=..., cancel=...))  # ONE collective
    readout = StepReadout.of(totals.values(loss, grad_norm, counted).tolist(), counted)  # one host read
    verdict = decide(readout.loss, readout.grad_norm, readout.flags, Policy(...), step=k)  # a pure function
    ops.step(verdict.apply)
    verdict.raise_if_cancelled()

All ranks hold the same reduced numbers, so they take the same decision without another collective. The
NaN policy is `decide`: a plain function of the step's loss, gradient norm, loss scale and skip count,
unit-tested without processes (tests/test_agreement.py).

An error that one rank meets must be raised on every rank, or the others wait for it in the next collective
until the watchdog ends them. Two ways, for the two cases, and no other:

    value = main_answers(accelerator, compute, "what it waits for")   # work only the main rank does
    raise_on_every_rank(accelerator, problem, "what failed")          # work every rank does
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, replace
from typing import Callable, TypeVar

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

from acctrain import barrier
from acctrain.callbacks import CANCELS, Cancel, strongest
from acctrain.errors import DataError

MIN_LOSS_SCALE = 1.0
"""An fp16 overflow with the loss scale at or below this is no longer the GradScaler's to fix: the gradients
are inf/NaN unscaled too, and the NaN policy decides (DeepSpeed's `min_loss_scale` default)."""


@dataclass(frozen=True)
class Requests:
    """What one rank asks of this step (or, summed over ranks, what any rank asked)."""

    stop: bool = False
    """A SIGTERM/SIGUSR1 arrived: save after this step and exit."""
    cancel: type[Cancel] | None = None
    """The strongest cancel a callback raised during the step (CancelStep, CancelEpoch or CancelFit)."""
    save: bool = False
    """This rank's save clock ran out (TrainConfig.save_every_minutes): save after this step."""

    def flags(self) -> list[float]:
        """[stop, CancelStep, CancelEpoch, CancelFit, save] as 0/1: summed over ranks by the step's all-reduce."""
        return [float(self.stop)] + [float(self.cancel is kind) for kind in CANCELS] + [float(self.save)]

    @staticmethod
    def agreed(flags: list[float]) -> Requests:
        """The requests of all ranks from their summed flags: a stop or a save if any rank asks, the strongest cancel."""
        if not any(flags):  # the common case, every step: nothing asked
            return NO_REQUESTS
        cancels = [kind for kind, n in zip(CANCELS, flags[1:]) if n > 0]
        return Requests(stop=flags[0] > 0, cancel=cancels[-1] if cancels else None, save=flags[1 + len(CANCELS)] > 0)


NO_REQUESTS = Requests()
NO_FLAGS = NO_REQUESTS.flags()


@dataclass(frozen=True)
class StepTotals:
    """The step's sums over all ranks: still on the device after an all-reduce (read once, by the caller)."""

    loss_sum: torch.Tensor
    items: torch.Tensor | float
    requests: torch.Tensor | list[float]
    """Summed `Requests.flags()`: a device tensor with several processes, host numbers with one."""

    def values(self, loss: torch.Tensor, grad_norm: torch.Tensor, items_counted: bool) -> torch.Tensor:
        """What the host reads of the step, as one device vector (one copy): the loss, the gradient norm, the item
        count when the loss counts items, and the requests when they rode the all-reduce (`StepReadout.of`)."""
        flags = self.requests if torch.is_tensor(self.requests) else ()
        items = (self.items,) if items_counted else ()
        return torch.stack([v.to(grad_norm.dtype) for v in (loss, grad_norm, *items, *flags)])


@dataclass(frozen=True)
class StepReadout:
    """The step's numbers on the host: the same on every rank."""

    loss: float
    grad_norm: float
    items: float | None
    """The item count of a loss that counts items (summed over ranks and micro-batches), else None."""
    flags: list[float]
    """The summed request flags, when they rode the all-reduce (several processes); else empty."""

    @staticmethod
    def of(host: list[float], items_counted: bool) -> StepReadout:
        """`StepTotals.values(...)` as read to the host."""
        loss, norm, *rest = host
        items = rest.pop(0) if items_counted else None
        return StepReadout(loss, norm, items, rest)


def reduce_step(accelerator: Accelerator, loss_sum: torch.Tensor, items: torch.Tensor | float, requests: Requests,
                dtype: torch.dtype) -> StepTotals:
    """Sum the step's loss, item count and requests over all ranks in one all-reduce (none with one process)."""
    flags = NO_FLAGS if requests is NO_REQUESTS else requests.flags()
    if accelerator.num_processes == 1:
        return StepTotals(loss_sum, items, flags)
    device = accelerator.device
    # No host-to-device copy of host numbers: a pageable copy would wait for the GPU (a fill kernel does not)
    items = items.to(dtype) if torch.is_tensor(items) else torch.full((1,), float(items), dtype=dtype, device=device)
    local = torch.zeros(2 + len(flags), dtype=dtype, device=device)
    local[0], local[1] = loss_sum.to(dtype), items.reshape(())
    if any(flags):  # rare: a signal or a cancel; the copy's wait does not matter then
        local[2:] = torch.tensor(flags, dtype=dtype, device=device)
    totals = accelerator.reduce(local, reduction="sum")
    return StepTotals(totals[0], totals[1], totals[2:])


@dataclass(frozen=True)
class Policy:
    """The NaN policy's settings (TrainConfig.nan_policy, max_skipped_steps)."""

    nan_policy: str = "skip"
    max_skipped_steps: int = 10


@dataclass(frozen=True)
class Verdict:
    """What the step does: apply its update or not, and why; stop or cancel after it."""

    apply: bool
    finite: bool
    overflow: bool = False
    """A non-finite gradient norm under a GradScaler above its floor: the scaler skips and lowers its scale."""
    refused: bool = False
    """Not finite, not an overflow: the NaN policy skips the update (counted in skipped_in_a_row)."""
    halt: str | None = None
    """Not finite, and the NaN policy stops the run: the reason (the step is not applied first)."""
    reason: str | None = None
    """Why a non-finite step was not applied, for the log line."""
    requests: Requests = Requests()

    def cancelled(self, cancel: type[Cancel] | None) -> Verdict:
        """This verdict with a later cancel merged in (from before_optimizer_step): the stronger one wins."""
        if cancel is None:
            return self
        return replace(self, apply=False, requests=replace(self.requests, cancel=strongest(self.requests.cancel, cancel)))

    def raise_if_cancelled(self) -> None:
        """CancelEpoch/CancelFit end the epoch or the run; the step is not consumed (a resume runs it again)."""
        if self.requests.cancel in CANCELS[1:]:
            raise self.requests.cancel()


def decide(loss: float, grad_norm: float, requests: list[float] | Requests, policy: Policy, step: int,
           skipped_in_a_row: int = 0, loss_scale: float | None = None) -> Verdict:
    """The step's verdict from its reduced numbers (identical on every rank).

    `loss_scale` is the GradScaler's scale before this step's update (None without a scaler). An fp16
    overflow (a non-finite gradient norm with the scale above MIN_LOSS_SCALE) is the scaler's business;
    the NaN policy takes the rest: a NaN/inf without a scaler, a non-finite loss with finite gradients,
    and overflows that persist at the scale's floor.
    """
    requests = requests if isinstance(requests, Requests) else Requests.agreed(requests)
    if math.isfinite(loss) and math.isfinite(grad_norm):
        return APPLY if requests is NO_REQUESTS else Verdict(apply=requests.cancel is None, finite=True,
                                                             requests=requests)
    if loss_scale is not None and not math.isfinite(grad_norm) and loss_scale > MIN_LOSS_SCALE:
        return Verdict(apply=False, finite=False, overflow=True, requests=requests,
                       reason=f"fp16 overflow at optimizer step {step} (gradient norm {grad_norm})")
    what = f"non-finite {'loss' if not math.isfinite(loss) else 'gradient norm'} at optimizer step {step} " \
           f"(loss {loss}, grad norm {grad_norm})"
    if loss_scale is not None:
        what += f" with the fp16 loss scale at its floor ({MIN_LOSS_SCALE:g})" if not math.isfinite(grad_norm) \
            else " (finite gradients: not an fp16 overflow)"
    if policy.nan_policy == "halt":
        return Verdict(apply=False, finite=False, halt=f"{what} with nan_policy=halt", requests=requests)
    if skipped_in_a_row + 1 >= policy.max_skipped_steps:
        halt = f"{what}: {policy.max_skipped_steps} skipped steps in a row (max_skipped_steps)"
        return Verdict(apply=False, finite=False, halt=halt, requests=requests)
    return Verdict(apply=False, finite=False, refused=True, reason=what, requests=requests)


APPLY = Verdict(apply=True, finite=True)
"""The verdict of almost every step: finite, nothing asked (one object, not one per step)."""


T = TypeVar("T")


def main_answers(accelerator: Accelerator, compute: Callable[[], T], what: str) -> T:
    """`compute()` on the main process only (hashing a corpus, verifying a checkpoint, taking the run's lock):
    every rank returns its answer, or raises the error it raised. `what` names the wait, for the watchdog."""
    answer: list = [None]
    if accelerator.is_main_process:
        try:
            answer = [(True, compute())]
        except Exception as err:  # the main rank raises its own; the others a copy (or its text, if unpicklable)
            answer = [(False, err)]
    if accelerator.num_processes > 1:
        barrier.after_main(accelerator, what)  # the main rank's work may take longer than hang_timeout
        sent = answer if accelerator.is_main_process else [None]
        if accelerator.is_main_process and not answer[0][0] and not _picklable(answer[0][1]):
            sent = [(False, RuntimeError(f"{type(answer[0][1]).__name__} on the main rank: {answer[0][1]}"))]
        received = broadcast_object_list(sent)
        answer = answer if accelerator.is_main_process else received
    ok, value = answer[0]
    if not ok:
        raise value
    return value


def _picklable(err: Exception) -> bool:
    """Whether `err` survives the trip to the other ranks (rebuilt from its reduction, as deepcopy does)."""
    try:
        copy.deepcopy(err)
        return True
    except Exception:
        return False


def raise_on_every_rank(accelerator: Accelerator, problem: Exception | None, what: str,
                        others: type[Exception] = DataError, then: str = "") -> None:
    """Raise on every rank when any rank met a problem: its own error on a failing rank, and on the others
    `others("{what} on rank(s) [...]; their error says why.{then}")` (one small all-gather)."""
    failed = [accelerator.process_index] if problem is not None else []
    if accelerator.num_processes > 1:
        flags = torch.tensor([float(problem is not None)], device=accelerator.device)
        # note: host-device sync; rare (start-up, predict), never per step
        failed = [rank for rank, flag in enumerate(accelerator.gather(flags).tolist()) if flag]
    if problem is not None:
        raise problem
    if failed:
        raise others(f"{what} on rank(s) {failed}; their error says why.{then}")
