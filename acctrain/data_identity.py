"""Which data a run trains on, recorded in every checkpoint, so that a resume onto other data is refused.

    now = identify(train_data, known=saved)      # plain JSON; `known`: the checkpoint's, to skip re-hashing
    diff = differences(saved, now)               # ["token file 0 (corpus.bin): xxh3_128_64mib 3f.. -> 9a.."]

What identifies a dataset, from the strongest to the weakest:

- `TokenWindows` (acctrain.token_data): every token file's size and content digest (acctrain.checkpoint's
  HASH, XXH3-128 over 64 MiB chunks on every core, at memory bandwidth), the context length and the windows
  it serves. The digest is the one `acctrain tokenize` wrote into the file's sidecar, or the checkpoint's,
  while the file keeps the size and modification time they were taken at; otherwise it is computed (once per
  process and file). A corpus re-tokenized in place, even to the same length, has another digest.
- A Hugging Face `datasets.Dataset`: its fingerprint, which `datasets` derives from its source files and
  every transform applied to them.
- Any dataset with a `fingerprint` attribute (a string, or a method returning one): that string. Give your
  own dataset one to have its content checked.
- Any other map-style dataset: its class and length only. A change of content at the same length is not
  seen; a change of length changes the run plan, which is refused on its own.
- A stream (IterableDataset): its class; its position is the stream's own state, restored on resume.

Paths are recorded for the message but not compared: a corpus moved or copied to another cluster is the same
data.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from acctrain import checkpoint, private_apis
from acctrain.data import is_stream
from acctrain.hf_data import is_hf_dataset
from acctrain.token_data import TokenWindows, sidecar

_digests: dict[tuple[str, int, int], str] = {}
"""Digests computed in this process, by (path, size, mtime_ns): each file is hashed at most once."""


def identify(dataset: Any, known: dict | None = None) -> dict[str, Any]:
    """The identity of `dataset` as plain JSON (see the module's docstring); `known` is an identity recorded
    earlier (a checkpoint's), whose digests are reused for files of the same path, size and mtime."""
    if isinstance(dataset, TokenWindows):
        recorded = {f.get("path"): f for f in (known or {}).get("files", [])}
        files = []
        for path in dataset.paths:
            stat = path.stat()
            entry = {"path": str(path), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}
            entry[checkpoint.HASH] = _digest(path, stat, recorded.get(str(path)), sidecar(path))
            files.append(entry)
        return {"kind": "token files", "files": files, "context_len": dataset.context_len,
                "windows": list(dataset.range)}
    fingerprint = private_apis.hf_fingerprint(dataset) if is_hf_dataset(dataset) else getattr(dataset, "fingerprint", None)
    fingerprint = fingerprint() if callable(fingerprint) else fingerprint
    if isinstance(fingerprint, str):
        return {"kind": "fingerprint", "class": type(dataset).__name__, "fingerprint": fingerprint}
    if is_stream(dataset):
        return {"kind": "stream", "class": type(dataset).__name__}
    return {"kind": "length", "class": type(dataset).__name__, "length": len(dataset)}


def differences(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """What differs between two identities, one phrase each; [] when they are the same data. Identities of two
    kinds (e.g. a length where a fingerprint was recorded) differ."""
    if saved.get("kind") != now.get("kind"):
        return [f"{_what(saved)} -> {_what(now)}"]
    if saved["kind"] == "token files":
        diff = [f"{key}: {saved.get(key)} -> {now.get(key)}" for key in ("context_len", "windows")
                if saved.get(key) != now.get(key)]
        old, new = saved.get("files", []), now.get("files", [])
        if len(old) != len(new):
            diff.append(f"{len(old)} token files -> {len(new)}: {[f['path'] for f in old]} -> {[f['path'] for f in new]}")
            return diff
        for i, (a, b) in enumerate(zip(old, new)):
            for key in ("bytes", checkpoint.HASH):
                if a.get(key) != b.get(key):
                    diff.append(f"token file {i} ({a.get('path')} -> {b.get('path')}): {key} {a.get(key)} -> {b.get(key)}")
        return diff
    return [f"{key}: {saved.get(key)!r} -> {now.get(key)!r}" for key in sorted(set(saved) | set(now))
            if key != "kind" and saved.get(key) != now.get(key)]


def _digest(path: Path, stat: os.stat_result, recorded: dict | None, side: Path) -> str:
    """A token file's digest: recorded (checkpoint, then sidecar) for this size and mtime, else computed once."""
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    candidates = [recorded or {}]
    if side.is_file():
        try:
            candidates.append(json.loads(side.read_text()).get("digest") or {})
        except ValueError:
            pass
    for entry in candidates:
        if entry.get("bytes") == stat.st_size and entry.get("mtime_ns") == stat.st_mtime_ns and entry.get(checkpoint.HASH):
            _digests.setdefault(key, entry[checkpoint.HASH])
    if key not in _digests:
        _digests[key] = checkpoint.file_digests([path], checkpoint.HASH)[path]
    return _digests[key]


def _what(identity: dict[str, Any]) -> str:
    kind = identity.get("kind")
    if kind == "token files":
        return f"token files {[f.get('path') for f in identity.get('files', [])]}"
    if kind == "fingerprint":
        return f"{identity.get('class')} with fingerprint {identity.get('fingerprint')}"
    if kind == "length":
        return f"a {identity.get('class')} of {identity.get('length')} samples"
    return f"a {identity.get('class')} stream"
