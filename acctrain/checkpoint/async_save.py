"""async_save: a checkpoint written in the background, its weights copied there too.

    writer = AsyncWriter()
    writer.reserve(layout)                      # once, ahead of the first save: map the buffers off the training thread
    writer.start(files, stage, rank, world, is_main, commit, stable)   # returns at once; copy, write, commit in a thread
    writer.wait_copied()                        # before the weights or optimizer state change: their copy is done
    writer.wait()                               # the save in flight has committed (re-raises its error)

The training pause is what `start` copies itself: JSON, and the tensors that may change before the next
optimizer step (buffers, which a forward updates; callbacks' state). The `stable` tensors (the parameters and
the optimizer's state, which only an optimizer step changes) are copied by the writer thread while the next
step's forward and backward run; the Engine calls `wait_copied` before its next optimizer step, before any
callback runs (a callback may change weights: the EMA swaps its average in for evaluation) and before a
trial. Code outside the Engine that changes one of them in place with a torch operation before the copy is
done makes the save fail, naming the fix, instead of writing a torn checkpoint: each tensor's version counter
is compared after the copy. A write through `.data` moves no version counter and is not caught.

The buffers are kept from save to save: copying into memory that is already mapped is 3x faster than into
fresh memory, which takes a page fault per 4 KiB. Each rank marks its part done (or failed, with the cause)
with a file, so the commit needs no collective, and the main rank stops at once when a part failed. Crash
safety is the synchronous save's: nothing is named `step-N` before it is complete.
"""

from __future__ import annotations

import contextlib
import math
import mmap
import threading
import time
from pathlib import Path
from typing import Any, Callable

import torch

from acctrain import checkpoint, private_apis

Layout = dict[tuple[str, str], tuple[tuple[int, ...], torch.dtype]]
"""(file name, tensor name) -> (shape, dtype): the tensors of one rank's part of a checkpoint."""


class AsyncWriter:
    """One background save at a time, from CPU buffers reused across saves."""

    def __init__(self):
        self.buffers: dict[tuple[str, str], torch.Tensor] = {}
        self.reservation: _Reservation | None = None
        self.thread: _Writer | None = None

    @property
    def reserved(self) -> bool:
        """Whether the buffers exist or are being allocated (reserve acts once)."""
        return bool(self.buffers) or self.reservation is not None

    def reserve(self, layout: Layout) -> None:
        """Allocate the snapshot's CPU buffers in a background thread, ahead of the first save.

        Fresh memory costs a page fault per 4 KiB when first written, which made the first save's pause as
        long as a synchronous save; mapped here, off the training thread, the first save only copies.
        """
        if not self.reserved:
            self.reservation = _Reservation(layout)
            self.reservation.start()

    def start(self, files: dict[Path, Any], stage: Path, rank: int, world: int, is_main: bool,
              commit: Callable[[Path, dict[Path, str]], None], stable: set[int] = frozenset()) -> None:
        """Snapshot `files` (JSON to bytes, tensors to the buffers: those whose data_ptr is in `stable` by the
        background thread, before it writes them, the others now) and write them in a background thread."""
        self.wait()
        if self.reservation is not None:  # buffers allocated in the background since the first step
            self.reservation.join()
            self.buffers.update(self.reservation.buffers)
            self.reservation = None
        snapshot, later = _snapshot(files, self.buffers, stable)
        self.thread = _Writer(snapshot, later, stage, rank, world, is_main, commit)
        self.thread.start()

    def wait_copied(self) -> None:
        """Block until the save in flight holds its own copy of every tensor (its errors come with `wait`)."""
        if self.thread is not None:
            self.thread.copied.wait()

    def wait(self, raise_error: bool = True, patience: float | None = None) -> BaseException | None:
        """Block until the save in flight has committed; re-raise its error (or return it, with raise_error=False).

        `patience`: the training thread failed, and the other ranks may have died with it; the main rank's
        writer waits for their parts that many seconds more at most (without it: an hour).
        """
        thread, self.thread = self.thread, None
        if thread is None:
            return None
        if patience is not None:
            thread.give_up_at = time.monotonic() + patience
        thread.join()
        if thread.error is not None and raise_error:
            raise thread.error
        return thread.error


def _snapshot(files: dict[Path, Any], buffers: dict[tuple[str, str], torch.Tensor],
              stable: set[int]) -> tuple[dict[Path, Any], list[tuple[torch.Tensor, torch.Tensor, int]]]:
    """This moment's content of `files`, for a background writer: JSON as bytes, tensors as CPU buffers, and
    the copies left to the writer: (buffer, tensor, its version now) for each tensor whose data_ptr is `stable`.

    `buffers` is updated in place, for the next save. CUDA tensors are copied to pageable memory, blocking:
    torch's pinned allocator would round each buffer up to a power of two and keep it pinned for the run.
    """
    used: dict[tuple[str, str], torch.Tensor] = {}
    snapshot, later = {}, []
    for path, content in files.items():
        if path.suffix != ".safetensors":  # callbacks' and the loop's state may change after this returns
            snapshot[path] = checkpoint.encode_json(content)
            continue
        snapshot[path] = {}
        for name, tensor in content.items():
            buffer = buffers.get((path.name, name))
            if buffer is None or buffer.shape != tensor.shape or buffer.dtype != tensor.dtype:
                buffer = torch.empty(tensor.shape, dtype=tensor.dtype)
            tensor = tensor.detach()
            if tensor.numel() and tensor.data_ptr() in stable:
                later.append((buffer, tensor, private_apis.tensor_version(tensor)))
            else:
                buffer.copy_(tensor)
            snapshot[path][name] = used[(path.name, name)] = buffer
    buffers.clear()
    buffers.update(used)
    return snapshot, later


