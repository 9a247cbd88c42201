"""Typed run configuration: one sentence per field, validated at construction.

    cfg = TrainConfig(global_batch_size=64, micro_batch_size=8, lr=3e-4)
    cfg, sections = load_config("run.yaml", ["lr=1e-3", "model.d_model=256"], sections={"model": ModelCfg})

Every error is a `ConfigError` that names the field and the fix. Validation only reads (the values, the
filesystem above `output_dir`, the launcher's ACCELERATE_MIXED_PRECISION), so a bad config fails before
anything is written to `output_dir`.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import math
import os
import tomllib
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from acctrain.errors import ConfigError
from acctrain.schedules import check_schedule_config



@dataclass
class TrainConfig:
    """How to train: batch geometry, optimizer, schedule, precision, evaluation and output."""

    output_dir: str = "runs/acctrain"
    """Directory for checkpoints and TensorBoard logs; created when training starts, never before."""
    seed: int = 0
    """Seed for model initialisation, data order (with the epoch) and dropout."""
    global_batch_size: int = 32
    """Samples per optimizer step, summed over all processes and accumulation micro-batches."""
    micro_batch_size: int | Literal["auto"] = 8
    """Samples per forward pass on one process; accumulation = global / (micro x world size); 'auto' (CUDA only): the largest divisor of global / world size whose forward and backward fit on the GPU."""
    epochs: int = 1
    """Passes over the training set; ignored when `max_steps` is set."""
    max_steps: int = 0
    """Optimizer steps to train for; 0 means `epochs` full passes."""
    lr: float = 1e-3
    """Peak learning rate: the base that the schedule multiplies, per parameter group."""
    weight_decay: float = 0.01
    """AdamW weight decay, applied to weight matrices only (not to biases or norm weights)."""
    adam_betas: tuple[float, float] = (0.9, 0.999)
    """AdamW (beta1, beta2) for the default optimizer; a momentum schedule overrides beta1."""
    param_groups: dict[str, float] = field(default_factory=dict)
    """Learning-rate multipliers by parameter-name pattern (module prefix or glob), e.g. {'backbone': 0.1}; first match wins."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this once per optimizer step; 0 disables clipping (the norm is still logged)."""
    mixed_precision: Literal["no", "bf16", "fp16", "fp8"] | None = None
    """Autocast precision: 'no' (fp32), 'bf16', 'fp16' (CUDA only, with dynamic loss scaling), or 'fp8' (CUDA GPUs of compute capability 8.9+, with torchao: the Linear layers in FP8, the rest in bf16, the weights in fp32); unset: the launcher's (accelerate launch --mixed_precision or its config file), else 'no'."""
    scheduler: str = "warmup_linear"
    """Learning-rate schedule by name, counted in optimizer steps (see acctrain.schedules.SCHEDULES)."""
    warmup_steps: int = 0
    """Linear warmup length in optimizer steps for the warmup_* schedules."""
    warmup_ratio: float = 0.0
    """Linear warmup as a fraction of all optimizer steps (instead of `warmup_steps`)."""
    schedule_args: dict[str, Any] = field(default_factory=dict)
    """Extra parameters of the chosen schedule, e.g. {'div': 25, 'pct_start': 0.25} for one_cycle."""
    eval_every: int = 0
    """Evaluate every this many optimizer steps; 0 means at the end of each epoch and of the run."""
    log_with: str = "tensorboard"
    """Trackers, comma-separated, among those Accelerate supports and you have installed (tensorboard, wandb, mlflow, ...)."""
    log_every: int = 10
    """Print progress and flush logged metrics every this many optimizer steps (every step is logged)."""
    save_every: int = 0
    """Save a checkpoint every this many optimizer steps; 0: only at the end of fit() (and by `save_every_minutes`)."""
    save_every_minutes: float = 30.0
    """Also save when this many minutes of training have passed since the last save (at the next step boundary, agreed by all ranks), so a crash loses at most that much; 0 turns it off."""
    async_save: bool = False
    """Write checkpoints in a background thread (same crash safety), which also copies the weights and optimizer state to CPU buffers kept for the run before the next optimizer step changes them; training pauses only for the small state."""
    keep_last: int = 2
    """Keep the newest this many checkpoints (older ones are deleted after a new one is complete); 0 keeps all."""
    keep_best: str = ""
    """Also keep the checkpoint with the best value of this eval metric (e.g. 'eval/loss'); empty: off."""
    keep_best_mode: Literal["min", "max"] = "min"
    """Whether the best `keep_best` value is the 'min' or the 'max'."""
    load_best_at_end: bool = False
    """At the end of fit, load the weights of the best checkpoint by `keep_best` into the model (weights only: the optimizer state and step counter stay those of the end)."""
    ema_decay: float = 0.0
    """Keep an exponential moving average of the weights with this decay per optimizer step (acctrain.ema.EMA: warm-up, checkpointed, evaluated as eval_ema/*); 0: off."""
    resume: str = "auto"
    """'auto': continue from the newest verified checkpoint in output_dir if any; 'none': start fresh; or a checkpoint path."""
    overwrite: bool = False
    """With resume='none', delete the checkpoints already in output_dir instead of refusing to start."""
    allow_plan_change: bool = False
    """Let a resume change the global batch, dataset length, seed or training data (the run continues at the same optimizer step)."""
    nan_policy: Literal["skip", "halt"] = "skip"
    """On a non-finite loss or gradient norm: 'skip' the update (counted, logged) or 'halt' with an error."""
    max_skipped_steps: int = 10
    """With nan_policy='skip', halt after this many skipped steps in a row."""
    compile: bool | Literal["regions"] = False
    """Compile the model with torch.compile before training (the first steps compile): true compiles it whole, 'regions' compiles each block of a repeated stack once and reuses it (a shorter cold start); checkpoints keep plain parameter names."""
    num_workers: int = 0
    """DataLoader worker processes per rank for loading training batches: one set for the whole fit, reading ahead across epochs."""
    cpu: bool = False
    """Train on the CPU even when a GPU is present (multi-process runs without CUDA use CPU/gloo anyway)."""
    fsdp: bool = False
    """Shard parameters, gradients and optimizer state with FSDP2 (an Accelerate FSDP launch config also enables it)."""
    fsdp_shard_size: int = 0
    """Processes that shard one copy of the model under FSDP2, e.g. the GPUs of one node, the processes forming world / this replicas whose gradients are all-reduced (HSDP: the gathers stay within a replica); 0: shard over all processes."""
    fsdp_reshard_after_forward: bool = True
    """Under FSDP2, free each wrapped block's gathered parameters after its forward and gather them again for its backward, false keeps them until the backward (ZeRO-2-like: more memory, one all-gather less per block and step); it applies to the blocks that a launch config's fsdp_auto_wrap_policy wraps and to a Hugging Face model's input embeddings, as Accelerate never reshards the root module and the final norm and output layer (false without a wrap policy is refused: it would change nothing)."""
    fsdp_cpu_offload: bool = False
    """Under FSDP2 on GPUs, keep the parameter shards, their gradients and the optimizer state in CPU memory (the optimizer steps on the CPU): less GPU memory, slower steps."""
    cpu_threads: int = 0
    """Torch threads per process when training on CPU; 0 means $OMP_NUM_THREADS if you set it, else available cores / processes on this node (the 1 that accelerate launch and torchrun set when you do not is not taken)."""
    activation_checkpointing: bool = False
    """Keep only each repeated block's inputs in the forward and recompute the block in the backward: less activation memory for about one more forward of compute, the same gradients (dropout's RNG is replayed)."""
    activation_checkpointing_block: str = ""
    """Class name of the blocks to checkpoint (e.g. 'Block'); empty: the class repeated in an nn.ModuleList or nn.Sequential, or a Hugging Face model's own layers."""
    hang_timeout: float = 600.0
    """Seconds a rank may wait for the others (in a collective, or to form the process group) before the job ends naming the ranks that did not arrive, exit code 124 (acctrain.watchdog); set it above the longest time the main rank saves alone."""

    def __post_init__(self) -> None:
        _coerce_types(self)
        positive = ("global_batch_size", "micro_batch_size", "epochs", "log_every")
        for name in positive:
            if getattr(self, name) != "auto" and getattr(self, name) < 1:
                raise ConfigError(name, f"must be >= 1, got {getattr(self, name)}.")
        for name in ("max_steps", "eval_every", "save_every", "num_workers", "warmup_steps", "cpu_threads", "keep_last",
                     "fsdp_shard_size"):
            if getattr(self, name) < 0:
                raise ConfigError(name, f"must be >= 0, got {getattr(self, name)}; use 0 to turn it off.")
        if self.micro_batch_size != "auto" and self.global_batch_size % self.micro_batch_size:
            raise ConfigError(
                "global_batch_size",
                f"{self.global_batch_size} is not a multiple of micro_batch_size={self.micro_batch_size}; "
                "choose global = micro x world size x accumulation steps.",
            )
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError("lr", f"must be a positive finite number, got {self.lr}.")
        if not self.weight_decay >= 0:
            raise ConfigError("weight_decay", f"must be >= 0, got {self.weight_decay}.")
        if len(self.adam_betas) != 2 or not all(0 <= b < 1 for b in self.adam_betas):
            raise ConfigError("adam_betas", f"must be two numbers in [0, 1), got {self.adam_betas}.")
        for pattern, mult in self.param_groups.items():
            if not (isinstance(mult, (int, float)) and not isinstance(mult, bool) and mult > 0):
                raise ConfigError(f"param_groups.{pattern}", f"the lr multiplier must be a number > 0, got {mult!r}.")
        if not (self.save_every_minutes >= 0 and math.isfinite(self.save_every_minutes)):
            raise ConfigError("save_every_minutes", f"must be a number >= 0 (0 turns it off), got {self.save_every_minutes}.")
        if not (self.hang_timeout > 0 and math.isfinite(self.hang_timeout)):
            raise ConfigError("hang_timeout", f"must be a number of seconds > 0, got {self.hang_timeout}; 600 suits "
                              "most jobs.")
        if not self.max_grad_norm >= 0:
            raise ConfigError("max_grad_norm", f"must be >= 0 (0 disables clipping), got {self.max_grad_norm}.")
        if self.max_skipped_steps < 1:
            raise ConfigError("max_skipped_steps", f"must be >= 1, got {self.max_skipped_steps}.")
        if self.activation_checkpointing_block and not self.activation_checkpointing:
            raise ConfigError("activation_checkpointing_block", f"names {self.activation_checkpointing_block!r} but "
                              "activation_checkpointing is false; set activation_checkpointing=true, or leave it empty.")
        if self.load_best_at_end and not self.keep_best:
            raise ConfigError("load_best_at_end", "needs keep_best to name the eval metric that picks the best "
                              "checkpoint, e.g. keep_best=eval/loss (with keep_best_mode min or max).")
        if self.load_best_at_end and self.keep_best.startswith("eval_ema/"):
            raise ConfigError("load_best_at_end", f"would load the trained weights of the checkpoint whose EMA scored "
                              f"best by {self.keep_best}, not that EMA: keep load_best_at_end=false and "
                              "`acctrain export RUN_DIR OUT --ema` the best checkpoint, or watch an eval/ metric.")
        if not (0 <= self.ema_decay < 1):
            raise ConfigError("ema_decay", f"must be in [0, 1) (0 turns the EMA off), e.g. 0.999; got {self.ema_decay}.")
        if not self.resume:
            raise ConfigError("resume", "must be 'auto', 'none' or a checkpoint directory, got an empty string.")
        if self.resume not in ("auto", "none") and not Path(self.resume).is_dir():
            raise ConfigError("resume", f"{self.resume} is not a checkpoint directory; use 'auto', 'none' or a path "
                              "like runs/x/checkpoints/step-00001000.")
        if not 0 <= self.seed < 2**32:  # seeds.py derives per-epoch and per-rank seeds that torch must accept
            raise ConfigError("seed", f"must be an int in [0, 2**32), got {self.seed}.")
        _check_trackers(self.log_with)
        _check_output_dir(self.output_dir)
        self.mixed_precision = _resolve_precision(self.mixed_precision)
        check_schedule_config(self.scheduler, self.warmup_steps, self.warmup_ratio, self.schedule_args)

    def to_dict(self) -> dict[str, Any]:
        """The config as plain JSON-able values (for logs and checkpoints)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))


def _check_trackers(log_with: str) -> None:
    """Refuse an unknown tracker, and one whose package is missing (Accelerate would drop it without a word)."""
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS, get_available_trackers

    available = {str(getattr(t, "value", t)) for t in get_available_trackers()}
    for name in (n.strip() for n in log_with.split(",") if n.strip()):
        if name not in LOGGER_TYPE_TO_CLASS:
            close = difflib.get_close_matches(name, list(LOGGER_TYPE_TO_CLASS), n=1)
            hint = f" Did you mean {close[0]}?" if close else ""
            raise ConfigError("log_with", f"unknown tracker {name!r}.{hint} Known: {', '.join(LOGGER_TYPE_TO_CLASS)}.")
        if name not in available:
            raise ConfigError("log_with", f"the {name} tracker is not installed: pip install {name} "
                              f"(or leave {name} out of log_with).")


def _check_output_dir(output_dir: str) -> None:
    """Refuse an output_dir that cannot be a writable directory, before anything is written (the launch would
    otherwise fail later with a traceback from whichever part writes first)."""
    if not output_dir:
        raise ConfigError("output_dir", "must be a directory path, got an empty string.")
    path = os.path.abspath(output_dir)
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError("output_dir", f"{output_dir} is an existing file, not a directory; choose another path.")
    existing = path
    while not os.path.exists(existing):  # the nearest part of the path that exists
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ConfigError("output_dir", f"{output_dir} cannot be created: {existing} is a file, not a directory.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError("output_dir", f"{output_dir} cannot be written: {existing} is not writable by this user "
                          "(or is on a read-only filesystem); choose a writable path.")


def _resolve_precision(chosen: str | None) -> str:
    """The precision to train in: the config's, else the launcher's (ACCELERATE_MIXED_PRECISION), else 'no'.

    `accelerate launch` always passes one, 'no' when told nothing, so only another value is the launcher's
    choice; one that contradicts the config is refused rather than silently overridden either way.
    """
    launcher = os.environ.get("ACCELERATE_MIXED_PRECISION", "no").strip().lower()
    if launcher == "no" or launcher == chosen:
        return chosen or "no"
    source = "the launcher's precision (accelerate launch --mixed_precision, or mixed_precision in its config file)"
    if chosen is None and launcher not in ("bf16", "fp16", "fp8"):
        raise ConfigError("mixed_precision", f"{source} is {launcher!r}, which acctrain does not support; "
                          "launch with bf16, fp16, fp8 or no.")
    if chosen is None:
        return launcher
    raise ConfigError("mixed_precision", f"this config says {chosen!r} but {source} is {launcher!r}; set one of "
                      "them, or the same value in both.")


def field_docs(cls: type) -> dict[str, str]:
    """Each field's docstring sentence, read from the class source (for --help and the README)."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = " ".join(str(nxt.value.value).split())
    return docs


