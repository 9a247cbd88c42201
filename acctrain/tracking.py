"""Per-step metrics: kept on the device while training, written in one batch at each flush.

Every optimizer step is logged (train/loss, train/lr, train/grad_norm, ...), but values stay device
tensors until `flush()`, which reads them all with one host-device sync. Each flush also logs the
throughput since the previous one: train/samples_per_s, train/tokens_per_s (the items a token-weighted
loss counted), train/step_time_s, train/peak_memory_gb and, on a GPU whose peak is in PEAK_FLOPS and a
model that states `flops_per_token`, train/mfu. Where that step time went is logged beside it: train/time/data,
train/time/forward, ... (acctrain.step_time.PARTS), seconds per step that sum to train/step_time_s. Writing goes through Accelerate's trackers (TensorBoard
by default, under `{output_dir}/logs/`), on the main process only. Progress goes to a tqdm bar on a
terminal, and to one plain line per flush otherwise (CI, SLURM logs); only the main process prints. The
loss a progress line shows, and `last["train/loss"]`, is the mean over the steps since the previous flush.
"""

from __future__ import annotations

import math
import resource
import sys
import time
from typing import Any

import google_crc32c
import torch
from accelerate.tracking import TensorBoardTracker
from tensorboard.compat.proto.event_pb2 import Event

from acctrain import private_apis
from acctrain.step_time import StepClock

# Dense bf16/fp16 tensor-core peaks in FLOP/s per GPU, from the vendors' data sheets (no sparsity).
PEAK_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,  # SXM; the PCIe card is 756e12
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 125e12,
    "RTX 4090": 165e12,
}


def peak_flops(device: torch.device) -> float | None:
    """The bf16 peak of this GPU from PEAK_FLOPS, or None (CPU, or a GPU not in the table)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    if "H100" in name and "PCIe" in name:
        return 756e12
    return next((flops for key, flops in PEAK_FLOPS.items() if key in name), None)


def masked_crc32c(data: bytes) -> int:
    """TFRecord's masked CRC-32C of `data` (what an event file stores after each record's length and data),
    computed by google-crc32c's C code."""
    crc = google_crc32c.value(bytes(data))
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def fast_tensorboard_checksums() -> None:
    """Give TensorBoard's event writer a C CRC-32C; the files it writes are the same byte for byte.

    TensorBoard checksums every record twice with a CRC-32C in pure Python: about 30 µs for one step's
    event, in its writer thread, holding the GIL, so on a small model the loop loses that much per logged
    step (BENCHMARKS §12). Replaced for the whole process, once, and only where google-crc32c has its C
    implementation and agrees with TensorBoard's own on a sample.
    """
    current = private_apis.tensorboard_record_crc()  # None: a TensorBoard that writes records otherwise
    if current is None or current is masked_crc32c or google_crc32c.implementation != "c":
        return
    sample = bytes(range(256)) * 3
    if masked_crc32c(sample) == private_apis.tensorboard_reference_crc(sample):
        private_apis.set_tensorboard_record_crc(masked_crc32c)


