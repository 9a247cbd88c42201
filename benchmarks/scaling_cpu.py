"""CPU scaling, for reference: the same Engine run on 1 and on 2 processes (torchrun, gloo).

    python benchmarks/scaling_cpu.py                         # 3 rounds of 1 and 2 processes (~2 min)
    python benchmarks/scaling_cpu.py --rounds 5 --steps 40 --json out.json

The run is the embedded job's model (acctrain.bytelm.ByteLM, default size: d_model 128, 4 layers,
context 128, 0.8M parameters) on the stdlib bytes, global batch 32, micro batch 8 (accumulation 4 on one
process, 2 on two), scheduler constant, log_every longer than the run. Both launches go through torchrun
and use the Engine's default threads (cpu_threads=0: the node's cores divided by the processes per node,
so 1 process x N threads against N/2 threads each). Rank 0 times `--steps` optimizer steps after
`--warmup` untimed ones (a callback stamps the start of each step); samples/s = global batch / seconds
per step. Launches alternate 1, 2, 2, 1, ...
(process start-up and the end-of-run save are outside the timed window).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import (ROOT, WAIT_HELP, alternate, begin, cpu_busy, loadavg, median, paired_ratios, spread, table,
                     write_json)

GLOBAL_BATCH, MICRO_BATCH = 32, 8


def worker(out: str, warmup: int, steps: int) -> None:
    """One rank of the timed run (started by torchrun); rank 0 writes the result."""
    import contextlib
    import io

    from acctrain import Callback, Engine, TrainConfig
    from acctrain.bytelm import ByteLM, DataConfig, ModelConfig, lm_loss, stdlib_datasets

    class Clock(Callback):
        """Stamps the start of each step; before_step costs no collective (after_step would add one per step)."""

        def __init__(self):
            self.stamps = []

        def before_step(self, engine):
            self.stamps.append(time.perf_counter())

    model_cfg = ModelConfig()
    train_set, _ = stdlib_datasets(DataConfig(max_bytes=1_000_000), model_cfg.context_len)
    with tempfile.TemporaryDirectory(prefix="acctrain-scaling-") as tmp:
        config = TrainConfig(output_dir=os.environ.get("BENCH_OUTPUT_DIR", tmp), global_batch_size=GLOBAL_BATCH,
                             micro_batch_size=MICRO_BATCH, max_steps=warmup + steps + 1, scheduler="constant",
                             log_every=10 * (warmup + steps), resume="none")
        clock = Clock()
        torch_model = ByteLM(model_cfg)
        with contextlib.redirect_stdout(io.StringIO()):
            engine = Engine(torch_model, config, train_set, loss_fn=lm_loss, callbacks=[clock])
            engine.fit()
        import torch

        result = {"world_size": engine.accelerator.num_processes, "accumulation": engine.plan.accumulation,
                  "threads": torch.get_num_threads(),
                  "seconds_per_step": (clock.stamps[warmup + steps] - clock.stamps[warmup]) / steps,
                  "params": sum(p.numel() for p in torch_model.parameters())}
        if engine.accelerator.is_main_process:
            Path(out).write_text(json.dumps(result))
        engine.close()


def launch(nproc: int, warmup: int, steps: int, results: list[dict]) -> float:
    """Start a torchrun job of `nproc` processes; returns rank 0's seconds per optimizer step."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory(prefix="acctrain-scaling-") as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
               "127.0.0.1", "--master_port", str(port), __file__, "--worker", str(out),
               "--warmup", str(warmup), "--steps", str(steps)]
        env = dict(os.environ, BENCH_OUTPUT_DIR=str(Path(tmp) / "run"))
        env.pop("OMP_NUM_THREADS", None)
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
        if proc.returncode:
            raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n"
                               f"{proc.stderr[-3000:]}")
        result = json.loads(out.read_text())
    assert result["world_size"] == nproc, result
    results.append(result)
    return result["seconds_per_step"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--wait-quiet", type=float, default=0, help=WAIT_HELP)
    parser.add_argument("--json", help="write all results to this JSON file")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, args.warmup, args.steps)

    info = begin(args.wait_quiet)
    print(f"CPU busy before: {cpu_busy():.0%}; {args.rounds} rounds, {args.warmup} warm-up + {args.steps} timed steps")
    started = time.perf_counter()
    details: dict[int, list[dict]] = {1: [], 2: []}
    launches = {f"{n} process{'es' if n > 1 else ''}": (lambda n=n: launch(n, args.warmup, args.steps, details[n]))
                for n in (1, 2)}
    results = alternate(launches, args.rounds)
    names = list(results)
    speedup = paired_ratios({k: [1 / v for v in vals] for k, vals in results.items()}, names[1], names[0])
    rows = []
    for n, name in zip((1, 2), names):
        d = details[n][0]
        rows.append([name, f"{d['accumulation']}", f"{d['threads']}", f"{median(results[name]) * 1e3:.1f}",
                     f"{GLOBAL_BATCH / median(results[name]):.1f}",
                     "1 (reference)" if n == 1 else f"{median(speedup):.3f} ({spread(speedup)})"])
    print(f"\nByteLM ({details[1][0]['params'] / 1e6:.2f}M parameters), global batch {GLOBAL_BATCH}, "
          f"micro batch {MICRO_BATCH}")
    print(table(["launch", "accumulation", "threads/process", "ms/step (median)", "samples/s",
                 "throughput vs 1 process"], rows))
    info["loadavg_after"] = loadavg()
    print(f"\ndone in {time.perf_counter() - started:.0f} s; load average after: {info['loadavg_after']}")
    write_json(args.json, {"machine": info, "seconds_per_step": results, "details": details})


if __name__ == "__main__":
    sys.exit(main())
