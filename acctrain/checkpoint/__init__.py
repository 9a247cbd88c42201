"""Checkpoint directories: `{output_dir}/checkpoints/step-{N:08d}/`, crash-safe, verified, never pickled.

    stage = staging_dir(output_dir, step)          # every rank writes its files here
    digests = write_files({stage / "model.safetensors": state_dict, stage / "trainer_state.json": {...}})
    final = commit(stage, digests)                 # main process: manifest, fsync, rename, `latest`
    rotate(output_dir, keep_last=2, newest=final)  # only after the new one is complete
    path, skipped = find_resumable(output_dir)     # the checkpoint `latest` names, or the newest that verifies

A checkpoint is built in `step-N.tmp` beside its final place. `commit` writes `manifest.json` (the format
version, the hash algorithm, and every file's size and digest), fsyncs every file and the directory, renames it to `step-N`,
then replaces `checkpoints/latest` (a text file naming the newest complete checkpoint) atomically. A
process killed at any instant leaves the previous checkpoint intact: a half-written one is still `*.tmp`,
and only complete directories are ever named `step-N`. Whatever already holds the name `step-N` (a
damaged checkpoint, a stray file, one of a trajectory that was rolled back) is renamed to
`step-N.discard` before the new one takes its place, and deleted after; rotation deletes the same way.
A kill leaves at worst a `*.discard`, which nothing reads, and the next save removes it with stale `*.tmp`.

`verify` checks the manifest's shape, that it lists the files a checkpoint needs, every file's size and
digest, then what acctrain.checkpoint.format checks: the format version, every rank's RNG files, what
trainer_state.json declares, and each safetensors header. Files are safetensors and JSON only; loading reads
them with `safetensors` and `json`, so nothing in a checkpoint can run code.

Digests (`manifest.json`'s `hash`, and each file's entry under that name): HASH, XXH3-128 over 64 MiB
chunks (see `HASH`), which runs at memory bandwidth, so that verifying costs little beside loading;
checkpoints written before format 3 have no `hash` and a `sha256` per file, and still verify. A manifest
naming another algorithm is refused as unknown (a newer acctrain's, or damaged).
The format versions, the files a checkpoint must hold and the header checks: acctrain.checkpoint.format.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import mmap
import os
import re
import shutil
import struct
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
import xxhash
from safetensors.torch import load_file

from acctrain.errors import CheckpointError
from acctrain.metrics import better
from acctrain.checkpoint.format import (  # noqa: F401  (re-exported: the checkpoint's format, named here too)
    DIGEST_HEX,
    FORMAT_VERSION,
    HASH,
    LEGACY_HASH,
    MANIFEST,
    READABLE_VERSIONS,
    SAFETENSORS_DTYPE,
    check_contents,
    check_version,
    manifest_hash,
    read_manifest,
)

LATEST = "latest"
DISCARD = ".discard"
"""Suffix of a checkpoint being deleted or replaced: renamed first, so a kill never leaves half of one as `step-N`."""
STEP_DIR = re.compile(r"^step-(\d{8,})$")
CHUNK = 64 << 20
"""HASH's chunk: large enough that each one is a long sequential read, small enough to spread a file over cores."""


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
    """Write files durably (content, then fsync) and return each one's digest (HASH), for `commit`'s manifest.

    `*.safetensors` files take a dict of tensors (written as contiguous CPU tensors), anything else JSON
    (or its bytes, from `encode_json`). The digest is computed from the bytes in memory, in other threads
    while the files are written and fsync'd (xxhash releases the GIL), so `commit` need not read them
    back. Plain threads, not an executor: an async save's writer may still be running at interpreter exit,
    when executors refuse new work.
    """
    encoded = {path: _encode(path, content) for path, content in files.items()}
    largest_first = sorted(encoded, key=lambda p: -sum(memoryview(b).nbytes for b in encoded[p]))
    digests = {path: _Task(_digest_buffers, encoded[path]) for path in largest_first}
    synced = []
    for path in largest_first:
        _write_file(path, encoded[path])
        synced.append(_Task(_fsync_file, path))  # the disk's wait overlaps the next file's write
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
        if tensor.dtype not in SAFETENSORS_DTYPE:
            raise CheckpointError(f"{path.name}: {name} has dtype {tensor.dtype}, which safetensors cannot store")
        header[name] = {"dtype": SAFETENSORS_DTYPE[tensor.dtype], "shape": list(tensor.shape),
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


def _digest_buffers(buffers: list) -> str:
    """HASH of the concatenation of `buffers` (a file's bytes in order), cut into CHUNKs across their bounds."""
    chunks, current, filled = [], xxhash.xxh3_128(), 0
    for buffer in buffers:
        view = memoryview(buffer).cast("B")
        while len(view):
            take = min(CHUNK - filled, len(view))
            current.update(view[:take])
            filled, view = filled + take, view[take:]
            if filled == CHUNK:
                chunks.append(current.digest())
                current, filled = xxhash.xxh3_128(), 0
    return _combine(chunks + ([current.digest()] if filled else []))


def _write_file(path: Path, chunks: list) -> None:
    with open(path, "wb") as f:
        for chunk in chunks:
            f.write(chunk)


def _combine(chunk_digests: list[bytes]) -> str:
    """HASH of a file from its chunks' digests, in file order."""
    return xxhash.xxh3_128_hexdigest(b"".join(chunk_digests))


def write_json(path: Path, obj: Any) -> None:
    path.write_bytes(encode_json(obj))


def commit(stage: Path, digests: dict[Path, str] | None = None) -> Path:
    """Main process, after every rank has written: manifest, fsync, rename into place, update `latest`.

    `digests` are the HASH of files that `write_files` wrote (and fsync'd) in this process; the other
    ranks' files are read back to hash them.
    """
    final = stage.with_name(stage.name.removesuffix(".tmp"))
    known = {Path(p): d for p, d in (digests or {}).items()}
    files = sorted(p for p in stage.rglob("*") if p.is_file())
    others = [p for p in files if p not in known]
    known.update(file_digests(others, HASH))
    for path in others:
        _fsync_file(path)
    manifest = {str(path.relative_to(stage)): {"size": path.stat().st_size, HASH: known[path]} for path in files}
    write_json(stage / MANIFEST, {"format_version": FORMAT_VERSION, "hash": HASH, "files": manifest})
    _fsync_file(stage / MANIFEST)
    _fsync_dir(stage)
    # Whatever holds the name (damaged, stray, another trajectory's: the caller decided to replace it) is
    # renamed aside, never deleted first: a kill in between leaves the previous checkpoint and this one whole.
    replaced = _move_aside(final) if final.exists() or final.is_symlink() else None
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
    best = best_checkpoint(output_dir, keep_best, mode, newest) if keep_best else None
    if best is not None:
        keep.add(best)
    deleted = [p for p in complete if p not in keep]
    for path in deleted:
        _remove(_move_aside(path))
    return deleted


def best_checkpoint(output_dir: str | Path, metric: str, mode: str = "min", newest: Path | None = None) -> Path | None:
    """The complete checkpoint with the best finite `metric` of its trainer_state.json (the newest of equals),
    among those numbered up to `newest` (all when None); None when none holds it. What rotation keeps by
    `keep_best`, and what `load_best_at_end` loads."""
    complete = sorted(_step_dirs(output_dir), key=_step_of, reverse=True)
    if newest is not None:
        complete = [p for p in complete if _step_of(p) <= _step_of(newest)]
    best, value = None, None
    for path in complete:  # newest first: an equal value is no improvement, so the newest of equals stays
        m = _metric(path, metric)
        if isinstance(m, (int, float)) and better(m, value, mode):
            best, value = path, m
    return best


# ------------------------------------------------------------------------------------------- reading


def verify(path: Path) -> None:
    """Raise CheckpointError naming the first file that is missing, truncated or altered, or a bad manifest.

    The manifest first (its shape, its hash algorithm, and the files a checkpoint needs), then sizes
    (cheap), then every file's digest by the algorithm the manifest names (`file_digests`: in parallel
    threads, over chunks for HASH).
    """
    manifest = read_manifest(path)
    files, algorithm = manifest["files"], manifest_hash(manifest)
    for name, expected in files.items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{file}: missing (listed in the manifest)")
        if file.stat().st_size != expected["size"]:
            size = file.stat().st_size
            raise CheckpointError(f"{file}: {size} bytes, the manifest says {expected['size']} "
                                  f"({'truncated' if size < expected['size'] else 'grown'}: changed after the save)")
    digests = file_digests([path / name for name in files], algorithm)
    for name, expected in files.items():
        if digests[path / name] != expected[algorithm]:
            raise CheckpointError(f"{path / name}: {algorithm} digest differs from the manifest (corrupted)")
    check_contents(path, manifest)


def file_digests(paths: list[Path], algorithm: str = HASH) -> dict[Path, str]:
    """Each file's digest by `algorithm` (HASH or LEGACY_HASH), hashed in one thread per core.

    HASH: every CHUNK of every file is a task, largest files first, so that one large file spreads over all
    cores; each chunk is memory-mapped (MAP_POPULATE: its pages mapped, or read from disk, in one call) and
    hashed in place, with no copy. sha256 (formats 1 and 2): one task per file. Both release the GIL.
    """
    if algorithm == LEGACY_HASH:
        tasks = [(path, 0, None) for path in sorted(paths, key=lambda p: -p.stat().st_size)]
    else:
        sizes = {path: path.stat().st_size for path in paths}
        tasks = [(path, offset, min(CHUNK, sizes[path] - offset))
                 for path in sorted(paths, key=lambda p: -sizes[p]) for offset in range(0, sizes[path], CHUNK)]
    with ThreadPoolExecutor(max_workers=max(1, min(len(tasks), os.cpu_count() or 1))) as pool:
        done = list(pool.map(lambda task: _hash_part(*task), tasks))
    if algorithm == LEGACY_HASH:
        return {path: digest for (path, _, _), digest in zip(tasks, done)}
    chunks: dict[Path, list[bytes]] = {path: [] for path in paths}
    for (path, _, _), digest in zip(tasks, done):  # tasks are in file order within each file
        chunks[path].append(digest)
    return {path: _combine(chunks[path]) for path in paths}


def _hash_part(path: Path, offset: int, length: int | None) -> Any:
    """sha256 hex of the whole file (length None), else the XXH3-128 digest of `length` bytes at `offset`."""
    with open(path, "rb") as f:
        if length is None:
            return hashlib.file_digest(f, LEGACY_HASH).hexdigest()
        flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
        with mmap.mmap(f.fileno(), length, flags=flags, prot=mmap.PROT_READ, offset=offset) as mapped:
            return xxhash.xxh3_128_digest(mapped)


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
    """The checkpoint to resume: the newest that verifies, of the trajectory `latest` names; a warning for each
    skipped. A commit that a kill interrupted is finished first (`recover`).

    `latest` decides the trajectory: after a roll-back (resume=PATH) it names the new trajectory's newest
    checkpoint, while the rolled-back run's higher-numbered ones may still exist (until this trajectory replaces
    them). A checkpoint numbered after `latest` is taken when it is of the same trajectory (its
    trainer_state.json's `trajectory`): a kill between its commit and the update of `latest` left it complete.
    When `latest`'s does not verify, the newest that does is taken, as before trajectories were recorded.
    """
    warnings = []
    if checkpoints_root(output_dir).is_dir():
        recover(checkpoints_root(output_dir))
    named = latest_checkpoint(output_dir)
    for path in resume_order(output_dir):
        try:
            verify(path)
        except CheckpointError as err:
            warnings.append(f"skipping checkpoint {path.name}: {err}")
            continue
        if named is not None and STEP_DIR.match(named.name) and _step_of(path) > _step_of(named):
            warnings.append(f"{path.name} is complete and newer than {named.name}, which `latest` names (a kill "
                            f"between its commit and the update of `latest`): resuming {path.name}")
        return path, warnings
    return None, warnings


def resume_order(output_dir: str | Path) -> list[Path]:
    """The complete checkpoints in the order resume=auto tries them (the first that verifies is taken): those of
    `latest`'s trajectory numbered after it, newest first, then `latest`'s, then the others, newest first."""
    named = latest_checkpoint(output_dir)
    candidates = sorted(_step_dirs(output_dir), key=_step_of, reverse=True)
    if named not in candidates:
        return candidates
    ours = trajectory(named)
    same = [p for p in candidates if _step_of(p) > _step_of(named) and ours is not None and trajectory(p) == ours]
    return same + [named] + [p for p in candidates if p != named and p not in same]


def trajectory(path: Path) -> str | None:
    """The trajectory a checkpoint belongs to (trainer_state.json's `trajectory`: a run from scratch or a roll-back
    starts one, a resume=auto continues it), or None when unreadable or not recorded."""
    try:
        value = read_json(path / "trainer_state.json").get("trajectory")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None


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
