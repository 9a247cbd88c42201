"""Every seed of a run, derived in one place from `TrainConfig.seed`.

The sample order is a function of (seed, epoch) alone (DataPlan.order), so it is the same for any number of
processes; the loader's generator and each rank's global RNG (dropout) get their own streams.
"""

from __future__ import annotations


def order_seed(seed: int, epoch: int) -> int:
    """The permutation of the dataset in `epoch` (DataPlan.order)."""
    return seed * 1_000_003 + epoch


def loader_seed(seed: int, epoch: int) -> int:
    """The training DataLoader's generator in `epoch` (its workers' seeds; the sample order is DataPlan's)."""
    return seed * 7919 + epoch


def rank_seed(seed: int, rank: int, step: int | None = None) -> int:
    """The global torch RNG of `rank` (dropout): at a fresh start, or (`step`) for a rank that the resumed
    run did not have, so that its draws differ from every other rank's."""
    return seed * 1_000_003 + rank + (0 if step is None else 7919 * step)
