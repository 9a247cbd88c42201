"""A run's checkpoints, given its state: save, find, verify and load, never reading or writing the trainer.

    checkpointer = Checkpointer(accelerator, lambda: config)  # the run's config as it is at each call
    checkpointer.save(step, model, optimizer, meta)   # all ranks: weights, optimizer, this rank's RNG, meta
    checkpointer.wait()                               # a background save (async_save) has committed
    path = checkpointer.find()                        # per config.resume: auto, none, or a path (verified)
    meta, rng = checkpointer.load(path, model, optimizer, plan)   # weights and optimizer in place; the rest returned

`meta` is the JSON the run's parts made with their `state_dict()` (the Engine's `state_dict`: counters,
schedule, callbacks, loss scaler, config); it is written as `trainer_state.json` and handed back on load,
with this rank's RNG state, for the parts to load themselves. Tensors in callbacks' state go to
`callbacks.safetensors` (JSON holds a placeholder) and come back as tensors. The checkpointer adds what it
checks on load: `versions` (acctrain, torch, accelerate) and `optimizer` (its class, each param group's
parameter shapes); the format version is in the manifest (acctrain.checkpoint).

An existing `step-N` is kept only when this run resumed from exactly it (verified when loaded, nothing
trained since: e.g. a rerun of a finished run). Anything else holding that name is replaced, crash-safely:
a damaged checkpoint, a stray file, the checkpoint of a trajectory this run rolled back (resume=PATH to an
older one), an earlier save of this run at the same step. A write that fails (full disk, no permission)
raises a CheckpointError naming the checkpoint and its directory; the previous checkpoints are untouched.

The files and their crash-safe commit are acctrain.checkpoint's, the FSDP shards acctrain.checkpoint.sharded's, the
background write acctrain.checkpoint.async_save's.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Callable

import torch
from accelerate import Accelerator

from acctrain import agreement, barrier, checkpoint, data_identity
from acctrain.checkpoint import format as checkpoint_format, sharded
from acctrain.checkpoint.async_save import AsyncWriter, PartFailed
from acctrain.config import TrainConfig
from acctrain.errors import ConfigError
from acctrain.version import __version__
from acctrain.state import (
    optimizer_from_files,
    optimizer_record,
    optimizer_to_files,
    rng_to_files,
    tensors_from_files,
    tensors_to_files,
)

PLAN_KEYS = ("global_batch", "dataset_len", "seed", "order")
"""What decides which samples each optimizer step sees: a resume that changes them is refused unless allowed."""


class Checkpointer:
    """Checkpoints of one run (one output_dir); every rank makes the same calls."""

    def __init__(self, accelerator: Accelerator, config: Callable[[], TrainConfig]):
        self.accelerator, self._config = accelerator, config
        self.writer = AsyncWriter()
        self.last_path: Path | None = None
        """The newest checkpoint this run wrote (committed, or being committed in the background)."""
        self.loaded: Path | None = None
        """The checkpoint this run resumed from: the one existing checkpoint `save` keeps rather than replaces."""

    @property
    def config(self) -> TrainConfig:
        """The run's config as it is now (a new phase may have changed output_dir, keep_last, resume, ...)."""
        return self._config()

    # ------------------------------------------------------------------------------------ saving

    def save(self, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer, meta: dict[str, Any]) -> Path:
        """Write checkpoint `step-{step}`: every rank its part, the main process commits it.

        With `async_save` a background thread copies the tensors to CPU buffers (the parameters and the
        optimizer state, before the next optimizer step: `wait_copied`; the rest here, the only pause of
        training), then writes and commits them. What already holds the name is replaced, unless it is the
        checkpoint this run resumed from (see the module's docstring).
        """
        acc, cfg = self.accelerator, self.config
        self.wait()  # one save at a time, in order
        final = self.last_path = checkpoint.checkpoint_dir(cfg.output_dir, step)
        if self.loaded is not None and self.loaded.resolve() == final.resolve():  # e.g. resumed at the end
            return final
        stage = checkpoint.staging_dir(cfg.output_dir, step)
        try:
            if acc.is_main_process:
                checkpoint.prepare_staging(stage)
            barrier.wait_for_everyone(acc)
            if sharded.is_fsdp(acc):  # every rank writes its own shards, synchronously; loadable at any world size
                sharded.save_sharded(acc, model, optimizer, stage)
            files = self._files(stage, model, optimizer, meta)
            if cfg.async_save:  # parameters and optimizer state: copied by the writer (see wait_copied)
                stable = {t.data_ptr() for t in [*model.parameters(), *optimizer_tensors(optimizer)]}
                self.writer.start(files, stage, acc.process_index, acc.num_processes, acc.is_main_process,
                                  self._commit, stable)
                return final
            digests = checkpoint.write_files(files)
            barrier.after_main(acc, "the main rank's checkpoint write")  # it writes the most, alone
            if acc.is_main_process:
                self._commit(stage, digests)
        except OSError as err:
            raise self._write_error(err, final) from err
        barrier.after_main(acc, "the main rank's checkpoint commit")
        return final

    def reserve(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """async_save: map the snapshot's CPU buffers in the background, once the optimizer's state exists."""
        if self.config.async_save and not self.writer.reserved:
            files = self._files(Path("layout"), model, optimizer, {})
            self.writer.reserve({(path.name, name): (tuple(t.shape), t.dtype) for path, content in files.items()
                                 if path.suffix == ".safetensors" for name, t in content.items()})

    def wait_copied(self) -> None:
        """Block until a background save has copied the parameters and optimizer state (async_save): call it
        before changing them in place. The Engine does, before each optimizer step."""
        self.writer.wait_copied()

    def wait(self, raise_error: bool = True, patience: float | None = None) -> None:
        """Block until a background save has committed; re-raise its error (or print it, with raise_error=False).

        `patience` (seconds), on a failed run's way out: the main rank's background save stops waiting for
        the other ranks' parts after that long, uncommitted, since they may have died with the run.
        """
        error = self.writer.wait(raise_error=False, patience=patience)
        if isinstance(error, (OSError, PartFailed)):
            error = self._write_error(error, self.last_path)
        if error is not None and raise_error:
            raise error
        if error is not None and self.accelerator.is_main_process:
            print(f"warning: the background save to {self.last_path} failed: {error!r}")

    def _write_error(self, err: OSError | PartFailed, final: Path) -> checkpoint.CheckpointError:
        """A failed write, named: the checkpoint, its directory, the cause, and the previous checkpoint (intact)."""
        latest = checkpoint.latest_checkpoint(self.config.output_dir)
        kept = (f"the previous checkpoint {latest.name} is intact (resume=auto continues from it)"
                if latest is not None and latest.is_dir() and latest != final else "no earlier checkpoint was touched")
        if isinstance(err, PartFailed):  # the other rank's own output says what to fix
            cause, fix = str(err), "fix that, then run again"
        else:
            cause = f"{err.strerror or err}{f' ({err.filename})' if err.filename else ''}"
            fix = "free disk space or make the directory writable, then run again"
        named = checkpoint.CheckpointError(f"could not write checkpoint {final.name} in {final.parent}: {cause}; {kept}; {fix}")
        named.__cause__ = err
        return named

    def _files(self, stage: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
               meta: dict[str, Any]) -> dict[Path, Any]:
        """This rank's files of the checkpoint: path -> tensors (safetensors) or plain data (JSON)."""
        acc = self.accelerator
        rank = acc.process_index
        rng_tensors, rng_meta = rng_to_files()
        files: dict[Path, Any] = {stage / f"rng-rank{rank}.safetensors": rng_tensors,
                                  stage / f"rng-rank{rank}.json": rng_meta}
        if acc.is_main_process:
            if not sharded.is_fsdp(acc):  # DDP: every rank holds the same weights and optimizer state
                opt_tensors, opt_meta = optimizer_to_files(optimizer.state_dict())
                files[stage / "model.safetensors"] = acc.unwrap_model(model).state_dict()
                files[stage / "optimizer.safetensors"] = opt_tensors
                files[stage / "optimizer.json"] = opt_meta
            state, tensors = trainer_state(meta, optimizer)
            if tensors:
                files[stage / "callbacks.safetensors"] = tensors
            state["contents"] = contents(files, stage, state)
            files[stage / "trainer_state.json"] = state
        return files

    def _commit(self, stage: Path, digests: dict[Path, str]) -> None:
        cfg = self.config
        final = checkpoint.commit(stage, digests)
        try:
            checkpoint.rotate(cfg.output_dir, cfg.keep_last, cfg.keep_best, cfg.keep_best_mode, newest=final)
        except OSError as err:  # the new checkpoint is complete; an old one left over is no reason to stop
            message = f"could not delete old checkpoints in {final.parent}: {err}"
            warnings.warn(message)
            print(f"warning: {message}")

    # ------------------------------------------------------------------------------------ resuming

    def find(self) -> Path | None:
        """The checkpoint that `config.resume` selects, verified, or None; every rank gets the same answer."""
        cfg = self.config
        if cfg.resume == "none":
            if checkpoint.has_checkpoints(cfg.output_dir) and not cfg.overwrite:
                raise ConfigError("resume", f"{cfg.output_dir} already holds checkpoints; use resume=auto to "
                                  "continue that run, or overwrite=true to delete them and start afresh.")
            return None

        def select() -> Path | None:
            if cfg.resume != "auto":
                checkpoint.verify(Path(cfg.resume))
                return Path(cfg.resume)
            path, skipped = checkpoint.find_resumable(cfg.output_dir)
            for message in skipped:
                warnings.warn(message)
                print(f"warning: {message}")
            return path

        return agreement.main_answers(self.accelerator, select, "the main rank's choice of a checkpoint")

    def check_resume_path(self) -> None:
        """resume=PATH must name a checkpoint (a directory with a manifest): refused before anything is written.
        (Its files are verified when the run resumes it.)"""
        resume = self.config.resume
        if resume in ("auto", "none"):
            return
        path = Path(resume)
        if not path.is_dir() or not (path / checkpoint.MANIFEST).is_file():
            found = sorted(p.name for p in path.iterdir())[:6] if path.is_dir() else []
            what = (f"a directory without {checkpoint.MANIFEST} (it holds {found})" if path.is_dir() else
                    "a file" if path.exists() else "not there")
            inside = checkpoint.checkpoints_root(path)
            hint = (f"; it looks like a run's output_dir: name one of {inside}/step-*, or give output_dir={path} "
                    "with resume=auto" if inside.is_dir() else "")
            raise ConfigError("resume", f"{path} is {what}, not a checkpoint; give a checkpoint directory "
                              f"(output_dir/checkpoints/step-N), or resume=auto{hint}.")

    def load_best(self, model: torch.nn.Module, newest: Path | None) -> Path | None:
        """load_best_at_end: the weights of the best checkpoint by `keep_best` (among those up to `newest`, the
        run's last) into `model`, verified first; returns its path, or None, said, when none holds the metric.

        Weights only, as the HF Trainer's `load_best_model_at_end`: the optimizer state, the step counter, the
        schedule and the callbacks' state stay those of the end of training, and so does the last checkpoint,
        which a resume continues from.
        """
        cfg, acc = self.config, self.accelerator
        self.wait_copied()  # the weights are about to change in place

        def select() -> Path | None:
            best = checkpoint.best_checkpoint(cfg.output_dir, cfg.keep_best, cfg.keep_best_mode, newest)
            if best is not None:
                checkpoint.verify(best)
            return best

        best = agreement.main_answers(self.accelerator, select, "the main rank's choice of a checkpoint")
        if best is None:
            if acc.is_main_process:
                print(f"warning: load_best_at_end: no checkpoint in {cfg.output_dir} holds {cfg.keep_best!r}; the "
                      "model keeps the weights it ended training with")
            return None
        if sharded.is_fsdp(acc):
            sharded.load_sharded(acc, model, None, best)
        else:
            load_model_state(acc.unwrap_model(model), checkpoint.read_tensors(best / "model.safetensors"), best)
        return best

    def load(self, path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
             plan: dict[str, Any], settings: dict[str, Any] = {},
             data: dict[str, Any] | None = None) -> tuple[dict[str, Any], tuple | None]:
        """Load weights and optimizer state from `path` in place; return its meta and this rank's RNG state.

        `path` is one `find` returned, verified (its format version too). `plan` is this run's plan
        (DataPlan.describe() and the seed), checked against the checkpoint's, and so are the data's identity
        (`data`) and the job's `settings` (e.g. `model.*`), before any weight is loaded; the optimizer's class
        and param groups before its state is. Callbacks' tensors come back inside `meta`.
        The RNG state is None for a rank the checkpointed run did not have (more processes now).
        """
        acc = self.accelerator
        self.wait_copied()  # the weights are about to change in place
        meta = checkpoint.read_json(path / "trainer_state.json")
        self._check_plan(meta["plan"], plan)
        self._check_data(meta.get("data"), data, path)
        check_settings(meta.get("settings", {}), settings, path)
        if sharded.is_sharded_checkpoint(path) != sharded.is_fsdp(acc):
            kind = "sharded (FSDP)" if sharded.is_sharded_checkpoint(path) else "a full (DDP) checkpoint"
            raise checkpoint.CheckpointError(
                f"{path} is {kind} but this run {'uses' if sharded.is_fsdp(acc) else 'does not use'} "
                "FSDP; resume with the same fsdp setting, or `acctrain export` the weights and start afresh."
            )
        if sharded.is_fsdp(acc):
            check_optimizer(meta.get("optimizer"), optimizer, path)
            sharded.load_sharded(acc, model, optimizer, path)
        else:  # the model's mismatches first: they name every key
            load_model_state(acc.unwrap_model(model), checkpoint.read_tensors(path / "model.safetensors"), path)
            check_optimizer(meta.get("optimizer"), optimizer, path)
            optimizer.load_state_dict(optimizer_from_files(
                checkpoint.read_tensors(path / "optimizer.safetensors"), checkpoint.read_json(path / "optimizer.json")))
        rng = path / f"rng-rank{acc.process_index}.safetensors"
        if acc.process_index < meta["plan"].get("world_size", 1) and not rng.is_file():  # verify requires them too
            raise checkpoint.CheckpointError(f"{rng}: missing; the checkpoint's run had "
                                             f"{meta['plan'].get('world_size')} processes, each with its RNG state")
        rng_state = (checkpoint.read_tensors(rng), checkpoint.read_json(rng.with_suffix(".json"))) if rng.is_file() else None
        self.loaded = path
        return callbacks_with_tensors(meta, path), rng_state

    def _check_plan(self, saved: dict[str, Any], now: dict[str, Any]) -> None:
        """Refuse a resume that would change which samples each optimizer step sees, unless allowed."""
        saved = {"order": "randperm", **saved}  # written before the Feistel order existed: randperm's
        diff = [f"{k}: {saved.get(k)} -> {now[k]}" for k in PLAN_KEYS if saved.get(k) != now[k]]
        if diff and not self.config.allow_plan_change:
            raise ConfigError("resume", "the checkpoint's run plan differs from this run's (" + "; ".join(diff) + "); "
                              "restore those settings, or set allow_plan_change=true to continue at the same step anyway.")
        if saved.get("world_size") != now["world_size"] and self.accelerator.is_main_process:
            print(f"resuming on {now['world_size']} processes (checkpoint: {saved.get('world_size')}); "
                  f"accumulation {saved.get('accumulation')} -> {now['accumulation']}, same global samples per step")


    def _check_data(self, saved: dict[str, Any] | None, now: dict[str, Any] | None, path: Path) -> None:
        """Refuse a resume onto other training data, with a diff (acctrain.data_identity), unless allowed; say
        when the eval data changed (a checkpoint written before data was recorded is not checked)."""
        if not saved or not now:
            return
        diff = data_identity.differences(saved["train"], now["train"])
        if diff and not self.config.allow_plan_change:
            raise ConfigError("resume", f"{path} was trained on other data (" + "; ".join(diff) + "); give the run "
                              "the data it trained on, or set allow_plan_change=true to continue on this data anyway.")
        if diff and self.accelerator.is_main_process:
            print(f"resuming on other training data (allow_plan_change): {'; '.join(diff)}")
        eval_diff = data_identity.differences(saved["eval"], now["eval"]) if saved.get("eval") and now.get("eval") else []
        if eval_diff and self.accelerator.is_main_process:
            print(f"the eval data differs from the checkpoint's run ({'; '.join(eval_diff)}): its eval metrics "
                  "(and keep_best) compare with this data from here")


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The tensors of the optimizer's state (exp_avg and the like), which only its step changes."""
    return [v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v)]


