"""The EMA of the weights (acctrain.ema): the average computed by hand, skipped steps left out, exact resume on the
same world size and across world sizes, evaluation with the EMA weights swapped in and back, the config switch."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from acctrain import ConfigError, Engine, TrainConfig
from acctrain.ema import EMA
from acctrain.errors import Preempted
from acctrain.cli import main
from acctrain.export import ema_state
from tests.support import ckpts, launch, logged, overflow_at
from tests.support.tiny import VarLenTokens, collate, make_model, rel_diff, token_loss
from tests.workers import ema_run

WORKER = ["-m", "tests.workers.ema_run"]
DECAY = {"decay": 0.9}


def part(tensors: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def saved_average(ckpt) -> dict:
    """The EMA's averages as a checkpoint holds them (callbacks.safetensors, named by trainer_state.json)."""
    return ema_state(ckpt, json.loads((ckpt / "trainer_state.json").read_text()))["weights"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One process, uninterrupted, 10 steps, EMA(0.9): the run the resumed ones must give."""
    return ema_run.run(str(tmp_path_factory.mktemp("ema-ref")), ema=DECAY)


def by_hand(seen, decay: float, warmup: bool, every: int) -> tuple[dict, int]:
    """The EMA of the weights after each applied step (float64): the rule of acctrain.ema written out."""
    average = {n: w.double() for n, w in seen.start.items()}
    t, applied_before = 0, 0
    for applied, weights in seen.after:
        if applied == applied_before:  # a skipped step: nothing to average
            continue
        applied_before = applied
        if applied % every:
            continue
        d = min(decay, (1 + t) / (10 + t)) if warmup else decay
        average = {n: d * average[n] + (1 - d) * weights[n].double() for n in average}
        t += 1
    return average, t


@pytest.mark.parametrize("decay,warmup,every", [(0.9, True, 1), (0.8, False, 2)])
def test_the_average_is_the_one_computed_by_hand_and_skips_skipped_steps(tmp_path, decay, warmup, every):
    run = ema_run.run(str(tmp_path), steps=9, nan_at=4, every_step=True,
                      ema={"decay": decay, "warmup": warmup, "every": every})
    assert run["state"]["skipped_steps"] == 1 and run["state"]["schedule_step"] == 8  # step 4 was not applied
    expected, updates = by_hand(run["seen"], decay, warmup, every)
    assert run["updates"] == updates == 8 // every
    ema = part(run["tensors"], "ema.")
    assert set(ema) == set(expected)
    for name, value in expected.items():
        assert ema[name].dtype == torch.float32
        assert torch.allclose(ema[name].double(), value, rtol=1e-6, atol=1e-7), name
    # the skipped step changed nothing: its weights are the previous step's, and the rule above never saw them
    assert all(torch.equal(run["seen"].after[2][1][n], run["seen"].after[3][1][n]) for n in expected)


def test_an_overflow_a_grad_scaler_skips_does_not_update_the_average(tmp_path):
    """fp16's path (GradScaler: overflow, skip, lower the scale) with torch's CPU GradScaler; on a GPU: test_gpu."""
    from tests.test_precision import ScaledEngine

    ema, seen = EMA(0.9), ema_run.Weights(every_step=True)
    cfg = TrainConfig(output_dir=str(tmp_path), global_batch_size=8, micro_batch_size=4, max_steps=6, lr=1e-2, cpu=True)
    engine = ScaledEngine(make_model(0), cfg, VarLenTokens(64), loss_fn=overflow_at(3), collate_fn=collate,
                          callbacks=[ema, seen])
    engine.fit()
    engine.close()
    assert engine.state.skipped_steps == 1 and engine.state.schedule_step == 5
    assert engine.step_ops.scaler.get_scale() < 65536.0  # the scaler saw the overflow
    expected, updates = by_hand(seen, 0.9, True, 1)
    assert ema.updates == updates == 5
    for name, value in expected.items():
        assert torch.allclose(ema.weights[name].double(), value, rtol=1e-6, atol=1e-7), name


def test_decay_warm_up_values():
    ema = EMA(decay=0.99)
    assert [ema.decay_at(t) for t in (0, 8, 80, 10**6)] == [0.1, 0.5, 0.9, 0.99]
    assert EMA(decay=0.99, warmup=False).decay_at(0) == 0.99
    with pytest.raises(ValueError, match="decay"):
        EMA(decay=1.0)
    with pytest.raises(ValueError, match="every"):
        EMA(every=0)


def test_stop_and_resume_gives_a_bit_identical_average(tmp_path, reference):
    with pytest.raises(Preempted):
        ema_run.run(str(tmp_path), stop_at=6, ema=DECAY)
    saved = saved_average(tmp_path / "checkpoints" / "step-00000006")
    resumed = ema_run.run(str(tmp_path), ema=DECAY)
    assert resumed["steps"] == list(range(7, 11)) and resumed["updates"] == reference["updates"] == 10
    start = part(resumed["tensors"], "ema_start.")
    assert start.keys() == saved.keys() and all(torch.equal(start[n], saved[n]) for n in start)  # loaded exactly
    for name, value in part(reference["tensors"], "ema.").items():
        assert torch.equal(resumed["tensors"][f"ema.{name}"], value), name
    for name, value in part(reference["tensors"], "param.").items():
        assert torch.equal(resumed["tensors"][f"param.{name}"], value), name


@pytest.mark.processes
def test_two_processes_resumed_on_one_have_the_same_average(tmp_path, reference):
    launch([*WORKER, json.dumps({"out_dir": str(tmp_path), "stop_at": 5, "ema": DECAY})], nproc=2, check=False)
    assert ckpts(tmp_path) == ["step-00000005"]
    state = json.loads((tmp_path / "checkpoints" / "step-00000005" / "trainer_state.json").read_text())
    assert state["plan"]["world_size"] == 2
    saved = saved_average(tmp_path / "checkpoints" / "step-00000005")
    resumed = ema_run.run(str(tmp_path), ema=DECAY)
    assert resumed["num_processes"] == 1 and resumed["steps"] == list(range(6, 11))
    start = part(resumed["tensors"], "ema_start.")
    assert start.keys() == saved.keys() and all(torch.equal(start[n], saved[n]) for n in start)  # loaded exactly
    assert resumed["updates"] == 10
    # across world sizes the weights agree to float rounding (README, "Exactness"), so does their average
    assert rel_diff(part(resumed["tensors"], "ema."), part(reference["tensors"], "ema.")) < 1e-5


def test_evaluation_with_the_ema_weights_is_that_of_a_model_holding_them(tmp_path):
    def engine_for(model, out, callbacks=()):
        cfg = TrainConfig(output_dir=str(out), global_batch_size=8, micro_batch_size=2, max_steps=6, eval_every=3,
                          lr=1e-2, log_every=1)
        return Engine(model, cfg, VarLenTokens(26), VarLenTokens(6), loss_fn=token_loss, callbacks=callbacks,
                      collate_fn=collate)

    ema = EMA(0.9)
    engine = engine_for(make_model(0), tmp_path / "run", [ema])
    result = engine.fit()
    trained = {n: p.detach().clone() for n, p in engine.unwrapped_model.named_parameters()}
    holder = make_model(1)
    holder.load_state_dict(ema.weights)
    other = engine_for(holder, tmp_path / "holder")
    expected = other.evaluate()["eval/loss"]
    other.close()
    assert result["eval_ema/loss"] == expected != result["eval/loss"]
    assert logged(tmp_path / "run", "eval_ema/loss")[6] == pytest.approx(expected, rel=1e-6)
    with ema.applied(engine):
        assert engine.eval_metrics()["eval/loss"] == expected
        assert all(torch.equal(p, ema.weights[n]) for n, p in engine.unwrapped_model.named_parameters())
    assert all(torch.equal(p, trained[n]) for n, p in engine.unwrapped_model.named_parameters())  # bitwise back
    engine.close()


def test_evaluating_the_average_leaves_training_bit_identical(tmp_path):
    evaluated = ema_run.run(str(tmp_path / "a"), steps=6, eval_every=2, ema={"decay": 0.9, "evaluate": True})
    silent = ema_run.run(str(tmp_path / "b"), steps=6, eval_every=2, ema={"decay": 0.9, "evaluate": False})
    assert "eval_ema/loss" in evaluated["metrics"] and "eval_ema/loss" not in silent["metrics"]
    assert set(evaluated["tensors"]) == set(silent["tensors"])
    for name, value in evaluated["tensors"].items():
        assert torch.equal(value, silent["tensors"][name]), name


def test_ema_decay_in_the_config_is_this_callback(tmp_path):
    configured = ema_run.run(str(tmp_path / "config"), steps=4, ema_decay=0.9)
    given = ema_run.run(str(tmp_path / "callback"), steps=4, ema=DECAY)
    assert configured["updates"] == given["updates"] == 4
    for name, value in part(given["tensors"], "ema.").items():
        assert torch.equal(configured["tensors"][f"ema.{name}"], value), name
    with pytest.raises(ConfigError, match="ema_decay"):
        ema_run.run(str(tmp_path / "both"), steps=4, ema_decay=0.9, ema=DECAY)
    for bad in (1.0, -0.1):
        with pytest.raises(ConfigError, match="ema_decay"):
            TrainConfig(output_dir=str(tmp_path / "bad"), ema_decay=bad)


def test_resuming_a_checkpoint_without_ema_starts_the_average_there(tmp_path, capsys):
    ema_run.run(str(tmp_path), steps=4)
    later = ema_run.run(str(tmp_path), steps=6, ema=DECAY)
    assert "no EMA state in the checkpoint; the average starts from the weights of optimizer step 4" in capsys.readouterr().out
    assert later["updates"] == 2
    step4 = load_file(tmp_path / "checkpoints" / "step-00000004" / "model.safetensors")
    start = part(later["tensors"], "ema_start.")
    assert start.keys() == step4.keys() and all(torch.equal(start[n], step4[n]) for n in start)


@pytest.mark.processes
def test_under_fsdp_the_average_is_sharded_saved_whole_and_resumed_on_one_process(tmp_path, reference):
    """2 FSDP processes stop after step 5 (each rank averages its shards), 1 FSDP process resumes; `acctrain export
    --ema` joins nothing: the checkpoint holds the average whole."""
    launch([*WORKER, json.dumps({"out_dir": str(tmp_path), "stop_at": 5, "ema": DECAY, "fsdp": True})], nproc=2,
           check=False)
    assert ckpts(tmp_path) == ["step-00000005"] and (tmp_path / "checkpoints" / "step-00000005" / "sharded.json").is_file()
    saved = saved_average(tmp_path / "checkpoints" / "step-00000005")
    assert saved.keys() == part(reference["tensors"], "ema.").keys()
    launch([*WORKER, json.dumps({"out_dir": str(tmp_path), "ema": DECAY, "fsdp": True})], nproc=1)
    resumed = load_file(tmp_path / "result-rank0.safetensors")
    start = part(resumed, "ema_start.")
    assert start.keys() == saved.keys() and all(torch.equal(start[n], saved[n]) for n in start)  # loaded exactly
    assert rel_diff(part(resumed, "ema."), part(reference["tensors"], "ema.")) < 1e-5
    assert main(["export", str(tmp_path), str(tmp_path / "ema.safetensors"), "--ema"]) == 0
    exported = load_file(tmp_path / "ema.safetensors")
    assert all(torch.equal(exported[n], t) for n, t in part(resumed, "ema.").items())
