"""The gradient of an optimizer step equals the full-batch gradient, for any processes and accumulation.

Token-weighted loss with variable lengths and ignored positions; 17 samples with a global batch of 8, so
every epoch ends in a window of one sample (with 2 processes, one rank only pads). Reference: full-batch
SGD in float64 (tests/support/tiny.py). A mean-of-means or per-rank normalisation is off by 8-50 % here.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from acctrain.data import DataPlan
from tests.support import CLIP, LAUNCH_ON_CPU, launch, reference, scalar_tags, scalars
from tests.support.tiny import VarLenTokens, make_model, reference_sgd, rel_diff
from tests.workers import grad_run


@pytest.fixture(scope="module")
def two_process_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    launch(["-m", "tests.workers.grad_run", str(out), "2", "0", str(CLIP)], nproc=2)
    runs = {
        clip: (json.loads((out / f"clip-{clip}.json").read_text()), load_file(out / f"params-clip-{clip}.safetensors"))
        for clip in (0.0, CLIP)
    }
    return dict(runs, dir=out)


@pytest.mark.parametrize("micro", [8, 2], ids=["no-accumulation", "accumulation-4"])
def test_single_process_matches_full_batch(tmp_path, micro):
    result = grad_run.run(str(tmp_path), micro, 0.0)
    ref_params, ref_norms = reference(0.0)
    assert result["accumulation"] == 8 // micro
    assert rel_diff(result["params"], ref_params) < 1e-6
    assert result["grad_norms"] == pytest.approx(ref_norms, rel=1e-5)


@pytest.mark.processes
def test_two_processes_match_full_batch(two_process_runs):
    meta, params = two_process_runs[0.0]
    assert meta["num_processes"] == meta["world_size_env"] == 2
    on_gpus = torch.cuda.is_available() and not LAUNCH_ON_CPU  # 2+ GPUs: the launch uses NCCL
    assert meta["distributed_type"] == f"DistributedType.{'MULTI_GPU' if on_gpus else 'MULTI_CPU'}"
    assert meta["accumulation"] == 2
    ref_params, ref_norms = reference(0.0)
    assert rel_diff(params, ref_params) < 1e-6
    assert meta["grad_norms"] == pytest.approx(ref_norms, rel=1e-5)


def test_reference_is_sensitive_to_normalisation():
    """A control: normalising each window by the nominal size instead of its own count moves the result far."""
    ref_params, _ = reference(0.0)
    torch.manual_seed(0)
    wrong = make_model(0)
    plan = DataPlan(grad_run.DATASET_LEN, 8, 8, 1, seed=0, epochs=grad_run.EPOCHS)
    wrong_params, _ = reference_sgd(wrong, VarLenTokens(grad_run.DATASET_LEN), plan, grad_run.LR * 1.01)
    assert rel_diff(wrong_params, ref_params) > 1e-4  # a 1 % lr error is 100x the tolerance


@pytest.mark.processes
def test_no_allreduce_on_non_final_micro_batches(two_process_runs):
    meta, _ = two_process_runs[0.0]
    micro = meta["per_micro"]
    non_final = [m for m in micro if not m[2]]
    final = [m for m in micro if m[2]]
    assert len(final) == meta["total_steps"]
    assert non_final, "the run should have accumulation micro-batches"
    assert all(count == 0 for *_, count in non_final)
    assert all(count >= 1 for *_, count in final)


def test_clipping_once_on_global_norm_single_process(tmp_path):
    result = grad_run.run(str(tmp_path), 2, CLIP)
    ref_params, ref_norms = reference(CLIP)
    assert min(ref_norms) > CLIP  # clipping really acts on every step
    assert result["grad_norms"] == pytest.approx(ref_norms, rel=1e-5)  # the reported norm is the pre-clip one
    assert rel_diff(result["params"], ref_params) < 1e-6


@pytest.mark.processes
def test_clipping_once_on_global_norm_two_processes(two_process_runs):
    meta, params = two_process_runs[CLIP]
    ref_params, ref_norms = reference(CLIP)
    assert meta["grad_norms"] == pytest.approx(ref_norms, rel=1e-5)
    assert rel_diff(params, ref_params) < 1e-6


@pytest.mark.processes
def test_logged_loss_is_the_exact_step_mean(two_process_runs, tmp_path):
    """TensorBoard's train/loss of the 2-process run is the full-batch token mean of each step."""
    reference(0.0)
    out = two_process_runs["dir"] / "run-clip-0.0"
    logged = [v for _, v in scalars(out, "train/loss")]
    assert logged == pytest.approx(reference_sgd.losses, rel=1e-6)
    tags = scalar_tags(out)
    assert {"train/samples_per_s", "train/tokens_per_s", "train/step_time_s", "train/peak_memory_gb",
            "train/grad_norm", "train/lr", "train/skipped_steps"} <= tags
