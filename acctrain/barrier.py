"""Every rank reaches a point before any goes on, on the device the process group really uses.

Accelerate's `wait_for_everyone` calls `torch.distributed.barrier(device_ids=[local rank])`, and torch then
allocates the barrier's tensor on the machine's accelerator whatever the backend. CPU/gloo processes on a
machine with fewer GPUs than processes (`cpu=true`, 2 processes, one GPU visible) therefore crash on
rank 1 ("cuda:1": invalid device ordinal) while rank 0 waits: seen on an H100 (benchmarks/gpu_check.sh).
Under gloo the barrier here stays on the CPU and touches no GPU.
"""

from __future__ import annotations

import torch.distributed as dist
from accelerate import Accelerator

from acctrain import watchdog


def wait_for_everyone(accelerator: Accelerator) -> None:
    if accelerator.num_processes == 1:
        return
    with watchdog.waiting("a barrier"):
        _barrier(accelerator)


def _barrier(accelerator: Accelerator) -> None:
    if accelerator.device.type == "cpu":
        dist.barrier()  # gloo: the group's object-collective device, the CPU (no device_ids, no CUDA context)
    else:
        accelerator.wait_for_everyone()


def after_main(accelerator: Accelerator, what: str) -> None:
    """A barrier after work the main rank does alone (a checkpoint's write and commit, verifying one): the others
    first wait for it without a collective (acctrain.watchdog.after_main), so that neither the process group's
    timeout nor the watchdog cuts a save that takes longer than hang_timeout."""
    if accelerator.num_processes == 1:
        return
    with watchdog.waiting(what):
        watchdog.after_main(accelerator.is_main_process)
        _barrier(accelerator)
