"""acctrain on Ray Train (acctrain.integrations.ray), on a local Ray cluster of 2 CPUs, with real worker processes.

- The tiny main job (TINY from tests.support) on 2 Ray workers ends with the weights and optimizer state of the
  same job under `torchrun --nproc_per_node 2`, bitwise (one torch thread per process).
- The same job, with rank 1's worker process killed (SIGKILL) after step 5 on the first attempt only (a marker
  file), is restarted by Ray (max_failures=1), resumes from acctrain's newest checkpoint, and ends bitwise there too.
- The same job, with rank 1 stalled after step 3 on the first attempt, is named by acctrain's watchdog after
  hang_timeout (10 s), its processes exit and Ray restarts them, and it ends bitwise there too.
- An acctrain error on the workers (an output_dir another run holds: RunLocked) is raised by `fit` as it is, and
  a restartable run that would not resume (resume='none') is refused on the driver.
- Under a Ray trainer that forms no torch process group (DataParallelTrainer), every worker refuses to train
  (RayGroupMismatch) before anything is written, and `workers_acctrain_error` finds it in Ray's error on the
  driver.
- With ray hidden from import, `import acctrain` works and the integration names the extra to install.

The Ray runs share one driver process (`drive`, started once for the module): a local Ray cluster takes 10-30 s
to start on 2 shared cores, and the driver's output mixes every worker's.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from acctrain import Callback
from tests.support import ROOT, STEPS, TINY, launch, launch_env
from tests.support.runs import assert_bitwise, final_checkpoint_tensors

# Under pytest-xdist (benchmarks/gpu_check.sh, --dist loadgroup) on one worker, which starts the module's one local
# Ray cluster and its shared runs once.
pytestmark = pytest.mark.xdist_group("ray")

needs_ray = pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                               reason='ray is not installed (pip install "acctrain[ray]" runs these tests)')

JOB = [*TINY, "cpu_threads=1", "save_every=2"]  # one torch thread per process: bitwise comparable runs
KILL_AFTER = 5  # rank 1 dies after this step of the first attempt; saves at 2 and 4 began (4's may be unfinished)
STALL_AFTER, HANG_TIMEOUT = 3, 10  # rank 1 stops answering after step 3 of the first attempt; the others wait 10 s
DRIVER_TIMEOUT = 600  # the Ray scenarios on 2 shared cores


# ---- what runs on the driver and on Ray's workers (imported there as tests.test_ray) --------------------------


def tiny_engine(sections: dict, attempts: str, callbacks: list, config):
    """train.py's job (acctrain.cli.run_job) on a Ray worker; each worker appends where it runs to `attempts`."""
    from acctrain import Engine
    from acctrain.bytelm import ByteLM, job_data, lm_loss
    from acctrain.cli import job_settings

    train_set, eval_set, model = job_data(sections["data"], sections["model"])
    torch.manual_seed(config.seed)  # the same initial weights on every rank, as run_job
    engine = Engine(ByteLM(model), config, train_set, eval_set, loss_fn=lm_loss, callbacks=callbacks,
                    settings=job_settings(sections))
    seen = {"pid": os.getpid(), "rank": engine.accelerator.process_index, "WORLD_SIZE": int(os.environ["WORLD_SIZE"]),
            "num_processes": engine.accelerator.num_processes, "backend": torch.distributed.get_backend()}
    with open(attempts, "a") as file:
        file.write(json.dumps(seen) + "\n")
    return engine


class StallOnce(Callback):
    """Rank 1 stops answering (sleeps) after step STALL_AFTER, unless the marker says it did already."""

    def __init__(self, marker: str):
        self.marker = Path(marker)

    def after_step(self, engine) -> None:
        if engine.accelerator.process_index == 1 and engine.state.step == STALL_AFTER and not self.marker.exists():
            self.marker.write_text(str(os.getpid()))
            time.sleep(10 * HANG_TIMEOUT)


class KillOnce(Callback):
    """Rank 1 SIGKILLs its own process after step KILL_AFTER, unless the marker says it did already; every rank
    records the step its fit starts from."""

    def __init__(self, marker: str, attempts: str):
        self.marker, self.attempts = Path(marker), attempts

    def before_fit(self, engine) -> None:
        with open(self.attempts, "a") as file:
            file.write(json.dumps({"pid": os.getpid(), "fit starts at": engine.state.step}) + "\n")

    def after_step(self, engine) -> None:
        if engine.accelerator.process_index == 1 and engine.state.step == KILL_AFTER and not self.marker.exists():
            self.marker.write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)


