"""Step overhead: the Engine against a raw PyTorch loop and a hand-written Accelerate loop.

    python benchmarks/step_overhead.py                       # tiny MLP (accumulation 1, 4), 20M MLP (1): ~3 min
    python benchmarks/step_overhead.py --models tiny --rounds 21 --what-if --json out.json
    python benchmarks/step_overhead.py --wait-quiet 300      # wait for an idle machine before each round
    python benchmarks/step_overhead.py --models 20m --rounds 3 --interleaved 8   # step-by-step turns, ~5 min

Four variants train the same model on the same data with the same math and are timed per optimizer step:

- raw: plain PyTorch; loss / accumulation, backward, clip_grad_norm_, AdamW step, zero_grad.
- accelerate: the loop of Accelerate's docs: prepare(model, optimizer); per micro-batch
  `with accumulate(model)`: backward, `clip_grad_norm_` when `sync_gradients`, optimizer.step(), zero_grad().
- accelerate-AA: the same loop again, an A/A control: its ratio to `accelerate` is the noise floor.
- engine: acctrain's Engine.fit() as users run it (default config except scheduler='constant', so that the
  weights can be compared, and log_every larger than the run, so that no flush falls in the timed window).
  Per step it does more than the minimal loops: sets each param group's lr (and momentum) from the
  schedule; sums the micro-batches' losses and item counts for the exact step loss; all-reduces them with
  the stop and cancel flags (skipped on one process); reads loss, gradient norm and flags to the host once
  (`.tolist()`) for the non-finite policy and the agreed stop; dispatches the callback events; buffers the
  step's metrics as device tensors for the next flush; counts steps and samples.
- engine-bypass (what-if), with --what-if: the same Engine with Accelerate's wrappers that do nothing for
  one CPU process without a GradScaler (optimizer.step, backward, clip_grad_norm_, reduce, no_sync)
  replaced on the instance by the torch calls they end in. The Engine now takes that direct path itself
  (its `_plain` path), so this variant should time like `engine`; it stays as a check.

With --interleaved, the Engine and the raw loop also run in one process taking turns step by step (a
callback runs one raw step at the start of each Engine step), and a raw/raw A/A control the same way; the
statistic is the pooled per-step ratio, each step paired with its neighbour in time. On a shared virtual
machine whose speed drifts over seconds, this resolves differences that separate runs cannot.

All variants read the Engine's data order (DataPlan windows) from in-memory tensors through the same plain
DataLoader (one indexing op per micro-batch), use AdamW with the Engine's parameter groups (foreach),
clip at 1.0 at the end of each window, and use the same number of torch threads (`--threads`; default 1
for the tiny MLP, whose ops are far below torch's parallel grain, and all cores for the 20M one). Batch
sizes are powers of two, so every loss scaling is exact and the final weights must be bit-identical
(checked on the first round, as tests/test_parity.py does).

Each run builds a fresh model and optimizer, runs `warmup` steps untimed, then times `steps` optimizer
steps. A run's statistic is the median of its step times (a burst of other work lands in a few steps;
every step carries the same overhead); each run's mean, and its median CPU time per step of the main
thread (time.thread_time), are in the JSON. Variants alternate within each round; tables show medians
over rounds, the median of the per-round (paired) ratios with a bootstrap 95 % confidence interval, and
the number of rounds in which a variant was the faster of the pair (a sign test): ratios on a shared
machine are noisy, see the A/A row.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import timeit

import torch
import torch.nn.functional as F
from torch import nn

from _common import (WAIT_HELP, alternate, begin, cpu_busy, describe, loadavg, median, median_ci, paired_ratios,
                     table, write_json)

MAX_GRAD_NORM, LR, BETAS, WEIGHT_DECAY = 1.0, 1e-3, (0.9, 0.999), 0.01  # the Engine's defaults

# name: (layer widths, micro batch, warm-up steps, timed steps, rounds, torch threads (0: all cores), accumulations)
MODELS = {
    "tiny": ([32, 64, 64, 10], 8, 50, 300, 11, 1, [1, 4]),  # far below torch's parallel grain: 1 thread
    "20m": ([1024, 2048, 2048, 2048, 2048, 2048, 1000], 16, 3, 15, 7, 0, [1]),
    "100m": ([1024] + [4096] * 7 + [1000], 16, 2, 8, 3, 0, [1]),  # 109M: the growth table's largest
}


def build_model(widths: list[int]) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for a, b in zip(widths, widths[1:]):
        layers += [nn.Linear(a, b), nn.GELU()]
    return nn.Sequential(*layers[:-1])


class InMemory(torch.utils.data.Dataset):
    """Inputs and class labels as two tensors; a micro-batch is one indexing op (`__getitems__`)."""

    def __init__(self, n: int, dim: int, classes: int):
        g = torch.Generator().manual_seed(1)
        self.x, self.y = torch.randn(n, dim, generator=g), torch.randint(0, classes, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i]

    def __getitems__(self, indices):
        idx = torch.tensor(indices)
        return self.x[idx], self.y[idx]


def identity(batch):
    return batch


def loss_fn(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)  # mean over the micro-batch


def adamw(model: nn.Module) -> torch.optim.AdamW:
    """The Engine's default optimizer (acctrain/optim.py), written out."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=LR, betas=BETAS, foreach=True)


