"""What the checks at the start of a fit cost: the data's identity (a token file's digest) and the first
micro-batches' check (acctrain.data_identity, acctrain.preflight).

    python benchmarks/start_checks.py                   # a 1 GiB token file, 5 rounds: ~1 min, 1 GiB of disk
    python benchmarks/start_checks.py --gib 4 --rounds 3 --json out.json

- identity: `data_identity.identify(TokenWindows(file))` of a fresh token file (in the page cache: just
  written; from a cold disk it runs at the disk's speed), its digest computed (the in-process record cleared
  each round); then with the checkpoint's record of the same size and mtime (no hashing).
- preflight: `first_micro_batches` of the tiny MLP of benchmarks/step_overhead.py (train and eval, micro batch
  8), against one training step of the same Engine (`Engine.fit` of one step, the median of the rounds).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def identity(gib: float, rounds: int) -> dict:
    from acctrain import data_identity
    from acctrain.token_data import TokenWindows

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "corpus.bin"
        np.random.default_rng(0).integers(0, 50_000, int(gib * (1 << 29)), dtype=np.uint16).tofile(path)
        hashed, recorded = [], []
        for _ in range(rounds):
            data_identity._digests.clear()  # as in a new process
            start = time.perf_counter()
            ident = data_identity.identify(TokenWindows(path, 1024))
            hashed.append(time.perf_counter() - start)
            start = time.perf_counter()
            data_identity.identify(TokenWindows(path, 1024), known=ident)
            recorded.append(time.perf_counter() - start)
        size = path.stat().st_size
    return {"bytes": size, "identify_s": statistics.median(hashed), "with_record_s": statistics.median(recorded)}


def preflight(rounds: int) -> dict:
    from acctrain import Callback, Engine, TrainConfig
    from acctrain.data import DataPlan
    from acctrain.preflight import first_micro_batches
    from benchmarks.step_overhead import MODELS, InMemory, build_model, identity as collate, loss_fn

    class Clock(Callback):
        """The first step's start and end."""

        def __init__(self):
            self.times = []

        def before_step(self, engine):
            self.times.append(time.perf_counter())

        def after_step(self, engine):
            self.times.append(time.perf_counter())

    checks, steps = [], []
    for _ in range(rounds):
        with tempfile.TemporaryDirectory() as tmp:
            cfg = TrainConfig(output_dir=tmp, global_batch_size=8, micro_batch_size=8, max_steps=1, cpu=True,
                              cpu_threads=1, log_every=100, save_every_minutes=0)
            data, clock = InMemory(4096, 32, 10), Clock()
            engine = Engine(build_model(MODELS["tiny"][0]), cfg, data, InMemory(64, 32, 10), loss_fn=loss_fn,
                            collate_fn=collate, callbacks=[clock])
            plan = DataPlan.for_run(data, None, cfg, 1)
            start = time.perf_counter()
            first_micro_batches(engine.accelerator, engine.unwrapped_model, data, engine.eval_data, plan, collate,
                                engine._loss_of)
            checks.append(time.perf_counter() - start)
            engine.fit()
            steps.append(clock.times[1] - clock.times[0])
            engine.close()
    return {"check_s": statistics.median(checks), "first_step_s": statistics.median(steps)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gib", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json")
    args = parser.parse_args()
    ident, pre = identity(args.gib, args.rounds), preflight(args.rounds)
    gb = ident["bytes"] / 1e9
    print(f"| part | time | |\n|---|---|---|\n"
          f"| identity of a {gb:.2f} GB token file, hashed | {ident['identify_s'] * 1e3:.1f} ms | "
          f"{gb / ident['identify_s']:.1f} GB/s |\n"
          f"| identity with the checkpoint's record (same size, mtime) | {ident['with_record_s'] * 1e3:.2f} ms | |\n"
          f"| first micro-batches' check (tiny MLP, train + eval) | {pre['check_s'] * 1e3:.2f} ms | |\n"
          f"| one training step of the same Engine (its first) | {pre['first_step_s'] * 1e3:.2f} ms | |")
    print(f"(median of {args.rounds} rounds; {os.cpu_count()} CPUs)")
    if args.json:
        Path(args.json).write_text(json.dumps({"identity": ident, "preflight": pre, "rounds": args.rounds}, indent=1))


if __name__ == "__main__":
    main()
