"""Checkpoint directories: `{output_dir}/checkpoints/step-{N:08d}/`, crash-safe, verified, never pickled.

    stage = staging_dir(output_dir, step)          # every rank writes its files here
    digests = write_files({stage / "model.safetensors": state_dict, stage / "trainer_state.json": {...}})
    final = commit(stage, digests)                 # main process: manifest, fsync, rename, `latest`
    rotate(output_dir, keep_last=2, newest=final)  # only after the new one is complete
    path, skipped = find_resumable(output_dir)     # the checkpoint `latest` names, or the newest that verifies

A checkpoint is built in `step-N.tmp` beside its final place. `commit` writes `manifest.json` (the format
version and every file's size and sha256), fsyncs every file and the directory, renames it to `step-N`,
then replaces `checkpoints/latest` (a text file naming the newest complete checkpoint) atomically. A
process killed at any instant leaves the previous checkpoint intact: a half-written one is still `*.tmp`,
and only complete directories are ever named `step-N`. Whatever already holds the name `step-N` (a
damaged checkpoint, a stray file, one of a trajectory that was rolled back) is renamed to
`step-N.discard` before the new one takes its place, and deleted after; rotation deletes the same way.
A kill leaves at worst a `*.discard`, which nothing reads, and the next save removes it with stale `*.tmp`.

`verify` checks the manifest's shape, that it lists the files a checkpoint needs (REQUIRED), and every
file's size and sha256. Files are safetensors and JSON only; loading reads them with `safetensors` and
`json`, so nothing in a checkpoint can run code.

Format versions (`manifest.json`'s `format_version`): 1 is every checkpoint written before versioning
(no `format_version`); 2 adds `callbacks.safetensors` (tensors of callbacks' state) and, in
`trainer_state.json`, `optimizer` (its class and param-group shapes) and `versions`. Both load.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import os
import re
import shutil
import struct
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

LATEST = "latest"
MANIFEST = "manifest.json"
DISCARD = ".discard"
"""Suffix of a checkpoint being deleted or replaced: renamed first, so a kill never leaves half of one as `step-N`."""
STEP_DIR = re.compile(r"^step-(\d{8,})$")
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
REQUIRED = {  # the files (fnmatch patterns) each kind of checkpoint must list; sharded: acctrain.sharded's layout
    "full": ("model.safetensors", "optimizer.safetensors", "optimizer.json", "trainer_state.json"),
    "sharded": ("sharded.json", "model/*.safetensors", "optim/*.safetensors", "trainer_state.json"),
}
_SAFETENSORS_DTYPE = {  # the format's names (safetensors' README)
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2", torch.float8_e4m3fnuz: "F8_E4M3FNUZ",
    torch.float8_e5m2fnuz: "F8_E5M2FNUZ", torch.complex64: "C64", torch.bool: "BOOL",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint64: "U64", torch.uint32: "U32", torch.uint16: "U16", torch.uint8: "U8",
}


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, corrupted, or does not fit the model or the run."""


def checkpoints_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def checkpoint_dir(output_dir: str | Path, step: int) -> Path:
    return checkpoints_root(output_dir) / f"step-{step:08d}"


def staging_dir(output_dir: str | Path, step: int) -> Path:
    """Where checkpoint `step` is assembled before `commit` renames it into place."""
    return checkpoint_dir(output_dir, step).with_name(f"step-{step:08d}.tmp")


def prepare_staging(stage: Path) -> None:
    """Main process, before any rank writes: an empty staging directory; what crashes left is removed (after a
    commit that a kill interrupted is finished: `recover`)."""
    recover(stage.parent)
    for stale in [*stage.parent.glob("step-*.tmp"), *stage.parent.glob(f"step-*{DISCARD}")]:
        with contextlib.suppress(OSError):  # garbage: failing to remove it must not stop this save
            _remove(stale)
    stage.mkdir(parents=True)


# ------------------------------------------------------------------------------------------- writing


