"""Memory switches: activation checkpointing leaves every step's gradient as it was (dropout included), on 1 and 2
processes and under FSDP, for the embedded model and a custom one; micro_batch_size='auto' is refused off CUDA.

The gradient runs (tests/workers/memory_run.py) record the gradient of every optimizer step as the optimizer
applies it; with dropout, the run with checkpointing is compared with the same run without it (the recompute
replays the forward's RNG), and without dropout with full-batch SGD in float64 (tests/support/tiny.py).
The micro-batch finder itself needs a GPU: tests/test_gpu_memory.py.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from acctrain import ConfigError, Engine, TrainConfig, memory
from acctrain.bytelm import ByteLM, ModelConfig
from acctrain.data import DataPlan
from tests.support import TINY, launch
from tests.support.tiny import VarLenTokens, collate, make_model, reference_sgd, rel_diff, token_loss
from tests.workers import auto_micro_run, memory_run
from tests.workers.memory_run import BlockModel

TWINS = [("blocks", "blocks-ac1-drop0.2", "blocks-ac0-drop0.2"), ("bytelm", "bytelm-ac1-drop0.2", "bytelm-ac0-drop0.2")]


def byte_lm(n_layers: int = 3, dropout: float = 0.0) -> ByteLM:
    torch.manual_seed(0)
    return ByteLM(ModelConfig(context_len=16, d_model=16, n_layers=n_layers, n_heads=2, dropout=dropout))


def full_batch_reference() -> dict[str, torch.Tensor]:
    """BlockModel without dropout trained by full-batch SGD in float64 on memory_run's problem."""
    plan = DataPlan(memory_run.DATASET_LEN, memory_run.GLOBAL_BATCH, memory_run.GLOBAL_BATCH, 1, seed=0,
                    epochs=memory_run.EPOCHS)
    params, _ = reference_sgd(memory_run.make("blocks", 0.0), VarLenTokens(memory_run.DATASET_LEN), plan, memory_run.LR)
    return params


def assert_same_gradients(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """Every step's gradient and the final parameters, within float32 rounding (they come out bitwise equal here)."""
    assert set(a) == set(b) and any(k.startswith("step5.") for k in a)
    for key in a:
        assert rel_diff({key: a[key]}, {key: b[key]}) < 1e-6, key


def assert_matches_full_batch(tensors: dict[str, torch.Tensor]) -> None:
    ref = full_batch_reference()
    assert rel_diff({k: tensors[f"param.{k}"] for k in ref}, ref) < 1e-6


# ------------------------------------------------------------------------------------ which blocks


def test_the_embedded_models_blocks_are_found_and_names_stay_plain():
    model = byte_lm(n_layers=3)
    names = list(model.state_dict())
    assert memory.checkpoint_activations(model) == "3 x Block"
    assert list(model.state_dict()) == names  # no _checkpoint_wrapped_module. in any name
    assert memory.checkpoint_activations(model) == "3 x Block"  # again: no checkpoint inside a checkpoint
    unchecked = model.blocks[0]._acctrain_unchecked_forward
    assert unchecked.__func__ is type(model.blocks[0]).forward and unchecked.__self__ is model.blocks[0]


class Stage(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(memory_run.Block(8, 0.0) for _ in range(2))
        self.down = nn.Linear(8, 8)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.down(x)


class Staged(nn.Module):
    """Two stages of two blocks: both classes repeat; the blocks are the innermost."""

    def __init__(self):
        super().__init__()
        self.stages = nn.Sequential(Stage(), Stage())
        self.head = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2))  # repeated, but leaves: not blocks

    def forward(self, x):
        return self.head(self.stages(x))


