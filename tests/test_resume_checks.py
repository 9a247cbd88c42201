"""A resume checks what it resumes: the data it trained on, the settings that change silently, the newest
complete checkpoint of the run's trajectory, every file and tensor header a checkpoint must hold, and the
format version; resume=PATH is checked before anything is written."""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from acctrain import Callback, ConfigError, Engine, TrainConfig
from acctrain import data_identity
from acctrain.checkpoint import HASH, CheckpointError, file_digests, find_resumable, verify
from acctrain.ema import EMA
from acctrain.checkpoint.checkpointer import RESUME_CONSEQUENCES, resume_changes
from acctrain.token_data import TokenWindows, tokenize
from tests.support.tiny import RUN_ON_CPU, VOCAB, VarLenTokens, collate, make_model, token_loss
from tests.support.runs import copy_of, rewrite
from tests.test_checkpoint_safety import STEP3, STEP6
from tests.workers import resume_run


def token_engine(out: Path, corpus: Path, steps: int = 2, **config) -> Engine:
    """The tiny model on windows of a token file (ids below its vocabulary)."""
    data = TokenWindows(corpus, context_len=8, vocab_size=VOCAB)
    cfg = TrainConfig(output_dir=str(out), global_batch_size=4, micro_batch_size=2, max_steps=steps, lr=1e-2,
                      cpu=RUN_ON_CPU, **config)
    return Engine(make_model(0), cfg, data, loss_fn=lambda m, b: token_loss(m, b))


def write_corpus(path: Path, seed: int, tokens: int = 400) -> None:
    ids = np.random.default_rng(seed).integers(0, VOCAB, tokens).astype(np.uint16)
    path.write_bytes(ids.tobytes())


# ------------------------------------------------------------------------------------------- 1. the data


def test_a_token_file_rewritten_in_place_to_the_same_length_is_refused_with_a_diff(tmp_path):
    corpus, out = tmp_path / "corpus.bin", tmp_path / "run"
    write_corpus(corpus, seed=0)
    token_engine(out, corpus).fit()
    before = json.loads((out / "checkpoints" / "step-00000002" / "trainer_state.json").read_text())["data"]["train"]
    assert before["kind"] == "token files" and before["files"][0][HASH] == file_digests([corpus])[corpus]
    write_corpus(corpus, seed=1)  # re-tokenized: the same length, other ids
    os.utime(corpus, ns=(before["files"][0]["mtime_ns"] + 10**9,) * 2)  # written a second later
    with pytest.raises(ConfigError, match="trained on other data") as err:
        token_engine(out, corpus, steps=4).fit()
    assert f"token file 0 ({corpus} -> {corpus}): {HASH} {before['files'][0][HASH]} -> " in str(err.value)
    assert "allow_plan_change=true" in str(err.value)
    resumed = token_engine(out, corpus, steps=4, allow_plan_change=True)
    resumed.fit()  # allowed: continues on the new data, and records it
    assert resumed.state.step == 4 and resumed.data_identity["train"]["files"][0][HASH] != before["files"][0][HASH]


def test_the_same_corpus_moved_or_copied_elsewhere_resumes(tmp_path):
    corpus, out = tmp_path / "corpus.bin", tmp_path / "run"
    write_corpus(corpus, seed=0)
    token_engine(out, corpus).fit()
    moved = tmp_path / "elsewhere" / "copy.bin"
    moved.parent.mkdir()
    shutil.copy(corpus, moved)  # another path and mtime: hashed again, the same digest
    engine = token_engine(out, moved, steps=4)
    engine.fit()
    assert engine.state.step == 4 and engine.resumed_from.name == "step-00000002"