def write_files(files: dict[Path, Any]) -> dict[Path, str]:
    """Write files durably (content, then fsync) and return each one's sha256, for `commit`'s manifest.

    `*.safetensors` files take a dict of tensors (written as contiguous CPU tensors), anything else JSON
    (or its bytes, from `encode_json`). The sha256 is computed from the bytes in memory, in other threads
    while the files are written and fsync'd (hashlib releases the GIL), so `commit` need not read them
    back: reading 1.6 GB back to hash it cost as much as writing it. Plain threads, not an executor: an
    async save's writer may still be running at interpreter exit, when executors refuse new work.
    """
    encoded = {path: _encode(path, content) for path, content in files.items()}
    largest_first = sorted(encoded, key=lambda p: -sum(memoryview(b).nbytes for b in encoded[p]))
    digests = {path: _Task(_sha256, encoded[path]) for path in largest_first}
    synced = []
    for path in largest_first:
        with open(path, "wb") as f:
            for chunk in encoded[path]:
                f.write(chunk)
        synced.append(_Task(_fsync_file, path))  # the disk's wait overlaps the next file's write
        _slow_save_hook()
    for task in synced:
        task.result()
    return {path: task.result() for path, task in digests.items()}


def encode_json(obj: Any) -> bytes:
    return json.dumps(obj, indent=1, sort_keys=True, allow_nan=True).encode()


