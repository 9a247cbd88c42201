"""acctrain.schedules against the reference values in tests/data/schedules.md (1e-6 relative)."""

import json
import math
import sys

import pytest
import torch

from acctrain.errors import ConfigError
from acctrain.schedules import (SCHEDULES, build_schedule, check_schedule_config, combine, combined_cos, constant,
                                cosine, exponential, linear, plot_schedule, polynomial)

REL = 1e-6
POS = [0, 0.25, 0.5, 0.75, 1]


def close(actual, expected, rel=REL):
    assert len(actual) == len(expected)
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert a == pytest.approx(e, rel=rel, abs=1e-15), f"index {i}: {a} != {e}"


def factors(sched, n):
    return [sched.lr_factor(k) for k in range(n)]


# --- annealers -------------------------------------------------------------------------------------

@pytest.mark.parametrize("annealer, expected, printed", [
    (linear(0, 2), [0, 0.5, 1, 1.5, 2], None),
    (cosine(0, 2), [0, 1 - math.sqrt(0.5), 1, 1 + math.sqrt(0.5), 2], [0, 0.29289, 1, 1.70711, 2]),
    (constant(0, 2), [0, 0, 0, 0, 0], None),
    (exponential(1, 2), [1, 2**0.25, 2**0.5, 2**0.75, 2], [1, 1.18921, 1.41421, 1.68179, 2]),
    (polynomial(0, 2, power=2), [0, 0.125, 0.5, 1.125, 2], None),
    (polynomial(0, 2, power=0.5), [0, 1, math.sqrt(2), math.sqrt(3), 2], [0, 1, 1.41421, 1.73205, 2]),
])
def test_annealers_match_table(annealer, expected, printed):
    values = [annealer(p) for p in POS]
    close(values, expected)
    if printed:  # the table prints 5 decimals; the exact forms above must round to it
        assert [round(v, 5) for v in values] == printed


def test_combine_uses_each_schedule_over_its_local_position():
    f = combine([0.3, 0.7], [cosine(0.3, 0.6), cosine(0.6, 0.2)])
    first, second = cosine(0.3, 0.6), cosine(0.6, 0.2)
    expected = [first(0), first(0.25 / 0.3), second((0.5 - 0.3) / 0.7), second((0.75 - 0.3) / 0.7), second(1)]
    close([f(p) for p in POS], expected)
    close([f(p) for p in POS], [0.3, 0.3 + 0.3 * (1 - math.cos(math.pi * 0.25 / 0.3)) / 2,
                                0.6 - 0.4 * (1 - math.cos(math.pi * 0.2 / 0.7)) / 2,
                                0.6 - 0.4 * (1 - math.cos(math.pi * 0.45 / 0.7)) / 2, 0.2])


def test_combined_cos_is_two_cosines():
    f = combined_cos(0.25, 1.0, 3.0, 0.0)
    close([f(p) for p in POS], [1.0, 3.0, 2.25, 0.75, 0.0])  # local positions 1/3 and 2/3 of the fall
    g = combine([0.25, 0.75], [cosine(1.0, 3.0), cosine(3.0, 0.0)])
    close([f(p / 20) for p in range(21)], [g(p / 20) for p in range(21)])


def test_combine_rejects_pcts_not_summing_to_one():
    with pytest.raises(ValueError):
        combine([0.5, 0.6], [linear(0, 1), linear(1, 0)])


# --- one cycle: the 21-row table -------------------------------------------------------------------

