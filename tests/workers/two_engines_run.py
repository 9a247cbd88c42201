"""Two Engines, one after the other, in the same processes: the first is closed (its process group destroyed),
the second forms a new one (tests/test_watchdog.py). Writes, from rank 0, `{OUT}/two_engines.json`.

    python -m torch.distributed.run --nproc_per_node 2 -m tests.workers.two_engines_run OUT
"""

from __future__ import annotations

import json
import os
import sys

from acctrain import Engine, TrainConfig
from tests.support.tiny import VarLenTokens, collate, make_model, token_loss

if __name__ == "__main__":
    out, results = sys.argv[1], []
    for phase in ("first", "second"):
        cfg = TrainConfig(output_dir=os.path.join(out, phase), global_batch_size=8, micro_batch_size=2, max_steps=3,
                          lr=1e-2, cpu_threads=1, hang_timeout=20)
        engine = Engine(make_model(), cfg, VarLenTokens(32), loss_fn=token_loss, collate_fn=collate)
        metrics = engine.fit()
        results.append({"num_processes": engine.accelerator.num_processes, "step": engine.state.step,
                        "loss": metrics["train/loss"]})
        main = engine.accelerator.is_main_process
        engine.close()
    if main:
        with open(os.path.join(out, "two_engines.json"), "w") as f:
            json.dump({"world_size_env": int(os.environ["WORLD_SIZE"]), "phases": results}, f)
