"""Where each step's time goes (acctrain.step_time): logged as train/time/* beside train/step_time_s, and as one
line at the end of fit. A dataset that sleeps shows up as data, a callback that sleeps as callbacks, a slow rank
as the all-reduce its peers wait in; the parts sum to the step time."""

from __future__ import annotations

import json
import time

import pytest
import torch

from acctrain import Callback, Engine, TrainConfig
from acctrain.step_time import PARTS, StepClock
from tests.support.events import logged, scalar_tags
from tests.support.processes import launch
from tests.support.tiny import VarLenTokens, collate, make_model, token_loss

SLEEP = 0.02  # seconds


class SleepyTokens(VarLenTokens):
    """VarLenTokens whose every sample takes SLEEP seconds to read."""

    def __getitem__(self, i):
        time.sleep(SLEEP)
        return super().__getitem__(i)


class Sleeper(Callback):
    """Sleeps SLEEP seconds at each of its events."""

    def after_backward(self, engine):
        time.sleep(SLEEP)

    def after_step(self, engine):
        time.sleep(SLEEP)


def fit(out, data=None, callbacks=(), capsys=None, **kw) -> Engine:
    cfg = TrainConfig(**{"output_dir": str(out), "global_batch_size": 4, "micro_batch_size": 2, "max_steps": 6,
                         "log_every": 2, "lr": 1e-2, "cpu": True, "cpu_threads": 1, "save_every": 0, **kw})
    engine = Engine(make_model(), cfg, data or VarLenTokens(48), loss_fn=token_loss, collate_fn=collate,
                    callbacks=list(callbacks))
    engine.fit()
    engine.close()
    return engine


def breakdown(out) -> dict[int, dict[str, float]]:
    """{step: {part: seconds per step}} of each logged interval, with "total" = train/step_time_s."""
    rows = {step: {"total": value} for step, value in logged(out, "train/step_time_s").items()}
    for part in PARTS:
        for step, value in logged(out, f"train/time/{part}").items():
            rows[step][part] = value
    return rows


def assert_parts_sum_to_the_step_time(rows):
    for step, row in rows.items():
        parts = sum(row[p] for p in PARTS)
        assert parts == pytest.approx(row["total"], rel=0.01), (step, row)


def test_every_part_is_logged_and_they_sum_to_the_step_time(tmp_path, capsys):
    fit(tmp_path / "run")
    assert {f"train/time/{p}" for p in PARTS} <= scalar_tags(tmp_path / "run")
    rows = breakdown(tmp_path / "run")
    assert sorted(rows) == [2, 4, 6]
    assert_parts_sum_to_the_step_time(rows)
    for row in rows.values():
        assert row["forward"] > 0 and row["backward"] > 0 and row["optimizer"] > 0
        assert row["allreduce"] < row["forward"] + row["backward"]  # one process: no gradient all-reduce to wait for
    summary = [line for line in capsys.readouterr().out.splitlines() if line.startswith("where the time went")]
    assert len(summary) == 1 and summary[0].startswith("where the time went (6 steps, "), summary
    shares = dict(item.rsplit(" ", 2)[:2] for item in summary[0].split(": ", 1)[1].split(", "))
    assert 95 <= sum(int(v) for v in shares.values()) <= 105, summary  # each part rounded to a whole per cent


def test_a_dataset_that_sleeps_shows_up_as_data_time(tmp_path):
    fit(tmp_path / "run", data=SleepyTokens(48))
    rows = breakdown(tmp_path / "run")
    assert_parts_sum_to_the_step_time(rows)
    for step, row in rows.items():
        # 4 samples a step, each read once (one process, no loader workers)
        assert 4 * SLEEP <= row["data"] < 6 * SLEEP, (step, row)
        assert row["callbacks"] == 0.0
        if step > 2:  # after the first steps' warm-up: data is most of the step
            assert row["data"] > 0.5 * row["total"], (step, row)


def test_a_callback_that_sleeps_shows_up_as_callbacks_time(tmp_path):
    fit(tmp_path / "run", callbacks=[Sleeper()])
    rows = breakdown(tmp_path / "run")
    assert_parts_sum_to_the_step_time(rows)
    for step, row in rows.items():
        # after_backward on each of the 2 micro-batches, after_step once: 3 sleeps a step
        assert 3 * SLEEP <= row["callbacks"] < 4.5 * SLEEP, (step, row)
        assert row["data"] < SLEEP, (step, row)


def test_evaluation_and_checkpoints_are_their_own_parts(tmp_path):
    cfg = TrainConfig(output_dir=str(tmp_path / "run"), global_batch_size=4, micro_batch_size=2, max_steps=6,
                      log_every=2, eval_every=2, save_every=2, lr=1e-2, cpu=True, cpu_threads=1)
    engine = Engine(make_model(), cfg, VarLenTokens(48), SleepyTokens(8, seed=5), loss_fn=token_loss,
                    collate_fn=collate)
    engine.fit()
    engine.close()
    rows = breakdown(tmp_path / "run")
    assert_parts_sum_to_the_step_time(rows)
    # the evaluation after step 2 (8 samples, each SLEEP) falls in the interval logged at step 4: 2 steps
    assert rows[4]["evaluation"] >= 8 * SLEEP / 2, rows[4]
    assert rows[4]["checkpoint"] > 0, rows[4]


def test_on_a_gpu_parts_come_from_completed_events_only():
    """The clock's GPU form: a pair of events is read once both completed, else at the next take."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    clock = StepClock(on_gpu=True)
    clock.start(time.perf_counter())
    clock.switch("forward")
    torch.cuda._sleep(10_000_000)  # ~5 ms of GPU time at ~2 GHz
    clock.switch("other")
    torch.cuda.synchronize()
    parts = clock.take(time.perf_counter(), elapsed=1.0)
    assert parts["forward"] > 0.001 and parts["other"] <= 1.0


@pytest.mark.processes
def test_a_slow_rank_shows_up_as_the_all_reduce_its_peer_waits_in(tmp_path):
    launch(["-m", "tests.workers.step_time_run", str(tmp_path), "0.05"])
    world = json.loads((tmp_path / "world.json").read_text())
    assert world["num_processes"] == world["world_size_env"] == 2
    rows = breakdown(tmp_path)  # rank 0's: the main process logs
    assert_parts_sum_to_the_step_time(rows)
    for step in (4, 6):  # from the second step on: the first learns which gradient is ready last
        row = rows[step]
        assert row["allreduce"] >= 0.04, (step, row)  # rank 1 sleeps 50 ms before each step's last backward
        assert row["callbacks"] < 0.01 and row["backward"] < row["allreduce"], (step, row)