class Case:
    """One model and accumulation: the data, the Engine's windows, and the runners."""

    def __init__(self, widths, micro, accumulation, warmup, steps, threads, tmp_root, log_every):
        from acctrain.data import DataPlan

        self.widths, self.micro, self.accumulation = widths, micro, accumulation
        self.warmup, self.steps, self.threads, self.tmp_root = warmup, steps, threads, tmp_root
        self.log_every = log_every or 10 * (warmup + steps)
        self.global_batch = micro * accumulation
        self.total = warmup + steps + 1  # the Engine is clocked at the start of a step: one more ends the window
        self.data = InMemory(self.global_batch * self.total, widths[0], widths[-1])
        plan = DataPlan(len(self.data), self.global_batch, micro, world_size=1, seed=0, max_steps=self.total)
        self.batches = [mb.indices for w in plan.rank_windows(0, 0) for mb in w.micro_batches]
        self.weights: dict[str, dict] = {}  # final weights of each variant's first run
        self.means: dict[str, list[float]] = {}  # mean seconds per step of each run
        self.cpu: dict[str, list[float]] = {}  # median CPU seconds per step of each run (main thread)

    def loader(self):
        return iter(torch.utils.data.DataLoader(self.data, batch_sampler=self.batches, collate_fn=identity))

    def per_step(self, name: str, stamps: list[tuple[float, float]]) -> float:
        """Median wall seconds of steps warmup+1 .. warmup+steps, from (wall, CPU) stamps taken after each step.

        The median of a run's steps is the statistic of the tables: a burst of other work on this shared
        machine lands in a few steps, and every step carries the same per-step overhead. The run's mean
        and its median CPU time per step (this thread's: time.thread_time) are recorded too.
        """
        assert len(stamps) == self.total, (len(stamps), self.total)
        window = stamps[self.warmup - 1 : self.warmup + self.steps]
        wall = [b[0] - a[0] for a, b in zip(window, window[1:])]
        cpu = [b[1] - a[1] for a, b in zip(window, window[1:])]
        self.means.setdefault(name, []).append(sum(wall) / len(wall))
        self.cpu.setdefault(name, []).append(statistics.median(cpu))
        return statistics.median(wall)

    def keep(self, name: str, model: nn.Module) -> None:
        if name not in self.weights:
            self.weights[name] = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def raw_stepper(self):
        """A raw model and a function that trains it one optimizer step per call, over the same batches."""
        model = build_model(self.widths)
        optimizer = adamw(model)
        batches = self.loader()

        def step() -> None:
            for _ in range(self.accumulation):
                (loss_fn(model, next(batches)) / self.accumulation).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return model, step

    def raw(self, name: str = "raw") -> float:
        torch.set_num_threads(self.threads)
        model, step = self.raw_stepper()
        stamps = []
        for _ in range(self.total):
            step()
            stamps.append(clock())
        self.keep(name, model)
        return self.per_step(name, stamps)

    def interleaved(self, engine: bool) -> list[float]:
        """Per-step time ratios, two loops taking turns step by step in one process: the Engine against raw
        (engine=True; a callback runs one raw step at each Engine `before_step`), or raw against raw (the A/A
        control). Neighbouring steps see the same machine, so slow drifts of a shared host cancel out."""
        torch.set_num_threads(self.threads)
        raw_model, raw_step = self.raw_stepper()
        marks: list[tuple[float, float]] = []  # (before, after) the raw step, once per turn

        def turn() -> None:
            before = time.perf_counter()
            raw_step()
            marks.append((before, time.perf_counter()))

        if engine:
            from acctrain import Callback

            class Turns(Callback):
                def before_step(self, engine):
                    turn()

            trained = self.run_engine("engine (interleaved)", [Turns()])
        else:
            trained, other_step = self.raw_stepper()
            for _ in range(self.total):
                turn()
                other_step()
            marks.append((time.perf_counter(), float("nan")))
        # the other loop's step k runs from the end of raw step k to the start of raw step k + 1
        ratios = [(b[0] - a[1]) / (a[1] - a[0]) for a, b in zip(marks, marks[1:])][self.warmup:]
        same = all(torch.equal(a, b) for a, b in zip(raw_model.state_dict().values(), trained.state_dict().values()))
        assert same, "the interleaved loops did not end with identical weights"
        return ratios

    def accelerate(self, name: str = "accelerate") -> float:
        from accelerate import Accelerator

        torch.set_num_threads(self.threads)
        fresh_accelerate()
        accelerator = Accelerator(gradient_accumulation_steps=self.accumulation)
        model = build_model(self.widths)
        model, optimizer = accelerator.prepare(model, adamw(model))
        stamps = []
        for batch in self.loader():
            with accelerator.accumulate(model):
                accelerator.backward(loss_fn(model, batch))
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
                optimizer.step()
                optimizer.zero_grad()
            if accelerator.sync_gradients:
                stamps.append(clock())
        self.keep(name, accelerator.unwrap_model(model))
        return self.per_step(name, stamps)

    def engine(self, name: str = "engine", bypass: bool = False) -> float:
        from acctrain import Callback

        class Clock(Callback):
            """Stamps the start of each step. Only before_step: an event the Engine dispatches without a
            collective or host sync of its own (after_step, with a callback, adds one on several ranks)."""

            def __init__(self):
                self.stamps = []

            def before_step(self, engine):
                self.stamps.append(clock())

        stamps = Clock()
        self.run_engine(name, [stamps], bypass)
        # stamp k is taken at the start of step k + 1, i.e. right after step k
        return self.per_step(name, stamps.stamps[1:] + [(float("nan"), float("nan"))])

    def run_engine(self, name: str, callbacks: list, bypass: bool = False) -> nn.Module:
        """Engine.fit() as users run it, with `callbacks`; returns the trained model."""
        from acctrain import Engine, TrainConfig

        fresh_accelerate()
        out = tempfile.mkdtemp(prefix="acctrain-bench-", dir=self.tmp_root)
        try:
            config = TrainConfig(output_dir=out, global_batch_size=self.global_batch, micro_batch_size=self.micro,
                                 max_steps=self.total, scheduler="constant", log_every=self.log_every,
                                 resume="none", cpu_threads=self.threads)
            with contextlib.redirect_stdout(io.StringIO()):
                engine = Engine(build_model(self.widths), config, self.data, loss_fn=loss_fn,
                                callbacks=callbacks, collate_fn=identity)
                if bypass:
                    bypass_accelerate(engine)
                engine.fit()  # the end-of-run save happens after the last step's clock
                engine.close()
            self.keep(name, engine.unwrapped_model)
        finally:
            shutil.rmtree(out, ignore_errors=True)
        return engine.unwrapped_model

    def check_identical(self) -> bool:
        ref = self.weights["raw"]
        return all(all(torch.equal(w[k], ref[k]) for k in ref) for w in self.weights.values())


