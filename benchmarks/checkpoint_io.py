"""Checkpoint throughput: acctrain's save and load against raw safetensors on the same tensors.

    python benchmarks/checkpoint_io.py                    # ~537 MB model + AdamW state (1.6 GB), 3 rounds (~3 min)
    python benchmarks/checkpoint_io.py --layers 2 --rounds 5 --json out.json
    python benchmarks/checkpoint_io.py --dir /mnt/nvme/tmp   # the disk to measure (default: the system temp dir)

The model is an MLP of `--layers` Linear(4096, 4096) layers (8: 134M fp32 parameters, 537 MB) with AdamW
state (exp_avg, exp_avg_sq: twice that), created by one optimizer step. Variants, alternating in each round:

- save, acctrain: `Engine.save()` as fit() calls it: RNG state, model.safetensors, optimizer.safetensors and
  .json, trainer_state.json (`checkpoint.write_files`: written, fsync'd, digests computed from memory),
  then `checkpoint.commit` (manifest, fsync of the directory, rename, `latest`). keep_last=0, so no rotation work is timed; the directory is deleted after.
- save, raw: `safetensors.torch.save_file` of the same tensors (model.state_dict(), and the optimizer's
  state tensors under flat names) into two files, then fsync of both.
- load, acctrain: a resume as `fit` makes it (resume=auto): `Checkpointer.find` (the manifest, every file's
  size and digest), then `Checkpointer.load` (plan and settings checked, weights and optimizer state loaded).
- load, raw: a hand-written resume: `load_state_dict` of `safetensors.torch.load_file` of the raw save's two
  files into the model and the optimizer.
Both loads end by reading a value of every page of the live model and optimizer state, so every byte is
really read: `load_file` maps the file and reads nothing until a tensor is touched, and the optimizer adopts
the tensors it is given. Loads run
"cold" (every file evicted from the page cache with posix_fadvise(DONTNEED) first) and "hot" (files in the
page cache). Throughput is the bytes of the tensors (the same for both) per second. Each part runs a second
raw variant as an A/A control (its ratio to the first shows the noise floor), and the async part a second
synchronous save.

Before each timed save the previous files are deleted, `os.sync()` is called and `--settle` seconds
pass (untimed), so that their writeback and the file system's discards do not land in the next timing.
Every acctrain checkpoint is verified after its timing (untimed): its manifest's digests are its files'.

If `TrainConfig` has an `async_save` field, a third part times the training pause of `Engine.save()`
with async_save=true (the call's duration) against a synchronous save, and separately the time until the
writer has copied the parameters and optimizer state (`wait_copied`: what the next optimizer step waits for
at most, if it came at once) and until the checkpoint directory is complete; otherwise it is skipped with a note. The snapshot's CPU buffers are
kept from save to save; the Engine allocates them in a background thread after the first optimizer step
(timed here on its own), and a save that comes before they are ready waits for them, so the first save
is reported apart, with and without them.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from _common import WAIT_HELP, alternate, begin, cpu_busy, loadavg, median, paired_ratios, spread, table, write_json

WIDTH = 4096  # --width sets it (the growth table's smaller checkpoints)


def build(layers: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(WIDTH, WIDTH) for _ in range(layers)])


def make_engine(model: nn.Module, output_dir: Path, optimizer=None, **extra):
    from acctrain import Engine, TrainConfig

    config = TrainConfig(output_dir=str(output_dir), global_batch_size=1, micro_batch_size=1, max_steps=1,
                         **{"keep_last": 0, "resume": "none", **extra})
    with contextlib.redirect_stdout(io.StringIO()):
        return Engine(model, config, [torch.zeros(WIDTH)], loss_fn=lambda m, b: m(b).square().mean(),
                      optimizer=optimizer)


def adam_state(engine) -> None:
    """One AdamW step on constant gradients: exp_avg and exp_avg_sq for every parameter."""
    for p in engine.unwrapped_model.parameters():
        p.grad = torch.full_like(p, 1e-3)
    engine.torch_optimizer.step()
    engine.torch_optimizer.zero_grad(set_to_none=True)


def evict(directory: Path) -> None:
    """Drop a directory's files from the page cache (clean pages only: they were fsync'd)."""
    for path in directory.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Bench:
    def __init__(self, engine, root: Path, settle_s: float):
        from acctrain import checkpoint

        self.engine, self.root, self.ckpt, self.settle_s = engine, root, checkpoint, settle_s
        self.raw_dir = root / "raw"
        self.saves = 0
        self.last_acctrain: Path | None = None
        opt = self.optimizer_tensors()
        tensors = [*engine.unwrapped_model.state_dict().values(), *opt.values()]
        self.bytes = sum(t.numel() * t.element_size() for t in tensors)

    def optimizer_tensors(self) -> dict[str, torch.Tensor]:
        state = self.engine.torch_optimizer.state_dict()["state"]
        return {f"state.{i}.{k}": v for i, s in state.items() for k, v in s.items() if torch.is_tensor(v)}

    # ---------------------------------------------------------------------------------- saves

    def save_acctrain(self, engine=None) -> float:
        engine = engine or self.engine
        self._clear()
        self.saves += 1
        engine.state.step = self.saves  # a new step directory each time (save() skips an existing one)
        start = self.save_started = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            engine.save()
        seconds = time.perf_counter() - start
        self.last_acctrain = self.ckpt.checkpoint_dir(engine.config.output_dir, engine.state.step)
        if not engine.config.async_save:
            self.ckpt.verify(self.last_acctrain)  # untimed: the manifest's digests are the files' own
        return seconds

    def save_raw(self) -> float:
        self._clear_raw()
        self.raw_dir.mkdir()
        start = time.perf_counter()
        model = self.engine.unwrapped_model.state_dict()
        save_file(model, self.raw_dir / "model.safetensors", metadata={"format": "pt"})
        save_file(self.optimizer_tensors(), self.raw_dir / "optimizer.safetensors", metadata={"format": "pt"})
        for name in ("model.safetensors", "optimizer.safetensors"):
            fsync(self.raw_dir / name)
        return time.perf_counter() - start

    def _clear(self) -> None:
        for d in self.root.glob("run*/checkpoints"):
            shutil.rmtree(d, ignore_errors=True)
        self._settle()

    def _settle(self) -> None:
        os.sync()  # untimed: the deletion's writeback (and ext4 discards) must not land in the next timing
        time.sleep(self.settle_s)

    def _clear_raw(self) -> None:
        shutil.rmtree(self.raw_dir, ignore_errors=True)
        self._settle()

    # ---------------------------------------------------------------------------------- loads

    def load_acctrain(self, cold: bool, resumer) -> float:
        """A resume as `fit` makes it (resume=auto): `Checkpointer.find` (verifies every file), then `load`."""
        newest = self.ckpt.latest_checkpoint(resumer.config.output_dir)
        if cold:
            evict(newest)
        plan = {**resumer.plan.describe(), "seed": resumer.plan.seed}
        start = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            found = resumer.checkpointer.find()
            resumer.checkpointer.load(found, resumer.model, resumer.torch_optimizer, plan, resumer.settings)
        self.touch()
        seconds = time.perf_counter() - start
        assert found == newest, (found, newest)
        return seconds

    def load_raw(self, cold: bool) -> float:
        """A hand-written resume from safetensors: the same application to the model and optimizer."""
        if cold:
            evict(self.raw_dir)
        start = time.perf_counter()
        self.engine.unwrapped_model.load_state_dict(load_file(self.raw_dir / "model.safetensors"))
        state: dict[int, dict[str, torch.Tensor]] = {}
        for key, tensor in load_file(self.raw_dir / "optimizer.safetensors").items():
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = tensor
        groups = self.engine.torch_optimizer.state_dict()["param_groups"]
        self.engine.torch_optimizer.load_state_dict({"state": state, "param_groups": groups})
        self.touch()
        return time.perf_counter() - start

    @torch.no_grad()
    def touch(self) -> None:
        """Read a value of every 4 KiB page of the live model and optimizer state: safetensors maps files and reads
        nothing until a tensor is touched, and the optimizer adopts the loaded tensors; this makes every load read."""
        for tensor in [*self.engine.unwrapped_model.state_dict().values(), *self.optimizer_tensors().values()]:
            tensor.reshape(-1)[::1024].sum()


def throughput_rows(results, nbytes, pairs) -> list[list[str]]:
    rows = []
    for name, ref in pairs:
        mbs = [nbytes / s / 1e6 for s in results[name]]
        ratio = paired_ratios({k: [1 / s for s in v] for k, v in results.items()}, name, ref)  # throughput ratio
        rows.append([name, f"{median(results[name]):.2f}", f"{median(mbs):.0f}",
                     f"{median(ratio):.3f} ({spread(ratio)})" if name != ref else "1 (reference)"])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=8, help="Linear(4096, 4096) layers (8: 134M parameters)")
    parser.add_argument("--width", type=int, default=4096, help="the layers' width (1 layer of 2896: a 0.1 GB "
                        "checkpoint with the AdamW state; 3 of 3740: 0.5 GB; 8 of 4096, the default: 1.6 GB)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", default=None, help="a directory on the disk to measure (default: tempfile's)")
    parser.add_argument("--wait-quiet", type=float, default=0, help=WAIT_HELP)
    parser.add_argument("--settle", type=float, default=2.0,
                        help="seconds to wait (untimed) after deleting the previous files and os.sync(), before a save")
    parser.add_argument("--parts", nargs="+", default=["save", "load", "async"], choices=["save", "load", "async"])
    parser.add_argument("--json", help="write all results to this JSON file")
    args = parser.parse_args()
    global WIDTH
    WIDTH = args.width

    info = begin(args.wait_quiet)
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    root = Path(tempfile.mkdtemp(prefix="acctrain-ckpt-bench-", dir=args.dir))
    print(f"directory: {root}; CPU busy before: {cpu_busy():.0%}")
    started = time.perf_counter()
    out = {"machine": info, "dir": str(root)}
    try:
        model = build(args.layers)
        engine = make_engine(model, root / "run-sync")
        adam_state(engine)
        bench = Bench(engine, root, args.settle)
        params = sum(p.numel() for p in model.parameters())
        print(f"model: {params / 1e6:.1f}M fp32 parameters; tensors saved: {bench.bytes / 1e9:.2f} GB "
              f"(weights + AdamW state); {args.rounds} rounds")

        if "save" in args.parts:
            save_part(bench, args, out)
        if "load" in args.parts:
            load_part(bench, args, out)
        if "async" in args.parts:
            out["async"] = async_save(bench, model, root, args.rounds)
        out["hash_mb_s"] = hash_speeds()
        out["bytes"], out["params"] = bench.bytes, params
    finally:
        shutil.rmtree(root, ignore_errors=True)
    info["loadavg_after"] = loadavg()
    print(f"\ndone in {time.perf_counter() - started:.0f} s; load average after: {info['loadavg_after']}")
    write_json(args.json, out)


def save_part(bench: Bench, args, out: dict) -> None:
    print("\nsave (durable: fsync)")
    variants = {"acctrain save": bench.save_acctrain, "raw save_file+fsync": bench.save_raw,
                "raw save_file+fsync (A/A)": bench.save_raw}
    saves = alternate(variants, args.rounds)
    rows = throughput_rows(saves, bench.bytes, [("raw save_file+fsync", "raw save_file+fsync")]
                           + [(name, "raw save_file+fsync") for name in variants if name != "raw save_file+fsync"])
    print(table(["variant", "seconds (median)", "MB/s", "throughput ratio vs raw"], rows))
    out["save_seconds"] = saves


def load_part(bench: Bench, args, out: dict) -> None:
    if not bench.raw_dir.is_dir():
        bench.save_raw()
    resumer = make_engine(bench.engine.unwrapped_model, bench.root / "load", optimizer=bench.engine.torch_optimizer,
                          resume="auto")
    with contextlib.redirect_stdout(io.StringIO()):  # untimed: the checkpoint to load
        resumer.save()
    print("\nload (cold: evicted from the page cache first; hot: cached)")
    loads = alternate({
        "acctrain load, cold": lambda: bench.load_acctrain(True, resumer),
        "raw load_file, cold": lambda: bench.load_raw(cold=True),
        "acctrain load, hot": lambda: bench.load_acctrain(False, resumer),
        "raw load_file, hot": lambda: bench.load_raw(cold=False),
        "raw load_file, cold (A/A)": lambda: bench.load_raw(cold=True),
        "raw load_file, hot (A/A)": lambda: bench.load_raw(cold=False),
    }, args.rounds)
    rows = throughput_rows(loads, bench.bytes, [
        ("raw load_file, cold", "raw load_file, cold"), ("acctrain load, cold", "raw load_file, cold"),
        ("raw load_file, cold (A/A)", "raw load_file, cold"),
        ("raw load_file, hot", "raw load_file, hot"), ("acctrain load, hot", "raw load_file, hot"),
        ("raw load_file, hot (A/A)", "raw load_file, hot")])
    print(table(["variant", "seconds (median)", "MB/s", "throughput ratio vs raw"], rows))
    out["load_seconds"] = loads


def hash_speeds(mb: int = 512) -> dict[str, float]:
    """MB/s of the checksums a manifest could use, on an in-memory buffer (what verify and commit pay per byte):
    one thread, and two threads hashing one half each (every candidate releases the GIL). Median of 5."""
    import hashlib
    import statistics
    import threading
    import zlib

    import xxhash

    data = memoryview(torch.randint(0, 256, (mb << 20,), dtype=torch.uint8).numpy())
    halves = [data[: len(data) // 2], data[len(data) // 2:]]
    candidates = {"sha256": lambda b: hashlib.sha256(b).digest(), "blake2b": lambda b: hashlib.blake2b(b).digest(),
                  "zlib.crc32": zlib.crc32, "xxh3_128 (xxhash)": xxhash.xxh3_128_digest}
    with contextlib.suppress(ImportError):  # not a dependency: measured when installed
        import blake3

        candidates["blake3"] = lambda b: blake3.blake3(b).digest()

    def timed(run) -> float:
        seconds = []
        for _ in range(5):
            start = time.perf_counter()
            run()
            seconds.append(time.perf_counter() - start)
        return mb / statistics.median(seconds)

    def two_threads(fn):
        def run():
            threads = [threading.Thread(target=fn, args=(half,)) for half in halves]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        return run

    speeds = {}
    for name, fn in candidates.items():
        speeds[name] = timed(lambda: fn(data))
        speeds[f"{name}, 2 threads (aggregate)"] = timed(two_threads(fn))
    if "blake3" in candidates:
        speeds["blake3, max_threads=2 (its own threads)"] = timed(lambda: blake3.blake3(data, max_threads=2).digest())
    print(f"\nchecksum throughput on {mb} MB in memory (MB/s, median of 5)")
    print(table(["checksum", "MB/s"], [[k, f"{v:.0f}"] for k, v in speeds.items()]))
    return speeds


def async_save(bench: Bench, model: nn.Module, root: Path, rounds: int) -> dict:
    """The training pause of an async save against a synchronous one, if the Engine has async_save."""
    from acctrain import TrainConfig

    if "async_save" not in {f.name for f in dataclasses.fields(TrainConfig)}:
        print("\nasync save: skipped, TrainConfig has no `async_save` field in this version of acctrain")
        return {"skipped": "TrainConfig has no async_save field"}
    engine = make_engine(model, root / "run-async", optimizer=bench.engine.torch_optimizer, async_save=True)
    completion: list[float] = []
    copied: list[float] = []

    def pause() -> float:
        seconds = bench.save_acctrain(engine)  # returns once training could continue
        start = bench.save_started
        engine.checkpointer.wait_copied()  # what an optimizer step coming at once would wait for
        copied.append(time.perf_counter() - start)
        final = bench.ckpt.checkpoint_dir(engine.config.output_dir, engine.state.step)
        while not final.is_dir():  # complete: the step directory exists only after commit
            if time.perf_counter() - start > 600:
                raise TimeoutError(f"{final} did not appear within 600 s")
            time.sleep(0.01)
        completion.append(time.perf_counter() - start)
        engine.checkpointer.wait()  # the writer thread's last steps after the rename (rotation), untimed
        bench.ckpt.verify(final)  # untimed
        return seconds

    print("\nasync save: the training pause (Engine.save() returning) against a synchronous save")
    # A run's first async save: without buffers (as when it comes right after the first step), then as fit()
    # runs it, with the buffers that the Engine reserves in the background after the first step.
    unreserved = pause()
    completion.pop(), copied.pop()
    engine.close()
    engine = make_engine(model, root / "run-async2", optimizer=bench.engine.torch_optimizer, async_save=True)
    engine.state.schedule_step = 1  # as after the first applied optimizer step (adam_state made the state)
    start = time.perf_counter()
    engine.checkpointer.reserve(engine.model, engine.torch_optimizer)  # what fit() calls after the first step
    engine.checkpointer.writer.reservation.join()
    reserving = time.perf_counter() - start
    first = pause()
    first_completion, _ = completion.pop(), copied.pop()
    results = alternate({"sync save": bench.save_acctrain, "async save pause": pause,
                         "sync save (A/A)": bench.save_acctrain}, rounds)
    ratio = paired_ratios(results, "async save pause", "sync save")
    aa = paired_ratios(results, "sync save (A/A)", "sync save")
    sync = median(results["sync save"])
    rows = [["sync save", f"{sync:.2f}", "1 (reference)"],
            ["sync save (A/A)", f"{median(results['sync save (A/A)']):.2f}", f"{median(aa):.3f} ({spread(aa)})"],
            ["async save: pause (buffers from the previous save)", f"{median(results['async save pause']):.3f}",
             f"{median(ratio):.3f} ({spread(ratio)})"],
            ["async save: pause, the run's first (buffers reserved in the background)", f"{first:.3f}",
             f"{first / sync:.3f}"],
            ["  the reservation, in a background thread after the first step", f"{reserving:.3f}",
             f"{reserving / sync:.3f}"],
            ["async save: pause, the first without reserved buffers (saved right after step 1)",
             f"{unreserved:.3f}", f"{unreserved / sync:.3f}"],
            ["async save: until the parameters and optimizer state are copied (the longest an optimizer step "
             "right after the save waits)", f"{median(copied):.3f}", f"{median(copied) / sync:.3f}"],
            ["async save: until complete", f"{median(completion):.2f}", f"{median(completion) / sync:.3f}"]]
    print(table(["variant", "seconds (median)", "vs sync save"], rows))
    with contextlib.redirect_stdout(io.StringIO()):
        engine.close()
    return {"seconds": results, "completion_seconds": completion, "copied_seconds": copied, "first_pause": first,
            "first_completion": first_completion, "reservation_seconds": reserving, "unreserved_first_pause": unreserved}


if __name__ == "__main__":
    sys.exit(main())
