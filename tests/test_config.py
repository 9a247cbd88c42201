"""TrainConfig: each invalid value is a ConfigError naming its field, raised before output_dir exists."""

from __future__ import annotations

import dataclasses

import pytest

from acctrain import ConfigError, Engine, TrainConfig, load_config
from acctrain.bytelm import DataConfig, ModelConfig
from tests.support.tiny import VarLenTokens, collate, make_model, token_loss

BAD_VALUES = [
    ("global_batch_size", 0, ">= 1"),
    ("micro_batch_size", 0, ">= 1"),
    ("global_batch_size", 12, "multiple of micro_batch_size"),  # with micro 8
    ("epochs", 0, ">= 1"),
    ("max_steps", -1, ">= 0"),
    ("lr", 0.0, "positive"),
    ("lr", float("nan"), "positive"),
    ("weight_decay", -0.1, ">= 0"),
    ("adam_betas", (0.9, 1.5), "[0, 1)"),
    ("max_grad_norm", -1.0, ">= 0"),
    ("mixed_precision", "fp4", "no, bf16, fp16, fp8"),
    ("compile", "blocks", "bool or 'regions'"),
    ("output_dir", "", "directory"),
    ("log_every", 0, ">= 1"),
    ("eval_every", -5, ">= 0"),
    ("save_every", -1, ">= 0"),
    ("num_workers", -1, ">= 0"),
    ("warmup_steps", -1, ">= 0"),
    ("scheduler", "warmup_linaer", "warmup_linear"),  # the close match is suggested
    ("lr", "fast", "float"),
    ("epochs", 1.5, "int"),
    ("cpu", "yes", "bool"),
    ("seed", -1, "[0, 2**32)"),
    ("seed", 2**70, "[0, 2**32)"),
]


@pytest.mark.parametrize("name,value,message", BAD_VALUES, ids=[f"{n}={v!r}" for n, v, _ in BAD_VALUES])
def test_invalid_field_names_field_and_fix(tmp_path, name, value, message):
    out = tmp_path / "out"
    with pytest.raises(ConfigError) as err:
        TrainConfig(**{"output_dir": str(out), name: value})
    assert err.value.field == name
    assert str(err.value).startswith(f"{name}: ")
    assert message in str(err.value)
    assert not out.exists()


def test_defaults_are_valid_and_json_ready():
    cfg = TrainConfig()
    assert cfg.to_dict()["global_batch_size"] == 32


def test_yaml_file_with_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("lr: 1e-3\nglobal_batch_size: 64\nmodel:\n  d_model: 64\nschedule_args: {}\n")
    cfg, sections = load_config(path, ["lr=3e-4", "model.n_layers=2", "adam_betas=[0.9,0.95]"],
                                sections={"model": ModelConfig, "data": DataConfig})
    assert cfg.lr == 3e-4 and cfg.global_batch_size == 64 and cfg.adam_betas == (0.9, 0.95)
    assert (sections["model"].d_model, sections["model"].n_layers) == (64, 2)
    assert sections["data"] == DataConfig()


def test_mixed_precision_no_unquoted_in_yaml_and_on_the_command_line(tmp_path):
    """YAML 1.1 reads a bare `no` as False: the choice 'no' is still meant."""
    path = tmp_path / "run.yaml"
    path.write_text("mixed_precision: no\n")
    assert load_config(path)[0].mixed_precision == "no"
    assert load_config(None, ["mixed_precision=no"])[0].mixed_precision == "no"


def test_toml_file(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('lr = 0.002\nmixed_precision = "bf16"\n[model]\nn_heads = 2\n')
    cfg, sections = load_config(path, [], sections={"model": ModelConfig})
    assert cfg.lr == 0.002 and cfg.mixed_precision == "bf16" and sections["model"].n_heads == 2


@pytest.mark.parametrize(
    "override,field,suggestion",
    [
        ("learning_rate=1", "learning_rate", None),
        ("global_batch=8", "global_batch", "global_batch_size"),
        ("micro_batchsize=8", "micro_batchsize", "micro_batch_size"),
        ("model.dmodel=8", "model.dmodel", "model.d_model"),
    ],
)
def test_unknown_keys_list_close_matches(override, field, suggestion):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override], sections={"model": ModelConfig})
    assert err.value.field == field
    assert "unknown config key" in str(err.value)
    if suggestion:
        assert f"Did you mean {suggestion}" in str(err.value)


def test_section_values_are_validated_with_their_prefix():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["model.n_heads=3"], sections={"model": ModelConfig})
    assert err.value.field == "model.n_heads"


def test_malformed_override():
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["lr"])


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"mixed_precision": "fp16"}, "mixed_precision"),  # no CUDA here: fp16 would silently be fp32
        ({"mixed_precision": "fp8"}, "mixed_precision"),  # no FP8 tensor cores here
        ({"warmup_steps": 50}, "warmup_steps"),  # the run has only 3 optimizer steps
    ],
)
def test_engine_errors_before_writing(tmp_path, kwargs, field):
    import torch

    if field == "mixed_precision" and torch.cuda.is_available():
        pytest.skip("fp16 is valid with CUDA")
    out = tmp_path / "out"
    cfg = TrainConfig(output_dir=str(out), global_batch_size=8, micro_batch_size=4, **kwargs)
    with pytest.raises(ConfigError) as err:
        Engine(make_model(), cfg, VarLenTokens(17), loss_fn=token_loss, collate_fn=collate)
    assert err.value.field == field
    assert not out.exists()


