"""Checkpoints lose nothing silently (issue #13): a bad `step-N` is replaced, crash-safely; rotation renames
before it deletes; malformed manifests, other format versions, optimizers and param groups are named and
refused; a full disk names what failed; callbacks may keep tensors."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from acctrain import Callback, Engine, TrainConfig
from acctrain.checkpoint import FORMAT_VERSION, CheckpointError, find_resumable, verify
from acctrain.errors import Preempted
from tests.support import ROOT, ckpts
from tests.support.runs import assert_bitwise, copy_of, rewrite
from tests.support.slow_save import ENV
from tests.support.tiny import RUN_ON_CPU, VarLenTokens, collate, make_model, token_loss
from tests.workers import resume_run

WORKER = ["-m", "tests.workers.resume_run"]
STEP3, STEP6 = "step-00000003", "step-00000006"


def params(tensors: dict) -> dict:
    """A run's final parameters under their model names (resume_run stores them as `param.<name>`)."""
    return {k.removeprefix("param."): v for k, v in tensors.items() if k.startswith("param.")}


def leftovers(out: Path) -> list[str]:
    """Anything in checkpoints/ but complete checkpoints and the `latest` pointer."""
    return sorted(p.name for p in (out / "checkpoints").iterdir() if p.name != "latest" and p.name not in ckpts(out))


def start_worker(out: Path, env: dict, **options) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *WORKER, json.dumps({"out_dir": str(out), **options})], cwd=ROOT,
                            env=dict(os.environ, **env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def wait_for(proc: subprocess.Popen, condition, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline and proc.poll() is None, proc.stdout.read().decode()[-3000:]
        time.sleep(0.01)


# ------------------------------------------------------------------------- 1. an existing step-N


def test_a_damaged_final_checkpoint_is_replaced_by_the_retrained_one(six, tmp_path):
    out = copy_of(six, tmp_path)
    damaged = out / "checkpoints" / STEP6 / "model.safetensors"
    data = bytearray(damaged.read_bytes())
    data[-3] ^= 0x01
    damaged.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="model.safetensors"):
        again = resume_run.run(str(out), steps=6, save_every=3)
    assert again["resumed_from"].endswith(STEP3) and again["steps"] == [4, 5, 6]
    verify(out / "checkpoints" / STEP6)  # repaired, not skipped because the directory existed
    assert_bitwise(load_file(out / "checkpoints" / STEP6 / "model.safetensors"), params(six[1]["tensors"]))
    assert ckpts(out) == [STEP3, STEP6] and leftovers(out) == []
    assert (out / "checkpoints" / "latest").read_text().strip() == STEP6
    third = resume_run.run(str(out), steps=6, save_every=3)  # nothing is retrained any more
    assert third["resumed_from"].endswith(STEP6) and third["steps"] == []


def test_a_stray_file_named_like_a_checkpoint_is_replaced(six, tmp_path):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / STEP6).write_text("not a checkpoint")
    result = resume_run.run(str(tmp_path), steps=6, save_every=3)
    assert result["resumed_from"] is None
    verify(tmp_path / "checkpoints" / STEP6)
    assert_bitwise(load_file(tmp_path / "checkpoints" / STEP6 / "model.safetensors"), params(six[1]["tensors"]))
    assert ckpts(tmp_path) == [STEP3, STEP6] and leftovers(tmp_path) == []


def test_resumed_at_the_end_nothing_new_is_written(six, tmp_path):
    out = copy_of(six, tmp_path)
    final = out / "checkpoints" / STEP6
    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns, p.read_bytes()) for p in final.iterdir()}
    inode = final.stat().st_ino
    again = resume_run.run(str(out), steps=6, save_every=3)
    assert again["resumed_from"] == str(final) and again["steps"] == []
    assert final.stat().st_ino == inode  # the same directory, not a copy put in its place
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns, p.read_bytes()) for p in final.iterdir()} == before
    assert ckpts(out) == [STEP3, STEP6] and leftovers(out) == []


