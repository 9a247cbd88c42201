"""On a CUDA GPU (skipped without one): fp16 and bf16 for real, bit-identical resume with the CUDA RNG, async
saves from CUDA tensors, throughput metrics, NCCL with one process, the launch checks, compile (whole and by
regions) and fused AdamW, FP8 (on GPUs that have it) and its refusal (on those that do not).

`benchmarks/gpu_check.sh` runs this file first. The same step logic is tested without a GPU in
test_precision (a CPU GradScaler) and test_speed_options; this file is what only a GPU can show.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from acctrain import Engine, TrainConfig
from acctrain.errors import Preempted
from acctrain.tracking import peak_flops
from tests.support import ROOT, TINY, Recorder, assert_same_run, ckpts, free_port, launch, load_result, overflow_at, scalars
from tests.support.tiny import Stacked, VarLenTokens, collate, make_model, rel_diff, token_loss
from tests.workers import resume_run, verdict_run

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

GPU_TINY = [a for a in TINY if a != "cpu=true"]  # the main job, on the GPU whatever tests.support chose for launches


@pytest.fixture(autouse=True)
def deterministic():
    """Bit-identical comparisons: deterministic kernels where torch has them (warn elsewhere, don't fail)."""
    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    yield
    torch.use_deterministic_algorithms(before[0], warn_only=before[1])


def train(out, precision: str, steps: int = 6, loss_fn=token_loss, recorder=None, model=None, **config):
    """The tiny token model on cuda:0; returns the engine and its Recorder (scales, skipped counts)."""
    cfg = TrainConfig(**{**dict(output_dir=str(out), global_batch_size=8, micro_batch_size=4, max_steps=steps, lr=1e-2,
                                mixed_precision=precision, scheduler="warmup_linear", warmup_steps=2, log_every=1),
                         **config})
    recorder = recorder or Recorder()
    engine = Engine(model or make_model(0), cfg, VarLenTokens(64), loss_fn=loss_fn, collate_fn=collate,
                    callbacks=[recorder])
    engine.fit()
    return engine, recorder


def test_fp16_overflow_is_skipped_the_scale_lowered_and_training_goes_on(tmp_path, capsys):
    model = make_model(0)
    dtypes = []
    model.hidden.register_forward_hook(lambda mod, inp, out: dtypes.append(out.dtype))
    engine, rec = train(tmp_path, "fp16", loss_fn=overflow_at(3), model=model)
    assert set(dtypes) == {torch.float16}  # autocast ran the matmuls in fp16
    assert all(p.dtype == torch.float32 and p.is_cuda for p in engine.unwrapped_model.parameters())
    assert engine.state.step == 6 and engine.state.skipped_steps == 1 and engine.state.schedule_step == 5
    assert rec.scales == [65536.0, 65536.0, 32768.0, 32768.0, 32768.0, 32768.0]
    assert rec.skipped == [0, 0, 1, 1, 1, 1]
    assert "fp16 overflow at optimizer step 3" in capsys.readouterr().out
    assert all(torch.isfinite(p).all() for p in engine.unwrapped_model.parameters())
    assert [v for _, v in scalars(tmp_path, "train/skipped_steps")] == [0, 0, 1, 1, 1, 1]


def test_fp16_resume_is_bit_identical(tmp_path):
    full, full_rec = train(tmp_path / "full", "fp16", steps=8, loss_fn=overflow_at(2))
    with pytest.raises(Preempted):
        train(tmp_path / "split", "fp16", steps=8, loss_fn=overflow_at(2), recorder=Recorder(stop_at=4))
    resumed, rec = train(tmp_path / "split", "fp16", steps=8, loss_fn=overflow_at(99))
    assert str(resumed.resumed_from).endswith("step-00000004")
    assert full_rec.scales[3] == 32768.0 and rec.scales == full_rec.scales[4:]  # the scale came from the checkpoint
    assert resumed.step_ops.scaler.state_dict() == full.step_ops.scaler.state_dict()
    a, b = resumed.unwrapped_model.state_dict(), full.unwrapped_model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_bf16_on_cuda_with_fp32_master_weights(tmp_path):
    model = make_model(0)
    dtypes = []
    model.hidden.register_forward_hook(lambda mod, inp, out: dtypes.append(out.dtype))
    engine, _ = train(tmp_path / "bf16", "bf16", steps=12, model=model, scheduler="constant", warmup_steps=0)
    losses = [v for _, v in scalars(tmp_path / "bf16", "train/loss")]
    assert set(dtypes) == {torch.bfloat16}
    assert all(p.dtype == torch.float32 and p.is_cuda for p in engine.unwrapped_model.parameters())
    assert engine.step_ops.scaler is None  # bf16 needs no loss scaling
    train(tmp_path / "fp32", "no", steps=12, scheduler="constant", warmup_steps=0)
    fp32 = [v for _, v in scalars(tmp_path / "fp32", "train/loss")]
    assert sum(losses[-3:]) < sum(losses[:3])
    assert losses == pytest.approx(fp32, rel=2e-2)  # the same run but for bf16 rounding


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_resume_on_cuda_is_bit_identical_with_the_cuda_rng(tmp_path, dropout):
    reference = resume_run.run(str(tmp_path / "ref"), dropout=dropout, cpu=False)
    with pytest.raises(Preempted):
        resume_run.run(str(tmp_path / "run"), dropout=dropout, stop_at=6, cpu=False)
    rng = load_file(tmp_path / "run" / "checkpoints" / "step-00000006" / "rng-rank0.safetensors")
    assert "torch_cuda.0" in rng  # dropout on the GPU draws from the CUDA generator: saved and restored
    resumed = resume_run.run(str(tmp_path / "run"), dropout=dropout, cpu=False)
    assert resumed["steps"] == list(range(7, 11))
    assert_same_run(resumed, reference)


def test_async_save_from_cuda_tensors_writes_the_same_checkpoints(tmp_path):
    sync = resume_run.run(str(tmp_path / "sync"), save_every=3, cpu=False)
    asynchronous = resume_run.run(str(tmp_path / "async"), save_every=3, async_save=True, cpu=False)
    assert_same_run(sync, asynchronous)
    assert ckpts(tmp_path / "async") == ckpts(tmp_path / "sync") == ["step-00000009", "step-00000010"]
    for name in ("model.safetensors", "optimizer.safetensors"):
        assert (tmp_path / "async" / "checkpoints" / "step-00000009" / name).read_bytes() == \
            (tmp_path / "sync" / "checkpoints" / "step-00000009" / name).read_bytes()


def test_peak_memory_and_mfu_are_logged(tmp_path):
    model = make_model(0)
    model.flops_per_token = 6 * sum(p.numel() for p in model.parameters())  # what MFU is computed from
    train(tmp_path, "bf16", model=model)
    memory = [v for _, v in scalars(tmp_path, "train/peak_memory_gb")]
    assert memory and all(v > 0 for v in memory)
    if peak_flops(torch.device("cuda")) is None:
        pytest.skip(f"{torch.cuda.get_device_name()} is not in acctrain.tracking.PEAK_FLOPS: no MFU to log")
    mfu = [v for _, v in scalars(tmp_path, "train/mfu")]
    assert mfu and all(0 < v < 1 for v in mfu)


def gpu_env() -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    env.pop("ACCELERATE_USE_CPU", None)
    return env


@pytest.mark.processes
def test_one_process_ddp_over_nccl_matches_the_plain_gpu_run(tmp_path):
    """torchrun with one process: a real NCCL group of one (Accelerate does not wrap one process in DDP); the
    same weights as `python train.py`."""
    plain = subprocess.run([sys.executable, "train.py", f"output_dir={tmp_path / 'plain'}", *GPU_TINY], cwd=ROOT,
                           env=gpu_env(), capture_output=True, text=True, timeout=300)
    assert plain.returncode == 0, plain.stdout[-3000:] + plain.stderr[-3000:]
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_addr",
                          "127.0.0.1", "--master_port", str(free_port()), "train.py", f"output_dir={tmp_path / 'ddp'}",
                          *GPU_TINY], cwd=ROOT, env=gpu_env(), capture_output=True, text=True, timeout=300)
    assert ddp.returncode == 0, ddp.stdout[-3000:] + ddp.stderr[-3000:]
    assert "world_size=1," in ddp.stdout and ", backend=nccl, devices=cuda:0," in ddp.stdout, ddp.stdout
    assert ", backend=none, devices=cuda:0," in plain.stdout, plain.stdout
    weights = {name: load_file(tmp_path / name / "checkpoints" / "step-00000006" / "model.safetensors")
               for name in ("plain", "ddp")}
    assert rel_diff(weights["ddp"], weights["plain"]) < 1e-6


