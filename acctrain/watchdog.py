"""No silent hangs: each rank says where it is, a rank that waits too long for the others names who did not come.

    watch = Watchdog.start(rank, world_size, output_dir, hang_timeout)   # during fit, with several processes
    watch.at("data", step)                                                # the main thread, as the step goes
    with watch.waiting("the step's all-reduce"): ...                      # around whatever waits for other ranks
    watch.failed(error)                                                   # this rank raised: end the others now
    watch.stop()

The side channel is files under `{output_dir}/.ranks/` (multi-node runs already need `output_dir` shared for
their checkpoints): a rank's status (`rank{r}.json`, rewritten by a background thread every `tick` seconds:
its step, phase, how long it has been there, whether it waits for the others, host and pid), and markers. Files,
not the process group's store, because a store lives in one process (rank 0's, or the launcher's) and a
stopped or dead rank 0 takes it along; a file can be read whoever is stopped, and stays for a person to read.

A hang is a rank that has waited in a collective for `hang_timeout` seconds while another rank has not
arrived there (is not waiting in the same collective). Only waiting is timed, never a phase: a long
evaluation, a first compiled step or a long save on every rank makes nobody wait. The rank that sees it writes
the marker `hang`; every rank's thread, polling, answers with its main thread's Python stack
(`rank{r}.stack`) and exits with HANG_EXIT_CODE; the main process (or, when it is the one that does not answer,
the rank that saw the hang) writes `{output_dir}/hang-report.txt` and prints it: which ranks did not arrive,
each rank's step and phase and for how long, its host and pid, and its stack, or "not responding" (stopped or
gone; such a rank on this host is killed, SIGKILL, so that no process is left behind). Each answering rank
also writes PyTorch's flight recorder (its last collectives) to `{output_dir}/flight-recorder-rank{r}.json`.

A rank that raises writes `failed-rank{r}` with its error; the others, polling, exit at once with
PEER_FAILED_EXIT_CODE, naming it: no rank is left waiting for a peer that raised, whatever the launcher.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Callable

from acctrain.errors import HANG_EXIT_CODE, PEER_FAILED_EXIT_CODE

NOT_WAITING = None
_active: Watchdog | None = None  # this process's watch while a fit with several processes runs


class _Idle:
    """The watch of a process that has none (one process, or outside fit): every call does nothing."""

    __slots__ = ()
    ending = False

    def at(self, phase: str, step: int | None = None) -> None:
        pass

    def waiting(self, what: str) -> contextlib.nullcontext:
        return _NO_WAIT

    def after_main(self, is_main: bool) -> None:
        pass

    def failed(self, error: BaseException) -> None:
        pass


_NO_WAIT = contextlib.nullcontext()
IDLE = _Idle()


def current() -> Watchdog | _Idle:
    """This process's watch, or IDLE: what a hot loop holds for its calls (one lookup a step, not one a call)."""
    return _active if _active is not None else IDLE


def at(phase: str, step: int | None = None) -> None:
    """The main thread is now in `phase` of optimizer step `step` (None: the same step)."""
    current().at(phase, step)


def waiting(what: str):
    """Around code that waits for the other ranks (a collective, a barrier): the only time that is timed."""
    return current().waiting(what)


def failed(error: BaseException) -> None:
    """This rank raised `error`: end the other ranks now (see `Watchdog.failed`)."""
    current().failed(error)


def after_main(is_main: bool) -> None:
    """Inside a `waiting` section: return once the main rank has reached it too, without a collective (the
    process group's timeout would cut a long save short). The main rank says so in a file; the others read it
    every 50 ms."""
    current().after_main(is_main)


PATIENT_PHASES = ("checkpoint save", "checkpoint load")
"""Work the main rank may do alone for longer than hang_timeout while the others wait (`after_main`): a rank
missing in one of these is busy, not hung, as long as its status is rewritten (its process runs and the
filesystem answers: the status lives on the same one)."""


@contextlib.contextmanager
def watched(rank: int, world_size: int, output_dir: str | Path, hang_timeout: float, barrier: Callable[[], None]):
    """A watch on every rank for the enclosed code (a fit), with several processes: the main rank clears an
    earlier launch's markers before `barrier()`; an error or a Ctrl-C raised inside ends the other ranks."""
    if world_size == 1:
        yield
        return
    if rank == 0:
        Watchdog.clear(output_dir)
    barrier()
    watch = Watchdog.start(rank, world_size, output_dir, hang_timeout)
    try:
        yield
    except (Exception, KeyboardInterrupt) as err:  # not a stop (SystemExit): every rank stops together then
        watch.failed(err)
        raise
    finally:
        watch.stop()


