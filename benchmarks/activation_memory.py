"""Peak memory of one training step of the embedded byte-level LM on CPU, with and without activation checkpointing.

    python benchmarks/activation_memory.py [--layers 8] [--d-model 256] [--context 512] [--batch 8]

Each variant runs in a fresh process (one thread) and reports, for one forward and backward, the bytes of the
tensors the forward keeps for the backward (counted by a saved-tensors hook; checkpointed blocks keep only their
inputs there), how far the step raised the process's peak resident memory (`ru_maxrss`) above what it held
before (model and batch; gradients included in the step), and the step's time; loss and gradient norm of the two
variants are compared. A CPU measure: on a GPU the activations are the same, read torch.cuda.max_memory_allocated.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time


def one_step(args: argparse.Namespace, checkpointing: bool) -> dict:
    import torch

    from acctrain import memory
    from acctrain.bytelm import ByteLM, ModelConfig, lm_loss

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = ByteLM(ModelConfig(context_len=args.context, d_model=args.d_model, n_layers=args.layers,
                               n_heads=max(1, args.d_model // 64)))
    if checkpointing:
        memory.checkpoint_activations(model)
    ids = torch.randint(0, 256, (args.batch, args.context + 1), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}

    saved = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal saved
        saved += t.numel() * t.element_size()
        return t

    before = _resident_kib()  # model and batch in memory; no gradient yet
    earlier_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # imports may have peaked higher
    start = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):  # what the forward keeps for the backward
        loss_sum, count = lm_loss(model, batch)
    (loss_sum / count).backward()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    norm = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()])))
    return {"checkpointing": checkpointing, "saved_for_backward_mib": saved / 2**20,
            "step_peak_mib": (peak - before) / 1024, "peak_is_the_steps": peak > earlier_peak,
            "step_s": seconds, "loss": float(loss_sum / count), "grad_norm": norm}


def _resident_kib() -> int:
    """This process's resident memory now, in KiB (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() // 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--variant", choices=["plain", "checkpointed"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(one_step(args, args.variant == "checkpointed")))
        return
    shape = ["--layers", str(args.layers), "--d-model", str(args.d_model), "--context", str(args.context),
             "--batch", str(args.batch)]
    results = {}
    for variant in ("plain", "checkpointed"):
        # glibc keeps freed large blocks on its heap once its mmap threshold has grown, so the peak resident
        # memory would count every block's recompute ever made (measured: 446 MiB instead of 160 at 8 layers); a
        # fixed threshold returns them to the system on free, and the peak follows the memory in use
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
        out = subprocess.run([sys.executable, __file__, *shape, "--variant", variant], capture_output=True, text=True,
                             check=True, env=env).stdout
        results[variant] = json.loads(out.strip().splitlines()[-1])
    plain, checkpointed = results["plain"], results["checkpointed"]
    print(json.dumps({"shape": vars(args) | {"variant": None}, **results}, indent=1))
    print(f"kept for the backward: {plain['saved_for_backward_mib']:.0f} MiB -> "
          f"{checkpointed['saved_for_backward_mib']:.0f} MiB; "
          f"one step's peak: {plain['step_peak_mib']:.0f} MiB -> {checkpointed['step_peak_mib']:.0f} MiB "
          f"({checkpointed['step_peak_mib'] / plain['step_peak_mib']:.2f}x), time {plain['step_s']:.2f} s -> "
          f"{checkpointed['step_s']:.2f} s; same loss: {plain['loss'] == checkpointed['loss']}, grad norm "
          f"{plain['grad_norm']:.6g} vs {checkpointed['grad_norm']:.6g}")


if __name__ == "__main__":
    main()
