"""resume_run under an elastic launcher, for the restart tests.

    torchrun --nproc_per_node 2 --max-restarts 2 -m tests.workers.elastic_run '{"out_dir": ..., "kill_at": 7}'

- `kill_at`: in the first round (TORCHELASTIC_RESTART_COUNT 0), rank `kill_rank` kills itself (SIGKILL) after
  that optimizer step; the agent restarts the workers, which resume from the last checkpoint.
- `stall_at`: while the world has `stall_world` processes, the worker of the agent started with
  ELASTIC_TEST_NODE=lost writes `{out_dir}.stalled` (its pid) after that step and sleeps, for the test to kill
  it together with its agent (a lost node).

Every worker appends its rank, world size and restart count to `{out_dir}.rounds.jsonl`; rank 0 of the round
that finishes writes result.safetensors and result.json (as resume_run).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from acctrain.cli import free_before_exit
from tests.workers import resume_run


class Stall(resume_run.Record):
    """Record, and after step `stall_at`: say so in a file, then wait to be killed."""

    def __init__(self, stall_at: int, marker: str, *args):
        super().__init__(*args)
        self.stall_at, self.marker = stall_at, marker

    def after_step(self, engine):
        if engine.state.step == self.stall_at:
            Path(self.marker).write_text(str(os.getpid()))
            time.sleep(3600)


def main(out_dir: str, kill_at: int | None = None, kill_rank: int = 1, stall_at: int | None = None,
         stall_world: int = 2, **options) -> None:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    with open(f"{out_dir}.rounds.jsonl", "a") as f:
        f.write(json.dumps({"rank": rank, "world": world, "restart": restart}) + "\n")
    if stall_at is not None and os.environ.get("ELASTIC_TEST_NODE") == "lost" and world == stall_world:
        resume_run.Record = lambda *args: Stall(stall_at, f"{out_dir}.stalled", *args)  # noqa: E731
    kill = kill_at if rank == kill_rank and restart == 0 else None
    resume_run.run(out_dir, kill_at=kill, **options)


if __name__ == "__main__":
    main(**json.loads(sys.argv[1]))
    free_before_exit()
