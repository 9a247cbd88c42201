"""A 2-process run in which rank 1 is slow before its backward, each step: rank 0 waits in the gradient
all-reduce that ends its backward, which its step-time breakdown must show (tests/test_step_time.py).

    python -m torch.distributed.run --nproc_per_node 2 -m tests.workers.step_time_run OUT_DIR SLEEP_S
"""

from __future__ import annotations

import json
import os
import sys
import time

from acctrain import Callback, Engine, TrainConfig
from tests.support.tiny import VarLenTokens, collate, make_model, token_loss


class SlowRankOne(Callback):
    def __init__(self, seconds: float):
        self.seconds = seconds

    def after_loss(self, engine):
        if engine.accelerator.process_index == 1:
            time.sleep(self.seconds)


if __name__ == "__main__":
    out, seconds = sys.argv[1], float(sys.argv[2])
    cfg = TrainConfig(output_dir=out, global_batch_size=8, micro_batch_size=2, max_steps=6, log_every=2, lr=1e-2,
                      cpu_threads=1, save_every=0)
    engine = Engine(make_model(), cfg, VarLenTokens(48), loss_fn=token_loss, collate_fn=collate,
                    callbacks=[SlowRankOne(seconds)])
    engine.fit()
    if engine.accelerator.is_main_process:
        with open(os.path.join(out, "world.json"), "w") as f:
            json.dump({"num_processes": engine.accelerator.num_processes,
                       "world_size_env": int(os.environ["WORLD_SIZE"])}, f)
    engine.close()
