"""An Engine on Ray Train's workers: Ray starts the processes and forms their process group, acctrain adopts it.

    pip install "acctrain[ray]"

A script (`python ray_job.py`; on a cluster, with RAY_ADDRESS set or `ray job submit`):

    import torch
    from torch import nn
    from acctrain import Engine, TrainConfig
    from acctrain.integrations import ray as acctrain_ray


    def make_engine(config: TrainConfig) -> Engine:
        # On every worker, after Ray formed the process group: build the model and the data here, not on the driver.
        torch.manual_seed(0)                                   # the same data and initial weights on every rank
        x = torch.randn(512, 20)
        train_set = list(zip(x, (x[:, :10].sum(1) > x[:, 10:].sum(1)).long()))
        model = nn.Sequential(nn.Linear(20, 64), nn.GELU(), nn.Linear(64, 2))
        loss_fn = lambda model, batch: nn.functional.cross_entropy(model(batch[0]), batch[1])  # noqa: E731
        return Engine(model, config, train_set, loss_fn=loss_fn)


    if __name__ == "__main__":
        config = TrainConfig(output_dir="runs/ray", global_batch_size=64, micro_batch_size=16, epochs=2, save_every=4)
        metrics = acctrain_ray.fit(make_engine, config, num_workers=2, max_failures=1)
        print(metrics["train/loss"])

`fit` runs a `ray.train.torch.TorchTrainer` whose workers each call `make_engine(config)` and `engine.fit()`, and
returns rank 0's metrics (what `Engine.fit` returns). To build the TorchTrainer yourself, give it
`train_loop_per_worker(make_engine, config)` and `torch_config=torch_config(config)`.

What each side owns:

- **The process group is Ray's.** Ray's workers get RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, NODE_RANK,
  MASTER_ADDR and MASTER_PORT (ray/train/torch/config.py), and the group exists before the function runs:
  acctrain forms none (`acctrain.group.form` is a no-op then) and Accelerate adopts it. Each worker checks that
  Ray's view (`ray.train.get_context()`), the group's and the Accelerator's agree on world size and ranks, and
  refuses to train otherwise (`RayGroupMismatch`), e.g. under a Ray trainer that forms no torch group.
- **Checkpoints are acctrain's**, in `config.output_dir`, which every worker must reach (a filesystem all nodes
  share); a relative output_dir is made absolute on the driver. Ray's own run files (its RunConfig storage_path,
  which Ray also needs shared between nodes) go to `{output_dir}/ray` unless you pass `storage_path`. No weights
  go through Ray's checkpoint objects: rank 0 reports one Ray checkpoint at the end, holding only the metrics
  (Ray Train keeps a run's metrics only with a checkpoint).
- **Restarts are Ray's.** With `max_failures=N`, Ray starts a new worker group after a worker dies or raises, and
  the Engine resumes from the newest complete checkpoint in output_dir (resume='auto', which a restartable run
  needs). Steps after that checkpoint are trained again, to the same weights (`save_every` bounds the loss).
- **Hangs.** acctrain's watchdog runs as under torchrun (files under `{output_dir}/.ranks`): a rank that waits
  `hang_timeout` in a collective for a rank that does not arrive names it (`{output_dir}/hang-report.txt`, with
  each rank's stack) and the processes exit (124); a rank that raises ends the others (125). Ray counts either as
  a failed worker group and restarts it while max_failures allows. `fit` gives the group acctrain's timeout
  (hang_timeout + 60 s), which also bounds Ray's forming of the group (torch's rendezvous), without acctrain's
  naming of the ranks that never joined; a TorchTrainer you build yourself keeps Ray's TorchConfig.timeout_s
  (1800 s) unless you pass `torch_config(config)`.
- **Stop signals.** Ray runs the function in a thread of the worker process, where acctrain installs no signal
  handlers: a SIGTERM or SIGUSR1 does not make it save and stop (exit 75) as under torchrun; what ends a worker
  is Ray's business, and a restart resumes from the newest periodic checkpoint (`save_every`,
  `save_every_minutes`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from acctrain.config import TrainConfig
from acctrain.errors import CheckpointError, ConfigError, DataError, NonFiniteError
from acctrain.group import GROUP_TIMEOUT_MARGIN

if TYPE_CHECKING:
    from accelerate import Accelerator

    from acctrain.engine import Engine

INSTALL = 'pip install "acctrain[ray]"'
ACCTRAIN_ERRORS = (ConfigError, CheckpointError, DataError, NonFiniteError)
"""Errors a worker raises that `fit` raises again on the driver as they are, rather than inside Ray's own."""


