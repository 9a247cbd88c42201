"""FSDP2's layouts and options: HSDP (2 replicas x 2 shards) and reshard_after_forward=false train as DDP does;
an HSDP checkpoint resumes under plain FSDP at 2 and at 1 process; CPU offload on a CPU run, settings that disagree
with the launcher's, and a DeepSpeed launch are refused before anything is written.

The runs are real: 4 (or 2, or 1) processes under torchrun, gloo on CPU, one Engine per launch.
"""

from __future__ import annotations

import json
import math
import shutil
import struct
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from acctrain import Engine, TrainConfig
from acctrain import sharding
from acctrain.errors import ConfigError
from tests.support import CLIP, TINY, assert_same_run, ckpts, launch, launch_env, load_result, reference
from tests.support.processes import ROOT, free_port
from tests.support.tiny import VarLenTokens, make_model, rel_diff
from tests.workers import resume_run

WORKER = ["-m", "tests.workers.hsdp_run"]  # run from ROOT as a module (torchrun -m)
HSDP = {"fsdp": True, "fsdp_shard_size": 2}
WRAP_LINEARS = {"FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP", "FSDP_TRANSFORMER_CLS_TO_WRAP": "Linear"}
"""An Accelerate launch config's wrap policy, as the launcher passes it: the hidden and head layers become FSDP units
of their own, which fsdp_reshard_after_forward governs (Accelerate never reshards the root and the final norm)."""


def params(path) -> dict:
    return {k: v for k, v in load_file(path).items() if not k.startswith("local.")}


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    """grad_run's problem at 4 processes: DDP, HSDP 2 x 2, and HSDP 2 x 2 keeping parameters after the forward."""
    out = tmp_path_factory.mktemp("layouts")
    runs = {"ddp": {}, "hsdp": HSDP, "hsdp_kept": {**HSDP, "fsdp_reshard_after_forward": False}}
    printed = {name: launch([*WORKER, str(out), name, json.dumps(options)], nproc=4, env=WRAP_LINEARS).stdout
               for name, options in runs.items()}
    return out, printed


def meta(out, name, world: int = 4) -> dict:
    result = json.loads((out / f"{name}.json").read_text())
    assert result["num_processes"] == result["world_size_env"] == world
    return result


@pytest.mark.processes
@pytest.mark.parametrize("name", ["hsdp", "hsdp_kept"])
def test_hsdp_trains_as_ddp_does_on_the_same_global_batch(layouts, name):
    out, _ = layouts
    ddp, run = meta(out, "ddp"), meta(out, name)
    assert ddp["distributed_type"] == "DistributedType.MULTI_CPU" and run["distributed_type"] == "DistributedType.FSDP"
    # the tolerance of test_engine_fsdp (FSDP at 2 processes against the float64 full-batch reference)
    assert rel_diff(params(out / f"{name}.safetensors"), params(out / "ddp.safetensors")) < 1e-6
    ref_params, ref_norms = reference(CLIP)
    assert rel_diff(params(out / f"{name}.safetensors"), ref_params) < 1e-6
    assert run["grad_norms"] == pytest.approx(ddp["grad_norms"], rel=1e-5)
    assert run["grad_norms"] == pytest.approx(ref_norms, rel=1e-5)


@pytest.mark.processes
def test_hsdp_parameters_are_replicated_across_and_sharded_within_a_2d_mesh(layouts):
    out, printed = layouts
    run = meta(out, "hsdp")
    assert run["mesh"] == {"dp_replicate": 2, "dp_shard_cp": 2}
    assert run["placements"] and set(map(tuple, run["placements"].values())) == {("R", "S(0)")}
    slices = load_file(out / "hsdp.safetensors")
    assert slices["local.0"].shape == (8, 16)  # hidden.weight's 16 rows, halved (4-way FSDP would hold 4)
    # ranks 0, 1 are one replica and 2, 3 the other: the same slice at the same shard index, different ones within
    assert slices["local.0"].equal(slices["local.2"]) and slices["local.1"].equal(slices["local.3"])
    assert not slices["local.0"].equal(slices["local.1"])
    assert run["summary"] == "FSDP2: 2 replicas x 2 shards"
    assert "sharding: FSDP2: 2 replicas x 2 shards" in printed["hsdp"]  # the start-up summary


