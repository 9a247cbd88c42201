"""GPU throughput and MFU: a GPT-2-124M-shaped model in bf16; the Engine against a hand-written Accelerate loop
and a plain PyTorch loop.

    python benchmarks/gpu_throughput.py                      # one CUDA GPU; exits with a message without one
    python benchmarks/gpu_throughput.py --micro-batch 32 --accumulation 1 4 --rounds 3 --json out/gpu.json
    python benchmarks/gpu_throughput.py --time-budget 300    # cuts rounds that would not fit in 300 s
    python benchmarks/gpu_throughput.py --smoke              # a tiny model on the CPU: checks the code paths only
    python benchmarks/gpu_throughput.py --size 1b --variants engine engine-fp8 raw-fp8 --accumulation 1
                                                             # FP8 against bf16 on a 0.9B model (needs torchao)

The model is nanoGPT's GPT-2 small: 12 layers, 12 heads, width 768, context 1024, vocabulary 50304
(50257 padded to a multiple of 64), tied input/output embedding, biases, GELU MLP (124.4M parameters).
All variants use: torch.compile of the model in place (state-dict keys unchanged), bf16 autocast with fp32
master weights, fused AdamW (lr 6e-4, betas (0.9, 0.95), weight decay 0.1 on matrices only), clipping at
1.0 once per optimizer step, and flash attention only (torch.backends.cuda: flash SDPA on, the math,
memory-efficient and cuDNN kernels off, so a fallback is an error, not a silent slowdown). Data: random
tokens in host memory, one indexing op per micro-batch, loaded by a DataLoader with pin_memory=True
(page-locked batches) and copied with non_blocking=True.

- raw: nanoGPT's loop in plain PyTorch: `model.compile()`, `torch.autocast("cuda", bfloat16)` around
  forward and loss, loss / accumulation, backward; on the last micro-batch clip_grad_norm_, step,
  zero_grad(set_to_none=True). No host sync outside the timing stamps.
- accelerate: `model.compile()`, Accelerator(mixed_precision="bf16"), prepare(model, optimizer); per
  micro-batch `with accumulate(model)`: backward, clip when sync_gradients, step, zero_grad. No per-step
  host sync.
- engine: the path users run: an uncompiled model, TrainConfig(compile=True, lr, adam_betas,
  weight_decay as above) and no optimizer argument (the Engine's default AdamW: fused on CUDA, weight
  decay on ndim >= 2 parameters), the default log_every (10: TensorBoard rows written, and the host synced,
  every 10 steps), Engine.fit() with scheduler constant. With the fused optimizer and no callback inside
  the step, the Engine reads each step's loss and norm a step late, without waiting for the GPU, and skips
  a non-finite update on the device (acctrain.readback). The timing clock is not a callback (a callback in
  the step would make the Engine read each verdict at once): it stamps from the loss function, which runs
  once per micro-batch. The Engine saves a checkpoint after the run (untimed).

- raw-fp8 and engine-fp8: raw and engine with the Linear layers in FP8 through torchao (GPUs of compute
  capability 8.9+): raw converts the model with Accelerate's `convert_model_to_fp8_ao` (every Linear but the
  first and the last, sizes divisible by 16: the recipe `mixed_precision=fp8` uses) before compiling it, under
  the same bf16 autocast; engine sets mixed_precision="fp8". MFU stays against the bf16 peak (the convention).

`--size 1b` is the same architecture at 16 layers, 16 heads, width 2048 (0.9B parameters), where the matmuls
are large enough for FP8 to pay; the default is GPT-2 small. For each Engine variant the step-time breakdown
that the Engine logs (train/time/*, the last logged interval: timed steps) is printed and kept in the JSON.

Timing: after `--warmup` steps (compilation happens there), torch.cuda.synchronize(), clock; after
`--steps` more, synchronize, clock. tokens/s = steps x global batch x 1024 / seconds. The variants run in
alternating order, round by round (_common.alternate); ratios are paired within a round, then their
median (min..max beside it). Every run builds and compiles a fresh model, so a run costs its compilation
(tens of seconds the first time per variant, less once dynamo's and inductor's caches are warm);
`--rounds 1 --accumulation 1` is the quick check. `--time-budget S` starts a round (all variants, one
accumulation) only if the time since the start plus the previous round's duration (adjusted for a change
of accumulation) fits in S; rounds cut are reported and recorded in the JSON, which is rewritten after
every accumulation so a run killed later keeps what it measured. Not yet run on a GPU: written and
checked with --smoke on a CPU only.

MFU = tokens/s x flops per token / peak, with flops per token = 6 N + 12 L H Q T (PaLM appendix B, as
nanoGPT's estimate_mfu): N parameters without the position embedding (the tied token embedding counts:
it is the output projection), L layers, H heads, Q head size, T context; the attention term counts the
full (non-causal) score matrix, the convention, though flash attention skips the masked half.
Peak dense bf16 tensor-core FLOP/s (NVIDIA datasheets, without sparsity): see PEAK_TFLOPS; `--peak-tflops`
overrides it.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import math
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass

STARTED = time.monotonic()  # --time-budget counts from here, before torch's import

import torch  # noqa: E402  (after STARTED: the time budget counts torch's import)
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from _common import alternate, describe, machine, median, paired_ratios, spread, table, write_json  # noqa: E402

PEAK_TFLOPS = {  # dense bf16, without sparsity
    "H100 SXM": 989.4,
    "H100 PCIe": 756.0,
    "H200": 989.4,
    "A100": 312.0,
}


@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50304
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.ln_1, self.ln_2 = nn.LayerNorm(cfg.n_embd), nn.LayerNorm(cfg.n_embd)
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.mlp = nn.Sequential(nn.Linear(cfg.n_embd, 4 * cfg.n_embd), nn.GELU(approximate="tanh"),
                                 nn.Linear(4 * cfg.n_embd, cfg.n_embd))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).view(b, t, 3, self.n_head, d // self.n_head).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.c_proj(y.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.wte, self.wpe = nn.Embedding(cfg.vocab_size, cfg.n_embd), nn.Embedding(cfg.block_size, cfg.n_embd)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.apply(self._init)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight") or name.endswith("mlp.2.weight"):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.ln_f(x) @ self.wte.weight.T  # tied output projection

    def flops_per_token(self) -> float:
        cfg = self.cfg
        n = sum(p.numel() for p in self.parameters()) - self.wpe.weight.numel()
        return 6 * n + 12 * cfg.n_layer * cfg.n_head * (cfg.n_embd // cfg.n_head) * cfg.block_size


def loss_fn(model, batch):
    logits = model(batch["input_ids"])
    return F.cross_entropy(logits.flatten(0, 1).float(), batch["labels"].flatten())  # mean: every token counts


class RandomTokens(torch.utils.data.Dataset):
    def __init__(self, n: int, cfg: GPTConfig):
        g = torch.Generator().manual_seed(1)
        self.tokens = torch.randint(0, min(50257, cfg.vocab_size), (n, cfg.block_size + 1), generator=g)

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i):
        return self.__getitems__([i])

    def __getitems__(self, indices):
        rows = self.tokens[torch.tensor(indices)]
        # contiguous: a strided view would be copied to the GPU through a pageable temporary, blocking
        return {"input_ids": rows[:, :-1].contiguous(), "labels": rows[:, 1:].contiguous()}


def identity(batch):
    return batch


def param_groups(model: nn.Module) -> list[dict]:
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    return [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}]


def make_adamw(fused: bool):
    return functools.partial(torch.optim.AdamW, lr=6e-4, betas=(0.9, 0.95), fused=fused)


def fresh_accelerate() -> None:
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


class Case:
    def __init__(self, args, cfg: GPTConfig, accumulation: int):
        from acctrain.data import DataPlan

        self.args, self.cfg, self.accumulation = args, cfg, accumulation
        self.micro, self.global_batch = args.micro_batch, args.micro_batch * accumulation
        self.total = args.warmup + args.steps + 1  # one more step: the Engine is clocked at the start of a step
        self.data = RandomTokens(self.global_batch * self.total, cfg)
        plan = DataPlan(len(self.data), self.global_batch, self.micro, world_size=1, seed=0, max_steps=self.total)
        self.batches = [mb.indices for w in plan.rank_windows(0, 0) for mb in w.micro_batches]
        self.smoke = args.smoke
        self.breakdowns: dict[str, list[dict[str, float]]] = {}  # engine variant -> per run: part -> share

    def model(self, compiled: bool = True, fp8: bool = False) -> GPT:
        torch.manual_seed(0)
        model = GPT(self.cfg)
        if fp8:
            from accelerate.utils.ao import convert_model_to_fp8_ao

            convert_model_to_fp8_ao(model)  # the recipe of mixed_precision=fp8: all Linear but the first and last
        if compiled and not self.smoke:
            model.compile()
        return model

    def loader(self) -> torch.utils.data.DataLoader:
        """The micro-batches in the Engine's order, page-locked on CUDA as the Engine's loader pins them."""
        return torch.utils.data.DataLoader(self.data, batch_sampler=self.batches, collate_fn=identity,
                                           pin_memory=not self.smoke)

    def sync(self) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def stamp(self, steps: int, stamps: list[float]) -> None:
        """After the warm-up steps and after the timed ones: wait for the GPU, read the clock."""
        if steps in (self.args.warmup, self.args.warmup + self.args.steps):
            self.sync()
            stamps.append(time.perf_counter())

    def seconds(self, stamps: list[float]) -> float:
        return (stamps[1] - stamps[0]) / self.args.steps

    def accelerate(self) -> float:
        from accelerate import Accelerator

        fresh_accelerate()
        accelerator = Accelerator(mixed_precision="bf16", gradient_accumulation_steps=self.accumulation,
                                  cpu=self.smoke)
        model = self.model()
        optimizer = make_adamw(not self.smoke)(param_groups(model))
        model, optimizer = accelerator.prepare(model, optimizer)
        stamps, steps = [], 0
        for batch in self.loader():
            batch = {k: v.to(accelerator.device, non_blocking=True) for k, v in batch.items()}
            with accelerator.accumulate(model):
                accelerator.backward(loss_fn(model, batch))
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                optimizer.zero_grad()
            if accelerator.sync_gradients:
                steps += 1
                self.stamp(steps, stamps)
        return self.seconds(stamps)

    def raw(self, fp8: bool = False) -> float:
        """nanoGPT's loop in plain PyTorch."""
        device = torch.device("cpu" if self.smoke else "cuda")
        model = self.model(fp8=fp8).to(device)
        optimizer = make_adamw(not self.smoke)(param_groups(model))
        stamps, steps = [], 0
        for i, batch in enumerate(self.loader(), 1):
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss = loss_fn(model, batch) / self.accumulation
            loss.backward()
            if i % self.accumulation:
                continue
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # no host sync: the norm stays on the device
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            steps += 1
            self.stamp(steps, stamps)
        return self.seconds(stamps)

    def engine(self, precision: str = "bf16") -> float:
        from acctrain import Engine, TrainConfig

        stamps, calls = [], {"train": 0}
        first_micro_of = {self.args.warmup * self.accumulation + 1, (self.args.warmup + self.args.steps) * self.accumulation + 1}

        def clocked_loss(model, batch):
            """At the first micro-batch of the step after the warm-up and of the step after the timed ones:
            synchronise, stamp (as before_step would, but a callback would change the Engine's path)."""
            calls["train"] += model.training
            if model.training and calls["train"] in first_micro_of:
                self.sync()
                stamps.append(time.perf_counter())
            return loss_fn(model, batch)

        fresh_accelerate()
        out = tempfile.mkdtemp(prefix="acctrain-gpu-bench-")
        try:
            # The users' path: the Engine compiles the model and builds its default AdamW (fused on CUDA,
            # weight decay on ndim >= 2 parameters: the same groups as param_groups above).
            config = TrainConfig(output_dir=out, global_batch_size=self.global_batch, micro_batch_size=self.micro,
                                 max_steps=self.total, mixed_precision=precision, scheduler="constant",
                                 resume="none", max_grad_norm=1.0, cpu=self.smoke,
                                 compile=not self.smoke, lr=6e-4, adam_betas=(0.9, 0.95), weight_decay=0.1)
            with contextlib.redirect_stdout(io.StringIO()):
                engine = Engine(self.model(compiled=False), config, self.data, loss_fn=clocked_loss,
                                collate_fn=identity)
                engine.fit()
                engine.close()
            # where the Engine says the step time went, in the last logged interval (timed steps)
            last = engine.metrics.last
            self.breakdowns.setdefault(f"engine-{precision}", []).append(
                {k.removeprefix("train/time/"): v / last["train/step_time_s"] for k, v in last.items()
                 if k.startswith("train/time/")})
        finally:
            shutil.rmtree(out, ignore_errors=True)
        return self.seconds(stamps)


