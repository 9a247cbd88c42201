"""The lr and momentum a real run sets at each optimizer step: identical for any world size and
accumulation, equal to the closed forms and tables of schedules.md (tests/data/), per param group."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from acctrain.errors import ConfigError
from tests.support import launch, scalars
from tests.support.tiny import VarLenTokens, collate, make_model, token_loss
from tests.workers import schedule_run

SCHEDULES_MD = Path(__file__).resolve().parent / "data" / "schedules.md"  # a copy of shared/reference/schedules.md
WARMUP_LINEAR_8 = [0, 0.5, 1.0, 0.8333333, 0.6666667, 0.5, 0.3333333, 0.1666667]  # schedules.md, the invariance


def one_cycle_table() -> list[tuple[float, float]]:
    """Rows 0..19 of the one-cycle table (lr, momentum), read from schedules.md."""
    section = SCHEDULES_MD.read_text().split("## One-cycle")[1].split("\n## ")[0]
    rows = re.findall(r"^\| (\d+) \| ([0-9.e+-]+) \| ([0-9.]+) \|$", section, re.M)
    table = {int(i): (float(lr), float(m)) for i, lr, m in rows}
    return [table[i] for i in range(20)]


@pytest.fixture(scope="module")
def two_process(tmp_path_factory):
    out = tmp_path_factory.mktemp("sched")
    launch(["-m", "tests.workers.schedule_run", str(out),
            "warmup_linear:2", "warmup_linear:4", "one_cycle:4", "torch_step:4"], nproc=2)
    result = {}
    for path in out.glob("*.json"):
        data = json.loads(path.read_text())
        assert data["num_processes"] == data["world_size_env"] == 2
        result[path.stem] = data
    return result


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    out = tmp_path_factory.mktemp("sched1")
    return {f"{name}-4": schedule_run.run(str(out), name, 4) for name in ("warmup_linear", "one_cycle", "torch_step")}


def head_lrs(run):
    return [lrs[0] for lrs in run["lrs"]]


@pytest.mark.processes
def test_warmup_linear_invariant_to_world_size_and_accumulation(one_process, two_process):
    one, two_acc2, two_acc4 = one_process["warmup_linear-4"], two_process["warmup_linear-4"], two_process["warmup_linear-2"]
    assert (one["accumulation"], two_acc2["accumulation"], two_acc4["accumulation"]) == (4, 2, 4)
    assert head_lrs(one) == head_lrs(two_acc2) == head_lrs(two_acc4)  # identical, not just close
    assert head_lrs(one) == pytest.approx(WARMUP_LINEAR_8, rel=1e-6)  # ends at step 8, not 4


@pytest.mark.processes
def test_one_cycle_lr_and_momentum_match_the_table(one_process, two_process):
    table = one_cycle_table()
    for run in (one_process["one_cycle-4"], two_process["one_cycle-4"]):
        assert head_lrs(run) == pytest.approx([lr for lr, _ in table], rel=1e-6)
        assert [m[0] for m in run["moms"]] == pytest.approx([m for _, m in table], rel=1e-6)
    assert one_process["one_cycle-4"]["lrs"] == two_process["one_cycle-4"]["lrs"]


def test_discriminative_groups_keep_their_ratio(one_process):
    for run in one_process.values():
        for head, body in run["lrs"]:
            assert body == pytest.approx(head / 10, rel=1e-12)
        for head, body in run["moms"]:
            assert head == body  # the momentum schedule applies to every group


@pytest.mark.processes
def test_torch_scheduler_steps_once_per_optimizer_step(one_process, two_process):
    expected = [0.1 * 0.5 ** (k // 3) for k in range(8)]  # StepLR(step_size=3, gamma=0.5)
    assert head_lrs(one_process["torch_step-4"]) == pytest.approx(expected, rel=1e-12)
    assert head_lrs(two_process["torch_step-4"]) == pytest.approx(expected, rel=1e-12)


def test_reduce_on_plateau_needs_eval_data(tmp_path):
    from acctrain import Engine, TrainConfig

    cfg = TrainConfig(output_dir=str(tmp_path / "o"), global_batch_size=8, micro_batch_size=8, scheduler="reduce_on_plateau")
    with pytest.raises(ConfigError) as err:
        Engine(make_model(), cfg, VarLenTokens(16), loss_fn=token_loss, collate_fn=collate)
    assert err.value.field == "scheduler"


def test_reduce_on_plateau_reacts_to_eval_loss(tmp_path):
    """lr drops after `patience` evaluations without improvement; here lr=0 so eval loss never improves."""
    from acctrain import Engine, TrainConfig

    cfg = TrainConfig(output_dir=str(tmp_path / "o"), global_batch_size=8, micro_batch_size=8, epochs=4,
                      lr=1e-9, scheduler="reduce_on_plateau", schedule_args={"patience": 1, "factor": 0.5,
                                                                              "threshold": 0.1})
    reader = schedule_run.ReadBack()
    Engine(make_model(), cfg, VarLenTokens(16), VarLenTokens(8), loss_fn=token_loss, collate_fn=collate,
           callbacks=[reader]).fit()
    # evaluations after epochs 1..4: best, bad 1, bad 2 -> x0.5; each epoch has 2 steps
    assert [lrs[0] for lrs in reader.lrs] == pytest.approx([1e-9] * 6 + [5e-10] * 2, rel=1e-12)


def test_tensorboard_has_lr_and_momentum_of_every_group(tmp_path):
    run = schedule_run.run(str(tmp_path), "one_cycle", 4)
    for group in (0, 1):
        lrs = [v for _, v in scalars(tmp_path / "one_cycle-4", f"train/lr/group{group}")]
        moms = [v for _, v in scalars(tmp_path / "one_cycle-4", f"train/momentum/group{group}")]
        assert lrs == pytest.approx([lr[group] for lr in run["lrs"]], rel=1e-6)  # TB stores float32
        assert moms == pytest.approx([m[group] for m in run["moms"]], rel=1e-6)


@pytest.mark.processes
def test_plot_schedule_command_writes_png(tmp_path):
    import subprocess
    import sys

    pytest.importorskip("matplotlib")
    out = tmp_path / "lr.png"
    proc = subprocess.run([sys.executable, "-m", "acctrain.cli", "plot-schedule", "scheduler=one_cycle",
                           "data.max_bytes=20000", "global_batch_size=8", f"out={out}"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "one_cycle over" in proc.stdout


@pytest.mark.processes
def test_plot_schedule_command_reports_bad_parameters():
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "acctrain.cli", "plot-schedule", "scheduler=one_cycle",
                           "schedule_args={div: 0}"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "config error: schedule_args.div" in proc.stderr
