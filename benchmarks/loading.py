"""Is the data path the bottleneck? The loader alone against the training step, in samples per second.

    python benchmarks/loading.py                  # the main job's model and data; workers 0 and 2
    python benchmarks/loading.py --steps 200 --json out.json

Sources: the embedded job's stdlib bytes (`ByteChunks`, in memory) and the same bytes as a token file on
disk (`TokenWindows`, memory-mapped uint16, written by `acctrain.token_data.tokenize`). For each source and
`num_workers`, three rounds of: the Engine's own loader for this rank (`acctrain.data.Feed`: the plan's
windows, the DataLoader, collation) drained for `--steps` optimizer steps with nothing else running
(samples/s of the loader alone), then `Engine.fit()` for the same steps on the main job's default model
(ByteLM, 0.84M parameters, global batch 32, micro-batch 8, one process; the samples/s of training, timed
from the first step to the last, so that start-up and the final save are not in it). The ratio loader /
training says how many times faster batches are made than they are used.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import tempfile
import time
from contextlib import redirect_stdout
from pathlib import Path

import torch

from _common import begin

from acctrain import Callback, Engine, TrainConfig  # noqa: E402
from acctrain.bytelm import ByteLM, DataConfig, ModelConfig, lm_loss, stdlib_bytes, stdlib_datasets  # noqa: E402
from acctrain.data import DataPlan, Feed  # noqa: E402
from acctrain.token_data import TokenWindows, tokenize  # noqa: E402


class StepClock(Callback):
    def __init__(self):
        self.stamps = []

    def after_step(self, engine):
        self.stamps.append(time.perf_counter())


def loader_rate(dataset, steps: int, workers: int) -> float:
    plan = DataPlan(len(dataset), 32, 8, 1, seed=0, max_steps=steps)
    feed = Feed(plan, 0, 0, dataset, None, workers)
    n, start = 0, time.perf_counter()
    for window in feed.epoch(steps):
        for micro in window.micro_batches:
            next(feed.batches)
            n += micro.num_samples
    return n / (time.perf_counter() - start)


def train_rate(dataset, steps: int, workers: int, out: str) -> float:
    torch.manual_seed(0)
    clock = StepClock()
    cfg = TrainConfig(output_dir=out, global_batch_size=32, micro_batch_size=8, max_steps=steps, num_workers=workers,
                      resume="none", overwrite=True, save_every_minutes=0, eval_every=10**6)
    with redirect_stdout(io.StringIO()):
        engine = Engine(ByteLM(ModelConfig()), cfg, dataset, loss_fn=lm_loss, callbacks=[clock])
        engine.fit()
        engine.close()
    return 32 * (steps - 1) / (clock.stamps[-1] - clock.stamps[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--json")
    args = parser.parse_args()
    info = begin(0)
    tmp = Path(tempfile.mkdtemp(prefix="acctrain-loading-"))
    (tmp / "stdlib.txt").write_bytes(stdlib_bytes(DataConfig().max_bytes))
    tokenize([tmp / "stdlib.txt"], tmp / "stdlib.bin")
    sources = {"stdlib bytes in memory": stdlib_datasets(DataConfig(), 128)[0],
               "token file (memory-mapped)": TokenWindows(tmp / "stdlib.bin", 128)}
    rows = []
    for name, dataset in sources.items():
        for workers in args.workers:
            loads, trains = [], []
            for _ in range(args.rounds):
                loads.append(loader_rate(dataset, args.steps, workers))
                trains.append(train_rate(dataset, args.steps, workers, str(tmp / "run")))
            rows.append({"source": name, "workers": workers, "loader": statistics.median(loads),
                         "training": statistics.median(trains)})
            r = rows[-1]
            print(f"{name}, {workers} workers: loader {r['loader']:,.0f} samples/s, training {r['training']:,.0f}"
                  f" samples/s, ratio {r['loader'] / r['training']:.1f}", flush=True)
    print("\n| source | num_workers | loader alone (samples/s) | training (samples/s) | loader / training |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['source']} | {r['workers']} | {r['loader']:,.0f} | {r['training']:,.0f} | "
              f"{r['loader'] / r['training']:.1f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": info, "rows": rows}, indent=1))


if __name__ == "__main__":
    sys.exit(main())