def trainer_state(meta: dict[str, Any], optimizer: torch.optim.Optimizer) -> tuple[dict[str, Any], dict]:
    """trainer_state.json's content: `meta` with the callbacks' tensors split out (returned apart, for
    callbacks.safetensors), and what this module checks on load: the versions and the optimizer's record."""
    import accelerate

    state, tensors = dict(meta), {}
    if "callbacks" in meta:
        state["callbacks"] = []
        for i, saved in enumerate(meta["callbacks"]):
            plain, found = tensors_to_files(saved["state"], str(i))
            state["callbacks"].append({**saved, "state": plain})
            tensors.update(found)
    state["versions"] = {"acctrain": __version__, "torch": torch.__version__, "accelerate": accelerate.__version__}
    state["optimizer"] = optimizer_record(optimizer)
    return state, tensors


def contents(files: dict[Path, Any], stage: Path, state: dict[str, Any]) -> dict[str, Any]:
    """What a checkpoint says it holds (trainer_state.json's `contents`, checked by acctrain.checkpoint.format's
    `check_contents`): the main process's files, the tensors of each (name, dtype, shape), and the parts of its
    state that are set (scaler, a stream's position, a torch LR scheduler). Every rank's RNG files are required
    by the plan's world size."""
    written = {str(path.relative_to(stage)): content for path, content in files.items()
               if not path.name.startswith("rng-rank")}
    return {"files": sorted(written),
            "tensors": {name: checkpoint_format.describe_tensors(content) for name, content in written.items()
                        if name.endswith(".safetensors")},
            "state": [key for key in ("scaler", "stream", "lr_scheduler") if state.get(key) is not None]}


