"""The format of a checkpoint's files: its version, the files it must hold, and its safetensors headers.

    manifest = read_manifest(path)        # manifest.json, its shape checked (acctrain.checkpoint verifies digests)
    check_contents(path, manifest)        # the version, every rank's RNG files, what trainer_state.json declares,
                                          # each safetensors header (names, dtypes, shapes, offsets)

Format versions (`manifest.json`'s `format_version`): 1 is every checkpoint written before versioning (no
`format_version`); 2 adds `callbacks.safetensors` (tensors of callbacks' state) and, in `trainer_state.json`,
`optimizer` (its class and param-group shapes) and `versions`; 3 adds the manifest's `hash` and digests by HASH
instead of sha256. All three load. `trainer_state.json`'s `contents` (the files, the tensors of each, the state
parts it holds; written since format 3's later saves) is checked when present.
"""

from __future__ import annotations

import fnmatch
import json
import math
import re
import struct
from pathlib import Path
from typing import Any

import torch

from acctrain.errors import CheckpointError
from acctrain.version import __version__

MANIFEST = "manifest.json"
FORMAT_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)
HASH = "xxh3_128_64mib"
"""The digest a manifest records (format 3): XXH3-128 (the `xxhash` package's canonical, big-endian 16 bytes)
of the concatenated XXH3-128 digests of the file's consecutive 64 MiB chunks (the last one shorter; an empty
file has none), in hex. Chunks let `verify` hash one large file on every core; XXH3 runs at memory bandwidth
(29 GB/s on a core of the benchmark machine, sha256 1.7 GB/s, BLAKE3 4.5: BENCHMARKS.md). It detects damage
(a flipped bit, a truncation, a file of another save), not tampering: it is no cryptographic hash."""
LEGACY_HASH = "sha256"
"""The digest of formats 1 and 2, whose manifests name no `hash`: sha256 of the whole file."""
DIGEST_HEX = {HASH: 32, LEGACY_HASH: 64}
"""The algorithms `verify` knows, and their digests' length in hex."""
REQUIRED = {  # the files (fnmatch patterns) each kind of checkpoint must list; sharded: acctrain.checkpoint.sharded's layout
    "full": ("model.safetensors", "optimizer.safetensors", "optimizer.json", "trainer_state.json"),
    "sharded": ("sharded.json", "model/*.safetensors", "optim/*.safetensors", "trainer_state.json"),
}
SAFETENSORS_DTYPE = {  # the format's names (safetensors' README)
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2", torch.float8_e4m3fnuz: "F8_E4M3FNUZ",
    torch.float8_e5m2fnuz: "F8_E5M2FNUZ", torch.complex64: "C64", torch.bool: "BOOL",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint64: "U64", torch.uint32: "U32", torch.uint16: "U16", torch.uint8: "U8",
}

DTYPE_BYTES = {name: dtype.itemsize for dtype, name in SAFETENSORS_DTYPE.items()}


def check_contents(path: Path, manifest: dict) -> None:
    """Raise CheckpointError unless the checkpoint holds what its own trainer_state.json says it must, and every
    safetensors file is well formed: a format version this acctrain reads; every rank's RNG files (the run's
    world size); the files and state the writer declared (`contents`: callbacks' tensors, scaler, a stream's
    position); and each tensor's name, dtype and shape as declared, in a header whose offsets tile its data.
    What the checkpoint must fit in this run (the model's keys, shapes, dtypes) is checked on load."""
    files = manifest["files"]
    check_version(path, manifest)
    try:
        state = _read_json(path / "trainer_state.json")
        world = int(state["plan"].get("world_size", 1))
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise CheckpointError(f"{path / 'trainer_state.json'}: unreadable ({type(err).__name__}: {err})") from None
    contents = state.get("contents") or {}
    needed = [f"rng-rank{r}.{ext}" for r in range(world) for ext in ("safetensors", "json")]
    needed += [name for name in contents.get("files", []) if name not in needed]
    missing = [name for name in needed if name not in files]
    if missing:
        raise CheckpointError(f"{path}: no {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''} "
                              f"({len(missing)} of the files its trainer_state.json says it holds), so it is incomplete")
    empty = [key for key in contents.get("state", []) if state.get(key) is None]
    if empty:
        raise CheckpointError(f"{path / 'trainer_state.json'}: holds no {', '.join(empty)}, which it says it holds")
    declared = contents.get("tensors", {})
    for name in sorted(files):
        if name.endswith(".safetensors"):
            found = tensor_index(path / name)
            if name in declared:
                _compare_index(path / name, found, declared[name])


def check_version(path: Path, manifest: dict) -> None:
    """Refuse a format version this acctrain does not read, naming it, who wrote it, and what to do."""
    version, readable = manifest.get("format_version", 1), READABLE_VERSIONS
    if version in readable:
        return
    try:
        writer = _read_json(path / "trainer_state.json").get("versions", {}).get("acctrain")
    except (OSError, ValueError, AttributeError):
        writer = None
    if writer and _version_key(writer) > _version_key(__version__):
        hint = f"acctrain {writer} wrote it: upgrade acctrain to {writer} or later to resume it"
    else:
        hint = (f"its trainer_state.json says acctrain {writer or '(unknown)'} wrote it, which writes format "
                f"{FORMAT_VERSION} at most: the manifest was edited or damaged")
    raise CheckpointError(f"{path}: checkpoint format version {version}; this acctrain ({__version__}) reads "
                          f"versions {min(readable)} to {max(readable)}; {hint}")


