"""Checkpoint directories: `{output_dir}/checkpoints/step-{N:08d}/`, written atomically.

A checkpoint is built in a temporary directory beside its final place, every file fsync'd, then renamed
into place; only then is `checkpoints/latest` (a text file naming the newest complete checkpoint)
replaced, also atomically. A process killed at any instant leaves the previous checkpoint intact.
Model weights are the unwrapped model's state dict in safetensors, under plain parameter names.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

LATEST = "latest"


def checkpoint_dir(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / "checkpoints" / f"step-{step:08d}"


def save_checkpoint(output_dir: str | Path, step: int, model_state: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
    """Write model weights and a JSON of the loop state as checkpoint `step`; return its directory.

    Call on the main process only. An existing checkpoint of the same step is replaced.
    """
    final = checkpoint_dir(output_dir, step)
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(_unshared(model_state), tmp / "model.safetensors", metadata={"format": "pt"})
    (tmp / "trainer_state.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
    for path in tmp.iterdir():
        _fsync_file(path)
    _fsync_dir(tmp)
    if final.exists():  # re-saving a step (e.g. a resumed run ending where it started): swap it out
        old = final.with_name(final.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    _fsync_dir(final.parent)
    _write_atomic(final.parent / LATEST, final.name + "\n")
    return final


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The checkpoint `latest` names, or None when there is none yet."""
    pointer = Path(output_dir) / "checkpoints" / LATEST
    if not pointer.is_file():
        return None
    return pointer.parent / pointer.read_text().strip()


def _unshared(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Tensors safetensors can write: contiguous, on CPU, and tied weights as separate copies."""
    seen: set[int] = set()
    out = {}
    for name, tensor in state.items():
        tensor = tensor.detach().to("cpu").contiguous()
        key = tensor.untyped_storage().data_ptr()
        out[name] = tensor.clone() if key in seen else tensor
        seen.add(key)
    return out


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