class MetricLog:
    """A buffer of per-step metrics and a writer of them to the trackers and the console."""

    def __init__(self, accelerator, total_steps: int, flops_per_token: float | None = None, mixed_precision: str = "no"):
        self.accelerator = accelerator
        self.total_steps = total_steps
        self.pending: list[tuple[int, dict[str, Any]]] = []
        self.last: dict[str, float] = {}
        self._clock = (time.perf_counter(), 0, 0)  # (time, samples, first step) at the last flush
        self._started, self._first_step = self._clock[0], 0
        self._items = 0.0
        self._peak = peak_flops(accelerator.device) if flops_per_token and mixed_precision != "no" else None
        self._flops_per_token = flops_per_token
        self._bar = None
        self.clock = StepClock(on_gpu=accelerator.device.type == "cuda")
        """Where each step's time goes (acctrain.step_time): the loop switches it from part to part."""

    def start(self, step: int, samples_seen: int) -> None:
        """Start the clocks (after setup, so that throughput and ETA measure training only)."""
        self._started, self._first_step = time.perf_counter(), step
        self._clock = (self._started, samples_seen, step)
        self.clock.start(self._started)
        if self.accelerator.is_main_process and sys.stdout.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=self.total_steps, initial=step, unit="step", dynamic_ncols=True)

    def add(self, step: int, values: dict[str, Any], items: torch.Tensor | None = None) -> None:
        """Record the metrics of optimizer step `step` (1-based); tensors are not read yet."""
        self.pending.append((step, dict(values, _items=items) if items is not None else values))

    def flush(self, samples_seen: int) -> list[tuple[int, dict[str, float]]]:
        """Read the pending values to the host, write them to the trackers, report progress."""
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
        items = sum(values.pop("_items", 0.0) for _, values in rows)
        step = rows[-1][0]
        throughput = self._throughput(step, samples_seen, items)
        self._write(rows + [(step, throughput)])
        # what the progress line shows: the loss averaged over the steps since the last flush
        loss = sum(values["train/loss"] for _, values in rows) / len(rows)
        self.last = dict(rows[-1][1], step=step, **throughput, **{"train/loss": loss})
        self._report(step, self.last)
        return rows

    def _write(self, rows: list[tuple[int, dict[str, float]]]) -> None:
        """Give the rows to the trackers (main process). TensorBoard gets one event per step (not one per value)
        and no file flush (`Accelerator.log` flushes per row, and a flush waits for the writer thread to drain
        its queue): its thread writes in the background and flushes every 30 s and at the end of fit."""
        if not self.accelerator.is_main_process:
            return
        for tracker in self.accelerator.trackers:
            if isinstance(tracker, TensorBoardTracker):  # one event per step, holding all of its values
                file_writer = tracker.writer.file_writer
                for step, values in rows:
                    event = Event()  # the values added in place: half the cost of building a Summary to copy in
                    add = event.summary.value.add
                    for name, x in values.items():
                        add(tag=name, simple_value=x)
                    file_writer.add_event(event, step)
            else:
                for step, values in rows:
                    tracker.log(values, step=step)

    def print(self, text: str) -> None:
        """Print a line (main process only), above the progress bar when there is one."""
        if self._bar is not None:
            self._bar.write(text)
        elif self.accelerator.is_main_process:
            print(text, flush=True)

    def time_summary(self, step: int) -> str:
        """Where the fit's time went up to now, at optimizer step `step`, in one line (StepClock.summary)."""
        now = time.perf_counter()
        self.clock.take(now, now - self._clock[0])  # what followed the last flush: the last evaluation and save
        self._clock = (now, *self._clock[1:])
        return self.clock.summary(step - self._first_step)

    def close(self) -> None:
        """End of a fit: the TensorBoard file is flushed (between fits its writer thread flushes it every 30 s)."""
        for tracker in self.accelerator.trackers if self.accelerator.is_main_process else ():
            if isinstance(tracker, TensorBoardTracker):
                tracker.writer.flush()
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def _throughput(self, step: int, samples_seen: int, items: float) -> dict[str, float]:
        now = time.perf_counter()
        then, then_samples, then_step = self._clock
        self._clock = (now, samples_seen, step)
        elapsed = max(now - then, 1e-9)
        steps = max(step - then_step, 1)
        out = {
            "train/samples_per_s": (samples_seen - then_samples) / elapsed,
            "train/step_time_s": elapsed / steps,
            **{f"train/time/{part}": seconds / steps for part, seconds in self.clock.take(now, elapsed).items()},
            "train/peak_memory_gb": _peak_memory_gb(self.accelerator.device),
        }
        if items:
            out["train/tokens_per_s"] = items / elapsed
            if self._peak:
                per_device = out["train/tokens_per_s"] / self.accelerator.num_processes
                out["train/mfu"] = per_device * self._flops_per_token / self._peak
        return out

    def _report(self, step: int, values: dict[str, float]) -> None:
        loss, throughput = values["train/loss"], values
        if self._bar is not None:  # the postfix first: update() draws the bar with it
            self._bar.set_postfix(loss=f"{loss:.4f}", lr=f"{values['train/lr']:.2e}",
                                  samples_s=f"{throughput['train/samples_per_s']:.0f}", refresh=False)
            self._bar.update(step - self._bar.n)
            return
        remaining = self.total_steps - step
        seconds_per_step = (time.perf_counter() - self._started) / max(step - self._first_step, 1)
        skipped = f" | skipped {int(values['train/skipped_steps'])}" if values.get("train/skipped_steps") else ""
        tokens = f" | {throughput['train/tokens_per_s']:.0f} tok/s" if "train/tokens_per_s" in throughput else ""
        if self.accelerator.is_main_process:  # once per job; Accelerate's print is once per node
            print(
                f"step {step}/{self.total_steps} | loss {loss:.4f} | lr {values['train/lr']:.3e} | "
                f"grad_norm {values['train/grad_norm']:.3f} | {throughput['train/samples_per_s']:.0f} samples/s"
                f"{tokens} | eta {_duration(seconds_per_step * remaining)}{skipped}",
                flush=True,
            )


def _peak_memory_gb(device: torch.device) -> float:
    """Peak GPU memory allocated by torch, or on CPU the process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"
