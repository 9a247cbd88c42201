"""The `plot` extra: everything that draws without matplotlib says to install the extra, and the extra brings
matplotlib. Moved from test_inputs.py, whose tests start processes; this one runs in-process.

matplotlib is hidden for real, as when it is not installed: `None` in sys.modules makes its import fail.
"""

from __future__ import annotations

import re
import sys
import tomllib

import pytest

from acctrain import Engine, TrainConfig
from acctrain.cli import main as cli_main
from acctrain.schedules import build_schedule, plot_schedule
from tests.support.processes import ROOT
from tests.support.tiny import VarLenTokens, collate, make_model, token_loss

EXTRA = re.compile(r'pip install -e "\.\[(\w+)\]"')


def extra_named(message: str) -> str:
    """The one extra a message tells a checkout to install (`pip install -e ".[NAME]"`)."""
    names = EXTRA.findall(message)
    assert len(names) == 1, message
    return names[0]


def installs(extra: str) -> set[str]:
    """The distributions that `pip install -e ".[extra]"` adds, from pyproject.toml."""
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert extra in extras, f"no extra {extra!r} in pyproject.toml: {sorted(extras)}"
    return {re.match(r"[A-Za-z0-9._-]+", dep).group(0).lower() for dep in extras[extra]}


def test_drawing_without_matplotlib_names_the_extra_that_installs_it(tmp_path, monkeypatch, capsys):
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.pyplot"):
        monkeypatch.setitem(sys.modules, name, None)

    # plot_schedule raises, naming the fix; the import that failed says which package is missing
    with pytest.raises(ImportError) as err:
        plot_schedule(build_schedule("constant", 5), 5, tmp_path / "schedule.png")
    missing = err.value.__cause__.name.split(".")[0]
    assert missing == "matplotlib" and not (tmp_path / "schedule.png").exists()
    messages = {"plot_schedule": str(err.value)}

    # `acctrain plot-schedule` exits 1 before it writes
    assert cli_main(["plot-schedule", "max_steps=20", f"out={tmp_path / 'cli.png'}"]) == 1
    messages["acctrain plot-schedule"] = capsys.readouterr().err
    assert not (tmp_path / "cli.png").exists()

    # lr_find still suggests, and says why it drew nothing
    cfg = TrainConfig(output_dir=str(tmp_path / "run"), global_batch_size=8, micro_batch_size=8, max_steps=4, cpu=True)
    engine = Engine(make_model(), cfg, VarLenTokens(32), loss_fn=token_loss, collate_fn=collate)
    suggestions = engine.lr_find(num_it=8, stop_div=False, plot=tmp_path / "lr.png")
    engine.close()
    assert len(engine.lr_find_result[0]) == 8 and all(s > 0 for s in suggestions)
    assert not (tmp_path / "lr.png").exists()
    messages["lr_find"] = capsys.readouterr().out

    for where, message in messages.items():
        assert f"pip install {missing}" in message, (where, message)
        assert missing in installs(extra_named(message)), (where, message)
