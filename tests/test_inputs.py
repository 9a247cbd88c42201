"""Every setting honoured or refused, every failure a message: real `python train.py` and `acctrain` processes.

Each bad input must exit with a message that names the field or the file, and leave `output_dir` as it was
(not created, or unchanged). The settings a launcher gives (its precision, OMP_NUM_THREADS) must be the ones
the run uses, and the container entrypoint must turn `docker stop` into a checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors import safe_open

from acctrain.errors import PREEMPTED_EXIT_CODE
from tests.support import ROOT, STEPS, TINY
from tests.support.runs import rewrite

pytestmark = pytest.mark.processes  # every test here starts processes

TIMEOUT = 300
TINY_CPU = [*TINY, "cpu=true"]


def run(args: list[str], env: dict | None = None, timeout: int = TIMEOUT, cwd: Path = ROOT):
    """`python ARGS` from the repository root (train.py, or -m acctrain.cli ...), output captured."""
    full_env = {k: v for k, v in os.environ.items() if k != "ACCELERATE_MIXED_PRECISION"}  # no launcher around
    full_env.update(PYTHONUNBUFFERED="1", **(env or {}))
    return subprocess.run([sys.executable, *args], cwd=cwd, env=full_env, capture_output=True, text=True,
                          timeout=timeout)


def snapshot(out: Path) -> dict[str, str]:
    """Every file under `out` with a hash of its bytes (empty when `out` does not exist), but the run lock, which
    each run that starts rewrites with its pid (acctrain.checkpoint.run_lock)."""
    if not out.exists():
        return {}
    return {p.relative_to(out).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.rglob("*")) if p.is_file() and p.name != ".lock"}


def refused(proc, *words: str, code: int = 2) -> str:
    text = proc.stdout + proc.stderr
    assert proc.returncode == code, f"exit {proc.returncode}\n{text[-4000:]}"
    assert "Traceback" not in text, text[-4000:]
    for word in words:
        assert word in text, f"{word!r} not in:\n{text[-4000:]}"
    return text


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """The tiny main job, trained once (STEPS optimizer steps) by `python train.py`."""
    out = tmp_path_factory.mktemp("inputs") / "run"
    proc = run(["train.py", f"output_dir={out}", *TINY_CPU])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


# ---- config files and values ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name,text,where", [
    ("bad.yaml", "lr: 1e-3\nadam_betas: [0.9, 0.99\nseed: 3\n", "line 3, column 5"),
    ("bad.toml", "lr = 0.001\nseed = \n", "line 2, column 8"),
])
def test_malformed_config_file_names_file_line_and_column(tmp_path, name, text, where):
    (tmp_path / name).write_text(text)
    out = tmp_path / "out"
    proc = run(["train.py", str(tmp_path / name), f"output_dir={out}", *TINY_CPU])
    refused(proc, "config error: config:", str(tmp_path / name), where)
    assert not out.exists()


@pytest.mark.parametrize("value", ["100000000000000000000", "-1", "1e20", "1.5", "abc"])
def test_seed_out_of_range_or_not_an_int_names_the_field(tmp_path, value):
    out = tmp_path / "out"
    refused(run(["train.py", f"seed={value}", f"output_dir={out}", *TINY_CPU]), "config error: seed:")
    assert not out.exists()


def test_output_dir_that_is_a_file_is_refused(tmp_path):
    out = tmp_path / "out"
    out.write_text("not a directory")
    refused(run(["train.py", f"output_dir={out}", *TINY_CPU]), "config error: output_dir:", str(out), "is an existing file")
    assert out.read_text() == "not a directory"


def test_output_dir_under_a_file_is_refused(tmp_path):
    parent = tmp_path / "file"
    parent.write_text("x")
    out = parent / "sub"
    refused(run(["train.py", f"output_dir={out}", *TINY_CPU]), "config error: output_dir:", str(parent), "not a directory")
    assert parent.read_text() == "x"


def test_output_dir_that_cannot_be_written_is_refused():
    """/proc/1 exists and refuses new entries even to root (chmod would not stop root, and the tests may run
    as root)."""
    out = Path("/proc/1/acctrain-out")
    if not Path("/proc/1").is_dir() or os.access("/proc/1", os.W_OK):
        pytest.skip("no /proc/1 that refuses writes on this machine")
    refused(run(["train.py", f"output_dir={out}", *TINY_CPU]), "config error: output_dir:", "/proc/1", "not writable")


@pytest.mark.parametrize("tracker", ["wandb", "mlflow"])
def test_tracker_that_is_not_installed_is_refused_with_the_install(tmp_path, tracker):
    pytest.importorskip("accelerate")
    from accelerate.tracking import get_available_trackers

    if tracker in {str(getattr(t, "value", t)) for t in get_available_trackers()}:
        pytest.skip(f"{tracker} is installed here")
    out = tmp_path / "out"
    proc = run(["train.py", f"log_with=tensorboard,{tracker}", f"output_dir={out}", *TINY_CPU])
    refused(proc, "config error: log_with:", f"pip install {tracker}")
    assert not out.exists()


# ---- commands ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["train", "plan", "plot-schedule", "export", "lr-find", "summary", "tokenize",
                                     "verify"])
def test_command_help_prints_its_usage(command):
    proc = run(["-m", "acctrain.cli", command, "--help"], timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.startswith(f"usage: acctrain {command} "), proc.stdout
    assert "config error" not in proc.stdout + proc.stderr


def test_train_py_help_prints_the_usage():
    proc = run(["train.py", "-h"], timeout=120)
    assert proc.returncode == 0 and proc.stdout.startswith("usage: acctrain train "), proc.stdout + proc.stderr


def test_plot_schedule_without_matplotlib_says_what_to_install(tmp_path):
    """matplotlib made unimportable for real: a `matplotlib` package first on the path whose import fails."""
    fake = tmp_path / "site" / "matplotlib"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('No module named matplotlib (hidden by the test)')\n")
    out = tmp_path / "schedule.png"
    proc = run(["-m", "acctrain.cli", "plot-schedule", "max_steps=20", f"out={out}"], timeout=120,
               env={"PYTHONPATH": f"{tmp_path / 'site'}{os.pathsep}{ROOT}"})
    text = refused(proc, "matplotlib", "pip install matplotlib", 'pip install -e ".[plot]"', code=1)
    assert "acctrain[plot]" not in text  # acctrain is not on the package index
    assert not out.exists()


# The `plot` extra that the message above names: tests/test_plot_extra.py (in-process).


# ---- the job's settings: resume and export -------------------------------------------------------------------


def test_relaunch_with_another_model_setting_is_refused_naming_it(trained):
    before = snapshot(trained)
    args = [a if not a.startswith("model.d_model=") else "model.d_model=64" for a in TINY_CPU]
    proc = run(["train.py", f"output_dir={trained}", *args])
    refused(proc, "config error: model.d_model:", "model.d_model=32", "64")
    assert snapshot(trained) == before


def test_checkpoint_records_the_model_and_data_settings(trained):
    state = json.loads((trained / "checkpoints" / f"step-{STEPS:08d}" / "trainer_state.json").read_text())
    assert state["settings"]["model.d_model"] == 32 and state["settings"]["data.max_bytes"] == 20000


def exported_settings(path: Path) -> dict:
    with safe_open(str(path), "pt") as f:
        return json.loads(f.metadata()["acctrain.settings"])


def test_export_writes_the_settings_into_the_metadata(trained, tmp_path):
    out = tmp_path / "model.safetensors"
    proc = run(["-m", "acctrain.cli", "export", str(trained / "checkpoints" / f"step-{STEPS:08d}"), str(out)])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    settings = exported_settings(out)
    assert settings["model.d_model"] == 32 and settings["model.n_layers"] == 1 and settings["model.context_len"] == 32
    assert settings["data.max_bytes"] == 20000


def test_export_of_a_run_directory_exports_its_newest_checkpoint(trained, tmp_path):
    out = tmp_path / "model.safetensors"
    before = snapshot(trained)
    proc = run(["-m", "acctrain.cli", "export", str(trained), str(out)])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    newest = trained / "checkpoints" / f"step-{STEPS:08d}"
    assert f"{trained} is a run directory" in proc.stdout and str(newest) in proc.stdout
    with safe_open(str(out), "pt") as f, safe_open(str(newest / "model.safetensors"), "pt") as g:
        assert set(f.keys()) == set(g.keys())
        assert all(f.get_tensor(k).equal(g.get_tensor(k)) for k in f.keys())
    assert snapshot(trained) == before


def test_export_refuses_a_checkpoint_format_it_does_not_know(trained, tmp_path):
    newer = tmp_path / "step-newer"
    shutil.copytree(trained / "checkpoints" / f"step-{STEPS:08d}", newer)
    manifest = json.loads((newer / "manifest.json").read_text())
    (newer / "manifest.json").write_text(json.dumps({**manifest, "format_version": 99}))
    proc = run(["-m", "acctrain.cli", "export", str(newer), str(tmp_path / "m.safetensors")])
    refused(proc, "format version 99", "acctrain 0.1.0 wrote it, which writes format 3 at most: the manifest was "
            "edited or damaged", code=1)
    state = json.loads((newer / "trainer_state.json").read_text())  # written by a newer acctrain: named
    (newer / "manifest.json").write_text(json.dumps(manifest))
    rewrite(newer, "trainer_state.json", json.dumps({**state, "versions": {**state["versions"], "acctrain": "2.0"}}).encode())
    (newer / "manifest.json").write_text(json.dumps({**json.loads((newer / "manifest.json").read_text()),
                                                     "format_version": 99}))
    proc = run(["-m", "acctrain.cli", "export", str(newer), str(tmp_path / "m.safetensors")])
    refused(proc, "format version 99", "acctrain 2.0 wrote it: upgrade acctrain to 2.0 or later", code=1)
    assert not (tmp_path / "m.safetensors").exists()


def test_export_of_a_directory_without_checkpoints_says_so(tmp_path):
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    proc = run(["-m", "acctrain.cli", "export", str(tmp_path / "run"), str(tmp_path / "m.safetensors")])
    refused(proc, str(tmp_path / "run"), "without a complete checkpoint", code=1)
    assert not (tmp_path / "m.safetensors").exists()


# ---- what the launcher says ----------------------------------------------------------------------------------


def accelerate_launch(flags: list[str], args: list[str]):
    """`accelerate launch FLAGS train.py ARGS`, one process."""
    cmd = ["-m", "accelerate.commands.launch", *flags, "--num_processes", "1", "--dynamo_backend", "no", "train.py", *args]
    return run(cmd, env={"OMP_NUM_THREADS": "1"})


def test_precision_of_the_launch_config_is_used_when_the_config_leaves_it_unset(tmp_path):
    """launch/multi_gpu.yaml says `mixed_precision: bf16` (on CPU here, one process): the run trains in bf16."""
    out = tmp_path / "out"
    proc = accelerate_launch(["--config_file", "launch/multi_gpu.yaml"], [f"output_dir={out}", *TINY_CPU])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "precision=bf16" in proc.stdout, proc.stdout
    state = json.loads((out / "checkpoints" / f"step-{STEPS:08d}" / "trainer_state.json").read_text())
    assert state["config"]["mixed_precision"] == "bf16"  # the precision the run used, not "unset"


def test_launcher_precision_that_contradicts_the_config_is_refused(tmp_path):
    out = tmp_path / "out"
    proc = accelerate_launch(["--num_machines", "1", "--mixed_precision", "bf16"],
                             [f"output_dir={out}", "mixed_precision=no", *TINY_CPU])
    assert proc.returncode != 0
    message = next((line for line in proc.stderr.splitlines() if line.startswith("config error: ")), proc.stderr)
    assert message.startswith("config error: mixed_precision:"), message
    assert "this config says 'no'" in message and "is 'bf16'" in message, message
    assert not out.exists()


THREADS = """
import sys
from acctrain.config import TrainConfig
from acctrain.runtime import make_accelerator
import torch
make_accelerator(TrainConfig(output_dir=sys.argv[1], cpu=True, cpu_threads=int(sys.argv[2])))
print("threads", torch.get_num_threads())
"""


@pytest.mark.parametrize("omp,cpu_threads,expected", [("3", 0, 3), ("1", 0, 1), ("3", 2, 2)])
def test_omp_num_threads_is_honoured_unless_cpu_threads_is_set(tmp_path, omp, cpu_threads, expected):
    env = dict(os.environ, OMP_NUM_THREADS=omp)
    proc = subprocess.run([sys.executable, "-c", THREADS, str(tmp_path / "out"), str(cpu_threads)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert f"threads {expected}" in proc.stdout, proc.stdout + proc.stderr


def test_fsdp_in_one_process_without_a_launcher_is_refused(tmp_path):
    out = tmp_path / "out"
    proc = run(["train.py", "fsdp=true", f"output_dir={out}", *TINY_CPU])
    refused(proc, "config error: fsdp:", "accelerate launch --num_processes N", "torchrun --nproc_per_node")
    assert not out.exists()


# ---- docker stop: the image's entrypoint as PID 1 -----------------------------------------------------------


def entrypoint() -> list[str]:
    """The ENTRYPOINT of both images (the same), its /app paths made the repository's."""
    found = [json.loads(re.search(r"^ENTRYPOINT (\[.*\])$", (ROOT / "docker" / name).read_text(), re.M).group(1))
             for name in ("Dockerfile", "Dockerfile.cpu")]
    assert found[0] == found[1]
    return [arg.replace("/app/", f"{ROOT}/") for arg in found[0]]


