"""What a run logs and prints: lr charts per param-group pattern, hparams once, and a progress bar that other
lines do not break (acctrain.tracking, acctrain.optim.LrReadout)."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest

from acctrain import Engine, TrainConfig
from tests.support.events import logged, scalar_tags
from tests.support.processes import ROOT
from tests.support.tiny import VarLenTokens, collate, make_model, token_loss


def fit(out: Path, **kw) -> Engine:
    cfg = TrainConfig(**{"output_dir": str(out), "global_batch_size": 8, "micro_batch_size": 4, "max_steps": 4,
                         "lr": 1e-2, "scheduler": "one_cycle", "log_every": 2, "cpu": True, **kw})
    e = Engine(make_model(), cfg, VarLenTokens(32), VarLenTokens(8, seed=5), loss_fn=token_loss, collate_fn=collate)
    e.fit()
    e.close()
    return e


def schedule_tags(out: Path) -> set[str]:
    return {t for t in scalar_tags(out) if t.startswith(("train/lr", "train/momentum"))}


def test_one_lr_chart_per_param_group_pattern(tmp_path):
    """The default AdamW has a decayed and a no-decay group: one lr and one momentum chart, not five."""
    fit(tmp_path / "one")
    assert schedule_tags(tmp_path / "one") == {"train/lr", "train/momentum"}
    fit(tmp_path / "two", param_groups={"embed": 0.1})
    assert schedule_tags(tmp_path / "two") == {"train/lr", "train/momentum", "train/lr/embed", "train/lr/default",
                                               "train/momentum/embed", "train/momentum/default"}
    lr, embed = logged(tmp_path / "two", "train/lr"), logged(tmp_path / "two", "train/lr/embed")
    assert lr == logged(tmp_path / "two", "train/lr/default")  # train/lr is the config's lr: multiplier 1
    assert all(embed[step] == pytest.approx(0.1 * lr[step], rel=1e-6) for step in lr)  # float32 in TensorBoard


def test_a_resumed_launch_logs_no_new_hparams_run(tmp_path):
    """TensorBoard's hparams go in a sub-run of their own: one per run, not one per launch."""
    def runs():  # Accelerate writes hparams in one timestamped directory, and hparams.yml in another
        return sorted(p.name for p in (tmp_path / "logs" / "acctrain").iterdir() if p.is_dir())

    fit(tmp_path, max_steps=2)
    first = runs()
    fit(tmp_path, max_steps=4)  # resumes at step 2
    assert first and runs() == first
    assert logged(tmp_path, "train/loss").keys() == {1, 2, 3, 4}


def test_event_files_carry_tensorboards_own_checksums(tmp_path):
    """acctrain gives TensorBoard's writer a C CRC-32C (google-crc32c); every record of the event files it
    wrote must still carry the checksums TensorBoard's own pure-Python code computes, which its reader checks."""
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c
    from tensorboard.summary.writer import record_writer

    from acctrain import tracking

    fit(tmp_path)
    assert record_writer.masked_crc32c is tracking.masked_crc32c  # the C one is in use: the test checks it
    files = list((tmp_path / "logs" / "acctrain").rglob("events.out.tfevents.*"))
    records = 0
    for file in files:
        data, pos = file.read_bytes(), 0
        while pos < len(data):
            header = data[pos:pos + 8]
            (length,) = struct.unpack("<Q", header)
            (header_crc,) = struct.unpack("<I", data[pos + 8:pos + 12])
            body = data[pos + 12:pos + 12 + length]
            (body_crc,) = struct.unpack("<I", data[pos + 12 + length:pos + 16 + length])
            assert (header_crc, body_crc) == (masked_crc32c(header), masked_crc32c(body)), (file, pos)
            pos, records = pos + 16 + length, records + 1
    assert records >= 4 + 2  # one event per step, the config text, the file version
    assert logged(tmp_path, "train/loss").keys() == {1, 2, 3, 4}  # and TensorBoard's reader reads them


PROGRESS = """
import torch
from acctrain import Engine, TrainConfig
from tests.support.tiny import VarLenTokens, collate, make_model, token_loss
cfg = TrainConfig(output_dir={out!r}, global_batch_size=8, micro_batch_size=4, max_steps=6, log_every=3,
                  eval_every=3, cpu=True)
e = Engine(make_model(), cfg, VarLenTokens(48), VarLenTokens(8, seed=5), loss_fn=token_loss, collate_fn=collate)
result = e.fit()
e.close()
print(f"RESULT {{result['train/loss']:.4f}}")
"""


def on_a_terminal(code: str) -> str:
    """Run `code` with stdout and stderr on a pseudo-terminal (so tqdm draws its bar); everything it wrote."""
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))  # a new pty is 0 columns wide
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=follower, stderr=follower)
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the terminal closed: the process exited
            break
        if not chunk:
            break
        chunks.append(chunk)
    assert proc.wait(timeout=120) == 0, b"".join(chunks).decode(errors="replace")
    return b"".join(chunks).decode(errors="replace")


@pytest.mark.processes
def test_the_progress_bar_shows_the_flushed_mean_and_lines_print_above_it(tmp_path):
    text = on_a_terminal(PROGRESS.format(out=str(tmp_path)))
    lines = re.split(r"[\r\n]+", text)
    evals = [line for line in lines if "eval at step" in line]
    assert len(evals) == 2 and all(line.lstrip("\x1b[A2K ").startswith("eval at step") and "it/s" not in line
                                   and "step/s" not in line and "%|" not in line for line in evals), evals
    result = re.search(r"RESULT (\S+)", text).group(1)
    bars = [line for line in lines if "loss=" in line]
    final = re.search(r"loss=(\S+?),", bars[-1]).group(1)
    assert final == result  # the bar's last readout is the final flush's mean, which fit() returns
    losses = logged(tmp_path, "train/loss")
    assert float(result) == pytest.approx(sum(losses[s] for s in (4, 5, 6)) / 3, abs=1e-4)