@pytest.mark.processes
def test_reshard_after_forward_false_keeps_the_gathered_parameters(layouts):
    out, _ = layouts
    assert meta(out, "hsdp")["after_forward"] == "DTensor"  # hidden.weight: resharded after the forward
    assert meta(out, "hsdp_kept")["after_forward"] == "Parameter"  # kept gathered until the backward


@pytest.fixture(scope="module")
def stopped_hsdp_run(tmp_path_factory):
    """Four HSDP processes (2 x 2) stopped by SIGTERM after step 5: a sharded checkpoint."""
    base = tmp_path_factory.mktemp("hsdp")
    reference_run = resume_run.run(str(base / "ref"))  # uninterrupted, one process, no FSDP
    stopped = base / "stopped"
    launch(["-m", "tests.workers.resume_run", json.dumps({"out_dir": str(stopped), "stop_at": 5, **HSDP})], nproc=4,
           check=False)
    assert ckpts(stopped) == ["step-00000005"]
    return stopped, reference_run


@pytest.mark.processes
@pytest.mark.parametrize("nproc", [2, 1])
def test_an_hsdp_checkpoint_resumes_under_fsdp_at_any_world_size(stopped_hsdp_run, tmp_path, nproc):
    stopped, reference_run = stopped_hsdp_run
    out = tmp_path / "run"
    shutil.copytree(stopped, out)
    launch(["-m", "tests.workers.resume_run", json.dumps({"out_dir": str(out), "fsdp": True})], nproc=nproc)
    resumed = load_result(out)
    assert resumed["num_processes"] == nproc and resumed["steps"] == list(range(6, 11))
    assert_same_run(resumed, reference_run, exact=False)  # as test_engine_fsdp's resumes: 1e-5 relative


@pytest.mark.processes
def test_the_replicas_write_each_element_once(stopped_hsdp_run):
    stopped, _ = stopped_hsdp_run
    ckpt = stopped / "checkpoints" / "step-00000005"
    manifest = json.loads((ckpt / "sharded.json").read_text())
    for part in ("model", "optim"):
        files = sorted((ckpt / part).iterdir())
        assert len(files) == 4  # one per rank, as at plain FSDP
        written = sum(math.prod(shape) for path in files for shape in _shapes(path))
        assert written == sum(math.prod(shape) for shape in manifest[part].values()), part  # no duplicate slices


def _shapes(path) -> list[list[int]]:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    return [entry["shape"] for key, entry in header.items() if key != "__metadata__"]


@pytest.mark.processes
def test_a_second_engine_with_other_fsdp_settings_in_the_same_processes_is_refused(tmp_path):
    """Accelerate keeps one FSDP plugin and mesh per process: the second Engine's settings would silently not apply."""
    launch([*WORKER, str(tmp_path), "first", json.dumps({"fsdp": True}),
            json.dumps({"fsdp": True, "fsdp_reshard_after_forward": False})], nproc=2, env=WRAP_LINEARS)
    assert meta(tmp_path, "first", world=2)["summary"] == "FSDP2: 2 shards"
    refused = json.loads((tmp_path / "second-refused.json").read_text())
    assert refused["field"] == "fsdp_reshard_after_forward" and "start a new process" in refused["message"]
    assert not (tmp_path / "run-second").exists()


def test_cpu_offload_on_a_cpu_run_is_refused_before_anything_is_written(tmp_path):
    out = tmp_path / "run"
    config = TrainConfig(output_dir=str(out), fsdp=True, fsdp_cpu_offload=True, cpu=True)
    with pytest.raises(ConfigError, match="GPU") as err:
        Engine(make_model(0), config, VarLenTokens(8))
    assert err.value.field == "fsdp_cpu_offload"
    assert not out.exists()


def test_shard_sizes_that_do_not_divide_the_world_are_refused():
    with pytest.raises(ConfigError, match="divisor") as err:
        sharding.fsdp_layout(TrainConfig(fsdp=True, fsdp_shard_size=3), True, 4, cpu=True)
    assert err.value.field == "fsdp_shard_size"
    with pytest.raises(ConfigError, match="which is DDP"):
        sharding.fsdp_layout(TrainConfig(fsdp=True, fsdp_shard_size=1), True, 4, cpu=True)
    assert sharding.fsdp_layout(TrainConfig(fsdp=True, fsdp_shard_size=2), True, 8, cpu=True) == sharding.Layout(4, 2)
    assert sharding.fsdp_layout(TrainConfig(fsdp=True), True, 8, cpu=True) == sharding.Layout(1, 8)


