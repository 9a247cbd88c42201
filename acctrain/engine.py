"""The Engine: an Accelerate training loop with world-size-invariant global batches.

    from acctrain import Engine, TrainConfig
    engine = Engine(model, TrainConfig(global_batch_size=64, micro_batch_size=8), train_set, eval_set, loss_fn)
    engine.fit()

`loss_fn(model, batch)` returns either a mean over the micro-batch's samples, or `(loss_sum, num_items)`
(e.g. summed token losses and the count of non-ignored tokens). Without `loss_fn`, the model is called
as `model(**batch)` (or `model(batch)`) and its own `outputs.loss` is used as a per-sample mean.

One optimizer step (`_train_step`) reads top to bottom: set lr, forward/backward over this rank's
micro-batches with gradient all-reduce on the last one only, normalise by the step's global item
count, clip once on the global norm, step. The data plan (acctrain.data) decides which samples each
step sees, the schedule (acctrain.schedules) the lr; neither goes through `accelerator.prepare`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import threading
from collections.abc import Mapping
import shutil
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import (
    DistributedType,
    FullyShardedDataParallelPlugin,
    ProjectConfiguration,
    parse_flag_from_env,
    send_to_device,
)
from torch.utils.data import DataLoader

from acctrain.callbacks import CANCELS, IN_STEP_EVENTS, Callbacks, CancelEpoch, CancelFit
from acctrain import checkpoint, persist, sharded
from acctrain.config import TrainConfig
from acctrain.data import DataPlan, Window, micro_batch_loader
from acctrain.errors import ConfigError, NonFiniteError, Preempted
from acctrain.optim import build_optimizer, get_momentum, matches, set_momentum
from acctrain.readback import Readback
from acctrain.schedules import build_schedule
from acctrain.summary import model_summary
from acctrain.state import rng_from_files
from acctrain.step_ops import MIN_LOSS_SCALE, step_ops_for
from acctrain.tracking import MetricLog

CANCEL_STEP = 1  # cancel levels: 0 none, 1 + index in CANCELS (CancelStep, CancelEpoch, CancelFit)


@dataclass
class TrainState:
    """Where the run is: counted in optimizer steps and global samples, never in micro-batches."""

    step: int = 0
    """Optimizer steps taken (windows of data consumed), including skipped ones."""
    schedule_step: int = 0
    """Optimizer steps applied; the schedule's position (a skipped fp16 overflow step does not advance it)."""
    samples_seen: int = 0
    """Global training samples consumed."""
    skipped_steps: int = 0
    """Steps not applied: fp16 overflow, or a non-finite loss or gradient norm with nan_policy='skip'."""
    skipped_in_a_row: int = 0
    """Consecutive skipped steps up to now (nan_policy='skip' halts at max_skipped_steps)."""