def _version_key(version: str) -> tuple:
    return tuple(int(part) if part.isdigit() else 0 for part in re.split(r"[.+-]", str(version))[:3])


def tensor_index(path: Path) -> dict[str, tuple[str, list[int]]]:
    """A safetensors file's tensors as {name: (dtype, shape)}, from its header, checked: valid JSON, known dtypes,
    and offsets that tile the data after the header exactly (each tensor's bytes its dtype x shape); a
    CheckpointError names the file and the tensor otherwise. Reads the header only."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        length = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if not 0 < length <= size - 8 or length > 100 << 20:
            raise CheckpointError(f"{path}: not a safetensors file (its header length {length} does not fit its "
                                  f"{size} bytes)")
        try:
            header = json.loads(f.read(length))
        except (ValueError, UnicodeDecodeError) as err:
            raise CheckpointError(f"{path}: unreadable safetensors header ({err})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: malformed safetensors header (not an object)")
    header.pop("__metadata__", None)
    index, spans = {}, []
    for name, entry in header.items():
        try:
            dtype, shape, (start, stop) = entry["dtype"], entry["shape"], entry["data_offsets"]
            width = DTYPE_BYTES[dtype]
            if not all(type(d) is int and d >= 0 for d in shape) or not (type(start) is type(stop) is int):
                raise ValueError
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: tensor {name!r} has a malformed header entry {entry!r}") from None
        if stop - start != math.prod(shape) * width:
            raise CheckpointError(f"{path}: tensor {name!r} is {dtype} of shape {shape} ({math.prod(shape) * width} "
                                  f"bytes) but its data_offsets {[start, stop]} span {stop - start}")
        index[name] = (dtype, list(shape))
        spans.append((start, stop, name))
    end = 0
    for start, stop, name in sorted(spans):
        if start != end:
            raise CheckpointError(f"{path}: tensor {name!r} starts at byte {start} of the data, expected {end} "
                                  "(overlapping or missing bytes)")
        end = stop
    if end != size - 8 - length:
        raise CheckpointError(f"{path}: its tensors hold {end} bytes of data, the file {size - 8 - length}")
    return index


def _compare_index(path: Path, found: dict, declared: dict) -> None:
    """The tensors of a file against those trainer_state.json declares for it: names, dtypes, shapes."""
    missing, unexpected = sorted(set(declared) - set(found)), sorted(set(found) - set(declared))
    if missing or unexpected:
        raise CheckpointError(f"{path}: tensors {missing or unexpected} are {'missing' if missing else 'unexpected'} "
                              "(trainer_state.json lists the tensors it was written with)")
    for name, (dtype, shape) in declared.items():
        if tuple(found[name]) != (dtype, list(shape)):
            raise CheckpointError(f"{path}: tensor {name!r} is {found[name][0]} of shape {found[name][1]}, "
                                  f"trainer_state.json says {dtype} of shape {list(shape)}")


def describe_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, list]:
    """{name: [dtype, shape]} as safetensors names them: what `check_contents` compares a file's header with."""
    return {name: [SAFETENSORS_DTYPE.get(t.dtype, str(t.dtype)), list(t.shape)] for name, t in tensors.items()}


def manifest_hash(manifest: dict) -> str:
    """The hash algorithm of a manifest: its `hash`, or sha256 for formats 1 and 2, which name none."""
    return manifest.get("hash", LEGACY_HASH)


def read_manifest(path: Path) -> dict:
    """`manifest.json` of checkpoint `path`, checked: {"hash": algorithm, "files": {relative name: {"size",
    algorithm: digest}}}, the algorithm one `verify` knows (DIGEST_HEX), listing every file that REQUIRED names
    for its kind (sharded when it lists sharded.json)."""
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
                              f"{{name: {{'size', {HASH!r}}}}}, got {str(manifest)[:80]}")
    algorithm = manifest_hash(manifest)
    if not isinstance(algorithm, str) or algorithm not in DIGEST_HEX:
        raise CheckpointError(f"{manifest_path}: unknown hash algorithm {algorithm!r}; this acctrain verifies "
                              f"{' and '.join(DIGEST_HEX)} (a newer acctrain's checkpoint, or a damaged manifest)")
    for name, entry in files.items():
        size, digest = (entry.get("size"), entry.get(algorithm)) if isinstance(entry, dict) else (None, None)
        if type(size) is not int or size < 0 or not (isinstance(digest, str) and
                                                     re.fullmatch(f"[0-9a-f]{{{DIGEST_HEX[algorithm]}}}", digest)):
            raise CheckpointError(f"{manifest_path}: malformed entry {name!r}: {entry!r} (expected a size in bytes "
                                  f"and a {algorithm} digest in hex)")
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


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text())