ONE_CYCLE = [  # i, lr (lr_max=1e-2), momentum
    (0, 4.000000000e-04, 0.950000000), (1, 1.316718427e-03, 0.940450850), (2, 3.716718427e-03, 0.915450850),
    (3, 6.683281573e-03, 0.884549150), (4, 9.083281573e-03, 0.859549150), (5, 1.000000000e-02, 0.850000000),
    (6, 9.890739096e-03, 0.851092620), (7, 9.567731611e-03, 0.854322727), (8, 9.045094521e-03, 0.859549150),
    (9, 8.345669575e-03, 0.866543470), (10, 7.500025000e-03, 0.875000000), (11, 6.545119521e-03, 0.884549150),
    (12, 5.522687090e-03, 0.894773577), (13, 4.477412910e-03, 0.905226423), (14, 3.454980479e-03, 0.915450850),
    (15, 2.500075000e-03, 0.925000000), (16, 1.654430425e-03, 0.933456530), (17, 9.550054790e-04, 0.940450850),
    (18, 4.323683891e-04, 0.945677273), (19, 1.093609037e-04, 0.948907380), (20, 1.000000000e-07, 0.950000000),
]


def test_one_cycle_matches_fastai_table():
    sched = build_schedule("one_cycle", 20)
    close([1e-2 * sched.lr_factor(i) for i, _, _ in ONE_CYCLE], [lr for _, lr, _ in ONE_CYCLE])
    close([sched.momentum(i) for i, _, _ in ONE_CYCLE], [m for _, _, m in ONE_CYCLE])


def test_one_cycle_explicit_args_same_as_defaults_and_peak_at_pct_start():
    a = build_schedule("one_cycle", 20, args={"div": 25, "div_final": 1e5, "pct_start": 0.25,
                                              "moms": (0.95, 0.85, 0.95)})
    b = build_schedule("one_cycle", 20)
    assert factors(a, 21) == factors(b, 21)
    assert max(range(20), key=a.lr_factor) == 5  # fastai peaks at pos = pct_start; torch's OneCycleLR at 4


# --- warmup linear and the invariance ---------------------------------------------------------------

def test_warmup_linear_matches_table():
    sched = build_schedule("warmup_linear", 100, warmup_steps=10)
    table = {0: 0, 1: 0.1, 5: 0.5, 9: 0.9, 10: 1.0, 11: 89 / 90, 20: 80 / 90, 50: 50 / 90, 90: 10 / 90,
             99: 1 / 90, 100: 0, 101: 0, 500: 0}
    close([sched.lr_factor(k) for k in table], list(table.values()))
    close([1e-3 * sched.lr_factor(k) for k in (11, 20, 50, 90, 99)],
          [9.888889e-4, 8.888889e-4, 5.555556e-4, 1.111111e-4, 1.111111e-5], rel=1e-6)
    close(factors(sched, 100), [k / 10 if k < 10 else (100 - k) / 90 for k in range(100)])


def test_invariance_warmup_2_total_8():
    sched = build_schedule("warmup_linear", 8, warmup_steps=2)
    close(factors(sched, 8), [0, 0.5, 1.0, 5 / 6, 4 / 6, 0.5, 2 / 6, 1 / 6])
    assert [round(f, 4) for f in factors(sched, 8)] == [0, 0.5, 1.0, 0.8333, 0.6667, 0.5, 0.3333, 0.1667]
    assert sched.lr_factor(8) == 0.0  # the schedule ends at step 8


def test_values_are_pure_functions_of_the_step():
    for name, kw in [("warmup_cosine", {"warmup_steps": 4}), ("one_cycle", {}), ("sgdr", {"steps_per_epoch": 5}),
                     ("step", {"args": {"step_size": 3}})]:
        sched = build_schedule(name, 35, **kw)
        forward = factors(sched, 35)
        backward = [sched.lr_factor(k) for k in reversed(range(35))][::-1]
        assert forward == backward == factors(build_schedule(name, 35, **kw), 35)


def test_warmup_ratio_rounds_up():
    assert build_schedule("warmup_linear", 100, warmup_ratio=0.07).warmup_steps == 7
    assert build_schedule("warmup_linear", 8, warmup_ratio=0.2).warmup_steps == 2


# --- the other named schedules -------------------------------------------------------------------------

def test_warmup_cosine_floor():
    sched = build_schedule("warmup_cosine", 110, warmup_steps=10, args={"min_lr_ratio": 0.1})
    close([sched.lr_factor(k) for k in (0, 5, 10, 60, 110)], [0, 0.5, 1.0, 0.55, 0.1])
    close([sched.lr_factor(k) for k in range(10, 110)],
          [0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (k - 10) / 100)) for k in range(10, 110)])


