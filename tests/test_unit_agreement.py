"""acctrain.agreement's pure parts against references written from their documentation, exhaustively.

tests/test_agreement.py checks chosen cases; here every combination: the flags of every request on up to
three ranks summed as the all-reduce sums them, and `decide` over a grid of losses, gradient norms, loss
scales, policies, skip counts and requests, against a truth table of the NaN policy written out below.
`reduce_step` needs an Accelerator and is exercised by the Engine's tests; only its one-process path (no
collective: the numbers given back as they were) is checked here, on a real one-process Accelerator.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from acctrain.agreement import (APPLY, MIN_LOSS_SCALE, NO_FLAGS, NO_REQUESTS, Policy, Requests, Verdict, decide,
                                reduce_step)
from acctrain.callbacks import CancelEpoch, CancelFit, CancelStep

NAN, INF = math.nan, math.inf
STRENGTH = {None: 0, CancelStep: 1, CancelEpoch: 2, CancelFit: 3}  # CANCELS' order, weakest to strongest
EVERY_REQUEST = [Requests(stop, cancel, save) for stop in (False, True) for cancel in STRENGTH for save in (False, True)]


# ---- Requests ------------------------------------------------------------------------------------------------


def test_flags_are_stop_each_cancel_and_save_as_zero_or_one():
    for r in EVERY_REQUEST:
        want = [float(r.stop), float(r.cancel is CancelStep), float(r.cancel is CancelEpoch),
                float(r.cancel is CancelFit), float(r.save)]
        assert r.flags() == want
    assert NO_FLAGS == [0.0] * 5 and NO_REQUESTS == Requests()


@pytest.mark.parametrize("ranks", [1, 2, 3])
def test_summed_flags_agree_on_any_stop_any_save_and_the_strongest_cancel(ranks):
    """Every assignment of requests to the ranks (16, 256 and 4096 of them), summed per flag."""
    for asked in itertools.product(EVERY_REQUEST, repeat=ranks):
        summed = [sum(column) for column in zip(*(r.flags() for r in asked))]
        agreed = Requests.agreed(summed)
        strongest = max((r.cancel for r in asked), key=STRENGTH.__getitem__)
        assert agreed == Requests(stop=any(r.stop for r in asked), cancel=strongest,
                                  save=any(r.save for r in asked)), asked
        if not any(summed):
            assert agreed is NO_REQUESTS  # the common case allocates nothing


def test_flags_read_back_from_a_float_tensor_agree_the_same():
    """With several processes the sums come back as floats, read from a device tensor of the step's dtype."""
    summed = torch.tensor([3.0, 0.0, 2.0, 0.0, 1.0], dtype=torch.bfloat16).tolist()
    assert Requests.agreed(summed) == Requests(stop=True, cancel=CancelEpoch, save=True)


# ---- decide: the NaN policy's truth table --------------------------------------------------------------------

LOSSES = [2.5, NAN, INF, -INF]
NORMS = [0.7, NAN, INF]
SCALES = [None, 65536.0, 2.0, MIN_LOSS_SCALE, 0.5]
POLICIES = [Policy("skip", 1), Policy("skip", 3), Policy("halt", 3)]
SKIPPED = [0, 1, 2]
ASKED = [NO_REQUESTS, Requests(stop=True), Requests(cancel=CancelStep), Requests(cancel=CancelFit, save=True)]


def reference(loss, norm, scale, policy, skipped, asked) -> dict:
    """What the step does, from agreement.decide's docstring and the NaN policy of the README, as a table row:
    finite: applied unless a cancel was asked; a non-finite norm under a scaler above its floor: the scaler's
    overflow; anything else non-finite: the policy's (halt, or skip until max_skipped_steps in a row)."""
    finite = math.isfinite(loss) and math.isfinite(norm)
    overflow = not finite and scale is not None and scale > MIN_LOSS_SCALE and not math.isfinite(norm)
    policy_decides = not finite and not overflow
    halt = policy_decides and (policy.nan_policy == "halt" or skipped + 1 >= policy.max_skipped_steps)
    return {"apply": finite and asked.cancel is None, "finite": finite, "overflow": overflow,
            "refused": policy_decides and not halt, "halt": halt, "requests": asked}


GRID = list(itertools.product(LOSSES, NORMS, SCALES, POLICIES, SKIPPED, ASKED))


def test_every_verdict_is_the_tables():
    assert len(GRID) == 2160
    for loss, norm, scale, policy, skipped, asked in GRID:
        v = decide(loss, norm, asked, policy, step=17, skipped_in_a_row=skipped, loss_scale=scale)
        got = {"apply": v.apply, "finite": v.finite, "overflow": v.overflow, "refused": v.refused,
               "halt": v.halt is not None, "requests": v.requests}
        assert got == reference(loss, norm, scale, policy, skipped, asked), (loss, norm, scale, policy, skipped, asked)


def test_the_flags_of_the_all_reduce_decide_as_the_requests_they_stand_for():
    for loss, norm, scale, policy, skipped, asked in GRID[::7]:
        assert decide(loss, norm, asked.flags(), policy, 5, skipped, scale) == decide(loss, norm, asked, policy, 5,
                                                                                      skipped, scale)


