"""No silent hangs: a rank that stalls is named and the job ends within hang_timeout and a little more; an
error on one rank ends the others; the process group forms anew after an elastic restart, and a job that
loses a node carries on with fewer processes. Every test starts real processes (torchrun, gloo)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from acctrain import TrainConfig
from acctrain.errors import HANG_EXIT_CODE, PEER_FAILED_EXIT_CODE, ConfigError
from tests.support.processes import ROOT, free_port, launch, launch_env
from tests.support.runs import assert_same_run, load_result
from tests.support.tiny import rel_diff

HANG_TIMEOUT = 5.0
FAULT = ["-m", "tests.workers.fault_run"]
ELASTIC = ["-m", "tests.workers.elastic_run"]


def run_fault(out: Path, fault: str) -> tuple[subprocess.CompletedProcess, float]:
    """Launch fault_run on 2 processes; returns the launch and the seconds from the fault to the job's end."""
    proc = launch([*FAULT, json.dumps({"out_dir": str(out), "fault": fault, "hang_timeout": HANG_TIMEOUT})],
                  nproc=2, check=False, timeout=240)
    ended = time.time()
    at = re.search(r"fault: rank 1 \w+ at step 3 \(t=([\d.]+)\)", proc.stderr)
    assert at, proc.stderr[-4000:]
    return proc, ended - float(at.group(1))


def exit_codes(stderr: str) -> list[int]:
    """The workers' exit codes as torchrun's summary lists them."""
    return [int(code) for code in re.findall(r"exitcode\s+:\s*(-?\d+)", stderr)]


@pytest.mark.processes
@pytest.mark.parametrize("fault", ["sleep", "loader", "sigstop"])
def test_a_stalled_rank_is_named_and_the_job_ends(tmp_path, fault):
    proc, seconds = run_fault(tmp_path, fault)
    report = (tmp_path / "hang-report.txt").read_text()
    assert proc.returncode != 0
    assert seconds < HANG_TIMEOUT + 60, f"{seconds:.1f} s from the stall to the end"
    print(f"{fault}: {seconds:.1f} s from the stall to the end of the job")
    assert "rank(s) 1 did not arrive" in report and "rank 0 waited" in report
    rank1 = report.split("\nrank 1 ")[1]
    assert "<- did not arrive" in rank1.splitlines()[0]
    assert f"exits with code {HANG_EXIT_CODE}" in report and "acctrain: HANG" in proc.stderr  # printed too
    recorded = json.loads((tmp_path / "flight-recorder-rank0.json").read_text())  # PyTorch's flight recorder
    assert recorded["entries"] and all("collective_seq_id" in e for e in recorded["entries"])
    codes = exit_codes(proc.stderr)
    assert HANG_EXIT_CODE in codes  # rank 0; rank 1 too where it could answer
    if fault == "sleep":  # the line of the deadlocked callback, and the phase
        assert "callback Fault.before_step" in rank1 and "time.sleep(3600)  # the line a hang report" in rank1
        assert codes == [HANG_EXIT_CODE, HANG_EXIT_CODE]
    elif fault == "loader":  # the rank waits for its loader's worker: in the data phase, inside the DataLoader
        assert "step 3, data (the next micro-batch)" in rank1 and "torch/utils/data/dataloader.py" in rank1
        assert codes == [HANG_EXIT_CODE, HANG_EXIT_CODE]
    else:  # stopped: it cannot answer, and it is killed rather than left stopped
        assert "not responding: stopped (SIGSTOP or a debugger); killed (SIGKILL)" in rank1
        assert sorted(codes) == [-9, HANG_EXIT_CODE]


@pytest.mark.processes
def test_a_save_longer_than_hang_timeout_on_the_main_rank_does_not_trip_it(tmp_path):
    """Only waiting for a rank that is stuck is a hang: the main rank writing checkpoints (steps 4 and 8, and
    the end) for hang_timeout + 4 s each, while the other waits, is busy, and the run ends normally."""
    started = time.time()
    launch([*FAULT, json.dumps({"out_dir": str(tmp_path), "fault": "slow_save", "hang_timeout": HANG_TIMEOUT})],
           nproc=2, timeout=240)
    assert time.time() - started > 2 * (HANG_TIMEOUT + 4)  # the saves were slow
    assert not (tmp_path / "hang-report.txt").exists()
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step-00000008"


@pytest.mark.processes
def test_an_error_on_one_rank_ends_the_other_at_once_naming_it(tmp_path):
    proc, seconds = run_fault(tmp_path, "raise")
    print(f"raise: {seconds:.1f} s from the error to the end of the job")
    assert seconds < 30  # not the hang timeout, not a collective's timeout: the failed-rank marker
    assert "RuntimeError: a callback failed on purpose" in proc.stderr
    assert re.search(rf"rank 0 ends \(exit code {PEER_FAILED_EXIT_CODE}\) at step 3, .*because rank 1 .*raised "
                     "RuntimeError: a callback failed on purpose", proc.stderr), proc.stderr[-3000:]
    assert PEER_FAILED_EXIT_CODE in exit_codes(proc.stderr)
    assert not (tmp_path / "hang-report.txt").exists()


