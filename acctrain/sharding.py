"""How FSDP2 shards the model: the replicate x shard layout (HSDP), resharding, CPU offload; DeepSpeed refused.

    refuse_deepspeed()                                     # first thing at start-up: a DeepSpeed launch is refused
    layout = fsdp_layout(config, fsdp, world_size, cpu)    # refuses what cannot be honoured, before anything is written
    plugin = fsdp_plugin(config)                           # Accelerate's FSDP2 plugin with the config's options
    parallelism = layout.parallelism_config()              # None for plain FSDP; the 2-D mesh for HSDP

Plain FSDP shards every parameter over all processes, so each all-gather and reduce-scatter spans every node.
HSDP splits the processes into `replicas` groups of `shards` consecutive ranks (a node, with the launchers'
rank order): each group shards one full copy of the model, the gathers stay inside it, and only the gradients
cross groups, all-reduced once per step. The parameters are DTensors on a 2-D mesh (dp_replicate, dp_shard) with
placements (Replicate(), Shard(0)). Accelerate builds that mesh from a `ParallelismConfig`; on CPU, where it
refuses one (`ParallelismConfig._validate_accelerator` accepts only FSDP2 or a multi-GPU type, and Accelerate
drops the FSDP plugin on MULTI_CPU), acctrain.checkpoint.sharded.use_fsdp2_on_cpu attaches it after the fact.

An Accelerate launch config's FSDP settings arrive as FSDP_* variables and its parallelism_config as
PARALLELISM_CONFIG_* variables: each is honoured when it agrees with the config and refused when it does not,
so that neither side silently wins.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from accelerate import ParallelismConfig
from accelerate.utils import FullyShardedDataParallelPlugin

from acctrain.config import TrainConfig
from acctrain.errors import ConfigError

LAUNCHERS_PARALLELISM = os.environ.get("ACCELERATE_USE_PARALLELISM_CONFIG", "").lower() == "true"
"""Whether the launcher passed a parallelism_config (read once: acctrain hides the variable from Accelerate, which
would otherwise build a second, unchecked ParallelismConfig from it, refused on CPU)."""

DEEPSPEED_REFUSED = (
    "this launch asks for DeepSpeed (ACCELERATE_USE_DEEPSPEED, set by `accelerate launch --use_deepspeed` or a "
    "launch config with distributed_type: DEEPSPEED), which acctrain does not run: DeepSpeed's engine steps, scales "
    "the loss and clips inside itself, so acctrain's exact loss scaling, global-norm clipping and skipped steps "
    "(nan_policy) could not be kept. Launch without DeepSpeed and use FSDP2, which does the same: ZeRO stage 1 or 2 "
    "-> fsdp=true fsdp_reshard_after_forward=false (with a wrap policy in the launch config); ZeRO stage 3 -> fsdp=true; offload_optimizer / offload_param -> "
    "fsdp=true fsdp_cpu_offload=true (GPUs only). Add fsdp_shard_size=GPUS_PER_NODE to keep the gathers within a node."
)


def refuse_deepspeed() -> None:
    """Refuse a DeepSpeed launch (on CPU Accelerate would even drop it without a word)."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        raise ConfigError("deepspeed", DEEPSPEED_REFUSED)


@dataclass(frozen=True)
class Layout:
    """`replicas` full copies of the model, each sharded over `shards` processes (replicas 1: plain FSDP)."""

    replicas: int
    shards: int

    def parallelism_config(self) -> ParallelismConfig | None:
        """Accelerate's description of the 2-D mesh for HSDP; None for plain FSDP (Accelerate's 1-D default).
        Every size is given, so that no PARALLELISM_CONFIG_* variable fills one in."""
        if self.replicas == 1:
            return None
        return ParallelismConfig(dp_replicate_size=self.replicas, dp_shard_size=self.shards, tp_size=1, cp_size=1,
                                 sp_size=1)


