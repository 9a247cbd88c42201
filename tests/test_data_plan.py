"""The data plan: every step's samples are fixed by (seed, epoch, step), and ranks partition them exactly."""

from __future__ import annotations

import pytest

from acctrain.data import DataPlan
from acctrain.errors import ConfigError


def all_rank_samples(plan: DataPlan, epoch: int, k: int) -> list[int]:
    samples = []
    for rank in range(plan.world_size):
        for mb in plan.split(plan.window(epoch, k), rank):
            samples += mb.indices[: mb.num_samples]
    return samples


@pytest.mark.parametrize("n", [17, 64, 100, 5])
@pytest.mark.parametrize("micro,world", [(8, 1), (2, 1), (2, 2), (1, 4), (4, 2)])
def test_ranks_and_micro_batches_partition_each_step(n, micro, world):
    plan = DataPlan(n, 8, micro, world, seed=3, epochs=2)
    reference = DataPlan(n, 8, 8, 1, seed=3, epochs=2)
    for epoch in range(2):
        for k in range(plan.steps_per_epoch):
            window = plan.window(epoch, k)
            assert window == reference.window(epoch, k)  # independent of world size and accumulation
            assert sorted(all_rank_samples(plan, epoch, k)) == sorted(window)  # each sample once
        # each epoch covers the whole dataset exactly once
        seen = [i for k in range(plan.steps_per_epoch) for i in plan.window(epoch, k)]
        assert sorted(seen) == list(range(n))


def test_every_rank_runs_the_same_number_of_micro_batches():
    plan = DataPlan(17, 8, 2, 2, seed=0)
    for k in range(plan.steps_per_epoch):
        counts = {len(plan.split(plan.window(0, k), r)) for r in range(2)}
        assert len(counts) == 1
    # the last window holds one sample: rank 1 runs one padding micro-batch that counts zero
    last = [plan.split(plan.window(0, 2), r) for r in range(2)]
    assert [mb.num_samples for mb in last[0]] == [1]
    assert [mb.num_samples for mb in last[1]] == [0]


def test_full_windows_use_micro_batch_size_and_accumulation():
    plan = DataPlan(64, 16, 4, 2, seed=0)
    assert plan.accumulation == 2
    for rank in range(2):
        assert [mb.num_samples for mb in plan.split(plan.window(0, 0), rank)] == [4, 4]


def test_order_is_a_function_of_seed_and_epoch():
    a, b = DataPlan(50, 10, 10, 1, seed=1), DataPlan(50, 10, 5, 2, seed=1)
    assert a.order(0).tolist() == b.order(0).tolist()
    assert a.order(0).tolist() != a.order(1).tolist()
    assert a.order(0).tolist() != DataPlan(50, 10, 10, 1, seed=2).order(0).tolist()


def test_steps_epochs_and_max_steps():
    plan = DataPlan(17, 8, 2, 1, seed=0, epochs=3)
    assert (plan.steps_per_epoch, plan.total_steps, plan.num_epochs) == (3, 9, 3)
    plan = DataPlan(17, 8, 2, 1, seed=0, epochs=1, max_steps=7)
    assert (plan.total_steps, plan.num_epochs) == (7, 3)


def test_indivisible_global_batch_names_the_field():
    with pytest.raises(ConfigError) as err:
        DataPlan(100, 8, 4, 3, seed=0)
    assert err.value.field == "global_batch_size"
    assert "multiple of 12" in str(err.value)
