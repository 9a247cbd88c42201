"""acctrain.schedules beyond tests/test_schedules.py (which checks the values against the shared reference
tables and torch): resuming with `continue_from`, reduce_on_plateau stepped by hand, and the edges of warmup.

Expected values are closed forms computed here (exact fractions where the schedule is piecewise linear), and
reduce_on_plateau's factor and counters are followed evaluation by evaluation from its documented rule.
"""

from __future__ import annotations

import json
import math
from fractions import Fraction

import pytest

from acctrain.errors import ConfigError
from acctrain.schedules import build_schedule

REL = 1e-12


def factors(sched, n):
    return [sched.lr_factor(k) for k in range(n)]


def saved(sched) -> dict:
    """A schedule's state as a checkpoint holds it (through JSON)."""
    return json.loads(json.dumps(sched.state_dict(), allow_nan=False))


def warmup_linear(total: int, warmup: int):
    """The documented warmup_linear factor, exactly: k/warmup, then linear from 1 to 0 at total."""
    return lambda k: Fraction(k, warmup) if k < warmup else max(Fraction(0), Fraction(total - k, total - warmup))


def plateau(args: dict, metrics: list[float]):
    sched = build_schedule("reduce_on_plateau", 50, args=args)
    for m in metrics:
        sched.on_evaluate(m)
    return sched


# ---- continue_from: a resume's schedule ----------------------------------------------------------------------


@pytest.mark.parametrize("name, kw", [("warmup_linear", {"warmup_steps": 10}), ("one_cycle", {"args": {"div": 10}}),
                                      ("sgdr", {"steps_per_epoch": 7}), ("multistep", {"args": {"milestones": [9]}})])
def test_the_same_schedule_continues_with_nothing_to_say(name, kw):
    before = build_schedule(name, 100, **kw)
    now = build_schedule(name, 100, **kw)
    assert now.continue_from(saved(before)) == []
    assert factors(now, 101) == factors(before, 101) and now.state_dict() == before.state_dict()


def test_reduce_on_plateau_continues_its_counters():
    args = {"patience": 1, "factor": 0.5}
    before = plateau(args, [3.0, 2.0, 2.5, 2.5, 2.4])  # best 2.0; two bad: cut to 0.5; one bad since
    now = build_schedule("reduce_on_plateau", 50, args=args)
    assert now.continue_from(saved(before)) == []
    assert now.state == {"best": 2.0, "bad": 1, "factor": 0.5}
    now.on_evaluate(2.2)  # the second bad evaluation since the cut: patience 1 is exceeded
    assert now.lr_factor(0) == 0.25 and now.state["bad"] == 0


def test_a_longer_run_says_so_and_takes_its_own_length():
    before = build_schedule("warmup_linear", 100, warmup_steps=10)
    now = build_schedule("warmup_linear", 200, warmup_steps=10)
    assert now.continue_from(saved(before)) == ["total_steps 100 -> 200"]
    want = warmup_linear(200, 10)
    assert factors(now, 201) == pytest.approx([float(want(k)) for k in range(201)], rel=REL, abs=0)
    assert now.lr_factor(150) == pytest.approx(50 / 190, rel=REL)  # not the 100-step run's 0


def test_every_changed_setting_is_listed_in_order():
    before = build_schedule("warmup_cosine", 100, warmup_steps=10, args={"min_lr_ratio": 0.1})
    now = build_schedule("warmup_cosine", 120, warmup_steps=12, steps_per_epoch=6, args={"min_lr_ratio": 0.2})
    assert now.continue_from(saved(before)) == [
        "total_steps 100 -> 120", "warmup_steps 10 -> 12", "steps_per_epoch None -> 6",
        "args {'min_lr_ratio': 0.1} -> {'min_lr_ratio': 0.2}"]
    assert now.lr_factor(120) == pytest.approx(0.2, rel=REL) and now.lr_factor(12) == 1.0


def test_reduce_on_plateau_with_new_settings_keeps_its_counters_and_takes_the_settings():
    before = plateau({"patience": 3, "factor": 0.5}, [1.0, 2.0, 2.0, 2.0, 2.0])  # a cut after 4 bad: 0.5
    assert before.state == {"best": 1.0, "bad": 0, "factor": 0.5}
    now = build_schedule("reduce_on_plateau", 80, args={"patience": 0, "factor": 0.5})
    changes = now.continue_from(saved(before))
    assert changes[0] == "total_steps 50 -> 80" and changes[1].startswith("args {") and len(changes) == 2
    assert "'patience': 3" in changes[1] and "'patience': 0" in changes[1]
    assert now.state == {"best": 1.0, "bad": 0, "factor": 0.5}
    now.on_evaluate(1.5)  # patience 0 now: the first bad evaluation cuts
    assert now.lr_factor(0) == 0.25


