"""One run per output_dir: an exclusive lock on `{output_dir}/.lock`, held by the live main process.

    with owned(accelerator, output_dir):   # every rank raises RunLocked naming the holder (pid, host, since)
        ... train ...

The lock is an flock on the open file, so the kernel drops it when the process ends in any way (a crash,
kill -9, a preemption): a dead run never leaves its directory locked, and there is no stale-lock rule to get
wrong. On NFS, Linux maps flock to NFS byte-range locks, which hold across hosts.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from pathlib import Path

from accelerate import Accelerator

from acctrain import agreement
from acctrain.errors import ConfigError


class RunLocked(ConfigError):
    """Another live run holds this output_dir."""

    def __init__(self, message: str):
        super().__init__("output_dir", message)


class RunLock:
    def __init__(self, output_dir: str | Path):
        self.path = Path(output_dir) / ".lock"
        self._file = None

    def __enter__(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        file = open(self.path, "a+")
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            file.seek(0)
            holder = file.read().strip() or "{}"
            file.close()
            raise RunLocked(f"{self.path.parent} is in use by another run ({_describe(holder)}); wait for it to "
                            "finish or stop it, or give this run another output_dir.") from None
        file.seek(0)
        file.truncate()
        file.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}))
        file.flush()
        self._file = file
        return self

    def __exit__(self, *exc) -> None:
        if self._file is not None:
            # Unlocked explicitly, not only closed: DataLoader workers forked during the fit share the open file
            # (an flock belongs to it, not to a process), and may outlive the fit until they are collected.
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()  # the file stays (removing it would race a new holder)
            self._file = None


@contextlib.contextmanager
def owned(accelerator: Accelerator, output_dir: str | Path):
    """Hold `output_dir` for this run: the main process takes the lock, and every rank learns of a refusal."""
    lock = RunLock(output_dir) if accelerator.is_main_process else contextlib.nullcontext()

    def take() -> None:
        try:
            lock.__enter__()
        except RunLocked as err:
            raise RunLocked(str(err).removeprefix("output_dir: ")) from None
        except OSError as err:  # e.g. no flock on this filesystem, or a .lock that is not ours: every rank hears it
            raise RunLocked(f"cannot lock {Path(output_dir) / '.lock'} ({err}); make output_dir a writable directory "
                            "on a filesystem with file locks") from None

    agreement.main_answers(accelerator, take, "the main rank's lock of output_dir")
    try:
        yield
    finally:
        lock.__exit__(None, None, None)


def _describe(holder: str) -> str:
    try:
        info = json.loads(holder)
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["since"]))
        return f"pid {info['pid']} on {info['host']}, since {since}"
    except (ValueError, KeyError, TypeError):
        return "holder unknown"