def as_srun_ranks(args: list[str]) -> tuple[list[int], list[str]]:
    """Two plain `python ARGS` processes given their ranks as srun gives them (no launcher): their exit codes and
    outputs."""
    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env=launch_env({"RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2",
                                                         "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                                                         "MASTER_PORT": port}))
             for r in range(2)]
    try:
        outputs = [p.communicate(timeout=180)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    return [p.returncode for p in procs], outputs


@pytest.mark.processes
@pytest.mark.parametrize("fault", ["raise", "sleep"])
def test_without_a_launcher_no_rank_is_left_waiting(tmp_path, fault):
    """Two plain processes given their ranks as srun gives them (no torchrun to kill the survivor): an error
    on rank 1 ends rank 0 with 125; a rank asleep in a callback ends both with 124."""
    started = time.time()
    codes, outputs = as_srun_ranks([*FAULT, json.dumps({"out_dir": str(tmp_path), "fault": fault,
                                                        "hang_timeout": HANG_TIMEOUT})])
    assert time.time() - started < 120
    if fault == "raise":
        assert codes == [PEER_FAILED_EXIT_CODE, 1], outputs
        assert "because rank 1 " in outputs[0] and "RuntimeError: a callback failed on purpose" in outputs[1]
    else:
        assert codes == [HANG_EXIT_CODE, HANG_EXIT_CODE], outputs
        assert "rank(s) 1 did not arrive" in (tmp_path / "hang-report.txt").read_text()


@pytest.mark.processes
@pytest.mark.parametrize("launcher", ["torchrun", "plain"])
def test_a_second_engine_after_close_forms_a_group_of_its_own(tmp_path, launcher):
    """An Engine closed (its group destroyed), then another in the same processes: the second group takes none of
    the first's store or marks (under torchrun, where rank 0 publishes a store of its own in the agent's; and with
    the ranks given as srun gives them, where rank 0 hosts the store at MASTER_PORT), and trains."""
    args = ["-m", "tests.workers.two_engines_run", str(tmp_path)]
    if launcher == "torchrun":
        launch(args, nproc=2, timeout=240)
    else:
        codes, outputs = as_srun_ranks(args)
        assert codes == [0, 0], outputs
    result = json.loads((tmp_path / "two_engines.json").read_text())
    assert result["world_size_env"] == 2
    assert [(p["num_processes"], p["step"]) for p in result["phases"]] == [(2, 3), (2, 3)]
    assert result["phases"][0]["loss"] == result["phases"][1]["loss"]  # the same job twice: the same steps


@pytest.mark.processes
def test_a_rank_that_never_joins_is_named_within_hang_timeout(tmp_path):
    """Rank 0 of 2 started alone (a node whose launcher never came): it stops after hang_timeout naming rank 1."""
    env = launch_env({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
                      "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())})
    started = time.time()
    proc = subprocess.run([sys.executable, *FAULT, json.dumps({"out_dir": str(tmp_path / "out"), "fault": "none",
                                                                 "hang_timeout": 3})],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == HANG_EXIT_CODE, proc.stderr[-3000:]
    assert time.time() - started < 3 + 30
    assert "rank 0 (" in proc.stderr and "rank(s) 1 of 2 never joined the process group within hang_timeout=3 s" \
        in proc.stderr
    assert not (tmp_path / "out").exists()  # nothing written


def test_hang_timeout_must_be_positive():
    for bad in (0, -1, float("inf")):
        with pytest.raises(ConfigError) as err:
            TrainConfig(hang_timeout=bad)
        assert err.value.field == "hang_timeout"


# ----------------------------------------------------------------------------------------- elastic recovery


@pytest.mark.processes
def test_a_worker_killed_mid_run_is_restarted_and_the_result_is_bit_identical(tmp_path):
    """torchrun --max-restarts 2: rank 1 is killed (SIGKILL) after step 7 of 12; the restarted workers form a
    new group, resume from step 6 and end bitwise where an uninterrupted run ends."""
    options = {"steps": 12, "save_every": 3, "cpu_threads": 1, "dropout": 0.2}
    launch([*ELASTIC, json.dumps({"out_dir": str(tmp_path / "ref"), **options})], nproc=2)
    launch(["--max-restarts", "2", *ELASTIC, json.dumps({"out_dir": str(tmp_path / "run"), "kill_at": 7,
                                                         **options})], nproc=2, timeout=240)
    rounds = [json.loads(line) for line in (tmp_path / "run.rounds.jsonl").read_text().splitlines()]
    assert sorted((r["restart"], r["rank"]) for r in rounds) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    ref, run = load_result(tmp_path / "ref"), load_result(tmp_path / "run")
    assert run["resumed_from"].endswith("step-00000006") and run["num_processes"] == 2
    assert run["steps"] == list(range(7, 13))
    assert_same_run(run, ref)
    assert run["losses"] == ref["losses"][6:]


@pytest.mark.processes
def test_losing_a_node_carries_on_with_half_the_processes(tmp_path):
    """Two torchrun agents on one host stand for two nodes (--nnodes 1:2, c10d rendezvous on localhost). After
    step 7 the second node's worker stops and the test kills it with its agent: the first agent's worker fails,
    the agent re-forms the group alone (world size 1), resumes from step 6 with the same global batch and
    finishes; the weights match an uninterrupted 2-process run as a resume on another world size does."""
    options = {"steps": 12, "save_every": 3, "cpu_threads": 1}
    launch([*ELASTIC, json.dumps({"out_dir": str(tmp_path / "ref"), **options})], nproc=2)
    out, port = tmp_path / "run", free_port()
    args = json.dumps({"out_dir": str(out), "stall_at": 7, **options})

    def agent(is_host: bool, env: dict) -> subprocess.Popen:  # one "node": launch/torchrun_elastic.sh
        env = {"NNODES": "1:2", "NPROC": "1", "RDZV_ENDPOINT": f"127.0.0.1:{port}", "RDZV_ID": "lose-a-node",
               "RDZV_LAST_CALL": "10", "RDZV_CONF": f"is_host={str(is_host).lower()}", "MONITOR_INTERVAL": "0.5",
               "TORCHRUN": f"{sys.executable} -m torch.distributed.run", "ACCTRAIN_SCRIPT": " ".join(ELASTIC), **env}
        log = open(tmp_path / f"agent-{'host' if is_host else 'lost'}.log", "w")
        return subprocess.Popen(["bash", "launch/torchrun_elastic.sh", args], cwd=ROOT, env=launch_env(env),
                                stdout=log, stderr=subprocess.STDOUT)

    kept = agent(True, {})  # it hosts the rendezvous store, so it must be the one that survives
    time.sleep(1)
    lost = agent(False, {"ELASTIC_TEST_NODE": "lost"})
    try:
        marker = Path(f"{out}.stalled")
        deadline = time.time() + 180
        while not marker.exists() and time.time() < deadline:
            time.sleep(0.1)
        assert marker.exists(), (tmp_path / "agent-host.log").read_text()[-3000:]
        time.sleep(0.2)
        os.kill(lost.pid, signal.SIGKILL)  # the node is gone: its agent and its worker
        os.kill(int(marker.read_text()), signal.SIGKILL)
        assert kept.wait(timeout=240) == 0, (tmp_path / "agent-host.log").read_text()[-4000:]
    finally:
        for proc in (kept, lost):
            if proc.poll() is None:
                proc.kill()
    rounds = [json.loads(line) for line in Path(f"{out}.rounds.jsonl").read_text().splitlines()]
    assert [r["world"] for r in rounds] == [2, 2, 1]
    log = (tmp_path / "agent-host.log").read_text()
    assert "resuming on 1 processes (checkpoint: 2); accumulation 2 -> 4, same global samples per step" in log
    ref, run = load_result(tmp_path / "ref"), load_result(out)
    assert run["num_processes"] == 1 and run["resumed_from"].endswith("step-00000006")
    assert run["steps"] == list(range(7, 13))
    params = [{k: v for k, v in r["tensors"].items() if k.startswith("param.")} for r in (run, ref)]
    print(f"lost node: final weights' relative difference from the uninterrupted run {rel_diff(*params):.2e}")
    assert_same_run(run, ref, exact=False)


def test_nccl_gets_error_handling_and_the_flight_recorder_unless_set(monkeypatch, tmp_path):
    """What acctrain.group sets before an NCCL group forms (run on a GPU only by benchmarks/gpu_check.sh's
    suite): defaults where the user set nothing, the user's values kept."""
    from acctrain import group

    for name in ("TORCH_NCCL_ASYNC_ERROR_HANDLING", "TORCH_FR_BUFFER_SIZE", "TORCH_NCCL_DUMP_ON_TIMEOUT",
                 "TORCH_FR_DUMP_TEMP_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TORCH_FR_BUFFER_SIZE", "50")  # the user's
    group.nccl_defaults(str(tmp_path))
    assert os.environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "3"
    assert os.environ["TORCH_NCCL_DUMP_ON_TIMEOUT"] == "1"
    assert os.environ["TORCH_FR_BUFFER_SIZE"] == "50"
    assert os.environ["TORCH_FR_DUMP_TEMP_FILE"] == str(tmp_path / "flight-recorder-rank")