def test_a_roll_back_with_resume_path_saves_its_new_trajectory(six, tmp_path):
    """Resume from step 3 with another clip value: step 6 of the old trajectory (verified) is replaced."""
    out = copy_of(six, tmp_path)
    other = tmp_path / "other"  # the same roll-back in an empty output_dir: the new trajectory's reference
    shutil.copytree(six[0] / "checkpoints" / STEP3, tmp_path / "given" / STEP3)
    reference = resume_run.run(str(other), steps=6, save_every=3, max_grad_norm=0.05,
                               resume=str(tmp_path / "given" / STEP3))
    rolled = resume_run.run(str(out), steps=6, save_every=3, max_grad_norm=0.05, resume=str(out / "checkpoints" / STEP3))
    assert rolled["steps"] == [4, 5, 6]
    assert_bitwise(params(rolled["tensors"]), params(reference["tensors"]))
    new, old = load_file(out / "checkpoints" / STEP6 / "model.safetensors"), params(six[1]["tensors"])
    assert_bitwise(new, params(reference["tensors"]))
    assert not torch.equal(new["head.weight"], old["head.weight"])  # really another trajectory
    verify(out / "checkpoints" / STEP6)
    assert ckpts(out) == [STEP3, STEP6] and leftovers(out) == []
    resumed = resume_run.run(str(out), steps=6, save_every=3)  # resume=auto continues the new trajectory
    assert resumed["resumed_from"].endswith(STEP6) and resumed["steps"] == []


def test_resume_auto_after_a_roll_back_continues_the_new_trajectory(six, tmp_path):
    """Rolled back to step 3 and ended at 5: the old trajectory's step 6 stays, but resume=auto takes step 5."""
    out = copy_of(six, tmp_path)
    old6 = (out / "checkpoints" / STEP6 / "model.safetensors").read_bytes()
    resume_run.run(str(out), steps=5, resume=str(out / "checkpoints" / STEP3))
    assert ckpts(out) == [STEP3, "step-00000005", STEP6]  # rotation neither counts nor deletes the newer one
    assert (out / "checkpoints" / STEP6 / "model.safetensors").read_bytes() == old6
    assert find_resumable(out) == (out / "checkpoints" / "step-00000005", [])
    again = resume_run.run(str(out), steps=5)
    assert again["resumed_from"].endswith("step-00000005") and again["steps"] == []


@pytest.mark.processes
def test_kill_9_while_replacing_a_checkpoint_moves_the_old_one_aside_first(six, tmp_path):
    out = copy_of(six, tmp_path)
    old = out / "checkpoints" / STEP6
    (old / "optimizer.json").write_text("{}")  # damaged: the next run retrains step 6 and replaces it
    damaged = {p.name: p.read_bytes() for p in old.iterdir()}
    aside = [out / "checkpoints" / (STEP6 + ".discard")]
    proc = start_worker(out, {ENV: "0.2"}, steps=6, save_every=3)
    wait_for(proc, lambda: aside[0].is_dir())  # renamed out of the way, the new one not yet in place
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert {p.name: p.read_bytes() for p in aside[0].iterdir()} == damaged  # moved whole, nothing deleted
    assert ckpts(out) == [STEP3]
    verify(out / "checkpoints" / (STEP6 + ".tmp"))  # the new one, complete, not yet renamed
    assert find_resumable(out) == (old, [])  # the interrupted commit is finished: the new step 6 is put in place
    assert (out / "checkpoints" / "latest").read_text().strip() == STEP6
    assert_bitwise(load_file(old / "model.safetensors"), params(six[1]["tensors"]))
    again = resume_run.run(str(out), steps=6, save_every=3)
    assert again["resumed_from"].endswith(STEP6) and again["steps"] == []
    assert ckpts(out) == [STEP3, STEP6] and leftovers(out) == []