def test_a_finite_step_with_nothing_asked_is_the_one_apply_verdict():
    assert decide(1.0, 1.0, NO_FLAGS, Policy(), step=1) is APPLY
    assert decide(1.0, 1.0, NO_REQUESTS, Policy(), step=1, loss_scale=8.0) is APPLY
    assert APPLY == Verdict(apply=True, finite=True) and APPLY.requests == NO_REQUESTS


def test_the_reasons_name_the_step_the_values_and_the_cause():
    skip = decide(NAN, 0.5, NO_REQUESTS, Policy("skip", 10), step=12)
    assert skip.reason == "non-finite loss at optimizer step 12 (loss nan, grad norm 0.5)" and skip.halt is None
    norm = decide(1.0, INF, NO_REQUESTS, Policy("skip", 10), step=3)
    assert norm.reason == "non-finite gradient norm at optimizer step 3 (loss 1.0, grad norm inf)"
    halt = decide(NAN, NAN, NO_REQUESTS, Policy("halt", 10), step=4)
    assert halt.halt == "non-finite loss at optimizer step 4 (loss nan, grad norm nan) with nan_policy=halt"
    in_a_row = decide(1.0, NAN, NO_REQUESTS, Policy("skip", 3), step=9, skipped_in_a_row=2)
    assert in_a_row.halt == ("non-finite gradient norm at optimizer step 9 (loss 1.0, grad norm nan): "
                             "3 skipped steps in a row (max_skipped_steps)")
    overflow = decide(INF, INF, NO_REQUESTS, Policy("halt"), step=6, loss_scale=1024.0)
    assert overflow.reason == "fp16 overflow at optimizer step 6 (gradient norm inf)" and overflow.halt is None
    floor = decide(INF, INF, NO_REQUESTS, Policy("halt"), step=6, loss_scale=MIN_LOSS_SCALE)
    assert floor.halt == ("non-finite loss at optimizer step 6 (loss inf, grad norm inf) with the fp16 loss scale "
                          "at its floor (1) with nan_policy=halt")
    finite_grads = decide(NAN, 2.0, NO_REQUESTS, Policy("skip"), step=2, loss_scale=1024.0)
    assert finite_grads.reason == ("non-finite loss at optimizer step 2 (loss nan, grad norm 2.0) "
                                   "(finite gradients: not an fp16 overflow)")


def test_max_skipped_steps_halts_exactly_at_the_limit():
    """The k-th skipped step in a row halts when k == max_skipped_steps: k - 1 skips are tolerated."""
    for limit in (1, 2, 5):
        outcomes = [decide(NAN, NAN, NO_REQUESTS, Policy("skip", limit), step=s, skipped_in_a_row=s - 1).halt is None
                    for s in range(1, limit + 3)]
        assert outcomes == [True] * (limit - 1) + [False] * 3


# ---- Verdict: cancels merged after before_optimizer_step, and raised -----------------------------------------


@pytest.mark.parametrize("verdict", [APPLY, decide(1.0, 1.0, Requests(stop=True, cancel=CancelEpoch), Policy(), 1),
                                     decide(NAN, NAN, NO_REQUESTS, Policy("skip"), 1),
                                     decide(NAN, NAN, Requests(cancel=CancelStep), Policy("halt"), 1)],
                         ids=["apply", "stop-and-cancel-epoch", "refused", "halt-and-cancel-step"])
def test_a_later_cancel_wins_only_if_stronger_and_keeps_everything_else(verdict):
    assert verdict.cancelled(None) is verdict
    for later in (CancelStep, CancelEpoch, CancelFit):
        merged = verdict.cancelled(later)
        want = max(verdict.requests.cancel, later, key=STRENGTH.__getitem__)
        assert merged.requests == Requests(verdict.requests.stop, want, verdict.requests.save)
        assert merged.apply is False
        assert (merged.finite, merged.overflow, merged.refused, merged.halt, merged.reason) == (
            verdict.finite, verdict.overflow, verdict.refused, verdict.halt, verdict.reason)


def test_only_epoch_and_fit_cancels_are_raised():
    for cancel in STRENGTH:
        verdict = Verdict(apply=cancel is None, finite=True, requests=Requests(cancel=cancel))
        if cancel in (CancelEpoch, CancelFit):
            with pytest.raises(cancel):
                verdict.raise_if_cancelled()
        else:
            verdict.raise_if_cancelled()  # CancelStep only skips the update; nothing to raise


# ---- reduce_step on one process ------------------------------------------------------------------------------


def test_one_process_reduces_nothing_and_gives_the_numbers_back():
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    assert accelerator.num_processes == 1
    loss, items = torch.tensor(3.5), torch.tensor(7.0)
    quiet = reduce_step(accelerator, loss, items, NO_REQUESTS, torch.float32)
    assert quiet.loss_sum is loss and quiet.items is items and quiet.requests == NO_FLAGS
    asked = Requests(stop=True, cancel=CancelFit)
    totals = reduce_step(accelerator, loss, 4, asked, torch.float32)
    assert totals.items == 4 and totals.requests == asked.flags()
    assert Requests.agreed(totals.requests) == asked
