"""What users set for speed, on the CPU: `compile` (torch.compile, whole or by regions, with plain checkpoint names) and the default
AdamW's kernel choice. Their CUDA side (fused AdamW, pinned batches, compiled bf16) is in test_gpu."""

from __future__ import annotations

from safetensors.torch import load_file

from acctrain import Engine, TrainConfig
from tests.support.tiny import Stacked, VarLenTokens, collate, make_model, rel_diff, token_loss


def run(out, **config):
    cfg = TrainConfig(**{**dict(output_dir=str(out), global_batch_size=8, micro_batch_size=4, max_steps=4, lr=1e-2,
                                scheduler="constant", cpu=True), **config})
    engine = Engine(make_model(0), cfg, VarLenTokens(64), loss_fn=token_loss, collate_fn=collate)
    engine.fit()
    return engine


def test_compile_trains_like_eager_and_checkpoints_keep_plain_names(tmp_path):
    import torch._dynamo

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    run(tmp_path / "compiled", compile=True)
    assert torch._dynamo.utils.counters["frames"]["ok"] > 0  # the forward really went through torch.compile
    eager = run(tmp_path / "eager")
    saved = load_file(tmp_path / "compiled" / "checkpoints" / "step-00000004" / "model.safetensors")
    assert set(saved) == set(make_model(0).state_dict())  # no `_orig_mod.` prefixes
    assert rel_diff(saved, eager.unwrapped_model.state_dict()) < 1e-5  # inductor's fused kernels round differently
    torch._dynamo.reset()


def test_default_adamw_is_foreach_on_cpu():
    engine_cfg = TrainConfig(output_dir="unused", cpu=True, global_batch_size=8, micro_batch_size=4)
    engine = Engine(make_model(0), engine_cfg, VarLenTokens(16), loss_fn=token_loss, collate_fn=collate)
    defaults = engine.step_ops.optimizer.defaults
    assert defaults["foreach"] is True and not defaults["fused"]


def test_compile_regions_compiles_each_block_in_place_and_trains_like_eager(tmp_path, capsys):
    import torch._dynamo

    def run_stacked(out, **config):
        cfg = TrainConfig(output_dir=str(out), global_batch_size=8, micro_batch_size=4, max_steps=4, lr=1e-2,
                          scheduler="constant", cpu=True, **config)
        engine = Engine(Stacked(), cfg, VarLenTokens(64), loss_fn=token_loss, collate_fn=collate)
        engine.fit()
        return engine

    torch._dynamo.reset()
    compiled = run_stacked(tmp_path / "regions", compile="regions")
    model = compiled.unwrapped_model
    # each block, the embedding and the head compiled in place; the stack's parent runs eager
    assert all(block._compiled_call_impl is not None for block in model.blocks)
    assert model.embed._compiled_call_impl is not None and model.head._compiled_call_impl is not None
    assert model._compiled_call_impl is None
    assert "compile=regions (3 x Sequential)" in capsys.readouterr().out
    eager = run_stacked(tmp_path / "eager")
    saved = load_file(tmp_path / "regions" / "checkpoints" / "step-00000004" / "model.safetensors")
    assert set(saved) == set(Stacked().state_dict())  # no `_orig_mod.` prefixes
    assert rel_diff(saved, eager.unwrapped_model.state_dict()) < 1e-5
    torch._dynamo.reset()


def test_compile_regions_without_a_stack_compiles_the_model_whole():
    from acctrain.compilation import compile_model

    model = make_model(0)
    assert compile_model(model, "regions") == "" and model._compiled_call_impl is not None
