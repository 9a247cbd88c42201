"""Where each step's time goes: a clock the loop switches from one part of the step to the next.

    clock = StepClock(on_gpu)
    clock.switch("data")              # from now on time counts as data; the time since the last switch goes to the
                                      # part that was current (it is returned)
    with clock.part("checkpoint"): ...            # a pause, then back to the part that was current
    seconds = clock.take(now)         # {part: seconds} since the last take (acctrain.tracking, at each flush)

Every moment of a fit is in exactly one part (PARTS), so on the CPU the parts of an interval sum to its wall time.
On a GPU a switch records a CUDA event on the current stream instead of reading the host clock: the time between
two events is the GPU's, and a gap where the GPU waited for the host (a slow loader, a callback, a save) falls
between the events of the part that kept it waiting. Events are read only once both have completed (`query`, no
sync), at a flush, which has just waited for the GPU anyway: an event still in flight is read at the next one.
Then "other" is the interval's wall time less the other parts.

The gradient all-reduce that the backward does not hide (DDP, several processes) is told apart from the backward by
a hook on the parameter whose gradient is ready last (learned on the first step, then one hook): from that moment
to the end of the backward the step waits for the last bucket's all-reduce. Under FSDP the collectives run inside
the passes and count as forward and backward.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Iterator
from typing import Any, Callable

import torch

PARTS = ("data", "forward", "backward", "allreduce", "optimizer", "callbacks", "logging", "evaluation",
         "checkpoint", "other")
"""The parts of a step, in the order the end-of-fit table lists them. allreduce: the gradient all-reduce that is
not hidden behind the backward, and the step's small all-reduce of its loss and item count."""

LABELS = {"allreduce": "all-reduce"}


def clocked(part: str) -> Callable:
    """A method of the loop (which has `metrics.clock`) whose time counts as `part`, then the part it interrupted."""
    def wrap(method: Callable) -> Callable:
        @functools.wraps(method)
        def timed(self, *args, **kwargs):
            with self.metrics.clock.part(part):
                return method(self, *args, **kwargs)
        return timed
    return wrap


class StepClock:
    """The time of each part of the steps, since the last `take` and over the fit (`fit_seconds`)."""

    def __init__(self, on_gpu: bool = False):
        self.on_gpu = on_gpu
        self.current = "other"
        self.seconds = dict.fromkeys(PARTS, 0.0)
        self.fit_seconds = dict.fromkeys(PARTS, 0.0)
        self._since = time.perf_counter()
        self._events: list[tuple[Any, str]] = []  # GPU: (event, the part that starts at it)
        self._last_grad: LastGradient | None = None

    def start(self, now: float) -> None:
        """A fit's start (after setup): nothing before `now` is counted."""
        self.current, self._since = "other", now
        self.seconds, self.fit_seconds = dict.fromkeys(PARTS, 0.0), dict.fromkeys(PARTS, 0.0)
        self._events = [(self._record(), "other")] if self.on_gpu else []

    def switch(self, part: str) -> str:
        """Time counts as `part` from now on; returns the part it counted as until now."""
        previous, self.current = self.current, part
        if self.on_gpu:
            self._events.append((self._record(), part))
        else:
            now = time.perf_counter()
            self.seconds[previous] += now - self._since
            self._since = now
        return previous

    @contextlib.contextmanager
    def part(self, part: str) -> Iterator[None]:
        """Count what runs inside as `part`, then go back to the part that was current."""
        previous = self.switch(part)
        try:
            yield
        finally:
            self.switch(previous)

    def take(self, now: float, elapsed: float) -> dict[str, float]:
        """The seconds of each part since the last take (`elapsed` of wall time ending `now`); "other" is what the
        other parts leave of `elapsed`."""
        if self.on_gpu:
            self._read_events()
        else:
            self.seconds[self.current] += now - self._since
            self._since = now
        taken, self.seconds = self.seconds, dict.fromkeys(PARTS, 0.0)
        taken["other"] = max(0.0, elapsed - sum(v for k, v in taken.items() if k != "other"))
        for name, value in taken.items():
            self.fit_seconds[name] += value
        return taken

    def _record(self):
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def _read_events(self) -> None:
        """Add the time between each pair of completed events to the part that started at the first; the last
        completed event stays, as the start of what follows."""
        done = 0
        while done + 1 < len(self._events) and self._events[done + 1][0].query():  # no sync: done or not
            (start, part), (end, _) = self._events[done], self._events[done + 1]
            self.seconds[part] += start.elapsed_time(end) / 1000.0
            done += 1
        del self._events[:done]

    # ---------------------------------------------------------------- the exposed all-reduce (DDP)

    def watch_last_gradient(self, model: torch.nn.Module) -> None:
        """From the next backward on, the time after the model's last gradient is ready counts as all-reduce."""
        if self._last_grad is None:
            self._last_grad = LastGradient(model, self)

    def last_backward(self) -> contextlib.AbstractContextManager:
        """Around the window's last backward (the one with DDP's all-reduce), when `watch_last_gradient` was called."""
        return self._last_grad.armed() if self._last_grad is not None else contextlib.nullcontext()

    def summary(self, steps: int) -> str:
        """The fit's breakdown in one line, e.g. "where the time went (40 steps, 12.3 ms per step): data 3 %,
        forward 30 %, ..." (the parts of at least 0.5 %), or "" before any step."""
        total = sum(self.fit_seconds.values())
        if total <= 0 or steps <= 0:
            return ""
        parts = ", ".join(f"{LABELS.get(k, k)} {100 * v / total:.0f} %" for k, v in self.fit_seconds.items()
                          if 100 * v / total >= 0.5)
        return f"where the time went ({steps} steps, {1000 * total / steps:.1f} ms per step): {parts}"


class LastGradient:
    """A hook on the parameter whose gradient is ready last in the backward; when it fires, the clock switches to
    all-reduce. The first armed backward hooks every trainable parameter to learn which one that is; later ones
    hook only it (one Python call per step). If it gets no gradient (it was frozen), the next step learns again."""

    def __init__(self, model: torch.nn.Module, clock: StepClock):
        self.model, self.clock = model, clock
        self.param: torch.nn.Parameter | None = None
        self._order: list[torch.nn.Parameter] = []
        self._fired = False

    @contextlib.contextmanager
    def armed(self) -> Iterator[None]:
        learning = self.param is None
        params = [p for p in self.model.parameters() if p.requires_grad] if learning else [self.param]
        self._order, self._fired = [], False
        handles = [p.register_post_accumulate_grad_hook(self._ready) for p in params]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
        if learning and self._order:
            self.param = self._order[-1]
        elif not self._fired:  # it had no gradient this time: learn again
            self.param = None

    def _ready(self, param: torch.nn.Parameter) -> None:
        self._fired = True
        if self.param is None:
            self._order.append(param)
            return
        self.clock.switch("allreduce")