def test_a_kill_while_replacing_a_valid_checkpoint_of_the_same_step_loses_nothing(six, tmp_path):
    """The state a kill leaves when a step is saved twice (SaveBest, then fit's final save): the valid step-6
    moved aside, its complete replacement staged. The next run finishes that commit and resumes step 6."""
    out = copy_of(six, tmp_path)
    root = out / "checkpoints"
    shutil.copytree(root / STEP6, root / (STEP6 + ".tmp"))  # the second save of step 6, staged and complete
    os.replace(root / STEP6, root / (STEP6 + ".discard"))  # commit moved the first one aside, then the kill
    for name in ("latest",):
        assert (root / name).read_text().strip() == STEP6
    again = resume_run.run(str(out), steps=6, save_every=3)
    assert again["resumed_from"].endswith(STEP6) and again["steps"] == []
    assert_bitwise(load_file(root / STEP6 / "model.safetensors"), params(six[1]["tensors"]))
    assert ckpts(out) == [STEP3, STEP6]


# ------------------------------------------------------------------------- 3. rotation


@pytest.mark.processes
def test_kill_9_during_rotation_leaves_no_half_deleted_checkpoint_under_its_name(six, tmp_path):
    """Rotation at step 9 deletes step 3, made slow to delete by 20,000 extra files: killed half-way."""
    out = copy_of(six, tmp_path)
    junk = out / "checkpoints" / STEP3 / "junk"
    for d in range(20):
        (junk / str(d)).mkdir(parents=True)
        for i in range(1000):
            (junk / str(d) / str(i)).touch()
    markers = [Path("junk", str(d), str(i)) for d in range(20) for i in range(0, 1000, 50)]
    places = [out / "checkpoints" / STEP3, out / "checkpoints" / (STEP3 + ".discard")]  # its name, or renamed
    remaining = lambda: sum(any(os.path.exists(place / m) for place in places) for m in markers)  # noqa: E731
    proc = start_worker(out, {}, steps=9, save_every=3, keep_last=1)
    wait_for(proc, lambda: remaining() < len(markers))  # the deletion has begun
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert 0 < remaining() < len(markers)  # killed in the middle of the deletion
    assert not places[0].exists()  # never half-deleted under its full name
    assert ckpts(out) == ["step-00000009"] and find_resumable(out) == (out / "checkpoints" / "step-00000009", [])
    again = resume_run.run(str(out), steps=12, save_every=3, keep_last=1)
    assert again["resumed_from"].endswith("step-00000009") and again["steps"] == [10, 11, 12]
    assert ckpts(out) == ["step-00000012"] and leftovers(out) == []  # the leftover is removed at the next save


# ------------------------------------------------------------------------- 4. manifests


FILE = {"size": 2, "sha256": "0" * 64}
MALFORMED = {
    "a list": [],
    "files not a dict": {"files": 3},
    "no files": {"files": {}},
    "an entry not a dict": {"files": {"model.safetensors": 5}},
    "a size not an int": {"files": {"trainer_state.json": {"size": "2", "sha256": "0" * 64}}},
    "a path outside": {"files": {"../x": FILE}},
}


@pytest.mark.parametrize("manifest", MALFORMED.values(), ids=MALFORMED.keys())
def test_a_malformed_manifest_is_named_and_skipped(six, tmp_path, manifest):
    out = copy_of(six, tmp_path)
    newest = out / "checkpoints" / STEP6
    (newest / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="manifest.json"):
        verify(newest)
    path, skipped = find_resumable(out)
    assert path == out / "checkpoints" / STEP3 and len(skipped) == 1 and "manifest.json" in skipped[0]
    with pytest.warns(UserWarning, match="manifest.json"):
        again = resume_run.run(str(out), steps=6, save_every=3)
    assert again["resumed_from"].endswith(STEP3) and again["steps"] == [4, 5, 6]
    assert_bitwise(params(again["tensors"]), params(six[1]["tensors"]))
    verify(newest)  # replaced by the retrained one


@pytest.mark.parametrize("required", ["model.safetensors", "optimizer.safetensors", "optimizer.json", "trainer_state.json"])
def test_a_manifest_without_a_required_file_is_named_and_skipped(six, tmp_path, required):
    out = copy_of(six, tmp_path)
    newest = out / "checkpoints" / STEP6
    manifest = json.loads((newest / "manifest.json").read_text())
    del manifest["files"][required]
    (newest / required).unlink()
    (newest / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=required):
        verify(newest)
    path, skipped = find_resumable(out)
    assert path == out / "checkpoints" / STEP3 and required in skipped[0]