@pytest.mark.parametrize("field, value", [("fsdp_shard_size", 2), ("fsdp_reshard_after_forward", False),
                                          ("fsdp_cpu_offload", True)])
def test_fsdp_fields_without_fsdp_are_refused(field, value):
    with pytest.raises(ConfigError, match="FSDP is off") as err:
        sharding.fsdp_layout(TrainConfig(**{field: value}), False, 4, cpu=True)
    assert err.value.field == field


@pytest.mark.parametrize("variable, value, field", [
    ("FSDP_RESHARD_AFTER_FORWARD", "false", "fsdp_reshard_after_forward"),
    ("FSDP_RESHARD_AFTER_FORWARD", "SHARD_GRAD_OP", "fsdp_reshard_after_forward"),
    ("FSDP_OFFLOAD_PARAMS", "true", "fsdp_cpu_offload"),
    ("FSDP_SHARDING_STRATEGY", "HYBRID_SHARD", "fsdp_shard_size"),
])
def test_a_launch_config_that_contradicts_the_config_is_refused(monkeypatch, variable, value, field):
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError) as err:
        sharding.fsdp_layout(TrainConfig(fsdp=True), True, 4, cpu=False)
    assert err.value.field == field


def test_a_launch_configs_parallelism_config_is_honoured_or_refused(monkeypatch):
    monkeypatch.setattr(sharding, "LAUNCHERS_PARALLELISM", True)
    for name, size in (("DP_REPLICATE_SIZE", "2"), ("DP_SHARD_SIZE", "2"), ("TP_SIZE", "1")):
        monkeypatch.setenv(f"PARALLELISM_CONFIG_{name}", size)
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert sharding.fsdp_layout(TrainConfig(fsdp=True), True, 4, cpu=True) == sharding.Layout(2, 2)
    with pytest.raises(ConfigError, match="dp_shard_size is 2") as err:
        sharding.fsdp_layout(TrainConfig(fsdp=True, fsdp_shard_size=4), True, 4, cpu=True)
    assert err.value.field == "fsdp_shard_size"
    with pytest.raises(ConfigError, match="needs FSDP"):
        sharding.fsdp_layout(TrainConfig(), False, 4, cpu=True)
    monkeypatch.setenv("PARALLELISM_CONFIG_TP_SIZE", "2")
    with pytest.raises(ConfigError, match="tp_size=2"):
        sharding.fsdp_layout(TrainConfig(fsdp=True), True, 4, cpu=True)


@pytest.mark.processes
def test_a_deepspeed_launch_is_refused_with_the_fsdp2_equivalents_before_anything_is_written(tmp_path):
    """`accelerate launch --use_deepspeed` (or a launch config with distributed_type: DEEPSPEED) hands the processes
    ACCELERATE_USE_DEEPSPEED=true; here torchrun does, as that launcher needs DeepSpeed installed to start at all."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "train.py", "examples/tiny.yaml", *TINY, f"output_dir={out}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=launch_env({"ACCELERATE_USE_DEEPSPEED": "true"}), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode != 0
    for equivalent in ("ZeRO stage 1 or 2 -> fsdp=true fsdp_reshard_after_forward=false", "ZeRO stage 3 -> fsdp=true",
                       "fsdp_cpu_offload=true", "clips inside itself"):
        assert equivalent in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.count("config error: deepspeed:") == 2  # every rank refuses, none waits for the others
    assert not out.exists()


def test_reshard_after_forward_false_without_a_wrap_policy_is_refused(monkeypatch):
    """Without a wrap policy the model is one FSDP unit, the root, which FSDP2 keeps gathered anyway: false would
    be a setting that does nothing."""
    from acctrain.sharding import fsdp_plugin

    for name in WRAP_LINEARS:
        monkeypatch.delenv(name, raising=False)
    config = TrainConfig(output_dir="unused", fsdp=True, fsdp_reshard_after_forward=False)
    with pytest.raises(ConfigError, match="fsdp_auto_wrap_policy") as err:
        fsdp_plugin(config)
    assert err.value.field == "fsdp_reshard_after_forward"
    for name, value in WRAP_LINEARS.items():
        monkeypatch.setenv(name, value)
    assert fsdp_plugin(config).reshard_after_forward is False