@pytest.mark.processes
def test_gloo_processes_beside_fewer_gpus_train_save_and_resume(tmp_path):
    """cpu=true with more processes than GPUs: every barrier stays on the CPU. Accelerate's wait_for_everyone
    put rank 1's barrier tensor on cuda:1, which a one-GPU machine does not have: rank 1 crashed at the
    first checkpoint while rank 0 waited (the suite's 2-process tests on an H100, benchmarks/gpu_check.sh)."""
    n = torch.cuda.device_count() + 1
    worker = ["-m", "tests.workers.resume_run"]
    launch([*worker, json.dumps({"out_dir": str(tmp_path / "ref"), "cpu": True})], nproc=n)
    proc = launch([*worker, json.dumps({"out_dir": str(tmp_path / "run"), "cpu": True, "stop_at": 5})], nproc=n,
                  check=False)
    assert proc.returncode != 0 and ckpts(tmp_path / "run") == ["step-00000005"], proc.stderr[:3000]
    launch([*worker, json.dumps({"out_dir": str(tmp_path / "run"), "cpu": True})], nproc=n)
    ref, resumed = load_result(tmp_path / "ref"), load_result(tmp_path / "run")
    assert ref["num_processes"] == resumed["num_processes"] == n
    assert resumed["steps"] == list(range(6, 11))
    assert_same_run(resumed, ref)


