"""What a crash or a Ctrl-C keeps by default: a checkpoint by the clock, and SIGINT saves like SIGTERM."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from acctrain import Callback, Engine, TrainConfig
from acctrain.errors import PREEMPTED_EXIT_CODE
from tests.support.processes import ROOT
from tests.support.runs import ckpts
from tests.support.tiny import VarLenTokens, collate, make_model, token_loss


class ClockJump(Callback):
    """Moves the monotonic clock `minutes` forward after optimizer step 2, as if step 2 had taken that long."""

    def __init__(self, minutes: float, offset: list[float]):
        self.minutes, self.offset = minutes, offset

    def after_step(self, engine):
        if engine.state.step == 2:
            self.offset[0] += 60 * self.minutes


def test_the_default_config_saves_once_30_minutes_have_passed(tmp_path, monkeypatch):
    """The default config (save_every_minutes and save_every left as they are) writes no checkpoint before the
    end unless 30 minutes pass: then it saves at the next step boundary (step 3), and its clock starts again.
    `time.monotonic` runs on, plus the test's jump; 29.5 minutes is 30 s short of the default."""
    offset, real = [0.0], time.monotonic
    monkeypatch.setattr(time, "monotonic", lambda: real() + offset[0])
    saved = {}
    for name, minutes, config in (("short", 29.5, {}), ("due", 30.0, {}), ("off", 1e6, {"save_every_minutes": 0})):
        offset[0] = 0.0
        cfg = TrainConfig(output_dir=str(tmp_path / name), global_batch_size=8, micro_batch_size=4, max_steps=4,
                          keep_last=0, cpu=True, **config)
        e = Engine(make_model(), cfg, VarLenTokens(32), loss_fn=token_loss, collate_fn=collate,
                   callbacks=[ClockJump(minutes, offset)])
        e.fit()
        e.close()
        saved[name] = ckpts(tmp_path / name)
    assert saved == {"short": ["step-00000004"], "due": ["step-00000003", "step-00000004"], "off": ["step-00000004"]}


def test_the_save_clock_saves_at_the_next_step_boundary(tmp_path):
    for name, minutes in (("clock", 1e-9), ("off", 0)):  # 1e-9 minutes: due at every step
        cfg = TrainConfig(output_dir=str(tmp_path / name), global_batch_size=8, micro_batch_size=4, max_steps=4,
                          keep_last=0, save_every_minutes=minutes, cpu=True)
        e = Engine(make_model(), cfg, VarLenTokens(32), loss_fn=token_loss, collate_fn=collate)
        e.fit()
        e.close()
    assert ckpts(tmp_path / "clock") == [f"step-{k:08d}" for k in (1, 2, 3, 4)]
    assert ckpts(tmp_path / "off") == ["step-00000004"]


RUN = """
import os, signal, sys
from acctrain import Callback, Engine, TrainConfig
from tests.support.tiny import VarLenTokens, collate, make_model, token_loss

class CtrlC(Callback):
    def after_step(self, engine):
        if engine.state.step == 2 and {interrupts}:
            for _ in range({interrupts}):
                os.kill(os.getpid(), signal.SIGINT)

cfg = TrainConfig(output_dir=sys.argv[1], global_batch_size=8, micro_batch_size=4, max_steps=4, seed=3, cpu=True)
e = Engine(make_model(), cfg, VarLenTokens(32), loss_fn=token_loss, collate_fn=collate, callbacks=[CtrlC()])
try:
    e.fit()
finally:
    e.close()
"""


def run(out: Path, interrupts: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", RUN.format(interrupts=interrupts), str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.processes
def test_ctrl_c_saves_and_exits_like_sigterm_and_the_run_resumes_exactly(tmp_path):
    stopped = run(tmp_path / "stopped", interrupts=1)
    assert stopped.returncode == PREEMPTED_EXIT_CODE, stopped.stderr
    assert "stopped by SIGINT after optimizer step 3" in stopped.stdout
    assert ckpts(tmp_path / "stopped") == ["step-00000003"]  # the signal rides on step 3's all-reduce
    assert run(tmp_path / "stopped", interrupts=0).returncode == 0  # resumes at step 3
    assert run(tmp_path / "whole", interrupts=0).returncode == 0
    final = [load_file(tmp_path / d / "checkpoints" / "step-00000004" / "model.safetensors") for d in ("stopped", "whole")]
    assert final[0].keys() == final[1].keys() and all(torch.equal(final[0][k], final[1][k]) for k in final[0])


@pytest.mark.processes
def test_a_second_ctrl_c_interrupts_at_once(tmp_path):
    aborted = run(tmp_path, interrupts=2)
    assert aborted.returncode not in (0, PREEMPTED_EXIT_CODE) and "KeyboardInterrupt" in aborted.stderr
    assert not (tmp_path / "checkpoints").exists() or ckpts(tmp_path) == []
