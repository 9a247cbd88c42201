"""Step cost of acctrain against the trainers its users would pick instead, on the CPU or one CUDA GPU.

    python benchmarks/peers.py                                   # CPU, 3 rounds, accumulation 1 and 4
    python benchmarks/peers.py --device cuda --rounds 3 --time-budget 150 --json out/peers-gpu.json
    python benchmarks/peers.py --model 20m --warmup 3 --k1 3 --k2 13    # the 20M model: fewer, longer steps
    python benchmarks/peers.py --one acctrain --device cpu       # one framework, one process (what the driver runs)

The same workload as `../shared/peers-bench/one.py` (whose CPU figures BENCHMARKS.md section 6 quotes): a tiny
MLP (64 -> 128 -> 1, micro-batch 32; `--model 20m`: 1024 -> 5 x 2048 -> 1, 18.9M parameters, micro-batch 16;
`--model 100m`: 1024 -> 7 x 4096 -> 1, 105M, micro-batch 16), accumulation A, AdamW lr 1e-3, clip 1.0, constant
lr, one CPU thread,
per-sample dicts from a map-style Dataset through a DataLoader (the Engine's own loader for acctrain),
TensorBoard on for acctrain with one.py's settings. Frameworks: raw (a plain PyTorch loop), raw_b (the same
loop again: the A/A control, whose ratio to raw is the noise floor), fabric (Lightning Fabric, hand loop with
`no_backward_sync`), hf_trainer, lightning (Trainer), accelerate (the documented `accumulate()` loop), acctrain
(Engine.fit). On CUDA every framework puts the model and batches on cuda:0 its own way (the raw loop copies
each batch with `.to(device)`), in fp32.

Method: one process per framework and round (processes alternate, round r starting at framework r); in it,
per accumulation, `--warmup` steps untimed (10; first-call costs, CUDA's start-up), then K1, then K2 steps, each with fresh
objects, and the times of the two training calls; per-step cost = (T(K2) - T(K1)) / (K2 - K1), so set-up, start-up and an
end-of-run save cancel. Reported: the median ms per optimizer step over rounds (min..max), the cost over
the raw loop, and the paired ratio to acctrain. With only the K2 - K1 difference timed, a tiny model on a
GPU measures each framework's host overhead per step (kernel launches are asynchronous; nothing here waits
for the GPU inside the step except what the framework itself does).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

FRAMEWORKS = ["raw", "raw_b", "fabric", "hf_trainer", "lightning", "accelerate", "acctrain"]
MODELS = {  # name -> (layer widths, micro-batch): ReLU MLPs regressing one value
    "tiny": ([64, 128, 1], 32),  # 8.4K parameters: the step is all framework overhead
    "20m": ([1024] + [2048] * 5 + [1], 16),  # 18.9M
    "100m": ([1024] + [4096] * 7 + [1], 16),  # 105.0M
}


def one(fw: str, k: int, a: int, device: str, model: str = "tiny") -> float:
    """Train k optimizer steps with framework fw; the seconds of the training call alone."""
    import contextlib
    import io
    import logging
    import shutil
    import tempfile
    import warnings

    import torch
    from torch import nn

    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    torch.set_num_threads(1)
    cuda = device == "cuda"
    widths, MB = MODELS[model]
    torch.manual_seed(0)
    X, Y = torch.randn(MB * a * k, widths[0]), torch.randn(MB * a * k, 1)

    def mlp():
        torch.manual_seed(0)
        layers = [m for w_in, w_out in zip(widths, widths[1:]) for m in (nn.Linear(w_in, w_out), nn.ReLU())]
        return nn.Sequential(*layers[:-1])

    class DS(torch.utils.data.Dataset):
        def __len__(self):
            return len(X)

        def __getitem__(self, i):
            return {"x": X[i], "labels": Y[i]}

    def loss_of(model, b):
        return nn.functional.mse_loss(model(b["x"]), b["labels"])

    def loader():
        return torch.utils.data.DataLoader(DS(), batch_size=MB, shuffle=False)

    def done():
        if cuda:
            torch.cuda.synchronize()  # host-device sync: the clock stops when the GPU has finished the steps
        return time.perf_counter()

    out = tempfile.mkdtemp()
    if fw in ("raw", "raw_b"):
        dev = torch.device(device)
        m = mlp().to(dev)
        opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
        t = time.perf_counter()
        it = iter(loader())
        for _ in range(k):
            for _ in range(a):
                b = {n: v.to(dev, non_blocking=True) for n, v in next(it).items()}
                (loss_of(m, b) / a).backward()
            torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        el = done() - t
    elif fw == "accelerate":
        from accelerate import Accelerator

        acc = Accelerator(gradient_accumulation_steps=a, cpu=not cuda)
        m = mlp()
        opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
        m, opt, dl = acc.prepare(m, opt, loader())
        t = time.perf_counter()
        for b in dl:
            with acc.accumulate(m):
                acc.backward(loss_of(m, b))
                if acc.sync_gradients:
                    acc.clip_grad_norm_(m.parameters(), 1.0)
                opt.step()
                opt.zero_grad()
        el = done() - t
    elif fw == "acctrain":
        from acctrain import Engine, TrainConfig

        cfg = TrainConfig(output_dir=out, global_batch_size=MB * a, micro_batch_size=MB, max_steps=k,
                          scheduler="constant", log_every=10**7, resume="none", max_grad_norm=1.0, cpu_threads=1,
                          log_with="tensorboard", cpu=not cuda)
        with contextlib.redirect_stdout(io.StringIO()):
            e = Engine(mlp(), cfg, DS(), loss_fn=loss_of, optimizer=lambda groups: torch.optim.AdamW(groups, lr=1e-3))
            t = time.perf_counter()
            e.fit()
            el = done() - t
            e.close()
    elif fw == "hf_trainer":
        from transformers import Trainer, TrainingArguments

        class M(nn.Module):
            def __init__(s):
                super().__init__()
                s.net = mlp()

            def forward(s, x, labels):
                return {"loss": nn.functional.mse_loss(s.net(x), labels)}

        args = TrainingArguments(output_dir=out, per_device_train_batch_size=MB, gradient_accumulation_steps=a,
                                 max_steps=k, learning_rate=1e-3, lr_scheduler_type="constant", max_grad_norm=1.0,
                                 logging_steps=10**7, save_strategy="no", report_to=[], disable_tqdm=True,
                                 use_cpu=not cuda, dataloader_num_workers=0, weight_decay=0.0)
        tr = Trainer(model=M(), args=args, train_dataset=DS())
        t = time.perf_counter()
        tr.train()
        el = done() - t
    elif fw == "fabric":
        from lightning.fabric import Fabric

        f = Fabric(accelerator="cuda" if cuda else "cpu", devices=1)
        m = mlp()
        opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
        m, opt = f.setup(m, opt)
        dl = f.setup_dataloaders(loader())
        t = time.perf_counter()
        it = iter(dl)
        for _ in range(k):
            for j in range(a):
                with f.no_backward_sync(m, enabled=j < a - 1):
                    f.backward(loss_of(m, next(it)) / a)
            f.clip_gradients(m, opt, max_norm=1.0)
            opt.step()
            opt.zero_grad()
        el = done() - t
    elif fw == "lightning":
        import lightning as L

        class LM(L.LightningModule):
            def __init__(s):
                super().__init__()
                s.net = mlp()

            def training_step(s, b, i):
                return loss_of(s.net, b)

            def configure_optimizers(s):
                return torch.optim.AdamW(s.parameters(), lr=1e-3)

        tr = L.Trainer(max_steps=k, accumulate_grad_batches=a, gradient_clip_val=1.0, logger=False,
                       enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                       accelerator="gpu" if cuda else "cpu", devices=1, default_root_dir=out)
        lm = LM()
        dl = loader()
        t = time.perf_counter()
        tr.fit(lm, dl)
        el = done() - t
    else:
        raise SystemExit(f"unknown framework {fw!r}; one of {FRAMEWORKS}")
    shutil.rmtree(out, ignore_errors=True)
    return el


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--model", choices=list(MODELS), default="tiny")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps before the two timed runs")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--accumulation", type=int, nargs="+", default=[1, 4])
    p.add_argument("--k1", type=int, default=100)
    p.add_argument("--k2", type=int, default=1100)
    p.add_argument("--frameworks", nargs="+", default=FRAMEWORKS)
    p.add_argument("--time-budget", type=float, default=0, help="start a process only if the median process so far "
                   "fits in what is left of this many seconds (0: no limit); rounds cut are reported")
    p.add_argument("--json", help="write the per-round figures here")
    p.add_argument("--one", metavar="FRAMEWORK", help="run one framework at each accumulation: print A, T(K1) and "
                   "T(K2) per line (what the driver starts once per framework and round)")
    args = p.parse_args()
    if args.one:  # one process, one framework: every accumulation, each after an untimed warm-up
        for a in args.accumulation:
            one(args.one, args.warmup, a, args.device, args.model)  # first-call costs in neither length
            t1, t2 = (one(args.one, k, a, args.device, args.model) for k in (args.k1, args.k2))
            print(f"{a} {t1:.6f} {t2:.6f}", flush=True)
        return
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("peers: no CUDA device; nothing measured")
            return
    started, took = time.monotonic(), []
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    per: dict[int, dict[str, list[float]]] = {a: {fw: [] for fw in args.frameworks} for a in args.accumulation}
    cut = 0
    for r in range(args.rounds):
        order = args.frameworks[r % len(args.frameworks):] + args.frameworks[: r % len(args.frameworks)]
        for fw in order:
            left = args.time_budget - (time.monotonic() - started)
            if args.time_budget and took and sorted(took)[len(took) // 2] * 1.5 > left:
                cut += 1
                continue
            t0 = time.monotonic()
            proc = subprocess.run([sys.executable, __file__, "--one", fw, "--device", args.device, "--model", args.model,
                                   "--warmup", str(args.warmup), "--k1", str(args.k1), "--k2", str(args.k2),
                                   "--accumulation", *map(str, args.accumulation)],
                                  capture_output=True, text=True, env=env)
            took.append(time.monotonic() - t0)
            lines = [ln.split() for ln in proc.stdout.splitlines() if len(ln.split()) == 3]
            if proc.returncode or len(lines) != len(args.accumulation):
                print(f"  {fw} failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}", flush=True)
            for a, t1, t2 in lines:
                per[int(a)][fw].append((float(t2) - float(t1)) / (args.k2 - args.k1) * 1e3)
        print(f"  round {r + 1}: " + "; ".join(f"A={a} " + ", ".join(f"{fw} {v[-1]:.3f}" for fw, v in per[a].items()
                                                                      if v) for a in per), flush=True)
    print(f"\npeers on {args.device}, {args.model} model: ms per optimizer step (median over rounds, min..max), cost over raw, "
          f"paired ratio to acctrain; K1={args.k1}, K2={args.k2}; {args.rounds} rounds; "
          f"{time.monotonic() - started:.0f} s" + (f"; {cut} processes cut by the time budget" if cut else ""))
    for a in args.accumulation:
        raw = _median(per[a].get("raw", []))
        print(f"| A={a} | ms/step | min..max | over raw | x acctrain | n |\n|---|---|---|---|---|---|")
        for fw in args.frameworks:
            v = per[a][fw]
            if not v:
                print(f"| {fw} | - | - | - | - | 0 |")
                continue
            pairs = [x / y for x, y in zip(v, per[a].get("acctrain", []))]
            print(f"| {fw} | {_median(v):.3f} | {min(v):.3f}..{max(v):.3f} | {_median(v) - raw:+.3f} | "
                  f"{_median(pairs):.2f} | {len(v)} |" if pairs else f"| {fw} | {_median(v):.3f} | - | - | - | {len(v)} |")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"device": args.device, "model": args.model, "warmup": args.warmup, "k1": args.k1, "k2": args.k2, "rounds": args.rounds, "cut": cut,
                       "ms_per_step": {str(a): per[a] for a in per}}, f, indent=1)


def _median(v: list[float]) -> float:
    s = sorted(v)
    return (s[(len(s) - 1) // 2] + s[len(s) // 2]) / 2 if s else float("nan")


if __name__ == "__main__":
    main()