def fsdp_layout(config: TrainConfig, fsdp: bool, world_size: int, cpu: bool) -> Layout | None:
    """The FSDP2 layout for `world_size` processes (None without FSDP), once the config's FSDP fields and the
    launcher's settings are known to agree and to be possible here."""
    if not fsdp:
        _refuse_fsdp_fields_without_fsdp(config)
        _refuse_launchers_shards_without_fsdp()
        return None
    _check_launchers_fsdp_settings(config)
    if config.fsdp_cpu_offload and cpu:
        raise ConfigError("fsdp_cpu_offload", "moves FSDP2's parameters, gradients and optimizer state from the GPU to "
                          "the CPU, but this run trains on the CPU, where they already are (and FSDP2's offload pins "
                          "host memory, which needs a GPU); set fsdp_cpu_offload=false, or train on GPUs.")
    shards = _launchers_shards(config) or config.fsdp_shard_size or world_size
    if shards > world_size or world_size % shards:
        raise ConfigError("fsdp_shard_size", f"{shards} processes per shard group do not divide the {world_size} "
                          "processes of this launch into whole replicas; set it to a divisor of the world size (the "
                          "GPUs of one node, e.g. 8), or 0 to shard over all processes.")
    if shards == 1 and world_size > 1:
        raise ConfigError("fsdp_shard_size", f"1 process per shard group gives {world_size} whole copies of the model "
                          "and shards nothing, which is DDP; set fsdp=false for that, or a shard size of 2 or more.")
    return Layout(replicas=world_size // shards, shards=shards)


def fsdp_plugin(config: TrainConfig) -> FullyShardedDataParallelPlugin:
    """Accelerate's FSDP2 plugin, the config's resharding and offload given explicitly (the launcher's FSDP_*
    values for them were checked to agree; its other FSDP_* settings, e.g. the wrap policy, are read by the plugin)."""
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, reshard_after_forward=config.fsdp_reshard_after_forward,
                                            cpu_offload=config.fsdp_cpu_offload)
    if not config.fsdp_reshard_after_forward and plugin.auto_wrap_policy is None:
        raise ConfigError("fsdp_reshard_after_forward", "false would change nothing here: without a wrap policy the "
                          "whole model is one FSDP unit, the root, whose parameters FSDP2 keeps gathered from the "
                          "forward to the backward anyway. Give the launch config an fsdp_auto_wrap_policy (e.g. "
                          "TRANSFORMER_BASED_WRAP with fsdp_transformer_layer_cls_to_wrap: your block's class), or "
                          "leave fsdp_reshard_after_forward true.")
    return plugin


def hide_launchers_parallelism() -> None:
    """Keep Accelerate from building its own ParallelismConfig from the launcher's variables: acctrain's layout
    (checked against them) is the one used."""
    os.environ.pop("ACCELERATE_USE_PARALLELISM_CONFIG", None)


def _env_flag(name: str) -> bool | None:
    """A launcher's true/false variable (FSDP1's names for resharding too), or None when it is not set."""
    value = os.environ.get(name)
    if value is None:
        return None
    return value.strip().lower() in ("1", "true", "yes", "y", "on", "full_shard")


FSDP1_STRATEGIES = {"SHARD_GRAD_OP": "fsdp_reshard_after_forward=false", "2": "fsdp_reshard_after_forward=false",
                    "HYBRID_SHARD": "fsdp_shard_size=GPUS_PER_NODE", "4": "fsdp_shard_size=GPUS_PER_NODE",
                    "HYBRID_SHARD_ZERO2": "fsdp_shard_size=GPUS_PER_NODE fsdp_reshard_after_forward=false",
                    "5": "fsdp_shard_size=GPUS_PER_NODE fsdp_reshard_after_forward=false", "NO_SHARD": "fsdp=false",
                    "3": "fsdp=false"}
"""FSDP1 sharding strategies (FSDP_SHARDING_STRATEGY, which the FSDP2 plugin ignores) and the fields that say the
same for FSDP2; FULL_SHARD is FSDP2's default."""


def _check_launchers_fsdp_settings(config: TrainConfig) -> None:
    """Refuse an Accelerate FSDP launch config whose resharding, offload or FSDP1 strategy contradicts the config."""
    strategy = os.environ.get("FSDP_SHARDING_STRATEGY", "FULL_SHARD").strip().upper()
    if strategy in FSDP1_STRATEGIES:
        raise ConfigError("fsdp_shard_size", f"the launch config's fsdp_sharding_strategy is {strategy}, an FSDP1 "
                          "setting that FSDP2 would ignore; remove it and set "
                          f"{FSDP1_STRATEGIES[strategy]} in acctrain's config instead.")
    settings = (("FSDP_RESHARD_AFTER_FORWARD", "fsdp_reshard_after_forward", "fsdp_reshard_after_forward"),
                ("FSDP_OFFLOAD_PARAMS", "fsdp_offload_params", "fsdp_cpu_offload"))
    for variable, launch_key, field in settings:
        launcher = _env_flag(variable)
        if launcher is not None and launcher != getattr(config, field):
            raise ConfigError(field, f"this config says {str(getattr(config, field)).lower()} but the launch config's "
                              f"{launch_key} ({variable}) is {str(launcher).lower()}; set the same value in both.")


