"""What the hang watchdog (acctrain.watchdog) costs a step, on the path users run: Engine.fit on 2 processes.

    python benchmarks/watchdog_cost.py                  # 5 rounds x 2 variants x (1, 2 processes), ~4 min on 2 cores
    python benchmarks/watchdog_cost.py --rounds 9 --steps 600 --json out.json

Three parts:

- interleaved: one process, Engine.fit at accumulation 8, the watch's calls turned on and off every 20 steps
  by a callback (the steps of both kinds alternate within one run, so the machine's drift cancels), with an
  A/A control whose "on" is a watch that does nothing: the difference of the median step times.
- calls: the main thread's own cost, in one process: the watchdog calls of one DDP step with accumulation 4,
  as the loop makes them (the step's start, 4 x data and forward/backward, the last backward and the step's
  all-reduce as waiting sections, the optimizer);
  timed in a loop with a watch running (its thread writing a status every 0.1 s) and without one.
- fit: Engine.fit of a small MLP (tiny steps, where a fixed cost shows most), accumulation 4, default logging,
  with the watchdog (hang_timeout=600, the default) and without it (the benchmark replaces `Loop._watched` by
  an empty context in its worker: the library has no switch), alternating within each round: on one process
  (where the library starts no watch, the benchmark starts one: its calls and thread, without gloo's noise)
  and under torchrun on 2 CPU processes (gloo). A run's statistic is the median step time of its timed steps;
  the table shows the medians over rounds and the median and range of the per-round ratios.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def calls(n: int = 200_000) -> dict:
    """Seconds per step of the watchdog calls a step makes (accumulation 4), with and without a watch."""
    from acctrain import watchdog

    def one_step():  # the calls of Loop._train_step under DDP (TorchStep): as the loop makes them
        watch = watchdog.current()
        watch.at("the step's start", 1)
        for micro in range(4):
            watch.at("data (the next micro-batch)", 1)
            watch.at("forward/backward", 1)
            with watchdog.IDLE.waiting("the forward (FSDP)"):
                pass
            with (watch if micro == 3 else watchdog.IDLE).waiting("the backward (its collectives)"):
                pass
        with watch.waiting("the step's all-reduce"):
            pass
        with watchdog.IDLE.waiting("clipping (FSDP's global norm)"):
            pass
        watch.at("optimizer step")

    def timed() -> float:
        best = float("inf")
        for _ in range(5):
            start = time.perf_counter()
            for _ in range(n // 5):
                one_step()
            best = min(best, (time.perf_counter() - start) / (n // 5))
        return best

    without = timed()
    with tempfile.TemporaryDirectory() as out:
        watch = watchdog.Watchdog.start(0, 2, out, hang_timeout=6.0)  # tick 0.1 s: 50x the default's writes
        try:
            with_watch = timed()
        finally:
            watch.stop()
    return {"without_us": without * 1e6, "with_us": with_watch * 1e6}


class _DoNothingWatch:
    """The A/A control of `interleaved`: a watch whose calls do nothing."""

    def at(self, phase, step=None):
        pass

    def waiting(self, what):
        return contextlib.nullcontext()


def interleaved(steps: int = 4000, block: int = 20, control: bool = False) -> dict:
    """One process, Engine.fit of the MLP at accumulation 8: a callback turns the watch on and off every `block`
    steps (the calls of every step, not its thread); the median step time of each. With `control`, the watch
    turned on is one that does nothing (A/A)."""
    import torch

    from acctrain import Callback, Engine, TrainConfig, watchdog

    out = tempfile.mkdtemp()
    watch = _DoNothingWatch() if control else watchdog.Watchdog(0, 2, out, 600.0)  # never started: its calls

    class Toggle(Callback):
        def __init__(self):
            self.last, self.times = None, {True: [], False: []}

        def after_step(self, engine):
            now = time.perf_counter()
            if self.last is not None:
                self.times[watchdog._active is not None].append(now - self.last)
            watchdog._active = watch if (engine.state.step // block) % 2 == 0 else None
            self.last = time.perf_counter()

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1))
    data = [(torch.randn(32), torch.randn(1)) for _ in range(4096)]
    toggle = Toggle()
    cfg = TrainConfig(output_dir=os.path.join(out, "run"), global_batch_size=16, micro_batch_size=2,
                      max_steps=steps, cpu=True, cpu_threads=1, scheduler="constant", save_every_minutes=0)
    with contextlib.redirect_stdout(io.StringIO()):
        Engine(model, cfg, data, None, loss_fn=_mse, callbacks=[toggle]).fit()
    watchdog._active = None
    return {"on_us": statistics.median(toggle.times[True]) * 1e6, "off_us": statistics.median(toggle.times[False]) * 1e6}


def _mse(model, batch):
    import torch

    x, y = batch
    return torch.nn.functional.mse_loss(model(x), y)


def worker(options: dict) -> None:
    """One Engine.fit under torchrun; rank 0 writes the median step time of the timed steps."""
    import torch

    from acctrain import Callback, Engine, TrainConfig
    from acctrain.loop import Loop

    if not options["watch"]:
        Loop._watched = lambda self: contextlib.nullcontext()  # the run without the watchdog
    elif int(os.environ.get("WORLD_SIZE", "1")) == 1:  # one process: a watch all the same, its calls timed alone
        from acctrain import watchdog

        def one_process_watch(self):
            watch = watchdog.Watchdog.start(0, 2, self.config.output_dir, self.config.hang_timeout)
            try:
                yield
            finally:
                watch.stop()
        Loop._watched = contextlib.contextmanager(one_process_watch)

    class Clock(Callback):
        def __init__(self):
            self.times = []

        def after_step(self, engine):
            self.times.append(time.perf_counter())

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1))
    data = [(torch.randn(32), torch.randn(1)) for _ in range(4096)]

    def loss_fn(model, batch):
        x, y = batch
        return torch.nn.functional.mse_loss(model(x), y)

    clock = Clock()
    cfg = TrainConfig(output_dir=options["out"], global_batch_size=16, micro_batch_size=2,
                      max_steps=options["steps"], cpu=True, cpu_threads=1, scheduler="constant",
                      save_every_minutes=0)
    engine = Engine(model, cfg, data, None, loss_fn=loss_fn, callbacks=[clock])
    engine.fit()
    if engine.accelerator.is_main_process:
        warm = options["steps"] // 5
        steps = [b - a for a, b in zip(clock.times[warm:], clock.times[warm + 1:])]
        Path(options["out"], "median.json").write_text(json.dumps({"median": statistics.median(steps)}))
    engine.close()


def fit_round(watch: bool, steps: int, nproc: int) -> float:
    with tempfile.TemporaryDirectory() as out:
        options = json.dumps({"out": out, "steps": steps, "watch": watch})
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
        subprocess.run([*(launcher if nproc == 2 else [sys.executable]), str(Path(__file__).resolve()), "--worker",
                        options], cwd=ROOT, env=env, check=True, capture_output=True)
        return json.loads(Path(out, "median.json").read_text())["median"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--interleaved", type=int, default=3, help="runs of the in-process on/off comparison")
    parser.add_argument("--json", type=str, default="")
    parser.add_argument("--worker", type=str, default="")
    args = parser.parse_args()
    if args.worker:
        return worker(json.loads(args.worker))
    result = {"calls": calls(), "interleaved": [], "interleaved_aa": []}
    print(f"calls per step (accumulation 4): {result['calls']['without_us']:.2f} us without a watch, "
          f"{result['calls']['with_us']:.2f} us with one", flush=True)
    for r in range(args.interleaved):
        for control in (False, True):
            run = interleaved(control=control)
            result["interleaved_aa" if control else "interleaved"].append(run)
            print(f"interleaved run {r + 1}{' (A/A)' if control else ''}: watch on {run['on_us']:.1f} us, off "
                  f"{run['off_us']:.1f} us, difference {run['on_us'] - run['off_us']:+.1f} us", flush=True)
    for key, label in (("interleaved", "the watch's calls"), ("interleaved_aa", "A/A: a watch that does nothing")):
        diffs = sorted(r["on_us"] - r["off_us"] for r in result[key])
        print(f"| {label} | {statistics.median(r['off_us'] for r in result[key]):.1f} | "
              f"{statistics.median(diffs):+.1f} ({diffs[0]:+.1f}..{diffs[-1]:+.1f}) |")
    rows = []
    for nproc in (1, 2):
        rounds = result.setdefault(f"rounds_{nproc}proc", [])
        for r in range(args.rounds):
            order = (True, False) if r % 2 == 0 else (False, True)
            times = {watch: fit_round(watch, args.steps, nproc) for watch in order}
            rounds.append({"with": times[True], "without": times[False]})
            print(f"{nproc} process(es), round {r + 1}: {times[True] * 1e3:.3f} ms with the watchdog, "
                  f"{times[False] * 1e3:.3f} ms without (ratio {times[True] / times[False]:.3f})", flush=True)
        ratios = sorted(r["with"] / r["without"] for r in rounds)
        rows.append(f"| {nproc} | {statistics.median(r['without'] for r in rounds) * 1e3:.3f} | "
                    f"{statistics.median(r['with'] for r in rounds) * 1e3:.3f} | {statistics.median(ratios):.3f} "
                    f"({ratios[0]:.3f}..{ratios[-1]:.3f}) |")
    print("\n| processes | without (ms) | with (ms) | ratio, median of paired rounds (range) |\n|---|---|---|---|\n"
          + "\n".join(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
