"""Checkpoint saves slowed down from the tests (the library has no hook for it): to kill a process part-way
through a save, or to keep a background save busy while the loop goes on.

    slow_saves(0.3, monkeypatch)   # in a test: undone after it
    slow_saves_from_env()          # in a worker process: when ACCTRAIN_TEST_SLOW_SAVE=seconds is set

Each wraps the library's own functions where a save writes, so that every one of them takes `seconds` longer:
each file a rank writes (`checkpoint._write_file`), each JSON file (`checkpoint.write_json`), the fsync of the
staged directory just before the commit's rename (`checkpoint._fsync_dir`) and an async save's copy of the
weights (`async_save._copy`).
"""

from __future__ import annotations

import functools
import os
import time

import pytest

ENV = "ACCTRAIN_TEST_SLOW_SAVE"
"""The tests' own variable: seconds each slowed write takes longer in a worker process."""


def slow_saves(seconds: float, monkeypatch: pytest.MonkeyPatch | None = None) -> None:
    from acctrain import checkpoint
    from acctrain.checkpoint import async_save

    for module, name in ((checkpoint, "_write_file"), (checkpoint, "write_json"), (checkpoint, "_fsync_dir"),
                         (async_save, "_copy")):
        slowed = _before(getattr(module, name), seconds)
        if monkeypatch is not None:
            monkeypatch.setattr(module, name, slowed)
        else:
            setattr(module, name, slowed)


def slow_saves_from_env() -> None:
    seconds = float(os.environ.get(ENV, "0") or 0)
    if seconds:
        slow_saves(seconds)


def _before(fn, seconds: float):
    @functools.wraps(fn)
    def slowed(*args, **kwargs):
        time.sleep(seconds)
        return fn(*args, **kwargs)
    return slowed