class _Waiting:
    """`Watchdog.waiting`'s context: two attribute writes (a generator-based context costs ~1.5 us more)."""

    __slots__ = ("watch", "what")

    def __init__(self, watch: Watchdog, what: str):
        self.watch, self.what = watch, what

    def __enter__(self) -> None:
        watch = self.watch
        watch._seq += 1
        watch._wait = (watch._seq, self.what)

    def __exit__(self, *exc) -> None:
        self.watch._wait = NOT_WAITING


def tick_for(hang_timeout: float) -> float:
    """Seconds between two status writes and marker polls: a 60th of the timeout, between 0.1 and 5 s (600 s: 5 s)."""
    return min(5.0, max(0.1, hang_timeout / 60))


class Watchdog:
    """One rank's side of the watch (see the module's docstring); `at` and `waiting` are the main thread's."""

    def __init__(self, rank: int, world_size: int, output_dir: str | Path, hang_timeout: float):
        self.rank, self.world_size, self.hang_timeout = rank, world_size, float(hang_timeout)
        self.dir = Path(output_dir) / ".ranks"
        self.ending = False
        """Whether the watch thread is ending this process for a hang (its report, then exit 124)."""
        self.report_path = Path(output_dir) / "hang-report.txt"
        self.tick = tick_for(hang_timeout)
        self.host, self.pid = socket.gethostname(), os.getpid()
        # The main thread's two assignments, nothing else: (phase, step) and (sequence number, what) or None. When
        # each began is what the thread first saw it (`_observe`): a clock read per call costs in a hot loop.
        self._where: tuple[str, int] = ("start", 0)
        self._wait: tuple[int, str] | None = NOT_WAITING
        self._seen_where: tuple[tuple, float] = (self._where, time.time())
        self._seen_wait: tuple[tuple | None, float] = (NOT_WAITING, time.time())
        self._seq = 0
        self._stopped = threading.Event()
        self._main = threading.get_ident()  # the thread that runs fit: its stack is the one to show
        self._thread: threading.Thread | None = None

    @classmethod
    def start(cls, rank: int, world_size: int, output_dir: str | Path, hang_timeout: float) -> Watchdog:
        """Start this rank's watch thread (every rank calls this at the start of fit, after a barrier that
        follows the main rank's `clear`, so that no marker of an earlier launch is read)."""
        watch = cls(rank, world_size, output_dir, hang_timeout)
        watch.dir.mkdir(parents=True, exist_ok=True)
        watch._write_status()
        watch._thread = threading.Thread(target=watch._run, name=f"acctrain-watchdog-rank{rank}", daemon=True)
        watch._thread.start()
        global _active
        _active = watch
        return watch

    @staticmethod
    def clear(output_dir: str | Path) -> None:
        """Remove an earlier launch's statuses and markers (the main rank, before the others start theirs)."""
        folder = Path(output_dir) / ".ranks"
        if folder.is_dir():
            for path in folder.iterdir():
                with contextlib.suppress(OSError):
                    path.unlink()

    # ------------------------------------------------------------------------------------ the main thread

    def at(self, phase: str, step: int | None = None) -> None:
        """The main thread is now in `phase` of optimizer step `step` (a tuple assignment: no I/O, no lock)."""
        self._where = (phase, self._where[1] if step is None else step)

    def waiting(self, what: str) -> _Waiting:
        """Around code that waits for every other rank (a collective, a barrier): the only time that is timed."""
        return _Waiting(self, what)

    def after_main(self, is_main: bool) -> None:
        """See the module function `after_main`."""
        path, seq = self.dir / "main-arrived", self._seq
        if is_main:
            _write_atomic(path, str(seq))
            return
        while True:  # a main rank that stops or dies is the watch thread's to name
            try:
                if int(path.read_text()) >= seq:
                    return
            except (OSError, ValueError):
                pass
            time.sleep(0.05)

    def failed(self, error: BaseException) -> None:
        """This rank raised `error` (not a stop): tell the other ranks, which exit at once naming it."""
        text = f"rank {self.rank} ({self.host}, pid {self.pid}) raised {type(error).__name__}: {error}"
        with contextlib.suppress(OSError):
            _write_atomic(self.dir / f"failed-rank{self.rank}", text)

    def stop(self) -> None:
        """End the watch (the end of fit, on every rank): the thread stops and the status says so."""
        global _active
        if _active is self:
            _active = None
        self._stopped.set()
        if self._thread is not None:
            self._thread.join(timeout=2 * self.tick + 1)
        self._where, self._wait = ("finished", self._where[1]), NOT_WAITING
        with contextlib.suppress(OSError):
            self._write_status()

    # ------------------------------------------------------------------------------------ the thread

    def _run(self) -> None:
        while not self._stopped.wait(self.tick):
            try:
                self._write_status()
                if (self.dir / "hang").exists():
                    self._answer_hang()
                failed = [p for p in self.dir.glob("failed-rank*") if p.name != f"failed-rank{self.rank}"]
                if failed:
                    self._exit_for_peer(failed[0])
                wait, since = self._seen_wait
                if wait is not NOT_WAITING and time.time() - since > self.hang_timeout:
                    self._check_hang(wait, since)
            except (OSError, ValueError) as err:  # a full or vanished output_dir must not kill the run from here
                print(f"acctrain watchdog (rank {self.rank}): {err!r}", file=sys.stderr, flush=True)

    def _observe(self) -> None:
        """Note when the main thread's phase and wait began: the first tick that sees them (so within a tick)."""
        now, where, wait = time.time(), self._where, self._wait
        if where is not self._seen_where[0]:
            self._seen_where = (where, now)
        if wait is not self._seen_wait[0]:
            self._seen_wait = (wait, now)

    def _status(self) -> dict:
        self._observe()
        (phase, step), since = self._seen_where
        wait, wait_since = self._seen_wait
        return {"rank": self.rank, "host": self.host, "pid": self.pid, "time": time.time(), "phase": phase,
                "step": step, "since": since,
                "waiting": None if wait is None else {"seq": wait[0], "what": wait[1], "since": wait_since}}

    def _write_status(self) -> None:
        _write_atomic(self.dir / f"rank{self.rank}.json", json.dumps(self._status()))

    def _statuses(self) -> dict[int, dict | None]:
        out: dict[int, dict | None] = {}
        for rank in range(self.world_size):
            try:
                out[rank] = json.loads((self.dir / f"rank{rank}.json").read_text())
            except (OSError, ValueError):
                out[rank] = None
        return out

    def _check_hang(self, wait: tuple[int, str], since: float) -> None:
        """This rank has waited past hang_timeout: a hang if some rank has not arrived at the same collective."""
        statuses = self._statuses()
        if self._wait is not wait:  # the wait ended meanwhile: the others may already be past it
            return
        stale = time.time() - max(10 * self.tick, self.hang_timeout / 2)  # a status not rewritten since: no thread runs
        missing = [r for r, s in statuses.items()
                   if s is None or s["waiting"] is None or s["waiting"]["seq"] < wait[0] or s["time"] < stale]
        if not missing:
            return  # every rank is in it: the collective itself is slow (the process group's timeout bounds it)
        if all(statuses[r] is not None and statuses[r]["phase"] in PATIENT_PHASES and statuses[r]["time"] >= stale
               for r in missing):
            return  # the main rank saves or verifies alone: busy, not hung (see PATIENT_PHASES)
        waited = time.time() - since
        reason = (f"rank {self.rank} waited {waited:.0f} s (hang_timeout={self.hang_timeout:g}) in {wait[1]} of "
                  f"optimizer step {self._where[1]}; rank(s) {', '.join(map(str, missing))} did not arrive")
        mine = self.dir / f".hang-rank{self.rank}"  # written whole, then linked: no rank reads half a marker
        mine.write_text(json.dumps({"detector": self.rank, "reason": reason, "missing": missing, "time": time.time()}))
        try:
            os.link(mine, self.dir / "hang")
        except FileExistsError:
            return  # another rank saw it first: answer its marker at the next tick
        self._answer_hang()

    def _answer_hang(self) -> None:
        """Write this rank's stack; the reporter (the main rank, else the rank that saw the hang) writes the
        report; then exit with HANG_EXIT_CODE."""
        self.ending = True  # the fit's signal handlers stay: a launcher's SIGTERM must not cut this short
        self._dump_flight_recorder()
        _write_atomic(self.dir / f"rank{self.rank}.stack", self._main_stack())
        marker = json.loads((self.dir / "hang").read_text())
        detector = marker["detector"]
        if self.rank == 0 or (self.rank == detector and not self._answered(0, patience=self._grace())):
            report = self._report(marker)
            with contextlib.suppress(OSError):
                _write_atomic(self.report_path, report)
            print(report, file=sys.stderr, flush=True)
        else:
            print(f"acctrain: rank {self.rank} ends: a hang was detected ({marker['reason']}); see "
                  f"{self.report_path}", file=sys.stderr, flush=True)
        _exit(HANG_EXIT_CODE)

    def _dump_flight_recorder(self) -> None:
        """PyTorch's flight recorder of this rank (its last collectives, each with its sequence number, state
        and Python stack) as JSON beside the hang report; read them with `python -m
        torch.distributed.flight_recorder.fr_trace`. Skipped where this torch has none."""
        try:
            from acctrain import private_apis  # imports torch: not at the top of this module

            trace = private_apis.dump_flight_recorder()  # private: none public in torch 2.13
        except Exception as err:  # an older torch, or no recorder for this backend
            trace = json.dumps({"unavailable": repr(err)}).encode()
        _write_atomic(self.report_path.with_name(f"flight-recorder-rank{self.rank}.json"),
                      trace.decode() if isinstance(trace, bytes) else str(trace))

    def _grace(self) -> float:
        """How long the reporter waits for the other ranks' stacks: three ticks, at least 3 s."""
        return max(3.0, 3 * self.tick)

    def _answered(self, rank: int, patience: float) -> bool:
        deadline = time.time() + patience
        while time.time() < deadline:
            if (self.dir / f"rank{rank}.stack").exists():
                return True
            time.sleep(0.05)
        return (self.dir / f"rank{rank}.stack").exists()

    def _report(self, marker: dict) -> str:
        deadline = time.time() + self._grace()
        while time.time() < deadline and not all((self.dir / f"rank{r}.stack").exists()
                                                  for r in range(self.world_size)):
            time.sleep(0.05)
        statuses, now = self._statuses(), time.time()
        lines = [f"acctrain: HANG - {marker['reason']}.",
                 f"Every rank that can answer exits with code {HANG_EXIT_CODE}. What each rank was doing:"]
        for rank in range(self.world_size):
            s = statuses[rank]
            if s is None:
                lines.append(f"\nrank {rank}: no status file (it never started this fit)")
                continue
            where = f"step {s['step']}, {s['phase']} for {now - s['since']:.0f} s"
            waits = f"; waiting in {s['waiting']['what']} for {now - s['waiting']['since']:.0f} s" if s["waiting"] else ""
            tag = " <- did not arrive" if rank in marker["missing"] else ""
            lines.append(f"\nrank {rank} ({s['host']}, pid {s['pid']}): {where}{waits}; last heard "
                         f"{now - s['time']:.0f} s ago{tag}")
            stack = self.dir / f"rank{rank}.stack"
            if stack.exists():
                lines.append(stack.read_text().rstrip())
            else:
                lines.append("  not responding: " + self._end_unresponsive(s))
        lines.append(f"\nEach answering rank's last collectives (PyTorch's flight recorder): "
                     f"{self.report_path.with_name('flight-recorder-rank{r}.json')}.")
        lines.append("\nWhat to do: read the stack of the rank that did not arrive (a data loader, a callback, a "
                     "filesystem); a rank 'not responding' was stopped, swapped out or lost. hang_timeout sets "
                     "how long a rank may wait; resume=auto continues from the last checkpoint.")
        return "\n".join(lines) + "\n"

    def _end_unresponsive(self, status: dict) -> str:
        """Describe (and on this host, kill) a rank that did not answer: stopped, or gone."""
        if status["host"] != self.host:
            return f"on host {status['host']}: its launcher or the scheduler must end it"
        pid = status["pid"]
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            return "its process is gone"
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
        what = "stopped (SIGSTOP or a debugger)" if state in ("T", "t") else f"process state {state}"
        return f"{what}; killed (SIGKILL) so that nothing is left waiting"

    def _main_stack(self) -> str:
        frame = sys._current_frames().get(self._main)
        stack = "".join(traceback.format_stack(frame)) if frame is not None else "(no main thread)\n"
        return "  " + stack.rstrip().replace("\n", "\n  ") + "\n"

    def _exit_for_peer(self, marker: Path) -> None:
        try:
            text = marker.read_text()
        except OSError:
            text = marker.name
        phase, step = self._where
        print(f"acctrain: rank {self.rank} ends (exit code {PEER_FAILED_EXIT_CODE}) at step {step}, {phase}, because "
              f"{text}. That rank's traceback says why; resume=auto continues from the last checkpoint.",
              file=sys.stderr, flush=True)
        _exit(PEER_FAILED_EXIT_CODE)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _exit(code: int) -> None:
    """End this process now, from the watch thread (the main thread is blocked in a collective), and its child
    processes (data loader workers, perhaps the very ones stuck), which would otherwise outlive it."""
    with contextlib.suppress(Exception):
        sys.stdout.flush()
        sys.stderr.flush()
    for pid in _children():
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    os._exit(code)


def _children() -> list[int]:
    """This process's child processes (Linux: /proc; elsewhere the multiprocessing children)."""
    try:
        return [int(pid) for task in Path("/proc/self/task").iterdir()
                for pid in (task / "children").read_text().split()]
    except OSError:
        import multiprocessing

        return [p.pid for p in multiprocessing.active_children() if p.pid]
