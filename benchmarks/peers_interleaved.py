"""acctrain's step against Lightning Fabric's, the two taking turns step by step in one process.

    .venv-peers/bin/python benchmarks/peers_interleaved.py                  # accumulation 1 and 4, 2 rounds (~2 min)
    .venv-peers/bin/python benchmarks/peers_interleaved.py --rounds 3 --log-every 10000000 --json out.json

The workload is `../shared/peers-bench/one.py`'s: a tiny MLP (64 -> 128 -> 1), micro-batch 32, AdamW lr 1e-3,
clip 1.0, constant lr, one thread, per-sample dicts from a map-style Dataset through a DataLoader (the
Engine's own loader), acctrain as `Engine.fit` with TensorBoard on and per-step logging, flushed every
`--log-every` steps (default: the Engine's default, so the event writing falls inside the timed steps).

Separate runs (one.py's method: per-step cost from two run lengths) see this shared VM's speed drift by
+-20 % from process to process, more than the difference between the two trainers. Here a callback at each
Engine `before_step` runs one step of the Fabric loop (one.py's, with its own model, optimizer and
loader), so each Engine step is paired with the Fabric step just before it: the statistic is the median
over steps of (Engine step - Fabric step), in µs, and their mean without the 1 % largest and smallest
(the median leaves out costs that come every few steps, such as a flush every 10; the trimmed mean
keeps them and drops the bursts of other processes). An A/A control pairs two Fabric loops the same way; its
median is the noise floor. Each run is a fresh process; the first `--warmup` steps are dropped.

What this leaves out: the Engine's start-up and end of fit (the final save and flush), which one.py's
two run lengths cancel too; and it adds to the Engine the dispatch of one `before_step` callback.
Needs `lightning` (the peers venv of the peers bench's README).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

from _common import begin, median_ci, table, write_json

MB, D = 32, 64


def child(mode: str, steps: int, accumulation: int, log_every: int) -> tuple[list[float], list[float]]:
    """One run: per step, (other step - Fabric step) and the Fabric step, in seconds; the other is the Engine
    ('engine') or a second Fabric loop ('aa')."""
    warnings.filterwarnings("ignore")
    import torch
    from torch import nn

    torch.set_num_threads(1)
    torch.manual_seed(0)
    n = MB * accumulation * (steps + 5)
    xs, ys = torch.randn(n, D), torch.randn(n, 1)

    def mlp():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(D, 128), nn.ReLU(), nn.Linear(128, 1))

    class Samples(torch.utils.data.Dataset):
        def __len__(self):
            return n

        def __getitem__(self, i):
            return {"x": xs[i], "labels": ys[i]}

    def loss_of(model, batch):
        return nn.functional.mse_loss(model(batch["x"]), batch["labels"])

    def fabric_stepper():
        from lightning.fabric import Fabric

        fabric = Fabric(accelerator="cpu", devices=1)
        model = mlp()
        model, opt = fabric.setup(model, torch.optim.AdamW(model.parameters(), lr=1e-3))
        batches = iter(fabric.setup_dataloaders(torch.utils.data.DataLoader(Samples(), batch_size=MB)))

        def step():
            for j in range(accumulation):
                with fabric.no_backward_sync(model, enabled=j < accumulation - 1):
                    fabric.backward(loss_of(model, next(batches)) / accumulation)
            fabric.clip_gradients(model, opt, max_norm=1.0)
            opt.step()
            opt.zero_grad()

        return step

    fabric_step = fabric_stepper()
    marks: list[tuple[float, float]] = []  # (start, end) of each Fabric step

    def turn():
        start = time.perf_counter()
        fabric_step()
        marks.append((start, time.perf_counter()))

    out = tempfile.mkdtemp(prefix="acctrain-peers-")
    try:
        if mode == "engine":
            from acctrain import Callback, Engine, TrainConfig

            class Turns(Callback):
                def before_step(self, engine):
                    turn()

            config = TrainConfig(output_dir=out, global_batch_size=MB * accumulation, micro_batch_size=MB,
                                 max_steps=steps, scheduler="constant", log_every=log_every, resume="none",
                                 max_grad_norm=1.0, cpu_threads=1, log_with="tensorboard")
            with contextlib.redirect_stdout(io.StringIO()):
                engine = Engine(mlp(), config, Samples(), loss_fn=loss_of, callbacks=[Turns()],
                                optimizer=lambda groups: torch.optim.AdamW(groups, lr=1e-3))
                engine.fit()
                engine.close()
        else:
            other = fabric_stepper()
            for _ in range(steps):
                turn()
                other()
            marks.append((time.perf_counter(), float("nan")))
    finally:
        shutil.rmtree(out, ignore_errors=True)
    # the other loop's step k runs from the end of Fabric step k to the start of Fabric step k + 1
    return [(b[0] - a[1]) - (a[1] - a[0]) for a, b in zip(marks, marks[1:])], [b - a for a, b in marks]


def trimmed_mean(values: list[float], cut: float = 0.01) -> float:
    """The mean without the `cut` largest and smallest values."""
    ordered = sorted(values)
    k = int(len(ordered) * cut)
    return statistics.fmean(ordered[k:len(ordered) - k])


def run(mode: str, args, accumulation: int) -> tuple[list[float], list[float]]:
    cmd = [sys.executable, __file__, "--child", mode, "--steps", str(args.steps), "--accumulation",
           str(accumulation), "--log-every", str(args.log_every)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
    diffs, fabric = json.loads(done.stdout.strip().splitlines()[-1])
    return diffs[args.warmup:], fabric[args.warmup:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--warmup", type=int, default=200, help="steps dropped at the start of each run")
    parser.add_argument("--accumulation", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--log-every", type=int, default=10, help="the Engine's flush interval (default: its default)")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each variant, alternating")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.steps, args.accumulation[0], args.log_every)))
        return
    info = begin(0.0)
    rows, results = [], {}
    for accumulation in args.accumulation:
        pooled = {"engine": ([], []), "aa": ([], [])}
        for r in range(args.rounds):
            for mode in (("engine", "aa") if r % 2 == 0 else ("aa", "engine")):
                diffs, fabric = run(mode, args, accumulation)
                pooled[mode][0].extend(diffs)
                pooled[mode][1].extend(fabric)
                print(f"  accumulation {accumulation}, round {r + 1}, {mode}: median {statistics.median(diffs) * 1e6:+.1f} µs "
                      f"(Fabric step {statistics.median(fabric) * 1e6:.1f} µs)", flush=True)
        for mode, label in (("engine", "acctrain - Fabric"), ("aa", "Fabric - Fabric (A/A)")):
            diffs, fabric = pooled[mode]
            micro = [d * 1e6 for d in diffs]
            rows.append([accumulation, label, f"{statistics.median(micro):+.1f}", median_ci(micro),
                         f"{trimmed_mean(micro):+.1f}", f"{statistics.median(fabric) * 1e6:.1f}", len(micro)])
            results[f"{accumulation}/{mode}"] = {"median_us": statistics.median(micro), "trimmed_mean_us": trimmed_mean(micro),
                                                 "fabric_step_us": statistics.median(fabric) * 1e6, "steps": len(micro)}
    print(table(["accumulation", "per step", "median µs", "95% CI", "trimmed mean µs", "Fabric step µs", "steps"], rows))
    write_json(args.json, {"machine": info, "log_every": args.log_every, "results": results})


if __name__ == "__main__":
    main()