def callbacks_with_tensors(meta: dict[str, Any], path: Path) -> dict[str, Any]:
    """`meta` with the callbacks' tensors (callbacks.safetensors) back in place of their placeholders."""
    stored = path / "callbacks.safetensors"
    tensors = checkpoint.read_tensors(stored) if stored.is_file() else {}
    try:
        return {**meta, "callbacks": tensors_from_files(meta.get("callbacks", []), tensors)}
    except ValueError as err:
        raise checkpoint.CheckpointError(f"{stored}: {err}, which trainer_state.json's callbacks name") from None


def check_optimizer(saved: dict[str, Any] | None, optimizer: torch.optim.Optimizer, path: Path) -> None:
    """Refuse optimizer state that does not fit this run's optimizer: its class, param groups, their shapes
    (`saved` is None for format 1, which did not record them)."""
    if saved is None:
        return
    now = optimizer_record(optimizer)
    fix = "; resume=none (or another output_dir) starts afresh"
    if saved["class"] != now["class"]:
        raise checkpoint.CheckpointError(f"{path} holds the state of a {saved['class']} optimizer, this run uses "
                                         f"{now['class']}; build the optimizer the checkpoint was trained with{fix}")
    groups = ("restore the param_groups setting (or the optimizer factory) the checkpoint was trained with, "
              "with the parameters in the same order" + fix)
    old, new = saved["param_groups"], now["param_groups"]
    if len(old) != len(new):
        raise checkpoint.CheckpointError(
            f"{path}: the checkpoint's optimizer has {len(old)} param groups of {[len(g) for g in old]} params, "
            f"this run has {len(new)} of {[len(g) for g in new]}; {groups}")
    for i, (a, b) in enumerate(zip(old, new)):
        if len(a) != len(b):
            raise checkpoint.CheckpointError(f"{path}: param group {i} has {len(a)} params in the checkpoint, "
                                             f"{len(b)} in this run; {groups}")
        for j, (x, y) in enumerate(zip(a, b)):
            if x != y:
                raise checkpoint.CheckpointError(f"{path}: param group {i}, param {j}: shape {x} in the checkpoint, "
                                                 f"{y} in this run; {groups}")


