"""The Engine: an Accelerate training loop with world-size-invariant global batches, and the fastai toolkit.

    from acctrain import Engine, TrainConfig
    engine = Engine(model, TrainConfig(global_batch_size=64, micro_batch_size=8), train_set, eval_set, loss_fn)
    engine.fit()

`loss_fn(model, batch)` returns either a mean over the micro-batch's samples, or `(loss_sum, num_items)`
(e.g. summed token losses and the count of non-ignored tokens). Without `loss_fn`, the model is called
as `model(**batch)` (or `model(batch)`) and its own `outputs.loss` is used as a per-sample mean.

The loop itself (fit, the optimizer step, evaluation, checkpoints) is `acctrain.loop.Loop`; this module adds
what is built on it: freezing, trials and the LR finder, the fastai recipes, and training phases (`replan`).
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from acctrain import evaluation, hf_data, predict
from acctrain.callbacks import Callbacks
from acctrain.data import stream_length
from acctrain.errors import ConfigError
from acctrain.loop import Loop, settled
from acctrain.optim import reference_group, select
from acctrain.schedules import build_schedule, schedule_for
from acctrain.state import RunState, Snapshot, TrainState
from acctrain.tracking import MetricLog


BUILT_ONCE = {
    "global_batch_size": "batch plan", "micro_batch_size": "batch plan", "weight_decay": "optimizer",
    "adam_betas": "optimizer", "param_groups": "optimizer", "mixed_precision": "Accelerator",
    "cpu": "Accelerator", "fsdp": "Accelerator", "fsdp_shard_size": "Accelerator",
    "fsdp_reshard_after_forward": "Accelerator", "fsdp_cpu_offload": "Accelerator", "log_with": "Accelerator's trackers",
    "compile": "model wrapping",
    "activation_checkpointing": "model wrapping", "activation_checkpointing_block": "model wrapping",
    "cpu_threads": "torch thread count", "ema_decay": "EMA callback",
}
"""Config fields the Engine builds a part from once (the part, as an error names it): `replan` refuses to change them."""


class Engine(Loop):
    """Trains `model` on `train_data` with the batch geometry, schedule and precision of `config`; see Loop
    for the arguments."""

    # ------------------------------------------------------------------------------------ inference

    @settled
    def predict(self, dataset: Sequence, out_dir: str | Path | None = None, forward: Callable | None = None,
                micro_batch_size: int | None = None) -> Any:
        """The model's output for every sample of `dataset` once, in dataset order, on every rank: a CPU tensor
        (or a list, when the samples' shapes differ); with `out_dir`, written there per rank and its path
        returned (`acctrain.predict.read_predictions` reads it). No gradients, the model in eval mode, the run's
        precision; `forward(model, batch)` calls the model (default: `model(**batch)` without labels, or the
        inputs of a tuple batch). Outside fit it first resumes as fit would (resume=auto: the checkpoint's
        weights). With an EMA callback, `with ema.applied(engine): engine.predict(...)` uses the average."""
        self.resume()
        dataset, _, collate = hf_data.adapt(self.unwrapped_model, dataset, None, self.collate_fn, self.loss_fn)
        return predict.predict(self.accelerator, self.model, dataset, micro_batch_size or self.plan.micro_batch,
                               collate, forward, out_dir)

    # ------------------------------------------------------------------------------------ trials

    @contextlib.contextmanager
    @settled  # a step left pending by the fit is counted in the real state, and no save is copying the weights
    def trial(self):
        """Try something on the Engine and undo it: on exit the weights (bitwise), the optimizer, the loss
        scaler, the RNGs and the run's state (acctrain.state.RunState: counters, schedule, callbacks, logs,
        config) are as before."""
        saved, snapshot = self.run_state, Snapshot(self.unwrapped_model, self.torch_optimizer, self.step_ops.scaler)
        self.run_state = saved.copy()
        try:
            yield self
        finally:
            snapshot.restore()
            self.run_state = saved

    def train_steps(self, num_steps: int, lr_at: Callable[[int], float]) -> Iterator[float]:
        """Optimizer steps on the plan's batches from its start, yielding each step's loss (all ranks' mean).

        Step i sets the lr of the param groups with multiplier 1 to `lr_at(i)` (others in proportion), skips
        non-finite updates, and runs no callbacks, logs or checkpoints. Use it inside `trial()` (lr_find does).
        """
        groups = self.torch_optimizer.param_groups
        reference = groups[reference_group(groups)]["base_lr"]
        run = self.run_state
        self.run_state = dataclasses.replace(  # each step's loss is read at once anyway: not a step late
            run, schedule=build_schedule(lambda k: lr_at(k) / reference, num_steps), callbacks=Callbacks(()),
            lr_scheduler=None, counters=TrainState(), reads_late=False, metrics=MetricLog(self.accelerator, num_steps),
            config=dataclasses.replace(run.config, nan_policy="skip", max_skipped_steps=10**9))  # never flushed
        feed = self._feed(start=0, stop=num_steps)  # the plan's steps from its start, past its end if need be
        for i, window in enumerate(feed.epoch(num_steps)):
            self.state.schedule_step = i  # step i uses lr_at(i), even after a skipped one
            self._train_step(window, feed.batches)
            yield float(self.step_loss)  # note: host-device sync per step; identical on all ranks

    # ------------------------------------------------------------------------------------ the toolkit

    def freeze(self, patterns: str | Sequence[str] | None = None) -> list[str]:
        """Freeze parameters by name pattern (module prefix or glob); returns the frozen names.

        Without patterns, everything but the model's last top-level module (its head) is frozen, as
        fastai's `freeze()`. Frozen parameters stay bitwise unchanged: their gradients are dropped before
        clipping and the optimizer step, so they get no update, no weight decay and no momentum drift.
        """
        frozen = select(self.unwrapped_model, patterns)
        named = dict(self.unwrapped_model.named_parameters())
        self.frozen_params = [named[n] for n in frozen]
        return frozen

    def unfreeze(self) -> None:
        """Train every parameter again (those created with requires_grad=False stay as they are)."""
        self.frozen_params = []

    def is_frozen(self, param: torch.nn.Parameter) -> bool:
        return not param.requires_grad or any(param is p for p in self.frozen_params)

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
        checkpoint in the (new) output_dir is resumed as usual when it fits, so a multi-phase recipe is resumable.
        Without a new output_dir, a phase after this Engine's k-th fit gets `{output_dir}/phase{k+1}`: the
        earlier phase's checkpoint would otherwise be resumed as this one's.
        """
        wanted = dataclasses.replace(self.config, **changes)  # checked and normalised as any TrainConfig
        fixed = [k for k in BUILT_ONCE if getattr(wanted, k) != getattr(self.config, k)]
        if fixed:
            parts, them = ", ".join(dict.fromkeys(BUILT_ONCE[k] for k in fixed)), "them" if len(fixed) > 1 else "it"
            raise ConfigError(fixed[0], f"replan cannot change {', '.join(fixed)}: the Engine built its {parts} from "
                              f"{them} when it was made. Set {them} when making the Engine, or make a new Engine for "
                              "this phase (resume=PATH starts it from a checkpoint).")
        # a stream's plan length is max_steps x global batch (it has no length): refused without max_steps
        stream_samples = stream_length(self.train_data, self.eval_data, wanted) if self.plan.stream else 0
        self.resume()  # the checkpoint the current config selects, before the phase changes it
        old_lr = self.config.lr
        if "output_dir" not in changes and self._fits:  # the earlier fit's checkpoints must not be this phase's
            changes["output_dir"] = str(Path(self._root_dir) / f"phase{self._fits + 1}")
            self.print(f"a new phase after {self._fits} fit(s) of this Engine: output_dir={changes['output_dir']}")
        if self.config.resume not in ("auto", "none"):  # a given checkpoint belongs to the first phase only
            changes.setdefault("resume", "auto")
        config = dataclasses.replace(self.config, **changes)
        plan = dataclasses.replace(self.plan, epochs=config.epochs, max_steps=config.max_steps, seed=config.seed,
                                   dataset_len=stream_samples or self.plan.dataset_len)
        schedule = schedule_for(config.scheduler, config, plan)
        # a phase's keep_best or schedule_args.metric, before anything of it is written
        evaluation.check_watched(config, self.callbacks, schedule, self.measures, self.eval_data is not None)
        for group in self.torch_optimizer.param_groups:  # the Engine's groups know their multiplier
            group["base_lr"] = config.lr * group["lr_mult"] if "lr_mult" in group else group["base_lr"] * config.lr / old_lr
        self.checkpointer.wait()  # the phase's checkpoints go to its output_dir
        self.run_state = RunState(config, plan, schedule, self.lr_scheduler, self.callbacks,
                                  self._metric_log(config, plan))
