"""What a checkpoint holds of a run, and how a run continues from one.

    persist.save(engine)              # all ranks: model, optimizer, RNG, schedule, loop state -> step-N/
    engine.resumed_from = persist.resume(engine)   # per config.resume: auto, none, or a path

The files and their crash-safe commit are acctrain.checkpoint's; the FSDP shards acctrain.sharded's.
Here: which state goes into which file, and the checks on the way back (a verified checkpoint, a model
that fits, the same global batch plan), so that a resumed run continues exactly.
"""

from __future__ import annotations

import math
import mmap
import threading
import time
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import broadcast_object_list

from acctrain import checkpoint, sharded
from acctrain.errors import ConfigError
from acctrain.state import jsonable, optimizer_from_files, optimizer_to_files, rng_to_files


def save(engine) -> None:
    """Write checkpoint `step-{step}`: every rank writes its part, the main process commits it.

    With `async_save`, the tensors are copied to CPU buffers here (the only pause of training; the buffers
    are kept for the next save) and a background thread writes and commits them; each rank marks its part
    done with a file, so the commit needs no collective. Crash safety is the same: nothing is named
    `step-N` before it is complete.
    """
    acc, cfg, step = engine.accelerator, engine.config, engine.state.step
    wait_for_save(engine)  # one save at a time, in order
    if checkpoint.checkpoint_dir(cfg.output_dir, step).is_dir():  # e.g. resumed at the end: nothing new
        return
    stage = checkpoint.staging_dir(cfg.output_dir, step)
    if acc.is_main_process:
        checkpoint.prepare_staging(stage)
    acc.wait_for_everyone()
    if sharded.is_fsdp(acc):  # every rank writes its own shards, synchronously; loadable at any world size
        sharded.save_sharded(acc, engine.model, engine._torch_optimizer, stage)
    files = _files(engine)
    engine.checkpoint_path = checkpoint.checkpoint_dir(cfg.output_dir, step)
    if cfg.async_save:
        if engine._reservation is not None:  # buffers allocated in the background since the first step
            engine._reservation.join()
            engine._staging_buffers.update(engine._reservation.buffers)
            engine._reservation = None
        files = _snapshot(files, engine._staging_buffers)
        engine._save_thread = _Writer(files, stage, acc.process_index, acc.num_processes, acc.is_main_process, cfg)
        engine._save_thread.start()
        return
    digests = checkpoint.write_files(files)
    acc.wait_for_everyone()
    if acc.is_main_process:
        _commit(stage, digests, cfg)
    acc.wait_for_everyone()


def wait_for_save(engine, raise_error: bool = True) -> None:
    """Block until a background save has committed; re-raise its error if it failed (else print it)."""
    thread = getattr(engine, "_save_thread", None)
    if thread is not None:
        thread.join()
        engine._save_thread = None
        if thread.error is not None and raise_error:
            raise thread.error
        if thread.error is not None:
            engine.print(f"warning: the background save to {thread.stage} failed: {thread.error!r}")


def _files(engine) -> dict[Path, Any]:
    """This rank's files of the checkpoint: path -> tensors (safetensors) or plain data (JSON)."""
    acc, stage = engine.accelerator, checkpoint.staging_dir(engine.config.output_dir, engine.state.step)
    rank = acc.process_index
    rng_tensors, rng_meta = rng_to_files()
    files: dict[Path, Any] = {stage / f"rng-rank{rank}.safetensors": rng_tensors, stage / f"rng-rank{rank}.json": rng_meta}
    if acc.is_main_process:
        if not sharded.is_fsdp(acc):  # DDP: every rank holds the same weights and optimizer state
            opt_tensors, opt_meta = optimizer_to_files(engine._torch_optimizer.state_dict())
            files[stage / "model.safetensors"] = engine.unwrapped_model.state_dict()
            files[stage / "optimizer.safetensors"] = opt_tensors
            files[stage / "optimizer.json"] = opt_meta
        files[stage / "trainer_state.json"] = trainer_state(engine)
    return files


def _snapshot(files: dict[Path, Any], buffers: dict[tuple[str, str], torch.Tensor]) -> dict[Path, Any]:
    """This moment's content of `files`, for a background writer: tensors copied to CPU buffers, JSON as bytes.

    The buffers are kept for the next save (`buffers` is updated in place): copying into memory that is
    already mapped is 3x faster than into fresh memory, which takes a page fault per 4 KiB. CUDA tensors
    are copied to pageable memory, blocking: torch's pinned allocator would round each buffer up to a
    power of two and keep it pinned for the run.
    """
    used: dict[tuple[str, str], torch.Tensor] = {}
    snapshot = {}
    for path, content in files.items():
        if path.suffix != ".safetensors":  # callbacks' and the loop's state may change after this returns
            snapshot[path] = checkpoint.encode_json(content)
            continue
        snapshot[path] = {}
        for name, tensor in content.items():
            buffer = buffers.get((path.name, name))
            if buffer is None or buffer.shape != tensor.shape or buffer.dtype != tensor.dtype:
                buffer = torch.empty(tensor.shape, dtype=tensor.dtype)
            snapshot[path][name] = used[(path.name, name)] = buffer.copy_(tensor.detach())
    buffers.clear()
    buffers.update(used)
    return snapshot


