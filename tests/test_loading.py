"""Loading with worker processes: the same run as loading in the main process, across epochs and a resume, with
one set of workers for the whole fit (acctrain.data.Feed)."""

from __future__ import annotations

import multiprocessing
import os

import pytest
import torch

from acctrain import Engine, TrainConfig
from acctrain.callbacks import Callback, CancelEpoch
from acctrain.errors import Preempted
from tests.support import assert_same_run
from tests.support.tiny import VarLenTokens, collate, make_model, token_loss
from tests.workers import resume_run


class Pids(torch.utils.data.Dataset):
    """VarLenTokens' samples, each with the process that loaded it."""

    def __init__(self, n: int):
        self.data = VarLenTokens(n)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int):
        return (*self.data[i], os.getpid())


def pid_collate(items):
    batch = collate([(ids, labels) for ids, labels, _ in items])
    batch["pid"] = torch.tensor([pid for _, _, pid in items])
    return batch


def run_with(tmp_path, num_workers: int, callbacks=()):
    """Three epochs of 4 steps (26 samples, global batch 8: the last step of each epoch is short)."""
    pids, losses = set(), []

    def loss_fn(model, batch):
        pid = batch.pop("pid").tolist()
        if torch.is_grad_enabled():  # training's batches (fit's check of the first micro-batch runs without grad)
            pids.update(pid)
        out = token_loss(model, batch)
        losses.append(float(out[0].detach()))
        return out

    cfg = TrainConfig(output_dir=str(tmp_path / f"w{num_workers}"), global_batch_size=8, micro_batch_size=2, epochs=3,
                      lr=1e-2, num_workers=num_workers, log_every=100)
    engine = Engine(make_model(0), cfg, Pids(26), loss_fn=loss_fn, collate_fn=pid_collate, callbacks=list(callbacks))
    engine.fit()
    assert not multiprocessing.active_children()  # the workers ended with the fit
    params = {n: p.detach().clone() for n, p in engine.unwrapped_model.named_parameters()}
    engine.close()
    return params, losses, pids


def test_workers_give_the_same_run_as_the_main_process_and_start_once_per_fit(tmp_path):
    main_params, main_losses, main_pids = run_with(tmp_path, 0)
    params, losses, pids = run_with(tmp_path, 2)
    assert main_pids == {os.getpid()}
    assert len(pids) == 2 and os.getpid() not in pids  # two workers for all three epochs (a loader per epoch: 6)
    assert losses == main_losses
    assert all(torch.equal(params[n], main_params[n]) for n in params)


class CancelSecondEpoch(Callback):
    def before_step(self, engine):
        if engine.state.step == 5:  # the second step of the second epoch
            raise CancelEpoch


def test_a_cancelled_epoch_with_workers_skips_the_data_it_read_ahead(tmp_path):
    main_params, main_losses, _ = run_with(tmp_path, 0, [CancelSecondEpoch()])
    params, losses, _ = run_with(tmp_path, 2, [CancelSecondEpoch()])
    # 13 micro-batches an epoch (4 + 4 + 4 + 1), epoch 2 cut short: fit's check of the first micro-batch, epoch 1,
    # epoch 2's steps 5 and 6 (a cancel raised in before_step rides on the step's all-reduce: step 6 computes its
    # losses, then the epoch ends), epoch 3. Not two empty lists.
    assert losses == main_losses and len(losses) == 1 + 13 + 2 * 4 + 13
    assert all(torch.equal(params[n], main_params[n]) for n in params)


def test_a_run_with_workers_stopped_mid_epoch_resumes_bit_identical(tmp_path):
    reference = resume_run.run(str(tmp_path / "ref"))  # no workers
    with pytest.raises(Preempted):
        resume_run.run(str(tmp_path / "run"), stop_at=6, num_workers=2)
    resumed = resume_run.run(str(tmp_path / "run"), num_workers=2)
    assert resumed["steps"] == list(range(7, 11))
    assert_same_run(resumed, reference)
