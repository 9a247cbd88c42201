"""A run of TinyTokenModel with an EMA of its weights (acctrain.ema) and the weights it went through, to stop,
resume, evaluate and compare; also what `load_best_at_end` leaves in the model.

In-process: `run(out_dir, **options)`. As a module from the repository root (1 or more processes, e.g. under
torchrun with `-m`):
    python -m tests.workers.ema_run '{"out_dir": ..., "steps": 10, "stop_at": 5, "ema": {"decay": 0.9}}'
On completion every rank R writes `{out_dir}/result-rank{R}.safetensors` (final parameters `param.*`, the EMA's
averages `ema.*` and the averages it started fit with `ema_start.*`) and rank 0 `{out_dir}/result.json`.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from acctrain import Callback, Engine, TrainConfig
from acctrain.cli import free_before_exit
from acctrain.ema import EMA
from tests.support.tiny import RUN_ON_CPU, VarLenTokens, collate, make_model, token_loss
from tests.workers.resume_run import DATASET_LEN, GLOBAL_BATCH, Record, full


class Weights(Callback):
    """The EMA's averages at the start of fit; with `every_step`, the trainable weights at the start and after
    every optimizer step, with the number of applied steps (`schedule_step`) then."""

    order = 100  # after the EMA (order 5) has placed the state it resumed

    def __init__(self, every_step: bool = False):
        self.every_step, self.start, self.after, self.ema_start = every_step, None, [], {}

    def before_fit(self, engine):
        ema = ema_of(engine)
        self.ema_start = {n: full(t).clone() for n, t in ema.weights.items()} if ema else {}
        if self.every_step:
            self.start = weights(engine)

    def after_step(self, engine):
        if self.every_step:
            self.after.append((engine.state.schedule_step, weights(engine)))


def weights(engine) -> dict[str, torch.Tensor]:
    return {n: full(p).detach().clone() for n, p in engine.unwrapped_model.named_parameters()}


def ema_of(engine) -> EMA | None:
    return next((cb for cb in engine.callbacks.items if isinstance(cb, EMA)), None)


def run(out_dir: str, steps: int = 10, stop_at=None, ema: dict | None = None, nan_at=None, every_step=False,
        with_eval=True, **config) -> dict:
    def loss_fn(model, batch):
        loss_sum, count = token_loss(model, batch)
        return (loss_sum * float("nan"), count) if nan_at is not None and engine.state.step + 1 == nan_at else (loss_sum, count)

    cfg = TrainConfig(output_dir=out_dir, global_batch_size=GLOBAL_BATCH, micro_batch_size=config.pop("micro", 2),
                      max_steps=steps, log_every=1, lr=1e-2, warmup_steps=2, **{"cpu": RUN_ON_CPU, **config})
    record, seen = Record(stop_at), Weights(every_step)
    callbacks = [record, seen] + ([EMA(**ema)] if ema is not None else [])
    engine = Engine(make_model(0), cfg, VarLenTokens(DATASET_LEN), VarLenTokens(6) if with_eval else None,
                    loss_fn=loss_fn, callbacks=callbacks, collate_fn=collate)
    metrics = engine.fit()
    average = ema_of(engine)
    result = {
        "world_size_env": int(os.environ.get("WORLD_SIZE", "1")),
        "num_processes": engine.accelerator.num_processes,
        "state": vars(engine.state), "steps": record.steps, "metrics": metrics,
        "updates": average.updates if average else None,
        "best_checkpoint": str(engine.best_checkpoint) if engine.best_checkpoint else None,
    }
    tensors = {f"param.{n}": t for n, t in weights(engine).items()}
    if average is not None:
        tensors.update({f"ema.{n}": full(t).clone() for n, t in average.weights.items()})
        tensors.update({f"ema_start.{n}": t for n, t in seen.ema_start.items()})
    rank = engine.accelerator.process_index
    save_file(tensors, os.path.join(out_dir, f"result-rank{rank}.safetensors"))
    if rank == 0:
        Path(out_dir, "result.json").write_text(json.dumps(result))
    engine.close()
    return dict(result, tensors=tensors, engine=engine, seen=seen, ema=average)


if __name__ == "__main__":
    run(**json.loads(sys.argv[1]))
    free_before_exit()  # FSDP2's device mesh, freed at interpreter exit, can abort the process