def test_a_sharded_manifest_must_list_the_shards(tmp_path):
    (tmp_path / "sharded.json").write_text("{}")
    (tmp_path / "trainer_state.json").write_text("{}")
    entry = {"size": 2, "sha256": hashlib.sha256(b"{}").hexdigest()}
    (tmp_path / "manifest.json").write_text(json.dumps({"files": {"sharded.json": entry, "trainer_state.json": entry}}))
    with pytest.raises(CheckpointError, match=r"model/\*\.safetensors"):
        verify(tmp_path)


# ------------------------------------------------------------------------- 5. format version, optimizer


def test_the_format_version_is_written_and_others_are_refused(six, tmp_path):
    out = copy_of(six, tmp_path)
    newest = out / "checkpoints" / STEP6
    manifest = json.loads((newest / "manifest.json").read_text())
    state = json.loads((newest / "trainer_state.json").read_text())
    assert manifest["format_version"] == FORMAT_VERSION == 3
    assert set(state["versions"]) == {"acctrain", "torch", "accelerate"}
    assert state["optimizer"]["class"] == "AdamW" and len(state["optimizer"]["param_groups"]) == 2
    # A newer acctrain's (its trainer_state.json names it): resume=PATH refuses it, naming the version that wrote
    # it; resume=auto skips it like a damaged one and falls back to step 3.
    rewrite(newest, "trainer_state.json", json.dumps({**state, "versions": {**state["versions"], "acctrain": "9.1.0"}}).encode())
    edited = json.loads((newest / "manifest.json").read_text())
    (newest / "manifest.json").write_text(json.dumps({**edited, "format_version": 4}))
    with pytest.raises(CheckpointError, match="format version 4") as err:
        resume_run.run(str(out), steps=8, resume=str(newest))
    assert str(newest) in str(err.value) and "reads versions 1 to 3" in str(err.value)
    assert "acctrain 9.1.0 wrote it: upgrade acctrain to 9.1.0 or later" in str(err.value)
    path, skipped = find_resumable(out)
    assert path == out / "checkpoints" / STEP3 and "acctrain 9.1.0 wrote it" in skipped[0]
    # The version edited alone (the writer is this acctrain): named as an edited or damaged manifest.
    (newest / "manifest.json").write_text(json.dumps({**manifest, "format_version": 4}))
    rewrite(newest, "trainer_state.json", json.dumps(state).encode())
    edited = json.loads((newest / "manifest.json").read_text())
    (newest / "manifest.json").write_text(json.dumps({**edited, "format_version": 4}))
    path, skipped = find_resumable(out)
    assert path == out / "checkpoints" / STEP3 and "the manifest was edited or damaged" in skipped[0]
    for damaged in (0, "2", None):  # no version acctrain ever wrote: a damaged manifest, skipped for step 3
        (newest / "manifest.json").write_text(json.dumps({**manifest, "format_version": damaged}))
        assert find_resumable(out) == (out / "checkpoints" / STEP3,
                                       [f"skipping checkpoint {STEP6}: {newest / 'manifest.json'}: malformed "
                                        f"format_version {damaged!r} (an edited or damaged manifest)"])
    (newest / "manifest.json").write_text(json.dumps(manifest))
    # Without a version: the format from before versioning (1, sha256 digests), which loads as it did.
    sha256 = {name: {"size": e["size"], "sha256": hashlib.sha256((newest / name).read_bytes()).hexdigest()}
              for name, e in manifest["files"].items()}
    (newest / "manifest.json").write_text(json.dumps({"files": sha256}))
    rewrite(newest, "trainer_state.json", json.dumps({k: v for k, v in state.items() if k != "optimizer"}).encode())
    unversioned = resume_run.run(str(out), steps=8)
    shutil.rmtree(out)
    shutil.copytree(six[0], out)
    versioned = resume_run.run(str(out), steps=8)
    assert unversioned["resumed_from"].endswith(STEP6) and unversioned["steps"] == versioned["steps"] == [7, 8]
    assert_bitwise(unversioned["tensors"], versioned["tensors"])