@pytest.mark.parametrize("decay", ["linear", "cosine"])
def test_warmup_stable_decay(decay):
    sched = build_schedule("warmup_stable_decay", 100, warmup_steps=10,
                           args={"decay_ratio": 0.2, "min_lr_ratio": 0.0, "decay": decay})
    f = factors(sched, 101)
    close(f[:10], [k / 10 for k in range(10)])
    assert f[10:81] == [1.0] * 71
    close([f[90], f[100]], [0.5, 0.0])
    if decay == "linear":
        close(f[80:101], [(100 - k) / 20 for k in range(80, 101)])
    else:
        assert f[85] == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.25)), rel=REL)


def test_warmup_stable_decay_with_no_decay_is_constant_with_warmup():
    sched = build_schedule("warmup_stable_decay", 20, warmup_steps=4, args={"decay_ratio": 0})
    close(factors(sched, 20), [0, 0.25, 0.5, 0.75] + [1.0] * 16)


def test_flat_cos():
    sched = build_schedule("flat_cos", 100)
    f = factors(sched, 101)
    assert f[:76] == pytest.approx([1.0] * 76, rel=REL)
    close([f[k] for k in range(75, 101)],
          [1e-5 + (1 - 1e-5) * 0.5 * (1 + math.cos(math.pi * (k - 75) / 25)) for k in range(75, 101)])
    assert sched.momentum(50) is None


def test_sgdr_three_cycles_fill_seven_epochs():
    spe = 10
    sched = build_schedule("sgdr", 7 * spe, steps_per_epoch=spe)  # cycle_len=1, cycle_mult=2: 1 + 2 + 4 epochs
    f = factors(sched, 70)
    for start, length in [(0, 10), (10, 20), (30, 40)]:
        close(f[start:start + length], [0.5 * (1 + math.cos(math.pi * j / length)) for j in range(length)])
    assert [k for k in range(1, 70) if f[k] > f[k - 1]] == [10, 30]  # restarts from 1 exactly there
    assert sched.lr_factor(70) == pytest.approx(0.0, abs=1e-15)


def test_sgdr_last_cycle_is_cut_to_end_with_the_run():
    sched = build_schedule("sgdr", 5, steps_per_epoch=1, args={"cycle_len": 1, "cycle_mult": 3})
    # cycles of 1 and 3 steps, then a 9-step cycle cut to the 1 step left: a restart at step 4
    close(factors(sched, 6), [1.0, 1.0, 0.75, 0.25, 1.0, 0.0])


def test_step_multistep_exponential_match_torch():
    def torch_lrs(make, n):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        sched, lrs = make(opt), []
        for _ in range(n):
            lrs.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        return lrs

    lrs = torch.optim.lr_scheduler
    close(factors(build_schedule("step", 30, args={"step_size": 7, "gamma": 0.5}), 30),
          torch_lrs(lambda o: lrs.StepLR(o, step_size=7, gamma=0.5), 30))
    close(factors(build_schedule("multistep", 30, args={"milestones": [3, 10, 25]}), 30),
          torch_lrs(lambda o: lrs.MultiStepLR(o, milestones=[3, 10, 25], gamma=0.1), 30))
    close(factors(build_schedule("exponential", 30, args={"gamma": 0.9}), 30),
          torch_lrs(lambda o: lrs.ExponentialLR(o, gamma=0.9), 30))
    assert factors(build_schedule("constant", 5), 5) == [1.0] * 5


