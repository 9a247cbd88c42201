"""A tiny GPT-2 (from a config: random weights, no download) trained on a `datasets.Dataset` as is: no
collate_fn, no loss_fn. Writes {OUT}/result.json (losses, processes) and result.safetensors (weights) from rank 0.

    python -m torch.distributed.run --nproc_per_node 2 -m tests.workers.hf_run OUT MICRO [MAX_STEPS]
    HF_RUN_FSDP=1 ... (the same under FSDP2)
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from acctrain import Engine, TrainConfig
from acctrain.cli import free_before_exit
from tests.support import Losses
from tests.support.tiny import RUN_ON_CPU
from tests.workers.resume_run import full


def dataset(n: int = 24, vocab: int = 64, seed: int = 0):
    """Rows of 3..12 tokens counting upwards, labels the ids with the first two ignored, and a text column."""
    import datasets

    g = torch.Generator().manual_seed(seed)
    rows = {"input_ids": [], "labels": [], "text": []}
    for _ in range(n):
        length, start = int(torch.randint(3, 13, (1,), generator=g)), int(torch.randint(0, vocab, (1,), generator=g))
        ids = [(start + i) % vocab for i in range(length)]
        rows["input_ids"].append(ids)
        rows["labels"].append([-100, -100, *ids[2:]])
        rows["text"].append(" ".join(map(str, ids)))
    return datasets.Dataset.from_dict(rows)


def run(out_dir: str, micro: int, max_steps: int = 6) -> dict:
    import transformers

    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=32, vocab_size=64, n_positions=16, resid_pdrop=0.0,
                                     embd_pdrop=0.0, attn_pdrop=0.0)  # no dropout: geometries draw different masks
    model = transformers.GPT2LMHeadModel(config)
    losses = Losses()
    cfg = TrainConfig(output_dir=out_dir, global_batch_size=8, micro_batch_size=micro, max_steps=max_steps, lr=3e-3,
                      scheduler="constant", log_every=1, cpu=RUN_ON_CPU, fsdp=os.environ.get("HF_RUN_FSDP") == "1")
    engine = Engine(model, cfg, dataset(), dataset(10, seed=1), callbacks=[losses])
    result = {"losses": losses.values, "eval": engine.fit().get("eval/loss"), "num_processes": engine.accelerator.num_processes,
              "world_size_env": int(os.environ.get("WORLD_SIZE", "1"))}
    params = {n: full(p).detach().clone().contiguous() for n, p in engine.unwrapped_model.named_parameters()}
    if engine.accelerator.is_main_process:
        Path(out_dir, "result.json").write_text(json.dumps(result))
        save_file(params, os.path.join(out_dir, "result.safetensors"))
    engine.close()
    return dict(result, params=params)


if __name__ == "__main__":
    run(sys.argv[1], int(sys.argv[2]), *map(int, sys.argv[3:]))
    free_before_exit()