def drive(base: str) -> None:
    """The Ray scenarios in one local cluster; each writes `{base}/{name}.json` (metrics, or the error)."""
    import functools

    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

    from acctrain import load_config
    from acctrain.checkpoint.run_lock import RunLock
    from acctrain.cli import JOB_DEFAULTS, SECTIONS
    from acctrain.integrations import ray as acctrain_ray

    ray.init(num_cpus=2, include_dashboard=False)

    def scenario(name: str, run) -> None:
        start = time.monotonic()
        try:
            outcome = {"metrics": run()}
        except Exception as err:  # what the test checks: the error's type and message
            outcome = {"error": type(err).__name__, "message": str(err)}
        Path(base, f"{name}.json").write_text(json.dumps({**outcome, "seconds": time.monotonic() - start}))

    def job(name: str, callbacks: tuple = (), *extra: str):
        config, sections = load_config(None, [f"output_dir={base}/{name}", *JOB, *extra], sections=SECTIONS,
                                       defaults=JOB_DEFAULTS)
        return functools.partial(tiny_engine, sections, f"{base}/{name}-attempts.jsonl", list(callbacks)), config

    scenario("ray", lambda: acctrain_ray.fit(*job("ray"), num_workers=2))
    kill = KillOnce(f"{base}/killed-killed", f"{base}/killed-attempts.jsonl")
    scenario("killed", lambda: acctrain_ray.fit(*job("killed", [kill]), num_workers=2, max_failures=1))
    stalled = job("stalled", [StallOnce(f"{base}/stalled-stalled")], f"hang_timeout={HANG_TIMEOUT}")
    scenario("stalled", lambda: acctrain_ray.fit(*stalled, num_workers=2, max_failures=1))

    def locked():  # another live run (this driver) holds the output_dir
        with RunLock(f"{base}/locked"):
            return acctrain_ray.fit(*job("locked"), num_workers=2)

    scenario("locked", locked)
    make, config = job("no-group")

    def no_group():
        trainer = DataParallelTrainer(acctrain_ray.train_loop_per_worker(make, config),
                                      scaling_config=ScalingConfig(num_workers=2),
                                      run_config=RunConfig(storage_path=f"{base}/ray-no-group"))
        try:
            return trainer.fit().metrics
        except Exception as err:
            raise acctrain_ray.workers_acctrain_error(err) or err

    scenario("no-group", no_group)
    ray.shutdown()


# ---- the tests -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ray")


@pytest.fixture(scope="module")
def reference(base) -> Path:
    """The job as one 2-process torchrun on one node."""
    out = base / "torchrun"
    launch(["train.py", f"output_dir={out}", *JOB], nproc=2, launcher="torchrun", timeout=240)
    return out


@pytest.fixture(scope="module")
def ray_runs(base) -> tuple[Path, str]:
    """The Ray scenarios (`drive`): their directory and the driver's output. The driver runs in a session of its
    own, so that on a timeout the Ray cluster it started goes with it."""
    env = launch_env({"PYTHONPATH": str(ROOT)})
    cmd = [sys.executable, "-c", f"from tests.test_ray import drive; drive({str(base)!r})"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=DRIVER_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"the Ray driver ran past {DRIVER_TIMEOUT} s:\n{output[-6000:]}")
    (base / "driver.log").write_text(output)  # every worker's output, for a person to read
    assert proc.returncode == 0, output[-6000:]
    return base, output


def outcome(base: Path, name: str, output: str) -> dict:
    path = base / f"{name}.json"
    assert path.exists(), f"scenario {name} recorded nothing:\n{output[-6000:]}"
    return json.loads(path.read_text())


def attempts(base: Path, name: str) -> list[dict]:
    return [json.loads(line) for line in (base / f"{name}-attempts.jsonl").read_text().splitlines()]