def reserve_snapshot_buffers(engine) -> None:
    """async_save: allocate the snapshot's CPU buffers in a background thread, ahead of the first save.

    The Engine calls it after every optimizer step when `async_save` is on; it acts once, after the first
    applied step (the optimizer's state exists then). Fresh memory costs a page fault per 4 KiB when first written, which made the first save's
    pause as long as a synchronous save; mapped here, off the training thread, the first save only copies.
    """
    if engine._staging_buffers or engine._reservation is not None:
        return
    if engine.state.schedule_step == 0:  # no step applied yet (e.g. fp16 overflows): no optimizer state
        return
    layout = {(path.name, name): (tuple(t.shape), t.dtype)
              for path, content in _files(engine).items() if path.suffix == ".safetensors"
              for name, t in content.items()}
    engine._reservation = _Reservation(layout)
    engine._reservation.start()


class _Reservation(threading.Thread):
    def __init__(self, layout: dict[tuple[str, str], tuple]):
        super().__init__(name="acctrain-reserve", daemon=True)
        self.layout, self.buffers = layout, {}

    def run(self) -> None:
        try:
            for key, (shape, dtype) in self.layout.items():
                self.buffers[key] = _mapped(shape, dtype)
        except (OSError, ValueError, RuntimeError, MemoryError):  # out of memory, say: the save allocates
            pass  # what is missing itself, as without a reservation


def _mapped(shape: tuple, dtype: torch.dtype) -> torch.Tensor:
    """An empty CPU tensor whose pages are already mapped."""
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if nbytes < 1 << 20 or not hasattr(mmap, "MAP_POPULATE"):  # Linux only; small ones fault in quickly
        return torch.empty(shape, dtype=dtype)
    # MAP_POPULATE: the kernel maps every page in the call, which releases the GIL
    memory = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | mmap.MAP_POPULATE)
    if hasattr(mmap, "MADV_DONTFORK"):  # forked DataLoader workers would share it copy-on-write
        memory.madvise(mmap.MADV_DONTFORK)
    return torch.frombuffer(memory, dtype=torch.uint8).view(dtype).view(shape)


def _commit(stage: Path, digests: dict[Path, str], cfg) -> None:
    checkpoint.commit(stage, digests)
    checkpoint.rotate(cfg.output_dir, cfg.keep_last, cfg.keep_best, cfg.keep_best_mode)


class _Writer(threading.Thread):
    """Writes one rank's part of a checkpoint in the background; the main rank's also commits it."""

    def __init__(self, files, stage: Path, rank: int, world: int, is_main: bool, cfg):
        super().__init__(name="acctrain-save", daemon=False)
        self.files, self.stage, self.cfg = files, stage, cfg
        self.rank, self.world, self.is_main = rank, world, is_main
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            digests = checkpoint.write_files(self.files)
            (self.stage / f".done-rank{self.rank}").touch()
            if self.is_main:
                markers = [self.stage / f".done-rank{r}" for r in range(self.world)]
                deadline = time.monotonic() + 3600
                while not all(m.exists() for m in markers):  # the other ranks' parts, written by their threads
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"{self.stage}: other ranks did not finish their part within an hour")
                    time.sleep(0.02)
                for marker in markers:
                    marker.unlink()
                _commit(self.stage, digests, self.cfg)
        except BaseException as err:  # surfaced by wait_for_save, in the training thread
            self.error = err


def trainer_state(engine) -> dict[str, Any]:
    """Everything of the loop that a resume needs, as JSON."""
    import accelerate

    import acctrain

    plan = engine.plan
    return {
        "state": asdict(engine.state),
        "epoch": engine.state.step // plan.steps_per_epoch,
        "plan": {**plan.describe(), "seed": plan.seed},
        "config": engine.config.to_dict(),
        "versions": {"acctrain": acctrain.__version__, "torch": torch.__version__, "accelerate": accelerate.__version__},
        "schedule": engine.schedule.state_dict(),
        "lr_scheduler": jsonable(engine.lr_scheduler.state_dict()) if engine.lr_scheduler is not None else None,
        "scaler": jsonable(engine.step_ops.scaler.state_dict()) if engine.step_ops.scaler is not None else None,
        "callbacks": [{"class": type(cb).__name__, "state": cb.state_dict()} for cb in engine.callbacks.items],
        "metrics": dict(engine.last_eval) if engine._eval_step == engine.state.step else {},
    }

