"""The cold start of `compile=true` against `compile=regions`: seconds from `Engine.fit()` to the end of the first
optimizer step (where torch.compile compiles), and the median step after it, for a GPT of 12 identical blocks.

    python benchmarks/compile_cold_start.py                      # on the CPU: a small GPT, ~3 minutes
    python benchmarks/compile_cold_start.py --width 768 --context 1024 --micro-batch 8    # GPT-2 small, on a GPU

Each variant runs in a fresh Python process (no compilation cache carried over in memory; inductor's on-disk
cache is pointed at a new temporary directory per run, so every run compiles from scratch), in rotated order,
`--rounds` times; the statistic is the median. The model is benchmarks/gpu_throughput.py's GPT (SDPA, GELU MLP,
tied embedding): `compile=true` compiles its forward whole, `compile=regions` each of its 12 blocks (one
compilation, reused 11 times: they share their code) and the modules outside the stack.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
VARIANTS = {"eager": False, "whole": True, "regions": "regions"}


def worker(args: argparse.Namespace) -> None:
    """One run: print a JSON line with the first step's seconds and the later steps' median."""
    sys.path.insert(0, str(HERE))
    sys.path.insert(1, str(HERE.parent))
    import torch

    from acctrain import Callback, Engine, TrainConfig
    from gpu_throughput import GPT, GPTConfig, RandomTokens, identity, loss_fn

    cfg = GPTConfig(block_size=args.context, vocab_size=args.vocab, n_layer=12, n_head=max(1, args.width // 64),
                    n_embd=args.width)

    class Clock(Callback):
        def __init__(self):
            self.ends = []

        def after_step(self, engine):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.ends.append(time.perf_counter())

    torch.manual_seed(0)
    clock, steps = Clock(), args.steps
    data = RandomTokens(args.micro_batch * steps, cfg)
    with tempfile.TemporaryDirectory() as out:
        config = TrainConfig(output_dir=out, global_batch_size=args.micro_batch, micro_batch_size=args.micro_batch,
                             max_steps=steps, scheduler="constant", compile=VARIANTS[args.worker],
                             mixed_precision="bf16" if torch.cuda.is_available() else "no", save_every=0,
                             log_every=steps, cpu_threads=args.threads if not torch.cuda.is_available() else 0)
        engine = Engine(GPT(cfg), config, data, loss_fn=loss_fn, collate_fn=identity, callbacks=[clock])
        started = time.perf_counter()
        engine.fit()
        engine.close()
    later = [b - a for a, b in zip(clock.ends[1:], clock.ends[2:])]
    print(json.dumps({"first_step_s": clock.ends[0] - started, "median_step_s": statistics.median(later)}))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2, help="torch threads on the CPU")
    parser.add_argument("--json", help="write the results to this file")
    parser.add_argument("--worker", choices=sorted(VARIANTS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return 0
    names, results = list(VARIANTS), {name: [] for name in VARIANTS}
    for r in range(args.rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            with tempfile.TemporaryDirectory() as cache:
                env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache, TRITON_CACHE_DIR=cache)
                argv = [f"--{key.replace('_', '-')}={value}" for key, value in vars(args).items()
                        if key not in ("json", "worker", "rounds")]
                proc = subprocess.run([sys.executable, __file__, *argv, "--worker", name], env=env,
                                      capture_output=True, text=True, check=True)
            line = json.loads(proc.stdout.strip().splitlines()[-1])
            results[name].append(line)
            print(f"round {r + 1}/{args.rounds} {name}: first step {line['first_step_s']:.1f} s, "
                  f"then {1000 * line['median_step_s']:.1f} ms/step", flush=True)
    print("| compile | first step (median) | later steps (median) |\n|---|---|---|")
    for name in names:
        first = statistics.median(x["first_step_s"] for x in results[name])
        step = statistics.median(x["median_step_s"] for x in results[name])
        print(f"| {VARIANTS[name]} | {first:.1f} s | {1000 * step:.1f} ms |")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