def check_settings(saved: dict[str, Any], now: dict[str, Any], path: Path) -> None:
    """Refuse to resume with job settings (e.g. the model's shape) other than the checkpoint's, naming each
    (when both record settings: an Engine given none checks none)."""
    diff = [] if not (saved and now) else [f"{k}={saved.get(k)!r} (this run: {now.get(k)!r})" for k in sorted(set(saved) | set(now))
            if saved.get(k) != now.get(k)]
    if diff:
        raise ConfigError(diff[0].split("=")[0], f"{path} was trained with " + ", ".join(diff) + "; set those "
                          "values to resume it, or start a new run in another output_dir (or with resume=none).")


def load_model_state(model: torch.nn.Module, saved: dict[str, torch.Tensor], source: Any = "checkpoint") -> None:
    """Load weights strictly; a mismatch lists every missing, unexpected and differently shaped key."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(saved))
    unexpected = sorted(set(saved) - set(expected))
    shapes = sorted(f"{k}: checkpoint {tuple(saved[k].shape)}, model {tuple(expected[k].shape)}"
                    for k in set(saved) & set(expected) if saved[k].shape != expected[k].shape)
    dtypes = sorted(f"{k}: checkpoint {saved[k].dtype}, model {expected[k].dtype}"
                    for k in set(saved) & set(expected) if saved[k].dtype != expected[k].dtype)
    if missing or unexpected or shapes or dtypes:
        raise checkpoint.CheckpointError(
            f"{source} does not fit the model:\n  missing keys: {missing}\n  unexpected keys: {unexpected}"
            f"\n  shape mismatches: {shapes}" + (f"\n  dtype mismatches: {dtypes} (build the model in the dtype "
                                                f"it was trained in)" if dtypes else "")
        )
    model.load_state_dict(saved, strict=True)

RESUME_CONSEQUENCES = {
    "mixed_precision": "the weights and optimizer state stay fp32; from here the forward and backward run in the "
                       "new precision (a loss scale starts afresh for fp16, the checkpoint's is dropped otherwise)",
    "ema_decay": "an EMA added starts from this step's weights; one dropped is not loaded (its average stays in the "
                 "checkpoint: `acctrain export --ema` writes it)",
    "compile": "speed only: the same computation",
    "activation_checkpointing": "memory and speed only: the same computation",
    "activation_checkpointing_block": "memory and speed only: the same computation",
}
"""Settings a resume may change that no other check reports, and what the change does."""


def resume_changes(saved: dict[str, Any], now: dict[str, Any], step: int) -> list[str]:
    """One line for each setting of RESUME_CONSEQUENCES that differs from the checkpoint's config, saying what
    changes from optimizer step `step` (those that change the data or the model are refused elsewhere)."""
    return [f"resuming with {key}={now[key]!r} (the checkpoint's run: {saved[key]!r}) from optimizer step {step}: "
            f"{consequence}" for key, consequence in RESUME_CONSEQUENCES.items()
            if key in saved and key in now and saved[key] != now[key]]