def _launcher_size(name: str) -> int:
    return int(os.environ.get(f"PARALLELISM_CONFIG_{name}", "1") or 1)


def _launchers_shards(config: TrainConfig) -> int:
    """The shard size of the launcher's parallelism_config (0 when it has none), once it agrees with the config."""
    if not LAUNCHERS_PARALLELISM:
        return 0
    for name in ("TP_SIZE", "CP_SIZE", "SP_SIZE"):
        if _launcher_size(name) > 1:
            raise ConfigError("fsdp_shard_size", f"the launch config's parallelism_config sets {name.lower()}="
                              f"{_launcher_size(name)}, which acctrain does not support; remove it (acctrain runs "
                              "data parallelism: DDP, FSDP2, HSDP with fsdp_shard_size).")
    shards, replicas = _launcher_size("DP_SHARD_SIZE"), _launcher_size("DP_REPLICATE_SIZE")
    if shards == 1:
        return 0  # replicas only: data parallelism over every process, as acctrain does anyway
    if config.fsdp_shard_size not in (0, shards):
        raise ConfigError("fsdp_shard_size", f"this config says {config.fsdp_shard_size} but the launch config's "
                          f"parallelism_config_dp_shard_size is {shards}; set the same value in both, or one of them.")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if shards * replicas != world:
        raise ConfigError("fsdp_shard_size", f"the launch config's parallelism_config is {replicas} replicas x {shards} "
                          f"shards = {replicas * shards} processes, but {world} were launched; fix the launch config.")
    return shards


def _refuse_fsdp_fields_without_fsdp(config: TrainConfig) -> None:
    """The FSDP fields mean nothing without FSDP: refuse them rather than ignore them."""
    defaults = {"fsdp_shard_size": 0, "fsdp_reshard_after_forward": True, "fsdp_cpu_offload": False}
    for field, default in defaults.items():
        if getattr(config, field) != default:
            raise ConfigError(field, f"is set to {getattr(config, field)!r} but FSDP is off; set fsdp=true (or launch "
                              f"with an Accelerate FSDP config), or leave {field} at {default!r}.")


def _refuse_launchers_shards_without_fsdp() -> None:
    """A launcher's parallelism_config that shards needs FSDP, which is off."""
    if LAUNCHERS_PARALLELISM and _launcher_size("DP_SHARD_SIZE") > 1:
        raise ConfigError("fsdp", f"the launch config's parallelism_config shards over "
                          f"{_launcher_size('DP_SHARD_SIZE')} processes (parallelism_config_dp_shard_size), which "
                          "needs FSDP; set fsdp=true, or remove the shard size from the launch config.")


def check_kept_settings(accelerator, config: TrainConfig, layout: Layout | None) -> None:
    """Refuse a second Engine in one process whose FSDP settings differ from the first's: Accelerate keeps one FSDP
    plugin and mesh per process, so the new settings would silently not apply."""
    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    if layout is None or plugin is None:
        return
    mesh = accelerator.state.parallelism_config
    kept = {"fsdp_reshard_after_forward": plugin.reshard_after_forward,
            "fsdp_cpu_offload": type(plugin.cpu_offload).__name__ == "CPUOffloadPolicy",
            "fsdp_shard_size": mesh.dp_shard_size if mesh is not None else accelerator.num_processes}
    wanted = {"fsdp_reshard_after_forward": config.fsdp_reshard_after_forward,
              "fsdp_cpu_offload": config.fsdp_cpu_offload, "fsdp_shard_size": layout.shards}
    for field, value in kept.items():
        if value != wanted[field]:
            raise ConfigError(field, f"this process already made an Accelerator with {field}={value}, which Accelerate "
                              f"keeps for the whole process; start a new process to train with {wanted[field]}.")