def test_innermost_repeated_blocks_are_found_and_a_named_class_is_taken_as_named():
    assert memory.repeated_block_classes(Staged()) == [memory_run.Block]
    assert memory.checkpoint_activations(Staged()) == "4 x Block"
    assert memory.checkpoint_activations(Staged(), "Stage") == "2 x Stage"
    assert memory.checkpoint_activations(Staged(), f"{__name__}.Stage") == "2 x Stage"
    x = torch.randn(3, 8)
    plain, checkpointed = Staged(), Staged()
    checkpointed.load_state_dict(plain.state_dict())
    memory.checkpoint_activations(checkpointed, "Stage")
    with torch.no_grad():  # evaluation runs the blocks as they are
        assert torch.equal(plain(x), checkpointed(x))


def test_no_repeated_block_is_refused_naming_the_classes_there_are():
    with pytest.raises(ConfigError) as err:
        memory.checkpoint_activations(byte_lm(n_layers=1))  # one block only, and the MLP's Sequential holds leaves
    assert err.value.field == "activation_checkpointing_block"
    assert "found no repeated block in ByteLM" in str(err.value) and "ByteLM, Block, Sequential" in str(err.value)
    assert memory.checkpoint_activations(byte_lm(n_layers=1), "Block") == "1 x Block"  # named: taken
    with pytest.raises(ConfigError, match="TinyTokenModel"):
        memory.checkpoint_activations(make_model())


def test_a_block_class_the_model_lacks_is_refused_before_anything_is_written(tmp_path):
    out = tmp_path / "out"
    cfg = TrainConfig(output_dir=str(out), global_batch_size=8, micro_batch_size=4, activation_checkpointing=True,
                      activation_checkpointing_block="Bock")
    with pytest.raises(ConfigError) as err:
        Engine(BlockModel(), cfg, VarLenTokens(17), loss_fn=token_loss, collate_fn=collate)
    assert err.value.field == "activation_checkpointing_block"
    assert "BlockModel has no module of class 'Bock'" in str(err.value)
    assert "BlockModel, Sequential, Block" in str(err.value)  # the candidates, in model order
    assert not out.exists()


def test_a_block_named_without_the_switch_is_refused():
    with pytest.raises(ConfigError, match="activation_checkpointing is false") as err:
        TrainConfig(activation_checkpointing_block="Block")
    assert err.value.field == "activation_checkpointing_block"


def test_accelerates_own_fsdp_checkpointing_is_refused_with_the_fix(tmp_path, monkeypatch):
    """An Accelerate FSDP config's activation checkpointing does not replay dropout's RNG in the recompute."""
    monkeypatch.setenv("FSDP_ACTIVATION_CHECKPOINTING", "true")
    out = tmp_path / "out"
    cfg = TrainConfig(output_dir=str(out), global_batch_size=8, micro_batch_size=4, fsdp=True)
    with pytest.raises(ConfigError) as err:
        Engine(make_model(), cfg, VarLenTokens(17), loss_fn=token_loss, collate_fn=collate)
    assert err.value.field == "activation_checkpointing"
    assert "fsdp_activation_checkpointing" in str(err.value) and "activation_checkpointing=true" in str(err.value)
    assert not out.exists()


# ------------------------------------------------------------------------------------ what it saves, what it keeps


