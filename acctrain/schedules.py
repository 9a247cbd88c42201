"""Learning-rate schedules as pure functions of the optimizer step, after fastai's `callback/schedule.py`.

A schedule gives, for step k, a factor that multiplies every param group's base lr (so per-group lrs
keep their ratios) and, for one_cycle only, a momentum (beta1 for Adam; None = leave it alone).
k counts the optimizer steps already *applied* (a step skipped on fp16 overflow does not count), and the
value for k is used by update k+1. Values depend only on k and the plan (total optimizer steps, steps per
epoch) - never on world size, accumulation or a hidden counter - so the engine sets the lr itself and
never hands a scheduler to `accelerator.prepare`, which would step it once per process per optimizer step.

    sched = build_schedule("one_cycle", total_steps=1000, args={"pct_start": 0.3})
    for k in range(1000):
        for group, base_lr in zip(optimizer.param_groups, base_lrs):
            group["lr"] = base_lr * sched.lr_factor(k)
        ...                                   # forward/backward over the window, optimizer.step()
    sched.on_evaluate(val_loss)               # only reduce_on_plateau reacts
    json.dumps(sched.state_dict())            # resume with sched.load_state_dict(...)
    plot_schedule(sched, 1000, "lr.png")      # needs matplotlib (`pip install -e ".[plot]"`)

Schedules and their `schedule_args` (defaults):
- constant: factor 1.
- warmup_linear: k/warmup during the warmup, then linear from 1 to 0 at total_steps.
- warmup_cosine (min_lr_ratio=0): warmup, then a cosine from 1 to min_lr_ratio at total_steps.
- warmup_stable_decay (decay_ratio=0.1, min_lr_ratio=0, decay="linear"|"cosine"): warmup, 1, then the
  last decay_ratio of the run decays to min_lr_ratio. decay_ratio=0 is "constant with warmup".
- one_cycle (pct_start=0.25, div=25, div_final=1e5, moms=[0.95, 0.85, 0.95]): fastai fit_one_cycle at
  pos = k/total_steps; the lr is the peak (lr_max), the run starts at 1/div and ends at 1/div_final.
- flat_cos (pct_start=0.75, div_final=1e5): fastai fit_flat_cos: 1 until pct_start, cosine to 1/div_final.
- sgdr (cycle_len=1, cycle_mult=2): fastai fit_sgdr: cycle i is a cosine from 1 to 0 over
  cycle_len * cycle_mult**i epochs of steps_per_epoch optimizer steps. The cycles run until total_steps;
  if the run does not end on a cycle boundary, the last cycle is shortened so it still ends at 0.
- step (step_size required, gamma=0.1): gamma ** (k // step_size), as torch's StepLR.
- multistep (milestones required, gamma=0.1): gamma ** (milestones <= k), as torch's MultiStepLR.
- exponential (gamma required): gamma ** k.
- reduce_on_plateau (mode="min", factor=0.1, patience=10, threshold=1e-4, min_factor=0, eps=1e-8,
  metric="eval/loss", the eval metric it watches): changes
  only in `on_evaluate`, exactly as torch's ReduceLROnPlateau with threshold_mode="rel" and one param group
  at lr 1 (tests/test_schedules.py compares them): an improvement is metric < best * (1 - threshold)
  ("min"; > best * (1 + threshold) for "max"), the best starting at +inf (-inf), so an infinite or NaN
  metric never improves; after more than `patience` evaluations without one the factor is multiplied by
  `factor` (not below min_factor), unless that changes it by eps or less. torch applies eps to each
  group's lr; here it applies to the factor shared by all groups.
- a function step -> factor, passed instead of a name.

Warmup (`warmup_steps`, or `warmup_ratio` giving ceil(ratio * total_steps) steps) belongs to the three
warmup_* schedules only. Any other schedule rejects a nonzero warmup instead of stacking a ramp on
it: one_cycle already warms up over pct_start, and a schedule function owns its whole shape.
"""

from __future__ import annotations

import bisect
import copy
import difflib
import itertools
import math
from typing import Callable

from acctrain.errors import ConfigError
from acctrain.metrics import better


# Annealers: (start, end) -> a function of pos in [0, 1] (fastai SchedLin, SchedCos, SchedNo, ...).
def linear(start, end):
    return lambda pos: start + pos * (end - start)


def cosine(start, end):
    return lambda pos: start + (1 + math.cos(math.pi * (1 - pos))) * (end - start) / 2


def constant(start, end=None):
    return lambda pos: start


