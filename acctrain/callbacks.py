"""Callbacks: small objects called at named points of the training loop.

Where each event fires:

    before_fit
    for each epoch:
        before_epoch
        for each optimizer step:
            before_step                      # lr and momentum already set for this step
            for each micro-batch:
                (forward) after_loss         # engine.micro_loss: this micro-batch's summed loss
                (backward) after_backward    # engine.micro_index, engine.is_last_micro
            (all-reduce of the step's loss, items and requests)
            before_optimizer_step            # gradients synchronised, normalised and clipped;
                                             # engine.grad_norm (pre-clip), engine.step_loss
            (optimizer step) after_step      # engine.state.step counts this step
            (maybe) evaluate -> after_evaluate   # engine.last_eval: {"eval/loss": ...}
        after_epoch
    after_fit

A callback subclasses `Callback` and defines the methods it needs; each receives the engine. Its
`state_dict()` is saved in every checkpoint and given back by `load_state_dict()` on resume.

Cancelling: a callback raises `CancelStep` (the step's update is not applied, as fastai's
CancelStepException), `CancelEpoch` (the step is not applied and the epoch ends) or `CancelFit` (the
step is not applied and training ends; the last applied step is saved). Whichever rank raises it, all
ranks take the same decision: requests from before_step, after_loss and after_backward travel with the
step's own all-reduce (no extra communication); after any other event that has a handler the ranks
agree with one small all-reduce. A cancel raised after a step was applied (after_step,
after_evaluate, after_epoch) ends the epoch or the fit right there; CancelStep there has nothing left
to cancel and is ignored.
"""

from __future__ import annotations

import math
from typing import Any


from acctrain import private_apis, watchdog
from acctrain.metrics import better

EVENTS = (
    "before_fit",
    "before_epoch",
    "before_step",
    "after_loss",
    "after_backward",
    "before_optimizer_step",
    "after_step",
    "after_evaluate",
    "after_epoch",
    "after_fit",
)
# Events whose cancel requests ride on the step's all-reduce instead of an agreement of their own.
IN_STEP_EVENTS = ("before_step", "after_loss", "after_backward")


class Cancel(Exception):
    """What a callback raises to cancel: one of the three kinds below."""


class CancelStep(Cancel):
    """Do not apply this optimizer step (its data is still consumed)."""


class CancelEpoch(Cancel):
    """Do not apply this step, and go on with the next epoch."""


class CancelFit(Cancel):
    """Do not apply this step, and end training (fit() saves and returns)."""


CANCELS = (CancelStep, CancelEpoch, CancelFit)  # weakest to strongest


class Callback:
    """Base class: override any of EVENTS; `state_dict` is saved with checkpoints."""

    order = 0  # callbacks run in increasing order (stable for equal values)

    def adds_metrics(self, names: list[str]) -> list[str]:
        """The eval metrics this callback adds to `engine.last_eval` in after_evaluate, given those before it:
        declared, so that settings and callbacks watching them are checked when the Engine is made."""
        return []

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class Callbacks:
    """Calls one event on every callback that defines it, and remembers the strongest cancel requested."""

    def __init__(self, callbacks=()):
        self.items = sorted(callbacks, key=lambda cb: cb.order)
        for cb in self.items:
            unknown = [n for n in dir(type(cb)) if n.startswith(("before_", "after_")) and n not in EVENTS]
            if unknown:
                raise ValueError(f"{type(cb).__name__} defines {unknown}, which are not events; events are {EVENTS}.")
        self._handlers = {e: [getattr(cb, e) for cb in self.items if hasattr(cb, e)] for e in EVENTS}
        self.requested: type[Cancel] | None = None  # on this rank, until the Engine takes it

    def has(self, event: str) -> bool:
        return bool(self._handlers[event])

    def __call__(self, event: str, engine) -> None:
        for handler in self._handlers[event]:
            watchdog.at(f"callback {getattr(handler, '__qualname__', handler)}")  # named in a hang report
            try:
                handler(engine)
            except CANCELS as cancel:
                self.requested = strongest(self.requested, type(cancel))
                return

    def take(self) -> type[Cancel] | None:
        """The cancel requested since the last take, and forget it."""
        requested, self.requested = self.requested, None
        return requested

    def state_dict(self) -> list[dict]:
        """Each callback's state, in order, under its class name."""
        return [{"class": type(cb).__name__, "state": cb.state_dict()} for cb in self.items]

    def load_state_dict(self, saved: list[dict]) -> list[str]:
        """Give each callback its saved state: the k-th callback of a class gets the k-th state saved under that
        class name, so that adding or removing a callback leaves the others' states in place. Returns a line
        for each callback added or dropped since (a callback without state, e.g. BnFreeze, is not one)."""
        mine = [(type(cb).__name__, cb) for cb in self.items]
        theirs = [(s["class"], s["state"]) for s in saved]
        changes = []
        for name in dict.fromkeys([n for n, _ in mine] + [n for n, _ in theirs]):
            ours, stored = [cb for n, cb in mine if n == name], [st for n, st in theirs if n == name]
            for cb, state in zip(ours, stored):
                cb.load_state_dict(state)
            added = [cb for cb in ours[len(stored):] if cb.state_dict()]
            if added:
                changes.append(f"{len(added)} {name} callback(s) not in the checkpoint start with fresh state")
            if any(stored[len(ours):]):
                changes.append(f"the checkpoint's state of {len(stored) - len(ours)} {name} callback(s) is not "
                               "loaded: this run has none")
        return changes


