"""Every seed of a run, derived in one place from `TrainConfig.seed`.

Each random stream is named by (seed, purpose, index...) and its seed drawn from those numbers by numpy's
`SeedSequence` (a hash designed for this: distinct inputs give independent, non-colliding states), so no two
purposes and no two indices can share a seed:

- the sample order of epoch e (DataPlan.order): ("order", e), the same for any number of processes;
- the training DataLoader's generator in epoch e (its workers' seeds): ("loader", e);
- rank r's global torch RNG (dropout) at a fresh start: ("rank", r, 0); for a rank that a resumed run did not
  have, at optimizer step s: ("rank", r, s + 1).

SCHEME 1, the formulas before SCHEME 2 (`seed * 1_000_003 + epoch` for the order, the same for rank r's RNG:
rank r drew the sample order of epoch r), is kept for checkpoints written with it: a run resumes with the
scheme its checkpoint records (`plan.seed_scheme`; none recorded is 1), so that its remaining epochs keep the
order they would have had.
"""

from __future__ import annotations

import numpy as np

SCHEME = 2
"""The scheme new runs use."""
_PURPOSES = {"order": 1, "loader": 2, "rank": 3}


def order_seed(seed: int, epoch: int, scheme: int = SCHEME) -> int:
    """The permutation of the dataset in `epoch` (DataPlan.order)."""
    return seed * 1_000_003 + epoch if scheme == 1 else _derive(seed, "order", epoch)


def loader_seed(seed: int, epoch: int, scheme: int = SCHEME) -> int:
    """The training DataLoader's generator in `epoch` (its workers' seeds; the sample order is DataPlan's)."""
    return seed * 7919 + epoch if scheme == 1 else _derive(seed, "loader", epoch)


def rank_seed(seed: int, rank: int, step: int | None = None, scheme: int = SCHEME) -> int:
    """The global torch RNG of `rank` (dropout): at a fresh start, or (`step`) for a rank that the resumed
    run did not have, so that its draws differ from every other rank's."""
    if scheme == 1:
        return seed * 1_000_003 + rank + (0 if step is None else 7919 * step)
    return _derive(seed, "rank", rank, 0 if step is None else step + 1)


def _derive(seed: int, purpose: str, *index: int) -> int:
    """A 63-bit seed for the stream (seed, purpose, index...): SeedSequence's first 64 bits of state."""
    low, high = np.random.SeedSequence([seed, _PURPOSES[purpose], *index]).generate_state(2, dtype=np.uint32)
    return (int(high) << 32 | int(low)) & (2**63 - 1)
