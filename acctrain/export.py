"""Exporting a checkpoint for others to load: one weights file, a directory `from_pretrained` loads, or the
weights with the model's constructor settings.

    acctrain export CHECKPOINT|RUN_DIR OUT.safetensors [--ema]   # one file; the job's settings in its metadata
    acctrain export CHECKPOINT|RUN_DIR OUT_DIR [--ema]           # a directory, by the model the checkpoint records

    export(Path("runs/x/checkpoints/step-00001000"), Path("hf_model"), ema=True)   # the same in Python

A directory holds, by the model the checkpoint records (`model` in trainer_state.json, made by `model_record`
at every save):

- a Hugging Face Transformers model (a class of the `transformers` package with a `config`): what its own
  `save_pretrained` writes - config.json (the config it was trained with), generation_config.json when it
  generates, model.safetensors - so that `from_pretrained(OUT_DIR)` loads it. The model is rebuilt on the meta
  device (no memory, no initialisation) from the recorded config, given the checkpoint's tensors (assigned),
  its tied weights tied again, and saved by `save_pretrained`: tied duplicates are dropped as HF drops them.
  Needs `transformers` where you export; without it, OUT.safetensors still works.
- any other model: model.safetensors and acctrain_model.json: the model's class, its constructor settings
  where acctrain knows them (`config`: the fields of the model's `config` attribute, a dataclass or an object
  with `to_dict`, e.g. the embedded job's `ByteLM(ModelConfig(**record["config"]))`), the job's `settings`
  (`model.*`, `data.*`), the checkpoint, its step and which weights these are. Nothing in it is code.

In every form the tensors have the model's plain names: FSDP shards joined, torch.compile's `_orig_mod.`
removed. With `--ema` the EMA callback's average (acctrain.ema) replaces the trained parameters, cast to
their dtype (what `EMA.applied` puts in the model); buffers are the EMA's copies, parameters that do not train
the checkpoint's.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

from acctrain import private_apis

RECORD_FILE = "acctrain_model.json"


class ExportError(Exception):
    """An export that cannot be written as asked; the message says why and what to do instead."""


# ------------------------------------------------------------------------------------------ the record


def model_record(model: torch.nn.Module) -> dict[str, Any]:
    """What the checkpoint records of the model for export: its class and its configuration as JSON."""
    model = private_apis.uncompiled(model)  # torch.compile's wrapper
    cls = _model_class(model)
    config = getattr(model, "config", None)
    if cls.__module__.split(".")[0] == "transformers" and hasattr(model, "save_pretrained") and hasattr(config, "to_json_string"):
        return {"library": "transformers", "class": cls.__name__, "config": json.loads(config.to_json_string(use_diff=False))}
    return {"class": f"{cls.__module__}.{cls.__qualname__}", "config": _settings_of(config)}


def _model_class(model: torch.nn.Module) -> type:
    """The model's own class, also under FSDP2 (whose `fully_shard` makes a subclass `FSDP<Class>`)."""
    cls = type(model)
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch without FSDP2
        return cls
    return next(c for c in cls.__mro__ if not issubclass(c, FSDPModule)) if issubclass(cls, FSDPModule) else cls


def _settings_of(config: Any) -> dict[str, Any] | None:
    """A model's `config` attribute as JSON: a dataclass's fields, or `to_dict()`; None for anything else."""
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        values = dataclasses.asdict(config)
    elif callable(getattr(config, "to_dict", None)):
        values = config.to_dict()
    else:
        return None
    return json.loads(json.dumps(values, default=str))


# ------------------------------------------------------------------------------------------ exporting


def export(source: Path, out: Path, ema: bool = False) -> str:
    """Write checkpoint `source` (verified by the caller) to `out`: a .safetensors file, else a directory (see the
    module); `ema` exports the EMA average. Returns what was written, in words."""
    from acctrain import checkpoint

    meta = checkpoint.read_json(source / "trainer_state.json")
    settings = meta.get("settings", {})
    tensors = checkpoint_weights(source, meta, ema)
    which = "the EMA weights" if ema else "the trained weights"
    if out.suffix == ".safetensors":
        write_file(tensors, out, settings)
        return f"wrote {out}: {which} of {source}"
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} is a file; name a directory to write to, or a .safetensors file")
    record = meta.get("model") or {}
    if record.get("library") == "transformers":
        write_pretrained(record, tensors, out)
        return f"wrote {out}: {which} of {source} as a {record['class']} for from_pretrained"
    write_file(tensors, out / "model.safetensors", settings)
    (out / RECORD_FILE).write_text(json.dumps({
        "class": record.get("class"), "config": record.get("config"), "settings": settings,
        "checkpoint": str(source), "step": meta["state"]["step"], "weights": "ema" if ema else "trained",
    }, indent=2, sort_keys=True) + "\n")
    return f"wrote {out}: {which} of {source} (model.safetensors) and the model's settings ({RECORD_FILE})"


