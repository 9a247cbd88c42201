"""Checkpoints: contents without pickles, crash safety, verified resume, exactness, preemption, NaNs."""

from __future__ import annotations

import gc
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from acctrain import ConfigError
from acctrain.checkpoint import HASH, CheckpointError, find_resumable, verify, write_files
from acctrain.errors import PREEMPTED_EXIT_CODE, NonFiniteError, Preempted
from acctrain.permutation import EAGER_MAX
from tests.support import ROOT, assert_same_run, ckpts, launch, load_result, logged
from tests.support.slow_save import ENV, slow_saves
from tests.test_checkpoint_hash import reference_digest
from tests.workers import resume_run

WORKER = ["-m", "tests.workers.resume_run"]  # run from ROOT as a module (torchrun -m, python -m)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Uninterrupted single-process runs to step 10, with and without dropout."""
    base = tmp_path_factory.mktemp("ref")
    return {p: resume_run.run(str(base / f"d{p}"), dropout=p) for p in (0.0, 0.2)}


# ----------------------------------------------------------------------------------------- contents


def test_checkpoint_contents_and_no_pickle(tmp_path):
    resume_run.run(str(tmp_path), steps=6, save_every=3)
    assert ckpts(tmp_path) == ["step-00000003", "step-00000006"]
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step-00000006"
    ckpt = tmp_path / "checkpoints" / "step-00000006"
    names = sorted(p.name for p in ckpt.iterdir())
    assert names == ["manifest.json", "model.safetensors", "optimizer.json", "optimizer.safetensors",
                     "rng-rank0.json", "rng-rank0.safetensors", "trainer_state.json"]
    manifest = json.loads((ckpt / "manifest.json").read_text())
    assert manifest["hash"] == HASH == "xxh3_128_64mib"
    manifest = manifest["files"]
    assert sorted(manifest) == [n for n in names if n != "manifest.json"]
    for name, entry in manifest.items():
        assert entry == {"size": (ckpt / name).stat().st_size, HASH: reference_digest((ckpt / name).read_bytes())}
    for path in (tmp_path / "checkpoints").rglob("*"):
        if path.is_file():
            head = path.read_bytes()[:16]
            assert not head.startswith(b"\x80"), f"{path} looks like a pickle"
            if path.suffix == ".safetensors":
                load_file(path)  # parses as safetensors
            elif path.suffix == ".json":
                json.loads(path.read_text())
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["state"]["step"] == 6 and state["state"]["samples_seen"] == 6 * 8 - 6  # one short window of 2
    assert state["epoch"] == 1
    for key in ("world_size", "accumulation", "global_batch", "micro_batch", "seed", "dataset_len"):
        assert key in state["plan"]
    assert set(state["versions"]) == {"acctrain", "torch", "accelerate"}
    assert state["config"]["save_every"] == 3 and state["schedule"]["name"] == "warmup_linear"


def test_written_files_are_safetensors_and_json_with_their_own_digest(tmp_path):
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    tensors = {
        "f32": base, "bf16": base.to(torch.bfloat16), "f16": base.half(), "i64": torch.arange(5),
        "u8": torch.arange(7, dtype=torch.uint8), "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(3.5), "empty": torch.zeros(0, 3), "transposed": base.t(),  # not contiguous
        "tied": base, "slice": base[1:3], "c64": torch.randn(2, 2, dtype=torch.complex64),
        "u16": torch.arange(3).to(torch.uint16), "u32": torch.arange(3).to(torch.uint32),
        "u64": torch.arange(3).to(torch.uint64), "f8": base.to(torch.float8_e4m3fn),
        "f8e5": base.to(torch.float8_e5m2),
    }
    files = {tmp_path / "t.safetensors": tensors, tmp_path / "meta.json": {"a": [1, 2.5, None], "b": "x"},
             tmp_path / "none.safetensors": {}}
    digests = write_files(files)
    assert set(digests) == set(files)
    for path, digest in digests.items():
        assert digest == reference_digest(path.read_bytes()), path.name
    loaded = load_file(tmp_path / "t.safetensors")
    assert set(loaded) == set(tensors)
    for name, tensor in tensors.items():
        bits = lambda t: t.contiguous().view(-1).view(torch.uint8)  # noqa: E731 (torch.equal lacks float8)
        assert loaded[name].dtype == tensor.dtype and loaded[name].shape == tensor.shape, name
        assert torch.equal(bits(loaded[name]), bits(tensor)), name
    with safe_open(tmp_path / "t.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"}
    header = json.loads(safetensors_header(tmp_path / "t.safetensors"))
    for name, entry in header.items():  # every tensor aligned to its element size, as save_file writes them
        assert name == "__metadata__" or entry["data_offsets"][0] % tensors[name].element_size() == 0, name
    assert load_file(tmp_path / "none.safetensors") == {}
    assert json.loads((tmp_path / "meta.json").read_text()) == {"a": [1, 2.5, None], "b": "x"}


