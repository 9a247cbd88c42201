"""Launching anywhere, tested with real processes: two "nodes" on loopback, the launch/ configs, and SLURM.

Every run trains the tiny main job (TINY from tests.support) on 2 processes and must end with the weights of
the same job launched as one 2-process torchrun on a single node (the reference), with the same output
layout, and print a plan that says world_size=2.

- Two nodes: two launchers started concurrently with machine ranks 0 and 1, one process each, rendezvous on
  127.0.0.1: `accelerate launch --num_machines 2 ...` with flags, with launch/multi_node.yaml, and
  launch/torchrun_multinode.sh. Both use the same output_dir, as nodes on a shared filesystem do (rank 0
  writes most of a checkpoint, rank 1 its own RNG state).
- launch/cpu_multiprocess.yaml through `accelerate launch --config_file`.
- launch/slurm.sbatch: the commands it builds for a 4-node allocation (dry run), its requeue decision, and,
  when SLURM is installed and we are root, real jobs on a one-host cluster (tests/support/slurm_cluster.py):
  2 tasks (= 2 machines) training to the reference weights, and a job preempted with SIGUSR1 that saves,
  exits 75, is requeued by the script and resumes to the end.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.support import ROOT, STEPS, free_port, launch
from tests.support import TINY as MAIN_JOB
from tests.support.slurm_cluster import FINAL_STATES, SlurmCluster, SlurmUnavailable, unavailable_reason
from tests.support.tiny import rel_diff

# Every test here starts processes; under pytest-xdist (benchmarks/gpu_check.sh, --dist loadgroup) they run on one
# worker, which starts the module's shared runs and its one SLURM cluster once.
pytestmark = [pytest.mark.processes, pytest.mark.xdist_group("launch")]

# Launchers, not devices: every job here trains on CPU/gloo. Simulated nodes share this machine's GPUs, so
# with GPUs each "node" would put its local rank 0 on cuda:0 (NCCL: duplicate GPU).
TINY = [*MAIN_JOB, "cpu=true"]
SBATCH = ROOT / "launch" / "slurm.sbatch"
TIMEOUT = 240  # seconds for one launch of the tiny job (about 10 s on 2 cores)
# Two "nodes" sharing this machine's cores: one torch thread per process, as the 2-process reference has
# (acctrain's default gives each node's single process all the cores, oversubscribing them twice).
SHARED_CORES = ["cpu_threads=1"]


def job_env(base: dict[str, str] | None = None, **extra: str) -> dict[str, str]:
    """The environment of a launched job: this venv's launchers first on PATH, one thread per process."""
    env = dict(os.environ if base is None else base)
    env.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", **extra)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env.pop("ACCELERATE_USE_CPU", None)  # the jobs ask for the CPU themselves (cpu=true in TINY), as a user would
    return env


def final_weights(out: Path, steps: int = STEPS):
    latest = (out / "checkpoints" / "latest").read_text().strip()
    assert latest == f"step-{steps:08d}"
    return load_file(out / "checkpoints" / latest / "model.safetensors")


def layout(out: Path) -> list[str]:
    """Relative paths of every file under `out`, TensorBoard's time- and host-named parts normalised."""
    paths = []
    for path in out.rglob("*"):
        if path.is_file():
            rel = re.sub(r"\d{6,}\.\d+", "<time>", path.relative_to(out).as_posix())
            paths.append(re.sub(r"events\.out\.tfevents\..*", "events.out.tfevents.<id>", rel))
    return sorted(paths)


def plan_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("run plan: ")]


def assert_trained_like_reference(text: str, out: Path, reference: Path) -> None:
    plans = plan_lines(text)
    assert plans and all("world_size=2," in p for p in plans), text[-3000:]
    assert f"step {STEPS}/{STEPS} |" in text and "done: train loss" in text
    assert layout(out) == layout(reference)
    assert rel_diff(final_weights(out), final_weights(reference)) < 1e-5


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("launch")


@pytest.fixture(scope="module")
def reference(base) -> Path:
    """The tiny job as one 2-process torchrun on one node."""
    out = base / "reference"
    proc = launch(["train.py", f"output_dir={out}", *TINY], nproc=2, launcher="torchrun", timeout=TIMEOUT)
    plans = plan_lines(proc.stdout)
    assert len(plans) == 1 and "world_size=2," in plans[0], proc.stdout
    return out


