"""An exponential moving average (EMA) of the weights, kept by a callback, checkpointed, evaluated and exported.

    from acctrain.ema import EMA
    ema = EMA(decay=0.999)                      # or `ema_decay=0.999` in the config (this callback, its defaults)
    engine = Engine(model, cfg, train_set, eval_set, loss_fn, callbacks=[ema])
    engine.fit()                                # each evaluation also gives eval_ema/loss: the EMA weights' loss
    with ema.applied(engine):                   # the EMA weights in the model; the trained ones back, bitwise
        engine.evaluate()
    # acctrain export RUN_DIR OUT --ema          # the EMA weights, for others to load (acctrain.export)

What it averages: the model's trainable parameters (requires_grad), in fp32 whatever their dtype, on their own
device (a DTensor shard under FSDP); its buffers (BatchNorm statistics, ...) are copied at each update, as
they are. Parameters that do not train (requires_grad=False) are not copied: training leaves them as they are.

When: after every optimizer step that was applied (`engine.state.schedule_step` advanced), every `every`-th
one (applied steps counted from the start of the run). A step that was not applied - an fp16 overflow the
GradScaler skipped, a non-finite step skipped by `nan_policy`, a `CancelStep` - does not update the average.

The update after `t` earlier updates (t = 0 at the first) is `ema <- decay_t x ema + (1 - decay_t) x weights`
(computed as `ema.lerp_(weights, 1 - decay_t)`), with, when `warmup` is on (the default),
`decay_t = min(decay, (1 + t) / (10 + t))` - the warm-up of TensorFlow's `ExponentialMovingAverage` with
`num_updates` (timm's default has no warm-up; diffusers' `EMAModel` differs at the first update): 0.1 for the
first update, 0.5 after 8, 0.9 after 80, 0.99 after 890 - so that the average is not
dominated by the initial weights; without warm-up `decay_t = decay`. `decay` is per update: with `every=k` the
average forgets per optimizer step as with a decay of `decay ** (1/k)`. The average starts as the weights at
the start of the first fit (the resumed ones, when a checkpoint without EMA state is resumed: said so).

Checkpoints: the state (settings, update count, the averages and buffer copies as whole tensors) is saved with
every checkpoint - tensors in `callbacks.safetensors` - and restored exactly on resume, on any number of
processes (the average is the same on every rank: it follows the weights, which are). An EMA callback
reads each step's outcome at once, so the Engine waits for the GPU at the end of each step (as with any
`after_step` callback; README, "On GPUs").
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence

import torch

from acctrain import private_apis
from acctrain.callbacks import Callback
from acctrain.errors import ConfigError


class EMA(Callback):
    """Exponential moving average of the trainable weights (see the module): `decay` per update, the warm-up
    `min(decay, (1 + t) / (10 + t))` unless `warmup=False`, an update every `every` applied optimizer steps, and,
    with `evaluate` (the default), each evaluation repeated with the EMA weights as `eval_ema/*` metrics."""

    order = 5  # its eval_ema/* metrics exist before EarlyStopping and SaveBest (order 50) look for them

    def __init__(self, decay: float = 0.999, warmup: bool = True, every: int = 1, evaluate: bool = True):
        if not (isinstance(decay, (int, float)) and 0 < decay < 1):
            raise ValueError(f"EMA decay must be a number in (0, 1), e.g. 0.999; got {decay!r}")
        if not (isinstance(every, int) and not isinstance(every, bool) and every >= 1):
            raise ValueError(f"EMA every must be an int >= 1 (update every this many applied steps), got {every!r}")
        self.decay, self.warmup, self.every, self.evaluate = float(decay), bool(warmup), every, bool(evaluate)
        self.updates = 0
        """EMA updates made so far: `t` of the warm-up."""
        self.weights: dict[str, torch.Tensor] = {}
        """The averages (fp32), by parameter name (the unwrapped model's; a tied parameter under its first name)."""
        self.buffers: dict[str, torch.Tensor] = {}
        """The model's buffers as they were at the last update."""
        self.aliases: dict[str, str] = {}
        """Other names of the same parameter or buffer (tied weights): alias -> the name it is stored under."""
        self._targets: dict[str, torch.Tensor] | None = None  # the model's tensors behind `weights` and `buffers`
        self._loaded: dict[str, Any] | None = None  # state from a checkpoint, placed on the model's devices at first use
        self._seen: int | None = None  # the schedule step after the last step looked at

    # ------------------------------------------------------------------------------------ the rule

    def decay_at(self, t: int) -> float:
        """The decay of the update that follows `t` earlier updates."""
        return min(self.decay, (1 + t) / (10 + t)) if self.warmup else self.decay

    # ------------------------------------------------------------------------------------ events

    def before_fit(self, engine) -> None:
        self._bind(engine)
        self._seen = engine.state.schedule_step

    def after_step(self, engine) -> None:
        applied = engine.state.schedule_step  # before_fit noted it (fit fires it before any step)
        if applied == self._seen:  # not applied: skipped (overflow, nan_policy) or cancelled
            return
        self._seen = applied
        if applied % self.every == 0:
            self._update()

    def adds_metrics(self, names: list[str]) -> list[str]:
        return ["eval_ema/" + name.split("/", 1)[-1] for name in names if name.startswith("eval/")] if self.evaluate else []

    def after_evaluate(self, engine) -> None:
        if not self.evaluate:
            return
        with self.applied(engine):
            metrics = engine.eval_metrics()
        named = {"eval_ema/" + name.split("/", 1)[-1]: value for name, value in metrics.items()}
        engine.last_eval.update(named)
        if not engine.fitting:  # evaluate() outside fit: returned, not logged (nor printed twice)
            return
        engine.accelerator.log(named, step=engine.state.step)
        engine.print(f"eval at step {engine.state.step} with the EMA weights | "
                     + ", ".join(f"{k} {v:.4f}" for k, v in named.items()))

    # ------------------------------------------------------------------------------------ the weights

    @contextlib.contextmanager
    def applied(self, engine) -> Iterator[None]:
        """The EMA weights (cast to each parameter's dtype) and buffers in the model inside the block; the model's
        own tensors are copied aside first and put back on exit, bitwise."""
        self._bind(engine)
        targets = self._targets
        saved = {name: tensor.detach().clone() for name, tensor in targets.items()}
        try:
            with torch.no_grad():
                for name, tensor in targets.items():
                    tensor.copy_(self.weights[name] if name in self.weights else self.buffers[name])
            yield
        finally:
            with torch.no_grad():
                for name, tensor in targets.items():
                    tensor.copy_(saved[name])

    @torch.no_grad()
    def _update(self) -> None:
        weight = 1.0 - self.decay_at(self.updates)
        names = list(self.weights)
        averages = [self.weights[n] for n in names]
        current = [self._targets[n].detach().float() for n in names]  # the fp32 parameter itself: no copy
        if averages and any(_is_dtensor(a) for a in averages):
            for average, value in zip(averages, current):  # FSDP: per shard
                average.lerp_(value, weight)
        elif averages:
            private_apis.foreach_lerp_(averages, current, weight)  # one kernel per group of tensors on a GPU
        for name, buffer in self.buffers.items():
            buffer.copy_(self._targets[name])
        self.updates += 1

    def _bind(self, engine) -> None:
        """Find the model's tensors; start the average from them, or place the loaded state on their devices."""
        if self._targets is not None:
            return
        model = engine.unwrapped_model
        params, buffers, self.aliases = _tensors(model)
        self._targets = {**params, **buffers}
        if self._loaded is not None:
            self._place(self._loaded, params, buffers, engine)
            self._loaded = None
            return
        self.weights = {n: p.detach().float().clone() for n, p in params.items()}
        self.buffers = {n: b.detach().clone() for n, b in buffers.items()}
        if engine.state.step > 0:
            engine.print(f"EMA: no EMA state in the checkpoint; the average starts from the weights of optimizer "
                         f"step {engine.state.step}")

    def _place(self, saved: dict[str, Any], params: dict, buffers: dict, engine) -> None:
        """The checkpoint's averages and buffers on this model's devices (sharded like it under FSDP), exactly."""
        for kind, stored, now in (("averaged parameters", saved["weights"], params),
                                  ("buffers", saved["buffers"], buffers)):
            if stored.keys() != now.keys():
                raise ValueError(f"EMA: the checkpoint's {kind} do not fit the model: missing "
                                 f"{sorted(now.keys() - stored.keys())}, unexpected {sorted(stored.keys() - now.keys())}")
        self.weights = {n: _like(saved["weights"][n].float(), p) for n, p in params.items()}
        self.buffers = {n: _like(saved["buffers"][n].to(b.dtype), b) for n, b in buffers.items()}
        was = (saved["decay"], saved["warmup"], saved["every"])
        if was != (self.decay, self.warmup, self.every):
            engine.print(f"EMA: the checkpoint's average was made with decay={was[0]}, warmup={was[1]}, every={was[2]}; "
                         f"it goes on with this run's decay={self.decay}, warmup={self.warmup}, every={self.every}")

    # ------------------------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """Settings, update count and whole tensors (gathered from the shards under FSDP: every rank calls this)."""
        if self._loaded is not None:  # resumed, not yet placed: the same state goes on
            return dict(self._loaded)
        settings = {"decay": self.decay, "warmup": self.warmup, "every": self.every, "updates": self.updates}
        if self._targets is None:  # saved before any fit: no average yet (a resume starts it then)
            return {**settings, "weights": None, "buffers": None, "aliases": {}}
        return {**settings, "weights": {n: _full(t) for n, t in self.weights.items()},
                "buffers": {n: _full(t) for n, t in self.buffers.items()}, "aliases": dict(self.aliases)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.updates, self.aliases = state["updates"], dict(state.get("aliases", {}))
        self._loaded = state if state["weights"] is not None else None
        self._targets, self._seen, self.weights, self.buffers = None, None, {}, {}


def configured(callbacks: Sequence[Callback], ema_decay: float) -> list[Callback]:
    """The Engine's callbacks with the config's EMA (`ema_decay` > 0) added; refused beside an EMA callback."""
    if not ema_decay:
        return list(callbacks)
    if any(isinstance(cb, EMA) for cb in callbacks):
        raise ConfigError("ema_decay", "an EMA callback is also given to the Engine; keep one of them (set "
                          "ema_decay=0, or remove the callback).")
    return [*callbacks, EMA(ema_decay)]


def _tensors(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, str]]:
    """The trainable parameters and the persistent buffers (those in the state dict) by their first name, and
    every other name of them (tied ones)."""
    persistent = set(model.state_dict())
    first: dict[int, str] = {}
    params, buffers, aliases = {}, {}, {}
    for kind, named in ((params, model.named_parameters(remove_duplicate=False)),
                        (buffers, model.named_buffers(remove_duplicate=False))):
        for name, tensor in named:
            if id(tensor) in first:
                aliases[name] = first[id(tensor)]
                continue
            first[id(tensor)] = name
            if (kind is params and tensor.requires_grad) or (kind is buffers and name in persistent):
                kind[name] = tensor
    aliases = {a: n for a, n in aliases.items() if n in params or n in buffers}
    return params, buffers, aliases


def _is_dtensor(tensor: torch.Tensor) -> bool:
    return hasattr(tensor, "full_tensor")


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor: a DTensor's shards gathered (a collective), anything else as it is."""
    return tensor.full_tensor() if _is_dtensor(tensor) else tensor


def _like(saved: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """A whole saved tensor on `target`'s device, sharded like `target` when that is a DTensor (no communication:
    every rank holds the whole tensor and keeps its own slice)."""
    saved = saved.to(target.to_local().device if _is_dtensor(target) else target.device, copy=True)
    if _is_dtensor(target):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(saved, target.device_mesh, target.placements, src_data_rank=None)
    return saved
