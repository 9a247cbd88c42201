"""`acctrain verify`: every checkpoint of a run checked as a resume checks it, read-only, with an exit status."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import ROOT
from tests.support.runs import copy_of, rewrite
from tests.test_checkpoint_safety import STEP3, STEP6

pytestmark = pytest.mark.processes  # every test here starts processes


def verify(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "acctrain.cli", "verify", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def listing(out: Path) -> list[str]:
    return sorted(str(p.relative_to(out)) for p in out.rglob("*"))


def test_an_intact_run_lists_each_checkpoint_and_the_one_resume_would_take(six, tmp_path):
    out = copy_of(six, tmp_path)
    proc = verify(out)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == f"{out}: 2 checkpoint(s); `latest` names {STEP6}"
    assert lines[1].startswith(f"  {STEP3}: ok: optimizer step 3, 1 process(es), format 3, written by acctrain ")
    assert lines[2].startswith(f"  {STEP6}: ok: optimizer step 6, 1 process(es), format 3")
    assert lines[3] == f"resume=auto would take {STEP6}"
    assert verify(out / "checkpoints" / STEP3).returncode == 0


def test_a_damaged_newest_checkpoint_is_named_and_fails_the_command(six, tmp_path):
    out = copy_of(six, tmp_path)
    weights = out / "checkpoints" / STEP6 / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one flipped bit
    weights.write_bytes(bytes(data))
    before = listing(out)
    proc = verify(out)
    assert proc.returncode == 1
    assert f"  {STEP6}: DAMAGED: {weights}: xxh3_128_64mib digest differs from the manifest (corrupted)" in proc.stdout
    assert f"resume=auto would take {STEP3}" in proc.stdout
    assert f"damaged: {STEP6}, which resume=auto tries first, fails its checks" in proc.stdout
    named = verify(out / "checkpoints" / STEP6)
    assert named.returncode == 1 and "DAMAGED" in named.stdout
    assert listing(out) == before  # read-only


def test_a_missing_rng_file_and_a_bad_header_are_named(six, tmp_path):
    out = copy_of(six, tmp_path)
    newest = out / "checkpoints" / STEP6
    (newest / "rng-rank0.json").unlink()
    manifest = json.loads((newest / "manifest.json").read_text())
    del manifest["files"]["rng-rank0.json"]
    (newest / "manifest.json").write_text(json.dumps(manifest))
    proc = verify(newest)
    assert proc.returncode == 1 and "no rng-rank0.json" in proc.stdout
    oldest = out / "checkpoints" / STEP3
    head = (oldest / "model.safetensors").read_bytes()
    rewrite(oldest, "model.safetensors", head[:9] + b"#" + head[10:])  # a header that is no JSON
    proc = verify(out)
    assert proc.returncode == 1 and "resume=auto would start afresh: no checkpoint is intact" in proc.stdout
    assert f"{oldest / 'model.safetensors'}: unreadable safetensors header" in proc.stdout


def test_an_interrupted_commit_is_reported_and_left_for_the_resume(six, tmp_path):
    out = copy_of(six, tmp_path)
    final = out / "checkpoints" / STEP6
    final.rename(final.with_name(STEP6 + ".tmp"))  # a kill between moving the old step-6 aside and the rename
    before = listing(out)
    proc = verify(out)
    assert proc.returncode == 0, proc.stdout
    assert f"  {STEP6}.tmp: ok: optimizer step 6" in proc.stdout and "the next resume finishes it" in proc.stdout
    assert f"resume=auto would take {STEP6}.tmp" in proc.stdout and listing(out) == before


def test_a_path_that_is_no_checkpoint_nor_run_exits_2(tmp_path):
    proc = verify(tmp_path)
    assert proc.returncode == 2 and "is neither a checkpoint" in proc.stdout
    assert verify().returncode == 2
    empty = tmp_path / "run" / "checkpoints"
    empty.mkdir(parents=True)
    proc = verify(tmp_path / "run")
    assert proc.returncode == 0 and "resume=auto would start afresh: no checkpoint yet" in proc.stdout
    shutil.rmtree(tmp_path / "run")