@pytest.mark.processes
@pytest.mark.skipif(torch.cuda.device_count() > 4, reason="launches one process more than there are GPUs")
def test_more_processes_than_gpus_is_refused_before_anything_is_written(tmp_path):
    n = torch.cuda.device_count() + 1
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "--master_addr",
                           "127.0.0.1", "--master_port", str(free_port()), "train.py", f"output_dir={out}", *GPU_TINY],
                          cwd=ROOT, env=gpu_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert f"config error: cpu: {n} processes on this node but {n - 1} visible GPU(s)" in proc.stderr, proc.stderr[-3000:]
    assert "CUDA_VISIBLE_DEVICES" in proc.stderr and "cpu=true" in proc.stderr
    assert not out.exists()


def test_accelerate_use_cpu_is_honoured(tmp_path, monkeypatch):
    """`ACCELERATE_USE_CPU=1` (what `use_cpu: true` and `--cpu` ask for) keeps the Engine on the CPU."""
    monkeypatch.setenv("ACCELERATE_USE_CPU", "1")
    engine = Engine(make_model(0), TrainConfig(output_dir=str(tmp_path), global_batch_size=8, micro_batch_size=4),
                    VarLenTokens(16), loss_fn=token_loss, collate_fn=collate)
    assert engine.accelerator.device.type == "cpu"
    assert all(not p.is_cuda for p in engine.unwrapped_model.parameters())


def test_compile_and_fused_adamw_on_cuda(tmp_path):
    import torch._dynamo

    torch._dynamo.reset()
    compiled, _ = train(tmp_path / "compiled", "bf16", compile=True)
    assert compiled.step_ops.optimizer.defaults["fused"] is True  # the default AdamW on CUDA
    saved = load_file(tmp_path / "compiled" / "checkpoints" / "step-00000006" / "model.safetensors")
    assert set(saved) == set(make_model(0).state_dict())  # plain names, no `_orig_mod.`
    eager, _ = train(tmp_path / "eager", "bf16")
    assert rel_diff(saved, {k: v.cpu() for k, v in eager.unwrapped_model.state_dict().items()}) < 1e-2
    torch._dynamo.reset()


