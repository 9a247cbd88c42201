"""The LR range test with fastai's semantics, on any number of processes.

    suggestions = engine.lr_find()              # SuggestedLRs(valley=..., slide=..., minimum=..., steep=...)
    suggestions.valley

Iteration i (0-based) trains one optimizer step at lr = start_lr * (end_lr / start_lr) ** (i / num_it)
(fastai's exponential annealer) for the param groups with lr multiplier 1, the others in proportion (so a
suggestion is what to pass as `lr=`), on the plan's global batches (`Engine.train_steps` in `Engine.trial()`).
The loss is the step's exact mean over all ranks, smoothed as fastai does (moving average, beta 0.98,
debiased); with `stop_div` the test stops once the smoothed loss exceeds 4x its minimum or is not
finite. All ranks see the same reduced loss, so they stop at the same iteration and suggest the same.
Afterwards the model, the optimizer, the GradScaler, the RNGs and the Engine's state are restored:
the weights are bitwise what they were. The suggestion functions are fastai's (valley, slide,
minimum, steep), applied to the recorded lrs and smoothed losses without the first 10 % and the last
5 iterations, as fastai's `lr_find`. A PNG of loss against lr, suggestions marked, goes to
`{output_dir}/lr_find.png` (main process; needs matplotlib).
"""

from __future__ import annotations

import math
from collections import namedtuple
from pathlib import Path
from typing import Callable, Sequence

import numpy as np



# fastai's suggestion functions: (lrs, losses, num_it) -> suggested lr, (lr, loss) of the point to mark
def valley(lrs: np.ndarray, losses: np.ndarray, num_it: int):
    """The lr two-thirds of the way down the longest valley (fastai's default)."""
    n = len(losses)
    max_start, max_end = 0, 0
    lds = [1] * n
    for i in range(1, n):
        for j in range(0, i):
            if losses[i] < losses[j] and lds[i] < lds[j] + 1:
                lds[i] = lds[j] + 1
            if lds[max_end] < lds[i]:
                max_end = i
                max_start = max_end - lds[max_end]
    sections = (max_end - max_start) / 3
    idx = max_start + int(sections) + int(sections / 2)
    return float(lrs[idx]), (float(lrs[idx]), float(losses[idx]))


def slide(lrs: np.ndarray, losses: np.ndarray, num_it: int, lr_diff: int = 15, thresh: float = 0.005,
          adjust_value: float = 1.0):
    """The lr where the loss gradient stops changing over an interval, sliding from the right."""
    loss_grad = np.gradient(losses)
    r_idx = -1
    l_idx = r_idx - lr_diff
    local_min_lr = lrs[l_idx] if len(lrs) > lr_diff else lrs[0]
    while l_idx >= -len(losses) and abs(loss_grad[r_idx] - loss_grad[l_idx]) > thresh:
        local_min_lr = lrs[l_idx]
        r_idx -= 1
        l_idx -= 1
    suggestion = float(local_min_lr) * adjust_value
    loss = float(np.interp(np.log10(suggestion), np.log10(lrs), losses))
    return suggestion, (suggestion, loss)


def minimum(lrs: np.ndarray, losses: np.ndarray, num_it: int):
    """A tenth of the lr at the minimum loss."""
    lr_min = float(lrs[losses.argmin()])
    return lr_min / 10, (lr_min, float(losses[losses.argmin()]))


def steep(lrs: np.ndarray, losses: np.ndarray, num_it: int):
    """The lr where the loss falls fastest (against log lr)."""
    grads = (losses[1:] - losses[:-1]) / (np.log(lrs[1:]) - np.log(lrs[:-1]))
    idx = int(grads.argmin())
    return float(lrs[idx]), (float(lrs[idx]), float(losses[idx]))


def lr_find(
    engine,
    start_lr: float = 1e-7,
    end_lr: float = 10.0,
    num_it: int = 100,
    stop_div: bool = True,
    suggest: Sequence[Callable] = (valley, slide, minimum, steep),
    plot: str | Path | None = "auto",
):
    """Run the range test on `engine`; returns a named tuple of suggestions (one field per function).

    Also sets `engine.lr_find_result = (lrs, smoothed losses)` of every iteration run.
    """
    if not 0 < start_lr < end_lr:
        raise ValueError(f"lr_find needs 0 < start_lr < end_lr, got {start_lr} and {end_lr}")
    engine.resume()  # the test starts from the weights a fit would continue from
    lr_at = lambda i: start_lr * (end_lr / start_lr) ** (i / num_it)  # noqa: E731  (fastai's exponential)
    lrs, losses = [], []
    smooth, count, best = 0.0, 0, math.inf
    with engine.trial():  # weights, optimizer, RNGs and the loop's state are put back afterwards
        for i, loss in enumerate(engine.train_steps(num_it, lr_at)):
            lrs.append(lr_at(i))  # the lr of the groups with multiplier 1: what `lr=` sets
            count += 1
            smooth = smooth * 0.98 + loss * 0.02 if math.isfinite(loss) else math.nan
            smoothed = smooth / (1 - 0.98**count)
            losses.append(smoothed)
            best = min(best, smoothed) if math.isfinite(smoothed) else best
            if stop_div and (not math.isfinite(smoothed) or smoothed > 4 * best):
                break
    engine.lr_find_result = (lrs, losses)
    cut_lrs, cut_losses = np.array(lrs[num_it // 10 : -5]), np.array(losses[num_it // 10 : -5])  # as fastai
    finite = np.isfinite(cut_losses)
    if finite.sum() < 3:  # stopped too early for fastai's cut: use every finite point
        cut_lrs, cut_losses = np.array(lrs), np.array(losses)
        finite = np.isfinite(cut_losses)
    cut_lrs, cut_losses = cut_lrs[finite], cut_losses[finite]
    SuggestedLRs = namedtuple("SuggestedLRs", [f.__name__ for f in suggest])
    results = [f(cut_lrs, cut_losses, num_it) for f in suggest]
    suggestions = SuggestedLRs(*[r[0] for r in results])
    if plot and engine.accelerator.is_main_process:
        path = Path(engine.config.output_dir) / "lr_find.png" if plot == "auto" else Path(plot)
        _plot(lrs, losses, suggestions, [r[1] for r in results], path)
    return suggestions


def _plot(lrs, losses, suggestions, points, path: Path) -> None:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        print('lr_find: no plot: pip install matplotlib (in a checkout of acctrain: pip install -e ".[plot]")')
        return
    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    ax.plot(lrs, losses)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("loss (smoothed)")
    for (name, value), (lr, loss), color in zip(suggestions._asdict().items(), points, ("C1", "C2", "C3", "C4", "C5")):
        ax.plot([lr], [loss], "o", color=color, label=f"{name}: {value:.2e}")
    ax.legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