def clock() -> tuple[float, float]:
    """(wall, this thread's CPU) seconds."""
    return time.perf_counter(), time.thread_time()


def bypass_accelerate(engine) -> None:
    """What-if (--what-if): the Engine calling torch directly where Accelerate's wrappers do nothing for a
    single CPU process without a GradScaler. Instance patches, here only; acctrain itself is unchanged."""
    acc, raw = engine.accelerator, engine.torch_optimizer
    assert acc.scaler is None and acc.num_processes == 1 and acc.distributed_type.value == "NO"

    class Optimizer:  # AcceleratedOptimizer.step minus its per-call optional-package checks
        step_was_skipped = False

        def step(self):
            raw.step()

    engine.optimizer = Optimizer()
    acc.backward = lambda loss, **kwargs: loss.backward(**kwargs)  # no division by 1, no dispatch
    acc.clip_grad_norm_ = lambda params, max_norm, norm_type=2: torch.nn.utils.clip_grad_norm_(
        list(params), max_norm, norm_type)  # no DTensor scan, no version parsing
    acc.reduce = lambda tensor, reduction="sum", scale=1.0: tensor  # one process: nothing to reduce
    acc.no_sync = lambda model: contextlib.nullcontext()  # no DDP: nothing to suppress


def fresh_accelerate() -> None:
    """A new Accelerator per run: Accelerate keeps process-wide singletons (as tests/conftest.py resets)."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def run_case(model: str, accumulation: int, args) -> dict:
    widths, micro, warmup, steps, rounds, threads, _ = MODELS[model]
    rounds = args.rounds or rounds
    threads = args.threads or threads or len(os.sched_getaffinity(0))
    case = Case(widths, micro, accumulation, warmup, steps, threads, args.tmp, args.log_every)
    params = sum(p.numel() for p in build_model(widths).parameters())
    print(f"\n{model} MLP ({params / 1e6:.3g}M parameters), micro batch {micro}, accumulation {accumulation}: "
          f"{rounds} rounds of {warmup} warm-up + {steps} timed steps per variant, {threads} torch thread(s)")
    variants = {"raw": case.raw, "accelerate": case.accelerate,
                "accelerate-AA": lambda: case.accelerate("accelerate-AA"), "engine": case.engine}
    if args.what_if:
        variants["engine-bypass (what-if)"] = lambda: case.engine("engine-bypass (what-if)", bypass=True)
    results = alternate(variants, rounds)
    interleaved = {}
    if args.interleaved:
        turns = Case(widths, micro, accumulation, warmup, args.interleaved_steps, threads, args.tmp, args.log_every)
        print(f"interleaved: {args.interleaved} runs of each pair, {warmup} warm-up + {args.interleaved_steps} "
              "timed steps, the two loops taking turns step by step")
        interleaved = {"engine / raw": [], "raw / raw (A/A)": []}
        for run in range(args.interleaved):  # alternating which of the two goes first
            for name in sorted(interleaved, reverse=bool(run % 2)):
                interleaved[name] += turns.interleaved(engine=name.startswith("engine"))
            print(f"  run {run + 1}/{args.interleaved}: " + ", ".join(
                f"{name} {median(r):.4f}" for name, r in interleaved.items()))
        report_interleaved(interleaved)
    out = {"model": model, "params": params, "micro_batch": micro, "accumulation": accumulation, "threads": threads,
           "warmup_steps": warmup, "timed_steps": steps, "rounds": rounds, "weights_identical": case.check_identical(),
           "median_step_seconds": results, "mean_step_seconds": case.means, "median_step_cpu_seconds": case.cpu,
           "interleaved_step_ratios": interleaved}
    report_case(out)
    return out


def report_case(case: dict) -> None:
    """The table of one case (also from a saved JSON: --report)."""
    results = case["median_step_seconds"]
    us = {k: [v * 1e6 for v in vals] for k, vals in results.items()}
    rows = []
    for name in results:
        vs_acc = paired_ratios(results, name, "accelerate")
        diff_acc = [a - b for a, b in zip(us[name], us["accelerate"])]
        vs_raw = paired_ratios(results, name, "raw")
        first = name == "accelerate"
        rows.append([name, f"{median(us[name]):.1f}", f"{median(vs_acc):.3f}", "" if first else median_ci(vs_acc),
                     "" if first else f"{sum(r < 1 for r in vs_acc)}/{len(vs_acc)}", f"{median(diff_acc):+.1f}",
                     f"{median(vs_raw):.3f}", "" if name == "raw" else median_ci(vs_raw)])
    print(table(["variant", "µs/step", "ratio vs accelerate", "95% CI", "faster in", "Δ vs accelerate µs",
                 "ratio vs raw", "95% CI"], rows))
    print(f"final weights bit-identical across the {len(results)} variants: "
          f"{'yes' if case['weights_identical'] else 'NO'}")


def report_interleaved(ratios: dict[str, list[float]]) -> None:
    rows = [[name, f"{median(r):.4f}", median_ci(r), f"{sum(x < 1 for x in r)}/{len(r)}"] for name, r in ratios.items()]
    print(table(["interleaved, per step", "median ratio", "95% CI", "steps with ratio < 1"], rows))


# ------------------------------------------------------------------------------------------ components


COMPONENTS_TITLE = "per-call cost, µs (best of 5 timeit repeats, of 7 alternating ones for pairs; tiny MLP, 1 process)"


def components(threads: int) -> list[list[str]]:
    """Per-call cost of Accelerate's wrappers (what the hand-written loop pays; the Engine calls torch directly
    where they would add nothing) and of the Engine's own per-step helpers, on the tiny MLP."""
    from accelerate import Accelerator
    from accelerate.utils import is_lomo_available, send_to_device

    torch.set_num_threads(threads)
    fresh_accelerate()
    accelerator = Accelerator()
    model = build_model(MODELS["tiny"][0])
    raw_opt = adamw(model)
    model, opt = accelerator.prepare(model, raw_opt)
    x, y = torch.randn(8, 32), torch.randint(0, 10, (8,))
    loss_fn(model, (x, y)).backward()
    params = list(model.parameters())
    three = torch.zeros(3, dtype=torch.float64)
    scalar = torch.zeros((), requires_grad=True)

    def best(fn, number=2000) -> float:
        return min(timeit.repeat(fn, number=number, repeat=5)) / number * 1e6

    def pair(fa, fb, number=2000) -> tuple[float, float]:
        """Best of 7 for each, alternating a and b, so that both see the same machine."""
        a, b = [], []
        for _ in range(7):
            a.append(timeit.timeit(fa, number=number))
            b.append(timeit.timeit(fb, number=number))
        return min(a) / number * 1e6, min(b) / number * 1e6

    def ctx(cm_factory):
        def enter_exit():
            with cm_factory():
                pass
        return enter_exit

    rows = [
        ("accelerate.utils.is_lomo_available() (2x per AcceleratedOptimizer.step)", best(is_lomo_available), None),
        ("AcceleratedOptimizer.step() vs optimizer.step() (AdamW, 6 tensors)", *pair(opt.step, raw_opt.step, 500)),
        ("  the same, accelerate.optimizer.is_lomo_available stubbed to return False",
         *pair(lambda: lomo_stubbed(opt), raw_opt.step, 500)),
        ("AcceleratedOptimizer.zero_grad() vs torch zero_grad(set_to_none=True)",
         *pair(opt.zero_grad, lambda: raw_opt.zero_grad(set_to_none=True))),
        ("Accelerator.clip_grad_norm_ vs torch.nn.utils.clip_grad_norm_",
         *pair(lambda: accelerator.clip_grad_norm_(model.parameters(), 1e9),
               lambda: torch.nn.utils.clip_grad_norm_(params, 1e9), 500)),
        ("Accelerator.backward(loss) vs loss.backward() (1-op graph)",
         *pair(lambda: accelerator.backward((scalar * 2.0).sum()), lambda: (scalar * 2.0).sum().backward())),
        ("Accelerator.reduce(3 scalars) (1 process: a clone)", best(lambda: accelerator.reduce(three, "sum")), None),
        ("send_to_device((x, y), cpu)",
         best(lambda: send_to_device((x, y), accelerator.device, non_blocking=True)), None),
        ("with Accelerator.accumulate(model)", best(ctx(lambda: accelerator.accumulate(model))), None),
        ("with Accelerator.no_sync(model)", best(ctx(lambda: accelerator.no_sync(model))), None),
        ("Engine host sync: torch.stack([3 scalars]).tolist()",
         best(lambda: torch.stack([three[0], three[1].to(three), three[2]]).tolist()), None),
    ]
    rows += engine_components(threads, best)
    return [[name, f"{a:.1f}", "" if b is None else f"{b:.1f}", "" if b is None else f"{a - b:+.1f}"]
            for name, a, b in rows if a is not None]