class RayGroupMismatch(RuntimeError):
    """Ray's view of the workers (world size, ranks) and the process group's or the Accelerator's disagree: the
    processes would not train as one job."""


def require_ray():
    """The `ray` module, or an ImportError that names the extra to install."""
    try:
        import ray
        import ray.train.torch  # noqa: F401  (ray without its train extra lacks what this needs)
    except ImportError as err:
        raise ImportError(f"acctrain.integrations.ray needs Ray Train: {INSTALL} (or pip install \"ray[train]\"); "
                          f"importing it failed: {err}") from err
    return ray


def fit(make_engine: Callable[[TrainConfig], Engine], config: TrainConfig, num_workers: int, *, use_gpu: bool = False,
        resources_per_worker: dict[str, float] | None = None, max_failures: int = 0,
        storage_path: str | None = None) -> dict[str, float]:
    """Train `make_engine(config)` on `num_workers` Ray Train workers (one process each, one GPU each with
    `use_gpu`); Ray restarts the worker group up to `max_failures` times (-1: without end), resuming from the
    newest checkpoint. Returns rank 0's metrics; a worker's acctrain error (ConfigError, CheckpointError, ...)
    is raised again here as it is. Connects to Ray as `ray.init()` does (RAY_ADDRESS, else a local cluster)."""
    require_ray()
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    if not isinstance(num_workers, int) or num_workers < 1:  # Ray's (min, max) elastic form is not offered here
        raise ValueError(f"num_workers must be a whole number of workers >= 1, got {num_workers!r}.")
    check_restartable(config, max_failures)
    if use_gpu and config.cpu:
        raise ConfigError("cpu", "cpu=true trains on the CPU, but use_gpu=True reserves a GPU per worker and makes Ray "
                          "form an NCCL group, which cannot carry CPU tensors. Set use_gpu=False, or cpu=false.")
    config = on_shared_storage(config)
    trainer = TorchTrainer(
        train_loop_per_worker(make_engine, config),
        torch_config=torch_config(config),
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                                     resources_per_worker=resources_per_worker),
        run_config=RunConfig(storage_path=storage_path or os.path.join(config.output_dir, "ray"),
                             failure_config=FailureConfig(max_failures=max_failures)),
    )
    try:
        result = trainer.fit()
    except Exception as err:
        own = workers_acctrain_error(err)
        if own is None:
            raise
        raise own from err
    return dict(result.metrics or {})


def train_loop_per_worker(make_engine: Callable[[TrainConfig], Engine], config: TrainConfig) -> Callable[[], None]:
    """The function for a `ray.train.torch.TorchTrainer` of your own: on each worker it checks the process group
    Ray formed, makes the Engine, checks that the Engine adopted that group, fits it and reports its metrics."""
    config = on_shared_storage(config)

    def train_acctrain_engine() -> None:
        import ray.train

        context = ray.train.get_context()
        check_process_group(ray_view(context))  # before the Engine exists: nothing is written yet
        engine = make_engine(config)
        try:
            check_adopted(engine.accelerator, ray_view(context))
            metrics = engine.fit()
        finally:
            engine.close()
        report(metrics, context.get_world_rank())

    return train_acctrain_engine


def report(metrics: dict[str, float], rank: int) -> None:
    """Report the fit's metrics to Ray, from every rank (Ray waits for all). Ray Train keeps a run's metrics only
    with a checkpoint of its own, so rank 0 attaches one that holds nothing but them (`metrics.json`): the driver's
    `Result.metrics`. The weights stay in acctrain's checkpoints."""
    import ray.train

    with tempfile.TemporaryDirectory() as folder:
        checkpoint = None
        if rank == 0:
            Path(folder, "metrics.json").write_text(json.dumps(metrics))
            checkpoint = ray.train.Checkpoint.from_directory(folder)
        ray.train.report(dict(metrics), checkpoint=checkpoint)


def torch_config(config: TrainConfig):
    """Ray's TorchConfig with acctrain's group timeout: hang_timeout + 60 s (the watchdog names a rank that does
    not arrive at hang_timeout; the group's timeout bounds a collective that every rank reached)."""
    require_ray()
    from ray.train.torch import TorchConfig

    return TorchConfig(timeout_s=math.ceil(config.hang_timeout + GROUP_TIMEOUT_MARGIN))


