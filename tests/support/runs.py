"""What several test files compare: the tiny main job's arguments, a run's checkpoints and results, and the
full-batch reference of the gradient runs (tests/workers/grad_run.py)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import torch
import xxhash
from safetensors.torch import load_file

from tests.support.processes import CPU_ARGS
from tests.support.tiny import VarLenTokens, make_model, reference_sgd, rel_diff

# ---- the main job (train.py) at a tiny size: test_main_job, test_launch, test_gpu -----------------------------

STEPS = 6
TINY = [
    f"max_steps={STEPS}", "log_every=2", "eval_every=3", "global_batch_size=8", "micro_batch_size=4",
    "data.max_bytes=20000", "model.d_model=32", "model.n_layers=1", "model.n_heads=2", "model.context_len=32",
    *CPU_ARGS,  # one device for the 1- and 2-process runs they compare: CPU/gloo unless there are 2 GPUs
]

# ---- checkpointed runs (tests/workers/resume_run.py): test_checkpoint, test_engine_fsdp, test_step_verdict, test_gpu


def final_checkpoint_tensors(out: Path, steps: int) -> dict[str, torch.Tensor]:
    """The model and optimizer tensors of `out`'s newest checkpoint, which must be that of step `steps`
    (the optimizer's names prefixed `optimizer.`)."""
    latest = (out / "checkpoints" / "latest").read_text().strip()
    assert latest == f"step-{steps:08d}", latest
    ckpt = out / "checkpoints" / latest
    return {**load_file(ckpt / "model.safetensors"),
            **{f"optimizer.{k}": v for k, v in load_file(ckpt / "optimizer.safetensors").items()}}


def assert_bitwise(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """The same names, and every tensor of the same dtype and bit for bit equal."""
    assert set(a) == set(b)
    differ = [name for name in a if not (a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]))]
    assert not differ, f"{len(differ)} of {len(a)} tensors differ, e.g. {differ[:3]}"


def ckpts(out: Path) -> list[str]:
    """Complete checkpoint directories (a half-written one is still named step-N.tmp)."""
    return sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("step-") and "." not in p.name)


def assert_same_run(a: dict, b: dict, exact: bool = True):
    """Final parameters and optimizer state: bitwise equal, or within 1e-5 relative across world sizes."""
    if exact:
        assert set(a["tensors"]) == set(b["tensors"])
        for name in a["tensors"]:
            assert torch.equal(a["tensors"][name], b["tensors"][name]), name
    else:
        params = lambda r: {k: v for k, v in r["tensors"].items() if k.startswith("param.")}  # noqa: E731
        assert set(params(a)) == set(params(b))
        assert rel_diff(params(a), params(b)) < 1e-5


def load_result(out: Path) -> dict:
    result = json.loads((out / "result.json").read_text())
    result["tensors"] = load_file(out / "result.safetensors")
    return result


# ---- gradient runs (tests/workers/grad_run.py): test_engine_gradients, test_engine_fsdp -----------------------

CLIP = 0.05  # well below the gradient norms of this problem, so clipping is active on every step


def reference(clip: float):
    """grad_run's problem trained by full-batch SGD in float64: (final parameters, pre-clip norm of every step)."""
    from acctrain.data import DataPlan
    from tests.workers import grad_run  # here, not at the top: grad_run itself imports tests.support

    plan = DataPlan(grad_run.DATASET_LEN, grad_run.GLOBAL_BATCH, grad_run.GLOBAL_BATCH, 1, seed=0, epochs=grad_run.EPOCHS)
    return reference_sgd(make_model(0), VarLenTokens(grad_run.DATASET_LEN), plan, grad_run.LR, clip)


# ---- copies of checkpointed runs, altered (the `six` fixture: tests/conftest.py) -------------------------------


def copy_of(six, tmp_path) -> Path:
    """A copy of the `six` fixture's run directory, for a test to alter."""
    shutil.copytree(six[0], tmp_path / "run")
    return tmp_path / "run"


def reference_digest(data: bytes) -> str:
    """The manifest's digest from its definition: XXH3-128 of the XXH3-128 digests of the 64 MiB chunks."""
    chunks = [data[i:i + 64 * 2**20] for i in range(0, len(data), 64 * 2**20)]
    return xxhash.xxh3_128(b"".join(xxhash.xxh3_128(c).digest() for c in chunks)).hexdigest()


def rewrite(ckpt: Path, name: str, content: bytes) -> None:
    """Replace a file of a checkpoint and its manifest entry, so that the checkpoint still verifies its digests."""
    (ckpt / name).write_bytes(content)
    manifest = json.loads((ckpt / "manifest.json").read_text())
    algorithm = manifest.get("hash", "sha256")
    digest = hashlib.sha256(content).hexdigest() if algorithm == "sha256" else reference_digest(content)
    manifest["files"][name] = {"size": len(content), algorithm: digest}
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