def device_peak(name: str) -> tuple[str, float | None]:
    if "H200" in name:
        return "H200", PEAK_TFLOPS["H200"]
    if "H100" in name:
        if "NVL" in name:
            return name, None  # not in the table: pass --peak-tflops
        kind = "H100 PCIe" if "PCIe" in name else "H100 SXM"
        return kind, PEAK_TFLOPS[kind]
    if "A100" in name:
        return "A100", PEAK_TFLOPS["A100"]
    return name, None


SIZES = {"gpt2": GPTConfig(), "1b": GPTConfig(n_layer=16, n_head=16, n_embd=2048)}
VARIANTS = ("raw", "accelerate", "engine", "raw-fp8", "engine-fp8")


def variant_runs(case: Case, names: list[str]) -> dict:
    runs = {"raw": case.raw, "accelerate": case.accelerate, "engine": case.engine,
            "raw-fp8": functools.partial(case.raw, fp8=True), "engine-fp8": functools.partial(case.engine, "fp8")}
    return {name: runs[name] for name in names}


class OutOfTime(Exception):
    """The next round would not end within --time-budget."""


class Budget:
    """--time-budget: a round starts only if the time since the start plus the previous round's duration fits."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.last: float | None = None  # the previous round's duration
        self.round_start: float | None = None

    def start_round(self, extra: float = 0.0) -> None:
        """Raise OutOfTime if the next round would overrun; `extra` corrects the estimate (another accumulation)."""
        now = time.monotonic()
        if self.round_start is not None:
            self.last, self.round_start = now - self.round_start, None
        estimate = max((self.last or 0.0) + extra, 0.0)  # the first round has no estimate: it always runs
        if self.seconds and now - STARTED + estimate > self.seconds:
            raise OutOfTime(f"{now - STARTED:.0f} s elapsed + {estimate:.0f} s estimated for the next round "
                            f"> --time-budget {self.seconds:g} s")
        self.round_start = now


def run_rounds(variants: dict, rounds: int, budget: Budget, extra: float) -> dict[str, list[float]]:
    """_common.alternate under the time budget: each variant's results, by round, of the rounds that ran."""
    results: dict[str, list[float]] = {name: [] for name in variants}
    first = next(iter(variants))

    def recorded(name: str):
        def run() -> float:  # kept here too: alternate's own results are lost when a round is cut
            results[name].append(variants[name]())
            return results[name][-1]

        return run

    def after_round(line: str) -> None:  # alternate logs at the end of each round; the next one starts after
        print(line, flush=True)
        if len(results[first]) < rounds:
            budget.start_round()

    try:
        budget.start_round(extra)
        alternate({name: recorded(name) for name in variants}, rounds, log=after_round)
    except OutOfTime as cut:
        print(f"  time budget: {cut}; cut after {len(results[first])} of {rounds} rounds", flush=True)
    return results


