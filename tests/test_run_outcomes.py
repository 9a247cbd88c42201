"""What a relaunch, a changed setting or a later phase does: honoured and said, or refused with the fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from acctrain import Callback, Engine, TrainConfig
from acctrain.callbacks import EarlyStopping, SaveBest
from acctrain.errors import ConfigError
from tests.support.events import logged
from tests.support.tiny import VarLenTokens, collate, make_model, token_loss


def engine(out: Path, callbacks=(), eval_data=True, **kw) -> Engine:
    cfg = TrainConfig(**{"output_dir": str(out), "global_batch_size": 8, "micro_batch_size": 4, "max_steps": 2,
                         "lr": 1e-2, "scheduler": "constant", "log_every": 1, "cpu": True, **kw})
    return Engine(make_model(), cfg, VarLenTokens(32), VarLenTokens(8, seed=5) if eval_data else None,
                  loss_fn=token_loss, collate_fn=collate, callbacks=callbacks)


def fit(out: Path, **kw) -> dict:
    e = engine(out, **kw)
    try:
        return e.fit()
    finally:
        e.close()


def listing(out: Path) -> dict[str, int]:
    return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in out.rglob("*") if p.name != ".lock"}


# ---- changed optimizer settings on resume -----------------------------------------------------------------------


def test_changed_lr_and_weight_decay_apply_on_resume_and_are_said(tmp_path, capsys):
    fit(tmp_path, max_steps=2)
    capsys.readouterr()
    e = engine(tmp_path, max_steps=4, lr=2e-2, weight_decay=0.1)
    e.fit()
    said = capsys.readouterr().out
    assert "default.weight_decay 0.01 -> 0.1" in said and "default.base_lr 0.01 -> 0.02" in said
    assert {g["weight_decay"] for g in e.torch_optimizer.param_groups} == {0.1, 0.0}  # no decay stays none
    lrs = logged(tmp_path, "train/lr")
    assert [lrs[s] for s in (1, 2, 3, 4)] == pytest.approx([1e-2, 1e-2, 2e-2, 2e-2], rel=1e-6)
    e.close()


# ---- a finished run, a shorter run, a longer run -------------------------------------------------------------------


def test_relaunching_a_finished_run_says_it_is_complete_and_writes_nothing(tmp_path, capsys):
    first = fit(tmp_path, max_steps=2)
    before = listing(tmp_path)
    capsys.readouterr()
    e = engine(tmp_path, max_steps=2, lr=5.0)
    again = e.fit()
    e.close()
    assert e.checkpoint_path == tmp_path / "checkpoints" / "step-00000002"  # what `train.py` prints
    said = capsys.readouterr().out
    assert "the run is complete" in said and "step-00000002" in said and "raise max_steps or epochs" in said
    assert again["train/loss"] == pytest.approx(first["train/loss"]) and again["eval/loss"] == first["eval/loss"]
    assert listing(tmp_path) == before


def test_a_max_steps_below_the_checkpoint_is_refused_before_writing(tmp_path):
    fit(tmp_path, max_steps=4)
    before = listing(tmp_path)
    with pytest.raises(ConfigError) as err:
        fit(tmp_path, max_steps=2)
    assert err.value.field == "max_steps" and "step 4" in str(err.value)
    assert listing(tmp_path) == before


def test_a_longer_run_says_that_the_schedule_changed(tmp_path, capsys):
    fit(tmp_path, max_steps=2, scheduler="warmup_linear")
    capsys.readouterr()
    fit(tmp_path, max_steps=4, scheduler="warmup_linear")
    assert "total_steps 2 -> 4" in capsys.readouterr().out
    assert sorted(logged(tmp_path, "train/loss")) == [1, 2, 3, 4]


# ---- fit() then a recipe in the same output_dir ----------------------------------------------------------------------


def test_a_recipe_after_fit_gets_its_own_place_and_a_relaunch_trains_nothing(tmp_path, capsys):
    e = engine(tmp_path, max_steps=2)
    e.fit()
    e.fit_one_cycle(1, lr_max=1e-2)  # 4 steps of its own: one epoch of 32 samples, 8 per step
    e.close()
    phase = tmp_path / "phase2"
    lrs = logged(phase, "train/lr")
    assert sorted(lrs) == [1, 2, 3, 4] and lrs[1] == pytest.approx(1e-2 / 25, rel=1e-5)  # the cycle starts at its start
    capsys.readouterr()
    again = engine(tmp_path, max_steps=2)  # the same script, relaunched: both phases are complete
    again.fit()
    again.fit_one_cycle(1, lr_max=1e-2)
    again.close()
    assert capsys.readouterr().out.count("the run is complete") == 2
    assert sorted(logged(phase, "train/lr")) == [1, 2, 3, 4]


# ---- keep_best and EarlyStopping on metrics ------------------------------------------------------------------------


def test_a_mistyped_keep_best_is_refused_when_the_engine_is_made(tmp_path):
    with pytest.raises(ConfigError, match=r"watches 'eval/los', which no evaluation gives; the metrics are "
                                          r"\['eval/loss'\]") as err:
        fit(tmp_path, keep_best="eval/los")
    assert err.value.field == "keep_best" and not (tmp_path / "checkpoints").exists()
    with pytest.raises(ConfigError) as err:
        engine(tmp_path / "no_eval", eval_data=False, keep_best="eval/loss")
    assert err.value.field == "keep_best" and not (tmp_path / "no_eval").exists()


def test_a_mistyped_keep_best_is_refused_on_resume_before_the_best_is_deleted(tmp_path):
    fit(tmp_path, max_steps=2, keep_best="eval/loss")  # step-2 records eval/loss
    with pytest.raises(ConfigError, match=r"'eval/los'.*eval/loss") as err:
        fit(tmp_path, max_steps=6, keep_best="eval/los", save_every=1, keep_last=1, eval_every=4)
    assert err.value.field == "keep_best"
    assert (tmp_path / "checkpoints" / "step-00000002").is_dir()


class Undeclared(Callback):
    def after_evaluate(self, engine):
        engine.last_eval["eval/acc"] = 0.5


def test_a_callback_that_adds_an_undeclared_metric_cannot_be_watched(tmp_path):
    """A metric a callback adds without declaring it (adds_metrics) is refused at start-up by whatever watches it."""
    with pytest.raises(ConfigError, match=r"watches 'eval/acc'") as err:
        fit(tmp_path, callbacks=[SaveBest("eval/acc", mode="max"), Undeclared()], max_steps=4)
    assert err.value.field == "SaveBest.metric" and not (tmp_path / "checkpoints").exists()


class Accuracy(Callback):
    """A custom metric, added to last_eval after each evaluation: it never improves."""

    def adds_metrics(self, names):
        return ["eval/acc"]

    def after_evaluate(self, engine):
        engine.last_eval["eval/acc"] = 0.5


def test_early_stopping_on_a_custom_metric_listed_before_its_producer(tmp_path):
    stop = EarlyStopping("eval/acc", mode="max", patience=1)
    e = engine(tmp_path, callbacks=[stop, Accuracy()], max_steps=8, eval_every=1)
    e.fit()
    assert e.state.step == 2 and stop.best == 0.5  # evaluated twice without improving: stopped
    e.close()
    with pytest.raises(ConfigError, match=r"watches 'eval/accuracy', which no evaluation gives; the metrics are "
                                          r"\['eval/acc', 'eval/loss'\]") as err:
        engine(tmp_path / "typo", callbacks=[EarlyStopping("eval/accuracy"), Accuracy()], max_steps=2)
    assert err.value.field == "EarlyStopping.metric" and not (tmp_path / "typo").exists()
