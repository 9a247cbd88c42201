"""The data plan at any dataset size: time and peak memory to a run's first window, today's plan against the
eager one it replaced.

    python benchmarks/data_plan.py                         # N = 1e6 ... 1e10 (the eager plan up to 1e7)
    python benchmarks/data_plan.py --eager-max 1e8 --json out.json

Each case runs in a fresh process: build `DataPlan(dataset_len=N, global_batch=512, micro_batch=8,
world_size=8, seed=0)`, then rank 0's first window (`rank_windows(0, 0)`) and the last window of the epoch
(`window(0, steps_per_epoch - 1)`), timed together; peak memory is the process's maximum resident set size
(ru_maxrss) minus the same figure after the imports. `eager` is the plan before (a `torch.randperm(N)` of
the epoch, made a Python list, then sliced): what acctrain did for every size, and still does up to 4.2M
samples (acctrain.permutation.EAGER_MAX), where its order is torch's RandomSampler's.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

CASE = r"""
import resource, sys, time, torch
from acctrain.data import DataPlan
n, kind = int(float(sys.argv[1])), sys.argv[2]
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
plan = DataPlan(dataset_len=n, global_batch=512, micro_batch=8, world_size=8, seed=0)
if kind == "eager":
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0)).tolist()
    first, last = order[:512], order[(plan.steps_per_epoch - 1) * 512 :]
else:
    first = next(plan.rank_windows(0, 0)).micro_batches[0].indices
    last = plan.window(0, plan.steps_per_epoch - 1)
elapsed = time.perf_counter() - start
print(elapsed, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024, plan.order_kind)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", type=float, default=[1e6, 1e7, 1e8, 1e9, 1e10])
    parser.add_argument("--eager-max", type=float, default=1e7, help="run the eager plan up to this size")
    parser.add_argument("--json")
    args = parser.parse_args()
    rows = []
    for n in args.sizes:
        for kind in ("plan", "eager") if n <= args.eager_max else ("plan",):
            out = subprocess.run([sys.executable, "-c", CASE, str(n), kind], capture_output=True, text=True)
            if out.returncode:
                raise SystemExit(out.stderr)
            seconds, peak, order = out.stdout.split()
            rows.append({"n": n, "kind": kind if kind == "eager" else f"plan ({order})",
                         "seconds": float(seconds), "peak_bytes": float(peak)})
            print(f"N={n:.0e} {rows[-1]['kind']:16s} {float(seconds):8.3f} s  {float(peak) / 2**20:9.1f} MiB", flush=True)
    print("\n| N | plan | first + last window (s) | peak memory (MiB) |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['n']:.0e} | {r['kind']} | {r['seconds']:.4f} | {r['peak_bytes'] / 2**20:.1f} |")
    print(f"\nmachine: {resource.getpagesize()} B pages; {time.strftime('%Y-%m-%d')}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
