"""micro_batch_size='auto' on a CUDA GPU (skipped without one): the largest micro-batch that fits, found by real
out-of-memory errors of the CUDA allocator, the run it gives, its resume, and the agreement of 2 GPUs.

The model (`Greedy`, tests/workers/auto_micro_run.py) allocates 1/24 of the GPU's free memory per sample in its
forward: of a per-rank batch of 64, micro-batches of 64 and 32 cannot fit, 16 (2/3 of the free memory) does.
The search on CPU, with a model that raises the same error, is in tests/test_memory.py.
"""

from __future__ import annotations

import json

import pytest
import torch

from acctrain import Engine, TrainConfig
from acctrain.errors import Preempted
from tests.support import Recorder, launch
from tests.workers.auto_micro_run import Greedy, mse, samples

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def train(out, micro, steps: int = 4, recorder=None) -> Engine:
    free = torch.cuda.mem_get_info()[0]
    cfg = TrainConfig(output_dir=str(out), global_batch_size=64, micro_batch_size=micro, max_steps=steps, lr=1e-2,
                      log_every=1, scheduler="constant")
    torch.manual_seed(0)
    engine = Engine(Greedy(free // 24), cfg, samples(256), loss_fn=mse, callbacks=[recorder] if recorder else [])
    engine.fit()
    return engine


def weights(engine: Engine) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in engine.unwrapped_model.state_dict().items()}


def test_auto_takes_the_largest_micro_batch_that_fits_and_trains_as_that_number_would(tmp_path, capsys):
    auto = train(tmp_path / "auto", "auto")
    assert (auto.plan.micro_batch, auto.plan.accumulation) == (16, 4)
    printed = capsys.readouterr().out
    assert "micro_batch_size=auto: tried 64, 32, 16 on rank 0; 16 fits on every rank, accumulation 4" in printed
    assert "micro_batch=16, accumulation=4," in printed  # the run plan
    state = json.loads((tmp_path / "auto" / "checkpoints" / "step-00000004" / "trainer_state.json").read_text())
    assert state["plan"]["micro_batch"] == 16 and state["config"]["micro_batch_size"] == "auto"
    fixed = train(tmp_path / "fixed", 16)
    assert all(torch.equal(a, b) for a, b in zip(weights(auto).values(), weights(fixed).values()))


def test_auto_resumes_bit_identically(tmp_path):
    reference = train(tmp_path / "ref", "auto", steps=6)
    with pytest.raises(Preempted):
        train(tmp_path / "run", "auto", steps=6, recorder=Recorder(stop_at=3))
    resumed = train(tmp_path / "run", "auto", steps=6)
    assert str(resumed.resumed_from).endswith("step-00000003") and resumed.plan.micro_batch == 16
    assert all(torch.equal(a, b) for a, b in zip(weights(resumed).values(), weights(reference).values()))


@pytest.mark.processes
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_two_gpus_train_with_the_micro_batch_that_fits_on_both(tmp_path):
    launch(["-m", "tests.workers.auto_micro_run", str(tmp_path), "cuda"], nproc=2)
    for rank in (0, 1):  # rank 0 fits 16 of its 64 samples; rank 1's model needs 4x the memory: 4
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert result == {"rank": rank, "num_processes": 2, "micro_batch": 4, "accumulation": 16, "steps": 2}
