"""The Engine under FSDP2 on 2 CPU processes: full-batch gradients, sharded checkpoints that resume at
2 and at 1 process, and `acctrain export`. (The sharded format itself: tests/test_fsdp.py.)"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from tests.support import CLIP, assert_same_run, ckpts, launch, load_result, reference
from tests.support.tiny import make_model, rel_diff
from tests.workers import resume_run

pytestmark = pytest.mark.processes  # every test here starts processes

WORKER = ["-m", "tests.workers.resume_run"]  # run from ROOT as a module (torchrun -m)


def test_fsdp_gradients_match_full_batch(tmp_path):
    launch(["-m", "tests.workers.grad_run", str(tmp_path), "2", "0", str(CLIP)], nproc=2,
           env={"GRAD_RUN_FSDP": "1"})
    for clip in (0.0, CLIP):
        meta = json.loads((tmp_path / f"clip-{clip}.json").read_text())
        assert meta["num_processes"] == meta["world_size_env"] == 2
        assert meta["distributed_type"] == "DistributedType.FSDP"
        ref_params, ref_norms = reference(clip)
        assert rel_diff(load_file(tmp_path / f"params-clip-{clip}.safetensors"), ref_params) < 1e-6
        assert meta["grad_norms"] == pytest.approx(ref_norms, rel=1e-5)


@pytest.fixture(scope="module")
def stopped_fsdp_run(tmp_path_factory):
    """Two FSDP processes stopped by SIGTERM after step 5: a sharded checkpoint."""
    base = tmp_path_factory.mktemp("fsdp")
    reference_run = resume_run.run(str(base / "ref"))  # uninterrupted, one process, no FSDP
    stopped = base / "stopped"
    launch([*WORKER, json.dumps({"out_dir": str(stopped), "stop_at": 5, "fsdp": True})], nproc=2, check=False)
    assert ckpts(stopped) == ["step-00000005"]
    return base, stopped, reference_run


@pytest.mark.parametrize("nproc", [2, 1])
def test_sharded_checkpoint_resumes_at_any_world_size(stopped_fsdp_run, tmp_path, nproc):
    import shutil

    _, stopped, reference_run = stopped_fsdp_run
    out = tmp_path / "run"
    shutil.copytree(stopped, out)
    ckpt = out / "checkpoints" / "step-00000005"
    assert sorted(p.name for p in (ckpt / "model").iterdir()) == [
        "shard-00001-model-00001-of-00001.safetensors", "shard-00002-model-00001-of-00001.safetensors"]
    launch([*WORKER, json.dumps({"out_dir": str(out), "fsdp": True})], nproc=nproc)
    resumed = load_result(out)
    assert resumed["num_processes"] == nproc and resumed["steps"] == list(range(6, 11))
    assert_same_run(resumed, reference_run, exact=False)


def test_export_joins_the_shards(stopped_fsdp_run, tmp_path):
    _, stopped, _ = stopped_fsdp_run
    out = tmp_path / "model.safetensors"
    proc = subprocess.run([sys.executable, "-m", "acctrain.cli", "export", str(stopped / "checkpoints" / "step-00000005"),
                           str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    weights = load_file(out)
    model = make_model(0)
    model.load_state_dict(weights, strict=True)  # plain names, full shapes


def test_export_refuses_a_damaged_checkpoint(stopped_fsdp_run, tmp_path):
    import shutil

    _, stopped, _ = stopped_fsdp_run
    ckpt = tmp_path / "ckpt"
    shutil.copytree(stopped / "checkpoints" / "step-00000005", ckpt)
    shard = next((ckpt / "model").iterdir())
    shard.write_bytes(shard.read_bytes()[:-3])
    proc = subprocess.run([sys.executable, "-m", "acctrain.cli", "export", str(ckpt), str(tmp_path / "m.safetensors")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and shard.name in proc.stderr