def test_another_schedule_starts_afresh_and_says_what_changed():
    before = plateau({"patience": 0}, [1.0, 2.0])  # cut to 0.1
    now = build_schedule("constant", 50)
    assert now.continue_from(saved(before))[0] == "name reduce_on_plateau -> constant"
    assert now.state == {} and factors(now, 50) == [1.0] * 50
    onecycle = build_schedule("one_cycle", 40)
    wl = build_schedule("warmup_linear", 40, warmup_steps=4)
    assert wl.continue_from(saved(onecycle)) == ["name one_cycle -> warmup_linear", "warmup_steps 0 -> 4",
                                                 f"args {onecycle.args} -> {{}}"]
    assert factors(wl, 41) == pytest.approx([float(warmup_linear(40, 4)(k)) for k in range(41)], rel=REL, abs=0)
    assert wl.momentum(0) is None


def test_a_schedule_function_continues_as_the_new_runs_function():
    fn = build_schedule(lambda k: 0.5**k, 10)
    assert fn.continue_from({"name": "function"}) == [] and fn.lr_factor(3) == 0.125
    assert fn.continue_from(saved(build_schedule("constant", 10))) == ["name constant -> function"]


# ---- reduce_on_plateau, stepped by hand ----------------------------------------------------------------------


def test_patience_counts_evaluations_without_an_improvement_beyond_the_threshold():
    """min mode, threshold 1e-2: an improvement must beat best * 0.99. (best, bad, factor) after each."""
    sched = build_schedule("reduce_on_plateau", 50, args={"patience": 2, "factor": 0.5, "threshold": 1e-2})
    steps = [(10.0, (10.0, 0, 1.0)),   # the first finite metric beats +inf
             (9.95, (10.0, 1, 1.0)),   # 9.95 > 9.9: not enough
             (9.9, (10.0, 2, 1.0)),    # 9.9 == 10 * 0.99: not below it
             (9.95, (10.0, 0, 0.5)),   # third bad > patience 2: cut, count again
             (9.8, (9.8, 0, 0.5)),     # below 9.9: the new best
             (9.71, (9.8, 1, 0.5)), (9.71, (9.8, 2, 0.5)), (9.71, (9.8, 0, 0.25))]
    for metric, (best, bad, factor) in steps:
        sched.on_evaluate(metric)
        assert (sched.state["best"], sched.state["bad"], sched.state["factor"]) == (best, bad, factor), metric
        assert sched.lr_factor(0) == sched.lr_factor(49) == factor  # the same for every step


def test_the_factor_stops_at_min_factor_and_changes_smaller_than_eps_are_not_made():
    floor = plateau({"patience": 0, "factor": 0.5, "min_factor": 0.2}, [1.0] + [2.0] * 6)
    assert floor.lr_factor(0) == 0.2  # 1 -> 0.5 -> 0.25 -> 0.2, then 0.2 stays
    cuts = []
    sched = build_schedule("reduce_on_plateau", 50, args={"patience": 0, "factor": 0.1, "eps": 0.5})
    for m in [1.0, 2.0, 2.0, 2.0]:
        sched.on_evaluate(m)
        cuts.append(sched.lr_factor(0))
    assert cuts == [1.0, 0.1, 0.1, 0.1]  # 1 -> 0.1 changes by 0.9 > eps; 0.1 -> 0.01 by 0.09 <= eps: not made
    assert sched.state["bad"] == 0  # the counter restarts all the same
    exact = plateau({"patience": 0, "factor": 0.5, "eps": 0.25}, [1.0, 2.0, 2.0])
    assert exact.lr_factor(0) == 0.5  # 1 -> 0.5 is made; 0.5 -> 0.25 changes by exactly eps: not made


def test_max_mode_watches_a_rising_metric_by_its_name():
    sched = build_schedule("reduce_on_plateau", 50, args={"mode": "max", "patience": 1, "factor": 0.5,
                                                           "threshold": 0.0, "metric": "eval/accuracy"})
    assert sched.watches == "eval/accuracy" and sched.momentum(0) is None
    for m, factor in [(0.5, 1.0), (0.6, 1.0), (0.6, 1.0), (0.55, 0.5), (0.7, 0.5), (0.2, 0.5), (0.2, 0.25)]:
        sched.on_evaluate(m)
        assert sched.lr_factor(0) == factor, m