def safetensors_header(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(int.from_bytes(f.read(8), "little"))


def test_commit_puts_the_writers_digests_in_the_manifest_without_reading_the_files(tmp_path):
    from acctrain.checkpoint import commit, staging_dir

    stage = staging_dir(tmp_path, 1)
    stage.mkdir(parents=True)
    digests = write_files({stage / "a.safetensors": {"x": torch.ones(3)}, stage / "b.json": {"k": 1}})
    (stage / "rng-rank1.json").write_text("{}")  # another rank's file: read back
    claimed = {stage / "a.safetensors": "f" * 32, stage / "b.json": digests[stage / "b.json"]}
    manifest = json.loads((commit(stage, claimed) / "manifest.json").read_text())["files"]
    assert manifest["a.safetensors"][HASH] == "f" * 32  # taken as given: the file was not read again
    assert manifest["b.json"][HASH] == digests[stage / "b.json"]
    assert manifest["rng-rank1.json"][HASH] == reference_digest(b"{}")


def test_async_snapshot_reuses_its_buffers_and_copies_the_values_of_now(tmp_path):
    from acctrain.checkpoint.async_save import _snapshot

    weight, buffers = torch.ones(3, 4), {}
    files = {tmp_path / "model.safetensors": {"w": weight}, tmp_path / "state.json": {"step": 1}}
    first, later = _snapshot(files, buffers, set())
    assert later == []  # nothing declared stable: every tensor is copied now
    assert json.loads(first[tmp_path / "state.json"]) == {"step": 1}  # encoded now: later changes don't leak
    weight.add_(1)  # training goes on: the snapshot keeps the values at the save
    assert torch.equal(first[tmp_path / "model.safetensors"]["w"], torch.ones(3, 4))
    second, _ = _snapshot(files, buffers, set())
    assert second[tmp_path / "model.safetensors"]["w"].data_ptr() == first[tmp_path / "model.safetensors"]["w"].data_ptr()
    assert torch.equal(second[tmp_path / "model.safetensors"]["w"], weight)
    _snapshot({tmp_path / "model.safetensors": {"v": torch.zeros(2)}}, buffers, set())
    assert list(buffers) == [("model.safetensors", "v")]  # buffers no longer used are let go


def test_async_snapshot_leaves_stable_tensors_to_the_writer_and_refuses_a_torn_copy(tmp_path):
    from acctrain.checkpoint.async_save import _copy, _snapshot

    weight, running_mean = torch.ones(3, 4), torch.zeros(4)
    files = {tmp_path / "model.safetensors": {"w": weight, "running_mean": running_mean}}
    snapshot, later = _snapshot(files, {}, {weight.data_ptr()})
    running_mean.add_(1)  # a buffer (changed by a forward) was copied at the save
    assert torch.equal(snapshot[tmp_path / "model.safetensors"]["running_mean"], torch.zeros(4))
    assert [(buffer.data_ptr(), tensor.data_ptr()) for buffer, tensor, _ in later] == [
        (snapshot[tmp_path / "model.safetensors"]["w"].data_ptr(), weight.data_ptr())]
    weight.mul_(5)  # before the writer copies: the step is allowed to change it only after wait_copied
    with pytest.raises(RuntimeError, match="1 parameter or optimizer-state tensors changed in place while an async "
                                           "save copied them.*engine.checkpointer.wait_copied()"):
        _copy(later)
    snapshot, later = _snapshot(files, {}, {weight.data_ptr()})
    _copy(later)
    weight.mul_(5)  # after the copy: the checkpoint keeps the values of the save
    assert torch.equal(snapshot[tmp_path / "model.safetensors"]["w"], torch.full((3, 4), 5.0))


def main_rank_writer(stage: Path):
    """A background save of rank 0 of 2 (files written for real); it commits once rank 1's part is marked done."""
    from acctrain.checkpoint.async_save import AsyncWriter

    stage.mkdir(parents=True)
    writer, committed = AsyncWriter(), []
    writer.start({stage / "model.safetensors": {"w": torch.ones(3)}}, stage, 0, 2, True,
                 lambda path, digests: committed.append(path))
    return writer, committed


def test_an_async_save_stops_when_another_rank_marks_its_part_failed(tmp_path):
    from acctrain.checkpoint.async_save import PartFailed

    stage = tmp_path / "step-00000004.tmp"
    writer, committed = main_rank_writer(stage)
    (stage / ".failed-rank1").write_text("OSError: [Errno 28] No space left on device")  # as rank 1's writer does
    error = writer.wait(raise_error=False)
    assert isinstance(error, PartFailed) and str(error) == ("rank 1 could not write its part (OSError: [Errno 28] No "
                                                            "space left on device); see its output")
    assert committed == []
    writer, committed = main_rank_writer(tmp_path / "step-00000006.tmp")
    (tmp_path / "step-00000006.tmp" / ".done-rank1").touch()
    assert writer.wait(raise_error=False) is None and committed == [tmp_path / "step-00000006.tmp"]


def test_a_failed_run_waits_a_bounded_time_for_other_ranks_parts(tmp_path):
    """On a failed run's way out (patience), the main rank's writer gives up on a rank that never wrote its
    part (it died with the run), instead of keeping the process alive for the hour it waits otherwise."""
    from acctrain.checkpoint.async_save import PartFailed

    writer, committed = main_rank_writer(tmp_path / "step-00000004.tmp")
    error = writer.wait(raise_error=False, patience=0.3)
    assert isinstance(error, PartFailed) and committed == []
    assert str(error) == ("rank(s) [1] did not finish their part of step-00000004.tmp after the run failed; see their "
                          "output (they may have died or hung)")


@pytest.mark.processes
def test_a_rank_whose_disk_is_full_marks_its_part_failed_even_without_room_for_the_cause(tmp_path):
    """The marker appears complete (renamed into place) with the cause; if the cause cannot be written (a full
    disk: RLIMIT_FSIZE of 0 in a child process makes every write fail with EFBIG), the marker is empty and the
    main rank says the cause was not recorded."""
    from acctrain.checkpoint.async_save import PartFailed, _mark_failed

    _mark_failed(tmp_path, 1, "OSError: [Errno 28] No space left on device")
    assert [p.name for p in tmp_path.iterdir()] == [".failed-rank1"]
    full = tmp_path / "full"
    full.mkdir()
    code = ("import resource, signal, sys; from pathlib import Path; from acctrain.checkpoint.async_save import _mark_failed; "
            "signal.signal(signal.SIGXFSZ, signal.SIG_IGN); resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0)); "
            "_mark_failed(Path(sys.argv[1]), 1, 'OSError: [Errno 27] File too large')")
    subprocess.run([sys.executable, "-c", code, str(full)], cwd=ROOT, check=True, timeout=60)
    assert [(p.name, p.read_text()) for p in full.iterdir()] == [(".failed-rank1", "")]
    writer, committed = main_rank_writer(full / "step-00000004.tmp")
    (full / "step-00000004.tmp" / ".failed-rank1").touch()
    error = writer.wait(raise_error=False)
    assert isinstance(error, PartFailed) and "its cause could not be recorded, the disk may be full" in str(error)


def test_the_step_after_an_async_save_waits_for_its_copy_of_the_weights(tmp_path, monkeypatch):
    """The writer sleeps before copying the parameters and optimizer state; the next optimizer step waits for
    that copy, so the checkpoint holds the state of its step, byte for byte the synchronous save's."""
    sync = resume_run.run(str(tmp_path / "sync"), steps=4, save_every=2)
    slow_saves(0.3, monkeypatch)
    asynchronous = resume_run.run(str(tmp_path / "async"), steps=4, save_every=2, async_save=True)
    assert_same_run(sync, asynchronous)
    for name in ("model.safetensors", "optimizer.safetensors"):
        assert (tmp_path / "async" / "checkpoints" / "step-00000002" / name).read_bytes() == \
            (tmp_path / "sync" / "checkpoints" / "step-00000002" / name).read_bytes()


def test_an_async_save_at_an_epochs_end_is_copied_before_the_emas_evaluation_swaps_weights(tmp_path, monkeypatch):
    """A save at the last step of an epoch, then that epoch's evaluation, where the EMA swaps its average into
    the model and back: callbacks run only after the save's copy, so the checkpoint is the synchronous one's."""
    from acctrain import Engine, TrainConfig
    from tests.support.tiny import VarLenTokens, collate, make_model, token_loss

    def run(out, **kw):
        cfg = TrainConfig(output_dir=str(out), global_batch_size=8, micro_batch_size=8, max_steps=4, save_every=2,
                          ema_decay=0.9, log_with="", cpu=True, **kw)
        engine = Engine(make_model(), cfg, VarLenTokens(16), VarLenTokens(8, seed=5), loss_fn=token_loss,
                        collate_fn=collate)
        engine.fit()  # 2 steps per epoch: the save of step 2 comes right before the epoch's evaluation
        engine.close()

    run(tmp_path / "sync")
    slow_saves(0.3, monkeypatch)
    run(tmp_path / "async", async_save=True)
    for name in ("model.safetensors", "optimizer.safetensors", "callbacks.safetensors"):
        assert (tmp_path / "async" / "checkpoints" / "step-00000002" / name).read_bytes() == \
            (tmp_path / "sync" / "checkpoints" / "step-00000002" / name).read_bytes(), name


def test_weights_changed_outside_the_engine_during_an_async_copy_fail_that_save(tmp_path, monkeypatch):
    from acctrain import Engine, TrainConfig
    from tests.support.tiny import VarLenTokens, collate, make_model, token_loss

    cfg = TrainConfig(output_dir=str(tmp_path), global_batch_size=8, micro_batch_size=8, max_steps=2,
                      async_save=True)
    engine = Engine(make_model(), cfg, VarLenTokens(26), loss_fn=token_loss, collate_fn=collate)
    engine.fit()  # step-00000002
    slow_saves(0.3, monkeypatch)
    engine.state.step = 3
    engine.save()
    with torch.no_grad():
        next(engine.unwrapped_model.parameters()).add_(1.0)  # without engine.checkpointer.wait_copied()
    with pytest.raises(RuntimeError, match="changed in place while an async save copied them"):
        engine.checkpointer.wait()
    assert ckpts(tmp_path) == ["step-00000002"]
    verify(tmp_path / "checkpoints" / "step-00000002")
    engine.close()


def test_async_buffers_reserved_in_the_background_are_the_ones_the_snapshot_uses(tmp_path):
    from acctrain.checkpoint.async_save import _Reservation, _snapshot

    big, small = torch.randn(512, 1024), torch.arange(6, dtype=torch.int64)  # 2 MiB: mapped with MAP_POPULATE
    reservation = _Reservation({("model.safetensors", "big"): ((512, 1024), torch.float32),
                                ("model.safetensors", "small"): ((6,), torch.int64)})
    reservation.start()
    reservation.join()
    reserved = dict(reservation.buffers)
    del reservation
    gc.collect()  # the mapped memory lives as long as its tensors
    assert {k: (tuple(v.shape), v.dtype) for k, v in reserved.items()} == {
        ("model.safetensors", "big"): ((512, 1024), torch.float32), ("model.safetensors", "small"): ((6,), torch.int64)}
    buffers = dict(reserved)
    snapshot, _ = _snapshot({tmp_path / "model.safetensors": {"big": big, "small": small}}, buffers, set())
    for name, tensor in snapshot[tmp_path / "model.safetensors"].items():
        assert tensor.data_ptr() == reserved[("model.safetensors", name)].data_ptr(), name
    assert torch.equal(snapshot[tmp_path / "model.safetensors"]["big"], big)
    digests = write_files({tmp_path / "model.safetensors": snapshot[tmp_path / "model.safetensors"]})
    assert torch.equal(load_file(tmp_path / "model.safetensors")["big"], big)
    assert digests[tmp_path / "model.safetensors"] == reference_digest((tmp_path / "model.safetensors").read_bytes())


def test_rotation_keeps_last_and_best(tmp_path):
    resume_run.run(str(tmp_path / "a"), steps=10, save_every=2, keep_last=2)
    assert ckpts(tmp_path / "a") == ["step-00000008", "step-00000010"]
    # eval at every save; keep_best=eval/loss in max mode keeps the worst-loss (earliest) one too
    resume_run.run(str(tmp_path / "b"), steps=10, save_every=2, eval_every=2, keep_last=1,
                   keep_best="eval/loss", keep_best_mode="max")
    kept = ckpts(tmp_path / "b")
    assert kept[-1] == "step-00000010" and len(kept) == 2
    losses = logged(tmp_path / "b", "eval/loss")
    assert int(kept[0][5:]) == max(losses, key=losses.get)


# ----------------------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_stop_mid_epoch_and_resume_is_bit_identical(tmp_path, reference, dropout):
    out = str(tmp_path)
    with pytest.raises(Preempted) as stop:
        resume_run.run(out, dropout=dropout, stop_at=6)  # step 6 is mid-epoch (4 steps per epoch)
    assert stop.value.code == PREEMPTED_EXIT_CODE
    assert ckpts(tmp_path) == ["step-00000006"]
    resumed = resume_run.run(out, dropout=dropout)
    assert resumed["resumed_from"].endswith("step-00000006")
    assert resumed["steps"] == list(range(7, 11))
    ref = reference[dropout]
    assert_same_run(resumed, ref)
    assert resumed["lrs"] == ref["lrs"][6:]
    assert resumed["losses"] == ref["losses"][6:]
    # TensorBoard holds both runs' events: steps 1-6, then 7-10 from the resumed run
    assert logged(tmp_path, "train/loss") == pytest.approx({s + 1: v for s, v in enumerate(ref["losses"])}, rel=1e-6)


@pytest.mark.processes
def test_two_processes_stop_on_one_rank_and_resume_bit_identical(tmp_path):
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    launch([*WORKER, json.dumps({"out_dir": str(ref_dir), "dropout": 0.2})], nproc=2)
    proc = launch([*WORKER, json.dumps({"out_dir": str(run_dir), "dropout": 0.2, "stop_at": 5,
                                        "signal_name": "SIGUSR1", "signal_rank": 1})], nproc=2, check=False)
    assert proc.returncode != 0  # torchrun reports the workers' exit code 75 as a failure
    assert "stopped by a signal on another rank after optimizer step 5" in proc.stdout  # rank 0 got none
    assert "exitcode  : 75" in proc.stderr and ckpts(run_dir) == ["step-00000005"]
    assert sorted(p.name for p in (run_dir / "checkpoints" / "step-00000005").glob("rng-rank*.safetensors")) == [
        "rng-rank0.safetensors", "rng-rank1.safetensors"]
    launch([*WORKER, json.dumps({"out_dir": str(run_dir), "dropout": 0.2})], nproc=2)
    ref, resumed = load_result(ref_dir), load_result(run_dir)
    assert ref["num_processes"] == resumed["num_processes"] == 2
    assert resumed["steps"] == list(range(6, 11))
    assert_same_run(resumed, ref)
    assert resumed["losses"] == ref["losses"][5:]


@pytest.mark.processes
def test_resume_two_processes_on_one(tmp_path, reference):
    launch([*WORKER, json.dumps({"out_dir": str(tmp_path), "stop_at": 6})], nproc=2, check=False)
    assert ckpts(tmp_path) == ["step-00000006"]
    resumed = resume_run.run(str(tmp_path))
    assert resumed["steps"] == list(range(7, 11))
    assert_same_run(resumed, reference[0.0], exact=False)
    assert resumed["lrs"] == reference[0.0]["lrs"][6:]


@pytest.mark.processes
def test_a_dataset_beyond_eager_max_resumes_exactly_on_another_world_size(tmp_path):
    """The Feistel order (a dataset of 4.2M samples and more, made per window): 2 processes stop after step 3
    and 1 process resumes; the same run as 1 process uninterrupted."""
    big = {"lazy_len": EAGER_MAX + 5, "steps": 5}
    ref = resume_run.run(str(tmp_path / "ref"), **big)
    launch([*WORKER, json.dumps({"out_dir": str(tmp_path / "run"), "stop_at": 3, **big})], nproc=2, check=False)
    assert ckpts(tmp_path / "run") == ["step-00000003"]
    plan = json.loads((tmp_path / "run" / "checkpoints" / "step-00000003" / "trainer_state.json").read_text())["plan"]
    assert plan["order"] == "feistel" and plan["world_size"] == 2
    resumed = resume_run.run(str(tmp_path / "run"), **big)
    assert ref["num_processes"] == resumed["num_processes"] == 1 and resumed["steps"] == [4, 5]
    assert_same_run(resumed, ref, exact=False)
    assert resumed["losses"] == pytest.approx(ref["losses"][3:], rel=1e-5)


@pytest.mark.processes
def test_resume_one_process_on_two(tmp_path, reference):
    with pytest.raises(Preempted):
        resume_run.run(str(tmp_path), stop_at=5)
    launch([*WORKER, json.dumps({"out_dir": str(tmp_path)})], nproc=2)
    resumed = load_result(tmp_path)
    assert resumed["num_processes"] == 2 and resumed["steps"] == list(range(6, 11))
    assert_same_run(resumed, reference[0.0], exact=False)
    assert resumed["lrs"] == pytest.approx(reference[0.0]["lrs"][5:], rel=1e-12)


# ----------------------------------------------------------------------------------------- crashes


def start_worker(out: Path, env: dict, **options) -> subprocess.Popen:
    import os

    return subprocess.Popen([sys.executable, *WORKER, json.dumps({"out_dir": str(out), **options})], cwd=ROOT,
                            env=dict(os.environ, **env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


@pytest.mark.processes
def test_kill_9_during_a_save_keeps_the_previous_checkpoint(tmp_path, reference):
    proc = start_worker(tmp_path, {ENV: "0.3"}, save_every=3)
    staging = tmp_path / "checkpoints" / "step-00000006.tmp"
    deadline = time.time() + 120
    while not (staging / "model.safetensors").exists():  # the second save is half-way
        assert time.time() < deadline and proc.poll() is None, proc.stdout.read().decode()
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert staging.is_dir() and ckpts(tmp_path) == ["step-00000003"]
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step-00000003"
    verify(tmp_path / "checkpoints" / "step-00000003")
    resumed = resume_run.run(str(tmp_path), save_every=3)
    assert resumed["resumed_from"].endswith("step-00000003")
    assert not staging.exists()  # the half-written one was cleaned up
    assert_same_run(resumed, reference[0.0])


@pytest.mark.processes
def test_kill_9_during_training_resumes_exactly(tmp_path, reference):
    proc = start_worker(tmp_path, {}, save_every=4, kill_at=7)
    assert proc.wait(timeout=120) == -signal.SIGKILL
    assert ckpts(tmp_path) == ["step-00000004"]
    resumed = resume_run.run(str(tmp_path), save_every=4)
    assert resumed["steps"] == list(range(5, 11))
    assert_same_run(resumed, reference[0.0])


# ----------------------------------------------------------------------------------------- corruption


@pytest.fixture
def two_checkpoints(tmp_path):
    resume_run.run(str(tmp_path), steps=6, save_every=3)
    return tmp_path, tmp_path / "checkpoints" / "step-00000003", tmp_path / "checkpoints" / "step-00000006"


@pytest.mark.parametrize("damage", ["truncate", "bitflip", "delete"])
def test_damaged_newest_checkpoint_is_named_and_skipped(two_checkpoints, damage):
    out, older, newest = two_checkpoints
    target = newest / "optimizer.safetensors"
    data = bytearray(target.read_bytes())
    if damage == "truncate":
        target.write_bytes(data[: len(data) // 2])
    elif damage == "bitflip":
        data[len(data) - 5] ^= 0x01
        target.write_bytes(bytes(data))
    else:
        target.unlink()
    with pytest.raises(CheckpointError, match="optimizer.safetensors"):
        verify(newest)
    path, skipped = find_resumable(out)
    assert path == older and len(skipped) == 1 and "optimizer.safetensors" in skipped[0]
    with pytest.raises(CheckpointError, match="optimizer.safetensors"):
        resume_run.run(str(out), steps=8, resume=str(newest))
    with pytest.warns(UserWarning, match="optimizer.safetensors"):
        resumed = resume_run.run(str(out), steps=6, save_every=3)
    assert resumed["resumed_from"] == str(older) and resumed["steps"] == [4, 5, 6]
    verify(newest)  # replaced by the retrained step 6


def test_model_that_does_not_fit_lists_every_mismatch(two_checkpoints):
    out, _, newest = two_checkpoints
    with pytest.raises(CheckpointError) as err:
        resume_run.run(str(out), steps=8, width=8)
    message = str(err.value)
    assert "shape mismatches" in message and "hidden.weight: checkpoint (16, 16), model (8, 8)" in message
    assert "embed.weight: checkpoint (32, 16), model (32, 8)" in message and "norm.bias" in message


def test_plan_change_is_refused_with_a_diff_unless_allowed(two_checkpoints):
    out, _, _ = two_checkpoints
    with pytest.raises(ConfigError) as err:
        resume_run.run(str(out), steps=8, seed=1, micro=4)
    assert err.value.field == "resume" and "seed: 0 -> 1" in str(err.value)
    resumed = resume_run.run(str(out), steps=8, seed=1, allow_plan_change=True)
    assert resumed["steps"] == [7, 8]


def test_resume_none_refuses_existing_checkpoints_unless_overwrite(two_checkpoints):
    out, _, _ = two_checkpoints
    with pytest.raises(ConfigError) as err:
        resume_run.run(str(out), steps=3, resume="none")
    assert err.value.field == "resume" and "overwrite=true" in str(err.value)
    fresh = resume_run.run(str(out), steps=3, resume="none", overwrite=True)
    assert fresh["steps"] == [1, 2, 3] and ckpts(out) == ["step-00000003"]


# ----------------------------------------------------------------------------------------- non-finite


def test_nan_policy_skip_skips_the_update_and_the_schedule(tmp_path, reference):
    result = resume_run.run(str(tmp_path), steps=6, nan_at=3)
    assert result["state"]["skipped_steps"] == 1 and result["state"]["schedule_step"] == 5
    assert result["lrs"][3] == result["lrs"][2]  # the schedule did not advance past the skipped step
    assert logged(tmp_path, "train/skipped_steps")[3] == 1.0


def test_nan_policy_halt_names_the_step_and_keeps_the_checkpoint(tmp_path):
    with pytest.raises(NonFiniteError, match="optimizer step 5") as err:
        resume_run.run(str(tmp_path), steps=8, save_every=4, nan_at=5, nan_policy="halt")
    assert "step-00000004" in str(err.value)
    assert ckpts(tmp_path) == ["step-00000004"]
    verify(tmp_path / "checkpoints" / "step-00000004")


def test_too_many_skipped_steps_in_a_row_halt(tmp_path):
    with pytest.raises(NonFiniteError, match="max_skipped_steps"):
        resume_run.run(str(tmp_path), steps=8, nan_at=3, max_skipped_steps=1)


# ----------------------------------------------------------------------------------------- async save


def test_async_save_writes_the_same_checkpoints_in_the_background(tmp_path):
    sync = resume_run.run(str(tmp_path / "sync"), save_every=3)
    asynchronous = resume_run.run(str(tmp_path / "async"), save_every=3, async_save=True)
    assert_same_run(sync, asynchronous)
    assert ckpts(tmp_path / "async") == ckpts(tmp_path / "sync") == ["step-00000009", "step-00000010"]
    for step in ckpts(tmp_path / "async"):
        verify(tmp_path / "async" / "checkpoints" / step)
    for name in ("model.safetensors", "optimizer.safetensors", "rng-rank0.safetensors"):
        assert (tmp_path / "async" / "checkpoints" / "step-00000009" / name).read_bytes() == \
            (tmp_path / "sync" / "checkpoints" / "step-00000009" / name).read_bytes()


def test_async_save_returns_before_the_commit(tmp_path, monkeypatch):
    slow_saves(0.3, monkeypatch)  # the writing thread sleeps 0.3 s per file
    engine_box = {}

    class SaveAt2(resume_run.Callback):
        def after_step(self, engine):
            if engine.state.step == 2:
                engine.save()
                engine_box["committed_at_return"] = (tmp_path / "checkpoints" / "step-00000002").exists()
                engine.checkpointer.wait()
                engine_box["committed_after_wait"] = (tmp_path / "checkpoints" / "step-00000002").exists()

    from acctrain import Engine, TrainConfig
    from tests.support.tiny import VarLenTokens, collate, make_model, token_loss

    cfg = TrainConfig(output_dir=str(tmp_path), global_batch_size=8, micro_batch_size=8, max_steps=3,
                      async_save=True)
    engine = Engine(make_model(), cfg, VarLenTokens(26), loss_fn=token_loss, collate_fn=collate,
                    callbacks=[SaveAt2()])
    engine.fit()
    assert engine_box == {"committed_at_return": False, "committed_after_wait": True}
    writer = engine.checkpointer.writer
    assert writer.reservation is None and len(writer.buffers) > 0  # reserved after step 1, used at 2
    verify(tmp_path / "checkpoints" / "step-00000002")


def test_an_error_during_an_async_save_lets_that_checkpoint_complete(tmp_path, monkeypatch):
    from acctrain import Engine, TrainConfig
    from tests.support.tiny import VarLenTokens, collate, make_model, token_loss

    slow_saves(0.3, monkeypatch)  # the save of step 2 is still being written at step 3

    class FailAt3(resume_run.Callback):
        def after_step(self, engine):
            if engine.state.step == 3:
                raise RuntimeError("a bug in user code")

    cfg = TrainConfig(output_dir=str(tmp_path), global_batch_size=8, micro_batch_size=8, max_steps=6,
                      save_every=2, async_save=True)
    engine = Engine(make_model(), cfg, VarLenTokens(26), loss_fn=token_loss, collate_fn=collate, callbacks=[FailAt3()])
    with pytest.raises(RuntimeError, match="a bug in user code"):
        engine.fit()
    assert ckpts(tmp_path) == ["step-00000002"]
    verify(tmp_path / "checkpoints" / "step-00000002")


@pytest.mark.processes
def test_an_async_save_in_flight_at_interpreter_exit_completes(tmp_path):
    script = f"""
from acctrain import Engine, TrainConfig
from tests.support.slow_save import slow_saves_from_env
from tests.support.tiny import VarLenTokens, collate, make_model, token_loss
slow_saves_from_env()
cfg = TrainConfig(output_dir={str(tmp_path)!r}, global_batch_size=8, micro_batch_size=8, max_steps=2, async_save=True)
Engine(make_model(), cfg, VarLenTokens(26), loss_fn=token_loss, collate_fn=collate).save()
print("main thread done", flush=True)
"""
    env = {**os.environ, ENV: "0.2"}
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "main thread done" in done.stdout, done.stderr
    assert ckpts(tmp_path) == ["step-00000000"], done.stderr
    verify(tmp_path / "checkpoints" / "step-00000000")


@pytest.mark.processes
def test_async_save_with_two_processes_resumes_exactly(tmp_path, reference):
    launch([*WORKER, json.dumps({"out_dir": str(tmp_path), "stop_at": 5, "async_save": True, "save_every": 2})],
           nproc=2, check=False)
    assert ckpts(tmp_path) == ["step-00000004", "step-00000005"]
    for name in ckpts(tmp_path):
        verify(tmp_path / "checkpoints" / name)
    launch([*WORKER, json.dumps({"out_dir": str(tmp_path), "async_save": True, "save_every": 2})], nproc=2)
    resumed = load_result(tmp_path)
    assert resumed["steps"] == list(range(6, 11))
    assert_same_run(resumed, reference[0.0], exact=False)