def plateau_factors(metrics, torch_args: dict, our_args: dict):
    """Our reduce_on_plateau's factor and torch's ReduceLROnPlateau's lr after each metric (one group at lr 1,
    so torch's eps acts on the factor), and our schedule."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    ref = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, **torch_args)
    sched = build_schedule("reduce_on_plateau", 100, args=our_args)
    ours, theirs = [], []
    for m in metrics:
        sched.on_evaluate(m)
        ref.step(m)
        ours.append(sched.lr_factor(37))
        theirs.append(opt.param_groups[0]["lr"])
    return ours, theirs, sched


def test_reduce_on_plateau_matches_torch():
    metrics = [5.0, 4.0, 4.0, 3.9999, 4.1, 3.0, 3.0, 3.0, 3.0, 2.5, 2.5, 2.5, 2.5, 2.5, 2.5, 2.5, float("nan")]
    ours, theirs, sched = plateau_factors(
        metrics, {"mode": "min", "factor": 0.5, "patience": 2, "threshold": 1e-3, "min_lr": 0.2, "eps": 0.0},
        {"factor": 0.5, "patience": 2, "threshold": 1e-3, "min_factor": 0.2})
    close(ours, theirs)
    assert min(ours) == 0.2 and ours[0] == 1.0 and sched.momentum(0) is None


PLATEAU_CASES = {  # metric sequences where a plain "best - threshold*|best|" rule parts from torch
    "infinite first metric": ("min", [math.inf, 5.0, 5.0, 5.0, 4.0, 4.0, 4.0, 4.0, 4.0]),
    "negative metrics": ("min", [-10.0, -9.9995, -9.9995, -9.9995, -9.9995, -12.0, -11.999, -11.999, -11.999]),
    "negative, max mode": ("max", [-10.0, -10.0005, -10.0005, -9.0, -9.0009, -9.0009, -9.0009, -8.0]),
    "NaN first": ("min", [math.nan, math.nan, math.nan, 3.0, 3.0, 3.0, 3.0]),
    "-inf in max mode": ("max", [-math.inf, 1.0, 1.0, 1.0, 1.0]),
    "eps stops tiny cuts": ("min", [1.0] + [2.0] * 40),
}


@pytest.mark.parametrize("case", list(PLATEAU_CASES))
def test_reduce_on_plateau_edge_cases_match_torch(case):
    mode, metrics = PLATEAU_CASES[case]
    ours, theirs, sched = plateau_factors(metrics, {"mode": mode, "factor": 0.1, "patience": 1, "threshold": 1e-4},
                                          {"mode": mode, "factor": 0.1, "patience": 1})
    assert ours == pytest.approx(theirs, rel=REL)
    json.dumps(sched.state_dict())  # still JSON (an infinite best is written as Infinity)


def test_reduce_on_plateau_max_mode():
    sched = build_schedule("reduce_on_plateau", 10, args={"mode": "max", "patience": 1})
    for m in [0.5, 0.6, 0.6, 0.6]:
        sched.on_evaluate(m)
    assert sched.lr_factor(0) == pytest.approx(0.1, rel=REL)


def test_user_function():
    sched = build_schedule(lambda k: 0.5**k, 10)
    assert factors(sched, 4) == [1.0, 0.5, 0.25, 0.125]
    assert sched.momentum(3) is None
    assert sched.state_dict() == {"name": "function"}
    sched.on_evaluate(1.0)  # a no-op
    other = build_schedule(lambda k: 1.0, 10)
    other.load_state_dict(json.loads(json.dumps(sched.state_dict())))
    assert other.lr_factor(3) == 1.0  # the function is code, not state: the new run's own is kept


# --- state ------------------------------------------------------------------------------------------

MINIMAL = {"sgdr": {"steps_per_epoch": 1}, "step": {"args": {"step_size": 1}},
           "multistep": {"args": {"milestones": [1]}}, "exponential": {"args": {"gamma": 0.5}}}


@pytest.mark.parametrize("name, kw", [
    ("warmup_linear", {"warmup_steps": 5}), ("warmup_cosine", {"warmup_ratio": 0.1, "args": {"min_lr_ratio": 0.1}}),
    ("warmup_stable_decay", {"warmup_steps": 3, "args": {"decay": "cosine", "decay_ratio": 0.3}}),
    ("one_cycle", {"args": {"div": 10, "moms": (0.9, 0.8, 0.9)}}), ("flat_cos", {"args": {"pct_start": 0.5}}),
    ("sgdr", {"steps_per_epoch": 4}), ("step", {"args": {"step_size": 4}}),
    ("multistep", {"args": {"milestones": [5, 9]}}), ("exponential", {"args": {"gamma": 0.95}}), ("constant", {}),
])
def test_state_round_trip_through_json(name, kw):
    sched = build_schedule(name, 40, **kw)
    saved = json.loads(json.dumps(sched.state_dict(), allow_nan=False))
    fresh = build_schedule(name, 7, **MINIMAL.get(name, {}))  # a different plan: loading restores the saved one
    fresh.load_state_dict(saved)
    assert fresh.state_dict() == saved
    assert factors(fresh, 41) == factors(sched, 41)
    assert [fresh.momentum(k) for k in range(41)] == [sched.momentum(k) for k in range(41)]


def test_reduce_on_plateau_state_round_trip_mid_way():
    args = {"patience": 1, "factor": 0.5}
    sched = build_schedule("reduce_on_plateau", 50, args=args)
    for m in [3.0, 2.0, 2.5, 2.5, 2.4]:  # one reduction, then one bad evaluation
        sched.on_evaluate(m)
    saved = json.loads(json.dumps(sched.state_dict(), allow_nan=False))
    assert saved["state"] == {"best": 2.0, "bad": 1, "factor": 0.5}
    fresh = build_schedule("reduce_on_plateau", 50, args=args)
    fresh.load_state_dict(saved)
    assert fresh.lr_factor(0) == sched.lr_factor(0) == 0.5
    for m in [2.6, 1.0, 1.1, 1.2]:
        sched.on_evaluate(m)
        fresh.on_evaluate(m)
        assert fresh.state_dict() == sched.state_dict()
    assert fresh.lr_factor(0) == 0.125


def test_load_refuses_another_schedule():
    saved = build_schedule("one_cycle", 10).state_dict()
    with pytest.raises(ConfigError) as e:
        build_schedule("warmup_linear", 10).load_state_dict(saved)
    assert e.value.field == "scheduler" and "one_cycle" in str(e.value)
    with pytest.raises(ConfigError) as e:
        build_schedule("one_cycle", 10).load_state_dict({**saved, "extra": 1})
    assert e.value.field == "scheduler"


# --- errors -----------------------------------------------------------------------------------------

def field_of(fn, *a, **kw):
    with pytest.raises(ConfigError) as e:
        fn(*a, **kw)
    assert str(e.value).startswith(e.value.field + ":")
    return e.value.field, str(e.value)


def test_warmup_longer_than_the_run():
    field, msg = field_of(build_schedule, "warmup_linear", 8, warmup_steps=8)
    assert field == "warmup_steps" and "8 optimizer steps" in msg
    field, msg = field_of(build_schedule, "warmup_linear", 5, warmup_ratio=0.9)
    assert field == "warmup_ratio" and "5 optimizer steps" in msg


@pytest.mark.parametrize("bad", [0, 1, -0.1, 1.5, "0.3"])
def test_pct_start_outside_unit_interval(bad):
    for name in ("one_cycle", "flat_cos"):
        field, msg = field_of(build_schedule, name, 10, args={"pct_start": bad})
        assert field == "schedule_args.pct_start" and "(0, 1)" in msg
        assert field_of(check_schedule_config, name, 0, 0.0, {"pct_start": bad})[0] == field


def test_unknown_name_suggests_close_match():
    field, msg = field_of(build_schedule, "one_cylce", 10)
    assert field == "scheduler" and "did you mean 'one_cycle'" in msg
    assert "warmup_cosine" in field_of(check_schedule_config, "warmup_cosin", 0, 0.0, {})[1]


@pytest.mark.parametrize("key", ["div", "div_final"])
@pytest.mark.parametrize("bad", [0, -25])
def test_div_must_be_positive(key, bad):
    assert field_of(build_schedule, "one_cycle", 10, args={key: bad})[0] == f"schedule_args.{key}"


def test_unknown_schedule_arg_lists_accepted_ones():
    field, msg = field_of(build_schedule, "one_cycle", 10, args={"pct_strat": 0.3})
    assert field == "schedule_args.pct_strat"
    assert "did you mean 'pct_start'" in msg and "div_final" in msg and "moms" in msg
    assert field_of(build_schedule, "constant", 10, args={"gamma": 0.1})[0] == "schedule_args.gamma"


@pytest.mark.parametrize("call, field", [
    (lambda: build_schedule("step", 10, args={"step_size": 2, "gamma": -0.1}), "schedule_args.gamma"),
    (lambda: build_schedule("exponential", 10), "schedule_args.gamma"),
    (lambda: build_schedule("step", 10), "schedule_args.step_size"),
    (lambda: build_schedule("multistep", 10, args={"milestones": [5, 3]}), "schedule_args.milestones"),
    (lambda: build_schedule("one_cycle", 10, args={"moms": [0.95, 0.85]}), "schedule_args.moms"),
    (lambda: build_schedule("reduce_on_plateau", 10, args={"mode": "lower"}), "schedule_args.mode"),
    (lambda: build_schedule("sgdr", 10), "steps_per_epoch"),
    (lambda: build_schedule("sgdr", 10, steps_per_epoch=2, args={"cycle_mult": 0.5}), "schedule_args.cycle_mult"),
    (lambda: build_schedule("constant", 0), "total_steps"),
    (lambda: build_schedule("constant", 2.5), "total_steps"),
    (lambda: build_schedule("warmup_linear", 10, warmup_steps=2, warmup_ratio=0.1), "warmup_ratio"),
    (lambda: build_schedule("warmup_linear", 10, warmup_steps=-1), "warmup_steps"),
    (lambda: build_schedule("warmup_linear", 10, warmup_ratio=1.0), "warmup_ratio"),
    (lambda: build_schedule("one_cycle", 10, warmup_steps=2), "warmup_steps"),
    (lambda: build_schedule("step", 10, warmup_ratio=0.1, args={"step_size": 2}), "warmup_ratio"),
    (lambda: build_schedule(lambda k: 1.0, 10, warmup_steps=1), "warmup_steps"),
    (lambda: build_schedule(lambda k: 1.0, 10, args={"x": 1}), "schedule_args"),
    (lambda: build_schedule("warmup_stable_decay", 10, warmup_steps=5, args={"decay_ratio": 0.6}),
     "schedule_args.decay_ratio"),
    (lambda: build_schedule(None, 10), "scheduler"),
])
def test_bad_parameters_name_their_field(call, field):
    assert field_of(call)[0] == field


def test_check_schedule_config_needs_no_total_and_fills_defaults():
    assert check_schedule_config("one_cycle", 0, 0.0, {"div": 10}) == {
        "pct_start": 0.25, "div": 10, "div_final": 1e5, "moms": [0.95, 0.85, 0.95]}
    assert check_schedule_config("warmup_linear", 100, 0.0, None) == {}
    assert set(SCHEDULES) >= {"constant", "warmup_linear", "warmup_cosine", "warmup_stable_decay", "one_cycle",
                              "flat_cos", "sgdr", "step", "multistep", "exponential", "reduce_on_plateau"}
    for name in SCHEDULES:  # every name with its defaults validates (required args given)
        required = {"step": {"step_size": 3}, "multistep": {"milestones": [2]}, "exponential": {"gamma": 0.9}}
        check_schedule_config(name, 0, 0.0, required.get(name, {}))


# --- plot -------------------------------------------------------------------------------------------

def test_plot_writes_png(tmp_path):
    pytest.importorskip("matplotlib")
    for name in ("one_cycle", "warmup_linear"):
        path = tmp_path / f"{name}.png"
        kw = {"warmup_steps": 5} if name == "warmup_linear" else {}
        assert plot_schedule(build_schedule(name, 50, **kw), 50, path) == path
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 1000


def test_plot_without_matplotlib_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail, as when missing
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match=r"pip install matplotlib \(in a checkout of acctrain: pip install -e \"\.\[plot\]\"\)"):
        plot_schedule(build_schedule("constant", 5), 5, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()
