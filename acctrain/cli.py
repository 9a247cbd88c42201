"""The `acctrain` command and the main job behind `train.py`.

    acctrain train [CONFIG] [key=value ...]   # train the embedded byte-level LM (or what CONFIG says)
    acctrain plan  [CONFIG] [key=value ...]   # print the run plan for WORLD_SIZE (or world_size=N) and exit
    acctrain --help                           # commands and every config field with its sentence

Keys `model.*` and `data.*` set the embedded job's model and data (acctrain.bytelm).
"""

from __future__ import annotations

import argparse
import os
import sys

from acctrain.bytelm import ByteLM, DataConfig, ModelConfig, lm_loss, stdlib_datasets
from acctrain.config import TrainConfig, field_docs, load_config
from acctrain.data import DataPlan
from acctrain.errors import ConfigError

SECTIONS = {"model": ModelConfig, "data": DataConfig}


def run_job(cfg: TrainConfig, model_cfg: ModelConfig, data_cfg: DataConfig) -> dict[str, float]:
    """Train the byte-level LM on the stdlib sources; print where results went."""
    import torch

    from acctrain.engine import Engine

    torch.manual_seed(cfg.seed)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
    train_set, eval_set = stdlib_datasets(data_cfg, model_cfg.context_len)
    engine = Engine(ByteLM(model_cfg), cfg, train_set, eval_set, loss_fn=lm_loss)
    try:
        result = engine.fit()
        engine.accelerator.print(
            f"done: train loss {result.get('train/loss', float('nan')):.4f}, "
            f"eval loss {result.get('eval/loss', float('nan')):.4f}\n"
            f"logs: {os.path.join(cfg.output_dir, 'logs')} (tensorboard --logdir {os.path.join(cfg.output_dir, 'logs')})\n"
            f"checkpoint: {getattr(engine, 'checkpoint_path', cfg.output_dir)}",
            flush=True,
        )
        return result
    finally:
        engine.close()


def _split_args(args: list[str]) -> tuple[str | None, list[str]]:
    path = None
    if args and "=" not in args[0]:
        path, args = args[0], args[1:]
    return path, list(args)


def train_main(argv: list[str] | None = None) -> int:
    """`python train.py [CONFIG] [key=value ...]`."""
    path, overrides = _split_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg, sections = load_config(path, overrides, sections=SECTIONS)
        run_job(cfg, sections["model"], sections["data"])
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    return 0


def plan_main(args: list[str]) -> int:
    path, overrides = _split_args(args)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rest = []
    for item in overrides:
        if item.startswith("world_size="):
            world = int(item.split("=", 1)[1])
        else:
            rest.append(item)
    try:
        cfg, sections = load_config(path, rest, sections=SECTIONS)
        train_set, _ = stdlib_datasets(sections["data"], sections["model"].context_len)
        plan = DataPlan(len(train_set), cfg.global_batch_size, cfg.micro_batch_size, world, cfg.seed, cfg.epochs, cfg.max_steps)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    for key, value in plan.describe().items():
        print(f"{key:>16}: {value}")
    print(f"{'precision':>16}: {cfg.mixed_precision}\n{'schedule':>16}: {cfg.scheduler}")
    return 0


def _help() -> str:
    lines = [__doc__.strip(), "", "Config fields (key=value, or in a YAML/TOML file):"]
    defaults = TrainConfig()
    for name, doc in field_docs(TrainConfig).items():
        lines.append(f"  {name} = {getattr(defaults, name)!r}\n      {doc}")
    for section, cls in SECTIONS.items():
        for name, doc in field_docs(cls).items():
            lines.append(f"  {section}.{name} = {getattr(cls(), name)!r}\n      {doc}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="acctrain", description=_help(), formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("command", choices=["train", "plan"])
    parser.add_argument("args", nargs=argparse.REMAINDER, help="[CONFIG] [key=value ...]")
    ns = parser.parse_args(argv)
    if ns.command == "train":
        return train_main(ns.args)
    return plan_main(ns.args)


if __name__ == "__main__":
    sys.exit(main())