def metric(engine, name: str, user: str) -> float:
    """An eval metric by name, or an error naming the metrics there are."""
    if name not in engine.last_eval:
        raise ValueError(f"{user}: no evaluation metric {name!r}; there are {sorted(engine.last_eval)}. A callback "
                         "that adds one must declare it (adds_metrics) and have a lower `order` (the default 0 is).")
    return engine.last_eval[name]


def strongest(*cancels: type[Cancel] | None) -> type[Cancel] | None:
    """The strongest of some cancels (CancelFit > CancelEpoch > CancelStep), or None."""
    return max((c for c in cancels if c is not None), key=CANCELS.index, default=None)


# ------------------------------------------------------------------------------------------ built-ins


class EarlyStopping(Callback):
    """End training when `metric` (from evaluation) has not improved by `min_delta` for `patience` evaluations.

    Eval metrics are reduced over all ranks before callbacks see them, so every rank stops at the same step.
    """

    def __init__(self, metric: str = "eval/loss", patience: int = 3, mode: str = "min", min_delta: float = 0.0):
        if mode not in ("min", "max"):
            raise ValueError(f"EarlyStopping mode must be 'min' or 'max', got {mode!r}")
        self.metric, self.patience, self.mode, self.min_delta = metric, patience, mode, min_delta
        self.best: float | None = None
        self.wait = 0

    order = 50  # after callbacks that add metrics in after_evaluate (order 0)

    def after_evaluate(self, engine) -> None:
        value = metric(engine, self.metric, type(self).__name__)
        if better(value, self.best, self.mode, self.min_delta):
            self.best, self.wait = value, 0
            return
        self.wait += 1
        if self.wait >= self.patience:
            engine.print(
                f"early stopping at step {engine.state.step}: {self.metric} has not improved on "
                f"{'no finite value' if self.best is None else f'{self.best:.6g}'} for {self.wait} evaluations",
            )
            raise CancelFit()

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "wait": self.wait}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.wait = state["best"], state["wait"]


class ShortEpoch(Callback):
    """Run only the first `pct` of each epoch's optimizer steps (smoke runs), as fastai's ShortEpochCallback."""

    def __init__(self, pct: float = 0.01):
        if not 0 < pct <= 1:
            raise ValueError(f"ShortEpoch pct must be in (0, 1], got {pct}")
        self.pct = pct

    def before_step(self, engine) -> None:
        plan = engine.plan
        limit = max(1, math.ceil(self.pct * plan.steps_per_epoch))
        if engine.state.step % plan.steps_per_epoch >= limit:  # the same on every rank: a function of the step
            raise CancelEpoch()


class BnFreeze(Callback):
    """Keep the BatchNorm layers of frozen parts in eval mode, so their running statistics stay fixed.

    A BatchNorm layer counts as frozen when all its parameters are frozen (engine.freeze, or
    requires_grad=False). As fastai's BnFreeze; applied at the start of fit and after every evaluation
    (whose end switches the model back to training mode).
    """

    order = 10

    def before_fit(self, engine) -> None:
        self.after_evaluate(engine)

    def after_evaluate(self, engine) -> None:  # evaluate() ends with model.train()
        for module in engine.unwrapped_model.modules():
            if isinstance(module, private_apis.BATCH_NORM) and module.training:
                params = list(module.parameters())
                if params and all(engine.is_frozen(p) for p in params):
                    module.eval()


class SaveBest(Callback):
    """Save a checkpoint at every evaluation whose `metric` is the best so far (with keep_best to keep it).

    Set the config's `keep_best` to the same metric (and `keep_best_mode` to `mode`), so rotation keeps
    the best checkpoint whatever `keep_last` is.
    """

    def __init__(self, metric: str = "eval/loss", mode: str = "min"):
        self.metric, self.mode = metric, mode
        self.best: float | None = None

    order = 50  # after callbacks that add metrics in after_evaluate (order 0)

    def after_evaluate(self, engine) -> None:
        value = metric(engine, self.metric, type(self).__name__)
        if better(value, self.best, self.mode):
            self.best = value
            engine.save()

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best = state["best"]
