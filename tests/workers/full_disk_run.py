"""A 2-process run in which one rank's disk fills after checkpoint 2: every file it writes from step 3 on may
hold 512 bytes (RLIMIT_FSIZE; writing past it fails with EFBIG, a real OSError).

    torchrun --nproc_per_node 2 -m tests.workers.full_disk_run OUT_DIR FAILING_RANK ASYNC(0|1)
"""

from __future__ import annotations

import os
import resource
import signal
import sys

from acctrain import Callback
from tests.test_checkpoint_safety import tiny_engine


class FillDisk(Callback):
    def __init__(self, rank: int):
        self.rank = rank

    def after_step(self, engine):
        assert engine.accelerator.num_processes == int(os.environ["WORLD_SIZE"])
        if engine.state.step == 3 and engine.accelerator.process_index == self.rank:
            engine.checkpointer.wait()  # checkpoint 2 is committed
            resource.setrlimit(resource.RLIMIT_FSIZE, (512, resource.RLIM_INFINITY))


if __name__ == "__main__":
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    out, failing, async_save = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
    tiny_engine(out, steps=6, callbacks=[FillDisk(failing)], save_every=2, log_with="", async_save=async_save).fit()
