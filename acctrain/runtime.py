"""Start-up, apart from the loop: the Accelerator and its process group, the trackers, the stop signals.

    accelerator = make_accelerator(config)      # refuses what would fail or silently differ, before anything is written
    with StopSignals() as signals: ...          # SIGTERM/SIGUSR1/SIGINT -> signals.received, read at step boundaries
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, ProjectConfiguration, parse_flag_from_env

from acctrain import barrier, checkpoint, group, memory, precision, private_apis, seeds, sharding, watchdog
from acctrain.checkpoint import sharded
from acctrain.config import TrainConfig
from acctrain.errors import ConfigError
from acctrain.state import rng_from_files
from acctrain.tracking import fast_tensorboard_checksums


LAUNCHERS_FSDP = os.environ.get("ACCELERATE_USE_FSDP")
"""ACCELERATE_USE_FSDP as the launcher set it (an Accelerate FSDP config), read before any Engine of this process:
Accelerate sets it for an Accelerator given an FSDP plugin, and it would make every later Engine of the process
FSDP (or refused as one), e.g. in a notebook after an `fsdp=true` Engine."""


def make_accelerator(config: TrainConfig) -> Accelerator:
    """An Accelerator whose process group really spans every launched process (without CUDA, torchrun's processes would otherwise train as independent jobs)."""
    sharding.refuse_deepspeed()
    if LAUNCHERS_FSDP is None:  # an earlier Engine's FSDP is not this one's
        os.environ.pop("ACCELERATE_USE_FSDP", None)
    else:
        os.environ["ACCELERATE_USE_FSDP"] = LAUNCHERS_FSDP
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    fsdp = config.fsdp or os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true")
    # `accelerate launch --cpu` sets ACCELERATE_USE_CPU (Accelerate honours it too). Without CUDA, Accelerate
    # runs N independent single-process jobs unless told cpu=True (FSDP needs the group even for one process).
    cpu = config.cpu or parse_flag_from_env("ACCELERATE_USE_CPU")
    cpu = cpu or ((world_size > 1 or fsdp) and not torch.cuda.is_available())
    precision.check(config.mixed_precision, on_cpu=cpu or not torch.cuda.is_available())
    layout = sharding.fsdp_layout(config, fsdp, world_size, cpu)  # replicas x shards, checked against the launcher
    if not cpu and torch.cuda.is_available():
        check_gpus_per_node(int(os.environ.get("LOCAL_WORLD_SIZE", "1")), torch.cuda.device_count())
    if private_apis.accelerate_cached_precision(config.mixed_precision) != config.mixed_precision:
        # Accelerate caches one precision per process; a second Engine in the same process (a notebook,
        # a test) may choose another. The process group itself (PartialState) is kept.
        private_apis.reset_accelerate_state()
    if group.launched():  # bounded by hang_timeout, naming who never joined, new each elastic round
        group.form("gloo" if cpu or not torch.cuda.is_available() else "nccl", config.hang_timeout, config.output_dir)
    # FSDP2 with the config's resharding and offload; a launch config's other FSDP_* settings reach the plugin.
    sharding.hide_launchers_parallelism()
    plugin = sharding.fsdp_plugin(config) if fsdp else None
    # HSDP's 2-D mesh: Accelerate refuses a ParallelismConfig on MULTI_CPU, so on CPU use_fsdp2_on_cpu attaches it.
    parallelism = layout.parallelism_config() if layout is not None else None
    if plugin is not None:
        memory.refuse_accelerate_checkpointing(plugin)  # acctrain's own replays dropout's RNG; Accelerate's does not
    accelerator = Accelerator(
        cpu=cpu,
        fsdp_plugin=plugin,
        parallelism_config=None if cpu else parallelism,
        mixed_precision=config.mixed_precision,
        kwargs_handlers=precision.handlers(config.mixed_precision),
        log_with=[name.strip() for name in config.log_with.split(",") if name.strip()],
        project_config=ProjectConfiguration(
            project_dir=config.output_dir, logging_dir=os.path.join(config.output_dir, "logs")
        ),
    )
    if fsdp and accelerator.distributed_type == DistributedType.MULTI_CPU:
        sharded.use_fsdp2_on_cpu(accelerator, plugin, parallelism)  # Accelerate drops the FSDP plugin on CPU otherwise
    sharding.check_kept_settings(accelerator, config, layout)  # a second Engine in this process
    if fsdp and not sharded.is_fsdp(accelerator):  # one process without a launcher: Accelerate ignores the plugin
        raise ConfigError("fsdp", "fsdp=true needs a distributed launch, but this run is one process without a "
                          "process group, where FSDP would silently be off. Launch it with `torchrun --nproc_per_node "
                          "N train.py ...` (N = 1 works too) or `accelerate launch --num_processes N train.py ...`, "
                          "or set fsdp=false.")
    if accelerator.device.type == "cpu":
        torch.set_num_threads(cpu_threads(config.cpu_threads))
    if accelerator.num_processes != world_size:
        raise RuntimeError(
            f"launched {world_size} processes but the process group has {accelerator.num_processes}: "
            "they would train as independent jobs. Check the launcher and the accelerate config."
        )
    memory.check_micro_batch(config, accelerator)  # 'auto' needs a GPU of its own on each rank
    return accelerator


def cpu_threads(configured: int) -> int:
    """Torch threads per CPU process: `cpu_threads`, else $OMP_NUM_THREADS when you set it, else this node's
    cores / its processes. A launcher's own default is not yours: `accelerate launch` sets OMP_NUM_THREADS=1 even
    for one process, and torchrun for several, when you do not (`omp_threads_you_set`)."""
    if configured:
        return configured
    return omp_threads_you_set() or max(1, len(os.sched_getaffinity(0)) // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def omp_threads_you_set() -> int | None:
    """$OMP_NUM_THREADS unless the launcher set it: under `accelerate launch` or torchrun, whose environment a
    process reads from /proc, a value that the launcher's own environment lacks is the launcher's default."""
    omp = os.environ.get("OMP_NUM_THREADS", "").strip()
    if not (omp.isdigit() and int(omp) > 0):
        return None
    launched = "ACCELERATE_DYNAMO_BACKEND" in os.environ or "TORCHELASTIC_RUN_ID" in os.environ
    if launched:
        try:
            launcher = open(f"/proc/{os.getppid()}/environ", "rb").read().split(b"\0")
        except OSError:  # no /proc (macOS): keep it
            return int(omp)
        if not any(item.startswith(b"OMP_NUM_THREADS=") for item in launcher):
            return None
    return int(omp)


def check_gpus_per_node(local_processes: int, gpus: int) -> None:
    """Refuse a launch with more processes on this node than visible GPUs (NCCL would put two ranks on one
    GPU and abort with "Duplicate GPU detected", or Accelerate would pick a device that does not exist)."""
    if local_processes > gpus:
        raise ConfigError("cpu", f"{local_processes} processes on this node but {gpus} visible GPU(s): each process "
                          f"needs a GPU of its own. Launch at most {gpus} process(es) per node (--nproc_per_node / "
                          "--num_processes), make more GPUs visible (CUDA_VISIBLE_DEVICES), or set cpu=true to "
                          "train on the CPU (gloo).")


def flat_config(values: dict[str, Any]) -> dict[str, Any]:
    """Config values as TensorBoard hparams accept them (scalars and strings)."""
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in values.items()}


def start_run(accelerator: Accelerator, config: TrainConfig, step: int, settings: dict[str, Any],
              restored_rng: tuple | None, resumed: bool, seed_scheme: int = seeds.SCHEME) -> None:
    """The start of a fit on every rank: `overwrite` clears the old checkpoints (resume=none), then the
    trackers, and the global RNG (dropout): the checkpoint's, else seeded per rank, reproducibly; a rank that
    the resumed run did not have gets a seed of its own."""
    if config.resume == "none" and config.overwrite and accelerator.is_main_process:
        shutil.rmtree(checkpoint.checkpoints_root(config.output_dir), ignore_errors=True)
    barrier.wait_for_everyone(accelerator)
    start_trackers(accelerator, config, step, settings)
    if restored_rng is not None:
        rng_from_files(*restored_rng)
    else:
        torch.manual_seed(seeds.rank_seed(config.seed, accelerator.process_index, step if resumed else None,
                                          seed_scheme))

def start_trackers(accelerator: Accelerator, config: TrainConfig, step: int, settings: dict[str, Any] = {}) -> None:
    """Trackers (TensorBoard by default) under `{output_dir}/logs`, with the config (and the job's other
    `settings`, e.g. `model.*`) as text at `step`, and as hparams once, at the run's start.

    Once per output_dir: a later fit in the same directory goes on writing to them, a new phase's
    output_dir (replan) gets its own. A resumed launch logs no hparams: TensorBoard would show each
    launch as a sub-run of its own.
    """
    logging_dir = os.path.join(config.output_dir, "logs")
    project = accelerator.project_configuration
    if accelerator.trackers and project.logging_dir == logging_dir:
        return
    for tracker in accelerator.trackers:
        tracker.finish()
    accelerator.trackers = []
    project.project_dir, project.logging_dir = config.output_dir, logging_dir
    everything = {**config.to_dict(), **settings}
    # a deep queue, so that the loop does not wait for the writer thread; what is queued is on disk in 30 s
    tensorboard = {"max_queue": 10_000, "flush_secs": 30}
    fast_tensorboard_checksums()
    accelerator.init_trackers("acctrain", config=flat_config(everything) if step == 0 else None,
                              init_kwargs={"tensorboard": tensorboard})
    accelerator.log({"config": "```\n" + json.dumps(everything, indent=2) + "\n```"}, step=step)


class StopSignals:
    """While fitting, SIGTERM, SIGUSR1 and SIGINT (Ctrl-C) set `received` (their name); the loop saves and stops at
    a step boundary. A second Ctrl-C interrupts at once (KeyboardInterrupt), as without a handler.

    Only the main thread can install signal handlers; elsewhere (an Engine driven from a thread) nothing is
    installed and `received` stays None.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

    def __init__(self):
        self.received: str | None = None
        self._previous: list[dict] = []  # the handlers each (nested) entry replaced

    def __enter__(self) -> StopSignals:
        self.received = None  # a signal that stopped an earlier fit does not stop this one
        main = threading.current_thread() is threading.main_thread()
        self._previous.append({sig: signal.signal(sig, self._request) for sig in self.SIGNALS} if main else {})
        return self

    def __exit__(self, *exc: Any) -> None:
        previous = self._previous.pop()
        if watchdog.current().ending:
            # The watch thread is writing the hang report and exits with 124. The main thread got here because the
            # hung rank's peers left its collective; a launcher that saw them leave sends SIGTERM, which must not
            # kill this process (-15) before the report and the exit code are out.
            return
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    def _request(self, signum, frame) -> None:
        self.received = signal.Signals(signum).name
        if signum == signal.SIGINT:  # the next Ctrl-C is Python's own again
            signal.signal(signal.SIGINT, signal.default_int_handler)


def backend() -> str:
    """The process group's backend (nccl, gloo), or 'none' for one process without a group."""
    return torch.distributed.get_backend() if torch.distributed.is_initialized() else "none"


def local_devices(accelerator: Accelerator) -> str:
    """The device of each local rank on this node: cuda:{local rank}, as Accelerate assigns GPUs, or cpu."""
    device = accelerator.device
    if device.type != "cuda":
        return device.type
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if local == 1:
        return f"cuda:{device.index if device.index is not None else torch.cuda.current_device()}"
    return ",".join(f"cuda:{rank}" for rank in range(local))