def test_tokenize_records_the_digest_that_a_run_reuses_while_the_file_is_unchanged(tmp_path):
    text = tmp_path / "a.txt"
    text.write_bytes(bytes(np.random.default_rng(0).integers(0, VOCAB, 500).astype(np.uint8)))
    meta = tokenize([text], tmp_path / "c.bin")
    assert meta["digest"][HASH] == file_digests([tmp_path / "c.bin"])[tmp_path / "c.bin"]
    # The sidecar's digest is taken as it is (the file is not hashed again) while the file keeps the size and
    # mtime it was taken at: a digest edited in the sidecar shows through...
    sidecar = tmp_path / "c.bin.json"
    sidecar.write_text(json.dumps({**meta, "digest": {**meta["digest"], HASH: "0" * 32}}))
    assert data_identity.identify(TokenWindows(tmp_path / "c.bin", 8))["files"][0][HASH] == "0" * 32
    # ... and once the file's mtime changes, the file is hashed: the true digest.
    os.utime(tmp_path / "c.bin", ns=(meta["digest"]["mtime_ns"] + 10**9,) * 2)
    assert data_identity.identify(TokenWindows(tmp_path / "c.bin", 8))["files"][0][HASH] == meta["digest"][HASH]


def test_a_hugging_face_dataset_is_identified_by_its_fingerprint():
    datasets = pytest.importorskip("datasets")
    rows = datasets.Dataset.from_dict({"x": [1, 2, 3, 4]})
    changed = rows.map(lambda r: {"x": r["x"] + 1})
    a, b = data_identity.identify(rows), data_identity.identify(changed)
    assert a == {"kind": "fingerprint", "class": "Dataset", "fingerprint": rows._fingerprint}
    assert data_identity.differences(a, b) == [f"fingerprint: {rows._fingerprint!r} -> {changed._fingerprint!r}"]
    assert data_identity.differences(a, data_identity.identify(datasets.Dataset.from_dict({"x": [1, 2, 3, 4]}))) == []


class Fingerprinted(VarLenTokens):
    """A user's dataset that names its content."""

    def __init__(self, n: int, seed: int = 123):
        super().__init__(n, seed)
        self.fingerprint = f"varlen-{n}-{seed}"


def test_a_dataset_with_a_fingerprint_is_checked_by_it_and_others_by_their_length(tmp_path, capsys):
    def engine(train, steps):
        cfg = TrainConfig(output_dir=str(tmp_path / "run"), global_batch_size=8, micro_batch_size=2, max_steps=steps,
                          cpu=RUN_ON_CPU)
        return Engine(make_model(0), cfg, train, loss_fn=token_loss, collate_fn=collate)

    engine(Fingerprinted(26, seed=1), 2).fit()
    with pytest.raises(ConfigError, match=r"fingerprint: 'varlen-26-1' -> 'varlen-26-2'"):
        engine(Fingerprinted(26, seed=2), 4).fit()
    cfg = TrainConfig(output_dir=str(tmp_path / "run"), global_batch_size=8, micro_batch_size=2, max_steps=3,
                      cpu=RUN_ON_CPU)  # other eval data: said, not refused
    Engine(make_model(0), cfg, Fingerprinted(26, seed=1), Fingerprinted(6, seed=5), loss_fn=token_loss,
           collate_fn=collate).fit()
    assert "the eval data differs from the checkpoint's run" not in capsys.readouterr().out  # none recorded before
    cfg = TrainConfig(output_dir=str(tmp_path / "run"), global_batch_size=8, micro_batch_size=2, max_steps=4,
                      cpu=RUN_ON_CPU)
    Engine(make_model(0), cfg, Fingerprinted(26, seed=1), Fingerprinted(6, seed=6), loss_fn=token_loss,
           collate_fn=collate).fit()
    assert ("the eval data differs from the checkpoint's run (fingerprint: 'varlen-6-5' -> 'varlen-6-6')"
            in capsys.readouterr().out)
    shutil.rmtree(tmp_path / "run")
    engine(VarLenTokens(26, seed=1), 2).fit()  # a plain dataset: its class and length, documented as weaker
    assert engine(VarLenTokens(26, seed=2), 4).data_identity is None  # (not resumed yet)
    resumed = engine(VarLenTokens(26, seed=2), 4)
    resumed.fit()
    assert resumed.data_identity["train"] == {"kind": "length", "class": "VarLenTokens", "length": 26}


