"""One optimizer step, end to end: the lr, the micro-batches, one reduction, clip, decide, update, and its ending.

    step = OptimizerStep(accelerator, model, ops, loss_of, fire, say, wait_copied, requests)
    step(run, window, batches, frozen)   # one optimizer step of the run (acctrain.state.RunState)
    step.settle(run)                     # count a step whose numbers are read a step late

`__call__` reads top to bottom: lr, micro-batches with the gradient all-reduce on the last one only, one
reduction, normalise, clip, decide, step, count. Every step ends in one place, `RunState.end_step` (count, step
a torch LR scheduler, log), after one verdict (`_verdict`: decide, say, halt), whether its numbers are read at
once or a step late (`_on_device`, then `settle`). The parts it calls own their concerns: acctrain.loss_scaling
the exact scaling, acctrain.step_ops the gradient operations of this setup, acctrain.agreement what all ranks
decide, acctrain.readback the late read. What callbacks read of the step in progress (`engine.micro_loss`,
`engine.grad_norm`, ...) is this object's, shown by the Engine.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator
from typing import Any, Callable

import torch
from accelerate import Accelerator

from acctrain import agreement, checkpoint, loss_scaling, watchdog
from acctrain.agreement import Policy, Requests, StepReadout, Verdict
from acctrain.data import Window, note_samples, to_device
from acctrain.errors import NonFiniteError
from acctrain.optim import LrReadout, apply_schedule
from acctrain.readback import Readback, Ticket
from acctrain.state import RunState
from acctrain.step_ops import AccelerateStep, TorchStep
from acctrain.step_time import StepClock


@dataclasses.dataclass(frozen=True)
class PendingStep:
    """A step applied on the device whose numbers the host reads a step later (`OptimizerStep._on_device`)."""

    step: int
    samples_seen: int
    ticket: Ticket
    lr_metrics: dict[str, float]
    items_counted: bool


class OptimizerStep:
    """The optimizer step of one Engine. `loss_of(model, batch, n)` is the loss contract's (summed loss, items,
    counted?); `fire(event)` runs the callbacks (returning an agreed cancel); `say` prints once per job;
    `wait_copied` waits for a background save's copy of the weights; `requests()` is this rank's for the step."""

    def __init__(self, accelerator: Accelerator, model: torch.nn.Module, ops: TorchStep | AccelerateStep,
                 loss_of: Callable, fire: Callable[[str], Any], say: Callable[[str], None],
                 wait_copied: Callable[[], None], requests: Callable[[], Requests], item_dtype: torch.dtype):
        self.accelerator, self.model, self.ops, self.device = accelerator, model, ops, accelerator.device
        self._loss_of, self._fire, self._say, self._wait_copied, self._requests = loss_of, fire, say, wait_copied, \
            requests
        self.item_dtype = item_dtype
        self.lr_readout, self.readback, self.lr_metrics = LrReadout(), Readback(), {}
        self.pending: PendingStep | None = None
        # the step in progress, as callbacks see it (engine.micro_loss, ...; acctrain.callbacks)
        self.micro_loss: torch.Tensor | None = None
        self.micro_index, self.is_last_micro = 0, False
        self.step_loss: torch.Tensor | None = None
        self.grad_norm: torch.Tensor | None = None

    def __call__(self, run: RunState, window: Window, batches: Iterator, frozen: list[torch.nn.Parameter]) -> None:
        """One optimizer step over this rank's micro-batches of `window`."""
        ops, watch, clock = self.ops, watchdog.current(), run.metrics.clock
        if self.accelerator.num_processes > 1 and not ops.collective_passes:  # DDP: its all-reduce ends the backward
            clock.watch_last_gradient(self.model)
        step = run.counters.step + 1
        watch.at("the step's start", step)
        if not run.reads_late:  # there, set once the previous step is counted
            self.set_lr_and_momentum(run, run.counters.schedule_step)
        self._fire("before_step")  # its cancel requests travel with this step's all-reduce
        local_loss, local_items, counted = self._accumulate(window, batches, step, watch, clock)
        clock.switch("allreduce")
        with watch.waiting("the step's all-reduce"):
            totals = agreement.reduce_step(self.accelerator, local_loss, local_items, self._requests(), self.item_dtype)
        clock.switch("optimizer")
        self.step_loss = totals.loss_sum / totals.items  # the exact mean over all of this step's items
        if counted:  # a token-weighted loss: rescaled to the step's true item count, over micro-batches and ranks
            loss_scaling.correct(self.model.parameters(), window.global_samples / totals.items)
        for param in frozen:
            param.grad = None  # frozen: no update, no weight decay, no momentum drift
        with (watch if ops.collective_passes else watchdog.IDLE).waiting("clipping (FSDP's global norm)"):
            self.grad_norm = ops.clip(run.config.max_grad_norm or float("inf"))
        watch.at("optimizer step")
        values = totals.values(self.step_loss, self.grad_norm, counted)
        if run.reads_late:
            return self._on_device(run, window, values, totals, counted)
        readout = StepReadout.of(values.tolist(), counted)  # note: the step's one host-device sync
        verdict = self._verdict(run, step, readout, readout.flags or totals.requests)
        self._wait_copied()  # an async save's copy of the weights, before they change
        verdict = verdict.cancelled(self._fire("before_optimizer_step"))
        ops.step(verdict.apply)  # with fp16, the GradScaler's update() runs here whatever the verdict
        ops.zero_grad()
        clock.switch("other")
        run.asked = verdict.requests
        verdict.raise_if_cancelled()  # CancelEpoch/CancelFit: the step is not consumed
        run.counters.consume(window.global_samples)
        run.end_step(step, run.counters.samples_seen, readout, verdict, self.lr_metrics)
        self._fire("after_step")

    def _accumulate(self, window: Window, batches: Iterator, step: int, watch: watchdog.Watchdog | watchdog._Idle,
                    clock: StepClock) -> tuple[torch.Tensor, Any, bool]:
        """Forward and backward over this rank's micro-batches; DDP's all-reduce on the last one only.

        Returns this rank's summed loss and item count, and whether the loss counts items (token-weighted).
        """
        ops, device = self.ops, self.device
        scale = loss_scaling.micro_scale(self.accelerator.num_processes, window.global_samples)
        loss_sum, num_items, counted = None, 0, False  # num_items stays a host int for per-sample means
        last = len(window.micro_batches) - 1
        for self.micro_index, micro in enumerate(window.micro_batches):
            self.is_last_micro = self.micro_index == last
            watch.at("data (the next micro-batch)", step)
            clock.switch("data")
            try:
                batch = to_device(next(batches), device)
            except Exception as err:  # no cost per batch: only when raised
                note_samples(err, micro.indices, f"train_data (optimizer step {step})")
                raise
            watch.at("forward/backward", step)
            clock.switch("forward")
            # the passes that wait for the other ranks: DDP's last backward (its all-reduce), or FSDP's every pass
            waits = watch if self.is_last_micro or ops.collective_passes else watchdog.IDLE
            with ops.no_sync(self.is_last_micro):  # the Engine drives the sync, not accumulate()
                with (watch if ops.collective_passes else watchdog.IDLE).waiting("the forward (FSDP)"):
                    self.micro_loss, items, weighted = self._loss_of(self.model, batch, micro.num_samples)
                self._fire("after_loss")
                clock.switch("backward")
                with waits.waiting("the backward (its collectives)"), \
                        (clock.last_backward() if self.is_last_micro else contextlib.nullcontext()):
                    ops.backward(self.micro_loss, scale)
            self._fire("after_backward")
            loss_sum = self.micro_loss.detach() if loss_sum is None else loss_sum + self.micro_loss.detach()
            num_items = num_items + items
            counted |= weighted
        return loss_sum, num_items, counted

    def _on_device(self, run: RunState, window: Window, values: torch.Tensor, totals: agreement.StepTotals,
                   counted: bool) -> None:
        """The end of a step that does not wait for the GPU (`RunState.reads_late`: a fused optimizer, no callback
        in the step).

        The update is skipped on the device when the loss or the gradient norm is not finite. The host reads
        this step's numbers a step later, when the GPU is long past them (acctrain.readback), and only then
        counts the step, applies the NaN policy and logs it (`settle`). The previous step is counted before
        this one's lr is set, so the schedule sees every applied step, as when it is read at once.
        """
        self.settle(run)  # the previous step; nan_policy=halt raises here, before this step's update
        self.set_lr_and_momentum(run, run.counters.schedule_step)
        self._wait_copied()  # an async save's copy of the weights, before they change
        self.ops.step_if_finite(self.step_loss, self.grad_norm)
        self.ops.zero_grad()
        run.metrics.clock.switch("other")
        run.counters.consume(window.global_samples)
        if not torch.is_tensor(totals.requests):  # one process: the requests are on the host already
            run.asked = Requests.agreed(totals.requests)
        self.pending = PendingStep(run.counters.step, run.counters.samples_seen, self.readback.start(values),
                                   self.lr_metrics, counted)
        self._fire("after_step")

    def settle(self, run: RunState) -> None:
        """Count the step left pending by `_on_device`: its verdict, and the step's one ending."""
        pending, self.pending = self.pending, None
        if pending is None:
            return
        # note: host-device sync on numbers a step old: no wait
        readout = StepReadout.of(pending.ticket.read(), pending.items_counted)
        verdict = self._verdict(run, pending.step, readout, readout.flags or agreement.NO_FLAGS)
        run.end_step(pending.step, pending.samples_seen, readout, dataclasses.replace(verdict, apply=verdict.finite),
                     pending.lr_metrics)  # no cancel on this path: a finite step was applied on the device
        if verdict.requests is not agreement.NO_REQUESTS:  # several processes: a step late
            run.asked = verdict.requests

    def _verdict(self, run: RunState, step: int, readout: StepReadout, flags: list[float] | torch.Tensor) -> Verdict:
        """The step's verdict from its numbers (acctrain.agreement.decide), said when the update is skipped; the
        NaN policy's halt stops the run here, with no update (the GradScaler's update() still runs)."""
        scaler, cfg = self.ops.scaler, run.config
        # only on a step whose gradients overflowed: the loss scale before this step's update (a sync)
        scale = scaler.get_scale() if scaler is not None and not math.isfinite(readout.grad_norm) else None
        verdict = agreement.decide(readout.loss, readout.grad_norm, flags, Policy(cfg.nan_policy, cfg.max_skipped_steps),
                                   step, run.counters.skipped_in_a_row, scale)
        if not verdict.finite and readout.items == 0:
            empty = " (the step has 0 items: loss_fn's num_items summed over all ranks is 0)"
            verdict = dataclasses.replace(verdict, reason=verdict.reason and verdict.reason + empty,
                                          halt=verdict.halt and verdict.halt + empty)
        if verdict.overflow:
            self._say(f"{verdict.reason}: update skipped, loss scale {scale:g} -> {scale * scaler.get_backoff_factor():g}")
        elif verdict.refused:
            self._say(f"skipping the update of step {step}: {verdict.reason} (nan_policy=skip)")
        if verdict.halt:
            self.ops.step(False)
            self.ops.zero_grad()
            latest = checkpoint.latest_checkpoint(cfg.output_dir)
            kept = f"; the last good checkpoint is {latest}" if latest else "; no checkpoint was saved yet"
            raise NonFiniteError(verdict.halt + kept)
        return verdict

    def set_lr_and_momentum(self, run: RunState, step: int) -> None:
        """Set every param group's lr (its base lr x the schedule) and momentum for this update; note them for logs."""
        groups = self.ops.optimizer.param_groups
        if run.lr_scheduler is None:  # a torch LR scheduler sets the lr itself
            apply_schedule(groups, run.schedule.lr_factor(step), run.schedule.momentum(step))
        self.lr_metrics = self.lr_readout(groups)