def tiny_engine(out, steps: int = 6, callbacks=(), optimizer=None, **config) -> Engine:
    """resume_run's run (same data, batch and schedule) with the callbacks and optimizer a test gives."""
    cfg = TrainConfig(output_dir=str(out), global_batch_size=8, micro_batch_size=2, max_steps=steps, log_every=1,
                      lr=1e-2, warmup_steps=2, cpu=RUN_ON_CPU, **config)
    return Engine(make_model(0), cfg, VarLenTokens(26), VarLenTokens(6), loss_fn=token_loss, collate_fn=collate,
                  optimizer=optimizer, callbacks=list(callbacks))


def test_another_optimizer_type_is_refused_naming_both(six, tmp_path):
    out = copy_of(six, tmp_path)
    sgd = lambda groups: torch.optim.SGD(groups, lr=1e-2, momentum=0.9)  # noqa: E731
    with pytest.raises(CheckpointError, match="AdamW.*SGD") as err:
        tiny_engine(out, steps=8, optimizer=sgd).fit()
    assert STEP6 in str(err.value) and "resume=none" in str(err.value)


def regrouped(*picks):
    """An optimizer factory: AdamW over the default groups' parameters (in order), regrouped by index."""
    def factory(groups):
        flat = [p for g in groups for p in g["params"]]  # [embed.w, hidden.w, head.w] + [hidden.b, norm.w, norm.b, head.b]
        return torch.optim.AdamW([{"params": [flat[i] for i in pick]} for pick in picks], lr=1e-2)
    return factory


def test_changed_param_groups_are_refused_naming_the_difference(six, tmp_path):
    out = copy_of(six, tmp_path)
    with pytest.raises(CheckpointError, match="2 param groups .* this run has 4") as err:
        resume_run.run(str(out), steps=8, param_groups={"head": 2.0})
    assert "param_groups" in str(err.value)
    with pytest.raises(CheckpointError, match="param group 0 has 3 params in the checkpoint, 4 in this run"):
        tiny_engine(out, steps=8, optimizer=regrouped([0, 1, 2, 3], [4, 5, 6])).fit()
    with pytest.raises(CheckpointError, match=r"param group 0, param 2: shape \[32, 16\] in the checkpoint, \[16\] in this"):
        tiny_engine(out, steps=8, optimizer=regrouped([0, 1, 3], [2, 4, 5, 6])).fit()


# ------------------------------------------------------------------------- 7. a full disk

FULL_DISK = """
import json, resource, signal, sys
from acctrain import Callback
from tests.test_checkpoint_safety import tiny_engine
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writing past the limit then fails with EFBIG, a real OSError
class Limit(Callback):
    def after_step(self, engine):
        if engine.state.step == 3:  # checkpoint 2 is written; every file written from now on may hold 512 bytes
            engine.checkpointer.wait()
            resource.setrlimit(resource.RLIMIT_FSIZE, (512, resource.RLIM_INFINITY))
tiny_engine(sys.argv[1], steps=4, callbacks=[Limit()], save_every=2, log_with="", async_save=sys.argv[2] == "1").fit()
"""


