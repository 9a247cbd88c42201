"""Forming the process group: bounded by `hang_timeout`, naming the ranks that never joined, and new each round
of an elastic restart.

    form(backend, hang_timeout, output_dir)   # before Accelerator(), which then adopts the group

Why acctrain forms the group itself, rather than leaving it to `Accelerator()`:

- **Restarts.** torchrun's agent hosts one TCPStore for the whole job and hands it to every round of workers
  (`TORCHELASTIC_USE_AGENT_STORE=True`). Since torch 2.5 that store is shared across restarts without a
  per-round prefix (pytorch/pytorch#135712: `TORCHELASTIC_RESTART_COUNT` is per agent, so it cannot name a
  round), so a restarted round can read the previous round's keys: gloo then dials the dead workers'
  addresses (`Gloo connectFullMesh failed ... Connection refused`) or waits for ever (a restart inside acctrain was reported waiting 45 minutes).
  acctrain uses the agent's store only to find a store of the round's own: rank 0 starts a fresh one on a free
  port and publishes its address and a token; the others take the published address only once a store answers
  there with that token, so a stale address (its server died with the previous round) is never used.
- **Bounded, and named.** Every rank records itself in that store and waits for the others at most
  `hang_timeout`; then it stops (acctrain.errors.HangError, exit code 124) naming the ranks that never joined.
  torch's own wait is 30 minutes and names nobody.
- **The group's timeout** is `hang_timeout` + 60 s: acctrain.watchdog names a rank that does not arrive at a
  collective at `hang_timeout`; the group's own timeout is the bound for a collective that every rank reached.

On NCCL, before the group exists: asynchronous error handling (`TORCH_NCCL_ASYNC_ERROR_HANDLING=3`, torch's
default: a timed-out collective ends the process), and PyTorch's flight recorder (`TORCH_FR_BUFFER_SIZE=2000`,
`TORCH_NCCL_DUMP_ON_TIMEOUT=1`, dumps to `{output_dir}/flight-recorder-rank{r}`); each only where you have not
set it yourself.
"""

from __future__ import annotations

import os
import secrets
import socket
import sys
import time
from datetime import timedelta

import torch.distributed as dist

from acctrain.errors import HangError

GROUP_TIMEOUT_MARGIN = 60.0
"""Seconds the process group's own timeout adds to hang_timeout (the watchdog names a missing rank first)."""

_stores: list = []  # the round's store (rank 0 hosts its server): alive as long as the process


def launched() -> bool:
    """Started by a launcher that names this process's place in a group of several (torchrun, accelerate
    launch, the Slurm script): RANK, WORLD_SIZE > 1, MASTER_ADDR and MASTER_PORT."""
    env = os.environ
    return all(env.get(k) for k in ("RANK", "MASTER_ADDR", "MASTER_PORT")) and int(env.get("WORLD_SIZE", "1")) > 1


def form(backend: str, hang_timeout: float, output_dir: str) -> None:
    """Form the default process group of this launch (see the module's docstring); a no-op if one exists."""
    if dist.is_initialized():
        return
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if backend == "nccl":
        nccl_defaults(output_dir)
    # The how-many-th group of this process (an Engine closed, then another: every rank counts the same): its keys
    # are its own, so that no rank takes an earlier group's store or "joined" marks for this one's.
    forming = len(_stores)
    try:
        store = dist.PrefixStore(f"acctrain/{forming}", round_store(rank, world_size, hang_timeout, forming))
        wait_for_ranks(store, rank, world_size, hang_timeout)
    except HangError as err:  # a SystemExit prints nothing of itself
        print(f"acctrain: {err}", file=sys.stderr, flush=True)
        raise
    dist.init_process_group(backend, store=dist.PrefixStore("group", store), rank=rank,
                            world_size=world_size, timeout=timedelta(seconds=hang_timeout + GROUP_TIMEOUT_MARGIN))