def checkpoint_weights(source: Path, meta: dict[str, Any], ema: bool = False) -> dict[str, torch.Tensor]:
    """The checkpoint's model tensors, whole (FSDP shards joined), with plain names; the EMA's with `ema`."""
    from acctrain import checkpoint
    from acctrain.checkpoint import sharded

    if sharded.is_sharded_checkpoint(source):
        tensors = sharded.full_state(source)  # offline: no process group
    else:
        tensors = checkpoint.read_tensors(source / "model.safetensors")
    if ema:
        tensors = with_ema(tensors, ema_state(source, meta), source)
    return plain_names(tensors)


def ema_state(source: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """The state of the checkpoint's EMA callback, its tensors loaded."""
    from acctrain.checkpoint.checkpointer import callbacks_with_tensors

    states = [cb["state"] for cb in callbacks_with_tensors(meta, source)["callbacks"] if cb["class"] == "EMA"]
    states = [state for state in states if state["weights"] is not None]  # saved before the average started
    if len(states) != 1:
        found = "no EMA state" if not states else f"{len(states)} EMA states"
        raise ExportError(f"{source} holds {found}; --ema exports the average of one EMA (train with ema_decay=0.999 "
                          "or the acctrain.ema.EMA callback), or export without --ema")
    return states[0]


def with_ema(tensors: dict[str, torch.Tensor], state: dict[str, Any], source: Path) -> dict[str, torch.Tensor]:
    """`tensors` with the EMA's averages (cast to each tensor's dtype), buffers, and the tied names of both."""
    out = dict(tensors)
    for kind in ("weights", "buffers"):
        for name, value in state[kind].items():
            if name not in tensors:
                raise ExportError(f"{source}: the EMA holds {name!r}, which the model's weights do not (damaged "
                                  f"or edited checkpoint); export without --ema")
            out[name] = value.to(tensors[name].dtype)
    for alias, name in state.get("aliases", {}).items():
        if alias in out:
            out[alias] = out[name].clone()  # safetensors stores no shared memory; from_pretrained ties them again
    return out


def plain_names(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Names without torch.compile's `_orig_mod.` parts (a compiled model or submodule)."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        plain = private_apis.uncompiled_name(name)
        if plain in out:
            raise ExportError(f"two tensors are named {plain!r} once `_orig_mod.` is removed")
        out[plain] = tensor
    return out


def write_file(tensors: dict[str, torch.Tensor], out: Path, settings: dict[str, Any]) -> None:
    """One safetensors file; its metadata holds the job's settings as JSON under "acctrain.settings"."""
    from safetensors.torch import save_file

    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out),
              metadata={"format": "pt", "acctrain.settings": json.dumps(settings, sort_keys=True)})


def write_pretrained(record: dict[str, Any], tensors: dict[str, torch.Tensor], out: Path) -> None:
    """What the recorded Transformers model's `save_pretrained` writes, with `tensors` as its weights."""
    try:
        import transformers
    except ImportError as err:
        raise ExportError(f"the checkpoint holds a Transformers model ({record['class']}); writing a directory "
                          f"that from_pretrained loads needs transformers ({err}): pip install transformers, or "
                          "export the weights alone to OUT.safetensors") from None
    cls = getattr(transformers, record["class"], None)
    if cls is None or not hasattr(cls, "config_class"):
        raise ExportError(f"transformers {transformers.__version__} has no model class {record['class']!r}; export "
                          "with the transformers version the model was trained with, or to OUT.safetensors")
    config = cls.config_class.from_dict(record["config"])
    with torch.device("meta"):  # no memory and no initialisation: every tensor is assigned below
        model = cls(config)
    expected = set(model.state_dict())
    if expected != set(tensors):
        raise ExportError(f"the checkpoint's tensors do not fit a {record['class']} of its recorded config: missing "
                          f"{sorted(expected - set(tensors))}, unexpected {sorted(set(tensors) - expected)}")
    model.load_state_dict(tensors, strict=True, assign=True)
    model.tie_weights()  # tied weights share one tensor again, so save_pretrained drops the duplicates
    model.save_pretrained(str(out))
