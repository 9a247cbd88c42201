"""Sharded FSDP2 checkpoints (acctrain.checkpoint.sharded): save at 2 processes, load at 2 and at 1, export, no pickles.

The FSDP2 runs are real: 2 (or 1) processes under torchrun, gloo on CPU, Accelerate's own FSDP2 prepare
(made reachable on CPU by `use_fsdp2_on_cpu`; Accelerate 1.15 drops `fsdp_plugin` on MULTI_CPU).
"""

from __future__ import annotations

import json
import shutil
import struct

import pytest
import torch
from safetensors.torch import load_file

from tests.support import launch

pytest.importorskip("torch.distributed.checkpoint.hf_storage", reason="HuggingFaceStorageWriter needs torch >= 2.8")

from acctrain.checkpoint.sharded import MANIFEST, full_state, load_sharded, save_sharded  # noqa: E402

from tests.workers.fsdp_run import make_model  # noqa: E402

WORKER = ["-m", "tests.workers.fsdp_run"]  # run from ROOT as a module (torchrun -m)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Train 3 steps under FSDP2 at 2 processes and save; load that checkpoint at 2 and at 1 process."""
    base = tmp_path_factory.mktemp("fsdp")
    ckpt, ref = base / "ckpt", base / "ref"
    ref.mkdir()
    launch([*WORKER, "save", str(ckpt), str(ref)], nproc=2)
    launch([*WORKER, "load", str(ckpt), str(ref)], nproc=2)
    launch([*WORKER, "load", str(ckpt), str(ref)], nproc=1)
    return ckpt, ref


def assert_same(got: dict, want: dict):
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k


@pytest.mark.processes
def test_checkpoint_is_sharded_safetensors(runs):
    ckpt, _ = runs
    assert sorted(p.name for p in (ckpt / "model").iterdir()) == [
        "shard-00001-model-00001-of-00001.safetensors", "shard-00002-model-00001-of-00001.safetensors"]
    assert len(list((ckpt / "optim").iterdir())) == 2
    assert json.loads((ckpt / MANIFEST).read_text())["world_size"] == 2


@pytest.mark.processes
@pytest.mark.parametrize("world", [2, 1])
def test_load_restores_model_and_optimizer_exactly(runs, world):
    _, ref = runs
    assert_same(load_file(ref / f"loaded-{world}-model.safetensors"), load_file(ref / "saved-model.safetensors"))
    assert_same(load_file(ref / f"loaded-{world}-optim.safetensors"), load_file(ref / "saved-optim.safetensors"))
    saved = json.loads((ref / "saved-hparams.json").read_text())
    assert json.loads((ref / f"loaded-{world}-hparams.json").read_text()) == saved  # values and types (tuple betas)
    assert saved["param_groups.hidden.weight.betas"] == [0.8, 0.95]


@pytest.mark.processes
def test_training_resumes_where_it_stopped(runs):
    _, ref = runs
    continued = load_file(ref / "continued-2.safetensors")  # the original run, 2 steps past the save
    assert_same(load_file(ref / "resumed-2.safetensors"), continued)  # same world size: bitwise
    for k, v in load_file(ref / "resumed-1.safetensors").items():  # resharded: equal within float tolerance
        torch.testing.assert_close(v, continued[k], rtol=0, atol=1e-6)


@pytest.mark.processes
def test_no_file_is_a_pickle(runs):
    ckpt, _ = runs
    files = [p for p in ckpt.rglob("*") if p.is_file()]
    assert len(files) == 5 and not any(p.name.endswith(".metadata") for p in files)
    for path in files:
        data = path.read_bytes()
        assert not data.startswith(b"\x80") and not data.startswith(b"PK"), path  # pickle / torch.save zip
        if path.suffix == ".safetensors":
            (n,) = struct.unpack("<Q", data[:8])
            assert data[8:9] == b"{" and isinstance(json.loads(data[8 : 8 + n]), dict), path
        else:
            assert path.name == MANIFEST and isinstance(json.loads(data), dict), path


@pytest.mark.processes
def test_the_shards_join_into_whole_tensors_with_plain_names(runs):
    ckpt, ref = runs
    weights = full_state(ckpt)  # what `acctrain export` writes of a sharded checkpoint
    assert_same(weights, load_file(ref / "saved-model.safetensors"))
    model = make_model(seed=3)
    model.load_state_dict(weights, strict=True)
    assert_same({k: v.detach() for k, v in model.state_dict().items()}, weights)


@pytest.mark.processes
def test_lost_or_stale_shards_are_refused(runs, tmp_path):
    ckpt, _ = runs
    lost = tmp_path / "lost"
    shutil.copytree(ckpt, lost)
    (lost / "model" / "shard-00002-model-00001-of-00001.safetensors").unlink()
    with pytest.raises(ValueError, match="elements of|missing"):
        full_state(lost)
    with pytest.raises(FileExistsError):  # would mix old shards into the new checkpoint
        save_sharded(_single(), make_model(0), None, ckpt)


def _single():
    from accelerate import Accelerator

    return Accelerator(cpu=True)


def test_same_format_without_fsdp(tmp_path):
    """One process, no process group: the same files, loadable and exportable (fast, no launch)."""
    accelerator = _single()
    model = make_model(seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.tensor([[1, 2, 3]])).sum().backward()
    optimizer.step()
    save_sharded(accelerator, model, optimizer, tmp_path / "ckpt")
    other = make_model(seed=5)
    other_opt = torch.optim.AdamW(other.parameters(), lr=0.3)
    load_sharded(accelerator, other, other_opt, tmp_path / "ckpt")
    assert_same(other.state_dict(), model.state_dict())
    assert other_opt.param_groups[0]["lr"] == 0.1 and other_opt.param_groups[0]["betas"] == (0.9, 0.999)
    assert_same(other_opt.state_dict()["state"][0], optimizer.state_dict()["state"][0])
    assert_same(full_state(tmp_path / "ckpt"), model.state_dict())