class Engine:
    """Trains `model` on `train_data` with the batch geometry, schedule and precision of `config`."""

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
    ):
        self.config = config
        self.accelerator = _make_accelerator(config)
        self.plan = DataPlan(
            dataset_len=len(train_data),
            global_batch=config.global_batch_size,
            micro_batch=config.micro_batch_size,
            world_size=self.accelerator.num_processes,
            seed=config.seed,
            epochs=config.epochs,
            max_steps=config.max_steps,
        )
        # A torch LR scheduler is stepped once per applied optimizer step and sets the lr itself;
        # otherwise the Engine sets lr = base_lr x schedule(step) (config.scheduler, or a function step -> factor).
        self.lr_scheduler = schedule if isinstance(schedule, torch.optim.lr_scheduler.LRScheduler) else None
        self.schedule = build_schedule(
            "constant" if self.lr_scheduler else schedule or config.scheduler,
            self.plan.total_steps,
            warmup_steps=config.warmup_steps,
            warmup_ratio=config.warmup_ratio,
            steps_per_epoch=self.plan.steps_per_epoch,
            args=config.schedule_args,
        )
        if self.schedule.name == "reduce_on_plateau" and eval_data is None:
            raise ConfigError("scheduler", "reduce_on_plateau reacts to eval/loss: pass eval_data to the Engine.")
        self.train_data, self.eval_data = train_data, eval_data
        self.loss_fn, self.collate_fn = loss_fn, collate_fn
        self.callbacks = Callbacks(callbacks)
        self.state = TrainState()
        if config.compile:  # in place: forward runs compiled, the state-dict keys stay plain (no `_orig_mod.`)
            model.compile()
        fused = self.accelerator.device.type == "cuda" and not sharded.is_fsdp(self.accelerator)  # one kernel per step
        optimizer = build_optimizer(model, optimizer, config.lr, config.weight_decay, config.adam_betas,
                                    config.param_groups, fused=fused)
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        # The raw torch optimizer: zero_grad on it skips Accelerate's per-call signature inspection.
        self._torch_optimizer = optimizer
        self.step_ops = self._step_ops()
        self.metrics = self._metric_log()
        self._item_dtype = torch.float32 if self.accelerator.device.type == "mps" else torch.float64
        device = self.accelerator.device
        # CPU batches are already where they must be; pinned host batches go to the GPU without blocking
        self._to_device = (lambda batch: batch) if device.type == "cpu" else (
            lambda batch: send_to_device(batch, device, non_blocking=True))
        self.last_eval: dict[str, float] = {}
        self._eval_step = -1
        self._stop_signal: str | None = None
        self._fitting = False
        self._summarised = False
        self._frozen: list[torch.nn.Parameter] = []
        self._lr_tags: list[tuple[str | None, str]] = []
        self._verdict_on_device, self._pending, self._readback = False, None, Readback()
        self._staging_buffers: dict = {}  # async_save: the CPU snapshot's memory, reused from save to save
        self._reservation = None  # async_save: the thread allocating those buffers ahead of the first save
        self.resumed_from = persist.resume(self)

    # ------------------------------------------------------------------------------------ the loop

    def fit(self) -> dict[str, float]:
        """Train for the planned optimizer steps; evaluate, log and save as configured. Returns the last metrics."""
        self._fitting = True
        # The step's verdict is read a step late, without stalling the GPU, where nothing needs it sooner: a
        # fused optimizer that skips a non-finite update on the device, and no callback inside the step.
        self._verdict_on_device = self.step_ops.skips_on_device and not any(
            self.callbacks.has(event) for event in (*IN_STEP_EVENTS, "before_optimizer_step", "after_step"))
        try:
            with self._stop_on_signals():
                return self._fit()
        except BaseException:  # an error, Ctrl-C: a checkpoint being written in the background still completes
            persist.wait_for_save(self, raise_error=False)
            raise
        finally:
            self._fitting, self._verdict_on_device, self._pending = False, False, None
            self.metrics.close()

    def _fit(self) -> dict[str, float]:
        cfg, plan, state = self.config, self.plan, self.state
        self._start_run()
        try:
            self._event("before_fit")
            self.metrics.start(state.step, state.samples_seen)
            while state.step < plan.total_steps:
                epoch, first = divmod(state.step, plan.steps_per_epoch)
                stop = first + plan.total_steps - state.step
                windows = plan.rank_windows(epoch, self.accelerator.process_index, first, stop)
                batches = micro_batch_loader(self.train_data, windows, self.collate_fn, cfg.num_workers,
                                             seed=cfg.seed * 7919 + epoch, pin_memory=self.accelerator.device.type == "cuda")
                self.epoch = epoch
                try:
                    self._event("before_epoch")
                    for window in windows:
                        self._train_step(window, batches)
                        self._after_step()
                except CancelEpoch:  # agreed by all ranks: the rest of this epoch's data is skipped
                    state.step = min((epoch + 1) * plan.steps_per_epoch, plan.total_steps)
                self._flush()
                # Without eval_every, evaluate after each epoch; with it, also at the end of the run.
                if (not cfg.eval_every or state.step == plan.total_steps) and self._eval_step != state.step:
                    self.evaluate()
                self._event("after_epoch")
        except CancelFit:  # agreed by all ranks; the last applied step is saved below
            self._flush()
        self.save()
        persist.wait_for_save(self)  # fit returns with its last checkpoint committed
        self._event("after_fit")
        return dict(self.metrics.last, **self.last_eval)

    def _after_step(self) -> None:
        """Between optimizer steps: stop on a signal, log, evaluate and save as configured."""
        cfg, state = self.config, self.state
        if self._stop_agreed:
            self._flush()
            self.save()
            persist.wait_for_save(self)
            stop = Preempted(f"stopped by {self._stop_signal or 'a signal on another rank'} after optimizer "
                             f"step {state.step}; saved {self.checkpoint_path}; resume=auto continues from it")
            self.print(stop.message)
            raise stop
        if state.step % cfg.log_every == 0:
            self._flush()
        if cfg.eval_every and state.step % cfg.eval_every == 0:
            self.evaluate()
        if cfg.async_save:  # once, in the background, now that the optimizer state exists
            persist.reserve_snapshot_buffers(self)
        if cfg.save_every and state.step % cfg.save_every == 0 and state.step < self.plan.total_steps:
            self.save()

    def _train_step(self, window: Window, batches) -> None:
        """One optimizer step over this rank's micro-batches of `window`."""
        acc, state, ops = self.accelerator, self.state, self.step_ops
        if not self._verdict_on_device:  # there, set once the previous step is counted
            self._set_lr_and_momentum(state.schedule_step)
        self.callbacks("before_step", self)  # its cancel requests travel with this step's all-reduce
        # Each micro-batch backpropagates loss_sum * world / window_samples. DDP averages over ranks, so the
        # synced gradient is sum(grad loss_sum) / window_samples: exact for per-sample means, and rescaled
        # below to the true item count for token-weighted losses (pitfalls #7, #9).
        scale = acc.num_processes / window.global_samples
        loss_sum, num_items, token_weighted = 0.0, 0, False  # num_items stays a host int for per-sample means
        last = len(window.micro_batches) - 1
        for self.micro_index, micro in enumerate(window.micro_batches):
            self.is_last_micro = self.micro_index == last
            batch = self._to_device(next(batches))
            # All-reduce gradients on the window's last micro-batch only; the Engine drives this, not accumulate().
            with ops.no_sync(self.is_last_micro):
                self.micro_loss, items, weighted = self._loss(batch, micro.num_samples)
                self.callbacks("after_loss", self)
                ops.backward(self.micro_loss * scale)
            self.callbacks("after_backward", self)
            loss_sum = loss_sum + self.micro_loss.detach()
            num_items = num_items + items
            token_weighted |= weighted
        # One all-reduce per step, on the device: the step's loss and item count, and what any rank asks for
        # (a stop by SIGTERM/SIGUSR1, a callback's cancel), so that all ranks take the same decisions below.
        loss_sum, num_items, requests = self._reduce_step(loss_sum, num_items)
        self.step_loss = loss_sum / num_items  # the exact mean over all of this step's items
        if token_weighted:
            self._scale_gradients(window.global_samples / num_items)
        for param in self._frozen:
            param.grad = None  # frozen: no update, no weight decay, no momentum drift
        self.grad_norm = ops.clip(self.config.max_grad_norm or float("inf"))
        if self._verdict_on_device:
            return self._step_on_device(window, requests, num_items if token_weighted else None)
        # note: host-device sync, once per step: a non-finite update is never applied, and requests are agreed.
        values = [self.step_loss, self.grad_norm, *(requests if torch.is_tensor(requests) else ())]
        loss_value, norm_value, *agreed = torch.stack([v.to(self.grad_norm.dtype) for v in values]).tolist()
        stop, *cancels = agreed or requests
        self._stop_agreed = stop > 0
        cancel = max((level for level, n in enumerate(cancels, 1) if n > 0), default=0)
        finite = math.isfinite(loss_value) and math.isfinite(norm_value)
        # fp16: an overflow is the GradScaler's business (skip, lower the scale); the NaN policy takes the rest
        overflow = not finite and self._scaler_overflow(norm_value)
        refused = not finite and not overflow and self._refuse_non_finite(loss_value, norm_value)
        cancel = max(cancel, self._event("before_optimizer_step", defer=True))
        applied = finite and not cancel
        ops.step(applied)
        ops.zero_grad()
        if cancel > CANCEL_STEP:  # the step is not consumed: a resume would run it again
            raise CANCELS[cancel - 1]()
        state.step += 1
        state.samples_seen += window.global_samples
        state.skipped_steps += not applied
        state.skipped_in_a_row = state.skipped_in_a_row + 1 if refused else 0
        state.schedule_step += applied
        if self.lr_scheduler is not None and applied:
            self.lr_scheduler.step()
        self._log_step(state.step, self.step_loss, self.grad_norm, self._lr_metrics,
                       num_items if token_weighted else None)
        self._event("after_step")

    def _step_on_device(self, window: Window, requests, items) -> None:
        """The end of a step that does not wait for the GPU (see `fit`: a fused optimizer, no callback in the step).

        The update is skipped on the device when the loss or the gradient norm is not finite. The host reads
        this step's loss, norm and stop flag a step later, when the GPU is long past them (acctrain.readback),
        and only then counts the step, applies the NaN policy and logs it (`_settle`). The previous step is
        counted before this one's lr is set, so the schedule sees every applied step, as when it is read at once.
        """
        state = self.state
        self._settle()  # the previous step; nan_policy=halt raises here, before this step's update
        self._set_lr_and_momentum(state.schedule_step)
        self.step_ops.step_if_finite(self.step_loss, self.grad_norm)
        self.step_ops.zero_grad()
        state.step += 1
        state.samples_seen += window.global_samples
        values = [self.step_loss, self.grad_norm]
        if torch.is_tensor(requests):  # several processes: the stop flag was all-reduced with the loss
            values.append(requests[0])
        else:
            self._stop_agreed = requests[0] > 0
        ticket = self._readback.start(torch.stack([v.to(torch.float64) for v in values]))
        self._pending = (state.step, state.samples_seen, ticket, self.step_loss, self.grad_norm, self._lr_metrics,
                         items)
        self._event("after_step")

    def _settle(self) -> None:
        """Count the step left pending by `_step_on_device`: skipped or applied, the NaN policy, its log row."""
        if self._pending is None:
            return
        (step, samples_seen, ticket, loss, grad_norm, lr_metrics, items), self._pending = self._pending, None
        loss_value, norm_value, *stop = ticket.read()  # note: host-device sync on numbers the GPU computed a step ago
        state = self.state
        finite = math.isfinite(loss_value) and math.isfinite(norm_value)
        refused = not finite and self._refuse_non_finite(loss_value, norm_value, step)
        state.skipped_steps += not finite
        state.skipped_in_a_row = state.skipped_in_a_row + 1 if refused else 0
        state.schedule_step += finite
        if self.lr_scheduler is not None and finite:
            self.lr_scheduler.step()
        self._stop_agreed = self._stop_agreed or bool(stop and stop[0] > 0)
        self._log_step(step, loss, grad_norm, lr_metrics, items, samples_seen)

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
        return step_ops_for(self.accelerator, self.model, self._torch_optimizer, self.optimizer)

    def _loss(self, batch: Any, num_samples: int) -> tuple[torch.Tensor, torch.Tensor | int, bool]:
        """(summed loss, item count, token-weighted?) of one micro-batch; padding counts as zero."""
        out = self.loss_fn(self.model, batch) if self.loss_fn is not None else _model_loss(self.model, batch)
        if isinstance(out, (tuple, list)):
            loss_sum, items = out
            items = items.to(self._item_dtype) if torch.is_tensor(items) else float(items)
            weighted = True
        else:
            loss_sum, items, weighted = out * num_samples, num_samples, False
        if num_samples == 0:  # a padding micro-batch: it only joins the all-reduce
            loss_sum, items = loss_sum * 0, items * 0
        return loss_sum, items, weighted

    def _reduce_step(self, loss_sum: torch.Tensor, num_items: torch.Tensor | int):
        """Sum the step's loss and items over all ranks, with each rank's stop flag and in-step cancel request.

        Returns (loss_sum, num_items, requests): requests are [stops, CancelStep, CancelEpoch, CancelFit]
        counts, a device tensor after an all-reduce, or plain numbers in a single process.
        """
        acc, requested = self.accelerator, self.callbacks.requested
        self.callbacks.requested = 0
        flags = [float(self._stop_signal is not None)] + [float(requested == n) for n in range(1, len(CANCELS) + 1)]
        if acc.num_processes == 1:
            return loss_sum, num_items, flags
        dtype = self._item_dtype
        local = torch.cat([torch.stack([loss_sum.to(dtype), torch.as_tensor(num_items, dtype=dtype, device=acc.device)]),
                           torch.tensor(flags, dtype=dtype, device=acc.device)])
        totals = acc.reduce(local, reduction="sum")
        return totals[0], totals[1], totals[2:]

    def _event(self, name: str, defer: bool = False) -> int:
        """Run an event's callbacks; where it has any, all ranks agree on the cancel any of them requested.

        Returns the agreed level (0 none, else 1 + index in CANCELS). Inside fit, an agreed CancelEpoch or
        CancelFit is raised here unless `defer`.
        """
        self.callbacks(name, self)
        if not self.callbacks.has(name):
            return 0
        level = self.callbacks.requested
        self.callbacks.requested = 0
        if self.accelerator.num_processes > 1:
            # note: host-device sync and a collective, only after events that have callbacks
            flag = torch.tensor(level, device=self.accelerator.device)
            level = int(self.accelerator.reduce(flag, reduction="max").item())
        if level > CANCEL_STEP and not defer and self._fitting:
            raise CANCELS[level - 1]()
        return level

    def _scaler_overflow(self, grad_norm: float) -> bool:
        """Whether a non-finite gradient norm is an fp16 overflow that the GradScaler handles.

        It is while the loss scale is above MIN_LOSS_SCALE: the step is skipped, `update()` lowers the scale,
        and the schedule does not advance. At the floor the gradients are inf/NaN unscaled too: the NaN policy.
        """
        scaler = self.step_ops.scaler
        if scaler is None:
            return False
        scale = scaler.get_scale()  # note: host-device sync, only on a step whose gradients overflowed
        if scale <= MIN_LOSS_SCALE:
            return False
        self.print(f"fp16 overflow at optimizer step {self.state.step + 1} (gradient norm {grad_norm}): update "
                   f"skipped, loss scale {scale:g} -> {scale * scaler.get_backoff_factor():g}")
        return True

    def _refuse_non_finite(self, loss: float, grad_norm: float, step: int | None = None) -> bool:
        """A non-finite loss or gradient norm that no GradScaler handles: raise (nan_policy='halt', or too many
        skips in a row) or print that the update is skipped and return True (nan_policy='skip')."""
        cfg, step = self.config, step or self.state.step + 1
        what = f"non-finite {'loss' if not math.isfinite(loss) else 'gradient norm'} at optimizer step {step} " \
               f"(loss {loss}, grad norm {grad_norm})"
        if self.step_ops.scaler is not None:
            what += f" with the fp16 loss scale at its floor ({MIN_LOSS_SCALE:g})" if not math.isfinite(grad_norm) \
                else " (finite gradients: not an fp16 overflow)"
        latest = checkpoint.latest_checkpoint(cfg.output_dir)
        kept = f"; the last good checkpoint is {latest}" if latest else "; no checkpoint was saved yet"
        if cfg.nan_policy == "halt":
            raise NonFiniteError(f"{what} with nan_policy=halt{kept}")
        if self.state.skipped_in_a_row + 1 >= cfg.max_skipped_steps:
            raise NonFiniteError(f"{what}: {cfg.max_skipped_steps} skipped steps in a row (max_skipped_steps){kept}")
        self.print(f"skipping the update of step {step}: {what} (nan_policy=skip)")
        return True

    @contextlib.contextmanager
    def _stop_on_signals(self):
        """While fitting, SIGTERM and SIGUSR1 ask for a save at the next step boundary (all ranks agree)."""
        self._stop_agreed = False
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def request_stop(signum, frame):
            self._stop_signal = signal.Signals(signum).name

        previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGTERM, signal.SIGUSR1)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _scale_gradients(self, factor: torch.Tensor) -> None:
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        if grads:
            from torch.distributed.tensor.experimental import implicit_replication

            with implicit_replication():  # FSDP's DTensor gradients times a plain (replicated) scalar
                torch._foreach_mul_(grads, factor.to(grads[0].dtype))

    def _set_lr_and_momentum(self, step: int) -> None:
        """Set every param group's lr (its base lr x the schedule) and momentum for this update; note them for logs."""
        groups = self._torch_optimizer.param_groups
        if self.lr_scheduler is None:
            factor, momentum = self.schedule.lr_factor(step), self.schedule.momentum(step)
            for group in groups:
                group["lr"] = group["base_lr"] * factor
                if momentum is not None:
                    set_momentum(group, momentum)
        if len(self._lr_tags) != len(groups):  # tag names, built once: train/lr/{group name} per group
            names = [g.get("name", f"group{i}") for i, g in enumerate(groups)]
            self._lr_tags = [(f"train/lr/{n}", f"train/momentum/{n}") if len(groups) > 1 else (None, "train/momentum")
                             for n in names]
        self._lr_metrics = {"train/lr": groups[0]["lr"]}
        for group, (lr_tag, momentum_tag) in zip(groups, self._lr_tags):
            if lr_tag:
                self._lr_metrics[lr_tag] = group["lr"]
            momentum = get_momentum(group)
            if momentum is not None:
                self._lr_metrics[momentum_tag] = momentum

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean loss over `eval_data` (exact: summed over all ranks' shards, each sample once)."""
        self.last_eval = {}
        if self.eval_data is None:
            return {}
        acc = self.accelerator
        n, rank, world = len(self.eval_data), acc.process_index, acc.num_processes
        shard = list(range(n * rank // world, n * (rank + 1) // world))
        micro = self.config.micro_batch_size
        loader = DataLoader(
            self.eval_data,
            batch_sampler=[shard[i : i + micro] for i in range(0, len(shard), micro)],
            collate_fn=self.collate_fn or torch.utils.data.default_collate,
            generator=torch.Generator(),  # creating the iterator must not draw from the global RNG
        )
        self.model.eval()
        totals = torch.zeros(2, dtype=self._item_dtype, device=acc.device)
        for batch in loader:
            batch = send_to_device(batch, acc.device, non_blocking=True)
            size = len(next(iter(batch.values())) if isinstance(batch, Mapping) else batch[0])
            loss_sum, items, _ = self._loss(batch, size)
            totals += torch.stack([loss_sum.detach().to(totals.dtype), torch.as_tensor(items).to(totals)])
        self.model.train()
        # note: host-device sync, once per evaluation
        loss_sum, items = acc.reduce(totals, reduction="sum").tolist()
        self.last_eval = {"eval/loss": loss_sum / items if items else float("nan")}
        acc.log(self.last_eval, step=self.state.step)
        self._eval_step = self.state.step
        self.schedule.on_evaluate(self.last_eval["eval/loss"])  # identical on all ranks: reduced above
        self.print(f"eval at step {self.state.step} | loss {self.last_eval['eval/loss']:.4f}")
        self._event("after_evaluate")
        return self.last_eval

    def save(self) -> None:
        """Write checkpoint `step-{step}` (all ranks call this); see acctrain.persist."""
        self._settle()  # the counters and the schedule of every step taken
        persist.save(self)

    def _start_run(self) -> None:
        """Create the output directory and trackers, print the run plan (nothing is written before this)."""
        acc, cfg = self.accelerator, self.config
        if cfg.resume == "none" and cfg.overwrite and acc.is_main_process:
            shutil.rmtree(checkpoint.checkpoints_root(cfg.output_dir), ignore_errors=True)
        acc.wait_for_everyone()
        logging_dir = os.path.join(cfg.output_dir, "logs")
        if getattr(self, "_logging_dir", None) != logging_dir:  # the first fit, or a new phase's output_dir
            for tracker in acc.trackers:
                tracker.finish()
            acc.trackers = []
            acc.project_configuration.project_dir, acc.project_configuration.logging_dir = cfg.output_dir, logging_dir
            acc.init_trackers("acctrain", config=_flat_config(cfg.to_dict()))
            acc.log({"config": "```\n" + json.dumps(cfg.to_dict(), indent=2) + "\n```"}, step=self.state.step)
            self._logging_dir = logging_dir
        self.model.train()
        if self.resumed_from is None:
            torch.manual_seed(cfg.seed * 1_000_003 + acc.process_index)  # dropout: per rank, reproducible
        elif self._restored_rng is not None:
            rng_from_files(*self._restored_rng)
        else:  # a rank that did not exist in the resumed run (more processes now): a fresh, distinct seed
            torch.manual_seed(cfg.seed * 1_000_003 + acc.process_index + 7919 * self.state.step)
        if not self._summarised:
            self.print(model_summary(self.unwrapped_model, self.is_frozen))
            self._summarised = True
        plan = self.plan.describe()
        self.print(
            "run plan: "
            + ", ".join(f"{k}={v}" for k, v in plan.items())
            + f", precision={self.config.mixed_precision}, schedule={self._schedule_name()}"
            + f", backend={_backend()}, devices={_local_devices(acc)}, output_dir={self.config.output_dir}",
        )

    # ------------------------------------------------------------------------------------ the toolkit

    def freeze(self, patterns: str | Sequence[str] | None = None) -> list[str]:
        """Freeze parameters by name pattern (module prefix or glob); returns the frozen names.

        Without patterns, everything but the model's last top-level module (its head) is frozen, as
        fastai's `freeze()`. Frozen parameters stay bitwise unchanged: their gradients are dropped before
        clipping and the optimizer step, so they get no update, no weight decay and no momentum drift.
        """
        named = dict(self.unwrapped_model.named_parameters())
        if patterns is None:
            children = [n for n, _ in self.unwrapped_model.named_children()]
            patterns = children[:-1]
        patterns = [patterns] if isinstance(patterns, str) else list(patterns)
        frozen = []
        for pattern in patterns:
            hits = [n for n in named if matches(n, pattern)]
            if not hits:
                raise ValueError(f"freeze: {pattern!r} matches no parameter; names look like {list(named)[:3]}")
            frozen += hits
        frozen = sorted(set(frozen))
        self._frozen = [named[n] for n in frozen]
        return frozen

    def unfreeze(self) -> None:
        """Train every parameter again (those created with requires_grad=False stay as they are)."""
        self._frozen = []

    def is_frozen(self, param: torch.nn.Parameter) -> bool:
        return not param.requires_grad or any(param is p for p in self._frozen)

    def lr_find(self, **kwargs):
        """fastai's LR range test; see `acctrain.lr_finder.lr_find`. The model and optimizer are left unchanged."""
        from acctrain.lr_finder import lr_find

        return lr_find(self, **kwargs)

    def fit_one_cycle(self, epochs: int, lr_max: float | None = None, **kwargs) -> dict[str, float]:
        """Train `epochs` with the one-cycle policy (fastai semantics); see `acctrain.recipes`."""
        from acctrain import recipes

        return recipes.fit_one_cycle(self, epochs, lr_max, **kwargs)

    def fit_flat_cos(self, epochs: int, lr: float | None = None, **kwargs) -> dict[str, float]:
        from acctrain import recipes

        return recipes.fit_flat_cos(self, epochs, lr, **kwargs)

    def fit_sgdr(self, n_cycles: int, cycle_len: int, lr_max: float | None = None, **kwargs) -> dict[str, float]:
        from acctrain import recipes

        return recipes.fit_sgdr(self, n_cycles, cycle_len, lr_max, **kwargs)

    def fine_tune(self, epochs: int, base_lr: float = 2e-3, **kwargs) -> dict[str, float]:
        from acctrain import recipes

        return recipes.fine_tune(self, epochs, base_lr, **kwargs)

    def replan(self, **changes: Any) -> None:
        """Start a new training phase with these config changes (epochs, lr, scheduler, output_dir, ...).

        The model and optimizer carry over; the plan, schedule and step counter start afresh, and a
        checkpoint in the (new) output_dir is resumed as usual, so a multi-phase recipe is resumable.
        """
        old_lr = self.config.lr
        if self.config.resume not in ("auto", "none"):  # a given checkpoint belongs to the first phase only
            changes.setdefault("resume", "auto")
        self.config = dataclasses.replace(self.config, **changes)
        cfg = self.config
        self.plan = dataclasses.replace(self.plan, epochs=cfg.epochs, max_steps=cfg.max_steps, seed=cfg.seed)
        self.schedule = build_schedule(cfg.scheduler, self.plan.total_steps, warmup_steps=cfg.warmup_steps,
                                       warmup_ratio=cfg.warmup_ratio, steps_per_epoch=self.plan.steps_per_epoch,
                                       args=cfg.schedule_args)
        for group in self._torch_optimizer.param_groups:  # the Engine's groups know their multiplier
            group["base_lr"] = cfg.lr * group["lr_mult"] if "lr_mult" in group else group["base_lr"] * cfg.lr / old_lr
        self.metrics = self._metric_log()
        self.state, self.last_eval, self._eval_step = TrainState(), {}, -1
        self.resumed_from = persist.resume(self)

    def _metric_log(self) -> MetricLog:
        flops = getattr(self.unwrapped_model, "flops_per_token", None)
        flops = flops() if callable(flops) else flops
        return MetricLog(self.accelerator, self.plan.total_steps, flops, self.config.mixed_precision)

    def _schedule_name(self) -> str:
        return type(self.lr_scheduler).__name__ if self.lr_scheduler is not None else self.schedule.name

    def print(self, *args, **kwargs) -> None:
        """Print once per job, from the main process (Accelerate's print is once per node)."""
        if self.accelerator.is_main_process:
            print(*args, **kwargs)

    @property
    def unwrapped_model(self) -> torch.nn.Module:
        return self.accelerator.unwrap_model(self.model)

    def close(self) -> None:
        """Wait for a background save, finish trackers and destroy the process group (pitfalls #3)."""
        persist.wait_for_save(self)
        self.accelerator.end_training()


def _model_loss(model: torch.nn.Module, batch: Any) -> torch.Tensor:
    """The model's own loss, as HF Transformers models return it when the batch holds labels."""
    outputs = model(**batch) if isinstance(batch, Mapping) else model(batch)
    loss = outputs.get("loss") if isinstance(outputs, Mapping) else getattr(outputs, "loss", None)
    if loss is None:
        raise ValueError(
            "the model returned no loss: give the batch a 'labels' entry (HF models) or pass loss_fn=..."
        )
    return loss


def _make_accelerator(config: TrainConfig) -> Accelerator:
    """An Accelerator whose process group really spans every launched process (pitfalls #1)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    fsdp = config.fsdp or os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true")
    # `accelerate launch --cpu` sets ACCELERATE_USE_CPU (Accelerate honours it too). Without CUDA, Accelerate
    # runs N independent single-process jobs unless told cpu=True (FSDP needs the group even for one process).
    cpu = config.cpu or parse_flag_from_env("ACCELERATE_USE_CPU")
    cpu = cpu or ((world_size > 1 or fsdp) and not torch.cuda.is_available())
    if config.mixed_precision == "fp16" and (cpu or not torch.cuda.is_available()):
        # On CPU Accelerate would silently train in fp32 (no autocast, no GradScaler; pitfalls #2).
        raise ConfigError("mixed_precision", "fp16 needs a CUDA GPU; use mixed_precision=bf16 on CPU.")
    if not cpu and torch.cuda.is_available():
        check_gpus_per_node(int(os.environ.get("LOCAL_WORLD_SIZE", "1")), torch.cuda.device_count())
    state = AcceleratorState._shared_state
    if state.get("_mixed_precision", config.mixed_precision) != config.mixed_precision:
        # Accelerate caches one precision per process; a second Engine in the same process (a notebook,
        # a test) may choose another. The process group itself (PartialState) is kept.
        AcceleratorState._reset_state()
    # FSDP2; an Accelerate FSDP launch config's settings (FSDP_* variables) are read by the plugin itself.
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2) if fsdp else None
    accelerator = Accelerator(
        cpu=cpu,
        fsdp_plugin=plugin,
        mixed_precision=config.mixed_precision,
        log_with=[name.strip() for name in config.log_with.split(",") if name.strip()],
        project_config=ProjectConfiguration(
            project_dir=config.output_dir, logging_dir=os.path.join(config.output_dir, "logs")
        ),
    )
    if fsdp and accelerator.distributed_type == DistributedType.MULTI_CPU:
        sharded.use_fsdp2_on_cpu(accelerator, plugin)  # Accelerate drops the FSDP plugin on CPU otherwise
    if accelerator.device.type == "cpu":
        # Launchers set OMP_NUM_THREADS=1 (accelerate launch even for one process), leaving cores idle.
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        torch.set_num_threads(config.cpu_threads or max(1, len(os.sched_getaffinity(0)) // local))
    if accelerator.num_processes != world_size:
        raise RuntimeError(
            f"launched {world_size} processes but the process group has {accelerator.num_processes}: "
            "they would train as independent jobs. Check the launcher and the accelerate config."
        )
    return accelerator


def check_gpus_per_node(local_processes: int, gpus: int) -> None:
    """Refuse a launch with more processes on this node than visible GPUs (NCCL would put two ranks on one
    GPU and abort with "Duplicate GPU detected", or Accelerate would pick a device that does not exist)."""
    if local_processes > gpus:
        raise ConfigError("cpu", f"{local_processes} processes on this node but {gpus} visible GPU(s): each process "
                          f"needs a GPU of its own. Launch at most {gpus} process(es) per node (--nproc_per_node / "
                          "--num_processes), make more GPUs visible (CUDA_VISIBLE_DEVICES), or set cpu=true to "
                          "train on the CPU (gloo).")


def _flat_config(values: dict[str, Any]) -> dict[str, Any]:
    """Config values as TensorBoard hparams accept them (scalars and strings)."""
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in values.items()}


def _backend() -> str:
    """The process group's backend (nccl, gloo), or 'none' for one process without a group."""
    return torch.distributed.get_backend() if torch.distributed.is_initialized() else "none"


def _local_devices(accelerator: Accelerator) -> str:
    """The device of each local rank on this node: cuda:{local rank}, as Accelerate assigns GPUs, or cpu."""
    device = accelerator.device
    if device.type != "cuda":
        return device.type
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if local == 1:
        return f"cuda:{device.index if device.index is not None else torch.cuda.current_device()}"
    return ",".join(f"cuda:{rank}" for rank in range(local))
