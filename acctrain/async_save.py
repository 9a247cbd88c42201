"""async_save: a checkpoint's tensors copied to CPU buffers (the only pause of training), written in the background.

    writer = AsyncWriter()
    writer.reserve(layout)                      # once, ahead of the first save: map the buffers off the training thread
    writer.start(files, stage, rank, world, is_main, commit)   # snapshot now, write and commit in a thread
    writer.wait()                               # the save in flight has committed (re-raises its error)

The buffers are kept from save to save: copying into memory that is already mapped is 3x faster than into
fresh memory, which takes a page fault per 4 KiB. Each rank marks its part done with a file, so the commit
needs no collective. Crash safety is the synchronous save's: nothing is named `step-N` before it is complete.
"""

from __future__ import annotations

import math
import mmap
import threading
import time
from pathlib import Path
from typing import Any, Callable

import torch

from acctrain import checkpoint

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
              commit: Callable[[Path, dict[Path, str]], None]) -> None:
        """Snapshot `files` now (tensors to the buffers, JSON to bytes) and write them in a background thread."""
        self.wait()
        if self.reservation is not None:  # buffers allocated in the background since the first step
            self.reservation.join()
            self.buffers.update(self.reservation.buffers)
            self.reservation = None
        self.thread = _Writer(_snapshot(files, self.buffers), stage, rank, world, is_main, commit)
        self.thread.start()

    def wait(self, raise_error: bool = True) -> BaseException | None:
        """Block until the save in flight has committed; re-raise its error (or return it, with raise_error=False)."""
        thread, self.thread = self.thread, None
        if thread is None:
            return None
        thread.join()
        if thread.error is not None and raise_error:
            raise thread.error
        return thread.error


def _snapshot(files: dict[Path, Any], buffers: dict[tuple[str, str], torch.Tensor]) -> dict[Path, Any]:
    """This moment's content of `files`, for a background writer: tensors copied to CPU buffers, JSON as bytes.

    `buffers` is updated in place, for the next save. CUDA tensors are copied to pageable memory, blocking:
    torch's pinned allocator would round each buffer up to a power of two and keep it pinned for the run.
    """
    used: dict[tuple[str, str], torch.Tensor] = {}
    snapshot = {}
    for path, content in files.items():
        if path.suffix != ".safetensors":  # callbacks' and the loop's state may change after this returns
            snapshot[path] = checkpoint.encode_json(content)
            continue
        snapshot[path] = {}
        for name, tensor in content.items():
            buffer = buffers.get((path.name, name))
            if buffer is None or buffer.shape != tensor.shape or buffer.dtype != tensor.dtype:
                buffer = torch.empty(tensor.shape, dtype=tensor.dtype)
            snapshot[path][name] = used[(path.name, name)] = buffer.copy_(tensor.detach())
    buffers.clear()
    buffers.update(used)
    return snapshot


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


class _Writer(threading.Thread):
    """Writes one rank's part of a checkpoint in the background; the main rank's also commits it.

    A plain thread, not an executor: a save still running at interpreter exit completes (executors refuse
    new work then).
    """

    def __init__(self, files, stage: Path, rank: int, world: int, is_main: bool,
                 commit: Callable[[Path, dict[Path, str]], None]):
        super().__init__(name="acctrain-save", daemon=False)
        self.files, self.stage, self.commit = files, stage, commit
        self.rank, self.world, self.is_main = rank, world, is_main
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            digests = checkpoint.write_files(self.files)
            (self.stage / f".done-rank{self.rank}").touch()
            if self.is_main:
                markers = [self.stage / f".done-rank{r}" for r in range(self.world)]
                deadline = time.monotonic() + 3600
                while not all(m.exists() for m in markers):  # the other ranks' parts, written by their threads
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"{self.stage}: other ranks did not finish their part within an hour")
                    time.sleep(0.02)
                for marker in markers:
                    marker.unlink()
                self.commit(self.stage, digests)
        except BaseException as err:  # surfaced by wait(), in the training thread
            self.error = err