# ---- two nodes on one machine --------------------------------------------------------------------------------


def two_node_commands(launcher: str, rank: int, port: int, out: Path) -> tuple[list[str], dict[str, str]]:
    args = ["train.py", f"output_dir={out}", *TINY, *SHARED_CORES]
    if launcher == "accelerate":
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "2", "--machine_rank", str(rank),
               "--num_processes", "2", "--main_process_ip", "127.0.0.1", "--main_process_port", str(port),
               "--rdzv_backend", "static", "--same_network", "--multi_gpu", "--mixed_precision", "no",
               "--dynamo_backend", "no", *args]
        return cmd, job_env()
    if launcher == "multi_node.yaml":  # the template, its placeholders (and fp32 for the CPU) on the command line
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "launch/multi_node.yaml",
               "--mixed_precision", "no", "--machine_rank", str(rank), "--num_processes", "2", "--main_process_ip", "127.0.0.1",
               "--main_process_port", str(port), *args]
        return cmd, job_env()
    if launcher == "torchrun_multinode.sh":
        env = job_env(NNODES="2", NODE_RANK=str(rank), NPROC="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        return ["bash", str(ROOT / "launch" / "torchrun_multinode.sh"), *args[1:]], env
    raise ValueError(launcher)


def run_together(commands: list[tuple[list[str], dict[str, str]]], logs: Path,
                 timeout: float) -> list[subprocess.CompletedProcess]:
    """Start the commands at once (own process groups, output to files) and wait for all of them; on timeout
    kill the groups and fail."""
    logs.mkdir(parents=True, exist_ok=True)
    procs, files = [], []
    try:
        for i, (cmd, env) in enumerate(commands):
            files.append((open(logs / f"{i}.out", "w+"), open(logs / f"{i}.err", "w+")))
            procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=files[-1][0], stderr=files[-1][1],
                                          start_new_session=True))
        deadline = time.monotonic() + timeout
        for proc in procs:
            try:
                proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pytest.fail(f"{shlex.join(proc.args)} still running after {timeout} s")
        results = []
        for proc, (out, err) in zip(procs, files):
            out.seek(0), err.seek(0)
            results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out.read(), err.read()))
        return results
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
        for out, err in files:
            out.close(), err.close()


@pytest.fixture(scope="module", params=["accelerate", "multi_node.yaml", "torchrun_multinode.sh"])
def two_nodes(request, base):
    out = base / f"two-nodes-{request.param}"  # one path for both launchers: a filesystem both nodes share
    port = free_port()
    commands = [two_node_commands(request.param, rank, port, out) for rank in (0, 1)]
    procs = run_together(commands, base / f"two-nodes-{request.param}-logs", TIMEOUT)
    for rank, proc in enumerate(procs):
        assert proc.returncode == 0, f"node {rank}: {shlex.join(proc.args)} exited {proc.returncode}\n" \
                                     f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return procs, out


def test_two_nodes_train_as_one_job(two_nodes, reference):
    procs, out = two_nodes
    assert_trained_like_reference(procs[0].stdout + procs[1].stdout, out, reference)


def test_two_nodes_print_the_plan_once(two_nodes):
    """One job, one plan: the second node prints neither the plan nor progress (each node's log is its own)."""
    procs, _ = two_nodes
    assert len(plan_lines(procs[0].stdout)) == 1
    assert plan_lines(procs[1].stdout) == [], "node 1 printed the plan too: printing must be on global rank 0"
    assert f"step {STEPS}/{STEPS} |" not in procs[1].stdout


# ---- accelerate configs --------------------------------------------------------------------------------------


