"""Checkpoint digests at memory speed (issue #14, item 3): a manifest names its hash (XXH3-128 over 64 MiB
chunks), every file's digest is checked against an implementation written here from that definition, a flipped
byte anywhere is caught, sha256 manifests of formats 1 and 2 still verify and resume, and an unknown algorithm
is refused by name."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
import xxhash

from acctrain.checkpoint import CHUNK, HASH, CheckpointError, file_digests, find_resumable, verify, write_files
from tests.support.runs import copy_of, reference_digest
from tests.workers import resume_run

STEP3, STEP6 = "step-00000003", "step-00000006"
NAMES = ["model.safetensors", "optimizer.safetensors", "optimizer.json", "trainer_state.json",
         "rng-rank0.safetensors", "rng-rank0.json"]


def manifest_of(ckpt: Path) -> dict:
    return json.loads((ckpt / "manifest.json").read_text())


def test_a_new_checkpoint_names_its_hash_and_verifies(six):
    ckpt = six[0] / "checkpoints" / STEP6
    manifest = manifest_of(ckpt)
    assert manifest["format_version"] == 3 and manifest["hash"] == HASH == "xxh3_128_64mib"
    assert sorted(manifest["files"]) == sorted(NAMES)
    for name, entry in manifest["files"].items():
        data = (ckpt / name).read_bytes()
        assert entry == {"size": len(data), HASH: reference_digest(data)}, name
    verify(ckpt)


@pytest.mark.parametrize("name", NAMES)
def test_a_flipped_byte_in_any_file_is_caught(six, tmp_path, name):
    out = copy_of(six, tmp_path)
    newest = out / "checkpoints" / STEP6
    data = bytearray((newest / name).read_bytes())
    data[len(data) // 2] ^= 0x10
    (newest / name).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"{name}: {HASH} digest differs from the manifest"):
        verify(newest)
    assert find_resumable(out)[0] == out / "checkpoints" / STEP3


def test_a_file_of_several_chunks_is_hashed_by_chunks_and_a_flip_in_any_chunk_is_caught(tmp_path):
    big = torch.arange(CHUNK // 4 * 2 + 1000, dtype=torch.int32)  # a header, two full chunks and a partial one
    path = tmp_path / "big.safetensors"
    written = write_files({path: {"x": big}})[path]
    data = bytearray(path.read_bytes())
    assert len(data) > 2 * CHUNK and written == reference_digest(bytes(data)) == file_digests([path])[path]
    assert written != xxhash.xxh3_128(bytes(data)).hexdigest()  # the chunked form, not XXH3 of the whole file
    for offset in (5, CHUNK + 7, 2 * CHUNK + 11):
        data[offset] ^= 1
        path.write_bytes(bytes(data))
        assert file_digests([path])[path] != written, offset
        data[offset] ^= 1


def old_layout(ckpt: Path, version: int | None) -> dict:
    """Rewrite `ckpt`'s manifest as formats 1 and 2 wrote it: no `hash`, each file's sha256 (read from the file)."""
    manifest = manifest_of(ckpt)
    assert manifest["hash"] == HASH  # written with the new hash: the rewrite below really changes the algorithm
    files = {name: {"size": entry["size"], "sha256": hashlib.sha256((ckpt / name).read_bytes()).hexdigest()}
             for name, entry in manifest["files"].items()}
    old = {"files": files} if version is None else {"format_version": version, "files": files}
    (ckpt / "manifest.json").write_text(json.dumps(old))
    return old


@pytest.mark.parametrize("version", [None, 2])
def test_an_old_sha256_manifest_still_verifies_and_resumes(six, tmp_path, version):
    out = copy_of(six, tmp_path)
    newest = out / "checkpoints" / STEP6
    old_layout(newest, version)
    verify(newest)
    assert find_resumable(out) == (newest, [])
    resumed = resume_run.run(str(out), steps=8)
    assert resumed["resumed_from"] == str(newest) and resumed["steps"] == [7, 8]
    reference = resume_run.run(str(copy_of(six, tmp_path / "new")), steps=8)  # the same resume, from format 3
    assert set(resumed["tensors"]) == set(reference["tensors"])
    for key, tensor in resumed["tensors"].items():
        assert torch.equal(tensor, reference["tensors"][key]), key
    # and a flipped byte is still caught by its sha256
    shutil.rmtree(out)
    out = copy_of(six, tmp_path)
    newest = out / "checkpoints" / STEP6
    old_layout(newest, version)
    data = bytearray((newest / "optimizer.safetensors").read_bytes())
    data[-3] ^= 0x01
    (newest / "optimizer.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="optimizer.safetensors: sha256 digest differs from the manifest"):
        verify(newest)


def test_an_unknown_hash_algorithm_is_refused_naming_it(six, tmp_path):
    out = copy_of(six, tmp_path)
    newest = out / "checkpoints" / STEP6
    manifest = manifest_of(newest)
    files = {name: {"size": e["size"], "blake9": "0" * 64} for name, e in manifest["files"].items()}
    (newest / "manifest.json").write_text(json.dumps({**manifest, "hash": "blake9", "files": files}))
    message = "unknown hash algorithm 'blake9'"
    with pytest.raises(CheckpointError, match=message) as err:
        verify(newest)
    assert str(newest / "manifest.json") in str(err.value) and "xxh3_128_64mib and sha256" in str(err.value)
    path, skipped = find_resumable(out)
    assert path == out / "checkpoints" / STEP3 and len(skipped) == 1 and message in skipped[0]
    with pytest.raises(CheckpointError, match=message):
        resume_run.run(str(out), steps=8, resume=str(newest))
