"""Eval metrics (acctrain.metrics) and predict: exact over ranks, against references made by hand."""

from __future__ import annotations

import json
import math

import pytest
import torch

from acctrain import Callback, ConfigError, Engine, TrainConfig
from acctrain.callbacks import EarlyStopping, SaveBest
from acctrain.metrics import Accuracy, EvalBatch, Mean, Perplexity, build
from tests.support import launch
from tests.workers import metrics_run
from tests.workers.metrics_run import EVAL_LEN

WORKER = ["-m", "tests.workers.metrics_run"]


def check(result: dict) -> None:
    """The Engine's metrics equal the hand-made references; predict gave model(x) for every sample, in order."""
    got, ref = result["last_eval"], result["reference"]
    assert set(got) == {"eval/loss", "eval/accuracy", "eval/top2", "eval/perplexity", "eval/margin2"} | (
        {"eval/tm_accuracy", "eval/tm_auroc"} if "eval/tm_accuracy" in got else set())
    for name in ("eval/accuracy", "eval/top2", "eval/tm_accuracy", "eval/tm_auroc"):  # counts, ranks: exact
        if name in got:
            assert got[name] == pytest.approx(ref[name], abs=1e-6), name  # float32 under torchmetrics
    for name in ("eval/loss", "eval/perplexity", "eval/margin2"):
        assert got[name] == pytest.approx(ref[name], rel=1e-5), name
    assert result["predict_shape"] == [EVAL_LEN, metrics_run.CLASSES]
    assert result["predict_max_diff"] < 1e-6 and result["predict_same_on_disk"]
    assert result["predict_argmax"]  # an integer output, gathered as it is
    assert result["predict_ragged"] == [True, True]  # per-sample tensors when batches' shapes differ, also on disk


def test_metrics_and_predict_on_one_process_equal_the_hand_made_reference(tmp_path):
    result = metrics_run.run(str(tmp_path))
    assert result["num_processes"] == 1
    check(result)
    assert 0 < result["last_eval"]["eval/accuracy"] < 1  # a value that a mistake could change


@pytest.mark.processes
def test_metrics_and_predict_on_two_processes_equal_the_hand_made_reference(tmp_path):
    """37 eval samples over 2 ranks in micro-batches of 4: no padding, no duplicate; every rank gets the
    same metrics and all 37 predictions in order."""
    launch([*WORKER, str(tmp_path)], nproc=2)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for result in ranks:
        assert result["num_processes"] == result["world_size_env"] == 2
        check(result)
    assert ranks[0]["last_eval"] == ranks[1]["last_eval"]


def test_accuracy_counts_only_labelled_items_and_shifts_for_a_causal_lm():
    logits = torch.tensor([[[0.0, 1.0, 0.0], [2.0, 0.0, 0.0], [0.0, 0.0, 3.0]]])  # predicts 1, 0, 2
    labels = torch.tensor([[1, -100, 0]])
    batch = EvalBatch(logits, {"labels": labels}, torch.tensor(0.0), 1)
    assert Accuracy().update(batch).tolist() == [1.0, 2.0]  # position 1 ignored, position 2 wrong
    shifted = EvalBatch(logits, {"labels": torch.tensor([[5, 1, 0]])}, torch.tensor(0.0), 1)
    assert Accuracy(shift=True).update(shifted).tolist() == [2.0, 2.0]  # logits t against label t+1
    assert Accuracy(top_k=2).name == "top2_accuracy" and Accuracy().compute(torch.tensor([3.0, 4.0])) == 0.75
    assert Perplexity().compute(torch.tensor([2.0, 1.0])) == pytest.approx(math.exp(2.0))
    assert Mean("m", lambda b: b.logits.sum(-1)).update(batch).tolist() == [6.0, 3.0]


def engine(tmp_path, **kw):
    metrics = kw.pop("metrics", {"accuracy": Accuracy()})
    callbacks = kw.pop("callbacks", ())
    cfg = TrainConfig(**{"output_dir": str(tmp_path / "run"), "global_batch_size": 8, "micro_batch_size": 4,
                         "max_steps": 2, "log_with": "", "cpu": True, **kw})
    return Engine(metrics_run.model(), cfg, metrics_run.data(16, 0), metrics_run.data(8, 1),
                  loss_fn=metrics_run.loss_fn, metrics=metrics, callbacks=callbacks)


@pytest.mark.parametrize("watcher, field", [
    ({"keep_best": "eval/acuracy"}, "keep_best"),
    ({"callbacks": [EarlyStopping("eval/acuracy", mode="max")]}, "EarlyStopping.metric"),
    ({"callbacks": [SaveBest("eval/acuracy", mode="max")]}, "SaveBest.metric"),
    ({"scheduler": "reduce_on_plateau", "schedule_args": {"metric": "eval/acuracy", "mode": "max"}},
     "schedule_args.metric"),
])
def test_a_mistyped_metric_is_refused_when_the_engine_is_made(tmp_path, watcher, field):
    with pytest.raises(ConfigError, match=r"watches 'eval/acuracy', which no evaluation gives; the metrics are "
                                          r"\['eval/accuracy', 'eval/loss'\]") as err:
        engine(tmp_path, **watcher)
    assert err.value.field == field and not (tmp_path / "run").exists()


