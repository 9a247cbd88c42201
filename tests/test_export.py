"""`acctrain export` (acctrain.export): a plain model's weights with its constructor settings, the EMA's weights,
plain names from a compiled model, and a Transformers model as a directory `from_pretrained` loads."""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys

import pytest
import torch
from safetensors.torch import load_file

from acctrain import Engine, TrainConfig
from acctrain.bytelm import ByteLM, DataConfig, ModelConfig, job_data, lm_loss
from acctrain.cli import job_settings, main
from acctrain.ema import EMA
from acctrain.export import RECORD_FILE, ExportError, export
from tests.support.tiny import TokenBlocks, VarLenTokens, collate, make_model, token_loss


def config(out, **changes) -> TrainConfig:
    return TrainConfig(output_dir=str(out), global_batch_size=8, micro_batch_size=4, max_steps=3, lr=1e-2,
                       log_every=1, **changes)


@pytest.fixture(scope="module")
def bytelm_run(tmp_path_factory):
    """The embedded job's model, tiny, trained 3 steps with an EMA: (engine, its EMA, the resolved ModelConfig)."""
    out = tmp_path_factory.mktemp("bytelm")
    model_cfg, data_cfg = ModelConfig(context_len=16, d_model=32, n_layers=1, n_heads=2), DataConfig(max_bytes=20000)
    train, held_out, resolved = job_data(data_cfg, model_cfg)
    torch.manual_seed(0)
    ema = EMA(0.5)
    engine = Engine(ByteLM(resolved), config(out), train, held_out, loss_fn=lm_loss, callbacks=[ema],
                    settings=job_settings({"model": model_cfg, "data": data_cfg}))
    engine.fit()
    yield engine, ema, resolved, out / "checkpoints" / "step-00000003"
    engine.close()


def logits(model, ids) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        out = model(ids)
    return getattr(out, "logits", out)


def test_a_plain_model_exports_its_weights_and_constructor_settings(bytelm_run, tmp_path):
    engine, ema, resolved, ckpt = bytelm_run
    assert main(["export", str(ckpt), str(tmp_path / "trained")]) == 0
    record = json.loads((tmp_path / "trained" / RECORD_FILE).read_text())
    assert record["class"] == "acctrain.bytelm.ByteLM" and record["config"] == dataclasses.asdict(resolved)
    assert record["settings"]["model.d_model"] == 32 and record["settings"]["data.max_bytes"] == 20000
    assert record["step"] == 3 and record["weights"] == "trained" and record["checkpoint"] == str(ckpt)
    rebuilt = ByteLM(ModelConfig(**record["config"]))  # what a user of the export does: no acctrain checkpoint code
    rebuilt.load_state_dict(load_file(tmp_path / "trained" / "model.safetensors"))
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    assert torch.equal(logits(rebuilt, ids), logits(engine.unwrapped_model, ids))

    assert main(["export", str(ckpt), str(tmp_path / "ema"), "--ema"]) == 0
    assert json.loads((tmp_path / "ema" / RECORD_FILE).read_text())["weights"] == "ema"
    rebuilt.load_state_dict(load_file(tmp_path / "ema" / "model.safetensors"))
    with ema.applied(engine):
        assert torch.equal(logits(rebuilt, ids), logits(engine.unwrapped_model, ids))
    assert not torch.equal(logits(rebuilt, ids), logits(engine.unwrapped_model, ids))  # the EMA is another model


def test_one_file_export_of_the_ema_holds_its_weights(bytelm_run, tmp_path):
    engine, ema, _, ckpt = bytelm_run
    assert main(["export", str(ckpt), str(tmp_path / "ema.safetensors"), "--ema"]) == 0
    exported = load_file(tmp_path / "ema.safetensors")
    assert exported.keys() == engine.unwrapped_model.state_dict().keys()
    assert all(torch.equal(exported[n], ema.weights[n]) for n in ema.weights)


def test_ema_export_of_a_checkpoint_without_an_ema_is_refused(tmp_path, capsys):
    engine = Engine(make_model(0), config(tmp_path), VarLenTokens(26), loss_fn=token_loss, collate_fn=collate)
    engine.fit()
    engine.close()
    assert main(["export", str(tmp_path), str(tmp_path / "m.safetensors"), "--ema"]) == 1
    assert "holds no EMA state" in capsys.readouterr().err and not (tmp_path / "m.safetensors").exists()


def test_a_compiled_model_exports_plain_names(tmp_path):
    model = make_model(0)
    engine = Engine(torch.compile(model, backend="eager"), config(tmp_path), VarLenTokens(26), loss_fn=token_loss,
                    collate_fn=collate)
    engine.fit()
    engine.close()
    ckpt = tmp_path / "checkpoints" / "step-00000003"
    assert all(k.startswith("_orig_mod.") for k in load_file(ckpt / "model.safetensors"))  # resumes the same wrapper
    assert main(["export", str(ckpt), str(tmp_path / "out")]) == 0
    exported = load_file(tmp_path / "out" / "model.safetensors")
    assert exported.keys() == model.state_dict().keys()
    assert all(torch.equal(exported[n], p) for n, p in model.state_dict().items())
    assert json.loads((tmp_path / "out" / RECORD_FILE).read_text())["class"] == "tests.support.tiny.TinyTokenModel"


def test_a_transformers_checkpoint_without_transformers_says_what_to_install(bytelm_run, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` fails, as where it is not installed
    copy = tmp_path / "ckpt"
    shutil.copytree(bytelm_run[3], copy)
    state = json.loads((copy / "trainer_state.json").read_text())
    state["model"] = {"library": "transformers", "class": "GPT2LMHeadModel", "config": {}}
    (copy / "trainer_state.json").write_text(json.dumps(state))
    with pytest.raises(ExportError, match="pip install transformers"):
        export(copy, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_transformers_model_exports_a_directory_from_pretrained_loads(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=64,
                                                                 n_positions=16, bos_token_id=0, eos_token_id=0))
    engine = Engine(model, config(tmp_path / "run", ema_decay=0.5), TokenBlocks(32))
    engine.fit()
    ema = engine.callbacks.items[-1]
    ckpt = tmp_path / "run" / "checkpoints" / "step-00000003"
    ids = TokenBlocks(2).ids
    assert main(["export", str(ckpt), str(tmp_path / "hf")]) == 0
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert type(loaded) is transformers.GPT2LMHeadModel
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["architectures"] == ["GPT2LMHeadModel"]
    assert "lm_head.weight" not in load_file(tmp_path / "hf" / "model.safetensors")  # tied: dropped, as HF does
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    assert torch.equal(logits(loaded, ids), logits(engine.unwrapped_model, ids))

    assert main(["export", str(ckpt), str(tmp_path / "hf-ema"), "--ema"]) == 0
    averaged = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf-ema")
    with ema.applied(engine):
        assert torch.equal(logits(averaged, ids), logits(engine.unwrapped_model, ids))
    assert not torch.equal(logits(averaged, ids), logits(loaded, ids))
    engine.close()
