"""Callbacks: small objects called at named points of the training loop.

Where each event fires:

    before_fit
    for each epoch:
        before_epoch
        for each optimizer step:
            before_step                      # lr and momentum already set for this step
            for each micro-batch:
                (forward) after_loss         # engine.micro_loss holds this micro-batch's summed loss
                (backward) after_backward    # engine.micro_index, engine.is_last_micro
            before_optimizer_step            # gradients synchronised, normalised and clipped;
                                             # engine.grad_norm (pre-clip), engine.step_loss (device tensors)
            (optimizer step) after_step      # engine.state.step counts this step
            (maybe) evaluate -> after_evaluate
        after_epoch
    after_fit

A callback subclasses `Callback` and defines the methods it needs; each receives the engine.
"""

from __future__ import annotations

from typing import Any

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


class Callback:
    """Base class: override any of EVENTS; `state_dict` is saved with checkpoints."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class Callbacks:
    """Calls one event on every callback that defines it, in order."""

    def __init__(self, callbacks=()):
        self.items = list(callbacks)
        for cb in self.items:
            unknown = [n for n in vars(type(cb)) if n.startswith(("before_", "after_")) and n not in EVENTS]
            if unknown:
                raise ValueError(f"{type(cb).__name__} defines {unknown}, which are not events; events are {EVENTS}.")
        self._handlers = {e: [getattr(cb, e) for cb in self.items if hasattr(cb, e)] for e in EVENTS}

    def __call__(self, event: str, engine) -> None:
        for handler in self._handlers[event]:
            handler(engine)
