"""The data plan: which global samples each optimizer step consumes, and how ranks split them.

    plan = DataPlan(dataset_len=1000, global_batch=32, micro_batch=4, world_size=2, seed=0, epochs=3)
    plan.accumulation          # 4 micro-batches per rank per optimizer step
    plan.window(epoch, k)      # the global sample indices of step k of that epoch
    plan.rank_windows(epoch, rank, start_step)  # this rank's micro-batches, step by step

The order of samples is a pure function of (seed, epoch) over the whole dataset (acctrain.permutation:
torch's randperm up to 4.2M samples, a Feistel bijection evaluated per step beyond, so that nothing grows
with the dataset), and optimizer step k takes the next `global_batch` of them, whatever the world size and
accumulation: ranks and micro-batches only partition that step's samples. The last window of an epoch may be short; it is split the same way
and the engine normalises it by its own item count. Position is counted in global samples consumed, so
a run can resume on a different number of processes.
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from accelerate.utils import send_to_device
from torch.utils.data import DataLoader, Dataset, default_collate

from acctrain import seeds
from acctrain import permutation as orders
from acctrain.errors import ConfigError


@dataclass(frozen=True)
class MicroBatch:
    """One forward pass on one rank: dataset indices, and how many of them count (0 = padding)."""

    indices: list[int]
    num_samples: int


@dataclass(frozen=True)
class Window:
    """One optimizer step on one rank: its micro-batches, in order; the last one synchronises gradients."""

    epoch: int
    step_in_epoch: int
    micro_batches: list[MicroBatch]
    global_samples: int


@dataclass(frozen=True)
class DataPlan:
    """Global batch geometry of a run: sizes, accumulation, steps, and the sample order."""

    dataset_len: int
    global_batch: int
    micro_batch: int
    world_size: int
    seed: int
    epochs: int = 1
    max_steps: int = 0
    stream: bool = False
    """The samples come from a stream (an IterableDataset): the order is the stream's, step k takes its
    samples [k x global_batch, (k+1) x global_batch); `dataset_len` is then max_steps x global_batch."""
    seed_scheme: int = seeds.SCHEME
    """How the order's and the loader's seeds derive from `seed` (acctrain.seeds): a resume keeps its checkpoint's."""

    def __post_init__(self) -> None:
        if self.dataset_len < 1:
            raise ConfigError("train_data", "the training dataset is empty; give it at least one sample.")
        if self.global_batch % (self.micro_batch * self.world_size):
            raise ConfigError(
                "global_batch_size",
                f"{self.global_batch} is not divisible by micro_batch_size x world size = "
                f"{self.micro_batch} x {self.world_size}; choose a global batch that is a multiple of "
                f"{self.micro_batch * self.world_size}, or another micro_batch_size.",
            )

    @classmethod
    def for_run(cls, train_data: Any, eval_data: Any, config: Any, world_size: int) -> DataPlan:
        """The plan of a run of `config` (a TrainConfig) on `train_data`, a map-style dataset or a stream."""
        micro = config.micro_batch_size
        if micro == "auto":  # the whole per-rank batch until acctrain.memory.fit_micro_batch finds what fits
            micro = per_rank_batch(config.global_batch_size, world_size)
        return cls(dataset_len=stream_length(train_data, eval_data, config) or len(train_data),
                   global_batch=config.global_batch_size, micro_batch=micro, world_size=world_size,
                   seed=config.seed, epochs=config.epochs, max_steps=config.max_steps, stream=is_stream(train_data))

    @property
    def accumulation(self) -> int:
        """Micro-batches per rank in a full optimizer step."""
        return self.global_batch // (self.micro_batch * self.world_size)

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps in one pass; the last one is short when the dataset is not a multiple."""
        return math.ceil(self.dataset_len / self.global_batch)

    @property
    def total_steps(self) -> int:
        """Optimizer steps in the whole run."""
        return self.max_steps or self.epochs * self.steps_per_epoch

    @property
    def num_epochs(self) -> int:
        """Epochs the run touches (the last one may be partial when `max_steps` is set)."""
        return math.ceil(self.total_steps / self.steps_per_epoch)

    def order(self, epoch: int) -> torch.Tensor:
        """The whole permutation of the dataset for this epoch, a function of (seed, epoch) alone: O(N), for
        inspection; training takes one window at a time (`window`, `rank_windows`)."""
        return torch.tensor(self._permutation(epoch).take(0, self.dataset_len))

    @functools.lru_cache(maxsize=1)
    def _permutation(self, epoch: int):
        return _Identity() if self.stream else orders.permutation(self.dataset_len,
                                                                   seeds.order_seed(self.seed, epoch, self.seed_scheme))

    @property
    def order_kind(self) -> str:
        """How the order is made: 'randperm' (up to 4.2M samples), 'feistel' (acctrain.permutation) or 'stream'.
        From the size alone: asking the cached epoch's permutation would evict it (a save mid-epoch would then
        make the eager order of the whole dataset again)."""
        return "stream" if self.stream else orders.kind(self.dataset_len)

    def window(self, epoch: int, step_in_epoch: int) -> list[int]:
        """Global sample indices of one optimizer step, shared by all ranks."""
        start = step_in_epoch * self.global_batch
        return self._permutation(epoch).take(start, start + self.global_batch)

    @functools.lru_cache(maxsize=8)
    def _bounds(self, samples: int) -> tuple[int, tuple[int, ...]]:
        """(micro-batches per rank, slot boundaries) of a window of `samples`: the same for every full window."""
        per_rank = math.ceil(samples / (self.micro_batch * self.world_size))
        slots = per_rank * self.world_size
        base, extra = divmod(samples, slots)
        bounds = [0]
        for slot in range(slots):
            bounds.append(bounds[-1] + base + (slot < extra))
        return per_rank, tuple(bounds)

    def split(self, window: Sequence[int], rank: int) -> list[MicroBatch]:
        """This rank's micro-batches of a window; every rank gets the same number of them.

        A full window gives `accumulation` micro-batches of `micro_batch` samples. A short one gives
        ceil(len / (micro x world)) per rank, sizes balanced to differ by at most one. A rank left with no
        sample (fewer samples than ranks) runs one padding sample counted as zero, so that it still joins
        the gradient all-reduce.
        """
        per_rank, bounds = self._bounds(len(window))
        micro = []
        for j in range(per_rank):
            slot = j * self.world_size + rank
            indices = list(window[bounds[slot] : bounds[slot + 1]])
            micro.append(MicroBatch(indices, len(indices)) if indices else MicroBatch([window[0]], 0))
        return micro

    def rank_windows(self, epoch: int, rank: int, start_step: int = 0, stop_step: int | None = None) -> Iterator[Window]:
        """This rank's windows for steps [start_step, stop_step) of an epoch, made one at a time.

        Lazily: an epoch's windows held at once are many small long-lived objects that the garbage collector
        walks again and again while training (measured on a 2,200-step tiny run: young collections took
        114 ms with the list, 90 ms lazily, as the raw PyTorch loop's 88 ms).
        """
        stop = self.steps_per_epoch if stop_step is None else min(stop_step, self.steps_per_epoch)
        for k in range(start_step, stop):
            samples = self.window(epoch, k)
            yield Window(epoch, k, self.split(samples, rank), len(samples))

    def describe(self) -> dict[str, Any]:
        """The plan as plain values, for the printed run plan and for logs."""
        return {
            "world_size": self.world_size,
            "global_batch": self.global_batch,
            "micro_batch": self.micro_batch,
            "accumulation": self.accumulation,
            "dataset_len": "stream" if self.stream else self.dataset_len,
            "steps_per_epoch": self.steps_per_epoch,
            "total_steps": self.total_steps,
            "epochs": self.num_epochs,
            "order": self.order_kind,
        }


class _Identity:
    kind = "stream"

    def take(self, start: int, stop: int) -> list[int]:
        return list(range(start, stop))


def per_rank_batch(global_batch: int, world_size: int) -> int:
    """The samples of a full optimizer step on one rank: the largest micro-batch 'auto' may choose."""
    if global_batch % world_size:
        raise ConfigError("global_batch_size", f"{global_batch} is not divisible by the world size {world_size}, so "
                          f"ranks cannot share it equally (micro_batch_size=auto); choose a multiple of {world_size}.")
    return global_batch // world_size


def is_stream(data: Any) -> bool:
    """An IterableDataset, or any iterable without indexing: read in order, never by index."""
    return isinstance(data, torch.utils.data.IterableDataset) or (
        hasattr(data, "__iter__") and not hasattr(data, "__getitem__"))


def stream_batches(reader: StreamReader, windows: Iterable[Window], collate_fn: Callable | None) -> Iterator[Any]:
    """This rank's micro-batches of `windows` from a stream: every rank reads the whole stream in order and keeps
    the samples at its own positions (the window's slots, as for a map-style dataset), skipping the others'."""
    collate = collate_fn or default_collate
    for window in windows:
        for micro in window.micro_batches:  # a stream's windows are full: no padding micro-batch
            reader.skip_to(micro.indices[0])  # other ranks' samples, or those consumed before a resume
            yield collate([reader.next() for _ in micro.indices])


def read_samples(dataset: Any, indices: list[int]) -> Any:
    """The samples at `indices`, as DataLoader reads them: the dataset's own batched read (`__getitems__`) when it
    has one (which may return a batch already), else one by one."""
    many = getattr(dataset, "__getitems__", None)
    return many(indices) if many is not None else [dataset[i] for i in indices]


def to_device(batch: Any, device: torch.device) -> Any:
    """A batch on the run's device: the one move of batches (training, evaluation, predict, the first micro-batch's
    check, micro_batch_size=auto). CPU batches are where they must be; pinned host batches go to a GPU without
    blocking the host (an unpinned one is copied synchronously, as a blocking copy would be)."""
    return batch if device.type == "cpu" else send_to_device(batch, device, non_blocking=True)


def note_samples(err: BaseException, indices: Sequence[int], what: str) -> None:
    """Name, on an error raised while reading or collating samples (in the loader's workers too), the samples'
    indices and, for samples that do not stack, the fix. A note (shown under the error's message): the error
    keeps its type and message. Added where the batch is taken, so that it costs nothing per batch."""
    hint = (" Samples of different sizes need a collate_fn= that pads them (for dicts of token ids: "
            "collate_fn=acctrain.hf_data.PadCollator(pad_token_id))." if isinstance(err, RuntimeError) and "size" in
            str(err) else "")
    err.add_note(f"acctrain: reading (dataset[i]) or collating (collate_fn) the samples at indices {list(indices)} "
                 f"of {what} failed.{hint}")


def describe_sample(sample: Any) -> str:
    """A sample's structure in a few words: tensors by shape and dtype, containers by their items."""
    if torch.is_tensor(sample):
        return f"tensor{tuple(sample.shape)} {str(sample.dtype).removeprefix('torch.')}"
    if isinstance(sample, dict):
        return "{" + ", ".join(f"{k}: {describe_sample(v)}" for k, v in list(sample.items())[:8]) + "}"
    if isinstance(sample, (list, tuple)):
        return f"{type(sample).__name__}(" + ", ".join(describe_sample(v) for v in sample[:8]) + ")"
    return type(sample).__name__


class StreamReader:
    """One rank's reading of a stream: its position (samples consumed), pass after pass.

    The stream is read again from its start when it ends (`set_epoch(k)` first, if it has one, as Hugging
    Face streaming datasets shuffle by it), so the global stream is pass 0, then pass 1, ... A resume starts
    from `resume` (a `state_dict()` of the run that saved, any rank's: all read the same stream): through the
    stream's own `load_state_dict` when it has one (Hugging Face IterableDataset, torchdata), so that only the
    samples after it are read; otherwise by reading past everything consumed before.
    """

    def __init__(self, stream: Iterable, resume: dict | None = None):
        self.stream, self.position, self.passes = stream, 0, 0
        fast = resume and resume.get("state") is not None and hasattr(stream, "load_state_dict")
        if fast:
            self.position, self.passes = resume["position"], resume["pass"]
        self._set_epoch()
        if fast:
            stream.load_state_dict(resume["state"])
        self._samples = iter(stream)

    def _set_epoch(self) -> None:
        if hasattr(self.stream, "set_epoch"):
            self.stream.set_epoch(self.passes)

    def next(self) -> Any:
        for _ in range(2):
            try:
                sample = next(self._samples)
                self.position += 1
                return sample
            except StopIteration:  # the end of a pass: the next one
                self.passes += 1
                self._set_epoch()
                self._samples = iter(self.stream)
        raise ConfigError("train_data", "the stream yielded no sample; give it at least one.")

    def skip_to(self, position: int) -> None:
        while self.position < position:
            self.next()

    def state_dict(self) -> dict:
        """JSON: the position, the pass, and the stream's own state there (None without `state_dict`)."""
        state = self.stream.state_dict() if hasattr(self.stream, "state_dict") else None
        return {"position": self.position, "pass": self.passes, "state": state}


def stream_length(train_data: Any, eval_data: Any, config: Any) -> int:
    """A stream's plan length (max_steps x global batch: it has no length of its own), else 0; what a stream
    cannot do is refused here, naming the field."""
    if eval_data is not None and is_stream(eval_data):
        raise ConfigError("eval_data", "evaluation reads each sample once over all ranks by index; give eval_data as "
                          "a map-style dataset (a list or a Dataset with __len__ and __getitem__), not a stream.")
    if not is_stream(train_data):
        return 0
    if not config.max_steps:
        raise ConfigError("max_steps", "train_data is a stream (an IterableDataset): it has no length, so epochs "
                          "cannot be counted; set max_steps (step k takes the stream's next global_batch_size samples).")
    if config.num_workers:
        raise ConfigError("num_workers", "train_data is a stream, read in order by each rank's main process (each "
                          "rank keeps its own positions); set num_workers=0, or give a map-style dataset.")
    return config.max_steps * config.global_batch_size


class Feed:
    """A rank's windows from `start_step` to the end of the run (or `stop_step`), handed out epoch by epoch, and one loader that
    yields their batches in order across epoch boundaries: with `num_workers`, one set of workers for the
    whole fit, each reading ahead (`prefetch_factor` batches) into the next epoch as into the next step."""

    def __init__(self, plan: DataPlan, rank: int, start_step: int, dataset: Dataset, collate_fn: Callable | None,
                 num_workers: int, pin_memory: bool = False, stream_state: dict | None = None,
                 stop_step: int | None = None):
        stop = plan.total_steps if stop_step is None else stop_step  # the LR finder may run past the plan
        windows, loaded = itertools.tee(_run_windows(plan, rank, start_step, stop))  # made once, shared with the loader
        self._windows_left = windows
        epoch = start_step // plan.steps_per_epoch
        self.reader = StreamReader(dataset, stream_state) if plan.stream else None
        if self.reader is not None:
            self.batches = stream_batches(self.reader, loaded, collate_fn)
        else:
            self.batches = micro_batch_loader(dataset, loaded, collate_fn, num_workers,
                                              seed=seeds.loader_seed(plan.seed, epoch, plan.seed_scheme),
                                              pin_memory=pin_memory)

    def epoch(self, num_steps: int) -> Iterator[Window]:
        """The next `num_steps` windows: the rest of the current epoch."""
        return itertools.islice(self._windows_left, num_steps)


def _run_windows(plan: DataPlan, rank: int, step: int, stop: int) -> Iterator[Window]:
    """A rank's windows for steps [step, stop), across epochs. (A function, not a method of Feed: a generator
    holding the Feed that holds it would be a cycle, and the loader's workers would outlive the fit until the
    garbage collector found it.)"""
    while step < stop:
        epoch, first = divmod(step, plan.steps_per_epoch)
        last = min(plan.steps_per_epoch, first + stop - step)
        yield from plan.rank_windows(epoch, rank, first, last)
        step += last - first


def micro_batch_loader(
    dataset: Dataset,
    windows: Iterable[Window],
    collate_fn: Callable | None,
    num_workers: int,
    seed: int,
    pin_memory: bool = False,
) -> Iterator[Any]:
    """Batches for these windows' micro-batches, in order, loaded by a plain DataLoader.

    The loader gets its own generator, so creating its iterator does not draw from the global torch
    RNG (creating a loader iterator would draw from it): dropout draws stay the same whether or not a loader was created.
    """
    batches = (mb.indices for w in windows for mb in w.micro_batches)  # lazily, as the loader asks
    loader = DataLoader(
        dataset,
        batch_sampler=batches,
        collate_fn=collate_fn or default_collate,
        num_workers=num_workers,
        persistent_workers=False,
        pin_memory=pin_memory,  # page-locked host batches: the copy to the GPU overlaps compute
        generator=torch.Generator().manual_seed(seed),
    )
    return iter(loader)


def eval_loader(dataset: Dataset, rank: int, world_size: int, micro_batch: int, collate_fn: Callable | None) -> DataLoader:
    """This rank's contiguous shard of `dataset` in micro-batches: every sample once over all ranks, none padded."""
    n = len(dataset)
    return DataLoader(
        dataset,
        batch_sampler=ShardBatches(n * rank // world_size, n * (rank + 1) // world_size, micro_batch),
        collate_fn=collate_fn or torch.utils.data.default_collate,
        generator=torch.Generator(),  # creating the iterator must not draw from the global RNG
    )


def most_eval_batches(n: int, world_size: int, micro_batch: int) -> int:
    """The micro-batches of the largest eval shard (ceil(n / world) samples): how many forwards each rank runs."""
    return math.ceil(math.ceil(n / world_size) / micro_batch)


class ShardBatches:
    """The index lists of a contiguous shard [start, stop) in micro-batches, made as they are asked for: no
    list of the whole shard (an eval set of any size), and iterable again (evaluation reads them twice)."""

    def __init__(self, start: int, stop: int, micro_batch: int):
        self.start, self.stop, self.micro_batch = start, stop, micro_batch

    def __iter__(self) -> Iterator[list[int]]:
        for i in range(self.start, self.stop, self.micro_batch):
            yield list(range(i, min(i + self.micro_batch, self.stop)))

    def __len__(self) -> int:
        return math.ceil((self.stop - self.start) / self.micro_batch)
