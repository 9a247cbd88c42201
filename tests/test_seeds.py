"""Every random stream of a run has a seed of its own: derived from (seed, purpose, index) by SeedSequence, so no
two purposes or indices share one; a checkpoint written with the earlier scheme resumes with it."""

from __future__ import annotations

import json

import torch

from acctrain import Engine, TrainConfig, seeds
from tests.support.runs import copy_of, rewrite
from tests.support.tiny import RUN_ON_CPU, VarLenTokens, collate, make_model, token_loss


def test_no_two_streams_share_a_seed():
    drawn = {}
    for seed in (0, 1, 2, 2**32 - 1):
        for i in range(200):
            for name, value in [("order", seeds.order_seed(seed, i)), ("loader", seeds.loader_seed(seed, i)),
                                ("rank", seeds.rank_seed(seed, i)), ("rank at step", seeds.rank_seed(seed, 0, i)),
                                ("rank 1 at step", seeds.rank_seed(seed, 1, i))]:
                assert value not in drawn, f"{name} {seed} {i} collides with {drawn[value]}"
                assert 0 <= value < 2**63
                drawn[value] = (name, seed, i)
    assert len(drawn) == 4 * 200 * 5


def test_the_first_scheme_made_rank_r_draw_the_order_of_epoch_r():
    """Why the scheme changed: in scheme 1 rank r's dropout generator had the seed of epoch r's sample order."""
    assert all(seeds.rank_seed(7, r, scheme=1) == seeds.order_seed(7, r, scheme=1) for r in range(8))
    assert all(seeds.rank_seed(7, r) != seeds.order_seed(7, r) for r in range(8))


def test_a_checkpoint_of_the_first_scheme_resumes_with_it(six, tmp_path):
    out = copy_of(six, tmp_path)
    newest = out / "checkpoints" / "step-00000006"
    state = json.loads((newest / "trainer_state.json").read_text())
    assert state["plan"]["seed_scheme"] == seeds.SCHEME == 2
    plan = {k: v for k, v in state["plan"].items() if k != "seed_scheme"}  # written before schemes were recorded
    rewrite(newest, "trainer_state.json", json.dumps({**state, "plan": plan}).encode())
    cfg = TrainConfig(output_dir=str(out), global_batch_size=8, micro_batch_size=2, max_steps=8, log_every=1, lr=1e-2,
                      warmup_steps=2, cpu=RUN_ON_CPU)
    engine = Engine(make_model(0), cfg, VarLenTokens(26), VarLenTokens(6), loss_fn=token_loss, collate_fn=collate)
    assert engine.plan.seed_scheme == 2
    engine.resume()
    assert engine.plan.seed_scheme == 1
    old_order = torch.randperm(26, generator=torch.Generator().manual_seed(0 * 1_000_003 + 1)).tolist()
    assert engine.plan.order(1).tolist() == old_order
    engine.fit()
    assert json.loads((out / "checkpoints" / "step-00000008" / "trainer_state.json").read_text())["plan"][
        "seed_scheme"] == 1  # and it stays with it