def pid_namespace_reason() -> str | None:
    if shutil.which("unshare") is None:
        return "no unshare (util-linux)"
    probe = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"], capture_output=True, text=True)
    return None if probe.returncode == 0 else f"cannot make a PID namespace here: {probe.stderr.strip()}"


def test_docker_stop_saves_a_checkpoint_and_exits_75(tmp_path):
    """The image's entrypoint as PID 1 of a new PID namespace (as in a container, without docker): SIGTERM sent
    from outside, as `docker stop` does, must end in a checkpoint and exit code 75."""
    if reason := pid_namespace_reason():
        pytest.skip(reason)
    out, log = tmp_path / "out", tmp_path / "log"
    steps = 5000
    args = [a for a in TINY_CPU if not a.startswith(("max_steps=", "log_every=", "eval_every="))]
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1",
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    cmd = ["unshare", "--pid", "--fork", "--mount-proc", *entrypoint(), "train.py", f"output_dir={out}",
           f"max_steps={steps}", "log_every=2", "eval_every=0", *args]
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + TIMEOUT
        while not re.search(rf"^step 4/{steps} \|", log.read_text(), re.M):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-4000:]
            time.sleep(0.2)
        init = int(Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()[0])  # PID 1 inside
        os.kill(init, signal.SIGTERM)
        rc = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log.read_text()
    stopped = re.search(r"stopped by SIGTERM after optimizer step (\d+)", text)
    assert stopped, text[-4000:]
    assert (out / "checkpoints" / "latest").read_text().strip() == f"step-{int(stopped.group(1)):08d}"
    assert rc == PREEMPTED_EXIT_CODE, text[-4000:]
