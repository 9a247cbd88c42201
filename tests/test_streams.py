"""Streams (IterableDataset): step k takes the stream's next global batch, each rank keeps its own positions,
and a run resumes exactly, also on another number of processes (acctrain.data.stream_batches)."""

from __future__ import annotations

import json

import pytest
import torch

from acctrain import ConfigError, Engine, TrainConfig
from acctrain.data import DataPlan, stream_batches
from acctrain.errors import Preempted
from tests.support import assert_same_run, ckpts, launch
from tests.support.tiny import StreamOf, VarLenTokens, collate, make_model, token_loss
from tests.workers import resume_run

WORKER = ["-m", "tests.workers.resume_run"]


@pytest.mark.parametrize("world,micro", [(1, 8), (2, 2), (4, 1)])
def test_each_step_takes_the_streams_next_global_batch_and_ranks_split_it(world, micro):
    stream = StreamOf(list(range(10)))  # 10 samples: steps of 8 run across passes
    plan = DataPlan(dataset_len=5 * 8, global_batch=8, micro_batch=micro, world_size=world, seed=0, max_steps=5,
                    stream=True)
    taken = {r: [b.tolist() for b in stream_batches(stream, plan.rank_windows(0, r, 0, 5), None)] for r in range(world)}
    for k in range(5):  # each rank's micro-batches of step k, together, are the stream's samples 8k .. 8k+7
        per_step = plan.accumulation
        step = sorted(i for r in range(world) for b in taken[r][k * per_step : (k + 1) * per_step] for i in b)
        assert step == sorted(i % 10 for i in range(8 * k, 8 * k + 8))
    assert stream.epochs[:4] == [0, 1, 2, 3]  # set_epoch before each pass
    resumed = [b.tolist() for b in stream_batches(StreamOf(list(range(10))), plan.rank_windows(0, 0, 3, 5), None)]
    assert resumed == taken[0][3 * plan.accumulation :]  # from step 3: reads past the 24 samples consumed


def engine(tmp_path, data, eval_data=None, **config):
    cfg = TrainConfig(**{"output_dir": str(tmp_path), "global_batch_size": 8, "micro_batch_size": 2, **config})
    return Engine(make_model(0), cfg, data, eval_data, loss_fn=token_loss, collate_fn=collate)


def test_what_a_stream_cannot_do_is_refused_naming_the_field(tmp_path):
    stream = StreamOf(VarLenTokens(10).items)
    with pytest.raises(ConfigError, match="max_steps: train_data is a stream"):
        engine(tmp_path, stream)
    with pytest.raises(ConfigError, match="num_workers: train_data is a stream"):
        engine(tmp_path, stream, max_steps=3, num_workers=2)
    with pytest.raises(ConfigError, match="eval_data: evaluation reads each sample once"):
        engine(tmp_path, VarLenTokens(10), stream)
    assert not (tmp_path / "checkpoints").exists()


def test_a_stream_run_stopped_and_resumed_is_bit_identical(tmp_path):
    reference = resume_run.run(str(tmp_path / "ref"), stream=True)  # 10 steps of 8: three passes over 26
    with pytest.raises(Preempted):
        resume_run.run(str(tmp_path / "run"), stream=True, stop_at=5)
    state = json.loads((tmp_path / "run" / "checkpoints" / "step-00000005" / "trainer_state.json").read_text())
    assert state["plan"]["order"] == "stream" and state["plan"]["dataset_len"] == "stream"
    resumed = resume_run.run(str(tmp_path / "run"), stream=True)
    assert resumed["steps"] == list(range(6, 11))
    assert_same_run(resumed, reference)


def test_a_stream_run_on_two_processes_is_the_one_process_run_and_resumes_on_one(tmp_path):
    reference = resume_run.run(str(tmp_path / "ref"), stream=True)
    launch([*WORKER, json.dumps({"out_dir": str(tmp_path / "two"), "stream": True})], nproc=2)
    two = json.loads((tmp_path / "two" / "result.json").read_text())
    assert two["num_processes"] == two["world_size_env"] == 2
    assert two["losses"] == pytest.approx(reference["losses"], rel=1e-5)
    launch([*WORKER, json.dumps({"out_dir": str(tmp_path / "run"), "stream": True, "stop_at": 5})], nproc=2,
           check=False)
    assert ckpts(tmp_path / "run") == ["step-00000005"]
    resumed = resume_run.run(str(tmp_path / "run"), stream=True)
    assert resumed["num_processes"] == 1 and resumed["steps"] == list(range(6, 11))
    assert_same_run(resumed, reference, exact=False)
    assert torch.tensor(resumed["losses"]).allclose(torch.tensor(reference["losses"][5:]), rtol=1e-5)