def assert_one_group_of_two(seen: list[dict]) -> None:
    """Every Engine saw a gloo group of 2 processes, as Ray's WORLD_SIZE says, and both ranks were there."""
    engines = [s for s in seen if "rank" in s]
    assert engines and all(s["num_processes"] == s["WORLD_SIZE"] == 2 and s["backend"] == "gloo" for s in engines)
    assert sorted(s["rank"] for s in engines) == sorted([0, 1] * (len(engines) // 2))


@pytest.mark.processes
@needs_ray
def test_two_ray_workers_train_like_torchrun(ray_runs, reference):
    base, output = ray_runs
    result = outcome(base, "ray", output)
    assert "metrics" in result, result
    assert result["metrics"]["step"] == STEPS
    assert_one_group_of_two(attempts(base, "ray"))
    assert len(attempts(base, "ray")) == 2  # one attempt: one Engine per worker
    assert_bitwise(final_checkpoint_tensors(base / "ray", STEPS), final_checkpoint_tensors(reference, STEPS))
    plans = [line for line in output.splitlines() if "run plan: " in line]
    assert plans and all("world_size=2," in line for line in plans), output[-6000:]


@pytest.mark.processes
@needs_ray
def test_a_killed_worker_is_restarted_and_resumes_to_the_same_weights(ray_runs, reference):
    base, output = ray_runs
    result = outcome(base, "killed", output)
    assert "metrics" in result, result
    killed_pid = int((base / "killed-killed").read_text())
    seen = attempts(base, "killed")
    assert_one_group_of_two(seen)
    engines = [s for s in seen if "rank" in s]
    assert len(engines) == 4, seen  # two attempts of two workers
    assert killed_pid in [s["pid"] for s in engines[:2]] and killed_pid not in [s["pid"] for s in engines[2:]]
    starts = [s["fit starts at"] for s in seen if "fit starts at" in s]
    assert starts[:2] == [0, 0] and len(starts) == 4 and starts[2] == starts[3] in (2, 4), seen  # resumed, not anew
    assert_bitwise(final_checkpoint_tensors(base / "killed", STEPS), final_checkpoint_tensors(reference, STEPS))


@pytest.mark.processes
@needs_ray
def test_a_rank_that_stops_answering_is_named_and_the_restart_resumes(ray_runs, reference):
    """acctrain's watchdog under Ray: the waiting rank names rank 1 after hang_timeout and both processes exit
    (124), which Ray counts as a failure and restarts; the run ends with the reference's weights."""
    base, output = ray_runs
    result = outcome(base, "stalled", output)
    assert "metrics" in result, result
    report = (base / "stalled" / "hang-report.txt").read_text()
    assert "rank 1" in report and "time.sleep" in report, report  # the stalled rank and its stack
    seen = attempts(base, "stalled")
    assert len(seen) == 4, seen  # two attempts of two workers
    assert_one_group_of_two(seen)
    assert_bitwise(final_checkpoint_tensors(base / "stalled", STEPS), final_checkpoint_tensors(reference, STEPS))


@pytest.mark.processes
@needs_ray
def test_fit_raises_a_workers_acctrain_error_as_it_is(ray_runs):
    """Every worker refuses an output_dir that another live run holds (RunLocked, a ConfigError naming
    output_dir); `fit` raises it on the driver rather than Ray's WorkerGroupError."""
    base, output = ray_runs
    result = outcome(base, "locked", output)
    assert result.get("error") == "RunLocked", result
    assert result["message"].startswith("output_dir: ") and "is in use by another run" in result["message"]
    assert not (base / "locked" / "checkpoints").exists()


@needs_ray
def test_a_restart_that_would_not_resume_is_refused_on_the_driver(tmp_path):
    from acctrain import ConfigError, TrainConfig
    from acctrain.integrations import ray as acctrain_ray

    config = TrainConfig(output_dir=str(tmp_path / "run"), resume="none")
    with pytest.raises(ConfigError, match="resume: max_failures=1 lets Ray restart the workers") as err:
        acctrain_ray.fit(lambda config: None, config, num_workers=2, max_failures=1)
    assert err.value.field == "resume"
    assert not (tmp_path / "run").exists()


@pytest.mark.processes
@needs_ray
def test_a_trainer_without_a_process_group_is_refused_before_anything_is_written(ray_runs):
    base, output = ray_runs
    result = outcome(base, "no-group", output)
    assert result.get("error") == "RayGroupMismatch", result
    assert "Ray runs 2 workers, but no torch process group exists" in result["message"]
    assert "TorchTrainer" in result["message"]
    assert not (base / "no-group").exists()  # no lock, no logs, no checkpoints
    assert not (base / "no-group-attempts.jsonl").exists()  # refused before make_engine


@pytest.mark.processes
def test_without_ray_acctrain_imports_and_the_integration_names_the_extra():
    code = """if True:
        import sys
        sys.modules["ray"] = None  # as if ray were not installed
        import acctrain, acctrain.engine, acctrain.cli
        from acctrain.integrations import ray as acctrain_ray
        try:
            acctrain_ray.fit(lambda config: None, acctrain.TrainConfig(), num_workers=2)
        except ImportError as err:
            print("ImportError:", err)
        """
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=launch_env({"PYTHONPATH": str(ROOT)}),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'ImportError: acctrain.integrations.ray needs Ray Train: pip install "acctrain[ray]"' in proc.stdout


@pytest.mark.processes
def test_importing_acctrain_does_not_import_ray():
    code = "import sys, acctrain, acctrain.engine, acctrain.cli, acctrain.integrations.ray; print('ray' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=launch_env({"PYTHONPATH": str(ROOT)}),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "False"