def _coerce_types(cfg: Any) -> None:
    """Check each field against its annotation, converting the lossless cases (int -> float, list -> tuple)."""
    hints = typing.get_type_hints(type(cfg))
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        setattr(cfg, f.name, _coerce(f.name, value, hints[f.name]))


def _hint_name(hint: Any) -> str:
    """A type as a message names it: `int`, or a Literal's values ('auto')."""
    if typing.get_origin(hint) is typing.Literal:
        return " or ".join(map(repr, typing.get_args(hint)))
    return getattr(hint, "__name__", str(hint))


def _coerce(name: str, value: Any, hint: Any) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = [o for o in typing.get_args(hint) if o is not type(None)]
        if value is None and len(options) < len(typing.get_args(hint)):
            return None
        if len(options) == 1:  # Optional[X]: X's own message (e.g. the choices of a Literal)
            return _coerce(name, value, options[0])
        for option in typing.get_args(hint):
            try:
                return _coerce(name, value, option)
            except ConfigError:
                pass
        raise ConfigError(name, f"expected {' or '.join(map(_hint_name, options))}, got {value!r}.")
    if origin is typing.Literal:  # a choice field: its values are its type
        if value is False and "no" in typing.get_args(hint):  # YAML 1.1 reads `mixed_precision: no` as False
            return "no"
        if value in typing.get_args(hint):
            return value
        raise ConfigError(name, f"must be one of {', '.join(map(str, typing.get_args(hint)))}, got {value!r}.")
    if hint is type(None):
        if value is None:
            return None
        raise ConfigError(name, f"expected None, got {value!r}.")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(name, f"expected a list of numbers like [0.9, 0.999], got {value!r}.")
        return tuple(_coerce(name, v, t) for v, t in zip(value, typing.get_args(hint))) + tuple(
            value[len(typing.get_args(hint)) :]
        )
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise ConfigError(name, f"expected a mapping like {{key: value}}, got {value!r}.")
        return dict(value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        try:  # YAML 1.1 reads `1e-3` (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if hint in (int, float, str, bool) and not (isinstance(value, hint) and not (hint is int and isinstance(value, bool))):
        raise ConfigError(name, f"expected {hint.__name__}, got {value!r} ({type(value).__name__}).")
    return value


# ---------------------------------------------------------------------------------------------- loading


def load_config(
    path: str | Path | None = None,
    overrides: list[str] = (),
    *,
    cls: type = TrainConfig,
    sections: dict[str, type] | None = None,
    defaults: dict[str, Any] | None = None,
) -> tuple[Any, dict[str, Any]]:
    """Build `cls` from a YAML/TOML file plus `key=value` overrides; `section.key` fills `sections`.

    `defaults` (top-level keys) replace `cls`'s own defaults: the file and the overrides win over them.
    Returns the config and one instance per section (built from its defaults when not mentioned).
    Unknown keys are an error naming close matches.
    """
    sections = sections or {}
    raw: dict[str, Any] = {**(defaults or {}), **(_read_file(Path(path)) if path else {})}
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(item, "overrides are written key=value, e.g. lr=3e-4 or model.d_model=256.")
        _set_dotted(raw, key.strip(), _parse_value(text))

    top = {k: v for k, v in raw.items() if k not in sections}
    _check_known(top, cls, "", extra=sections)
    section_values = {}
    for name, section_cls in sections.items():
        values = raw.get(name) or {}
        if not isinstance(values, dict):
            raise ConfigError(name, f"must be a mapping of {section_cls.__name__} fields, got {values!r}.")
        _check_known(values, section_cls, name + ".")
        section_values[name] = _build(section_cls, values, name + ".")
    return _build(cls, top, ""), section_values


def _build(cls: type, values: dict[str, Any], prefix: str) -> Any:
    try:
        return cls(**values)
    except ConfigError as err:
        if prefix and not err.field.startswith(prefix):
            raise ConfigError(prefix + err.field, str(err).split(": ", 1)[1]) from None
        raise


def _refuse_unknown_keywords(cls: type) -> type:
    """Make `cls(...)` refuse an unknown keyword as the command line does (a ConfigError naming it, with the
    close field names), not with Python's bare TypeError."""
    init, names = cls.__init__, {f.name for f in fields(cls)}

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        unknown = {key: value for key, value in kwargs.items() if key not in names}
        if unknown:
            _check_known(unknown, cls, "")
        init(self, *args, **kwargs)

    cls.__init__ = __init__
    return cls


_refuse_unknown_keywords(TrainConfig)


def _check_known(values: dict[str, Any], cls: type, prefix: str, extra: dict | None = None) -> None:
    names = [f.name for f in fields(cls)]
    dict_fields = {f.name for f in fields(cls) if typing.get_origin(typing.get_type_hints(cls)[f.name]) is dict}
    for key in values:
        if key not in names:
            known = names + list(extra or ())
            close = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
            hint = f" Did you mean {' or '.join(prefix + c for c in close)}?" if close else ""
            raise ConfigError(prefix + key, f"unknown config key.{hint} Known keys: {', '.join(known)}.")
        if isinstance(values[key], dict) and key not in dict_fields:
            raise ConfigError(prefix + key, "is not a section; set it as key=value.")


def _read_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError("config", f"file {path} does not exist; pass a .yaml, .yml or .toml file.")
    text = path.read_text()
    if path.suffix == ".toml":
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as err:  # its message ends "(at line L, column C)"
            raise ConfigError("config", f"{path}: invalid TOML: {err}.") from None
    elif path.suffix in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            raise ConfigError("config", f"{path}: invalid YAML{where}: {getattr(err, 'problem', None) or err}.") from None
    else:
        raise ConfigError("config", f"{path} must end in .yaml, .yml or .toml.")
    if not isinstance(data, dict):
        raise ConfigError("config", f"{path} must hold a mapping of config keys, got {type(data).__name__}.")
    return data


def _parse_value(text: str) -> Any:
    """`key=value` text as YAML would read it: numbers, true/false, null, [lists], {maps}, else a string."""
    import yaml

    for number in (int, float):
        try:
            return number(text)
        except ValueError:
            pass
    try:
        return yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        return text


def _set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = raw
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(key, f"{part} is not a mapping, so {key} cannot be set.")
    node[parts[-1]] = value
