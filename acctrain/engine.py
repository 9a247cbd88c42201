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
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import ProjectConfiguration, send_to_device
from torch.utils.data import DataLoader

from acctrain.callbacks import Callbacks
from acctrain.checkpoint import save_checkpoint
from acctrain.config import TrainConfig
from acctrain.data import DataPlan, Window, micro_batch_loader
from acctrain.errors import ConfigError
from acctrain.optim import build_optimizer, get_momentum, set_momentum
from acctrain.schedules import build_schedule
from acctrain.tracking import MetricLog


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
    """Steps not applied because fp16 gradients overflowed."""


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
        optimizer = build_optimizer(model, optimizer, config.lr, config.weight_decay, config.adam_betas)
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        # The raw torch optimizer: zero_grad on it skips Accelerate's per-call signature inspection.
        self._torch_optimizer = optimizer
        self.metrics = MetricLog(self.accelerator, self.plan.total_steps)
        self._item_dtype = torch.float32 if self.accelerator.device.type == "mps" else torch.float64
        self.last_eval: dict[str, float] = {}
        self._eval_step = -1

    # ------------------------------------------------------------------------------------ the loop

    def fit(self) -> dict[str, float]:
        """Train for the planned optimizer steps; evaluate, log and save as configured. Returns the last metrics."""
        cfg, plan, state = self.config, self.plan, self.state
        self._start_run()
        self.callbacks("before_fit", self)
        self.metrics.start(state.step, state.samples_seen)
        while state.step < plan.total_steps:
            epoch, first = divmod(state.step, plan.steps_per_epoch)
            stop = first + plan.total_steps - state.step
            windows = plan.rank_windows(epoch, self.accelerator.process_index, first, stop)
            batches = micro_batch_loader(
                self.train_data, windows, self.collate_fn, cfg.num_workers, seed=cfg.seed * 7919 + epoch
            )
            self.epoch = epoch
            self.callbacks("before_epoch", self)
            for window in windows:
                self._train_step(window, batches)
                if state.step % cfg.log_every == 0:
                    self.metrics.flush(state.samples_seen)
                if cfg.eval_every and state.step % cfg.eval_every == 0:
                    self.evaluate()
                if cfg.save_every and state.step % cfg.save_every == 0 and state.step < plan.total_steps:
                    self.save()
            self.metrics.flush(state.samples_seen)
            # Without eval_every, evaluate after each epoch; with it, also at the end of the run.
            if (not cfg.eval_every or state.step == plan.total_steps) and self._eval_step != state.step:
                self.evaluate()
            self.callbacks("after_epoch", self)
        self.save()
        self.callbacks("after_fit", self)
        return dict(self.metrics.last, **self.last_eval)

    def _train_step(self, window: Window, batches) -> None:
        """One optimizer step over this rank's micro-batches of `window`."""
        acc, state = self.accelerator, self.state
        self._set_lr_and_momentum(state.schedule_step)
        self.callbacks("before_step", self)
        loss_sum = torch.zeros((), dtype=self._item_dtype, device=acc.device)
        num_items = torch.zeros((), dtype=self._item_dtype, device=acc.device)
        # Each micro-batch backpropagates loss_sum * world / window_samples. DDP averages over ranks, so the
        # synced gradient is sum(grad loss_sum) / window_samples: exact for per-sample means, and rescaled
        # below to the true item count for token-weighted losses (pitfalls #7, #9).
        scale = acc.num_processes / window.global_samples
        token_weighted = False
        last = len(window.micro_batches) - 1
        for self.micro_index, micro in enumerate(window.micro_batches):
            self.is_last_micro = self.micro_index == last
            batch = send_to_device(next(batches), acc.device, non_blocking=True)
            # All-reduce gradients on the window's last micro-batch only; the Engine drives this, not accumulate().
            with contextlib.nullcontext() if self.is_last_micro else acc.no_sync(self.model):
                self.micro_loss, items, weighted = self._loss(batch, micro.num_samples)
                self.callbacks("after_loss", self)
                acc.backward(self.micro_loss * scale)
            self.callbacks("after_backward", self)
            loss_sum += self.micro_loss.detach()
            num_items += items
            token_weighted |= weighted
        # One all-reduce of (loss, items) per step, on the device: no host sync.
        loss_sum, num_items = acc.reduce(torch.stack([loss_sum, num_items]), reduction="sum").unbind()
        self.step_loss = loss_sum / num_items  # the exact mean over all of this step's items
        if token_weighted:
            self._scale_gradients(window.global_samples / num_items)
        self.grad_norm = acc.clip_grad_norm_(self.model.parameters(), self.config.max_grad_norm or float("inf"))
        self.callbacks("before_optimizer_step", self)
        self.optimizer.step()
        # With fp16 the GradScaler skips a step whose gradients overflowed (it syncs to decide; no extra sync here).
        skipped = self.optimizer.step_was_skipped
        self._torch_optimizer.zero_grad(set_to_none=True)
        state.step += 1
        state.samples_seen += window.global_samples
        state.skipped_steps += skipped
        state.schedule_step += not skipped
        if self.lr_scheduler is not None and not skipped:
            self.lr_scheduler.step()
        self.metrics.add(
            state.step,
            {
                "train/loss": self.step_loss,
                "train/grad_norm": self.grad_norm,
                "train/skipped_steps": state.skipped_steps,
                "train/epoch": state.samples_seen / self.plan.dataset_len,
                **self._lr_metrics,
            },
        )
        self.callbacks("after_step", self)

    # ------------------------------------------------------------------------------------ helpers

    def _loss(self, batch: Any, num_samples: int) -> tuple[torch.Tensor, torch.Tensor | int, bool]:
        """(summed loss, item count, token-weighted?) of one micro-batch; padding counts as zero."""
        out = self.loss_fn(self.model, batch) if self.loss_fn is not None else _model_loss(self.model, batch)
        if isinstance(out, (tuple, list)):
            loss_sum, items = out
            items = torch.as_tensor(items, dtype=self._item_dtype, device=self.accelerator.device)
            weighted = True
        else:
            loss_sum, items, weighted = out * num_samples, num_samples, False
        if num_samples == 0:  # a padding micro-batch: it only joins the all-reduce
            loss_sum, items = loss_sum * 0, items * 0
        return loss_sum, items, weighted

    def _scale_gradients(self, factor: torch.Tensor) -> None:
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        if grads:
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
        self._lr_metrics = {"train/lr": groups[0]["lr"]}
        for i, group in enumerate(groups):
            if len(groups) > 1:
                self._lr_metrics[f"train/lr/group{i}"] = group["lr"]
            if get_momentum(group) is not None:
                self._lr_metrics[f"train/momentum/group{i}" if len(groups) > 1 else "train/momentum"] = get_momentum(group)

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
        acc.print(f"eval at step {self.state.step} | loss {self.last_eval['eval/loss']:.4f}", flush=True)
        self.callbacks("after_evaluate", self)
        return self.last_eval

    def save(self) -> None:
        """Write the model weights and loop state as checkpoint `step-{step}` (main process writes)."""
        state = self.accelerator.get_state_dict(self.model)  # gathers sharded weights on every rank
        if self.accelerator.is_main_process:
            meta = {
                "state": asdict(self.state),
                "plan": self.plan.describe(),
                "config": self.config.to_dict(),
                "schedule": self.schedule.state_dict(),
            }
            path = save_checkpoint(self.config.output_dir, self.state.step, state, meta)
            self.checkpoint_path = path
        self.accelerator.wait_for_everyone()

    def _start_run(self) -> None:
        """Create the output directory and trackers, print the run plan (nothing is written before this)."""
        acc = self.accelerator
        acc.init_trackers("tensorboard", config=_flat_config(self.config.to_dict()))
        self.model.train()
        torch.manual_seed(self.config.seed * 1_000_003 + acc.process_index)  # dropout: per rank, reproducible
        plan = self.plan.describe()
        acc.print(
            "run plan: "
            + ", ".join(f"{k}={v}" for k, v in plan.items())
            + f", precision={self.config.mixed_precision}, schedule={self._schedule_name()}"
            + f", device={acc.device.type}, output_dir={self.config.output_dir}",
            flush=True,
        )

    def _schedule_name(self) -> str:
        return type(self.lr_scheduler).__name__ if self.lr_scheduler is not None else self.schedule.name

    @property
    def unwrapped_model(self) -> torch.nn.Module:
        return self.accelerator.unwrap_model(self.model)

    def close(self) -> None:
        """Finish trackers and destroy the process group (gloo may abort at exit otherwise, pitfalls #3)."""
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
    # Without CUDA, Accelerate runs N independent single-process jobs unless told cpu=True.
    cpu = config.cpu or (world_size > 1 and not torch.cuda.is_available())
    if config.mixed_precision == "fp16" and (cpu or not torch.cuda.is_available()):
        # On CPU Accelerate would silently train in fp32 (no autocast, no GradScaler; pitfalls #2).
        raise ConfigError("mixed_precision", "fp16 needs a CUDA GPU; use mixed_precision=bf16 on CPU.")
    state = AcceleratorState._shared_state
    if state.get("_mixed_precision", config.mixed_precision) != config.mixed_precision:
        # Accelerate caches one precision per process; a second Engine in the same process (a notebook,
        # a test) may choose another. The process group itself (PartialState) is kept.
        AcceleratorState._reset_state()
    accelerator = Accelerator(
        cpu=cpu,
        mixed_precision=config.mixed_precision,
        log_with="tensorboard",
        project_config=ProjectConfiguration(
            project_dir=config.output_dir, logging_dir=os.path.join(config.output_dir, "logs")
        ),
    )
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


def _flat_config(values: dict[str, Any]) -> dict[str, Any]:
    """Config values as TensorBoard hparams accept them (scalars and strings)."""
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in values.items()}