def _copy(later: list[tuple[torch.Tensor, torch.Tensor, int]]) -> None:
    """The writer's copies; an in-place change since the snapshot (a version counter moved) fails the save."""
    for buffer, tensor, _ in later:
        buffer.copy_(tensor)
    changed = sum(private_apis.tensor_version(tensor) != version for _, tensor, version in later)
    if changed:
        raise RuntimeError(
            f"{changed} parameter or optimizer-state tensors changed in place while an async save copied them, so "
            "this checkpoint is not written (the previous one is intact); code outside the Engine's step that "
            "changes the weights after Engine.save() must call engine.checkpointer.wait_copied() first")


class _Reservation(threading.Thread):
    def __init__(self, layout: Layout):
        super().__init__(name="acctrain-reserve", daemon=True)
        self.layout, self.buffers = layout, {}

    def run(self) -> None:
        try:
            for key, (shape, dtype) in self.layout.items():
                self.buffers[key] = _mapped(shape, dtype)
        except (OSError, ValueError, RuntimeError, MemoryError):  # out of memory, say: the save allocates
            pass  # what is missing itself, as without a reservation


def _mapped(shape: tuple, dtype: torch.dtype) -> torch.Tensor:
    """An empty CPU tensor whose pages are already mapped."""
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if nbytes < 1 << 20 or not hasattr(mmap, "MAP_POPULATE"):  # Linux only; small ones fault in quickly
        return torch.empty(shape, dtype=dtype)
    # MAP_POPULATE: the kernel maps every page in the call, which releases the GIL
    memory = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | mmap.MAP_POPULATE)
    if hasattr(mmap, "MADV_DONTFORK"):  # forked DataLoader workers would share it copy-on-write
        memory.madvise(mmap.MADV_DONTFORK)
    return torch.frombuffer(memory, dtype=torch.uint8).view(dtype).view(shape)


class PartFailed(Exception):
    """Another rank could not write its part of a background save, or never finished it (the message says which)."""


def _mark_failed(stage: Path, rank: int, cause: str) -> None:
    """Tell the main rank that this rank's part failed: `.failed-rank{rank}` holding the cause, complete when it
    appears (written under another name, then renamed); on a disk too full for the text, empty."""
    marker, text = stage / f".failed-rank{rank}", stage / f".cause-rank{rank}"
    try:
        text.write_text(cause)
        text.replace(marker)
    except OSError:
        with contextlib.suppress(OSError):
            marker.touch()
            text.unlink(missing_ok=True)


class _Writer(threading.Thread):
    """Writes one rank's part of a checkpoint in the background; the main rank's also commits it.

    A plain thread, not an executor: a save still running at interpreter exit completes (executors refuse
    new work then).
    """

    def __init__(self, files, later, stage: Path, rank: int, world: int, is_main: bool,
                 commit: Callable[[Path, dict[Path, str]], None]):
        super().__init__(name="acctrain-save", daemon=False)
        self.files, self.later, self.stage, self.commit = files, later, stage, commit
        self.rank, self.world, self.is_main = rank, world, is_main
        self.error: BaseException | None = None
        self.give_up_at: float | None = None
        """Set by `AsyncWriter.wait(patience=...)`: the monotonic time after which the main rank's writer stops
        waiting for the other ranks' parts (the save is then not committed; the previous checkpoint stands)."""
        self.copied = threading.Event()
        """Set once the files hold their own copy of every tensor (or the copy failed)."""

    def run(self) -> None:
        try:
            try:
                _copy(self.later)
            finally:
                self.copied.set()
                self.later = []  # no reference to the live tensors beyond the copy
            digests = checkpoint.write_files(self.files)
            (self.stage / f".done-rank{self.rank}").touch()
            if self.is_main:
                self._await_other_parts()
                self.commit(self.stage, digests)
        except BaseException as err:  # surfaced by wait(), in the training thread
            self.error = err
            if not self.is_main:  # the main rank's writer is waiting for this part: it stops at once, naming why
                _mark_failed(self.stage, self.rank, f"{type(err).__name__}: {err}"[:500])

    def _await_other_parts(self) -> None:
        """Wait for every rank's `.done` marker (their threads write their parts); raise PartFailed when a rank
        marks its part failed, and when parts are still missing after an hour, or at `give_up_at` once the training
        thread has failed (`wait(patience=...)`: the other ranks may have died with the run)."""
        markers = [self.stage / f".done-rank{r}" for r in range(self.world)]
        deadline = time.monotonic() + 3600
        while not all(m.exists() for m in markers):
            failed = sorted(self.stage.glob(".failed-rank*"))
            if failed:
                rank = int(failed[0].name.removeprefix(".failed-rank"))
                cause = failed[0].read_text() or "its cause could not be recorded, the disk may be full"
                raise PartFailed(f"rank {rank} could not write its part ({cause}); see its output")
            if self.give_up_at is not None:
                deadline = min(deadline, self.give_up_at)
            if time.monotonic() > deadline:
                missing = [r for r, m in enumerate(markers) if not m.exists()]
                raise PartFailed(f"rank(s) {missing} did not finish their part of {self.stage.name} "
                                 f"{'after the run failed' if self.give_up_at is not None else 'within an hour'}; "
                                 "see their output (they may have died or hung)")
            time.sleep(0.02)
        for marker in markers:
            marker.unlink()
