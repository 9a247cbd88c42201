"""fastai's training recipes on the Engine: fit_one_cycle, fit_flat_cos, fit_sgdr, fine_tune.

    engine.fit_one_cycle(3, lr_max=1e-3)
    engine.fine_tune(5, base_lr=2e-3, body="backbone")

Each recipe sets the schedule by name (acctrain.schedules, fastai semantics, counted in optimizer
steps) and calls `fit()`, so checkpoints, logging and resume work as for any run. A multi-phase recipe
gives each phase its own directory (`{output_dir}/phase1`, `/phase2`): after a crash, `resume=auto`
finds the phase that was running and continues it; a finished phase is not run again.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from acctrain import checkpoint


def fit_one_cycle(engine, epochs: int, lr_max: float | None = None, div: float = 25.0, div_final: float = 1e5,
                  pct_start: float = 0.25, moms: Sequence[float] = (0.95, 0.85, 0.95), **changes):
    """fastai's fit_one_cycle: lr from lr_max/div up to lr_max (cosine, over pct_start), then down to
    lr_max/div_final; momentum moms[0] -> moms[1] -> moms[2]."""
    args = {"pct_start": pct_start, "div": div, "div_final": div_final, "moms": list(moms)}
    return _fit(engine, epochs, lr_max, "one_cycle", args, **changes)


def fit_flat_cos(engine, epochs: int, lr: float | None = None, div_final: float = 1e5, pct_start: float = 0.75,
                 **changes):
    """fastai's fit_flat_cos: lr flat until pct_start, then a cosine down to lr/div_final."""
    return _fit(engine, epochs, lr, "flat_cos", {"pct_start": pct_start, "div_final": div_final}, **changes)


def fit_sgdr(engine, n_cycles: int, cycle_len: int, lr_max: float | None = None, cycle_mult: int = 2, **changes):
    """fastai's fit_sgdr: n_cycles cosine restarts, cycle i lasting cycle_len * cycle_mult**i epochs."""
    epochs = sum(cycle_len * cycle_mult**i for i in range(n_cycles))
    return _fit(engine, epochs, lr_max, "sgdr", {"cycle_len": cycle_len, "cycle_mult": cycle_mult}, **changes)


def fine_tune(engine, epochs: int, base_lr: float = 2e-3, freeze_epochs: int = 1, lr_mult: float = 100,
              pct_start: float = 0.3, div: float = 5.0, body: str | Sequence[str] | None = None, **changes):
    """fastai's fine_tune: train the head `freeze_epochs` with the body frozen (one cycle at base_lr,
    pct_start 0.99), then everything for `epochs` (one cycle at base_lr/2 for the head and
    base_lr/2/lr_mult for the body, pct_start and div as given).

    `body` names the pretrained part (module prefixes or globs); default: every top-level module but
    the last. The body's parameters must form their own param groups (true for the Engine's default
    AdamW when the config's `param_groups` has a pattern for the body, e.g. {"backbone": 1}).
    """
    root = Path(changes.pop("output_dir", engine.config.output_dir))
    body_names = set(engine.freeze(body))
    engine.unfreeze()
    body_groups = _groups_of(engine, body_names)
    if not checkpoint.has_checkpoints(root / "phase2"):  # phase 1 is done once phase 2 has checkpoints
        engine.freeze(body)
        fit_one_cycle(engine, freeze_epochs, base_lr, pct_start=0.99, output_dir=str(root / "phase1"), **changes)
        engine.unfreeze()
    for i, group in enumerate(engine.torch_optimizer.param_groups):
        group["lr_mult"] = 1 / lr_mult if i in body_groups else 1.0
    return fit_one_cycle(engine, epochs, base_lr / 2, div=div, pct_start=pct_start, output_dir=str(root / "phase2"),
                         **changes)


def _fit(engine, epochs: int, lr: float | None, scheduler: str, args: dict, **changes):
    engine.replan(epochs=epochs, max_steps=0, lr=lr or engine.config.lr, scheduler=scheduler, schedule_args=args,
                  warmup_steps=0, warmup_ratio=0.0, **changes)
    return engine.fit()


def _groups_of(engine, names: set[str]) -> set[int]:
    """Indices of the param groups that hold exactly the named parameters (each group all in or all out)."""
    by_id = {id(p): n for n, p in engine.unwrapped_model.named_parameters()}
    inside = set()
    for i, group in enumerate(engine.torch_optimizer.param_groups):
        members = {by_id.get(id(p)) in names for p in group["params"]}
        if members == {True, False}:
            raise ValueError(
                f"fine_tune: param group {group.get('name', i)!r} mixes body and head parameters; give the body "
                "its own group, e.g. param_groups={'<body prefix>': 1.0} in the config"
            )
        if members == {True}:
            inside.add(i)
    return inside