class Seen(Callback):
    order = 60

    def __init__(self):
        self.values = []

    def after_evaluate(self, engine):
        self.values.append(engine.last_eval["eval/accuracy"])


def test_any_metric_can_be_watched(tmp_path):
    """keep_best, SaveBest, EarlyStopping and reduce_on_plateau on eval/accuracy (max) all see its values."""
    stop, best, seen = EarlyStopping("eval/accuracy", mode="max", patience=100), SaveBest("eval/accuracy", "max"), Seen()
    e = engine(tmp_path, keep_best="eval/accuracy", keep_best_mode="max", eval_every=1, max_steps=4, lr=0.05,
               scheduler="reduce_on_plateau", schedule_args={"metric": "eval/accuracy", "mode": "max", "patience": 0},
               callbacks=[stop, best, seen])
    e.fit()
    assert len(seen.values) == 4 and len(set(seen.values)) > 1  # the accuracy moved while training
    assert stop.best == best.best == e.schedule.state["best"] == max(seen.values)
    saved = json.loads((e.checkpoint_path / "trainer_state.json").read_text())["metrics"]
    assert saved["eval/accuracy"] == e.last_eval["eval/accuracy"] == seen.values[-1]
    e.close()


def test_metric_names_must_be_unique_and_metrics_real():
    with pytest.raises(ConfigError, match="unique") as err:
        build([Accuracy(), Accuracy()])
    assert err.value.field == "metrics"
    with pytest.raises(ConfigError, match="is not a metric"):
        build([lambda b: 0])
    assert [m.name for m in build({"top1": Accuracy(), "ppl": Perplexity()})] == ["top1", "ppl"]
    assert build(None) == [] and isinstance(build([Mean("x", lambda b: b.logits)])[0], Mean)


def test_predict_refuses_a_stream(tmp_path):
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(metrics_run.data(4, 2))

    e = engine(tmp_path)
    with pytest.raises(TypeError, match="map-style dataset"):
        e.predict(Stream())
    e.close()


def test_predict_runs_in_the_runs_precision_without_gradients(tmp_path):
    """bf16 mixed precision on the CPU: predict gives what the model gives under bf16 autocast, not its fp32
    forward, with no graph. (The reference is a fresh copy of the untrained model: Accelerate wraps the
    Engine's own model's forward in autocast.)"""
    e = engine(tmp_path, mixed_precision="bf16")
    eval_set = metrics_run.data(9, 1)
    inputs = torch.stack([x for x, _ in eval_set])
    reference = metrics_run.model()  # the same initial weights
    with torch.no_grad():
        fp32 = reference(inputs)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            expected = reference(inputs).float()
    got = e.predict(eval_set, micro_batch_size=9)
    assert not got.requires_grad and got.shape == expected.shape
    assert torch.equal(got, expected) and not torch.equal(got, fp32)  # bf16's rounding shows


@pytest.mark.processes
@pytest.mark.parametrize("mode", ["fsdp", "ddp"])
def test_ranks_with_fewer_eval_batches_keep_in_step(tmp_path, mode):
    """fsdp: each Block its own FSDP unit (every forward gathers), 9 samples = 1 batch on rank 0, 2 on rank 1;
    ddp: a buffer (broadcast in the first forward) and 1 sample, none on rank 1. Both hung before the ranks ran
    as many forwards; now the evaluation and the predictions are those of one process."""
    launch(["-m", "tests.workers.uneven_eval_run", str(tmp_path), mode], nproc=2, timeout=180,
           env={"FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP", "FSDP_TRANSFORMER_CLS_TO_WRAP": "Block"})
    for rank in (0, 1):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert result["world"] == [2, 2] and result["fsdp_units"] == (3 if mode == "fsdp" else 0)
        ref = result["reference"]
        assert result["eval"]["eval/accuracy"] == ref["eval/accuracy"]
        assert result["eval"]["eval/loss"] == pytest.approx(ref["eval/loss"], rel=1e-6)
        got, expected = torch.tensor(result["predictions"]), torch.tensor(ref["predictions"])
        assert got.shape == expected.shape == (9 if mode == "fsdp" else 1, metrics_run.CLASSES)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


