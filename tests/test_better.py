"""The one rule for "is this value better" (acctrain.metrics.better), as keep_best, load_best_at_end,
EarlyStopping, SaveBest and reduce_on_plateau apply it."""

import math

import pytest

from acctrain.callbacks import EarlyStopping, SaveBest
from acctrain.metrics import better
from acctrain.schedules import build_schedule

NAN, INF = math.nan, math.inf


@pytest.mark.parametrize("value, best, mode, min_delta, threshold, expected", [
    (1.0, None, "min", 0.0, 0.0, True),  # the first finite value
    (NAN, None, "min", 0.0, 0.0, False),  # a NaN never improves, not even on nothing
    (INF, None, "min", 0.0, 0.0, False),
    (-INF, None, "max", 0.0, 0.0, False),
    (1.0, 1.0, "min", 0.0, 0.0, False),  # equal: no improvement
    (0.99, 1.0, "min", 0.0, 0.0, True),
    (0.99, 1.0, "min", 0.02, 0.0, False),  # below best, but not by min_delta
    (0.97, 1.0, "min", 0.02, 0.0, True),
    (1.01, 1.0, "max", 0.0, 0.0, True),
    (1.01, 1.0, "max", 0.02, 0.0, False),
    (0.95, 1.0, "min", 0.0, 0.1, False),  # torch's relative rule: below 1.0 x (1 - 0.1) = 0.9
    (0.89, 1.0, "min", 0.0, 0.1, True),
    (-1.05, -1.0, "min", 0.0, 0.1, True),  # torch's rule with a negative best: below -1.0 x 0.9 = -0.9
    (-0.95, -1.0, "min", 0.0, 0.1, True),
    (-0.85, -1.0, "min", 0.0, 0.1, False),
    (1.15, 1.0, "max", 0.0, 0.1, True),  # above 1.0 x 1.1
    (1.05, 1.0, "max", 0.0, 0.1, False),
])
def test_better(value, best, mode, min_delta, threshold, expected):
    assert better(value, best, mode, min_delta, threshold) is expected


class Evaluated:
    """What a callback reads of the Engine at after_evaluate."""

    def __init__(self):
        self.last_eval, self.saves, self.printed = {}, 0, []
        self.state = type("State", (), {"step": 0})()

    def save(self):
        self.saves += 1

    def print(self, text):
        self.printed.append(text)


def test_early_stopping_and_save_best_follow_the_rule():
    engine, stop, save = Evaluated(), EarlyStopping(patience=2, min_delta=0.1), SaveBest()
    for value in (NAN, 1.0, 0.95, 0.85):  # a NaN first is no improvement, 0.95 is not by min_delta
        engine.last_eval = {"eval/loss": value}
        save.after_evaluate(engine)
        if value != 0.95:
            stop.after_evaluate(engine)
    assert stop.best == 0.85 and stop.wait == 0
    assert save.best == 0.85 and engine.saves == 3  # 1.0, 0.95, 0.85: each lower than the one before


def test_reduce_on_plateau_cuts_the_lr_when_no_value_is_better():
    schedule = build_schedule("reduce_on_plateau", 100, args={"patience": 1, "threshold": 0.1, "factor": 0.5})
    for value in (1.0, 0.95, 0.92):  # neither is below 1.0 x 0.9: two bad evaluations past patience 1
        schedule.on_evaluate(value)
    assert schedule.lr_factor(0) == 0.5
    schedule.on_evaluate(0.8)  # below 0.9: the new best
    assert schedule.state["best"] == 0.8 and schedule.state["bad"] == 0