@pytest.mark.parametrize("nan_at", [None, 3], ids=["finite", "nan-at-step-3"])
def test_verdict_read_a_step_late_on_cuda_is_the_synchronous_run(tmp_path, nan_at):
    """The fused-AdamW path that does not wait for the GPU (found_inf skips on the device, pinned readback)
    against the same run read at once: the same counters, weights and checkpoints on cuda:0."""
    late = verdict_run.run(str(tmp_path / "late"), on_device=True, nan_at=nan_at, cpu=False)
    now = verdict_run.run(str(tmp_path / "now"), on_device=False, nan_at=nan_at, cpu=False)
    assert late["verdict_on_device"] and not now["verdict_on_device"] and late["state"] == now["state"]
    assert late["state"]["skipped_steps"] == (nan_at is not None)
    a, b = (load_file(tmp_path / name / "result.safetensors") for name in ("late", "now"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert ckpts(tmp_path / "late") == ckpts(tmp_path / "now") == ["step-00000006", "step-00000008"]  # save_every=3, keep_last=2


def test_an_fp16_overflow_skipped_step_does_not_update_the_ema(tmp_path):
    from acctrain.ema import EMA
    from tests.test_ema import by_hand
    from tests.workers.ema_run import Weights

    ema, seen = EMA(decay=0.9), Weights(every_step=True)
    cfg = TrainConfig(output_dir=str(tmp_path), global_batch_size=8, micro_batch_size=4, max_steps=6, lr=1e-2,
                      mixed_precision="fp16", warmup_steps=2, log_every=1)
    engine = Engine(make_model(0), cfg, VarLenTokens(64), loss_fn=overflow_at(3), collate_fn=collate,
                    callbacks=[ema, seen])
    engine.fit()
    assert engine.state.skipped_steps == 1 and engine.state.schedule_step == 5
    expected, updates = by_hand(seen, 0.9, True, 1)
    assert ema.updates == updates == 5
    for name, value in expected.items():
        assert ema.weights[name].is_cuda and ema.weights[name].dtype == torch.float32
        assert torch.allclose(ema.weights[name].double().cpu(), value.cpu(), rtol=1e-6, atol=1e-7), name


FP8 = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)


@pytest.mark.skipif(not FP8, reason="needs a GPU of compute capability 8.9 or later (FP8 tensor cores)")
def test_fp8_trains_lists_its_bf16_layers_and_resumes_in_bf16_and_back(tmp_path, capsys):
    pytest.importorskip("torchao", reason="fp8 trains through torchao: pip install \"acctrain[fp8]\"")
    from torchao.float8.float8_linear import Float8Linear

    engine, _ = train(tmp_path / "fp8", "fp8", steps=4, model=Stacked(width=32), save_every=2)
    model = engine.unwrapped_model
    # the first and the last Linear stay in bf16 (Accelerate's torchao recipe), the two between run in FP8
    assert [isinstance(block[1], Float8Linear) for block in model.blocks] == [False, True, True]
    assert not isinstance(model.head, Float8Linear)
    assert "precision=fp8 (2 of 4 Linear layers in FP8; bf16: blocks.0.1, head)" in capsys.readouterr().out
    assert all(math.isfinite(v) for v in engine.metrics.last.values() if isinstance(v, float))
    saved = load_file(tmp_path / "fp8" / "checkpoints" / "step-00000002" / "model.safetensors")
    plain = Stacked(width=32).state_dict()
    assert set(saved) == set(plain) and all(saved[k].dtype == plain[k].dtype == torch.float32 for k in plain)

    # an FP8 checkpoint resumes in bf16, and a bf16 one in FP8
    bf16, _ = train(tmp_path / "fp8", "bf16", steps=4, model=Stacked(width=32), resume=str(
        tmp_path / "fp8" / "checkpoints" / "step-00000002"), output_dir=str(tmp_path / "bf16-from-fp8"))
    assert bf16.state.step == 4 and "the checkpoint's run: 'fp8'" in capsys.readouterr().out
    back, _ = train(tmp_path / "back", "fp8", steps=6, model=Stacked(width=32), resume=str(
        tmp_path / "bf16-from-fp8" / "checkpoints" / "step-00000004"))
    assert back.state.step == 6 and "the checkpoint's run: 'bf16'" in capsys.readouterr().out


@pytest.mark.skipif(FP8, reason="this GPU has FP8: the refusal is for GPUs before compute capability 8.9")
def test_fp8_is_refused_on_a_gpu_without_fp8_before_anything_is_written(tmp_path):
    from acctrain.errors import ConfigError

    with pytest.raises(ConfigError, match="compute capability 8.9") as err:
        train(tmp_path / "out", "fp8")
    assert err.value.field == "mixed_precision" and not (tmp_path / "out").exists()


def test_compile_regions_on_cuda_trains_like_eager(tmp_path, capsys):
    import torch._dynamo

    torch._dynamo.reset()
    regions, _ = train(tmp_path / "regions", "bf16", model=Stacked(), compile="regions")
    assert "compile=regions (3 x Sequential)" in capsys.readouterr().out
    eager, _ = train(tmp_path / "eager", "bf16", model=Stacked())
    state = lambda e: {k: v.cpu() for k, v in e.unwrapped_model.state_dict().items()}  # noqa: E731
    assert rel_diff(state(regions), state(eager)) < 1e-2
    torch._dynamo.reset()
