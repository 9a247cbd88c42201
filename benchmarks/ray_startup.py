"""What starting on Ray Train costs against torchrun: seconds from the launch to the first optimizer step, on 2 CPU
processes, for the same small Engine (an MLP, 20 steps; `make_engine` below).

    python benchmarks/ray_startup.py                  # 3 rounds: about 4 minutes on 2 shared cores
    python benchmarks/ray_startup.py --rounds 5 --json out.json

Each round, in rotated order:
- torchrun: `torchrun --nproc_per_node 2 benchmarks/ray_startup.py --worker OUT`, timed from just before the
  launcher starts;
- ray cold: a new driver process (`--ray-driver OUT`) that starts a local Ray cluster (`ray.init(num_cpus=2,
  include_dashboard=False)`) and calls `acctrain.integrations.ray.fit(..., num_workers=2)`, timed from just before
  the driver starts;
- ray warm: a second `fit` in the same driver, on the cluster already running (as on a long-lived cluster), timed
  from just before that call.
Rank 0 writes the wall-clock time of its first optimizer step (after_step of step 1) and of the fit's end; the
first-step figure includes the imports, the process group, the data and the Engine's construction for both.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from acctrain import Callback  # noqa: E402  (after the path, so that this checkout's acctrain is used)

STEPS = 20


class Clock(Callback):
    """Rank 0 records the wall-clock time of the first optimizer step and of the fit's end (`{output_dir}/times`)."""

    def after_step(self, engine) -> None:
        if engine.state.step == 1 and engine.accelerator.is_main_process:
            Path(engine.config.output_dir, "first-step").write_text(repr(time.time()))

    def after_fit(self, engine) -> None:
        if engine.accelerator.is_main_process:
            Path(engine.config.output_dir, "end").write_text(repr(time.time()))


def config_for(out: str):
    from acctrain import TrainConfig

    return TrainConfig(output_dir=out, global_batch_size=64, micro_batch_size=16, max_steps=STEPS, cpu=True,
                       cpu_threads=1, log_every=10)


def make_engine(config):
    import torch
    from torch import nn

    from acctrain import Engine

    torch.manual_seed(0)
    x = torch.randn(2048, 20)
    train_set = list(zip(x, (x[:, :10].sum(1) > x[:, 10:].sum(1)).long()))
    model = nn.Sequential(nn.Linear(20, 64), nn.GELU(), nn.Linear(64, 2))
    loss_fn = lambda model, batch: nn.functional.cross_entropy(model(batch[0]), batch[1])  # noqa: E731
    return Engine(model, config, train_set, loss_fn=loss_fn, callbacks=[Clock()])


def worker(out: str) -> None:
    engine = make_engine(config_for(out))
    try:
        engine.fit()
    finally:
        engine.close()


def ray_driver(out: str) -> None:
    """A cold fit (this process's start to its first step) and a warm one (`fit` called on the running cluster)."""
    import ray

    from acctrain.integrations import ray as acctrain_ray

    ray.init(num_cpus=2, include_dashboard=False)
    acctrain_ray.fit(make_engine, config_for(f"{out}/cold"), num_workers=2)
    Path(out, "warm-start").write_text(repr(time.time()))
    acctrain_ray.fit(make_engine, config_for(f"{out}/warm"), num_workers=2)
    ray.shutdown()


def timed(cmd: list[str]) -> float:
    """Run `cmd` to its end; returns the wall-clock time just before it started."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    start = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return start


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read(path: Path) -> float:
    return float(path.read_text())


def one_round(order: list[str], base: Path, r: int) -> dict[str, dict[str, float]]:
    found = {}
    for name in order:
        out = base / f"{name}-{r}"
        if name == "torchrun":
            start = timed([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(free_port()), __file__, "--worker", str(out)])
            found["torchrun"] = {"first_step_s": read(out / "first-step") - start, "run_s": read(out / "end") - start}
        else:
            start = timed([sys.executable, __file__, "--ray-driver", str(out)])
            warm = read(out / "warm-start")
            found["ray cold"] = {"first_step_s": read(out / "cold" / "first-step") - start,
                                 "run_s": read(out / "cold" / "end") - start}
            found["ray warm"] = {"first_step_s": read(out / "warm" / "first-step") - warm,
                                 "run_s": read(out / "warm" / "end") - warm}
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", help="write the figures here too")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--ray-driver", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker)
    if args.ray_driver:
        return ray_driver(args.ray_driver)
    rounds = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            order = ["torchrun", "ray"] if r % 2 == 0 else ["ray", "torchrun"]
            rounds.append(one_round(order, Path(tmp), r))
            print(f"round {r + 1}/{args.rounds}: " + ", ".join(
                f"{k} {v['first_step_s']:.1f} s to step 1 ({v['run_s']:.1f} s to the end)" for k, v in rounds[-1].items()))
    summary = {name: {key: statistics.median(r[name][key] for r in rounds) for key in ("first_step_s", "run_s")}
               for name in rounds[0]}
    for name, figures in summary.items():
        print(f"{name:9s} median of {args.rounds}: {figures['first_step_s']:.1f} s from launch to the first "
              f"optimizer step, {figures['run_s']:.1f} s to the end of fit ({STEPS} steps)")
    if args.json:
        Path(args.json).write_text(json.dumps({"rounds": rounds, "median": summary}, indent=2))


if __name__ == "__main__":
    main()