def lomo_stubbed(opt) -> None:
    """AcceleratedOptimizer.step with its two optional-package checks made free: what they cost in place."""
    import accelerate.optimizer

    original = accelerate.optimizer.is_lomo_available
    accelerate.optimizer.is_lomo_available = lambda: False
    try:
        opt.step()
    finally:
        accelerate.optimizer.is_lomo_available = original


def engine_components(threads: int, best) -> list[tuple]:
    """The Engine's own per-step pieces (private methods: a row is left out if one was renamed)."""
    from acctrain import Engine, TrainConfig, agreement

    fresh_accelerate()
    out = tempfile.mkdtemp(prefix="acctrain-bench-", dir=None)
    try:
        config = TrainConfig(output_dir=out, global_batch_size=8, micro_batch_size=8, scheduler="constant",
                             resume="none", cpu_threads=threads)
        engine = Engine(build_model(MODELS["tiny"][0]), config, InMemory(64, 32, 10), loss_fn=loss_fn,
                        collate_fn=identity)
        loss32, sum64 = torch.ones(()), torch.zeros((), dtype=torch.float64)  # the arguments of the calls below

        def maybe(fn, number=2000):
            try:
                fn()
            except (AttributeError, TypeError):
                return None
            return best(fn, number)

        rows = [
            ("OptimizerStep.set_lr_and_momentum(run, step) (2 param groups)",
             maybe(lambda: engine._step.set_lr_and_momentum(engine.run_state, 0)), None),
            ("agreement.reduce_step(loss_sum, num_items) (1 process)", maybe(lambda: agreement.reduce_step(
                engine.accelerator, sum64, sum64, agreement.NO_REQUESTS, torch.float64)), None),
            ("agreement.decide(loss, norm, flags, policy)", maybe(lambda: agreement.decide(
                1.0, 1.0, agreement.NO_FLAGS, agreement.Policy(), 1, 0)), None),
            ("Engine.callbacks(event) with no callbacks", maybe(lambda: engine.callbacks("before_step", engine)), None),
            ("Engine.metrics.add(step, 5 values)", maybe(lambda: engine.metrics.add(
                1, {"train/loss": loss32, "train/grad_norm": loss32, "train/skipped_steps": 0, "train/epoch": 0.1,
                    "train/lr": 1e-3}), 500), None),
        ]
        engine.close()
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["tiny", "20m"], choices=list(MODELS))
    parser.add_argument("--accumulation", nargs="+", type=int,
                        help="accumulation steps to measure (default: 1 and 4 for tiny, 1 for 20m)")
    parser.add_argument("--rounds", type=int, default=0, help="rounds per case (default: per model, see MODELS)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads for all variants (default: 1 for tiny, all cores for 20m)")
    parser.add_argument("--log-every", type=int, default=0, help="Engine log_every (default: longer than the run)")
    parser.add_argument("--no-components", action="store_true", help="skip the per-call cost table")
    parser.add_argument("--what-if", action="store_true",
                        help="add a variant: the Engine with Accelerate's no-op wrappers bypassed (instance patches)")
    parser.add_argument("--interleaved", type=int, default=0, metavar="RUNS",
                        help="also time the Engine and raw loop taking turns step by step in one process, "
                             "RUNS runs of it and of a raw/raw A/A control (pooled per-step ratios)")
    parser.add_argument("--interleaved-steps", type=int, default=60, help="timed steps of each interleaved run")
    parser.add_argument("--wait-quiet", type=float, default=0, help=WAIT_HELP)
    parser.add_argument("--tmp", default="/dev/shm" if os.path.isdir("/dev/shm") else None,
                        help="where the Engine's end-of-run checkpoint goes (not timed)")
    parser.add_argument("--json", help="write all results to this JSON file")
    parser.add_argument("--report", help="print the tables of a saved --json file instead of measuring")
    args = parser.parse_args()

    if args.report:
        saved = json.loads(open(args.report).read())
        print(describe(saved["machine"]))
        for case in saved["cases"]:
            print(f"\n{case['model']} MLP ({case['params'] / 1e6:.3g}M parameters), micro batch {case['micro_batch']}, "
                  f"accumulation {case['accumulation']}: {case['rounds']} rounds of {case['warmup_steps']} warm-up + "
                  f"{case['timed_steps']} timed steps per variant, {case['threads']} torch thread(s)")
            report_case(case)
            if case.get("interleaved_step_ratios"):
                report_interleaved(case["interleaved_step_ratios"])
        if saved.get("components"):
            print(f"\n{COMPONENTS_TITLE}")
            print(table(["call", "µs", "plain torch µs", "Δ µs"], saved["components"]))
        return
    info = begin(args.wait_quiet)
    print(f"CPU busy before: {cpu_busy():.0%}")
    started = time.perf_counter()
    cases = [run_case(m, a, args) for m in args.models for a in args.accumulation or MODELS[m][-1]]
    comp = []
    if not args.no_components:
        comp = components(args.threads or 1)
        print(f"\n{COMPONENTS_TITLE}")
        print(table(["call", "µs", "plain torch µs", "Δ µs"], comp))
    info["loadavg_after"] = loadavg()
    print(f"\ndone in {time.perf_counter() - started:.0f} s; load average after: {info['loadavg_after']}")
    write_json(args.json, {"machine": info, "cases": cases, "components": comp})


if __name__ == "__main__":
    sys.exit(main())
