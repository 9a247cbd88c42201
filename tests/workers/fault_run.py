"""A 2-process run in which one rank misbehaves at a chosen optimizer step, for the watchdog's tests.

    torchrun --nproc_per_node 2 -m tests.workers.fault_run '{"out_dir": ..., "fault": "sleep", "rank": 1, "at": 3}'

Faults (on `rank`, when optimizer step `at` starts):
- "sigstop": the process stops itself (SIGSTOP), as a debugger or a swapped-out node would;
- "sleep": a callback sleeps for an hour (a deadlocked callback);
- "loader": the data loader's worker blocks for an hour in the dataset's __getitem__ (num_workers=1);
- "raise": a callback raises RuntimeError;
- "none": nothing (a run that the test starts with a missing rank);
- "slow_save": rank 0 takes hang_timeout + 4 s to write each checkpoint (a large save on a slow disk), which
  must not trip the watchdog: the run ends normally.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

import torch

from acctrain import Callback, Engine, TrainConfig
from acctrain.cli import free_before_exit
from tests.support.tiny import RUN_ON_CPU, VarLenTokens, collate, make_model, token_loss


class Fault(Callback):
    def __init__(self, fault: str, rank: int, at: int):
        self.fault, self.rank, self.at = fault, rank, at

    def before_step(self, engine):
        if engine.state.step + 1 != self.at or engine.accelerator.process_index != self.rank:
            return
        print(f"fault: rank {self.rank} {self.fault} at step {self.at} (t={time.time():.3f})", file=sys.stderr, flush=True)
        if self.fault == "sigstop":
            os.kill(os.getpid(), signal.SIGSTOP)
        elif self.fault == "sleep":
            time.sleep(3600)  # the line a hang report must name
        elif self.fault == "raise":
            raise RuntimeError("a callback failed on purpose")


class BlockingTokens(VarLenTokens):
    """VarLenTokens whose reads on rank `rank` block for an hour from the `after`-th read on."""

    def __init__(self, n: int, rank: int, after: int):
        super().__init__(n)
        self.rank, self.after, self.reads = rank, after, 0

    def __getitem__(self, index):
        self.reads += torch.is_grad_enabled()  # training's reads (fit's check of the first micro-batch: no grad)
        if int(os.environ.get("RANK", "0")) == self.rank and self.reads > self.after:
            print(f"fault: rank {self.rank} loader at step {self.reads // 4 + 1} (t={time.time():.3f})",
                  file=sys.stderr, flush=True)
            time.sleep(3600)  # the data loader's worker is stuck: its rank waits for a batch that never comes
        return super().__getitem__(index)


def slow_saves(seconds: float) -> None:
    """Make this process's checkpoint writes take `seconds` longer (the library's own write, called late)."""
    from acctrain import checkpoint

    write = checkpoint.write_files

    def slow_write(files):
        time.sleep(seconds)
        return write(files)
    checkpoint.write_files = slow_write


def run(out_dir: str, fault: str, rank: int = 1, at: int = 3, hang_timeout: float = 5.0, steps: int = 8):
    loader = fault == "loader"
    if fault == "slow_save" and int(os.environ.get("RANK", "0")) == 0:
        slow_saves(hang_timeout + 4)
    train = BlockingTokens(64, rank, after=4 * (at - 1)) if loader else VarLenTokens(64)
    cfg = TrainConfig(output_dir=out_dir, global_batch_size=8, micro_batch_size=2, max_steps=steps, lr=1e-2,
                      hang_timeout=hang_timeout, num_workers=1 if loader else 0, cpu=RUN_ON_CPU, log_every=1,
                      save_every=4 if fault == "slow_save" else 0)
    engine = Engine(make_model(0), cfg, train, None, loss_fn=token_loss, collate_fn=collate,
                    callbacks=[] if loader else [Fault(fault, rank, at)])
    engine.fit()
    engine.close()


if __name__ == "__main__":
    run(**json.loads(sys.argv[1]))
    free_before_exit()
