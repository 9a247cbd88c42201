"""Shared helpers of the benchmarks: alternating runs, medians, the machine, and how busy it is.

Every benchmark runs its variants in alternating order (round r starts at variant r mod n, so no variant
always runs first or last), repeats the rounds, and reports medians; ratios are taken within a round
(paired), then their median. Nothing here changes how a variant runs.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]


WAIT_HELP = ("before the run and before each round, wait up to this many seconds for other processes to use "
             "< 15 %% of the CPUs")
QUIET = {"wait_s": 0.0}  # set by --wait-quiet: before each round, wait (up to this long) for an idle machine


def alternate(variants: dict[str, Callable[[], float]], rounds: int, log=print) -> dict[str, list[float]]:
    """Run every variant once per round, in rotated order; returns each variant's results by round."""
    names = list(variants)
    results: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        if QUIET["wait_s"]:
            wait_for_quiet(QUIET["wait_s"], sample_s=0.5, log=log)
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            gc.collect()
            results[name].append(variants[name]())
        log(f"  round {r + 1}/{rounds}: " + ", ".join(f"{n} {results[n][-1]:.6g}" for n in names))
    return results


def median(values: list[float]) -> float:
    return statistics.median(values)


def paired_ratios(results: dict[str, list[float]], num: str, den: str) -> list[float]:
    return [a / b for a, b in zip(results[num], results[den])]


def median_ci(values: list[float], level: float = 0.95, resamples: int = 2000) -> str:
    """A bootstrap confidence interval of the median (seeded, so a report is reproducible)."""
    import random

    rng = random.Random(0)
    meds = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(resamples))
    lo, hi = meds[int((1 - level) / 2 * resamples)], meds[int((1 + level) / 2 * resamples) - 1]
    return f"{lo:.3f}..{hi:.3f}"


def spread(values: list[float]) -> str:
    """min..max, to show the run-to-run range next to a median."""
    return f"{min(values):.3f}..{max(values):.3f}"


def table(headers: list[str], rows: list[list]) -> str:
    """A Markdown table (pastes into BENCHMARKS.md as is)."""
    cells = [[str(c) for c in row] for row in [headers, *rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ the machine


def cpu_busy(seconds: float = 1.0) -> float:
    """Fraction of all CPUs busy over `seconds` (from /proc/stat; includes this process)."""

    def sample():
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:]]
        idle = values[3] + values[4]  # idle + iowait
        return sum(values), idle

    total0, idle0 = sample()
    time.sleep(seconds)
    total1, idle1 = sample()
    return 1.0 - (idle1 - idle0) / max(total1 - total0, 1)


def loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def wait_for_quiet(max_wait_s: float, threshold: float = 0.15, sample_s: float = 2.0, log=print) -> float:
    """Wait (up to max_wait_s) until other work uses less than `threshold` of the CPUs; returns the last busy value.

    Sets QUIET, so that `alternate` also waits before each round.
    """
    QUIET["wait_s"] = max_wait_s
    deadline = time.monotonic() + max_wait_s
    busy = cpu_busy(sample_s)
    while busy > threshold and time.monotonic() < deadline:
        log(f"  machine busy ({busy:.0%} of CPUs, load {loadavg()}); waiting for it to be quiet")
        time.sleep(10)
        busy = cpu_busy(sample_s)
    if busy > threshold:
        log(f"  still busy ({busy:.0%}) after waiting {max_wait_s:.0f} s; measuring anyway")
    return busy


def git_commit() -> str:
    """The checkout's commit, read from .git without running git."""
    git = ROOT / ".git"
    try:
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref: "):
            return head
        ref = head[5:]
        if (git / ref).is_file():
            return (git / ref).read_text().strip()
        for line in (git / "packed-refs").read_text().splitlines():
            if line.endswith(" " + ref):
                return line.split()[0]
    except OSError:
        pass
    return "unknown"


def source_digest() -> str:
    """sha256 of acctrain/*.py as measured (the working tree may differ from the commit)."""
    import hashlib

    digest = hashlib.sha256()
    for path in sorted((ROOT / "acctrain").glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def machine() -> dict:
    """CPU model, cores, memory, versions and load: what a result needs next to it."""
    import accelerate
    import safetensors
    import torch

    import acctrain

    model = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        with open("/proc/meminfo") as f:
            mem_gb = int(f.readline().split()[1]) / 2**20
    except OSError:
        mem_gb = float("nan")
    return {
        "cpu": model,
        "cores": len(os.sched_getaffinity(0)),
        "memory_gib": round(mem_gb, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "accelerate": accelerate.__version__,
        "safetensors": safetensors.__version__,
        "acctrain": acctrain.__version__,
        "commit": git_commit(),
        "acctrain_sources_sha256": source_digest(),
        "loadavg": loadavg(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }


def begin(wait_quiet_s: float) -> dict:
    """A benchmark's start: wait for a quiet machine if asked (--wait-quiet), then print and return what it is."""
    if wait_quiet_s:
        wait_for_quiet(wait_quiet_s)
    info = machine()
    print(describe(info))
    return info


def describe(info: dict) -> str:
    return (f"{info['cpu']}, {info['cores']} cores, {info['memory_gib']} GiB; python {info['python']}, "
            f"torch {info['torch']}, accelerate {info['accelerate']}, safetensors {info['safetensors']}, "
            f"acctrain {info['acctrain']} @ {info['commit'][:12]} (sources {info['acctrain_sources_sha256'][:12]}); "
            f"load {info['loadavg']}")


def write_json(path: str | None, obj: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(obj, indent=1))
        print(f"wrote {path}")