def _encode(path: Path, content: Any) -> list:
    """A file's bytes, in order, as buffers: safetensors' header, then each tensor's memory (no copy)."""
    if path.suffix != ".safetensors":
        return [content if isinstance(content, bytes) else encode_json(content)]
    tensors, header, offset = [], {"__metadata__": {"format": "pt"}}, 0
    # Wider elements first: every tensor then starts at a multiple of its element size, as in save_file.
    # Each tensor's own bytes are written, so tensors that share memory (tied weights) need no care here.
    for name, tensor in sorted(content.items(), key=lambda item: -item[1].element_size()):
        tensor = tensor.detach().to("cpu").contiguous()
        size = tensor.numel() * tensor.element_size()
        if tensor.dtype not in _SAFETENSORS_DTYPE:
            raise CheckpointError(f"{path.name}: {name} has dtype {tensor.dtype}, which safetensors cannot store")
        header[name] = {"dtype": _SAFETENSORS_DTYPE[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
        tensors.append(tensor)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the format pads the header with spaces to 8-byte alignment
    return [struct.pack("<Q", len(head)) + head] + [t.reshape(-1).view(torch.uint8).numpy() for t in tensors if t.numel()]


class _Task(threading.Thread):
    """`fn(*args)` in a thread, started at once; `result()` joins it and returns its value or raises its error."""

    def __init__(self, fn, *args):
        super().__init__(name="acctrain-write")
        self.fn, self.args, self.value, self.error = fn, args, None, None
        self.start()

    def run(self) -> None:
        try:
            self.value = self.fn(*self.args)
        except BaseException as err:  # re-raised by result(), in the calling thread
            self.error = err

    def result(self):
        self.join()
        if self.error is not None:
            raise self.error
        return self.value


def _sha256(chunks: list) -> str:
    digest = hashlib.sha256()
    for chunk in chunks:
        digest.update(chunk)
    return digest.hexdigest()


def write_json(path: Path, obj: Any) -> None:
    path.write_bytes(encode_json(obj))
    _slow_save_hook()


def commit(stage: Path, digests: dict[Path, str] | None = None) -> Path:
    """Main process, after every rank has written: manifest, fsync, rename into place, update `latest`.

    `digests` are the sha256 of files that `write_files` wrote (and fsync'd) in this process; the other
    ranks' files are read back to hash them.
    """
    final = stage.with_name(stage.name.removesuffix(".tmp"))
    known = {Path(p): d for p, d in (digests or {}).items()}
    manifest = {}
    for path in sorted(p for p in stage.rglob("*") if p.is_file()):
        digest = known.get(path)
        if digest is None:
            digest = _file_sha256(path)
            _fsync_file(path)
        manifest[str(path.relative_to(stage))] = {"size": path.stat().st_size, "sha256": digest}
    write_json(stage / MANIFEST, {"format_version": FORMAT_VERSION, "files": manifest})
    _fsync_file(stage / MANIFEST)
    _fsync_dir(stage)
    # Whatever holds the name (damaged, stray, another trajectory's: the caller decided to replace it) is
    # renamed aside, never deleted first: a kill in between leaves the previous checkpoint and this one whole.
    replaced = _move_aside(final) if final.exists() or final.is_symlink() else None
    _slow_save_hook()  # tests kill the process here
    os.replace(stage, final)
    _fsync_dir(final.parent)
    _write_atomic(final.parent / LATEST, final.name + "\n")
    if replaced is not None:
        _remove(replaced)
    return final


def rotate(output_dir: str | Path, keep_last: int, keep_best: str = "", mode: str = "min",
           newest: Path | None = None) -> list[Path]:
    """Delete complete checkpoints beyond the newest `keep_last` (0 keeps all) and the best by `keep_best`.

    Called only after a new checkpoint (`newest`) is complete, so it is never at risk. Checkpoints numbered
    after `newest` belong to a trajectory this run rolled back (resume=PATH): they are neither counted nor
    deleted here; this run replaces each when it saves that step. Each one deleted is renamed to
    `step-N.discard` first. Returns the deleted.
    """
    if keep_last <= 0:
        return []
    complete = sorted(_step_dirs(output_dir), key=_step_of, reverse=True)
    if newest is not None:
        complete = [p for p in complete if _step_of(p) <= _step_of(newest)]
    keep = set(complete[:keep_last])
    if keep_best and newest is not None:  # a misspelt metric would protect nothing: delete nothing
        saved = _metrics(newest)
        if any(k.startswith("eval/") for k in saved) and keep_best not in saved:
            print(f"warning: keep_best={keep_best!r} is none of {newest.name}'s metrics {sorted(saved)}: no "
                  "checkpoint is deleted (the Engine refuses this keep_best after the evaluation)")
            return []
    if keep_best:
        scored = [(m, p) for p in complete if (m := _metric(p, keep_best)) is not None]
        if scored:
            keep.add((min if mode == "min" else max)(scored, key=lambda mp: mp[0])[1])
    deleted = [p for p in complete if p not in keep]
    for path in deleted:
        _remove(_move_aside(path))
    return deleted


# ------------------------------------------------------------------------------------------- reading


def verify(path: Path) -> None:
    """Raise CheckpointError naming the first file that is missing, truncated or altered, or a bad manifest.

    The manifest first (its shape, and the files a checkpoint needs), then sizes (cheap), then every file's
    sha256: the files are hashed in parallel threads, largest first, since one sha256 stream runs at about
    1.6 GB/s on a core and hashlib releases the GIL.
    """
    files = read_manifest(path)["files"]
    for name, expected in files.items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{file}: missing (listed in the manifest)")
        if file.stat().st_size != expected["size"]:
            raise CheckpointError(f"{file}: {file.stat().st_size} bytes, the manifest says {expected['size']} (truncated?)")
    largest_first = sorted(files, key=lambda name: -files[name]["size"])
    with ThreadPoolExecutor(max_workers=min(len(files), os.cpu_count() or 1) or 1) as pool:
        digests = dict(zip(largest_first, pool.map(_file_sha256, [path / name for name in largest_first])))
    for name, expected in files.items():
        if digests[name] != expected["sha256"]:
            raise CheckpointError(f"{path / name}: sha256 differs from the manifest (corrupted)")


def read_manifest(path: Path) -> dict:
    """`manifest.json` of checkpoint `path`, checked: {"files": {relative name: {"size", "sha256"}}}, listing
    every file that REQUIRED names for its kind (sharded when it lists sharded.json)."""
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"{path}: no {MANIFEST}, so the checkpoint is incomplete")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{manifest_path}: unreadable manifest ({err})") from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict):
        raise CheckpointError(f"{manifest_path}: malformed manifest, expected an object with 'files': "
                              f"{{name: {{'size', 'sha256'}}}}, got {str(manifest)[:80]}")
    for name, entry in files.items():
        size, sha256 = (entry.get("size"), entry.get("sha256")) if isinstance(entry, dict) else (None, None)
        if type(size) is not int or size < 0 or not (isinstance(sha256, str) and re.fullmatch("[0-9a-f]{64}", sha256)):
            raise CheckpointError(f"{manifest_path}: malformed entry {name!r}: {entry!r} (expected a size in bytes "
                                  "and a sha256 in hex)")
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise CheckpointError(f"{manifest_path}: entry {name!r} lies outside the checkpoint")
    version = manifest.get("format_version", 1)
    if type(version) is not int or version < 1:  # a newer acctrain's (an int above ours) is refused on load
        raise CheckpointError(f"{manifest_path}: malformed format_version {version!r} (an edited or damaged manifest)")
    kind = "sharded" if "sharded.json" in files else "full"
    missing = [p for p in REQUIRED[kind] if not any(fnmatch.fnmatchcase(name, p) for name in files)]
    if missing:
        raise CheckpointError(f"{manifest_path}: lists no {', '.join(missing)}, which a {kind} checkpoint "
                              "needs, so it is incomplete")
    return manifest


def _file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def recover(root: Path) -> Path | None:
    """Finish a commit that a kill interrupted between moving the old `step-N` aside and renaming the new one
    in: a staged `step-N.tmp` holding its manifest (written last, after every file) whose `step-N` is missing
    is renamed into place and named in `latest`, and what it replaced removed. Returns it, if any. (A lone `step-N.discard` is a deletion
    in progress, never brought back.)"""
    for stage in sorted(Path(root).glob("step-*.tmp")):
        final = stage.with_name(stage.name.removesuffix(".tmp"))
        if (stage / MANIFEST).is_file() and not (final.exists() or final.is_symlink()):
            os.replace(stage, final)
            _fsync_dir(root)
            _write_atomic(Path(root) / LATEST, final.name + "\n")
            with contextlib.suppress(OSError):  # what the commit replaced, as it would have removed it
                _remove(final.with_name(final.name + DISCARD))
            return final
    return None


def find_resumable(output_dir: str | Path) -> tuple[Path | None, list[str]]:
    """The checkpoint `latest` names if it verifies, else the newest that does; a warning for each skipped.
    A commit that a kill interrupted is finished first (`recover`).

    `latest` first: after a roll-back (resume=PATH) it names the new trajectory's newest checkpoint, while
    the rolled-back run's higher-numbered ones may still exist (until this trajectory replaces them).
    """
    warnings = []
    if checkpoints_root(output_dir).is_dir():
        recover(checkpoints_root(output_dir))
    named = latest_checkpoint(output_dir)
    candidates = sorted(_step_dirs(output_dir), key=_step_of, reverse=True)
    if named in candidates:
        candidates = [named] + [p for p in candidates if p != named]
    for path in candidates:
        try:
            verify(path)
            return path, warnings
        except CheckpointError as err:
            warnings.append(f"skipping checkpoint {path.name}: {err}")
    return None, warnings


def has_checkpoints(output_dir: str | Path) -> bool:
    return any(_step_dirs(output_dir))


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The checkpoint `latest` names, or None when there is none yet."""
    pointer = checkpoints_root(output_dir) / LATEST
    return pointer.parent / pointer.read_text().strip() if pointer.is_file() else None


def format_version(path: Path) -> Any:
    """The checkpoint's format version: 1 when its manifest has none (written before versioning)."""
    return read_json(path / MANIFEST).get("format_version", 1)


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path)


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


# ------------------------------------------------------------------------------------------- helpers


def _step_dirs(output_dir: str | Path) -> list[Path]:
    root = checkpoints_root(output_dir)
    return [p for p in root.iterdir() if p.is_dir() and STEP_DIR.match(p.name)] if root.is_dir() else []


def _step_of(path: Path) -> int:
    return int(STEP_DIR.match(path.name).group(1))


def _metric(path: Path, name: str) -> float | None:
    return _metrics(path).get(name)


def _metrics(path: Path) -> dict[str, float]:
    try:
        return dict(read_json(path / "trainer_state.json")["metrics"])
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def _move_aside(path: Path) -> Path:
    """Rename `path` (a checkpoint or a stray file) to `{path}.discard`, which nothing selects; returns that."""
    aside = path.with_name(path.name + DISCARD)
    _remove(aside)  # left by an earlier kill
    os.replace(path, aside)
    _fsync_dir(path.parent)
    return aside


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _slow_save_hook() -> None:
    """Tests slow a save down (ACCTRAIN_TEST_SLOW_SAVE=seconds per file) to kill a process mid-save."""
    delay = float(os.environ.get("ACCTRAIN_TEST_SLOW_SAVE", "0") or 0)
    if delay:
        import time

        time.sleep(delay)


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
