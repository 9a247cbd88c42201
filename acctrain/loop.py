"""The training loop under the Engine: fit, one optimizer step, evaluation, and the loop's own state.

One optimizer step (`_train_step`) reads top to bottom: lr, micro-batches with the gradient all-reduce on
the last one only, one reduction, normalise, clip, decide, step, count. The parts it calls own their
concerns: the data plan (acctrain.data) which samples each step sees, the schedule (acctrain.schedules)
the lr, acctrain.loss_scaling the exact scaling, acctrain.step_ops the gradient operations of this setup,
acctrain.agreement what all ranks decide, acctrain.checkpointer the checkpoints (given `state_dict()`),
acctrain.runtime the start-up. `acctrain.engine.Engine` is this loop with the toolkit on top.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from accelerate.utils import broadcast_object_list, send_to_device

from acctrain import agreement, barrier, checkpoint, data_identity, ema, export, hf_data, loss_scaling, memory, optim, \
    preflight, run_lock, runtime, sharded, watchdog
from acctrain.agreement import Policy, Requests, Verdict
from acctrain.callbacks import IN_STEP_EVENTS, Callbacks, CancelEpoch, CancelFit, EarlyStopping, SaveBest
from acctrain.checkpointer import Checkpointer, resume_changes
from acctrain.config import TrainConfig
from acctrain.data import DataPlan, Feed, Window, note_samples
from acctrain import metrics as metrics_module
from acctrain.evaluation import evaluate
from acctrain.errors import ConfigError, NonFiniteError, Preempted
from acctrain.optim import LrReadout, apply_schedule, build_optimizer
from acctrain.readback import Readback
from acctrain.schedules import build_schedule
from acctrain.state import TrainState, jsonable
from acctrain.step_ops import step_ops_for
from acctrain.summary import model_summary
from acctrain.tracking import MetricLog


class Loop:
    """The training loop of `Engine`: trains `model` on `train_data` with the batch geometry, schedule and
    precision of `config`. Engine (acctrain.engine), its one subclass, adds the toolkit and uses the loop's
    underscored members (the step, the pending verdict, the phase counters); nothing else does."""

    def __init__(
        self,
        model: torch.nn.Module,
        config: TrainConfig,
        train_data: Sequence,
        eval_data: Sequence | None = None,
        loss_fn: Callable | None = None,
        optimizer: torch.optim.Optimizer | Callable | None = None,
        callbacks: Sequence = (),
        collate_fn: Callable | None = None,
        schedule: Callable[[int], float] | torch.optim.lr_scheduler.LRScheduler | None = None,
        settings: dict[str, Any] | None = None,
        metrics: Sequence | dict | None = None,
    ):
        train_data, eval_data, collate_fn = hf_data.adapt(model, train_data, eval_data, collate_fn, loss_fn)
        self.config = config
        self.settings = dict(settings or {})
        """The job's other settings (e.g. `model.d_model`): recorded with each checkpoint and in the trackers'
        config; a resume from a checkpoint whose settings differ is refused, naming them."""
        self.accelerator = runtime.make_accelerator(config)
        self.plan = DataPlan.for_run(train_data, eval_data, config, self.accelerator.num_processes)
        # A torch LR scheduler is stepped once per applied optimizer step and sets the lr itself;
        # otherwise the Engine sets lr = base_lr x schedule(step) (config.scheduler, or a function step -> factor).
        self.lr_scheduler = schedule if isinstance(schedule, torch.optim.lr_scheduler.LRScheduler) else None
        self.schedule = self._build_schedule("constant" if self.lr_scheduler else schedule or config.scheduler)
        self.measures = metrics_module.build(metrics)
        """The eval metrics beside eval/loss (acctrain.metrics), from `metrics=`."""
        if eval_data is None:
            self._refuse_without_eval_data()
        self.train_data, self.eval_data = train_data, eval_data
        self.loss_fn, self.collate_fn = loss_fn, collate_fn
        self.callbacks = Callbacks(ema.configured(callbacks, config.ema_decay))
        self.check_watched()
        self.state = TrainState()
        self._prepare(model, optimizer)
        self.step_ops = self._step_ops()
        self.checkpointer = Checkpointer(self.accelerator, config)
        self.metrics = self._metric_log()
        device = self.accelerator.device
        self._item_dtype = torch.float32 if device.type == "mps" else torch.float64
        # CPU batches are already where they must be; pinned host batches go to the GPU without blocking
        self._to_device = (lambda batch: batch) if device.type == "cpu" else (
            lambda batch: send_to_device(batch, device, non_blocking=True))
        self.last_eval: dict[str, float] = {}
        self._eval_step = -1
        self._signals = runtime.StopSignals()
        self._fitting = self._summarised = False
        self._asked, self._saved_at = agreement.NO_REQUESTS, 0.0  # the last step's agreed requests; the save clock
        self.frozen_params: list[torch.nn.Parameter] = []
        """Parameters that `freeze` keeps unchanged: their gradients are dropped before clipping and the step."""
        self._lr_readout = LrReadout()
        self._verdict_on_device, self._pending, self._readback = False, None, Readback()
        self.resumed_from: Path | None = None
        self._resumed, self._restored_rng, self._saved_metrics = False, None, {}
        self._fits, self._root_dir = 0, config.output_dir  # a later phase's own place (replan)
        self.feed, self._stream_state = None, None  # the run's data; a stream's position at the resumed step
        self.data_identity: dict[str, Any] | None = None  # the data's identity (acctrain.data_identity), set by resume
        self.trajectory = uuid.uuid4().hex  # the run's line of checkpoints (acctrain.checkpoint.find_resumable)
        self.best_checkpoint: Path | None = None
        """With load_best_at_end: the checkpoint whose weights the model holds after fit."""

    def _prepare(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | Callable | None) -> None:
        """The model's memory switch and compile (in place), the optimizer, Accelerate's prepare of both, and the
        micro-batch that fits (micro_batch_size=auto)."""
        config = self.config
        # e.g. "4 x Block", or "" when off; before compile and prepare, so that they wrap the checkpointed blocks
        self.checkpointed_blocks = memory.checkpoint_activations(
            model, config.activation_checkpointing_block) if config.activation_checkpointing else ""
        if config.compile:  # in place: forward runs compiled, the state-dict keys stay plain (no `_orig_mod.`)
            model.compile()
        fused = self.accelerator.device.type == "cuda" and not sharded.is_fsdp(self.accelerator)  # one kernel
        self.torch_optimizer = build_optimizer(model, optimizer, config.lr, config.weight_decay, config.adam_betas,
                                               config.param_groups, fused=fused)
        """The torch optimizer itself (`self.optimizer` is Accelerate's wrapper): its param groups and state."""
        self.model, self.optimizer = self.accelerator.prepare(model, self.torch_optimizer)
        if config.micro_batch_size == memory.AUTO:  # the largest micro-batch that fits, the same on every rank
            self.plan = memory.fit_micro_batch(self.plan, self.accelerator, self.unwrapped_model, self.train_data,
                                               self.collate_fn, self.loss_fn)

    # ------------------------------------------------------------------------------------ the loop

    def fit(self) -> dict[str, float]:
        """Train for the planned optimizer steps; evaluate, log and save as configured. Returns the last metrics."""
        # before anything is written: what resume=PATH names, and the first micro-batches (acctrain.preflight)
        self.checkpointer.check_resume_path()
        if self._fits == 0:
            preflight.first_micro_batches(self.accelerator, self.unwrapped_model, self.train_data, self.eval_data,
                                          self.plan, self.collate_fn, self._loss_of, self._to_device)
        with run_lock.owned(self.accelerator, self.config.output_dir), self._watched():
            self.resume()
            self._fits += 1
            if self.state.step >= self.plan.total_steps:
                return self._complete()
            return self._fit()

    def _watched(self):
        """The watchdog for the fit, with several processes (acctrain.watchdog)."""
        acc = self.accelerator
        return watchdog.watched(acc.process_index, acc.num_processes, self.config.output_dir, self.config.hang_timeout,
                                lambda: barrier.wait_for_everyone(acc))

    def _complete(self) -> dict[str, float]:
        """A fit with nothing left to train: say so, and how to train on; returns the checkpoint's metrics."""
        step, total, path = self.state.step, self.plan.total_steps, self.resumed_from
        if step > total:
            raise ConfigError("max_steps", f"{path} is at optimizer step {step}, past this run's {total} steps; "
                              "raise max_steps (or epochs) to train on from it, or start afresh (resume=none, or "
                              "another output_dir).")
        self.print(f"the run is complete: {path} holds all {total} optimizer steps, so nothing was trained. To train "
                   "longer raise max_steps or epochs (the schedule then stretches to the new length); to start "
                   "over use resume=none overwrite=true, or another output_dir.")
        self.checkpoint_path = path  # the run's last checkpoint, as after a fit that trained
        self._load_best_at_end()
        return dict(self._saved_metrics)

    def _fit(self) -> dict[str, float]:
        self._fitting, self._asked, self._saved_at = True, agreement.NO_REQUESTS, time.monotonic()
        # The step's verdict is read a step late, without stalling the GPU, where nothing needs it sooner: a
        # fused optimizer that skips a non-finite update on the device, and no callback inside the step.
        self._verdict_on_device = self.step_ops.skips_on_device and not any(
            self.callbacks.has(event) for event in (*IN_STEP_EVENTS, "before_optimizer_step", "after_step"))
        try:
            with self._signals:
                return self._run()
        except BaseException as err:  # an error, Ctrl-C: count the step in flight; a background save still completes
            if isinstance(err, (Exception, KeyboardInterrupt)):
                watchdog.failed(err)  # the other ranks end now, not after the waits below
            with contextlib.suppress(Exception):
                self._settle()
            # other ranks' parts of it are waited for a minute at most: those ranks may have died with the run
            self.checkpointer.wait(raise_error=False, patience=60.0)
            raise
        finally:
            self._fitting, self._verdict_on_device, self._pending = False, False, None
            self.metrics.close()
            if self.feed is not None and self.feed.reader is None:  # a loader's workers end with the fit (a
                self.feed = None  # stream's reader stays: its position is the run's, for a save after fit)

    def _run(self) -> dict[str, float]:
        cfg, plan = self.config, self.plan
        self._start_run()
        try:
            self._fire("before_fit")
            self.metrics.start(self.state.step, self.state.samples_seen)
            feed = self.feed = self._feed()
            while self.state.step < plan.total_steps:
                epoch, first = divmod(self.state.step, plan.steps_per_epoch)
                try:
                    self._fire("before_epoch")
                    for window in feed.epoch(min(plan.steps_per_epoch - first, plan.total_steps - self.state.step)):
                        self._train_step(window, feed.batches)
                        self._after_step()
                except CancelEpoch:  # agreed by all ranks: the rest of this epoch's data is skipped
                    self.state.step = min((epoch + 1) * plan.steps_per_epoch, plan.total_steps)
                    feed = self.feed = self._feed()  # the loader had read ahead into the skipped data
                self._flush()
                # Without eval_every, evaluate after each epoch; with it, also at the end of the run.
                if (not cfg.eval_every or self.state.step == plan.total_steps) and self._eval_step != self.state.step:
                    self.evaluate()
                self._fire("after_epoch")
        except CancelFit:  # agreed by all ranks; the last applied step is saved below
            self._flush()
        self.save()
        self.checkpointer.wait()  # fit returns with its last checkpoint committed
        self._load_best_at_end()
        self._fire("after_fit")
        return dict(self.metrics.last, **self.last_eval)

    def _after_step(self) -> None:
        """Between optimizer steps: stop on a signal, log, evaluate and save as configured."""
        cfg, state = self.config, self.state
        asked, self._asked = self._asked, agreement.NO_REQUESTS
        if asked.stop:
            self._flush()
            self.save()
            self.checkpointer.wait()
            stop = Preempted(f"stopped by {self._signals.received or 'a signal on another rank'} after optimizer "
                             f"step {state.step}; saved {self.checkpoint_path}; resume=auto continues from it")
            self.print(stop.message)
            raise stop
        if state.step % cfg.log_every == 0:
            self._flush()
        if cfg.eval_every and state.step % cfg.eval_every == 0:
            self.evaluate()
        if cfg.async_save and state.schedule_step:  # once, in the background, now that the optimizer state exists
            self.checkpointer.reserve(self.model, self.torch_optimizer)
        periodic = cfg.save_every and state.step % cfg.save_every == 0
        if (asked.save or periodic) and state.step < self.plan.total_steps:  # the end of fit saves anyway
            self.save()

    def _train_step(self, window: Window, batches: Iterator) -> None:
        """One optimizer step over this rank's micro-batches of `window`."""
        state, ops, watch = self.state, self.step_ops, watchdog.current()
        watch.at("the step's start", state.step + 1)
        if not self._verdict_on_device:  # there, set once the previous step is counted
            self._set_lr_and_momentum(state.schedule_step)
        self._fire("before_step")  # its cancel requests travel with this step's all-reduce
        local_loss, local_items, token_weighted = self._accumulate_gradients(window, batches, watch)
        with watch.waiting("the step's all-reduce"):
            totals = agreement.reduce_step(self.accelerator, local_loss, local_items, self._requests(), self._item_dtype)
        self.step_loss = totals.loss_sum / totals.items  # the exact mean over all of this step's items
        if token_weighted:  # rescaled to the step's true item count, summed over micro-batches and ranks
            loss_scaling.correct(self.model.parameters(), window.global_samples / totals.items)
        for param in self.frozen_params:
            param.grad = None  # frozen: no update, no weight decay, no momentum drift
        with (watch if ops.collective_passes else watchdog.IDLE).waiting("clipping (FSDP's global norm)"):
            self.grad_norm = ops.clip(self.config.max_grad_norm or float("inf"))
        watch.at("optimizer step")
        items = totals.items if token_weighted else None
        if self._verdict_on_device:
            return self._step_on_device(window, totals, items)
        verdict, loss, norm, items = self._decide(totals, items)  # note: the step's one host-device sync
        if verdict.halt:  # the NaN policy stops the run: no update, but the GradScaler's update() still runs
            ops.step(False)
            ops.zero_grad()
            self._halt_if(verdict)
        self.checkpointer.wait_copied()  # an async save's copy of the weights, before they change
        verdict = verdict.cancelled(self._fire("before_optimizer_step"))
        ops.step(verdict.apply)  # with fp16, the GradScaler's update() runs here whatever the verdict
        ops.zero_grad()
        self._asked = verdict.requests
        verdict.raise_if_cancelled()  # CancelEpoch/CancelFit: the step is not consumed
        state.consume(window.global_samples)
        state.count(verdict)
        if self.lr_scheduler is not None and verdict.apply:
            self.lr_scheduler.step()
        self._log_step(state.step, loss, norm, self._lr_metrics, items)
        self._fire("after_step")

    def _accumulate_gradients(self, window: Window, batches: Iterator,
                              watch: watchdog.Watchdog | watchdog._Idle) -> tuple[torch.Tensor, Any, bool]:
        """Forward and backward over this rank's micro-batches; DDP's all-reduce on the last one only.

        Returns this rank's summed loss and item count, and whether the loss is token-weighted.
        """
        scale = loss_scaling.micro_scale(self.accelerator.num_processes, window.global_samples)
        loss_sum, num_items, token_weighted = None, 0, False  # num_items stays a host int for per-sample means
        last, step = len(window.micro_batches) - 1, self.state.step + 1
        for self.micro_index, micro in enumerate(window.micro_batches):
            self.is_last_micro = self.micro_index == last
            watch.at("data (the next micro-batch)", step)
            try:
                batch = self._to_device(next(batches))
            except Exception as err:  # no cost per batch: only when raised
                note_samples(err, micro.indices, f"train_data (optimizer step {step})")
                raise
            watch.at("forward/backward", step)
            # the passes that wait for the other ranks: DDP's last backward (its all-reduce), or FSDP's every pass
            waits = watch if self.is_last_micro or self.step_ops.collective_passes else watchdog.IDLE
            with self.step_ops.no_sync(self.is_last_micro):  # the Engine drives the sync, not accumulate()
                with (watch if self.step_ops.collective_passes else watchdog.IDLE).waiting("the forward (FSDP)"):
                    self.micro_loss, items, weighted = self._loss(batch, micro.num_samples)
                self._fire("after_loss")
                with waits.waiting("the backward (its collectives)"):
                    self.step_ops.backward(self.micro_loss, scale)
            self._fire("after_backward")
            loss_sum = self.micro_loss.detach() if loss_sum is None else loss_sum + self.micro_loss.detach()
            num_items = num_items + items
            token_weighted |= weighted
        return loss_sum, num_items, token_weighted

    def _decide(self, totals: agreement.StepTotals, items: torch.Tensor | None) -> tuple[Verdict, float, float, Any]:
        """The step's verdict from its reduced numbers, read to the host at once (the synchronous path), and the
        loss, norm and item count (of a token-weighted loss) it read: host numbers for the log."""
        loss, norm, items, flags = self._read(torch.stack(self._step_values(totals, items)).tolist(), items)
        scaler = self.step_ops.scaler
        # only on a step whose gradients overflowed: the loss scale before this step's update (a sync)
        scale = scaler.get_scale() if scaler is not None and not math.isfinite(norm) else None
        verdict = agreement.decide(loss, norm, flags or totals.requests, self._policy(), self.state.step + 1,
                                   self.state.skipped_in_a_row, scale)
        if not verdict.finite and items == 0:
            empty = " (the step has 0 items: loss_fn's num_items summed over all ranks is 0)"
            verdict = dataclasses.replace(verdict, reason=verdict.reason and verdict.reason + empty,
                                          halt=verdict.halt and verdict.halt + empty)
        if verdict.overflow:
            self.print(f"{verdict.reason}: update skipped, loss scale {scale:g} -> "
                       f"{scale * scaler.get_backoff_factor():g}")
        elif verdict.refused:
            self.print(f"skipping the update of step {self.state.step + 1}: {verdict.reason} (nan_policy=skip)")
        return verdict, loss, norm, items

    def _step_values(self, totals: agreement.StepTotals, items: torch.Tensor | None) -> list[torch.Tensor]:
        """What the host reads of a step, as one vector: loss, norm, the item count if counted, the requests."""
        flags = totals.requests if torch.is_tensor(totals.requests) else ()
        return [v.to(self.grad_norm.dtype) for v in (self.step_loss, self.grad_norm, *(() if items is None else (items,)),
                                                     *flags)]

    @staticmethod
    def _read(host: list[float], items: Any) -> tuple[float, float, float | None, list[float]]:
        loss, norm, *rest = host
        return loss, norm, (rest.pop(0) if items is not None else None), rest

    def _step_on_device(self, window: Window, totals: agreement.StepTotals, items) -> None:
        """The end of a step that does not wait for the GPU (see `fit`: a fused optimizer, no callback in the step).

        The update is skipped on the device when the loss or the gradient norm is not finite. The host reads
        this step's loss, norm and stop flag a step later, when the GPU is long past them (acctrain.readback),
        and only then counts the step, applies the NaN policy and logs it (`_settle`). The previous step is
        counted before this one's lr is set, so the schedule sees every applied step, as when it is read at once.
        """
        self._settle()  # the previous step; nan_policy=halt raises here, before this step's update
        self._set_lr_and_momentum(self.state.schedule_step)
        self.checkpointer.wait_copied()  # an async save's copy of the weights, before they change
        self.step_ops.step_if_finite(self.step_loss, self.grad_norm)
        self.step_ops.zero_grad()
        self.state.consume(window.global_samples)
        if not torch.is_tensor(totals.requests):  # one process: the requests are on the host already
            self._asked = Requests.agreed(totals.requests)
        ticket = self._readback.start(torch.stack(self._step_values(totals, items)))
        self._pending = (self.state.step, self.state.samples_seen, ticket, self._lr_metrics, items)
        self._fire("after_step")

    def _settle(self) -> None:
        """Count the step left pending by `_step_on_device`: skipped or applied, the NaN policy, its log row."""
        if self._pending is None:
            return
        (step, samples_seen, ticket, lr_metrics, items), self._pending = self._pending, None
        # note: host-device sync on numbers a step old: no wait
        loss, norm, items, flags = self._read(ticket.read(), items)
        verdict = agreement.decide(loss, norm, flags or agreement.NO_FLAGS, self._policy(), step,
                                   self.state.skipped_in_a_row)
        if verdict.refused:
            self.print(f"skipping the update of step {step}: {verdict.reason} (nan_policy=skip)")
        self._halt_if(verdict)
        self.state.count(dataclasses.replace(verdict, apply=verdict.finite))  # no cancel on this path
        if self.lr_scheduler is not None and verdict.finite:
            self.lr_scheduler.step()
        if verdict.requests is not agreement.NO_REQUESTS:  # several processes: a step late
            self._asked = verdict.requests
        self._log_step(step, loss, norm, lr_metrics, items, samples_seen)

    def _halt_if(self, verdict: Verdict) -> None:
        """Stop the run on the NaN policy's halt, naming the step and the last good checkpoint."""
        if verdict.halt:
            latest = checkpoint.latest_checkpoint(self.config.output_dir)
            kept = f"; the last good checkpoint is {latest}" if latest else "; no checkpoint was saved yet"
            raise NonFiniteError(verdict.halt + kept)

    def _log_step(self, step: int, loss, grad_norm, lr_metrics: dict, items, samples_seen: int | None = None) -> None:
        samples_seen = self.state.samples_seen if samples_seen is None else samples_seen
        self.metrics.add(step, {"train/loss": loss, "train/grad_norm": grad_norm,
                                "train/skipped_steps": self.state.skipped_steps,
                                "train/epoch": samples_seen / self.plan.dataset_len, **lr_metrics}, items=items)

    def _flush(self) -> None:
        """Write the logged steps (counting a pending one first)."""
        self._settle()
        self.metrics.flush(self.state.samples_seen)

    # ------------------------------------------------------------------------------------ helpers

    def _step_ops(self):
        """The step's gradient operations for this setup (acctrain.step_ops), chosen once."""
        return step_ops_for(self.accelerator, self.model, self.torch_optimizer, self.optimizer)

    def _policy(self) -> Policy:
        return Policy(self.config.nan_policy, self.config.max_skipped_steps)

    def _requests(self) -> Requests:
        """This rank's requests for the step: a stop (a signal arrived), a cancel from the step's callbacks, and a
        save when `save_every_minutes` have passed since the last one (each rank's clock; any rank's counts)."""
        stop, cancel = self._signals.received is not None, self.callbacks.take()
        minutes = self.config.save_every_minutes
        save = bool(minutes) and time.monotonic() - self._saved_at >= 60 * minutes
        return Requests(stop, cancel, save) if stop or cancel or save else agreement.NO_REQUESTS

    def _loss(self, batch: Any, num_samples: int) -> tuple[torch.Tensor, torch.Tensor | float, bool]:
        return self._loss_of(self.model, batch, num_samples)

    def _loss_of(self, model: torch.nn.Module, batch: Any, num_samples: int) -> tuple[torch.Tensor, Any, bool]:
        """(summed loss, item count, token-weighted?) of `model` on a batch of `num_samples` counted samples."""
        out = self.loss_fn(model, batch) if self.loss_fn is not None else loss_scaling.model_loss(model, batch)
        return loss_scaling.normalise(out, num_samples, self._item_dtype)

    def _fire(self, event: str):
        """Run an event's callbacks: the one dispatcher.

        Cancels raised in the step's first events (before_step, after_loss, after_backward) travel with the
        step's all-reduce (`_requests`). After any other event that has a handler, all ranks agree here on
        the strongest cancel any of them raised (one small all-reduce); inside fit an agreed CancelEpoch or
        CancelFit is raised at once, except after before_optimizer_step, whose cancel is returned.
        """
        if not self.callbacks.has(event):  # most events of most runs: nothing to run, nothing to agree on
            return None
        self.checkpointer.wait_copied()  # a callback may change the weights (EMA.applied): not during a save's copy
        self.callbacks(event, self)
        if event in IN_STEP_EVENTS:
            return None
        cancel = self.callbacks.take()
        if self.accelerator.num_processes > 1:
            # note: host-device sync and a collective, only after events that have callbacks
            flags = torch.tensor(Requests(cancel=cancel).flags(), device=self.accelerator.device)
            with watchdog.waiting(f"the agreement after {event}'s callbacks"):
                cancel = Requests.agreed(self.accelerator.reduce(flags, reduction="sum").tolist()).cancel
        if cancel in (CancelEpoch, CancelFit) and event != "before_optimizer_step" and self._fitting:
            raise cancel()
        return cancel

    def _feed(self, start: int | None = None, stop: int | None = None) -> Feed:
        """This rank's windows for steps [start, stop) (default: the current step to the end of the run), and
        their loader (pinned on CUDA); a stream resumes from the checkpoint's position when it starts there."""
        start = self.state.step if start is None else start
        resumed = self._stream_state[1] if self._stream_state and self._stream_state[0] == start else None
        return Feed(self.plan, self.accelerator.process_index, start, self.train_data, self.collate_fn,
                    self.config.num_workers, self.accelerator.device.type == "cuda", resumed, stop)

    def _build_schedule(self, schedule: str | Callable[[int], float]):
        cfg = self.config
        return build_schedule(schedule, self.plan.total_steps, warmup_steps=cfg.warmup_steps,
                              warmup_ratio=cfg.warmup_ratio, steps_per_epoch=self.plan.steps_per_epoch,
                              args=cfg.schedule_args)

    def _set_lr_and_momentum(self, step: int) -> None:
        """Set every param group's lr (its base lr x the schedule) and momentum for this update; note them for logs."""
        groups = self.torch_optimizer.param_groups
        if self.lr_scheduler is None:  # a torch LR scheduler sets the lr itself
            apply_schedule(groups, self.schedule.lr_factor(step), self.schedule.momentum(step))
        self._lr_metrics = self._lr_readout(groups)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean loss over `eval_data` (exact: summed over all ranks' shards, each sample once) and the metrics.

        Inside fit this is the run's evaluation: logged, and seen by the schedule (reduce_on_plateau), keep_best
        and the callbacks' after_evaluate (EarlyStopping, SaveBest, ...). Outside fit it only evaluates: the
        metrics are printed and returned, with those of callbacks that add metrics (`adds_metrics`, e.g. the
        EMA's), and nothing that watches training reacts or is logged again.
        """
        self.resume()  # outside fit too: the weights a fit would continue from
        self._settle()  # the counters of every step taken, for after_evaluate
        if self.eval_data is None:
            self.last_eval = {}
            return {}
        if not self._fitting:
            return self._evaluate_only()
        watchdog.at("evaluation", self.state.step)
        self.last_eval = self.eval_metrics()
        self.accelerator.log(self.last_eval, step=self.state.step)
        self._eval_step = self.state.step
        self.schedule.on_evaluate(self.last_eval[self.schedule.watches])  # identical on all ranks: reduced above
        self.print(f"eval at step {self.state.step} | " + ", ".join(
            f"{name.removeprefix('eval/')} {value:.4f}" for name, value in self.last_eval.items()))
        self._fire("after_evaluate")
        self._check_keep_best(self.last_eval)
        return self.last_eval

    def _evaluate_only(self) -> dict[str, float]:
        """evaluate() outside fit: the metrics, with what metric-adding callbacks add; nothing logged or watched."""
        self.last_eval, self._eval_step = self.eval_metrics(), -1  # not this step's evaluation, for a save
        adds = [cb for cb in self.callbacks.items if cb.adds_metrics(list(self.last_eval))]
        Callbacks(adds)("after_evaluate", self)
        self.print(f"evaluated at step {self.state.step} (outside fit: not logged) | " + ", ".join(
            f"{name} {value:.4f}" for name, value in self.last_eval.items()))
        return self.last_eval

    @property
    def fitting(self) -> bool:
        """Whether `fit` is running (callbacks log and react to evaluations only then)."""
        return self._fitting

    @torch.no_grad()
    def eval_metrics(self) -> dict[str, float]:
        """The eval metrics of the model's weights as they are now (all ranks); nothing logged, fired or kept."""
        if self.eval_data is None:
            return {}
        return evaluate(self.accelerator, self.model, self.eval_data, self.plan.micro_batch, self.collate_fn,
                        self._loss, self._item_dtype, self.measures, self.unwrapped_model)

    def eval_metric_names(self) -> list[str]:
        """What each evaluation gives: eval/loss, the metrics, and what callbacks add (`Callback.adds_metrics`)."""
        names = ["eval/loss", *(f"eval/{m.name}" for m in self.measures)] if self.eval_data is not None else []
        for cb in self.callbacks.items:
            names += cb.adds_metrics(list(names))
        return names

    def check_watched(self) -> None:
        """Refuse a metric name that settings or callbacks watch and no evaluation gives, naming the field and the
        metrics there are: when the Engine is made and when `replan` starts a phase, before anything is written."""
        watched = {"keep_best": self.config.keep_best} if self.config.keep_best else {}
        for cb in self.callbacks.items:
            if isinstance(cb, (EarlyStopping, SaveBest)):
                watched[f"{type(cb).__name__}.metric"] = cb.metric
        metrics_module.check_watched(watched, self.eval_metric_names())
        if self.schedule.name == "reduce_on_plateau" and self.eval_data is not None:
            own = ["eval/loss", *(f"eval/{m.name}" for m in self.measures)]
            metrics_module.check_watched({"schedule_args.metric": self.schedule.watches}, own, "reduce_on_plateau "
                                         "is stepped before callbacks add theirs: watch eval/loss or one of metrics=")

    def _refuse_without_eval_data(self) -> None:
        """Refuse the settings that need evaluations, naming each, when the Engine has no eval data."""
        cfg = self.config
        if cfg.load_best_at_end:
            raise ConfigError("load_best_at_end", "the best checkpoint is chosen by evaluations: pass eval_data to "
                              "the Engine, or set load_best_at_end=false.")
        if cfg.keep_best:
            raise ConfigError("keep_best", f"{cfg.keep_best!r} needs evaluations: pass eval_data to the Engine.")
        if self.schedule.name == "reduce_on_plateau":
            raise ConfigError("scheduler", "reduce_on_plateau reacts to eval/loss: pass eval_data to the Engine.")
        if self.measures:
            raise ConfigError("metrics", f"{[m.name for m in self.measures]} are computed by evaluations: pass "
                              "eval_data to the Engine, or leave metrics out.")

    def _load_best_at_end(self) -> None:
        """load_best_at_end: the best checkpoint's weights into the model (weights only; see acctrain.checkpointer)."""
        if self.config.load_best_at_end:
            self.best_checkpoint = self.checkpointer.load_best(self.model, newest=self.checkpoint_path)
            if self.best_checkpoint is not None:
                self.print(f"load_best_at_end: the model holds the weights of {self.best_checkpoint} (best "
                           f"{self.config.keep_best}); optimizer state and step counter are those of step {self.state.step}")

    def _check_keep_best(self, metrics: dict[str, float]) -> None:
        """Refuse a keep_best that evaluation does not give (rotation would protect nothing and delete the best)."""
        keep = self.config.keep_best
        if keep and any(k.startswith("eval/") for k in metrics) and keep not in metrics:
            raise ConfigError("keep_best", f"no evaluation gives {keep!r}; the metrics are {sorted(metrics)}: use "
                              "one of them, or a callback that adds it in after_evaluate.")

    # ------------------------------------------------------------------------------------ state

    def save(self) -> None:
        """Write checkpoint `step-{step}` (all ranks call this); see acctrain.checkpointer."""
        self._settle()  # the counters and the schedule of every step taken
        self._saved_at = time.monotonic()
        watchdog.at("checkpoint save", self.state.step)
        self.checkpointer.config = self.config
        self.checkpoint_path = self.checkpointer.save(self.state.step, self.model, self.torch_optimizer,
                                                      self.state_dict())

    def resume(self) -> Path | None:
        """Load the checkpoint that `config.resume` selects, once (fit and lr_find call it first); returns its path."""
        if self._resumed:
            return self.resumed_from
        self._resumed = True
        watchdog.at("checkpoint load", self.state.step)
        self.checkpointer.config = self.config
        self.resumed_from = self.checkpointer.find()
        saved = checkpoint.read_json(self.resumed_from / "trainer_state.json") if self.resumed_from else {}
        if saved:  # the seeds' scheme the checkpoint was trained with (acctrain.seeds; none recorded: the first)
            self.plan = dataclasses.replace(self.plan, seed_scheme=saved["plan"].get("seed_scheme", 1))
        self.data_identity = self._identify_data(saved.get("data") or {})
        # a fresh start or a roll-back (resume=PATH) starts a trajectory; resume=auto continues the checkpoint's
        self.trajectory = (saved.get("trajectory") if self.config.resume == "auto" else None) or uuid.uuid4().hex
        if self.resumed_from is not None:
            wanted = optim.settings(self.torch_optimizer.param_groups)  # this run's, which the checkpoint replaces
            meta, self._restored_rng = self.checkpointer.load(self.resumed_from, self.model, self.torch_optimizer,
                                                              {**self.plan.describe(), "seed": self.plan.seed},
                                                              self.settings, self.data_identity)
            self.load_state_dict(meta)
            self._check_keep_best(self._saved_metrics)  # before this run's first save rotates anything
            self.print(f"resumed from {self.resumed_from} at optimizer step {self.state.step}")
            for change in resume_changes(meta.get("config", {}), self.config.to_dict(), self.state.step):
                self.print(change)
            changed = optim.reapply(self.torch_optimizer.param_groups, wanted, self.schedule.momentum(0) is not None)
            if changed:
                self.print("this run's optimizer settings replace the checkpoint's: " + ", ".join(changed))
        return self.resumed_from

    def _identify_data(self, saved: dict[str, Any]) -> dict[str, Any]:
        """The identity of the training and eval data (acctrain.data_identity), taken on the main process (a token
        file is hashed once, not once per rank) and shared; `saved` is the checkpoint's, whose digests are reused
        for unchanged files."""
        acc = self.accelerator
        found: list[Any] = [None]
        if acc.is_main_process:
            found = [{"train": data_identity.identify(self.train_data, saved.get("train")),
                      "eval": data_identity.identify(self.eval_data, saved.get("eval"))
                      if self.eval_data is not None else None}]
        if acc.num_processes > 1:
            barrier.after_main(acc, "the main rank's identity of the data")  # hashing a corpus takes a while
            found = broadcast_object_list(found)
        return found[0]

    def state_dict(self) -> dict[str, Any]:
        """The loop's state as JSON (trainer_state.json): counters, plan, config, schedule, scaler, callbacks."""
        plan, scaler = self.plan, self.step_ops.scaler
        return {
            "state": dataclasses.asdict(self.state),
            "epoch": self.state.step // plan.steps_per_epoch,
            "plan": {**plan.describe(), "seed": plan.seed, "seed_scheme": plan.seed_scheme},
            "config": self.config.to_dict(),
            "settings": self.settings,
            "schedule": self.schedule.state_dict(),
            "lr_scheduler": jsonable(self.lr_scheduler.state_dict()) if self.lr_scheduler is not None else None,
            "scaler": jsonable(scaler.state_dict()) if scaler is not None else None,
            "callbacks": self.callbacks.state_dict(),
            "model": export.model_record(self.unwrapped_model),  # what `acctrain export` writes it as
            "data": self.data_identity,  # a resume onto other data is refused (acctrain.data_identity)
            "trajectory": self.trajectory,  # which checkpoints continue one another (acctrain.checkpoint)
            "stream": self.feed.reader.state_dict() if self.plan.stream and self.feed else None,
            "metrics": {**{k: v for k, v in self.metrics.last.items() if k == "train/loss"},
                        **(self.last_eval if self._eval_step == self.state.step else {})},
        }

    def load_state_dict(self, meta: dict[str, Any]) -> None:
        """Continue from `state_dict()`'s output: counters, schedule position, scaler and callbacks."""
        self.state, self._saved_metrics = TrainState(**meta["state"]), meta.get("metrics", {})
        changes = self.schedule.continue_from(meta["schedule"])
        if changes:
            self.print(f"the schedule differs from the checkpoint's ({', '.join(changes)}): from optimizer step "
                       f"{self.state.schedule_step} the lr follows this run's")
        if self.lr_scheduler is not None and meta["lr_scheduler"]:
            self.lr_scheduler.load_state_dict({**self.lr_scheduler.state_dict(), **meta["lr_scheduler"]})
        if self.step_ops.scaler is not None and meta["scaler"]:
            self.step_ops.scaler.load_state_dict(meta["scaler"])
        for change in self.callbacks.load_state_dict(meta["callbacks"]):
            self.print(change)
        self._stream_state = (self.state.step, meta["stream"]) if meta.get("stream") else None

    def _start_run(self) -> None:
        """Clear, synchronise, start trackers and RNGs (runtime.start_run), print the plan (nothing is written before)."""
        cfg = self.config
        runtime.start_run(self.accelerator, cfg, self.state.step, self.settings, self._restored_rng,
                          resumed=self.resumed_from is not None, seed_scheme=self.plan.seed_scheme)
        self.model.train()
        if not self._summarised:
            self.print(model_summary(self.unwrapped_model, self.is_frozen))
            self._summarised = True
        self.print("run plan: " + ", ".join(f"{k}={v}" for k, v in self.plan.describe().items())
                   + f", precision={cfg.mixed_precision}, schedule={self._schedule_name()}"
                   + (f", activation_checkpointing={self.checkpointed_blocks}" if self.checkpointed_blocks else "")
                   + f", backend={runtime.backend()}, devices={runtime.local_devices(self.accelerator)}, "
                   + f"output_dir={cfg.output_dir}")

    def _metric_log(self) -> MetricLog:
        flops = getattr(self.unwrapped_model, "flops_per_token", None)
        flops = flops() if callable(flops) else flops
        return MetricLog(self.accelerator, self.plan.total_steps, flops, self.config.mixed_precision)

    def _schedule_name(self) -> str:
        return type(self.lr_scheduler).__name__ if self.lr_scheduler is not None else self.schedule.name

    def print(self, *args) -> None:
        """Print once per job, from the main process (Accelerate's print is once per node), above a progress bar."""
        if self.accelerator.is_main_process:
            self.metrics.print(" ".join(map(str, args)))

    @property
    def unwrapped_model(self) -> torch.nn.Module:
        return self.accelerator.unwrap_model(self.model)

    def close(self) -> None:
        """Wait for a background save, finish trackers and destroy the process group (gloo can abort at exit otherwise)."""
        self.checkpointer.wait()
        self.accelerator.end_training()


