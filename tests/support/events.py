"""Reading back what a run logged to TensorBoard (`{output_dir}/logs/acctrain`)."""

from __future__ import annotations

from pathlib import Path


def events(out_dir):
    """The run's TensorBoard events, loaded (an EventAccumulator)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # slow: only when read

    accumulator = EventAccumulator(str(Path(out_dir) / "logs" / "acctrain"))
    accumulator.Reload()
    return accumulator


def scalars(out_dir, tag: str) -> list[tuple[int, float]]:
    """Every (step, value) logged under `tag`, in the order written (a step logged twice appears twice)."""
    return [(e.step, e.value) for e in events(out_dir).Scalars(tag)]


def logged(out_dir, tag: str) -> dict[int, float]:
    """`scalars` as {step: value} (the last value written for a step)."""
    return dict(scalars(out_dir, tag))


def scalar_tags(out_dir) -> set[str]:
    """The tags of every scalar the run logged."""
    return set(events(out_dir).Tags()["scalars"])
