"""A checkpointing run of TinyTokenModel that can be stopped, killed or fed a NaN at a chosen step.

In-process: `run(out_dir, **options)`. As a module from the repository root (1 or more processes, e.g. under
torchrun with `-m`):
    python -m tests.workers.resume_run '{"out_dir": ..., "steps": 10, "stop_at": 6, ...}'
On completion rank 0 writes `{out_dir}/result.safetensors` (final parameters and optimizer tensors) and
`{out_dir}/result.json` (lr and loss of every step this process ran, world size, state).
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from acctrain.cli import free_before_exit
from acctrain import Callback, Engine, TrainConfig
from acctrain.state import optimizer_to_files
from tests.support.tiny import RUN_ON_CPU, LazyTokens, StreamOf, VarLenTokens, collate, make_model, token_loss

DATASET_LEN, GLOBAL_BATCH = 26, 8  # 4 optimizer steps per epoch, the last one short (2 samples)


class Record(Callback):
    """Per-step lr and loss, plus the test's interventions: a signal to itself, a kill -9."""

    def __init__(self, stop_at=None, signal_name="SIGTERM", signal_rank=0, kill_at=None):
        self.steps, self.lrs, self.losses = [], [], []
        self.stop_at, self.signal_name, self.signal_rank, self.kill_at = stop_at, signal_name, signal_rank, kill_at

    def before_optimizer_step(self, engine):
        self.steps.append(engine.state.step + 1)
        self.lrs.append(engine.optimizer.param_groups[0]["lr"])
        self.losses.append(float(engine.step_loss))

    def before_step(self, engine):  # a signal before the step's all-reduce stops the run after this step
        if engine.state.step + 1 == self.stop_at and engine.accelerator.process_index == self.signal_rank:
            os.kill(os.getpid(), getattr(signal, self.signal_name))

    def after_step(self, engine):
        if engine.state.step == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)


def run(out_dir: str, steps: int = 10, stop_at=None, signal_name="SIGTERM", signal_rank=0, kill_at=None,
        dropout=0.0, save_every=0, nan_at=None, width=16, lazy_len=None, stream=False, **config) -> dict:
    calls = {"n": 0}

    def loss_fn(model, batch):
        loss_sum, count = token_loss(model, batch)
        calls["n"] += 1
        return (loss_sum * float("nan"), count) if nan_at is not None and engine.state.step + 1 == nan_at else (loss_sum, count)

    cfg = TrainConfig(output_dir=out_dir, global_batch_size=GLOBAL_BATCH, micro_batch_size=config.pop("micro", 2),
                      max_steps=steps, save_every=save_every, log_every=1, lr=config.pop("lr", 1e-2),
                      warmup_steps=2, **{"cpu": RUN_ON_CPU, **config})
    record = Record(stop_at, signal_name, signal_rank, kill_at)
    train = VarLenTokens(DATASET_LEN) if lazy_len is None else LazyTokens(lazy_len)  # lazy: a huge dataset
    train = StreamOf(train) if stream else train  # the same samples, read in order pass after pass
    engine = Engine(make_model(0, width=width, dropout=dropout), cfg, train, VarLenTokens(6),
                    loss_fn=loss_fn, callbacks=[record], collate_fn=collate)
    engine.fit()
    result = {
        "world_size_env": int(os.environ.get("WORLD_SIZE", "1")),
        "num_processes": engine.accelerator.num_processes,
        "resumed_from": str(engine.resumed_from) if engine.resumed_from else None,
        "state": vars(engine.state),
        "steps": record.steps, "lrs": record.lrs, "losses": record.losses,
    }
    tensors = {f"param.{n}": full(p).detach().clone() for n, p in engine.unwrapped_model.named_parameters()}
    if not cfg.fsdp:  # FSDP's optimizer state is sharded; its exactness is tested in test_fsdp.py
        opt_tensors, _ = optimizer_to_files(engine.optimizer.state_dict())
        tensors.update({f"opt.{k}": v.clone() for k, v in opt_tensors.items()})
    if engine.accelerator.is_main_process:
        save_file(tensors, os.path.join(out_dir, "result.safetensors"))
        Path(out_dir, "result.json").write_text(json.dumps(result))
    engine.close()
    return dict(result, tensors=tensors)


def full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor, also from an FSDP-sharded DTensor (a collective: every rank must call it)."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


if __name__ == "__main__":
    from tests.support.slow_save import slow_saves_from_env

    slow_saves_from_env()  # ACCTRAIN_TEST_SLOW_SAVE: the tests that kill a save part-way set it
    options = json.loads(sys.argv[1])
    run(**options)
    free_before_exit()  # FSDP2's device mesh, freed at interpreter exit, can abort the process