def resume(engine) -> Path | None:
    """Load the checkpoint that `config.resume` selects (or none); every rank loads the same one."""
    cfg, acc = engine.config, engine.accelerator
    if cfg.resume == "none":
        if checkpoint.has_checkpoints(cfg.output_dir) and not cfg.overwrite:
            raise ConfigError("resume", f"{cfg.output_dir} already holds checkpoints; use resume=auto to continue "
                              "that run, or overwrite=true to delete them and start afresh.")
        return None
    choice: list[Any] = [None]
    if acc.is_main_process:  # verifying reads every byte: once, then shared with the other ranks
        try:
            if cfg.resume == "auto":
                path, skipped = checkpoint.find_resumable(cfg.output_dir)
                for message in skipped:
                    warnings.warn(message)
                    engine.print(f"warning: {message}")
            else:
                path = Path(cfg.resume)
                checkpoint.verify(path)
            choice = [str(path) if path else None]
        except checkpoint.CheckpointError as err:
            choice = [err]
    choice = broadcast_object_list(choice) if acc.num_processes > 1 else choice
    if isinstance(choice[0], Exception):
        raise choice[0]
    if choice[0] is None:
        return None
    path = Path(choice[0])
    _load(engine, path)
    engine.print(f"resumed from {path} at optimizer step {engine.state.step}")
    return path

def _load(engine, path: Path) -> None:
    meta = checkpoint.read_json(path / "trainer_state.json")
    _check_plan(engine, meta["plan"])
    if sharded.is_sharded_checkpoint(path) != sharded.is_fsdp(engine.accelerator):
        kind = "sharded (FSDP)" if sharded.is_sharded_checkpoint(path) else "a full (DDP) checkpoint"
        raise checkpoint.CheckpointError(
            f"{path} is {kind} but this run {'uses' if sharded.is_fsdp(engine.accelerator) else 'does not use'} "
            "FSDP; resume with the same fsdp setting, or `acctrain export` the weights and start afresh."
        )
    if sharded.is_fsdp(engine.accelerator):
        sharded.load_sharded(engine.accelerator, engine.model, engine._torch_optimizer, path)
    else:
        load_model_state(engine.unwrapped_model, checkpoint.read_tensors(path / "model.safetensors"), path)
        optimizer_state = optimizer_from_files(
            checkpoint.read_tensors(path / "optimizer.safetensors"), checkpoint.read_json(path / "optimizer.json")
        )
        engine._torch_optimizer.load_state_dict(optimizer_state)
    engine.state = type(engine.state)(**meta["state"])
    saved = meta["schedule"]
    if saved == {**saved, **engine.schedule.state_dict(), "state": saved.get("state")}:
        engine.schedule.load_state_dict(saved)
    elif saved.get("name") == engine.schedule.name:
        engine.schedule.state = dict(saved.get("state", {}))  # the config's parameters, the saved counters
    if engine.lr_scheduler is not None and meta["lr_scheduler"]:
        engine.lr_scheduler.load_state_dict({**engine.lr_scheduler.state_dict(), **meta["lr_scheduler"]})
    if engine.step_ops.scaler is not None and meta["scaler"]:
        engine.step_ops.scaler.load_state_dict(meta["scaler"])
    for cb, saved_cb in zip(engine.callbacks.items, meta["callbacks"]):
        if type(cb).__name__ == saved_cb["class"]:
            cb.load_state_dict(saved_cb["state"])
    rank = engine.accelerator.process_index
    rng = path / f"rng-rank{rank}.safetensors"
    # Restored right before training resumes (fit), so nothing in between draws from it.
    engine._restored_rng = (checkpoint.read_tensors(rng), checkpoint.read_json(rng.with_suffix(".json"))) if rng.is_file() else None

def _check_plan(engine, saved: dict[str, Any]) -> None:
    """Refuse a resume that would change which samples each optimizer step sees, unless allowed."""
    now = {**engine.plan.describe(), "seed": engine.plan.seed}
    keys = ("global_batch", "dataset_len", "seed")
    diff = [f"{k}: {saved.get(k)} -> {now[k]}" for k in keys if saved.get(k) != now[k]]
    if diff and not engine.config.allow_plan_change:
        raise ConfigError("resume", "the checkpoint's run plan differs from this run's (" + "; ".join(diff) + "); "
                          "restore those settings, or set allow_plan_change=true to continue at the same step anyway.")
    if saved.get("world_size") != now["world_size"]:
        engine.print(
            f"resuming on {now['world_size']} processes (checkpoint: {saved.get('world_size')}); "
            f"accumulation {saved.get('accumulation')} -> {now['accumulation']}, same global samples per step",
        )


def load_model_state(model: torch.nn.Module, saved: dict[str, torch.Tensor], source: Any = "checkpoint") -> None:
    """Load weights strictly; a mismatch lists every missing, unexpected and differently shaped key."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(saved))
    unexpected = sorted(set(saved) - set(expected))
    shapes = sorted(f"{k}: checkpoint {tuple(saved[k].shape)}, model {tuple(expected[k].shape)}"
                    for k in set(saved) & set(expected) if saved[k].shape != expected[k].shape)
    if missing or unexpected or shapes:
        raise checkpoint.CheckpointError(
            f"{source} does not fit the model:\n  missing keys: {missing}\n  unexpected keys: {unexpected}"
            f"\n  shape mismatches: {shapes}"
        )
    model.load_state_dict(saved, strict=True)