def saved_bytes(model: nn.Module, batch: dict) -> int:
    """Bytes of the tensors that the forward keeps for the backward (checkpointed blocks keep theirs aside)."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, _ = token_loss(model, batch)
    loss.backward()
    return total


def test_a_checkpointed_block_keeps_only_its_input_and_gives_the_same_gradient_with_dropout():
    batch = collate([VarLenTokens(8)[i] for i in range(8)])
    kept, grads, rng_after = {}, {}, {}
    for layers in (2, 4):
        for ac in (False, True):
            model = byte_lm(n_layers=layers, dropout=0.2)
            if ac:
                memory.checkpoint_activations(model)
            torch.manual_seed(1)
            kept[layers, ac] = saved_bytes(model, batch)
            rng_after[layers, ac] = torch.rand(1)  # the global RNG after the step: the recompute draws nothing new
            grads[layers, ac] = {n: p.grad for n, p in model.named_parameters()}
    per_block = {ac: (kept[4, ac] - kept[2, ac]) // 2 for ac in (False, True)}
    assert per_block[True] == batch["input_ids"].numel() * 16 * 4  # one float32 input of width 16 per block
    assert per_block[False] > 10 * per_block[True]
    for layers in (2, 4):
        assert torch.equal(rng_after[layers, True], rng_after[layers, False])
        for name, grad in grads[layers, False].items():
            assert torch.equal(grads[layers, True][name], grad), name  # dropout drew the same masks again


def test_one_process_gradients_are_unchanged(tmp_path):
    runs = {model: {ac: memory_run.run(str(tmp_path), model, ac, 0.2)["tensors"] for ac in (True, False)}
            for model in ("blocks", "bytelm")}
    for model, twins in runs.items():
        assert_same_gradients(twins[True], twins[False])
    assert_matches_full_batch(memory_run.run(str(tmp_path), "blocks", True, 0.0)["tensors"])


@pytest.mark.processes
@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
def test_two_processes_gradients_are_unchanged(tmp_path, fsdp):
    launch(["-m", "tests.workers.memory_run", str(tmp_path), *(["fsdp"] if fsdp else [])], nproc=2)
    for model, checkpointed, plain in TWINS:
        meta = json.loads((tmp_path / f"{checkpointed}.json").read_text())
        assert meta["num_processes"] == meta["world_size_env"] == 2
        assert meta["checkpointed"] == ("3 x Block" if model == "blocks" else "2 x Block")
        if fsdp:  # each block its own FSDP unit: the recompute runs on parameters gathered again for it
            assert meta["distributed_type"] == "DistributedType.FSDP" and meta["sharded_blocks"] == meta["blocks"]
        assert_same_gradients(load_file(tmp_path / f"{checkpointed}.safetensors"),
                              load_file(tmp_path / f"{plain}.safetensors"))
    assert_matches_full_batch(load_file(tmp_path / "blocks-ac1-drop0.0.safetensors"))


def test_the_main_job_checkpoints_its_blocks_by_config(tmp_path, capsys):
    from acctrain.cli import train_main

    tiny = [a for a in TINY if not a.startswith("model.n_layers")] + ["model.n_layers=2", "model.dropout=0.1"]
    assert train_main([f"output_dir={tmp_path / 'plain'}", *tiny]) == 0
    assert train_main([f"output_dir={tmp_path / 'ac'}", *tiny, "activation_checkpointing=true"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("activation_checkpointing=2 x Block") == 1
    final = "checkpoints/step-00000006/model.safetensors"
    plain, checkpointed = load_file(tmp_path / "plain" / final), load_file(tmp_path / "ac" / final)
    torch.manual_seed(0)  # the job's initial weights: the runs trained away from them, to the same weights
    initial = ByteLM(ModelConfig(context_len=32, d_model=32, n_layers=2, n_heads=2, dropout=0.1, vocab_size=256))
    assert rel_diff(checkpointed, plain) < 1e-6 and rel_diff(plain, initial.state_dict()) > 1e-3


def test_a_hugging_face_model_checkpoints_its_own_layers(tmp_path):
    transformers = pytest.importorskip("transformers")

    def gpt2():
        torch.manual_seed(0)
        return transformers.GPT2LMHeadModel(transformers.GPT2Config(
            n_layer=2, n_head=2, n_embd=16, vocab_size=32, n_positions=16, resid_pdrop=0.2, attn_pdrop=0.2))

    data = [{"input_ids": (torch.arange(12) + i) % 32, "labels": (torch.arange(12) + i) % 32} for i in range(16)]
    steps = {}
    for ac in (True, False):
        cfg = TrainConfig(output_dir=str(tmp_path / str(ac)), global_batch_size=8, micro_batch_size=4, max_steps=2,
                          activation_checkpointing=ac, max_grad_norm=0.0, log_every=100)
        grads = memory_run.Gradients()
        engine = Engine(gpt2(), cfg, data, callbacks=[grads])
        engine.fit()
        steps[ac] = {f"step{k}.{n}": g for k, step in enumerate(grads.steps) for n, g in step.items()}
        assert engine.checkpointed_blocks == ("2 x GPT2Block (the model's own)" if ac else "")
    for key in steps[True]:
        assert rel_diff({key: steps[True][key]}, {key: steps[False][key]}) < 1e-6, key
    with pytest.raises(ConfigError, match="checkpoints its own layers"):
        memory.checkpoint_activations(gpt2(), "GPT2Block")


# ------------------------------------------------------------------------------------ micro_batch_size='auto'


def test_auto_micro_batch_is_refused_off_cuda_before_anything_is_written(tmp_path):
    out = tmp_path / "out"
    cfg = TrainConfig(output_dir=str(out), global_batch_size=8, micro_batch_size="auto", cpu=True)
    with pytest.raises(ConfigError) as err:
        Engine(make_model(), cfg, VarLenTokens(17), loss_fn=token_loss, collate_fn=collate)
    assert err.value.field == "micro_batch_size"
    assert "CUDA GPU" in str(err.value) and "set a number" in str(err.value)
    assert not out.exists()


def test_auto_micro_batch_in_the_config_and_the_plan(capsys):
    from acctrain.cli import plan_main

    assert TrainConfig(global_batch_size=12, micro_batch_size="auto").micro_batch_size == "auto"
    with pytest.raises(ConfigError, match="expected int or 'auto', got 'big'"):
        TrainConfig(micro_batch_size="big")
    assert plan_main(["micro_batch_size=auto", "world_size=2", "global_batch_size=24"]) == 0
    assert "micro_batch: auto (the largest divisor of 12 that fits)" in capsys.readouterr().out
    assert plan_main(["micro_batch_size=auto", "world_size=5", "global_batch_size=24"]) == 2
    assert "global_batch_size: 24 is not divisible by the world size 5" in capsys.readouterr().err


def test_the_search_tries_divisors_from_the_per_rank_batch_down():
    def search(per_rank: int, limit: int) -> tuple[int, list[int]]:
        tried = []
        found = memory.largest_fitting(per_rank, lambda size: tried.append(size) or size <= limit)
        return found, tried

    assert search(48, 100) == (48, [48])
    assert search(48, 12) == (12, [48, 24, 12])
    assert search(40, 7) == (5, [40, 20, 10, 5])  # each next size a divisor, at most half the last
    assert search(36, 3) == (2, [36, 18, 9, 4, 2])  # 3 divides 36 but is not the largest divisor up to 9 // 2
    assert search(8, 0) == (0, [8, 4, 2, 1])


def test_the_search_takes_the_largest_micro_batch_that_fits_and_leaves_the_model_as_it_was(tmp_path, capsys):
    """The search on CPU, with a model that runs out of memory above 12 samples (tests/workers/auto_micro_run.py)."""
    result = auto_micro_run.search(str(tmp_path))
    assert result == {"rank": 0, "num_processes": 1, "micro_batch": 12, "accumulation": 4, "unchanged": True,
                      "grads_left": 0}  # weights and BatchNorm statistics as before, no gradient
    assert "micro_batch_size=auto: tried 48, 24, 12 on rank 0; 12 fits on every rank, accumulation 4" in \
        capsys.readouterr().out


@pytest.mark.processes
def test_every_rank_takes_the_smallest_micro_batch_that_fits_on_any_rank(tmp_path):
    launch(["-m", "tests.workers.auto_micro_run", str(tmp_path), "cpu"], nproc=2)
    for rank in (0, 1):  # rank 0 fits its whole per-rank batch of 24, rank 1 only 3 (24, 12, 6 do not fit)
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert result == {"rank": rank, "num_processes": 2, "micro_batch": 3, "accumulation": 8, "unchanged": True,
                          "grads_left": 0}