def exponential(start, end):
    return lambda pos: start * (end / start) ** pos


def polynomial(start, end, power):
    return lambda pos: start + (end - start) * pos**power


def combine(pcts, scheds):
    """Run scheds[i] over the fraction pcts[i] of [0, 1], each over its own local position."""
    if len(pcts) != len(scheds) or min(pcts) <= 0 or not math.isclose(sum(pcts), 1.0):
        raise ValueError(f"combine needs one positive pct per schedule, summing to 1; got {pcts}")
    starts = list(itertools.accumulate(pcts, initial=0.0))

    def _combined(pos):
        i = min(max(bisect.bisect_right(starts, pos) - 1, 0), len(pcts) - 1)
        return scheds[i]((pos - starts[i]) / pcts[i])

    return _combined


def combined_cos(pct, start, middle, end):
    return combine([pct, 1 - pct], [cosine(start, middle), cosine(middle, end)])


_REQUIRED = "<required>"
_ARGS = {  # schedule -> its schedule_args and their defaults
    "constant": {},
    "warmup_linear": {},
    "warmup_cosine": {"min_lr_ratio": 0.0},
    "warmup_stable_decay": {"decay_ratio": 0.1, "min_lr_ratio": 0.0, "decay": "linear"},
    "one_cycle": {"pct_start": 0.25, "div": 25.0, "div_final": 1e5, "moms": [0.95, 0.85, 0.95]},
    "flat_cos": {"pct_start": 0.75, "div_final": 1e5},
    "sgdr": {"cycle_len": 1, "cycle_mult": 2},
    "step": {"step_size": _REQUIRED, "gamma": 0.1},
    "multistep": {"milestones": _REQUIRED, "gamma": 0.1},
    "exponential": {"gamma": _REQUIRED},
    "reduce_on_plateau": {"mode": "min", "factor": 0.1, "patience": 10, "threshold": 1e-4, "min_factor": 0.0,
                          "eps": 1e-8, "metric": "eval/loss"},
}
SCHEDULES = tuple(_ARGS)