def test_cpu_multiprocess_config_starts_one_two_process_group(base, reference):
    out = base / "cpu-multiprocess"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "launch/cpu_multiprocess.yaml",
           "train.py", f"output_dir={out}", *TINY]
    proc = subprocess.run(cmd, cwd=ROOT, env=job_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert len(plan_lines(proc.stdout)) == 1
    assert_trained_like_reference(proc.stdout, out, reference)


def test_fsdp2_config_shards_and_matches_the_reference(base, reference):
    """launch/fsdp2.yaml on 2 CPU processes (in fp32, like the reference: the file says bf16): a sharded
    checkpoint whose exported weights are the DDP run's."""
    out = base / "fsdp2"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "launch/fsdp2.yaml",
           "--mixed_precision", "no", "--num_processes", "2", "--main_process_port", str(free_port()), "train.py", f"output_dir={out}", *TINY]
    proc = subprocess.run(cmd, cwd=ROOT, env=job_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    plans = plan_lines(proc.stdout)
    assert len(plans) == 1 and "world_size=2," in plans[0]
    step = out / "checkpoints" / f"step-{STEPS:08d}"
    assert (step / "sharded.json").is_file() and len(list((step / "model").glob("*.safetensors"))) == 2
    assert not (step / "model.safetensors").exists()
    exported = out / "full.safetensors"
    export = subprocess.run([sys.executable, "-m", "acctrain.cli", "export", str(step), str(exported)], cwd=ROOT,
                            env=job_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert export.returncode == 0, export.stdout + export.stderr
    assert rel_diff(load_file(exported), final_weights(reference)) < 1e-5


# ---- launch/slurm.sbatch: command construction and requeue decision, no cluster needed ------------------------


def sbatch_dry_run(tmp_path: Path, procid: int, **env: str) -> tuple[str, list[str]]:
    """Run the script outside SLURM with ACCTRAIN_DRY_RUN=1: (srun line, this task's accelerate argv)."""
    full = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_"))}
    full.update(ACCTRAIN_DRY_RUN="1", SLURM_JOB_ID="4242", SLURM_NTASKS="4", SLURM_PROCID=str(procid),
                SLURM_JOB_NODELIST="gpu[007-010]", **env)
    if "MAIN_PROCESS_IP" not in env:
        conf = tmp_path / "slurm.conf"  # `scontrol show hostnames` reads a config, never a controller
        conf.write_text("ClusterName=dry\nSlurmctldHost=localhost\n")
        full["SLURM_CONF"] = str(conf)
    proc = subprocess.run(["bash", str(SBATCH), "my_run.yaml", "output_dir=/shared/runs/a b", "lr=3e-4"], cwd=ROOT,
                          env=full, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    srun = next(line for line in proc.stdout.splitlines() if line.startswith("srun: "))
    task = next(line for line in proc.stdout.splitlines() if line.startswith(f"task {procid}: "))
    return srun, shlex.split(task.split(": ", 1)[1])


def option(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


@pytest.mark.parametrize("procid", [0, 1, 3])
def test_sbatch_commands_for_four_gpu_nodes(tmp_path, procid):
    if unavailable_reason() and "not installed" in unavailable_reason():
        pytest.skip("needs `scontrol show hostnames`: " + unavailable_reason())
    srun, argv = sbatch_dry_run(tmp_path, procid, SLURM_GPUS_ON_NODE="8")
    assert "--ntasks=4" in srun and "--kill-on-bad-exit=1" in srun
    assert argv[:2] == ["accelerate", "launch"]
    assert option(argv, "--num_machines") == "4"
    assert option(argv, "--machine_rank") == str(procid)
    assert option(argv, "--num_processes") == "32"
    assert option(argv, "--main_process_ip") == "gpu007"  # the first host of the allocation, on every node
    assert option(argv, "--main_process_port") == str(29500 + 4242 % 1000)
    assert option(argv, "--rdzv_backend") == "static"
    assert "--same_network" in argv and "--multi_gpu" in argv
    assert argv[argv.index("train.py"):] == ["train.py", "my_run.yaml", "output_dir=/shared/runs/a b", "lr=3e-4"]


def test_sbatch_elastic_form_restarts_workers_with_a_c10d_rendezvous(tmp_path):
    _, argv = sbatch_dry_run(tmp_path, 1, MAIN_PROCESS_IP="h0", GPUS_PER_NODE="4", MAX_RESTARTS="3")
    assert option(argv, "--rdzv_backend") == "c10d" and option(argv, "--max_restarts") == "3"
    assert argv[argv.index("train.py"):][:2] == ["train.py", "my_run.yaml"]


def test_sbatch_commands_for_cpu_nodes_and_overrides(tmp_path):
    srun, argv = sbatch_dry_run(tmp_path, 2, ACCTRAIN_CPU="1", MAIN_PROCESS_IP="10.1.2.3", MAIN_PROCESS_PORT="12345",
                                SRUN_ARGS="--container-image=reg#acctrain --container-mounts=/shared:/shared")
    assert shlex.split(srun)[4:6] == ["--container-image=reg#acctrain", "--container-mounts=/shared:/shared"]
    assert option(argv, "--num_processes") == "4"  # no GPUs: one process per node
    assert option(argv, "--machine_rank") == "2"
    assert option(argv, "--main_process_ip") == "10.1.2.3" and option(argv, "--main_process_port") == "12345"
    assert "--multi_gpu" in argv
    _, argv = sbatch_dry_run(tmp_path, 1, MAIN_PROCESS_IP="h0", GPUS_PER_NODE="4",
                             ACCELERATE_CONFIG="launch/fsdp2.yaml", ACCTRAIN_SCRIPT="my_train.py")
    assert option(argv, "--config_file") == "launch/fsdp2.yaml" and "--multi_gpu" not in argv
    assert option(argv, "--num_processes") == "16" and option(argv, "--num_machines") == "4"
    assert argv[argv.index("my_train.py") + 1] == "my_run.yaml"


@pytest.mark.parametrize("gpus", ["", "0"])
def test_sbatch_without_gpus_is_refused_unless_the_job_asks_for_the_cpu(tmp_path, gpus):
    """A forgotten --gpus-per-node (SLURM_GPUS_ON_NODE unset, or 0) must not train on the CPU without a word."""
    full = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "GPUS_PER_NODE", "ACCTRAIN_"))}
    full.update(ACCTRAIN_DRY_RUN="1", SLURM_JOB_ID="4242", SLURM_NTASKS="2", SLURM_JOB_NODELIST="cpu[1-2]",
                MAIN_PROCESS_IP="10.1.2.3", SRUN="echo srun", SLURM_GPUS_ON_NODE=gpus)
    proc = subprocess.run(["bash", str(SBATCH), "output_dir=/shared/runs/a"], cwd=ROOT, env=full, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "this job has no GPUs" in proc.stderr and "--gpus-per-node=N" in proc.stderr and "ACCTRAIN_CPU=1" in proc.stderr
    assert "srun" not in proc.stdout and "task " not in proc.stdout  # refused before any step is started


@pytest.mark.parametrize("rc,usr1,term,requeued", [(75, 0, 0, True), (1, 1, 0, True), (0, 0, 0, False),
                                                   (1, 0, 0, False), (0, 1, 0, False), (2, 0, 0, False),
                                                   (75, 0, 1, False), (1, 1, 1, False)])
def test_sbatch_requeues_on_exit_code_75(rc, usr1, term, requeued):
    """acctrain_finish: `scontrol requeue $SLURM_JOB_ID` for 75 or a failure after SIGUSR1; never after SIGTERM."""
    script = f'source "{SBATCH}"; acctrain_finish {rc} {usr1} {term}; echo "returned $?"'
    env = dict(os.environ, SLURM_JOB_ID="4242", SCONTROL="echo scontrol")
    proc = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=30)
    assert ("scontrol requeue 4242" in proc.stdout) == requeued, proc.stdout + proc.stderr
    assert f"returned {75 if requeued else rc}" in proc.stdout


# ---- a real SLURM cluster on this host -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def slurm():
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    cluster = SlurmCluster(startup_timeout=60)
    try:
        cluster.start()
    except SlurmUnavailable as err:
        if os.environ.get("ACCTRAIN_REQUIRE_SLURM") == "1":
            pytest.fail(f"SLURM did not start: {err}")
        pytest.skip(f"SLURM is installed but did not start: {err}")
    yield cluster
    cluster.stop()


def submit(slurm: SlurmCluster, tmp: Path, train_args: list[str]) -> tuple[str, Path]:
    """Submit launch/slurm.sbatch as a 2-task job on the one node (2 machine ranks, CPU)."""
    env = job_env(slurm.env, MAIN_PROCESS_PORT=str(free_port()), ACCTRAIN_CPU="1")  # CPU tasks, asked for
    try:  # the script's rendezvous host is the node's name; where that does not resolve, use loopback
        socket.gethostbyname(slurm.node)
    except OSError:
        env["MAIN_PROCESS_IP"] = "127.0.0.1"
    job = slurm.sbatch(["--nodes=1", "--ntasks=2", "--ntasks-per-node=2", "--time=10",
                        f"--output={tmp}/slurm-%j.out", str(SBATCH), *train_args], cwd=ROOT, env=env)
    return job, tmp / f"slurm-{job}.out"


@pytest.fixture(scope="module")
def slurm_job(slurm, base):
    out = base / "slurm-run"
    job, log = submit(slurm, base, [f"output_dir={out}", *TINY, *SHARED_CORES])
    info = slurm.wait_for_job(job, timeout=TIMEOUT)
    text = log.read_text() if log.exists() else ""
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "0", f"{info}\n{text[-4000:]}\n{slurm.logs()}"
    return text, out


def test_slurm_job_trains_two_machine_ranks_as_one_job(slurm_job, reference):
    text, out = slurm_job
    assert "slurm.sbatch: job" in text and "2 task(s)" in text
    assert_trained_like_reference(text, out, reference)


def test_slurm_job_prints_the_plan_once(slurm_job):
    text, _ = slurm_job
    assert len(plan_lines(text)) == 1, "\n".join(plan_lines(text))


def wait_for_line(slurm: SlurmCluster, job: str, log: Path, pattern: str, after: int = 0) -> re.Match:
    """Wait until the job's log matches `pattern` (at or after character `after`) while the job is alive."""
    deadline = time.monotonic() + TIMEOUT
    while True:
        text = log.read_text() if log.exists() else ""
        if match := re.compile(pattern, re.M).search(text, after):
            return match
        info = slurm.job(job)
        # (a requeue passes through COMPLETING and PENDING)
        assert info.get("JobState") not in FINAL_STATES and time.monotonic() < deadline, \
            f"waiting for {pattern!r}: {info}\n{text[-5000:]}"
        time.sleep(0.1)


def test_slurm_preemption_requeues_and_resumes_and_scancel_cancels(slurm, base):
    """SIGUSR1 to the batch shell (what --signal=B:USR1@120 does): the training saves and exits 75, the script
    requeues the job, and the second run resumes from that checkpoint. Then `scancel` (SIGTERM): the
    training saves again, but the job is cancelled, not requeued."""
    steps = 5000  # neither run gets near the end: each is stopped a few steps after it starts training
    args = [a for a in TINY if not a.startswith(("max_steps=", "log_every=", "eval_every="))]
    out = base / "slurm-preempted"
    job, log = submit(slurm, base, [f"output_dir={out}", f"max_steps={steps}", "log_every=5", "eval_every=0",
                                    *SHARED_CORES, *args])
    wait_for_line(slurm, job, log, rf"^step 5/{steps} \|")
    slurm.scancel(job, "--batch", "--signal=USR1")
    first = wait_for_line(slurm, job, log, r"stopped by SIGUSR1 after optimizer step (\d+)")
    k1 = int(first.group(1))
    # Requeued: this cluster holds the job 5 s (AuthInfo cred_expire; SLURM's default is 120 s), then runs
    # the same command again, which resumes.
    resumed = wait_for_line(slurm, job, log, rf"resumed from \S*step-{k1:08d} at optimizer step {k1}\b", first.end())
    wait_for_line(slurm, job, log, rf"^step {(k1 // 5 + 1) * 5}/{steps} \|", resumed.end())
    assert slurm.job(job)["Restarts"] == "1"
    slurm.scancel(job)
    info = slurm.wait_for_job(job, timeout=TIMEOUT)
    text = log.read_text()
    assert info["JobState"] == "CANCELLED" and info["Restarts"] == "1", f"{info}\n{text[-5000:]}\n{slurm.logs()}"

    assert text.count("slurm.sbatch: training preempted (exit 75): requeueing job") == 1
    second = re.search(r"stopped by SIGTERM after optimizer step (\d+)", text[resumed.end():])
    assert second, text[-5000:]
    k2 = int(second.group(1))
    assert 5 <= k1 < k2 < steps
    assert "terminated (SIGTERM): not requeued" in text
    assert (out / "checkpoints" / "latest").read_text().strip() == f"step-{k2:08d}"
    assert plan_lines(text) and all("world_size=2," in p for p in plan_lines(text))