def ratio_stats(ratios: list[float]) -> dict:
    return {"median": median(ratios), "min": min(ratios), "max": max(ratios), "by_round": ratios}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--micro-batch", type=int, default=16)
    parser.add_argument("--accumulation", nargs="+", type=int, default=[1, 4])
    parser.add_argument("--warmup", type=int, default=15, help="untimed steps (torch.compile compiles here)")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--peak-tflops", type=float, default=0, help="override the device's peak bf16 TFLOP/s")
    parser.add_argument("--time-budget", type=float, default=0, metavar="SECONDS",
                        help="start a round only if it is estimated to end within this many seconds of the "
                             "start (the previous round's duration); 0: no limit")
    parser.add_argument("--size", choices=sorted(SIZES), default="gpt2", help="the model: GPT-2 small or 0.9B")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=["raw", "accelerate", "engine"],
                        help="the loops to compare; the first is the reference of the ratios")
    parser.add_argument("--smoke", action="store_true",
                        help="a tiny model on the CPU, no compile: checks the code only")
    parser.add_argument("--json", help="write all results to this JSON file (its folder is created), "
                                       "rewritten after every accumulation")
    args = parser.parse_args()

    if args.smoke:
        cfg = GPTConfig(block_size=32, vocab_size=128, n_layer=2, n_head=2, n_embd=32)
        args.micro_batch, args.warmup, args.steps, args.rounds = 2, 2, 12, 2  # two rounds: the rotation runs
        if any(v.endswith("-fp8") for v in args.variants):
            print("gpu_throughput: --smoke runs on the CPU, which has no FP8: the fp8 variants are left out")
            args.variants = [v for v in args.variants if not v.endswith("-fp8")]
        peak_name, peak = "CPU (smoke test: no MFU)", None
    else:
        if not torch.cuda.is_available():
            print("gpu_throughput: no CUDA device here (torch.cuda.is_available() is False); nothing measured. "
                  "Run it on a machine with an H100/H200, or use --smoke to check the code paths on the CPU.")
            return 0
        cfg = SIZES[args.size]
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cuda.enable_flash_sdp(True)
        torch.backends.cuda.enable_mem_efficient_sdp(False)
        torch.backends.cuda.enable_math_sdp(False)
        torch.backends.cuda.enable_cudnn_sdp(False)
        import torch._dynamo as dynamo

        for limit in ("recompile_limit", "cache_size_limit"):  # new models per run must not fall back to eager
            if hasattr(dynamo.config, limit):
                setattr(dynamo.config, limit, 64)
        name = torch.cuda.get_device_name()
        peak_name, peak = device_peak(name)
    if args.peak_tflops:
        peak = args.peak_tflops
    info = machine()
    info["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() and not args.smoke else "cpu"
    info["cuda"] = torch.version.cuda
    print(describe(info))
    shown = peak if peak else "? (pass --peak-tflops)"
    print(f"device: {info['device']}; peak bf16 dense: {peak_name} {shown} TFLOP/s")
    model = GPT(cfg)
    n_params, fpt = sum(p.numel() for p in model.parameters()), model.flops_per_token()
    del model
    print(f"GPT: {n_params / 1e6:.1f}M parameters, {fpt / 1e6:.1f} MFLOP per token (6N + 12LHQT)")
    out = {"machine": info, "peak_tflops": peak, "params": n_params, "flops_per_token": fpt,
           "warmup": args.warmup, "steps": args.steps, "rounds_requested": args.rounds,
           "time_budget_s": args.time_budget or None, "cut_by_time_budget": False, "cases": []}
    budget, previous = Budget(args.time_budget), None  # previous: (accumulation, seconds per step) measured last
    for accumulation in args.accumulation:
        case = Case(args, cfg, accumulation)
        tokens_per_step = case.global_batch * cfg.block_size
        print(f"\nmicro batch {args.micro_batch}, accumulation {accumulation} ({tokens_per_step} tokens per step): "
              f"{args.rounds} rounds of {args.warmup} warm-up + {args.steps} timed steps", flush=True)
        variants = variant_runs(case, args.variants)
        extra = 0.0
        if previous:  # the last round ran another accumulation: a step's time scales with its micro-batches
            extra = len(variants) * case.total * previous[1] * (accumulation / previous[0] - 1)
        results = run_rounds(variants, args.rounds, budget, extra)
        reference = args.variants[0]
        ran = len(results[reference])
        entry = {"accumulation": accumulation, "micro_batch": args.micro_batch, "rounds_run": ran,
                 "seconds_per_step": results}
        out["cases"].append(entry)
        out["cut_by_time_budget"] |= ran < args.rounds
        if ran:
            previous = (accumulation, median([s for v in results.values() for s in v]))
            throughput = {k: [1 / s for s in v] for k, v in results.items()}
            tps = {k: tokens_per_step / median(v) for k, v in results.items()}
            entry["tokens_per_s"] = tps
            entry["mfu"] = {k: v * fpt / (peak * 1e12) for k, v in tps.items()} if peak else None
            entry["throughput_ratios"] = {f"{a}_vs_{b}": ratio_stats(paired_ratios(throughput, a, b))
                                          for a in results for b in results if a != b}
            entry["engine_time_breakdown"] = case.breakdowns

            def versus(variant: str, reference: str) -> str:
                if variant == reference:
                    return "1 (reference)"
                ratios = paired_ratios(throughput, variant, reference)
                return f"{median(ratios):.3f} ({spread(ratios)})"

            references = [r for r in ("accelerate", "raw") if r in results] or [reference]
            rows = [[variant, f"{median(results[variant]) * 1e3:.1f}", f"{tps[variant]:,.0f}",
                     f"{entry['mfu'][variant]:.1%}" if peak else "n/a",
                     *(versus(variant, r) for r in references)] for variant in results]
            print(f"rounds run: {ran} of {args.rounds}" + (" (cut by --time-budget)" if ran < args.rounds else ""))
            print(table(["variant", "ms/step (median)", "tokens/s", "MFU",
                         *(f"throughput vs {r}" for r in references)], rows), flush=True)
            for variant, shares in case.breakdowns.items():  # the last run's: the timed steps
                print(f"{variant} step time (the Engine's train/time/*): " + ", ".join(
                    f"{part} {share:.1%}" for part, share in shares[-1].items() if share >= 0.0005))
        else:
            print("not run: --time-budget left no room for a round")
        out["elapsed_s"] = round(time.monotonic() - STARTED, 1)
        write_json(args.json, out)  # after every accumulation: a run stopped later keeps what it measured
    print(f"\nelapsed {time.monotonic() - STARTED:.0f} s" + (
        f" of a {args.time_budget:g} s budget" if args.time_budget else "")
        + ("; rounds were cut by the time budget" if out["cut_by_time_budget"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