# ------------------------------------------------------------------------------------------- 2. settings


def test_settings_that_change_on_resume_are_each_printed_with_what_they_do(six, tmp_path, capsys):
    out = copy_of(six, tmp_path)
    resume_run.run(str(out), steps=8, mixed_precision="bf16", activation_checkpointing=True,
                   activation_checkpointing_block="Linear", ema_decay=0.9)
    printed = capsys.readouterr().out
    assert "resuming with mixed_precision='bf16' (the checkpoint's run: 'no') from optimizer step 6" in printed
    assert "resuming with ema_decay=0.9 (the checkpoint's run: 0.0) from optimizer step 6: an EMA added starts " \
           "from this step's weights" in printed
    assert "resuming with activation_checkpointing=True (the checkpoint's run: False)" in printed
    assert "1 EMA callback(s) not in the checkpoint start with fresh state" in printed
    resume_run.run(str(out), steps=10)  # the EMA dropped again: its state is named as not loaded
    printed = capsys.readouterr().out
    assert "resuming with ema_decay=0.0 (the checkpoint's run: 0.9)" in printed
    assert "the checkpoint's state of 1 EMA callback(s) is not loaded: this run has none" in printed
    assert "resuming with mixed_precision='no' (the checkpoint's run: 'bf16')" in printed


class Counter(Callback):
    """A callback with state: the optimizer steps it saw."""

    order = 100  # after the EMA

    def __init__(self):
        self.seen = 0

    def after_step(self, engine):
        self.seen += 1

    def state_dict(self):
        return {"seen": self.seen}

    def load_state_dict(self, state):
        self.seen = state["seen"]


def test_every_setting_a_resume_may_change_silently_has_its_line():
    saved = {"mixed_precision": "no", "ema_decay": 0.0, "compile": False, "activation_checkpointing": False,
             "activation_checkpointing_block": "", "lr": 1.0}
    now = {"mixed_precision": "bf16", "ema_decay": 0.99, "compile": True, "activation_checkpointing": True,
           "activation_checkpointing_block": "Block", "lr": 2.0}
    lines = resume_changes(saved, now, 7)
    assert [line.split("=")[0].removeprefix("resuming with ") for line in lines] == list(RESUME_CONSEQUENCES)
    assert lines[2] == ("resuming with compile=True (the checkpoint's run: False) from optimizer step 7: speed only: "
                        "the same computation")
    assert resume_changes(saved, saved, 7) == []


def test_a_callback_added_in_front_leaves_the_others_state_in_place(tmp_path, capsys):
    def engine(callbacks, steps):
        cfg = TrainConfig(output_dir=str(tmp_path / "run"), global_batch_size=8, micro_batch_size=2, max_steps=steps,
                          cpu=RUN_ON_CPU)
        return Engine(make_model(0), cfg, VarLenTokens(26), loss_fn=token_loss, collate_fn=collate, callbacks=callbacks)

    engine([Counter()], 3).fit()
    counter = Counter()
    resumed = engine([EMA(0.9), counter], 5)  # the EMA comes first: matched by position, Counter's state was lost
    resumed.resume()
    assert [type(cb).__name__ for cb in resumed.callbacks.items] == ["EMA", "Counter"] and counter.seen == 3
    assert "1 EMA callback(s) not in the checkpoint start with fresh state" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------- 3. newer than latest


