"""The `acctrain` command and the main job behind `train.py`.

    acctrain train [CONFIG] [key=value ...]   # train the embedded byte-level LM (or what CONFIG says)
    acctrain plan  [CONFIG] [key=value ...]   # print the run plan for WORLD_SIZE (or world_size=N) and exit
    acctrain plot-schedule [CONFIG] [key=value ...] [out=PATH]   # PNG of lr and momentum per optimizer step
    acctrain export CHECKPOINT OUT.safetensors [--ema]   # one weights file (FSDP shards joined), plain names, settings in its metadata
    acctrain export CHECKPOINT OUT_DIR [--ema]   # a directory: from_pretrained's for a Transformers model, else weights + acctrain_model.json
    acctrain lr-find [CONFIG] [key=value ...] [num_it=N]   # LR range test: suggestions and lr_find.png
    acctrain summary [CONFIG] [key=value ...]   # parameter counts per module, trainable and frozen
    acctrain tokenize FILE... --out OUT.bin [--tokenizer bytes|tiktoken:NAME|tokenizers:PATH]   # a token file for data.path
    acctrain verify CHECKPOINT_DIR|RUN_DIR   # check every checkpoint (digests, files, tensor headers); exit 1 if damaged
    acctrain --help                           # commands and every config field with its sentence
    acctrain COMMAND --help                   # that command's usage

Keys `model.*` and `data.*` set the embedded job's model and data (acctrain.bytelm); they are recorded with
each checkpoint (a resume with other values is refused) and in the metadata of an exported file.
`acctrain export` also takes a run's output_dir, and exports its newest complete checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from acctrain.bytelm import ByteLM, DataConfig, ModelConfig, job_data, lm_loss
from acctrain.config import TrainConfig, field_docs, load_config
from acctrain.data import DataPlan
from acctrain.checkpoint import CheckpointError
from acctrain.errors import ConfigError, NonFiniteError, Preempted

SECTIONS = {"model": ModelConfig, "data": DataConfig}
JOB_DEFAULTS = {"eval_every": 100}
"""The embedded job's own defaults, under a config file and overrides: an eval curve with points (7 evaluations
over its 696 default steps), not one at the end."""


def run_job(cfg: TrainConfig, model_cfg: ModelConfig, data_cfg: DataConfig) -> dict[str, float]:
    """Train the byte-level LM on the stdlib sources; print where results went."""
    import torch

    from acctrain.engine import Engine

    train_set, eval_set, model = job_data(data_cfg, model_cfg)  # the config errors before anything is made
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
    engine = Engine(ByteLM(model), cfg, train_set, eval_set, loss_fn=lm_loss,
                    settings=job_settings({"model": model_cfg, "data": data_cfg}))
    try:
        result = engine.fit()
        logs = os.path.join(cfg.output_dir, "logs")
        engine.print(
            f"done: train loss {result.get('train/loss', float('nan')):.4f}, "
            f"eval loss {result.get('eval/loss', float('nan')):.4f}\n"
            + (f"logs: {logs} (tensorboard --logdir {logs})\n" if cfg.log_with.strip() else "logs: none (log_with is empty)\n")
            + f"checkpoint: {getattr(engine, 'checkpoint_path', cfg.output_dir)}",
        )
        return result
    finally:
        engine.close()


def job_settings(sections: dict) -> dict:
    """The embedded job's `model.*` and `data.*` values, flat (what a checkpoint and an export record)."""
    return {f"{name}.{key}": value for name, section in sections.items()
            for key, value in dataclasses.asdict(section).items()}


def _split_args(args: list[str]) -> tuple[str | None, list[str]]:
    path = None
    if args and "=" not in args[0]:
        path, args = args[0], args[1:]
    return path, list(args)