class DictOutput(torch.nn.Module):
    """A dict output with the logits among other tensors, and dropout: what eval mode must turn off."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = torch.nn.Linear(metrics_run.FEATURES, 16)
        self.drop = torch.nn.Dropout(0.5)
        self.head = torch.nn.Linear(16, metrics_run.CLASSES)

    def forward(self, x):
        hidden = self.drop(torch.tanh(self.body(x)))
        return {"hidden": hidden, "logits": self.head(hidden)}


def test_predict_gives_the_logits_in_eval_mode_at_the_run_precision_and_restores_the_modes(tmp_path):
    cfg = TrainConfig(output_dir=str(tmp_path / "run"), global_batch_size=8, micro_batch_size=4, max_steps=1,
                      log_with="", cpu=True, mixed_precision="bf16")
    e = Engine(DictOutput(), cfg, metrics_run.data(16, 0),
               loss_fn=lambda m, b: torch.nn.functional.cross_entropy(m(b[0])["logits"], b[1]))
    e.model.train()
    e.unwrapped_model.drop.eval()  # as BnFreeze keeps a frozen BatchNorm: it must stay so
    test_set = metrics_run.data(11, 3)  # micro-batches of 4, 4 and 3
    got = e.predict(test_set)
    assert e.model.training and e.unwrapped_model.body.training and not e.unwrapped_model.drop.training
    reference = DictOutput().eval()  # the same initial weights
    x = torch.stack([s[0] for s in test_set])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = torch.cat([reference(x[i:i + 4])["logits"].float() for i in range(0, 11, 4)])
    with torch.no_grad():
        fp32 = reference(x)["logits"]
    assert got.dtype == torch.float32 and got.shape == (11, metrics_run.CLASSES)
    assert torch.equal(got, bf16)  # the training step's autocast, batch by batch
    assert (got - fp32).abs().max() > 1e-4  # which is not fp32
    e.close()


def test_metrics_need_eval_data_and_a_model_call(tmp_path):
    cfg = TrainConfig(output_dir=str(tmp_path / "run"), global_batch_size=8, micro_batch_size=4, max_steps=1,
                      log_with="", cpu=True)
    with pytest.raises(ConfigError, match=r"\['accuracy'\] are computed by evaluations") as err:
        Engine(metrics_run.model(), cfg, metrics_run.data(16, 0), loss_fn=metrics_run.loss_fn, metrics=[Accuracy()])
    assert err.value.field == "metrics"
    no_call = Engine(metrics_run.model(), cfg, metrics_run.data(16, 0), metrics_run.data(8, 1), metrics=[Accuracy()],
                     loss_fn=lambda m, b: sum(p.sum() for p in m.parameters()) * 0)  # never calls the model
    with pytest.raises(TypeError, match="the loss function did not call the model"):
        no_call.evaluate()
    no_call.close()


def test_reduce_on_plateau_watches_only_what_the_evaluation_computes_before_callbacks(tmp_path):
    """eval_ema/loss exists once the EMA callback has run, after the schedule was stepped: refused when the
    Engine is made (it was a KeyError at the first evaluation), while keep_best may watch it."""
    with pytest.raises(ConfigError, match=r"watches 'eval_ema/loss'.*stepped before callbacks") as err:
        engine(tmp_path, ema_decay=0.9, scheduler="reduce_on_plateau", schedule_args={"metric": "eval_ema/loss"})
    assert err.value.field == "schedule_args.metric" and not (tmp_path / "run").exists()
    engine(tmp_path, ema_decay=0.9, keep_best="eval_ema/loss").close()


def test_a_new_phase_with_a_mistyped_metric_is_refused_before_it_writes(tmp_path):
    e = engine(tmp_path)
    e.fit()
    with pytest.raises(ConfigError, match=r"watches 'eval/acuracy'") as err:
        e.replan(keep_best="eval/acuracy", output_dir=str(tmp_path / "phase2"))
    assert err.value.field == "keep_best" and not (tmp_path / "phase2").exists()
    e.close()


def test_torchmetrics_with_summed_states_ride_the_one_all_reduce():
    """MulticlassAccuracy's states (tp, fp, tn, fn) are sums: 4 x 3 of them join the evaluation's vector, and
    two batches' sums give the value of both at once. AUROC's are gathered by torchmetrics itself."""
    classification = pytest.importorskip("torchmetrics.classification")
    accuracy, auroc = build({"acc": classification.MulticlassAccuracy(num_classes=3, average="macro"),
                             "auroc": classification.MulticlassAUROC(num_classes=3, thresholds=None)})
    assert accuracy.size == 12 and auroc.size == 0 and not accuracy.metric.sync_on_compute
    logits, labels = torch.randn(10, 3, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1, 2, 0, 1] * 2)
    halves = [EvalBatch(logits[i:i + 5], (None, labels[i:i + 5]), torch.tensor(0.0), 5) for i in (0, 5)]
    whole = classification.MulticlassAccuracy(num_classes=3, average="macro")(logits, labels)
    assert accuracy.compute(accuracy.update(halves[0]) + accuracy.update(halves[1])) == pytest.approx(float(whole))