def test_only_reduce_on_plateau_reacts_to_evaluations():
    for name, kw in [("constant", {}), ("warmup_linear", {"warmup_steps": 3}), ("one_cycle", {})]:
        sched = build_schedule(name, 30, **kw)
        before, state = factors(sched, 31), sched.state_dict()
        for m in [5.0, 6.0, 7.0, math.nan]:
            sched.on_evaluate(m)
        assert factors(sched, 31) == before and sched.state_dict() == state
        assert sched.watches == "eval/loss"


# ---- warmup edges --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("total, warmup", [(2, 1), (10, 1), (10, 9), (7, 3), (100, 99)])
def test_warmup_linear_from_the_shortest_to_the_longest_warmup(total, warmup):
    sched = build_schedule("warmup_linear", total, warmup_steps=warmup)
    want = warmup_linear(total, warmup)
    assert factors(sched, total + 3) == pytest.approx([float(want(k)) for k in range(total + 3)], rel=REL, abs=0)
    assert sched.lr_factor(warmup) == 1.0 and sched.lr_factor(0) == 0.0 and sched.lr_factor(total) == 0.0


def test_warmup_ratio_is_the_ceiling_of_the_exact_fraction_of_the_run():
    """ceil(ratio * total) of the decimal ratio, not of its binary float (0.07 * 100 is 7.000000000000001)."""
    for ratio in ("0.01", "0.05", "0.07", "0.1", "0.15", "0.2", "0.29", "0.3", "0.45", "0.6", "0.99"):
        for total in range(1, 301):
            warmup = math.ceil(Fraction(ratio) * total)
            if warmup >= total:
                with pytest.raises(ConfigError) as err:
                    build_schedule("warmup_linear", total, warmup_ratio=float(ratio))
                assert err.value.field == "warmup_ratio"
            else:
                assert build_schedule("warmup_linear", total, warmup_ratio=float(ratio)).warmup_steps == warmup, (
                    ratio, total)


def test_warmup_cosine_reaches_1_at_the_warmups_end_and_the_floor_at_the_runs():
    sched = build_schedule("warmup_cosine", 40, warmup_steps=1, args={"min_lr_ratio": 0.25})
    assert sched.lr_factor(0) == 0.0 and sched.lr_factor(1) == 1.0
    assert sched.lr_factor(20) == pytest.approx(0.25 + 0.75 * (1 + math.cos(math.pi * 19 / 39)) / 2, rel=REL)
    assert sched.lr_factor(40) == pytest.approx(0.25, rel=REL) and sched.lr_factor(1000) == pytest.approx(0.25, rel=REL)


def test_warmup_stable_decays_warmup_may_end_exactly_where_the_decay_starts():
    edge = build_schedule("warmup_stable_decay", 100, warmup_steps=80, args={"decay_ratio": 0.2})
    assert [edge.lr_factor(k) for k in (0, 40, 79, 80, 90, 100)] == pytest.approx([0, 0.5, 79 / 80, 1.0, 0.5, 0.0],
                                                                                   rel=REL, abs=0)
    with pytest.raises(ConfigError) as err:
        build_schedule("warmup_stable_decay", 100, warmup_steps=81, args={"decay_ratio": 0.2})
    assert err.value.field == "schedule_args.decay_ratio" and "81-step warmup" in str(err.value)


def test_a_warmup_on_a_schedule_without_one_is_refused_naming_the_field():
    for name in ("constant", "one_cycle", "flat_cos", "reduce_on_plateau"):
        for kw, field in (({"warmup_steps": 2}, "warmup_steps"), ({"warmup_ratio": 0.1}, "warmup_ratio")):
            with pytest.raises(ConfigError) as err:
                build_schedule(name, 50, **kw)
            assert err.value.field == field and "has no warmup phase" in str(err.value)


def test_steps_past_the_end_keep_the_final_value():
    for name, kw, final in [("warmup_linear", {"warmup_steps": 2}, 0.0), ("one_cycle", {}, 1e-5),
                            ("flat_cos", {"args": {"div_final": 100}}, 0.01), ("warmup_cosine", {"warmup_steps": 2}, 0.0)]:
        sched = build_schedule(name, 20, **kw)
        assert [sched.lr_factor(k) for k in (20, 21, 500)] == pytest.approx([final] * 3, rel=REL, abs=1e-15), name