def check_restartable(config: TrainConfig, max_failures: int) -> None:
    """Refuse restarts that would not continue the run: a restarted worker group must resume the newest checkpoint."""
    if max_failures != 0 and config.resume != "auto":
        raise ConfigError("resume", f"max_failures={max_failures} lets Ray restart the workers, and a restart must "
                          f"continue from the newest checkpoint in output_dir, but resume={config.resume!r} would "
                          f"{'start over' if config.resume == 'none' else 'go back to that checkpoint'}. Set "
                          "resume='auto' (a fresh output_dir starts from scratch), or max_failures=0.")


def on_shared_storage(config: TrainConfig) -> TrainConfig:
    """The config with an absolute output_dir: a worker's working directory is Ray's choice, not the driver's."""
    absolute = os.path.abspath(config.output_dir)
    return config if absolute == config.output_dir else dataclasses.replace(config, output_dir=absolute)


def ray_view(context: Any) -> dict[str, int]:
    """Where Ray placed this worker (a `ray.train.get_context()`)."""
    return {"world size": context.get_world_size(), "rank": context.get_world_rank(),
            "local rank": context.get_local_rank()}


def check_process_group(ray: dict[str, int]) -> None:
    """Refuse unless a torch process group exists with Ray's world size and this worker's rank, and the torch
    launch variables (RANK, WORLD_SIZE, LOCAL_RANK: read by Accelerate and acctrain) say the same."""
    import torch.distributed as dist

    if not dist.is_initialized():
        if ray["world size"] == 1:
            return  # one worker trains as one process, with or without a group
        raise RayGroupMismatch(
            f"Ray runs {ray['world size']} workers, but no torch process group exists on worker {ray['rank']}: each "
            "would train alone, as an independent job, into the same output_dir. Run the function under "
            "ray.train.torch.TorchTrainer (or acctrain.integrations.ray.fit), which forms the group.")
    group = {"world size": dist.get_world_size(), "rank": dist.get_rank()}
    env = {"world size": int(os.environ.get("WORLD_SIZE", "-1")), "rank": int(os.environ.get("RANK", "-1")),
           "local rank": int(os.environ.get("LOCAL_RANK", "-1"))}
    refuse_difference(ray, group, "the torch process group")
    refuse_difference(ray, env, "$WORLD_SIZE/$RANK/$LOCAL_RANK")


def check_adopted(accelerator: Accelerator, ray: dict[str, int]) -> None:
    """Refuse unless the Engine's Accelerator adopted Ray's group: its processes and ranks are Ray's, and the group's
    backend carries the device's tensors (gloo for the CPU)."""
    import torch.distributed as dist

    adopted = {"world size": accelerator.num_processes, "rank": accelerator.process_index,
               "local rank": accelerator.local_process_index}
    refuse_difference(ray, adopted, "the Engine's Accelerator")
    if dist.is_initialized() and accelerator.device.type == "cpu" and "gloo" not in str(dist.get_backend()):
        raise RayGroupMismatch(f"the Engine trains on the CPU, but Ray formed a {dist.get_backend()} process group, "
                               "which cannot carry CPU tensors: run Ray's workers with use_gpu=False (a gloo group), "
                               "or train on the GPUs (cpu=false).")


def refuse_difference(ray: dict[str, int], other: dict[str, int], whose: str) -> None:
    differ = [key for key in other if other[key] != ray[key]]
    if differ:
        said = ", ".join(f"{key} {other[key]} where Ray has {ray[key]}" for key in differ)
        raise RayGroupMismatch(f"{whose} disagrees with Ray Train on worker {ray['rank']}: {said}. The processes would "
                               "not train as one job; run the function under ray.train.torch.TorchTrainer and do not "
                               "set RANK, WORLD_SIZE or LOCAL_RANK yourself (e.g. in a runtime_env).")


def workers_acctrain_error(err: BaseException) -> BaseException | None:
    """The lowest rank's acctrain error (or RayGroupMismatch) inside Ray's WorkerGroupError, if any."""
    failures = getattr(err, "worker_failures", None) or {}
    for rank in sorted(failures):
        found = failures[rank]
        while found is not None and not isinstance(found, (*ACCTRAIN_ERRORS, RayGroupMismatch)):
            found = found.__cause__  # Ray may wrap the worker's exception in one of its own
        if found is not None:
            return found
    return None