def test_the_configuration_page_documents_every_field_with_its_sentence():
    from pathlib import Path

    from acctrain.config import field_docs

    page = (Path(__file__).resolve().parents[1] / "docs" / "configuration.md").read_text()
    rows = {line.split(" | ")[0].removeprefix("| "): line for line in page.splitlines() if line.startswith("| `")}
    defaults = TrainConfig()
    declared = {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.default is not dataclasses.MISSING}
    for name, doc in field_docs(TrainConfig).items():
        row = rows.get(f"`{name}`")  # | `name` | type | `default` | its sentence |
        assert row is not None, f"docs/configuration.md has no row for {name}"
        assert row.endswith(f" | {doc} |"), row
        assert row.split(" | ")[2] == _as_documented(declared.get(name, getattr(defaults, name))), row


def _as_documented(default) -> str:
    """A default as the configuration page writes it: as in a YAML file."""
    import yaml

    if default is None:
        return "unset"
    if default == "":
        return '`""` (empty)'
    value = list(default) if isinstance(default, tuple) else default
    return f"`{yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}`"


@pytest.mark.processes
def test_help_lists_every_field():
    import subprocess
    import sys

    from acctrain.config import field_docs

    out = subprocess.run([sys.executable, "-m", "acctrain.cli", "--help"], capture_output=True, text=True).stdout
    for name, doc in field_docs(TrainConfig).items():
        assert f"  {name} = " in out and doc.split()[0] in out
    assert "model.d_model" in out and "export" in out


def test_more_processes_per_node_than_gpus_is_refused_naming_counts_and_fixes():
    """The check behind a launch of N processes on a node with fewer visible GPUs (run before anything is
    created or written; on a GPU machine test_gpu launches it for real)."""
    from acctrain.runtime import check_gpus_per_node

    with pytest.raises(ConfigError) as err:
        check_gpus_per_node(local_processes=2, gpus=1)
    message = str(err.value)
    assert err.value.field == "cpu"
    for fix in ("2 processes on this node but 1 visible GPU(s)", "at most 1 process(es) per node", "--nproc_per_node",
                "CUDA_VISIBLE_DEVICES", "cpu=true"):
        assert fix in message, message
    check_gpus_per_node(local_processes=2, gpus=2)
    check_gpus_per_node(local_processes=1, gpus=8)


@pytest.mark.parametrize("config,launcher,used", [
    (None, None, "no"), (None, "no", "no"), (None, "bf16", "bf16"), ("bf16", None, "bf16"), ("bf16", "no", "bf16"),
    ("bf16", "bf16", "bf16"), ("no", "bf16", None), ("fp16", "bf16", None), (None, "fp8", "fp8"),
    (None, "fp4", None),
])
def test_precision_is_the_configs_else_the_launchers_and_a_conflict_is_refused(monkeypatch, config, launcher, used):
    """ACCELERATE_MIXED_PRECISION is how `accelerate launch` passes its precision ('no' when told nothing)."""
    if launcher is None:
        monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    else:
        monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", launcher)
    if used is None:
        with pytest.raises(ConfigError) as err:
            TrainConfig(mixed_precision=config)
        assert err.value.field == "mixed_precision" and repr(launcher) in str(err.value)
        assert config is None or repr(config) in str(err.value)
    else:
        assert TrainConfig(mixed_precision=config).mixed_precision == used
        assert TrainConfig(mixed_precision=config).to_dict()["mixed_precision"] == used  # what checkpoints record


def test_an_unknown_keyword_in_python_is_refused_as_on_the_command_line():
    with pytest.raises(ConfigError) as err:
        TrainConfig(warmup_step=3)
    assert err.value.field == "warmup_step"
    assert "Did you mean warmup_steps" in str(err.value) and "Known keys: output_dir" in str(err.value)


def test_job_defaults_are_under_the_file_and_the_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("eval_every: 5\nlr: 0.01\n")
    cfg, _ = load_config(path, ["lr=0.02"], defaults={"eval_every": 100, "lr": 0.5, "log_every": 7})
    assert (cfg.eval_every, cfg.lr, cfg.log_every) == (5, 0.02, 7)
    assert load_config(None, [], defaults={"eval_every": 100})[0].eval_every == 100
    assert load_config(None, [])[0].eval_every == TrainConfig().eval_every == 0


def test_the_main_job_evaluates_during_its_run_unless_told_otherwise(tmp_path):
    from acctrain.cli import train_main
    from tests.support import TINY, scalars

    tiny = [a for a in TINY if not a.startswith(("max_steps", "eval_every", "log_every"))]
    assert train_main([f"output_dir={tmp_path / 'a'}", "max_steps=200", "log_every=100", *tiny]) == 0
    assert [s for s, _ in scalars(tmp_path / "a", "eval/loss")] == [100, 200]  # the job's own eval_every=100
    (tmp_path / "run.yaml").write_text("eval_every: 0\n")  # a config file's value wins: after each epoch (75 steps)
    assert train_main([str(tmp_path / "run.yaml"), f"output_dir={tmp_path / 'b'}", "max_steps=200", "log_every=100",
                       *tiny]) == 0
    assert [s for s, _ in scalars(tmp_path / "b", "eval/loss")] == [75, 150, 200]
