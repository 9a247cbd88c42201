"""A Hugging Face `datasets.Dataset` trains as is: padded by PadCollator, unused columns dropped, and the model's
own loss token-weighted, so every geometry gives the same steps (acctrain.hf_data, loss_scaling.model_loss)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from acctrain.hf_data import PadCollator, adapt
from tests.support import launch
from tests.support.tiny import rel_diff
from tests.workers import hf_run

pytest.importorskip("datasets")
transformers = pytest.importorskip("transformers")


def test_rows_are_padded_labels_with_minus_100_and_a_mask_is_made():
    batch = PadCollator(pad_token_id=7)([{"input_ids": [1, 2, 3], "labels": [-100, 2, 3], "label_ids": 0},
                                        {"input_ids": [4], "labels": [4], "label_ids": 1}])
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 7, 7]]
    assert batch["labels"].tolist() == [[-100, 2, 3], [4, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["label_ids"].tolist() == [0, 1]
    with pytest.raises(TypeError, match="column 'text' holds text"):
        PadCollator()([{"text": "a"}])


def test_columns_the_model_does_not_take_are_dropped_unless_a_loss_fn_reads_them():
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_head=2, n_embd=32, vocab_size=64))
    data = hf_run.dataset()
    adapted, held_out, collate = adapt(model, data, hf_run.dataset(4), None, None)
    assert adapted.column_names == held_out.column_names == ["input_ids", "labels"]
    assert isinstance(collate, PadCollator)
    kept, _, mine = adapt(model, data, None, len, lambda m, b: 0)  # a loss_fn and a collate_fn of the user's: as given
    assert kept.column_names == ["input_ids", "labels", "text"] and mine is len


@pytest.mark.processes
def test_token_weighted_steps_are_the_same_for_every_micro_batch_size_and_process_count(tmp_path):
    """Rows of 3..12 tokens: a mean of per-micro-batch means would weigh tokens differently for each geometry."""
    runs = {micro: hf_run.run(str(tmp_path / f"m{micro}"), micro) for micro in (8, 2, 1)}
    launch(["-m", "tests.workers.hf_run", str(tmp_path / "two"), "2"], nproc=2)
    two = json.loads((tmp_path / "two" / "result.json").read_text())
    assert two["num_processes"] == two["world_size_env"] == 2
    reference = runs[8]
    assert reference["losses"][-1] < reference["losses"][0]  # it learns
    for other in (runs[2], runs[1], two):
        assert other["losses"] == pytest.approx(reference["losses"], rel=1e-5)
        assert other["eval"] == pytest.approx(reference["eval"], rel=1e-5)
    for params in (runs[2]["params"], runs[1]["params"], load_file(tmp_path / "two" / "result.safetensors")):
        assert rel_diff(params, reference["params"]) < 1e-5


@pytest.mark.processes
def test_a_transformers_model_under_fsdp_saves_resumes_and_takes_the_same_steps(tmp_path):
    """GPT-2 (tied input and output embeddings) sharded by FSDP2 on 2 processes, 3 steps, then resumed from its
    sharded checkpoint for 3 more: the losses, the evaluation and the weights of one unsharded process.
    (Its first save failed: the safetensors shards refused the tied tensors, which share memory.)"""
    reference = hf_run.run(str(tmp_path / "one"), 2)
    fsdp = {"HF_RUN_FSDP": "1"}
    launch(["-m", "tests.workers.hf_run", str(tmp_path / "fsdp"), "2", "3"], nproc=2, env=fsdp)
    assert (tmp_path / "fsdp" / "checkpoints" / "step-00000003" / "sharded.json").is_file()  # it ran under FSDP
    launch(["-m", "tests.workers.hf_run", str(tmp_path / "fsdp"), "2"], nproc=2, env=fsdp)  # resume=auto: steps 4..6
    sharded = json.loads((tmp_path / "fsdp" / "result.json").read_text())
    assert sharded["num_processes"] == sharded["world_size_env"] == 2
    assert sharded["losses"] == pytest.approx(reference["losses"][3:], rel=1e-5)
    assert sharded["eval"] == pytest.approx(reference["eval"], rel=1e-5)
    assert rel_diff(load_file(tmp_path / "fsdp" / "result.safetensors"), reference["params"]) < 1e-5


def test_the_models_loss_is_token_weighted_for_token_labels(tmp_path):
    from acctrain.loss_scaling import model_loss

    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_head=2, n_embd=32, vocab_size=64)).eval()
    batch = PadCollator()([{"input_ids": [1, 2, 3, 4], "labels": [-100, 2, 3, 4]}, {"input_ids": [5, 6], "labels": [5, 6]}])
    loss_sum, items = model_loss(model, batch)
    assert int(items) == 3 + 1  # causal: labels shifted by one inside the model, -100 and padding not counted
    assert torch.allclose(loss_sum / items, model(**batch).loss)


def test_a_streaming_dataset_is_a_stream_padded_and_pruned(tmp_path):
    """`Dataset.to_iterable_dataset()`: read in order as a stream (max_steps), its rows padded, text dropped."""
    from acctrain import Engine, TrainConfig

    stream = hf_run.dataset().to_iterable_dataset()
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_head=2, n_embd=32, vocab_size=64,
                                                                 n_positions=16))
    cfg = TrainConfig(output_dir=str(tmp_path), global_batch_size=8, micro_batch_size=4, max_steps=4, log_every=1)
    engine = Engine(model, cfg, stream)
    assert engine.plan.stream and engine.fit()["train/loss"] > 0
    engine.close()


@pytest.mark.processes
def test_a_run_on_two_processes_continues_on_one_as_if_uninterrupted(tmp_path):
    reference = hf_run.run(str(tmp_path / "ref"), 2)  # 6 steps on one process
    launch(["-m", "tests.workers.hf_run", str(tmp_path / "run"), "2", "3"], nproc=2)  # 3 steps on two
    resumed = hf_run.run(str(tmp_path / "run"), 2)  # resume=auto: steps 4..6 on one
    assert resumed["losses"] == pytest.approx(reference["losses"][3:], rel=1e-5)
    assert rel_diff(resumed["params"], reference["params"]) < 1e-5


def test_a_streaming_dataset_resumes_through_its_own_state(tmp_path):
    """A Hugging Face IterableDataset has state_dict/load_state_dict: a resume starts there, and the run is the
    uninterrupted one (passes of 24 rows end inside steps of 8 x 4)."""
    from acctrain import Engine, TrainConfig

    def run(steps, out):
        torch.manual_seed(0)
        config = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=32, vocab_size=64, n_positions=16,
                                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        cfg = TrainConfig(output_dir=str(tmp_path / out), global_batch_size=20, micro_batch_size=4, max_steps=steps,
                          lr=3e-3, scheduler="constant", log_every=1)
        engine = Engine(transformers.GPT2LMHeadModel(config), cfg, hf_run.dataset().to_iterable_dataset())
        engine.fit()
        params = {n: p.detach().clone() for n, p in engine.unwrapped_model.named_parameters()}
        engine.close()
        return params

    reference = run(4, "ref")
    run(2, "run")
    resumed = run(4, "run")
    assert all(torch.equal(resumed[n], reference[n]) for n in reference)