def test_a_complete_checkpoint_newer_than_latest_of_the_same_trajectory_is_resumed(six, tmp_path):
    out = copy_of(six, tmp_path)
    # What a kill between renaming step-6 into place and updating `latest` leaves: latest names step-3.
    (out / "checkpoints" / "latest").write_text(STEP3 + "\n")
    path, notes = find_resumable(out)
    assert path == out / "checkpoints" / STEP6
    assert notes == [f"{STEP6} is complete and newer than {STEP3}, which `latest` names (a kill between its commit "
                     f"and the update of `latest`): resuming {STEP6}"]
    # Of another trajectory (a roll-back's, or the run it rolled back), the newer one is not taken.
    state = json.loads((out / "checkpoints" / STEP6 / "trainer_state.json").read_text())
    rewrite(out / "checkpoints" / STEP6, "trainer_state.json", json.dumps({**state, "trajectory": "other"}).encode())
    assert find_resumable(out) == (out / "checkpoints" / STEP3, [])
    rewrite(out / "checkpoints" / STEP6, "trainer_state.json", json.dumps(state).encode())
    resumed = resume_run.run(str(out), steps=8)
    assert resumed["resumed_from"].endswith(STEP6) and resumed["steps"] == [7, 8]


def test_a_roll_back_starts_a_trajectory_and_resume_auto_keeps_it(six, tmp_path):
    out = copy_of(six, tmp_path)
    first = json.loads((out / "checkpoints" / STEP6 / "trainer_state.json").read_text())["trajectory"]
    assert first == json.loads((out / "checkpoints" / STEP3 / "trainer_state.json").read_text())["trajectory"]
    resume_run.run(str(out), steps=5, save_every=1, resume=str(out / "checkpoints" / STEP3))
    rolled = json.loads((out / "checkpoints" / "step-00000005" / "trainer_state.json").read_text())["trajectory"]
    assert rolled != first
    # A kill before `latest` named step-5: step-5 is of latest's trajectory and is taken; the rolled-back run's
    # step-6 is of the old one and is not
    (out / "checkpoints" / "latest").write_text("step-00000004\n")
    assert (out / "checkpoints" / STEP6).is_dir() and find_resumable(out)[0].name == "step-00000005"
    resumed = resume_run.run(str(out), steps=6)
    assert resumed["steps"] == [6]
    assert json.loads((out / "checkpoints" / STEP6 / "trainer_state.json").read_text())["trajectory"] == rolled


# ------------------------------------------------------------------------------------------- 4. contents


