"""One run per output_dir (acctrain.checkpoint.run_lock): a second run is refused naming the holder; a dead run's lock is gone."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.processes import ROOT

RUN = """
import sys, time
from pathlib import Path
from acctrain import Callback, Engine, TrainConfig
from acctrain.errors import ConfigError
from tests.support.tiny import VarLenTokens, collate, make_model, token_loss

out, gate = Path(sys.argv[1]), Path(sys.argv[2])

class Hold(Callback):
    def before_fit(self, engine):  # the run owns output_dir now: say so, then wait for the test
        (gate / "started").touch()
        while not (gate / "go").exists():
            time.sleep(0.05)

cfg = TrainConfig(output_dir=str(out), global_batch_size=8, micro_batch_size=4, max_steps=2, cpu=True)
e = Engine(make_model(), cfg, VarLenTokens(16), loss_fn=token_loss, collate_fn=collate, callbacks=[Hold()])
try:
    e.fit()
except ConfigError as err:
    print(f"refused: {err}", file=sys.stderr)
    sys.exit(2)
finally:
    e.close()
"""


def start(out: Path, gate: Path) -> subprocess.Popen:
    gate.mkdir(exist_ok=True)
    return subprocess.Popen([sys.executable, "-c", RUN, str(out), str(gate)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.05)


def files(out: Path) -> dict[str, int]:
    return {str(p): p.stat().st_size for p in out.rglob("*")}


@pytest.mark.processes
def test_a_second_run_on_the_same_output_dir_is_refused_naming_the_holder(tmp_path):
    out = tmp_path / "out"
    first = start(out, tmp_path / "a")
    wait_for(tmp_path / "a" / "started", first)
    before = files(out)
    (tmp_path / "b" / "go").parent.mkdir()
    (tmp_path / "b" / "go").touch()  # the second run would not wait
    second = start(out, tmp_path / "b")
    _, err = second.communicate(timeout=120)
    assert second.returncode == 2, err
    assert "output_dir" in err and "in use by another run" in err and f"pid {first.pid}" in err
    assert files(out) == before  # the second run wrote nothing
    (tmp_path / "a" / "go").touch()
    assert first.wait(timeout=120) == 0
    third = start(out, tmp_path / "b")  # the first run is over: its lock with it
    assert third.wait(timeout=120) == 0, third.communicate()


@pytest.mark.processes
def test_a_killed_run_leaves_no_lock(tmp_path):
    out = tmp_path / "out"
    first = start(out, tmp_path / "a")
    wait_for(tmp_path / "a" / "started", first)
    os.kill(first.pid, signal.SIGKILL)
    first.wait(timeout=60)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "go").touch()
    second = start(out, tmp_path / "b")
    assert second.wait(timeout=120) == 0, second.communicate()


def test_an_output_dir_that_cannot_be_locked_is_a_message(tmp_path):
    from acctrain.errors import ConfigError
    from acctrain.checkpoint.run_lock import RunLock, owned  # noqa: F401
    from tests.support.tiny import VarLenTokens, collate, make_model, token_loss
    from acctrain import Engine, TrainConfig

    (tmp_path / ".lock").mkdir()  # not a file: open() fails (a directory, or a filesystem without locks)
    cfg = TrainConfig(output_dir=str(tmp_path), global_batch_size=8, micro_batch_size=4, max_steps=1, cpu=True)
    e = Engine(make_model(), cfg, VarLenTokens(16), loss_fn=token_loss, collate_fn=collate)
    try:
        e.fit()
        raise AssertionError("fit() ran without its lock")
    except ConfigError as err:
        assert err.field == "output_dir" and "cannot lock" in str(err) and str(tmp_path / ".lock") in str(err)
    finally:
        e.close()
    assert not (tmp_path / "checkpoints").exists()
