"""The training loop under the Engine: fit, evaluation, save and resume, around one optimizer step.

`fit` runs the planned optimizer steps (acctrain.step.OptimizerStep: lr, micro-batches, one reduction, clip,
decide, update, and the step's one ending), and between them what the config asks: stop on a signal, log,
evaluate, save. The parts it calls own their concerns: the run's state (acctrain.state.RunState: what a
checkpoint saves, a trial puts back and a phase starts afresh), the data plan (acctrain.data), the schedule
(acctrain.schedules), acctrain.agreement what all ranks decide, acctrain.checkpoint.checkpointer the checkpoints,
acctrain.evaluation the evaluations, acctrain.runtime the start-up. `acctrain.engine.Engine` is this loop with
the toolkit on top.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from acctrain import agreement, barrier, checkpoint, data_identity, ema, evaluation, export, hf_data, loss_scaling, \
    memory, optim, precision, preflight, runtime, watchdog
from acctrain.checkpoint import run_lock, sharded
from acctrain import metrics as metrics_module
from acctrain.agreement import Requests
from acctrain.callbacks import IN_STEP_EVENTS, Callbacks, CancelEpoch, CancelFit
from acctrain.checkpoint.checkpointer import Checkpointer, resume_changes
from acctrain.compilation import compile_model
from acctrain.config import TrainConfig
from acctrain.data import DataPlan, Feed, Window
from acctrain.errors import ConfigError, Preempted
from acctrain.optim import build_optimizer
from acctrain.schedules import schedule_for
from acctrain.state import RunState, jsonable
from acctrain.step import OptimizerStep
from acctrain.step_ops import step_ops_for
from acctrain.step_time import clocked
from acctrain.summary import model_summary
from acctrain.tracking import MetricLog


def settled(method: Callable) -> Callable:
    """The one guard of the entry points that must see every step taken counted and the weights free to change:
    the step left pending by the read-a-step-late path is counted first (`OptimizerStep.settle`), and a background save's
    copy of the weights has finished (`Checkpointer.wait_copied`)."""
    @functools.wraps(method)
    def guarded(self: Loop, *args, **kwargs):
        self._step.settle(self.run_state)
        self.checkpointer.wait_copied()
        return method(self, *args, **kwargs)
    return guarded


def _of_run(name: str, doc: str) -> property:
    return property(lambda self: getattr(self.run_state, name), doc=doc)


def _of_step(name: str, doc: str) -> property:
    return property(lambda self: getattr(self._step, name), doc=doc)


class Loop:
    """The training loop of `Engine`: trains `model` on `train_data` with the batch geometry, schedule and
    precision of `config`. Engine (acctrain.engine), its one subclass, adds the toolkit."""

    config = _of_run("config", "The run's config (a new phase, `Engine.replan`, changes it).")
    plan = _of_run("plan", "Which samples each optimizer step sees (acctrain.data.DataPlan).")
    state = _of_run("counters", "Where the run is: optimizer steps taken and applied, samples seen (TrainState).")
    callbacks = _of_run("callbacks", "The callbacks (acctrain.callbacks.Callbacks).")
    metrics = _of_run("metrics", "The training log (acctrain.tracking.MetricLog): `metrics.last` is the last row.")
    schedule = _of_run("schedule", "The lr multiplier and momentum per optimizer step (acctrain.schedules).")
    lr_scheduler = _of_run("lr_scheduler", "A torch LR scheduler given as `schedule=`, else None.")
    last_eval = _of_run("last_eval", "The last evaluation's metrics.")
    resumed_from = _of_run("resumed_from", "The checkpoint this run continued from, or None.")
    data_identity = _of_run("data_identity", "The identity of the training and eval data (acctrain.data_identity).")
    # the step in progress, as callbacks see it (acctrain.callbacks; acctrain.step.OptimizerStep)
    micro_loss = _of_step("micro_loss", "This micro-batch's summed loss (after_loss on).")
    micro_index = _of_step("micro_index", "The micro-batch's index in the step's window.")
    is_last_micro = _of_step("is_last_micro", "Whether it is the window's last micro-batch (DDP's all-reduce).")
    grad_norm = _of_step("grad_norm", "The step's global gradient norm before clipping (before_optimizer_step on).")
    step_loss = _of_step("step_loss", "The step's exact mean loss over all ranks (before_optimizer_step on).")

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
        self.settings = dict(settings or {})
        """The job's other settings (e.g. `model.d_model`): recorded with each checkpoint and in the trackers'
        config; a resume from a checkpoint whose settings differ is refused, naming them."""
        self.accelerator = runtime.make_accelerator(config)
        plan = DataPlan.for_run(train_data, eval_data, config, self.accelerator.num_processes)
        # A torch LR scheduler is stepped once per applied optimizer step and sets the lr itself;
        # otherwise the Engine sets lr = base_lr x schedule(step) (config.scheduler, or a function step -> factor).
        lr_scheduler = schedule if isinstance(schedule, torch.optim.lr_scheduler.LRScheduler) else None
        schedule = schedule_for("constant" if lr_scheduler else schedule or config.scheduler, config, plan)
        self.measures = metrics_module.build(metrics)
        """The eval metrics beside eval/loss (acctrain.metrics), from `metrics=`."""
        self.train_data, self.eval_data = train_data, eval_data
        self.loss_fn, self.collate_fn = loss_fn, collate_fn
        callbacks = Callbacks(ema.configured(callbacks, config.ema_decay))
        evaluation.check_watched(config, callbacks, schedule, self.measures, eval_data is not None)
        plan = self._prepare(model, optimizer, config, plan)
        self.run_state = RunState(config, plan, schedule, lr_scheduler, callbacks, self._metric_log(config, plan))
        """Where the run is (acctrain.state.RunState): what a checkpoint saves, a trial puts back, a phase renews."""
        self.step_ops = self._step_ops()
        self.checkpointer = Checkpointer(self.accelerator, lambda: self.run_state.config)
        self._device = self.accelerator.device
        self._item_dtype = torch.float32 if self._device.type == "mps" else torch.float64
        self._step = OptimizerStep(self.accelerator, self.model, self.step_ops, self._loss_of, self._fire, self.print,
                                   self.checkpointer.wait_copied, self._requests, self._item_dtype)
        self._signals = runtime.StopSignals()
        self._fitting = self._summarised = False
        self._saved_at = 0.0  # the save clock (save_every_minutes)
        self.frozen_params: list[torch.nn.Parameter] = []
        """Parameters that `freeze` keeps unchanged: their gradients are dropped before clipping and the step."""
        self._fits, self._root_dir = 0, config.output_dir  # a later phase's own place (replan)
        self.feed: Feed | None = None  # the run's data
        self.best_checkpoint: Path | None = None
        """With load_best_at_end: the checkpoint whose weights the model holds after fit."""

    def _prepare(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | Callable | None,
                 config: TrainConfig, plan: DataPlan) -> DataPlan:
        """The model's memory switch and compile (in place), the optimizer, Accelerate's prepare of both, and the
        micro-batch that fits (micro_batch_size=auto): returns the plan with it."""
        # e.g. "4 x Block", or "" when off; before compile and prepare, so that they wrap the checkpointed blocks
        self.checkpointed_blocks = memory.checkpoint_activations(
            model, config.activation_checkpointing_block) if config.activation_checkpointing else ""
        self.compiled_regions = compile_model(model, config.compile)  # in place: the state-dict keys stay plain
        fused = self.accelerator.device.type == "cuda" and not sharded.is_fsdp(self.accelerator)  # one kernel
        self.torch_optimizer = build_optimizer(model, optimizer, config.lr, config.weight_decay, config.adam_betas,
                                               config.param_groups, fused=fused)
        """The torch optimizer itself (`self.optimizer` is Accelerate's wrapper): its param groups and state."""
        self.model, self.optimizer = self.accelerator.prepare(model, self.torch_optimizer)
        if config.micro_batch_size == memory.AUTO:  # the largest micro-batch that fits, the same on every rank
            plan = memory.fit_micro_batch(plan, self.accelerator, self.unwrapped_model, self.train_data,
                                          self.collate_fn, self.loss_fn)
        return plan

    def _step_ops(self):
        """The step's gradient operations for this setup (acctrain.step_ops), chosen once."""
        return step_ops_for(self.accelerator, self.model, self.torch_optimizer, self.optimizer)

    # ------------------------------------------------------------------------------------ the loop

    def fit(self) -> dict[str, float]:
        """Train for the planned optimizer steps; evaluate, log and save as configured. Returns the last metrics."""
        # before anything is written: what resume=PATH names, and the first micro-batches (acctrain.preflight)
        self.checkpointer.check_resume_path()
        if self._fits == 0:
            preflight.first_micro_batches(self.accelerator, self.unwrapped_model, self.train_data, self.eval_data,
                                          self.plan, self.collate_fn, self._loss_of)
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
        return dict(self.run_state.saved_metrics)

    def _fit(self) -> dict[str, float]:
        run = self.run_state
        self._fitting, run.asked, self._saved_at = True, agreement.NO_REQUESTS, time.monotonic()
        # The step's verdict is read a step late, without stalling the GPU, where nothing needs it sooner: a
        # fused optimizer that skips a non-finite update on the device, and no callback inside the step.
        run.reads_late = self.step_ops.skips_on_device and not any(
            self.callbacks.has(event) for event in (*IN_STEP_EVENTS, "before_optimizer_step", "after_step"))
        try:
            with self._signals:
                return self._train_loop()
        except BaseException as err:  # an error, Ctrl-C: count the step in flight; a background save still completes
            if isinstance(err, (Exception, KeyboardInterrupt)):
                watchdog.failed(err)  # the other ranks end now, not after the waits below
            with contextlib.suppress(Exception):
                self._step.settle(self.run_state)
            # other ranks' parts of it are waited for a minute at most: those ranks may have died with the run
            self.checkpointer.wait(raise_error=False, patience=60.0)
            raise
        finally:
            self._fitting, run.reads_late, self._step.pending = False, False, None
            run.metrics.close()
            if self.feed is not None and self.feed.reader is None:  # a loader's workers end with the fit (a
                self.feed = None  # stream's reader stays: its position is the run's, for a save after fit)

    def _train_loop(self) -> dict[str, float]:
        cfg, plan, counters = self.config, self.plan, self.state
        self._start_run()
        try:
            self._fire("before_fit")
            self.metrics.start(counters.step, counters.samples_seen)
            feed = self.feed = self._feed()
            while counters.step < plan.total_steps:
                epoch, first = divmod(counters.step, plan.steps_per_epoch)
                try:
                    self._fire("before_epoch")
                    for window in feed.epoch(min(plan.steps_per_epoch - first, plan.total_steps - counters.step)):
                        self._train_step(window, feed.batches)
                        self._after_step()
                except CancelEpoch:  # agreed by all ranks: the rest of this epoch's data is skipped
                    counters.step = min((epoch + 1) * plan.steps_per_epoch, plan.total_steps)
                    feed = self.feed = self._feed()  # the loader had read ahead into the skipped data
                self._flush()
                # Without eval_every, evaluate after each epoch; with it, also at the end of the run.
                if (not cfg.eval_every or counters.step == plan.total_steps) and \
                        self.run_state.eval_step != counters.step:
                    self.evaluate()
                self._fire("after_epoch")
        except CancelFit:  # agreed by all ranks; the last applied step is saved below
            self._flush()
        self.save()
        with self.metrics.clock.part("checkpoint"):
            self.checkpointer.wait()  # fit returns with its last checkpoint committed
        self.print(self.metrics.time_summary(counters.step))
        self._load_best_at_end()
        self._fire("after_fit")
        return dict(self.metrics.last, **self.last_eval)

    def _after_step(self) -> None:
        """Between optimizer steps: stop on a signal, log, evaluate and save as configured."""
        cfg, run = self.config, self.run_state
        step, (asked, run.asked) = run.counters.step, (run.asked, agreement.NO_REQUESTS)
        if asked.stop:
            self._flush()
            self.save()
            self.checkpointer.wait()
            stop = Preempted(f"stopped by {self._signals.received or 'a signal on another rank'} after optimizer "
                             f"step {step}; saved {self.checkpoint_path}; resume=auto continues from it")
            self.print(stop.message)
            raise stop
        if step % cfg.log_every == 0:
            self._flush()
        if cfg.eval_every and step % cfg.eval_every == 0:
            self.evaluate()
        if cfg.async_save and run.counters.schedule_step:  # once, in the background, now that the optimizer state exists
            self.checkpointer.reserve(self.model, self.torch_optimizer)
        periodic = cfg.save_every and step % cfg.save_every == 0
        if (asked.save or periodic) and step < self.plan.total_steps:  # the end of fit saves anyway
            self.save()

    # ------------------------------------------------------------------------------------ the step

    def _train_step(self, window: Window, batches: Iterator) -> None:
        """One optimizer step over this rank's micro-batches of `window` (acctrain.step)."""
        self._step(self.run_state, window, batches, self.frozen_params)

    @clocked("logging")
    def _flush(self) -> None:
        """Write the logged steps (counting a pending one first)."""
        self._step.settle(self.run_state)
        self.metrics.flush(self.state.samples_seen)

    def _requests(self) -> Requests:
        """This rank's requests for the step: a stop (a signal arrived), a cancel from the step's callbacks, and a
        save when `save_every_minutes` have passed since the last one (each rank's clock; any rank's counts)."""
        stop, cancel = self._signals.received is not None, self.callbacks.take()
        minutes = self.config.save_every_minutes
        save = bool(minutes) and time.monotonic() - self._saved_at >= 60 * minutes
        return Requests(stop, cancel, save) if stop or cancel or save else agreement.NO_REQUESTS

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
        with self.metrics.clock.part("callbacks"):
            self.callbacks(event, self)
        if event in IN_STEP_EVENTS:
            return None
        cancel = self.callbacks.take()
        if self.accelerator.num_processes > 1:
            # note: host-device sync and a collective, only after events that have callbacks
            flags = torch.tensor(Requests(cancel=cancel).flags(), device=self._device)
            with watchdog.waiting(f"the agreement after {event}'s callbacks"):
                cancel = Requests.agreed(self.accelerator.reduce(flags, reduction="sum").tolist()).cancel
        if cancel in (CancelEpoch, CancelFit) and event != "before_optimizer_step" and self._fitting:
            raise cancel()
        return cancel

    def _feed(self, start: int | None = None, stop: int | None = None) -> Feed:
        """This rank's windows for steps [start, stop) (default: the current step to the end of the run), and
        their loader (pinned on CUDA); a stream resumes from the checkpoint's position when it starts there."""
        run = self.run_state
        start = run.counters.step if start is None else start
        position = run.stream_position
        resumed = position[1] if position and position[0] == start else None
        return Feed(run.plan, self.accelerator.process_index, start, self.train_data, self.collate_fn,
                    run.config.num_workers, self._device.type == "cuda", resumed, stop)

    # ------------------------------------------------------------------------------------ evaluation

    @settled  # the counters of every step taken, for after_evaluate
    @clocked("evaluation")
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean loss over `eval_data` (exact: summed over all ranks' shards, each sample once) and the metrics.

        Inside fit this is the run's evaluation: logged, and seen by the schedule (reduce_on_plateau), keep_best
        and the callbacks' after_evaluate (EarlyStopping, SaveBest, ...). Outside fit it only evaluates: the
        metrics are printed and returned, with those of callbacks that add metrics (`adds_metrics`, e.g. the
        EMA's), and nothing that watches training reacts or is logged again.
        """
        self.resume()  # outside fit too: the weights a fit would continue from
        run = self.run_state
        if self.eval_data is None:
            run.last_eval = {}
            return {}
        if not self._fitting:
            return self._evaluate_only()
        watchdog.at("evaluation", run.counters.step)
        run.last_eval, run.eval_step = self.eval_metrics(), run.counters.step
        self.accelerator.log(run.last_eval, step=run.counters.step)
        run.schedule.on_evaluate(run.last_eval[run.schedule.watches])  # identical on all ranks: reduced above
        self.print(f"eval at step {run.counters.step} | " + ", ".join(
            f"{name.removeprefix('eval/')} {value:.4f}" for name, value in run.last_eval.items()))
        self._fire("after_evaluate")
        evaluation.check_keep_best(run.config.keep_best, run.last_eval)
        return run.last_eval

    def _evaluate_only(self) -> dict[str, float]:
        """evaluate() outside fit: the metrics, with what metric-adding callbacks add; nothing logged or watched."""
        run = self.run_state
        run.last_eval, run.eval_step = self.eval_metrics(), -1  # not this step's evaluation, for a save
        adds = [cb for cb in self.callbacks.items if cb.adds_metrics(list(run.last_eval))]
        Callbacks(adds)("after_evaluate", self)
        self.print(f"evaluated at step {run.counters.step} (outside fit: not logged) | " + ", ".join(
            f"{name} {value:.4f}" for name, value in run.last_eval.items()))
        return run.last_eval

    @property
    def fitting(self) -> bool:
        """Whether `fit` is running (callbacks log and react to evaluations only then)."""
        return self._fitting

    @torch.no_grad()
    def eval_metrics(self) -> dict[str, float]:
        """The eval metrics of the model's weights as they are now (all ranks); nothing logged, fired or kept."""
        if self.eval_data is None:
            return {}
        return evaluation.evaluate(self.accelerator, self.model, self.eval_data, self.plan.micro_batch,
                                   self.collate_fn, functools.partial(self._loss_of, self.model), self._item_dtype,
                                   self.measures, self.unwrapped_model)

    def eval_metric_names(self) -> list[str]:
        """What each evaluation gives: eval/loss, the metrics, and what callbacks add (`Callback.adds_metrics`)."""
        return evaluation.metric_names(self.measures, self.callbacks, self.eval_data is not None)

    def _load_best_at_end(self) -> None:
        """load_best_at_end: the best checkpoint's weights into the model (weights only; see acctrain.checkpoint.checkpointer)."""
        if self.config.load_best_at_end:
            self.best_checkpoint = self.checkpointer.load_best(self.model, newest=self.checkpoint_path)
            if self.best_checkpoint is not None:
                self.print(f"load_best_at_end: the model holds the weights of {self.best_checkpoint} (best "
                           f"{self.config.keep_best}); optimizer state and step counter are those of step {self.state.step}")

    # ------------------------------------------------------------------------------------ state

    @settled  # the counters and the schedule of every step taken
    @clocked("checkpoint")
    def save(self) -> None:
        """Write checkpoint `step-{step}` (all ranks call this); see acctrain.checkpoint.checkpointer."""
        self._saved_at = time.monotonic()
        watchdog.at("checkpoint save", self.state.step)
        self.checkpoint_path = self.checkpointer.save(self.state.step, self.model, self.torch_optimizer,
                                                      self.state_dict())

    def resume(self) -> Path | None:
        """Load the checkpoint that `config.resume` selects, once (fit and lr_find call it first); returns its path."""
        run = self.run_state
        if run.resumed:
            return run.resumed_from
        run.resumed = True
        watchdog.at("checkpoint load", run.counters.step)
        path = run.resumed_from = self.checkpointer.find()
        saved = checkpoint.read_json(path / "trainer_state.json") if path else {}
        if saved:  # the seeds' scheme the checkpoint was trained with (acctrain.seeds; none recorded: the first)
            run.plan = dataclasses.replace(run.plan, seed_scheme=saved["plan"].get("seed_scheme", 1))
        run.data_identity = self._identify_data(saved.get("data") or {})
        # a fresh start or a roll-back (resume=PATH) starts a trajectory; resume=auto continues the checkpoint's
        run.trajectory = (saved.get("trajectory") if run.config.resume == "auto" else None) or uuid.uuid4().hex
        if path is not None:
            wanted = optim.settings(self.torch_optimizer.param_groups)  # this run's, which the checkpoint replaces
            meta, run.restored_rng = self.checkpointer.load(path, self.model, self.torch_optimizer,
                                                            {**run.plan.describe(), "seed": run.plan.seed},
                                                            self.settings, run.data_identity)
            for change in run.load_state_dict(meta):
                self.print(change)
            if self.step_ops.scaler is not None and meta["scaler"]:
                self.step_ops.scaler.load_state_dict(meta["scaler"])
            evaluation.check_keep_best(run.config.keep_best, run.saved_metrics)  # before a save rotates anything
            self.print(f"resumed from {path} at optimizer step {run.counters.step}")
            for change in resume_changes(meta.get("config", {}), run.config.to_dict(), run.counters.step):
                self.print(change)
            changed = optim.reapply(self.torch_optimizer.param_groups, wanted, run.schedule.momentum(0) is not None)
            if changed:
                self.print("this run's optimizer settings replace the checkpoint's: " + ", ".join(changed))
        return path

    def _identify_data(self, saved: dict[str, Any]) -> dict[str, Any]:
        """The identity of the training and eval data (acctrain.data_identity), taken on the main process (a token
        file is hashed once, not once per rank) and shared; `saved` is the checkpoint's, whose digests are reused
        for unchanged files."""
        def identify() -> dict[str, Any]:
            return {"train": data_identity.identify(self.train_data, saved.get("train")),
                    "eval": data_identity.identify(self.eval_data, saved.get("eval"))
                    if self.eval_data is not None else None}
        return agreement.main_answers(self.accelerator, identify, "the main rank's identity of the data")

    def state_dict(self) -> dict[str, Any]:
        """trainer_state.json: the run's state (acctrain.state.RunState), the settings, the loss scaler, what the
        model is (what `acctrain export` writes it as) and a stream's position."""
        scaler = self.step_ops.scaler
        return {**self.run_state.state_dict(), "settings": self.settings,
                "scaler": jsonable(scaler.state_dict()) if scaler is not None else None,
                "model": export.model_record(self.unwrapped_model),
                "stream": self.feed.reader.state_dict() if self.plan.stream and self.feed else None}

    def _start_run(self) -> None:
        """Clear, synchronise, start trackers and RNGs (runtime.start_run), print the plan (nothing is written before)."""
        run = self.run_state
        runtime.start_run(self.accelerator, run.config, run.counters.step, self.settings, run.restored_rng,
                          resumed=run.resumed_from is not None, seed_scheme=run.plan.seed_scheme)
        self.model.train()
        if not self._summarised:
            self.print(model_summary(self.unwrapped_model, self.is_frozen))
            self._summarised = True
        schedule = type(run.lr_scheduler).__name__ if run.lr_scheduler is not None else run.schedule.name
        self.print("run plan: " + ", ".join(f"{k}={v}" for k, v in run.plan.describe().items())
                   + f", precision={precision.describe(run.config.mixed_precision, self.unwrapped_model)}"
                   + f", schedule={schedule}"
                   + (f", activation_checkpointing={self.checkpointed_blocks}" if self.checkpointed_blocks else "")
                   + (f", compile=regions ({self.compiled_regions})" if self.compiled_regions else "")
                   + f", backend={runtime.backend()}, devices={runtime.local_devices(self.accelerator)}, "
                   + f"output_dir={run.config.output_dir}")

    def _metric_log(self, config: TrainConfig, plan: DataPlan) -> MetricLog:
        flops = getattr(self.unwrapped_model, "flops_per_token", None)
        flops = flops() if callable(flops) else flops
        return MetricLog(self.accelerator, plan.total_steps, flops, config.mixed_precision)

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

