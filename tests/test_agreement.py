"""The step's decision as a pure function: the NaN policy, fp16 overflows, cancels and stops, without processes."""

from __future__ import annotations

import math

import pytest

from acctrain.agreement import MIN_LOSS_SCALE, NO_REQUESTS, Policy, Requests, decide
from acctrain.callbacks import CancelEpoch, CancelFit, CancelStep

NAN, INF = math.nan, math.inf
NONE = [0.0, 0.0, 0.0, 0.0, 0.0]


def test_a_finite_step_is_applied_unless_cancelled():
    assert decide(2.0, 1.0, NONE, Policy(), step=3).apply
    assert not decide(2.0, 1.0, [0.0, 1.0, 0.0, 0.0, 0.0], Policy(), step=3).apply  # CancelStep on a rank


def test_requests_survive_the_sum_over_ranks():
    """Each rank's flags summed (the all-reduce) give back what any rank asked, and the strongest cancel."""
    ranks = [Requests(save=True), Requests(cancel=CancelStep), Requests(stop=True, cancel=CancelEpoch), Requests()]
    summed = [sum(column) for column in zip(*(r.flags() for r in ranks))]
    assert Requests.agreed(summed) == Requests(stop=True, cancel=CancelEpoch, save=True)
    assert Requests.agreed(Requests(save=True).flags()) == Requests(save=True)
    assert Requests.agreed(Requests().flags()) is NO_REQUESTS


@pytest.mark.parametrize("loss,norm", [(NAN, NAN), (INF, 1.0), (2.0, INF)])
def test_without_a_scaler_the_nan_policy_decides(loss, norm):
    skip = decide(loss, norm, NONE, Policy("skip", 10), step=7)
    assert not skip.apply and skip.refused and not skip.halt and "optimizer step 7" in skip.reason
    halt = decide(loss, norm, NONE, Policy("halt", 10), step=7)
    assert not halt.apply and "optimizer step 7" in halt.halt and "nan_policy=halt" in halt.halt


def test_too_many_skips_in_a_row_halt():
    assert decide(NAN, NAN, NONE, Policy("skip", 3), step=9, skipped_in_a_row=1).refused
    verdict = decide(NAN, NAN, NONE, Policy("skip", 3), step=9, skipped_in_a_row=2)
    assert "3 skipped steps in a row" in verdict.halt


def test_an_fp16_overflow_is_the_scalers_above_its_floor_and_the_policys_at_it():
    overflow = decide(INF, INF, NONE, Policy("halt"), step=4, loss_scale=65536.0)
    assert overflow.overflow and not overflow.apply and not overflow.refused and not overflow.halt
    at_floor = decide(NAN, NAN, NONE, Policy("halt"), step=4, loss_scale=MIN_LOSS_SCALE)
    assert "loss scale at its floor" in at_floor.halt


def test_a_non_finite_loss_with_finite_gradients_is_not_an_overflow():
    """The scaler's update() would not lower the scale (its found_inf is 0): the NaN policy must decide."""
    verdict = decide(NAN, 1.5, NONE, Policy("halt"), step=2, loss_scale=65536.0)
    assert not verdict.overflow and "finite gradients: not an fp16 overflow" in verdict.halt
    assert decide(NAN, 1.5, NONE, Policy("skip"), step=2, loss_scale=65536.0).refused


def test_requests_agree_on_any_stop_and_the_strongest_cancel():
    two_ranks = [a + b for a, b in zip(Requests(cancel=CancelStep).flags(), Requests(stop=True, cancel=CancelFit).flags())]
    agreed = Requests.agreed(two_ranks)
    assert agreed.stop and agreed.cancel is CancelFit
    verdict = decide(1.0, 1.0, NONE, Policy(), step=1).cancelled(CancelEpoch)
    assert not verdict.apply
    with pytest.raises(CancelEpoch):
        verdict.raise_if_cancelled()
    decide(1.0, 1.0, Requests(cancel=CancelStep).flags(), Policy(), step=1).raise_if_cancelled()  # nothing to raise
