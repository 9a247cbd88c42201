"""Training state: the run's state (`RunState`, its counters `TrainState`), and optimizer, RNG and tensors to and
from plain files.

    run = RunState.start(config, plan, schedule, lr_scheduler, callbacks, metrics)
    meta = run.state_dict()                 # what trainer_state.json holds of the run
    changes = run.load_state_dict(meta)     # continue from it: the lines saying what differs
    trial = run.copy()                      # a copy to try things on (Engine.trial puts the original back)

    tensors, meta = optimizer_to_files(optimizer.state_dict())
    optimizer.load_state_dict(optimizer_from_files(tensors, meta))
    tensors, meta = rng_to_files();  rng_from_files(tensors, meta)
    plain, tensors = tensors_to_files(state, "0");  state = tensors_from_files(plain, tensors)

No pickle anywhere: tensors go to safetensors under flat names, everything else to JSON.
"""

from __future__ import annotations

import copy
import dataclasses
import random
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from acctrain import agreement
from acctrain.agreement import Requests, Verdict
from acctrain.callbacks import Callbacks
from acctrain.config import TrainConfig
from acctrain.data import DataPlan
from acctrain.schedules import Schedule
from acctrain.tracking import MetricLog


def optimizer_to_files(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Split `optimizer.state_dict()` into tensors named `state.{param}.{key}` and a JSON-able rest."""
    tensors, values = {}, {}
    for param, entries in state_dict["state"].items():
        for key, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"state.{param}.{key}"] = value
            else:
                values[f"{param}.{key}"] = value
    groups = [{k: list(v) if isinstance(v, tuple) else v for k, v in g.items()} for g in state_dict["param_groups"]]
    tuples = sorted({k for g in state_dict["param_groups"] for k, v in g.items() if isinstance(v, tuple)})
    return tensors, {"param_groups": groups, "values": values, "tuples": tuples}


def optimizer_from_files(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    """The inverse of `optimizer_to_files`: a state dict for `optimizer.load_state_dict`."""
    state: dict[int, dict[str, Any]] = {}
    for name, tensor in tensors.items():
        _, param, key = name.split(".", 2)
        state.setdefault(int(param), {})[key] = tensor
    for name, value in meta["values"].items():
        param, key = name.split(".", 1)
        state.setdefault(int(param), {})[key] = value
    groups = [{k: tuple(v) if k in meta["tuples"] else v for k, v in g.items()} for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


def rng_to_files() -> tuple[dict[str, torch.Tensor], dict]:
    """This process's python, numpy, torch CPU and CUDA generator states."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda.{i}"] = s
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["numpy_keys"] = torch.from_numpy(keys.astype(np.int64))
    meta = {
        "python": {"version": version, "state": list(internal), "gauss": gauss},
        "numpy": {"kind": kind, "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)},
    }
    return tensors, meta


def rng_from_files(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Restore what `rng_to_files` saved (CUDA states only where this process has the devices)."""
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted(t for t in tensors if t.startswith("torch_cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])
    py = meta["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    n = meta["numpy"]
    np.random.set_state((n["kind"], tensors["numpy_keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))


def optimizer_record(optimizer: torch.optim.Optimizer) -> dict:
    """What a checkpoint's optimizer state fits: the optimizer's class and each param group's parameter shapes
    (a DTensor's shape is the full one, so the record is the same at any world size)."""
    return {"class": type(optimizer).__name__,
            "param_groups": [[list(p.shape) for p in group["params"]] for group in optimizer.param_groups]}


TENSOR = "__tensor__"
"""The JSON placeholder of a tensor stored in safetensors: {"__tensor__": its name}."""


def tensors_to_files(obj: Any, prefix: str) -> tuple[Any, dict[str, torch.Tensor]]:
    """Split the tensors out of nested dicts and lists (e.g. a callback's state): the JSON-able rest, with
    each tensor replaced by a placeholder, and the tensors, named by their path (`0.ema.embed.weight`)."""
    tensors: dict[str, torch.Tensor] = {}

    def split(value: Any, name: str) -> Any:
        if torch.is_tensor(value):
            unique, i = name, 1
            while unique in tensors:  # keys with dots can make two paths alike: "a.b" and "a" -> "b"
                unique, i = f"{name}#{i}", i + 1
            tensors[unique] = value
            return {TENSOR: unique}
        if isinstance(value, dict):
            return {k: split(v, f"{name}.{k}") for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [split(v, f"{name}.{i}") for i, v in enumerate(value)]
        return value

    return split(obj, prefix), tensors


def tensors_from_files(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The inverse of `tensors_to_files`: placeholders replaced by their tensors (tuples come back as lists)."""
    if isinstance(obj, dict):
        if obj.keys() == {TENSOR}:
            if obj[TENSOR] not in tensors:
                raise ValueError(f"no tensor {obj[TENSOR]!r} among the {len(tensors)} stored")
            return tensors[obj[TENSOR]]
        return {k: tensors_from_files(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [tensors_from_files(v, tensors) for v in obj]
    return obj


def jsonable(obj: Any) -> Any:
    """Plain JSON values of a state dict (e.g. a torch LR scheduler's); non-JSON entries are dropped."""
    if isinstance(obj, dict):
        return {str(k): v for k, v in ((k, jsonable(v)) for k, v in obj.items()) if v is not _DROP}
    if isinstance(obj, (list, tuple)):
        items = [jsonable(v) for v in obj]
        return [v for v in items if v is not _DROP]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if torch.is_tensor(obj) and obj.numel() == 1:
        return obj.item()
    return _DROP


_DROP = object()


@dataclass
class TrainState:
    """Where the run is: counted in optimizer steps and global samples, never in micro-batches."""

    step: int = 0
    """Optimizer steps taken (windows of data consumed), including skipped ones."""
    schedule_step: int = 0
    """Optimizer steps applied; the schedule's position (a skipped fp16 overflow step does not advance it)."""
    samples_seen: int = 0
    """Global training samples consumed."""
    skipped_steps: int = 0
    """Steps not applied: fp16 overflow, or a non-finite loss or gradient norm with nan_policy='skip'."""
    skipped_in_a_row: int = 0
    """Consecutive steps skipped by the NaN policy up to now (it halts at max_skipped_steps)."""

    def consume(self, samples: int) -> None:
        """An optimizer step's window of data was used (applied or not)."""
        self.step += 1
        self.samples_seen += samples

    def count(self, verdict: Verdict) -> None:
        """What the step did: applied (the schedule advances) or skipped, and why."""
        self.skipped_steps += not verdict.apply
        self.skipped_in_a_row = self.skipped_in_a_row + 1 if verdict.refused else 0
        self.schedule_step += verdict.apply


@dataclass
class RunState:
    """Everything that says where a run is, in one place: what a checkpoint saves and a resume restores
    (`state_dict`), what a trial puts back (`copy`), and what a new phase starts afresh (`Engine.replan` makes
    a new one). The model, optimizer, loss scaler and RNGs are the Engine's own (saved beside it, put back by
    `Snapshot`); so are the settings, fixed for the Engine's life."""

    config: TrainConfig
    """The run's config (a phase or a trial replaces it)."""
    plan: DataPlan
    """Which samples each optimizer step sees (acctrain.data)."""
    schedule: Schedule
    """The lr multiplier and momentum per optimizer step (acctrain.schedules), with reduce_on_plateau's state."""
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler | None
    """A torch LR scheduler given as `schedule=`, stepped once per applied optimizer step; else None."""
    callbacks: Callbacks
    """The callbacks, with their state (EarlyStopping's best, the EMA's average, ...)."""
    metrics: MetricLog
    """The training log: the rows not yet written, the last written, throughput."""
    counters: TrainState = field(default_factory=lambda: TrainState())
    """Optimizer steps taken and applied, samples seen, skips (`Engine.state`)."""
    last_eval: dict[str, float] = field(default_factory=dict)
    """The last evaluation's metrics."""
    eval_step: int = -1
    """The optimizer step of the last evaluation in fit (-1: none), so a save records its metrics only then."""
    resumed: bool = False
    """Whether `Engine.resume` has run for this run (it runs once)."""
    resumed_from: Path | None = None
    """The checkpoint this run continued from, or None."""
    restored_rng: Any = None
    """The checkpoint's RNG states, put back when the fit starts."""
    saved_metrics: dict[str, float] = field(default_factory=dict)
    """The metrics the resumed checkpoint holds (what a fit with nothing left to train returns)."""
    stream_position: tuple[int, Any] | None = None
    """(step, reader state) of a stream at the resumed step: its data continues from there."""
    data_identity: dict[str, Any] | None = None
    """The identity of the training and eval data (acctrain.data_identity), set by resume."""
    trajectory: str = field(default_factory=lambda: uuid.uuid4().hex)
    """The run's line of checkpoints (acctrain.checkpoint.find_resumable)."""
    reads_late: bool = False
    """Whether this fit reads each step's numbers a step late (acctrain.step: `OptimizerStep._on_device`)."""
    asked: Requests = agreement.NO_REQUESTS
    """What the ranks asked at the last step (stop, save, cancel), acted on between steps."""

    def copy(self) -> RunState:
        """A copy whose counters can change without changing these (the parts are the same objects)."""
        return dataclasses.replace(self, counters=copy.copy(self.counters))

    def end_step(self, step: int, samples_seen: int, readout: agreement.StepReadout, verdict: Verdict,
                 lr_metrics: dict[str, float]) -> None:
        """The one ending of every optimizer step (acctrain.step): counted, applied or skipped; a torch LR
        scheduler stepped after an applied update; the step's row logged."""
        self.counters.count(verdict)
        if self.lr_scheduler is not None and verdict.apply:
            self.lr_scheduler.step()
        self.metrics.add(step, {"train/loss": readout.loss, "train/grad_norm": readout.grad_norm,
                                "train/skipped_steps": self.counters.skipped_steps,
                                "train/epoch": samples_seen / self.plan.dataset_len, **lr_metrics}, items=readout.items)

    def state_dict(self) -> dict[str, Any]:
        """The run's part of trainer_state.json: counters, plan, config, schedule, callbacks, data, metrics."""
        plan, step = self.plan, self.counters.step
        return {
            "state": dataclasses.asdict(self.counters),
            "epoch": step // plan.steps_per_epoch,
            "plan": {**plan.describe(), "seed": plan.seed, "seed_scheme": plan.seed_scheme},
            "config": self.config.to_dict(),
            "schedule": self.schedule.state_dict(),
            "lr_scheduler": jsonable(self.lr_scheduler.state_dict()) if self.lr_scheduler is not None else None,
            "callbacks": self.callbacks.state_dict(),
            "data": self.data_identity,  # a resume onto other data is refused (acctrain.data_identity)
            "trajectory": self.trajectory,  # which checkpoints continue one another (acctrain.checkpoint)
            "metrics": {**{k: v for k, v in self.metrics.last.items() if k == "train/loss"},
                        **(self.last_eval if self.eval_step == step else {})},
        }

    def load_state_dict(self, meta: dict[str, Any]) -> list[str]:
        """Continue from `state_dict()`'s output (a checkpoint's); returns what to say of what differs."""
        self.counters, self.saved_metrics = TrainState(**meta["state"]), meta.get("metrics", {})
        said = []
        changes = self.schedule.continue_from(meta["schedule"])
        if changes:
            said.append(f"the schedule differs from the checkpoint's ({', '.join(changes)}): from optimizer step "
                        f"{self.counters.schedule_step} the lr follows this run's")
        if self.lr_scheduler is not None and meta["lr_scheduler"]:
            self.lr_scheduler.load_state_dict({**self.lr_scheduler.state_dict(), **meta["lr_scheduler"]})
        said += self.callbacks.load_state_dict(meta["callbacks"])
        self.stream_position = (self.counters.step, meta["stream"]) if meta.get("stream") else None
        return said


class Snapshot:
    """A copy of the weights (bitwise), the optimizer, the loss scaler and the RNGs, to put back with `restore()`."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler: Any = None) -> None:
        self.model, self.optimizer, self.scaler = model, optimizer, scaler
        self.weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.optimizer_state = copy.deepcopy(optimizer.state_dict())
        self.scaler_state = copy.deepcopy(scaler.state_dict()) if scaler is not None else None
        self.rng = rng_to_files()

    def restore(self) -> None:
        with torch.no_grad():
            self.model.load_state_dict(self.weights)
        self.optimizer.load_state_dict(self.optimizer_state)
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler_state is not None:
            self.scaler.load_state_dict(self.scaler_state)
        rng_from_files(*self.rng)
