"""Streams (IterableDataset): step k takes the stream's next global batch, each rank keeps its own positions,
and a run resumes exactly, also on another number of processes (acctrain.data.stream_batches)."""

from __future__ import annotations

import json

import pytest
import torch

from acctrain import ConfigError, Engine, TrainConfig
from acctrain.data import DataPlan, StreamReader, stream_batches
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
    taken = {r: [b.tolist() for b in stream_batches(StreamReader(stream), plan.rank_windows(0, r, 0, 5), None)]
             for r in range(world)}
    for k in range(5):  # each rank's micro-batches of step k, together, are the stream's samples 8k .. 8k+7
        per_step = plan.accumulation
        step = sorted(i for r in range(world) for b in taken[r][k * per_step : (k + 1) * per_step] for i in b)
        assert step == sorted(i % 10 for i in range(8 * k, 8 * k + 8))
    assert stream.epochs[:4] == [0, 1, 2, 3]  # set_epoch before each pass
    resumed = [b.tolist() for b in stream_batches(StreamReader(StreamOf(list(range(10)))), plan.rank_windows(0, 0, 3, 5),
                                                  None)]
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


@pytest.mark.processes
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


class StatefulStream(StreamOf):
    """A stream with its own state (the position in the current pass), as Hugging Face's and torchdata's have."""

    def __init__(self, items):
        super().__init__(items)
        self.start, self.index, self.reads, self.loaded = 0, 0, 0, []

    def state_dict(self) -> dict:
        return {"index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.loaded.append(state)
        self.start = state["index"]

    def __iter__(self):
        start, self.start = self.start, 0
        for i in range(start, len(self.items)):
            self.index, self.reads = i + 1, self.reads + 1
            yield self.items[i]


def test_a_stream_with_its_own_state_resumes_without_reading_what_was_consumed(tmp_path):
    def run(steps, stream, out):
        cfg = TrainConfig(output_dir=str(tmp_path / out), global_batch_size=8, micro_batch_size=2, max_steps=steps,
                          lr=1e-2, scheduler="constant", log_every=1)
        e = Engine(make_model(0), cfg, stream, loss_fn=token_loss, collate_fn=collate)
        e.fit()
        params = {n: p.detach().clone() for n, p in e.unwrapped_model.named_parameters()}
        e.close()
        return params

    items = VarLenTokens(26).items  # 10 steps of 8: passes end inside steps
    reference = run(10, StatefulStream(items), "ref")
    run(5, StatefulStream(items), "run")  # steps 1-5, saved at 40 samples (pass 1, 14 into it)
    resumed_stream = StatefulStream(items)
    resumed = run(10, resumed_stream, "run")  # a longer run: resumes at step 5
    assert resumed_stream.loaded == [{"index": 14}] and resumed_stream.epochs[0] == 1
    assert resumed_stream.reads == 80 - 40  # only the samples after the checkpoint
    assert all(torch.equal(resumed[n], reference[n]) for n in reference)