@pytest.mark.processes
@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_a_full_disk_names_the_checkpoint_and_keeps_the_previous_one(tmp_path, async_save):
    proc = subprocess.run([sys.executable, "-c", FULL_DISK, str(tmp_path), str(int(async_save))], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    error = proc.stderr.strip().splitlines()[-1]
    assert error.startswith("acctrain.errors.CheckpointError: could not write checkpoint step-00000004"), proc.stderr
    assert str(tmp_path / "checkpoints") in error and "File too large" in error
    assert "the previous checkpoint step-00000002 is intact" in error
    assert ckpts(tmp_path) == ["step-00000002"]
    verify(tmp_path / "checkpoints" / "step-00000002")
    resumed = tiny_engine(tmp_path, steps=4, save_every=2, log_with="")
    resumed.fit()
    assert str(resumed.resumed_from).endswith("step-00000002") and resumed.state.step == 4


@pytest.mark.processes
@pytest.mark.parametrize("failing", [0, 1], ids=["main-rank", "other-rank"])
@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_a_full_disk_on_one_of_two_ranks_ends_the_job_naming_it(tmp_path, failing, async_save):
    """2 real processes, one rank's disk full at checkpoint 4: the job ends (no rank waits for the other's
    part), the failing rank names the cause, and checkpoint 2 is intact and resumable. With async_save and
    the other rank failing, the main rank's writer learns it from that rank's marker and names it too."""
    from tests.support.processes import launch

    proc = launch(["-m", "tests.workers.full_disk_run", str(tmp_path), str(failing), str(int(async_save))],
                  check=False)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert (f"[rank{failing}]: acctrain.errors.CheckpointError: could not write checkpoint step-00000004 in "
            f"{tmp_path / 'checkpoints'}: File too large; the previous checkpoint step-00000002 is intact") in output
    if async_save and failing == 1:
        assert "rank 1 could not write its part (OSError: [Errno 27] File too large)" in output
    assert [c for c in ckpts(tmp_path) if not c.endswith(".tmp")] == ["step-00000002"]
    verify(tmp_path / "checkpoints" / "step-00000002")
    resumed = tiny_engine(tmp_path, steps=6, save_every=2, log_with="")
    resumed.fit()
    assert str(resumed.resumed_from).endswith("step-00000002") and resumed.state.step == 6


# ------------------------------------------------------------------------- 16. callbacks with tensors


class EMA(Callback):
    """An exponential moving average of the weights: a callback whose state holds tensors."""

    def __init__(self, decay: float = 0.9):
        self.decay, self.ema, self.updates, self.loaded = decay, None, 0, None

    def after_step(self, engine):
        weights = {n: p.detach().clone() for n, p in engine.unwrapped_model.named_parameters()}
        if self.ema is None:
            self.ema = weights
        else:
            for name, value in weights.items():
                self.ema[name].mul_(self.decay).add_(value, alpha=1 - self.decay)
        self.updates += 1

    def state_dict(self):
        return {"decay": self.decay, "updates": self.updates, "ema": self.ema, "last": [torch.tensor(self.updates)]}

    def load_state_dict(self, state):
        self.loaded = state
        self.decay, self.updates = state["decay"], state["updates"]
        self.ema = {name: tensor.clone() for name, tensor in state["ema"].items()}


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_callback_state_with_tensors_is_saved_and_given_back(tmp_path, async_save):
    whole = EMA()
    reference = tiny_engine(tmp_path / "whole", steps=10, callbacks=[whole], async_save=async_save)
    reference.fit()
    stopped = tmp_path / "stopped"
    with pytest.raises(Preempted):
        tiny_engine(stopped, steps=10, callbacks=[EMA(), resume_run.Record(stop_at=6)], async_save=async_save).fit()
    saved = load_file(stopped / "checkpoints" / STEP6 / "callbacks.safetensors")
    resumed = EMA()
    engine = tiny_engine(stopped, steps=10, callbacks=[resumed], async_save=async_save)
    engine.fit()
    assert str(engine.resumed_from).endswith(STEP6)
    loaded = resumed.loaded
    assert loaded["decay"] == 0.9 and loaded["updates"] == 6 and torch.equal(loaded["last"][0], torch.tensor(6))
    assert set(loaded["ema"]) == {n for n, _ in make_model(0).named_parameters()}
    assert sorted(saved) == sorted(f"0.ema.{n}" for n in loaded["ema"]) + ["0.last.0"]
    for name, tensor in loaded["ema"].items():
        assert isinstance(tensor, torch.Tensor) and torch.equal(tensor, saved[f"0.ema.{name}"]), name
    assert resumed.updates == whole.updates == 10
    assert_bitwise(resumed.ema, whole.ema)
    assert_bitwise(dict(engine.unwrapped_model.named_parameters()), dict(reference.unwrapped_model.named_parameters()))
