"""The data plan: every step's samples are fixed by (seed, epoch, step), and ranks partition them exactly."""

from __future__ import annotations

import time
import tracemalloc

import numpy as np
import pytest
import torch

from acctrain.data import DataPlan, ShardBatches
from acctrain.errors import ConfigError
from acctrain.permutation import EAGER_MAX, FeistelPermutation, permutation


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


# ---- the order beyond EAGER_MAX: a Feistel bijection evaluated per window (acctrain.permutation) --------------


@pytest.mark.parametrize("n", [1, 2, 3, 5, 255, 256, 257, 1000, 4095, 4097, 65536, 70001])
def test_the_feistel_order_is_a_permutation_of_every_size(n):
    values = FeistelPermutation(n, seed=7).take(0, n)
    assert sorted(values) == list(range(n))
    assert FeistelPermutation(n, seed=7).take(0, n) == values  # a function of (n, seed)
    if n > 256:
        assert FeistelPermutation(n, seed=8).take(0, n) != values


def test_the_order_is_randperms_up_to_eager_max_and_feistel_beyond():
    assert permutation(1000, 5).kind == "randperm" and permutation(EAGER_MAX + 1, 5).kind == "feistel"
    generator = torch.Generator().manual_seed(5)
    assert permutation(1000, 5).take(0, 1000) == torch.randperm(1000, generator=generator).tolist()  # the HF order
    assert DataPlan(EAGER_MAX + 1, 8, 8, 1, seed=0).describe()["order"] == "feistel"


def shuffle_quality(order: np.ndarray, window: int) -> dict[str, float]:
    """How much an order looks like a uniform shuffle: the correlation of position and value, the spread of
    each window's mean value (a window drawn from the whole dataset has std sqrt((n^2/12)/window)), the
    fraction of neighbours that are neighbours in the dataset, and how many of the dataset's 16 blocks the
    first window misses."""
    n = len(order)
    means = order[: n - n % window].reshape(-1, window).mean(axis=1)
    expected_std = np.sqrt((n**2 / 12) / window)
    first = np.bincount(order[:window] * 16 // n, minlength=16)
    return {"corr": abs(np.corrcoef(np.arange(n), order)[0, 1]), "window_std": means.std() / expected_std,
            "adjacent": np.mean(np.abs(np.diff(order)) == 1), "empty_blocks": int((first == 0).sum())}


def test_the_feistel_order_shuffles_as_well_as_randperm():
    """Measured on 2**20 samples and windows of 512 against torch.randperm's figures on the same size."""
    n = 2**20 + 12345  # not a power of two: cycle-walking is exercised
    feistel = shuffle_quality(np.array(FeistelPermutation(n, seed=1).take(0, n)), 512)
    randperm = shuffle_quality(torch.randperm(n, generator=torch.Generator().manual_seed(1)).numpy(), 512)
    assert feistel["corr"] < 0.01 and randperm["corr"] < 0.01
    assert 0.9 < feistel["window_std"] < 1.1 and 0.9 < randperm["window_std"] < 1.1  # windows as random
    assert feistel["adjacent"] < 1e-4 and randperm["adjacent"] < 1e-4
    assert feistel["empty_blocks"] == randperm["empty_blocks"] == 0


def test_a_billion_samples_plan_in_constant_time_and_memory():
    """The issue's case: construction and any window well under a second, memory flat in N."""
    tracemalloc.start()
    started = time.perf_counter()
    plan = DataPlan(dataset_len=10**9, global_batch=512, micro_batch=8, world_size=8, seed=0)
    first, last = plan.window(0, 0), plan.window(3, plan.steps_per_epoch - 1)
    elapsed = time.perf_counter() - started
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert elapsed < 1.0 and peak < 10 * 2**20, (elapsed, peak)
    assert len(first) == 512 and len(set(first)) == 512 and all(0 <= i < 10**9 for i in first)
    assert len(last) == (10**9 % 512 or 512)  # the last window (full here: 512 divides 1e9)
    assert plan.window(0, 0) == first and plan.window(1, 0) != first  # a function of (seed, epoch)


def test_feistel_windows_are_the_same_at_any_world_size_and_partition_exactly():
    n = EAGER_MAX + 1001  # a short last window of 1001 % 64 samples
    plans = [DataPlan(n, 64, micro, world, seed=4) for micro, world in ((64, 1), (8, 2), (2, 8), (4, 4))]
    last = plans[0].steps_per_epoch - 1
    for k in (0, 1, last):
        window = plans[0].window(0, k)
        assert len(window) == (64 if k < last else n % 64)
        for plan in plans[1:]:
            assert plan.window(0, k) == window
            assert sorted(all_rank_samples(plan, 0, k)) == sorted(window)
    # rank_windows gives the same windows as window(), lazily from any step
    rank0 = next(plans[3].rank_windows(0, rank=0, start_step=last))
    assert rank0.global_samples == n % 64 and rank0.step_in_epoch == last


@pytest.mark.parametrize("n,world,micro", [(10, 1, 4), (10, 3, 2), (7, 4, 3), (2, 4, 8)])
def test_eval_shards_cover_every_sample_once_in_micro_batches(n, world, micro):
    shards = [ShardBatches(n * r // world, n * (r + 1) // world, micro) for r in range(world)]
    batches = [b for shard in shards for b in shard]
    assert sorted(i for b in batches for i in b) == list(range(n)) and all(0 < len(b) <= micro for b in batches)
    assert [len(shard) for shard in shards] == [len(list(shard)) for shard in shards]  # and iterable again


def test_an_eval_shard_of_any_size_is_made_as_it_is_read():
    shard = ShardBatches(0, 10**12, 8)  # a list of it would not fit in memory
    assert len(shard) == 10**12 // 8 and next(iter(shard)) == list(range(8))
