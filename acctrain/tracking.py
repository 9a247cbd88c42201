"""Per-step metrics: kept on the device while training, written in one batch at each flush.

Every optimizer step is logged (train/loss, train/lr, train/grad_norm, ...), but values stay device
tensors until `flush()`, which reads them all with one host-device sync. Writing goes through
Accelerate's trackers (TensorBoard by default, under `{output_dir}/logs/`), on the main process only.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch


class MetricLog:
    """A buffer of per-step metrics and a writer of them to the trackers and the console."""

    def __init__(self, accelerator, total_steps: int):
        self.accelerator = accelerator
        self.total_steps = total_steps
        self.pending: list[tuple[int, dict[str, Any]]] = []
        self.last: dict[str, float] = {}
        self._clock = (time.perf_counter(), 0)  # (time, samples) at the last flush

    def add(self, step: int, values: dict[str, Any]) -> None:
        """Record the metrics of optimizer step `step` (1-based); tensors are not read yet."""
        self.pending.append((step, values))

    def flush(self, samples_seen: int) -> list[tuple[int, dict[str, float]]]:
        """Read the pending values to the host, write them to the trackers, print one progress line."""
        if not self.pending:
            return []
        tensors = [v.detach().float().reshape(()) for _, vals in self.pending for v in vals.values() if torch.is_tensor(v)]
        # note: host-device sync, once per flush (every `log_every` steps), not per step
        host = iter(torch.stack(tensors).tolist()) if tensors else iter(())
        rows = [
            (step, {k: next(host) if torch.is_tensor(v) else float(v) for k, v in vals.items()})
            for step, vals in self.pending
        ]
        self.pending = []
        now, then_samples = time.perf_counter(), self._clock[1]
        elapsed = now - self._clock[0]
        throughput = (samples_seen - then_samples) / elapsed if elapsed > 0 else 0.0
        self._clock = (now, samples_seen)
        for step, values in rows:
            self.accelerator.log(values, step=step)
        self.last = dict(rows[-1][1], step=rows[-1][0], samples_per_s=throughput)
        self.accelerator.log({"train/samples_per_s": throughput}, step=rows[-1][0])
        self.print_progress(rows)
        return rows

    def print_progress(self, rows: list[tuple[int, dict[str, float]]]) -> None:
        step, values = rows[-1]
        loss = sum(v["train/loss"] for _, v in rows) / len(rows)
        remaining = self.total_steps - step
        speed = self.last["samples_per_s"]
        eta = ""
        if speed > 0 and len(rows) > 0:
            seconds_per_step = (time.perf_counter() - self._started) / max(step - self._first_step, 1)
            eta = f" | eta {_duration(seconds_per_step * remaining)}"
        skipped = f" | skipped {int(values['train/skipped_steps'])}" if values.get("train/skipped_steps") else ""
        self.accelerator.print(
            f"step {step}/{self.total_steps} | loss {loss:.4f} | lr {values['train/lr']:.3e} | "
            f"grad_norm {values['train/grad_norm']:.3f} | {speed:.0f} samples/s{eta}{skipped}",
            flush=True,
        )

    def start(self, step: int, samples_seen: int) -> None:
        """Start the clocks (after setup, so that throughput and ETA measure training only)."""
        self._started = time.perf_counter()
        self._first_step = step
        self._clock = (self._started, samples_seen)


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"
