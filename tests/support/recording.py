"""Callbacks that record what a run did (and intervene on cue), and a loss that overflows at a chosen step."""

from __future__ import annotations

import os
import signal

import torch

from acctrain import Callback
from acctrain.callbacks import CancelStep
from tests.support.tiny import token_loss


class Losses(Callback):
    """The loss of every optimizer step."""

    def __init__(self):
        self.values = []

    def after_step(self, engine):
        self.values.append(float(engine.step_loss))


class Recorder(Callback):
    """Weights after every step, the loss scale, and the interventions a test asks for."""

    def __init__(self, cancel_at=None, stop_at=None):
        self.cancel_at, self.stop_at, self.scales, self.skipped = cancel_at, stop_at, [], []

    def before_step(self, engine):
        if engine.state.step + 1 == self.stop_at:
            os.kill(os.getpid(), signal.SIGUSR1)  # saves after this step, then stops (Preempted)

    def before_optimizer_step(self, engine):
        if engine.state.step + 1 == self.cancel_at:
            raise CancelStep()

    def after_step(self, engine):
        self.scales.append(engine.step_ops.scaler.get_scale() if engine.step_ops.scaler is not None else None)
        self.skipped.append(engine.state.skipped_steps)


def overflow_at(step: int, micro_per_step: int = 2, value: float = float("inf")):
    """A token loss whose first micro-batch of optimizer step `step` (1-based) is multiplied by `value`."""
    calls = {"n": 0}

    def loss_fn(model, batch):
        loss_sum, count = token_loss(model, batch)
        calls["n"] += torch.is_grad_enabled()  # training's calls (not the first micro-batch's check, or evaluation's)
        return (loss_sum * value, count) if calls["n"] == (step - 1) * micro_per_step + 1 else (loss_sum, count)

    return loss_fn