def nccl_defaults(output_dir: str) -> None:
    """NCCL's error handling and flight recorder (see the module's docstring), where not set already."""
    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "3")
    os.environ.setdefault("TORCH_FR_BUFFER_SIZE", "2000")
    os.environ.setdefault("TORCH_NCCL_DUMP_ON_TIMEOUT", "1")
    os.environ.setdefault("TORCH_FR_DUMP_TEMP_FILE", os.path.join(os.path.abspath(output_dir), "flight-recorder-rank"))


def round_store(rank: int, world_size: int, hang_timeout: float, forming: int = 0) -> dist.Store:
    """A store that holds nothing of an earlier round: under torchrun's agent store, one rank 0 starts now;
    otherwise the one at MASTER_ADDR:MASTER_PORT that rank 0 hosts (as env:// does)."""
    addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    deadline = time.monotonic() + hang_timeout
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        try:
            store = dist.TCPStore(addr, port, world_size, is_master=rank == 0, wait_for_workers=False,
                                  timeout=timedelta(seconds=hang_timeout), multi_tenant=True)
        except (RuntimeError, dist.DistStoreError) as err:
            raise _never_joined(rank, [0], hang_timeout, f"the store of rank 0 at {addr}:{port} did not answer "
                                f"({err})") from err
        _stores.append(store)
        return store
    agent = dist.TCPStore(addr, port, world_size, is_master=False, timeout=timedelta(seconds=hang_timeout))
    if rank == 0:
        token = secrets.token_hex(8)
        store = dist.TCPStore(addr, 0, world_size, is_master=True, wait_for_workers=False,
                              timeout=timedelta(seconds=hang_timeout))
        store.set("acctrain/token", token)
        agent.set(f"acctrain/round-store/{forming}", f"{store.port} {token}")
        _stores.append(store)
        return store
    last = ""
    while time.monotonic() < deadline:  # the published address is the previous round's until rank 0 renews it
        published = agent.get(f"acctrain/round-store/{forming}").decode()
        if published != last:
            last = published
            store_port, token = published.split()
            store = _answering(addr, int(store_port), world_size, token)
            if store is not None:
                _stores.append(store)
                return store
        time.sleep(0.1)
    raise _never_joined(rank, [0], hang_timeout, f"rank 0 published no store of this round at {addr} "
                        "(through torchrun's agent store)")


def _answering(addr: str, port: int, world_size: int, token: str) -> dist.Store | None:
    """A client of the store at addr:port if it answers within a second and holds `token`; else None."""
    try:
        store = dist.TCPStore(addr, port, world_size, is_master=False, timeout=timedelta(seconds=1))
        if store.get("acctrain/token").decode() == token:
            return store
    except (RuntimeError, dist.DistStoreError):
        pass
    return None


def wait_for_ranks(store: dist.Store, rank: int, world_size: int, hang_timeout: float) -> None:
    """Record this rank in the round's store and wait at most `hang_timeout` for every other rank to do so."""
    store.set(f"acctrain/joined/{rank}", f"{socket.gethostname()} pid {os.getpid()}")
    keys = [f"acctrain/joined/{r}" for r in range(world_size)]
    try:
        store.wait(keys, timedelta(seconds=hang_timeout))
    except (RuntimeError, dist.DistStoreError) as err:
        missing = [r for r, key in enumerate(keys) if not store.check([key])]
        if not missing:  # they all came as the wait ended
            return
        raise _never_joined(rank, missing, hang_timeout, "") from err


def _never_joined(rank: int, missing: list[int], hang_timeout: float, detail: str) -> HangError:
    ranks = ", ".join(map(str, missing))
    return HangError(
        f"rank {rank} ({socket.gethostname()}): rank(s) {ranks} of {os.environ.get('WORLD_SIZE')} never joined the "
        f"process group within hang_timeout={hang_timeout:g} s{': ' + detail if detail else ''}. Check that every "
        "node's launcher started (the same --nnodes, --nproc_per_node and rendezvous endpoint on each), that "
        "MASTER_ADDR/MASTER_PORT reach rank 0 from every node, and the missing ranks' own output.")