def train_main(argv: list[str] | None = None) -> int:
    """`python train.py [CONFIG] [key=value ...]`."""
    argv = sys.argv[1:] if argv is None else argv
    if _wants_help(argv):
        return _print_usage("train")
    path, overrides = _split_args(argv)
    try:
        cfg, sections = load_config(path, overrides, sections=SECTIONS, defaults=JOB_DEFAULTS)
        run_job(cfg, sections["model"], sections["data"])
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    except (CheckpointError, NonFiniteError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except Preempted as stop:  # the main process already printed the message
        return stop.code
    finally:
        free_before_exit()
    return 0


def free_before_exit() -> None:
    """Free the finished run's objects now, not while the interpreter shuts down.

    FSDP2's device mesh is held by the model through reference cycles; freed during interpreter
    finalization, its gloo group aborts the process after a successful run ("terminate called without an
    active exception", exit -6). Measured with tests/workers/grad_run.py on FSDP2, 2 processes on a loaded
    2-core machine: 4 aborts in 16 runs without this collection, 0 in 20 with it.
    """
    import gc

    gc.collect()


def _job_plan(args: list[str]) -> tuple[TrainConfig, DataPlan, dict[str, str]]:
    """The config and data plan of the embedded job for `[CONFIG] [key=value ...]`, without training.

    `world_size=N` (default: $WORLD_SIZE or 1) picks the number of processes; `out=PATH` is returned aside.
    """
    path, overrides = _split_args(args)
    extra = {"world_size": os.environ.get("WORLD_SIZE", "1"), "out": "schedule.png"}
    rest = []
    for item in overrides:
        key, _, value = item.partition("=")
        if key in extra:
            extra[key] = value
        else:
            rest.append(item)
    cfg, sections = load_config(path, rest, sections=SECTIONS, defaults=JOB_DEFAULTS)
    train_set, _, _ = job_data(sections["data"], sections["model"])
    if not extra["world_size"].isdigit() or int(extra["world_size"]) < 1:
        raise ConfigError("world_size", f"must be an int >= 1, got {extra['world_size']!r}.")
    plan = DataPlan.for_run(train_set, None, cfg, int(extra["world_size"]))
    return cfg, plan, extra


def plan_main(args: list[str]) -> int:
    try:
        cfg, plan, _ = _job_plan(args)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    described = plan.describe()
    if cfg.micro_batch_size == "auto":  # chosen on the GPUs at start-up
        described.update(micro_batch=f"auto (the largest divisor of {plan.micro_batch} that fits)",
                         accumulation=f"global_batch / (micro_batch x {plan.world_size})")
    for key, value in described.items():
        print(f"{key:>16}: {value}")
    print(f"{'precision':>16}: {cfg.mixed_precision}\n{'schedule':>16}: {cfg.scheduler}")
    return 0


def plot_schedule_main(args: list[str]) -> int:
    """Write a PNG of the run's lr and momentum over its optimizer steps (`out=PATH`, default schedule.png)."""
    from acctrain.schedules import build_schedule, plot_schedule

    if not _has_matplotlib("plot-schedule"):
        return 1
    try:
        cfg, plan, extra = _job_plan(args)
        schedule = build_schedule(cfg.scheduler, plan.total_steps, warmup_steps=cfg.warmup_steps,
                                  warmup_ratio=cfg.warmup_ratio, steps_per_epoch=plan.steps_per_epoch,
                                  args=cfg.schedule_args)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    plot_schedule(schedule, plan.total_steps, extra["out"], base_lr=cfg.lr)
    print(f"wrote {extra['out']}: {cfg.scheduler} over {plan.total_steps} optimizer steps")
    return 0


def _has_matplotlib(command: str) -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError as err:
        print(f"error: {command} draws with matplotlib, which cannot be imported ({err}): pip install matplotlib "
              '(in a checkout of acctrain: pip install -e ".[plot]")', file=sys.stderr)
        return False
    return True


def export_main(args: list[str]) -> int:
    """`acctrain export CHECKPOINT OUT [--ema]`: the model for others to load (acctrain.export). OUT.safetensors:
    the weights as one file with plain names, the job's settings (`model.*`, ...) as JSON under the file's
    metadata key "acctrain.settings"; another OUT: a directory, what `from_pretrained` loads for a Transformers
    model, else model.safetensors and acctrain_model.json (the model's class and constructor settings).
    `--ema` exports the EMA callback's average instead of the trained weights.

    CHECKPOINT may also be a run's output_dir: its newest complete checkpoint is exported (and named).
    """
    from pathlib import Path

    from acctrain import checkpoint
    from acctrain.export import ExportError, export

    ema = "--ema" in args
    args = [a for a in args if a != "--ema"]
    if len(args) != 2:
        print("usage: acctrain export CHECKPOINT_DIR|RUN_DIR OUT.safetensors|OUT_DIR [--ema]", file=sys.stderr)
        return 2
    source, out = Path(args[0]), Path(args[1])
    try:
        if not (source / "trainer_state.json").is_file() and checkpoint.checkpoints_root(source).is_dir():
            source = _newest_checkpoint(source)
        checkpoint.verify(source)  # with the format version: a newer acctrain's is named, not exported
        print(export(source, out, ema=ema))
    except (CheckpointError, ExportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


def _newest_checkpoint(run_dir):
    """The newest complete checkpoint of a run's output_dir, printed so that the export names what it took."""
    from acctrain import checkpoint

    found, skipped = checkpoint.find_resumable(run_dir)
    for message in skipped:
        print(f"warning: {message}", file=sys.stderr)
    if found is None:
        raise CheckpointError(f"{run_dir} is a run directory without a complete checkpoint under "
                              f"{checkpoint.checkpoints_root(run_dir)}; nothing to export.")
    print(f"{run_dir} is a run directory: exporting its newest complete checkpoint, {found}")
    return found


def _job_engine(args: list[str]):
    """An Engine for the embedded job from `[CONFIG] [key=value ...]` (for lr-find), and its model."""
    import torch

    from acctrain.engine import Engine

    path, overrides = _split_args(args)
    cfg, sections = load_config(path, overrides, sections=SECTIONS, defaults=JOB_DEFAULTS)
    train_set, eval_set, model = job_data(sections["data"], sections["model"])
    torch.manual_seed(cfg.seed)
    return Engine(ByteLM(model), cfg, train_set, eval_set, loss_fn=lm_loss, settings=job_settings(sections))


def lr_find_main(args: list[str]) -> int:
    """`acctrain lr-find [CONFIG] [key=value ...] [num_it=N]`: print suggestions, write lr_find.png."""
    num_it = 100
    rest = []
    for item in args:
        if item.startswith("num_it="):
            num_it = int(item.split("=", 1)[1])
        else:
            rest.append(item)
    try:
        engine = _job_engine(rest)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    try:
        suggestions = engine.lr_find(num_it=num_it)
        for name, value in suggestions._asdict().items():
            engine.print(f"{name:>8}: {value:.3e}")
        engine.print(f"plot: {os.path.join(engine.config.output_dir, 'lr_find.png')}")
    finally:
        engine.close()
    return 0


def summary_main(args: list[str]) -> int:
    """`acctrain summary [CONFIG] [key=value ...]`: the embedded job's model summary, without training."""
    from acctrain.summary import model_summary

    path, overrides = _split_args(args)
    try:
        _, sections = load_config(path, overrides, sections=SECTIONS, defaults=JOB_DEFAULTS)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    print(model_summary(ByteLM(sections["model"])))
    return 0


def tokenize_main(args: list[str]) -> int:
    """`acctrain tokenize FILE... --out OUT.bin [--tokenizer SPEC]`: write a token file and its sidecar."""
    from acctrain.token_data import tokenize

    parser = argparse.ArgumentParser(prog="acctrain tokenize")
    parser.add_argument("inputs", nargs="*", help="text files, tokenized in this order")
    parser.add_argument("--out", required=True, help="the token file to write (its sidecar: OUT.json)")
    parser.add_argument("--tokenizer", default="bytes", help="bytes (default), tiktoken:NAME or tokenizers:PATH")
    ns = parser.parse_args(args)
    try:
        meta = tokenize(ns.inputs, ns.out, ns.tokenizer)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {ns.out}: {meta['tokens']} tokens ({meta['tokenizer']}, vocabulary {meta['vocab_size']}, "
          f"{meta['dtype']}); its sidecar {ns.out}.json. Train on it with data.path={ns.out}")
    return 0


def verify_main(args: list[str]) -> int:
    """`acctrain verify CHECKPOINT_DIR|RUN_DIR` (acctrain.checkpoint.report)."""
    from acctrain.checkpoint.report import verify_main as report

    return report(args)


def _help() -> str:
    lines = [__doc__.strip(), "", "Config fields (key=value, or in a YAML/TOML file):"]
    defaults = TrainConfig()
    for name, doc in field_docs(TrainConfig).items():
        lines.append(f"  {name} = {getattr(defaults, name)!r}\n      {doc}")
    for section, cls in SECTIONS.items():
        for name, doc in field_docs(cls).items():
            lines.append(f"  {section}.{name} = {getattr(cls(), name)!r}\n      {doc}")
    return "\n".join(lines)


def _wants_help(args: list[str]) -> bool:
    return any(arg in ("-h", "--help") for arg in args)


def _print_usage(command: str) -> int:
    """Print `command`'s usage line from this module's docstring; exit status 0."""
    usage = [line.strip() for line in __doc__.splitlines() if line.strip().startswith(f"acctrain {command} ")]
    print("usage: " + (usage[0] if usage else f"acctrain {command}"))
    print("Config fields and their defaults: acctrain --help")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="acctrain", description=_help(), formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("command", choices=["train", "plan", "plot-schedule", "export", "lr-find", "summary",
                                            "tokenize", "verify"])
    parser.add_argument("args", nargs=argparse.REMAINDER, help="[CONFIG] [key=value ...]")
    ns = parser.parse_args(argv)
    if _wants_help(ns.args):  # before the arguments are read as a config file
        return _print_usage(ns.command)
    commands = {"train": train_main, "plan": plan_main, "plot-schedule": plot_schedule_main, "export": export_main,
                "lr-find": lr_find_main, "summary": summary_main, "tokenize": tokenize_main, "verify": verify_main}
    return commands[ns.command](ns.args)


if __name__ == "__main__":
    sys.exit(main())