def drop_file(ckpt: Path, name: str) -> None:
    (ckpt / name).unlink()
    manifest = json.loads((ckpt / "manifest.json").read_text())
    del manifest["files"][name]
    (ckpt / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("name", ["rng-rank0.safetensors", "rng-rank0.json"])
def test_a_checkpoint_without_its_rng_files_in_folder_and_manifest_is_named_and_skipped(six, tmp_path, name):
    out = copy_of(six, tmp_path)
    newest = out / "checkpoints" / STEP6
    drop_file(newest, name)
    with pytest.raises(CheckpointError, match=f"no {name}"):
        verify(newest)
    path, skipped = find_resumable(out)
    assert path == out / "checkpoints" / STEP3 and f"skipping checkpoint {STEP6}" in skipped[0] and name in skipped[0]


def test_a_file_the_checkpoint_declares_is_required(six, tmp_path):
    out = copy_of(six, tmp_path)
    newest = out / "checkpoints" / STEP6
    state = json.loads((newest / "trainer_state.json").read_text())
    declared = {**state, "contents": {**state["contents"], "files": [*state["contents"]["files"], "callbacks.safetensors"],
                                      "state": ["scaler"]}}
    rewrite(newest, "trainer_state.json", json.dumps(declared).encode())
    with pytest.raises(CheckpointError, match=r"no callbacks.safetensors \(1 of the files its trainer_state.json says"):
        verify(newest)
    declared["contents"]["files"] = state["contents"]["files"]
    rewrite(newest, "trainer_state.json", json.dumps(declared).encode())
    with pytest.raises(CheckpointError, match="holds no scaler, which it says it holds"):
        verify(newest)


def test_a_tensor_of_another_dtype_is_named_and_skipped_not_loaded(six, tmp_path):
    out = copy_of(six, tmp_path)
    newest = out / "checkpoints" / STEP6
    weights = load_file(newest / "model.safetensors")
    weights["head.bias"] = weights["head.bias"].double()  # a header that disagrees with what was written
    save_file(weights, tmp_path / "m.safetensors")
    rewrite(newest, "model.safetensors", (tmp_path / "m.safetensors").read_bytes())
    message = (f"{newest / 'model.safetensors'}: tensor 'head.bias' is F64 of shape [32], trainer_state.json says "
               "F32 of shape [32]")
    with pytest.raises(CheckpointError) as err:
        verify(newest)
    assert str(err.value) == message
    assert find_resumable(out) == (out / "checkpoints" / STEP3, [f"skipping checkpoint {STEP6}: {message}"])
    # A checkpoint that does not declare its tensors (written before they were recorded) is refused on load
    state = json.loads((newest / "trainer_state.json").read_text())
    rewrite(newest, "trainer_state.json", json.dumps({k: v for k, v in state.items() if k != "contents"}).encode())
    with pytest.raises(CheckpointError, match=r"dtype mismatches: \['head.bias: checkpoint torch.float64, model "
                                              r"torch.float32'\]"):
        resume_run.run(str(out), steps=8)


@pytest.mark.parametrize("damage", ["offsets past the data", "overlapping", "not json", "header too long"])
def test_a_malformed_safetensors_header_is_named_not_a_raw_safetensor_error(six, tmp_path, damage):
    out = copy_of(six, tmp_path)
    newest = out / "checkpoints" / STEP6
    raw = (newest / "optimizer.safetensors").read_bytes()
    length = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + length])
    name = sorted(k for k in header if k != "__metadata__")[0]
    if damage == "offsets past the data":
        header[name]["data_offsets"][1] += 4
    elif damage == "overlapping":
        header[name]["data_offsets"] = [x + 4 for x in header[name]["data_offsets"]]
    if damage == "not json":
        head = b"{" + b" " * (length - 1)
    else:
        head = json.dumps(header).encode().ljust(length)[:length] if len(json.dumps(header)) <= length else None
        head = head if head is not None else json.dumps(header).encode()
    body = raw[8 + length:]
    content = (struct.pack("<Q", 10**9) + raw[8:]) if damage == "header too long" else \
        struct.pack("<Q", len(head)) + head + body
    rewrite(newest, "optimizer.safetensors", content)
    with pytest.raises(CheckpointError, match=str(newest / "optimizer.safetensors")):
        verify(newest)
    path, skipped = find_resumable(out)
    assert path == out / "checkpoints" / STEP3 and "optimizer.safetensors" in skipped[0]


def test_a_model_of_another_dtype_than_the_checkpoint_is_refused_naming_each_tensor(six, tmp_path):
    out = copy_of(six, tmp_path)
    cfg = TrainConfig(output_dir=str(out), global_batch_size=8, micro_batch_size=2, max_steps=8, log_every=1,
                      lr=1e-2, warmup_steps=2, cpu=RUN_ON_CPU)
    engine = Engine(make_model(0, dtype=torch.float64), cfg, VarLenTokens(26), VarLenTokens(6), loss_fn=token_loss,
                    collate_fn=collate)
    with pytest.raises(CheckpointError, match=r"dtype mismatches: \['embed.weight: checkpoint torch.float32, model "
                                              r"torch.float64'"):
        engine.resume()


# ------------------------------------------------------------------------------------------- 5. messages


def test_resume_path_that_is_not_a_checkpoint_is_refused_before_anything_is_written(six, tmp_path):
    out = tmp_path / "new-run"
    for target, what in [(tmp_path, "a directory without manifest.json"), (six[0], "a directory without manifest.json")]:
        cfg = TrainConfig(output_dir=str(out), global_batch_size=8, micro_batch_size=2, max_steps=2, cpu=RUN_ON_CPU,
                          resume=str(target))
        engine = Engine(make_model(0), cfg, VarLenTokens(26), loss_fn=token_loss, collate_fn=collate)
        with pytest.raises(ConfigError, match=what) as err:
            engine.fit()
        assert not out.exists()
    assert f"it looks like a run's output_dir: name one of {six[0] / 'checkpoints'}/step-*" in str(err.value)