def _num(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _int(v):
    return isinstance(v, int) and not isinstance(v, bool)


_CHECKS = {  # arg -> (is it valid, what a valid value is)
    "pct_start": (lambda v: _num(v) and 0 < v < 1, "a number in (0, 1), e.g. 0.25"),
    "div": (lambda v: _num(v) and v > 0, "a number > 0 (the run starts at lr / div), e.g. 25"),
    "div_final": (lambda v: _num(v) and v > 0, "a number > 0 (the run ends at lr / div_final), e.g. 1e5"),
    "moms": (lambda v: isinstance(v, (list, tuple)) and len(v) == 3 and all(_num(m) and 0 <= m < 1 for m in v),
             "three momentums (start, middle, end) in [0, 1), e.g. [0.95, 0.85, 0.95]"),
    "min_lr_ratio": (lambda v: _num(v) and 0 <= v <= 1, "the final lr as a fraction of the peak, in [0, 1]"),
    "decay_ratio": (lambda v: _num(v) and 0 <= v <= 1, "the fraction of the run spent decaying, in [0, 1]"),
    "decay": (lambda v: v in ("linear", "cosine"), "'linear' or 'cosine'"),
    "cycle_len": (lambda v: _num(v) and v > 0, "the first cycle's length in epochs, > 0, e.g. 1"),
    "cycle_mult": (lambda v: _num(v) and v >= 1, "a number >= 1 multiplying each next cycle's length, e.g. 2"),
    "step_size": (lambda v: _int(v) and v >= 1, "an int >= 1: optimizer steps between decays, e.g. 1000"),
    "milestones": (lambda v: isinstance(v, (list, tuple)) and all(_int(m) and m >= 1 for m in v)
                   and list(v) == sorted(set(v)), "increasing optimizer steps (ints >= 1), e.g. [3000, 6000]"),
    "gamma": (lambda v: _num(v) and v > 0, "a number > 0 multiplying the lr at each decay, e.g. 0.1"),
    "mode": (lambda v: v in ("min", "max"), "'min' (for a loss) or 'max' (for an accuracy)"),
    "factor": (lambda v: _num(v) and 0 < v < 1, "a number in (0, 1) multiplying the lr on a plateau, e.g. 0.1"),
    "patience": (lambda v: _int(v) and v >= 0, "an int >= 0: evaluations without improvement, e.g. 10"),
    "threshold": (lambda v: _num(v) and v >= 0, "a number >= 0: the relative improvement that counts, e.g. 1e-4"),
    "min_factor": (lambda v: _num(v) and 0 <= v <= 1, "the lowest lr factor, in [0, 1]"),
    "eps": (lambda v: _num(v) and v >= 0, "a number >= 0: the smallest change of the lr factor that is made, e.g. 1e-8"),
    "metric": (lambda v: isinstance(v, str) and v.startswith("eval"), "an eval metric's name, e.g. 'eval/loss' or "
               "'eval/accuracy' (with mode 'max')"),
}


def _suggest(word, options):
    close = difflib.get_close_matches(str(word), list(options), n=3)
    return f" (did you mean {' or '.join(map(repr, close))}?)" if close else ""


def check_schedule_config(name, warmup_steps=0, warmup_ratio=0.0, args=None) -> dict:
    """Every check that needs no total_steps; returns the schedule_args with defaults filled in."""
    label = "function" if callable(name) else name
    args = {} if args is None else args
    if not isinstance(args, dict):
        raise ConfigError("schedule_args", f"must be a dict of schedule parameters, got {type(args).__name__}")
    if not _int(warmup_steps) or warmup_steps < 0:
        raise ConfigError("warmup_steps", f"must be an int >= 0 (optimizer steps), got {warmup_steps!r}")
    if not _num(warmup_ratio) or not 0 <= warmup_ratio < 1:
        raise ConfigError("warmup_ratio", f"must be a fraction of the run in [0, 1), got {warmup_ratio!r}")
    if warmup_steps and warmup_ratio:
        raise ConfigError("warmup_ratio", "set warmup_steps or warmup_ratio, not both; set one of them to 0")
    if callable(name):
        known = {}
        if args:
            raise ConfigError("schedule_args", "a schedule function takes no schedule_args; bind them in it")
    elif not isinstance(name, str) or name not in _ARGS:
        raise ConfigError("scheduler", f"unknown schedule {name!r}{_suggest(name, SCHEDULES)}; "
                                       f"use one of {', '.join(SCHEDULES)} or a function step -> factor.")
    else:
        known = _ARGS[name]
    if (warmup_steps or warmup_ratio) and not label.startswith("warmup_"):
        field = "warmup_steps" if warmup_steps else "warmup_ratio"
        raise ConfigError(field, f"schedule {label!r} has no warmup phase; set {field} to 0, or use warmup_linear, "
                                 "warmup_cosine or warmup_stable_decay (decay_ratio=0 is constant with warmup); "
                                 "one_cycle warms up over schedule_args.pct_start")
    for key, value in args.items():
        if key not in known:
            raise ConfigError(f"schedule_args.{key}", f"unknown parameter of schedule {label!r}{_suggest(key, known)}; "
                                                      f"accepted: {', '.join(known) or 'none'}")
        valid, what = _CHECKS[key]
        if not valid(value):
            raise ConfigError(f"schedule_args.{key}", f"got {value!r}; use {what}")
    for key, default in known.items():
        if default is _REQUIRED and key not in args:
            raise ConfigError(f"schedule_args.{key}", f"schedule {label!r} needs it; use {_CHECKS[key][1]}")
    return {k: list(v) if isinstance(v, (list, tuple)) else v for k, v in {**known, **args}.items()}


def schedule_for(schedule: str | Callable[[int], float], config, plan) -> Schedule:
    """The run's schedule over its plan's optimizer steps: `config` a TrainConfig, `plan` an acctrain.data.DataPlan."""
    return build_schedule(schedule, plan.total_steps, warmup_steps=config.warmup_steps,
                          warmup_ratio=config.warmup_ratio, steps_per_epoch=plan.steps_per_epoch,
                          args=config.schedule_args)


def build_schedule(name: str | Callable[[int], float], total_steps: int, *, warmup_steps: int = 0,
                   warmup_ratio: float = 0.0, steps_per_epoch: int | None = None, args: dict | None = None):
    """The Schedule `name` (or the function step -> factor) for a run of `total_steps` optimizer steps."""
    args = check_schedule_config(name, warmup_steps, warmup_ratio, args)
    if not _int(total_steps) or total_steps < 1:
        raise ConfigError("total_steps", f"must be an int >= 1 (the run's optimizer steps), got {total_steps!r}; "
                                         "check the epochs / max_steps and the dataset length")
    warmup = warmup_steps or math.ceil(round(warmup_ratio * total_steps, 9))
    if warmup >= total_steps:
        field = "warmup_steps" if warmup_steps else "warmup_ratio"
        raise ConfigError(field, f"a warmup of {warmup} steps leaves nothing to decay: the run has {total_steps} "
                                 f"optimizer steps; lower {field} or train longer")
    if steps_per_epoch is not None and (not _int(steps_per_epoch) or steps_per_epoch < 1):
        raise ConfigError("steps_per_epoch", f"must be an int >= 1 (optimizer steps per epoch), "
                                             f"got {steps_per_epoch!r}")
    if name == "sgdr" and steps_per_epoch is None:
        raise ConfigError("steps_per_epoch", "sgdr counts its cycles in epochs; pass the optimizer steps per epoch")
    if name == "warmup_stable_decay" and warmup > total_steps * (1 - args["decay_ratio"]):
        raise ConfigError("schedule_args.decay_ratio", f"a decay over {args['decay_ratio']} of {total_steps} steps "
                                                       f"overlaps the {warmup}-step warmup; lower either")
    return Schedule(name, total_steps, warmup, steps_per_epoch, args)


def _ramp(k, lo, hi):
    """The position of step k in [lo, hi], clamped to [0, 1]."""
    return min(max((k - lo) / (hi - lo), 0.0), 1.0) if hi > lo else float(k >= lo)


def _curves(name, total, warmup, steps_per_epoch, a):
    """(lr factor, momentum or None), each a function of the optimizer step k."""
    def warm(after):
        return lambda k: k / warmup if k < warmup else after(k)

    def over_run(f):
        return lambda k: f(_ramp(k, 0, total))

    if name in ("constant", "reduce_on_plateau"):
        return (lambda k: 1.0), None
    if name == "warmup_linear":
        return warm(lambda k: linear(1.0, 0.0)(_ramp(k, warmup, total))), None
    if name == "warmup_cosine":
        return warm(lambda k: cosine(1.0, a["min_lr_ratio"])(_ramp(k, warmup, total))), None
    if name == "warmup_stable_decay":
        decay_from, decay = total * (1 - a["decay_ratio"]), {"linear": linear, "cosine": cosine}[a["decay"]]
        return warm(lambda k: decay(1.0, a["min_lr_ratio"])(_ramp(k, decay_from, total))), None
    if name == "one_cycle":
        lr = combined_cos(a["pct_start"], 1 / a["div"], 1.0, 1 / a["div_final"])
        return over_run(lr), over_run(combined_cos(a["pct_start"], *a["moms"]))
    if name == "flat_cos":
        return over_run(combined_cos(a["pct_start"], 1.0, 1.0, 1 / a["div_final"])), None
    if name == "sgdr":
        starts = [0.0]  # cycle boundaries in optimizer steps; the last one is cut to end with the run
        while starts[-1] < total:
            starts.append(starts[-1] + a["cycle_len"] * a["cycle_mult"] ** (len(starts) - 1) * steps_per_epoch)
        starts[-1] = total

        def sgdr(k):
            i = min(bisect.bisect_right(starts, k) - 1, len(starts) - 2)
            return cosine(1.0, 0.0)(_ramp(k, starts[i], starts[i + 1]))

        return sgdr, None
    if name == "step":
        return (lambda k: a["gamma"] ** (k // a["step_size"])), None
    if name == "multistep":
        return (lambda k: a["gamma"] ** bisect.bisect_right(a["milestones"], k)), None
    return (lambda k: a["gamma"] ** k), None  # exponential


class Schedule:
    """lr factor and momentum for each optimizer step of one run; make it with `build_schedule`."""

    def __init__(self, name, total_steps, warmup_steps, steps_per_epoch, args):
        self.fn = name if callable(name) else None
        self.name = "function" if self.fn else name
        self.total_steps, self.warmup_steps, self.steps_per_epoch = total_steps, warmup_steps, steps_per_epoch
        self.args = args
        self.state = {"best": None, "bad": 0, "factor": 1.0} if name == "reduce_on_plateau" else {}
        self._lr, self._mom = (self.fn, None) if self.fn else _curves(name, total_steps, warmup_steps,
                                                                      steps_per_epoch, args)

    def __repr__(self):
        return (f"Schedule({self.name!r}, total_steps={self.total_steps}, warmup_steps={self.warmup_steps}, "
                f"args={self.args})")

    @property
    def watches(self) -> str:
        """The eval metric `on_evaluate` is given: reduce_on_plateau's `metric`, else eval/loss (ignored)."""
        return self.args.get("metric", "eval/loss")

    def lr_factor(self, k: int) -> float:
        """The multiplier of every base lr for update k+1, after k applied optimizer steps."""
        return self.state["factor"] if self.name == "reduce_on_plateau" else float(self._lr(k))

    def momentum(self, k: int) -> float | None:
        """The momentum (Adam's beta1) for update k+1, or None to leave the optimizer's own."""
        return None if self._mom is None else float(self._mom(k))

    def on_evaluate(self, metric: float) -> None:
        """Called once per evaluation with a metric identical on all ranks; only reduce_on_plateau reacts."""
        if self.name != "reduce_on_plateau":
            return
        a, s, metric = self.args, self.state, float(metric)
        # torch's ReduceLROnPlateau, threshold_mode="rel": the best starts at +-inf (so an infinite first metric
        # is no improvement), a NaN never improves, and with a negative best the relative rule is torch's own
        if better(metric, s["best"], a["mode"], threshold=a["threshold"]):
            s["best"], s["bad"] = metric, 0
            return
        s["bad"] += 1
        if s["bad"] > a["patience"]:
            cut = max(s["factor"] * a["factor"], a["min_factor"])
            if s["factor"] - cut > a["eps"]:  # torch's eps: a change this small is not made
                s["factor"] = cut
            s["bad"] = 0

    def state_dict(self) -> dict:
        """JSON-serialisable: the schedule's name, its parameters, and reduce_on_plateau's state."""
        if self.fn:
            return {"name": "function"}
        return copy.deepcopy({"name": self.name, "total_steps": self.total_steps, "warmup_steps": self.warmup_steps,
                              "steps_per_epoch": self.steps_per_epoch, "args": self.args, "state": self.state})

    def load_state_dict(self, d: dict) -> None:
        """Restore exactly what `state_dict` saved: the checkpoint's parameters and state replace this one's."""
        if d.get("name") != self.name:
            raise ConfigError("scheduler", f"the checkpoint holds a {d.get('name')!r} schedule but this run builds "
                                           f"{self.name!r}; resume with scheduler={d.get('name')!r} or start afresh")
        expected = self.state_dict()
        if set(d) != set(expected) or set(d.get("state", {})) != set(self.state):
            raise ConfigError("scheduler", f"the checkpoint's schedule state has keys {sorted(d)} and state "
                                           f"{sorted(d.get('state', {}))}; expected {sorted(expected)} and "
                                           f"{sorted(self.state)}")
        if self.fn:
            return
        fresh = build_schedule(self.name, d["total_steps"], warmup_steps=d["warmup_steps"],
                               steps_per_epoch=d["steps_per_epoch"], args=d["args"])
        self.__dict__.update(fresh.__dict__, state=dict(d["state"]))


    def continue_from(self, saved: dict) -> list[str]:
        """Resume from a checkpoint's `state_dict()`: all of it where it is this schedule, else this run's
        schedule with the saved counters (reduce_on_plateau's) where it is the same kind. Returns the changes."""
        now = self.state_dict()
        if saved == {**saved, **now, "state": saved.get("state")}:
            self.load_state_dict(saved)
            return []
        if saved.get("name") == self.name:
            self.state = dict(saved.get("state", {}))
        return [f"{k} {saved.get(k)} -> {now[k]}" for k in now if k != "state" and saved.get(k) != now[k]]

def plot_schedule(schedule: Schedule, total_steps: int, path, base_lr: float = 1.0):
    """Write a PNG of the lr (base_lr x factor) and the momentum over steps 0..total_steps-1; returns `path`."""
    try:
        from matplotlib.figure import Figure  # lazy: plotting is an optional extra
    except ImportError as e:
        raise ImportError('plot_schedule needs matplotlib: pip install matplotlib (in a checkout of acctrain: pip install -e ".[plot]")') from e
    steps = list(range(total_steps))
    moms = [schedule.momentum(k) for k in steps]
    fig = Figure(figsize=(10, 3.5))
    lr_ax, mom_ax = fig.subplots(1, 2)
    lr_ax.plot(steps, [base_lr * schedule.lr_factor(k) for k in steps])
    if any(m is not None for m in moms):
        mom_ax.plot(steps, moms)
    else:
        mom_ax.text(0.5, 0.5, "not scheduled:\nthe optimizer's own momentum", ha="center", va="center")
        mom_ax.set_xticks([]), mom_ax.set_yticks([])
    lr_title = f"lr factor ({schedule.name})" if base_lr == 1.0 else f"lr ({schedule.name}, peak {base_lr:g})"
    for ax, title in ((lr_ax, lr_title), (mom_ax, "momentum")):
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path
