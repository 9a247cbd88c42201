"""launch/kubernetes/: the entry point run as two real "pods" on this host, and the manifests checked offline.

- Two pods: two processes of launch/kubernetes/entrypoint.sh started at once, each with the environment a
  Kubeflow PyTorchJob gives its pods (PET_NNODES=2, PET_NPROC_PER_NODE=1, PET_NODE_RANK, PET_MASTER_ADDR,
  PET_MASTER_PORT, and the operator's MASTER_ADDR, WORLD_SIZE, RANK), or an Indexed Job's (JOB_COMPLETION_INDEX
  and the PET_* values the manifest sets). Both must end with the weights and optimizer state of the same job
  as one `torchrun --nproc_per_node 2`, bitwise (cpu_threads=1 everywhere). Both pods share one output_dir, as
  pods sharing the ReadWriteMany volume do.
- Preemption: SIGTERM to one pod's entry point (what the kubelet sends the container's PID 1) makes every rank
  save and stop; that pod exits 75; the same two pods started again resume and end bitwise like the reference.
- Refusals: a missing or malformed variable is refused (exit 2) naming it, before torchrun starts.
- Manifests: parsed with PyYAML, validated against the Kubernetes v1.33 schemas and the PyTorchJob v1 CRD
  schema (tests/data/kubernetes_schemas.json, see tests/data/make_kubernetes_schemas.py), and checked for
  what resume needs.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import jsonschema
import pytest
import yaml

from tests.support import ROOT, TINY, free_port, launch
from tests.support.runs import assert_bitwise, final_checkpoint_tensors
from tests.test_launch import job_env, layout, plan_lines, run_together

K8S = ROOT / "launch" / "kubernetes"
ENTRYPOINT = K8S / "entrypoint.sh"
SCHEMAS = ROOT / "tests" / "data" / "kubernetes_schemas.json"
STEPS = 400  # long enough for a SIGTERM to land mid-run (about 90 steps/s here), a few seconds of training
JOB = [*[a for a in TINY if not a.startswith(("max_steps=", "log_every=", "eval_every="))],
       f"max_steps={STEPS}", "log_every=5", "eval_every=200", "cpu=true", "cpu_threads=1"]
TIMEOUT = 240  # seconds for one launch of the job (about 25 s on 2 busy cores)


def read_manifest(name: str) -> list[dict]:
    return [doc for doc in yaml.safe_load_all((K8S / name).read_text()) if doc]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("kubernetes")


@pytest.fixture(scope="module")
def reference(base) -> Path:
    """The job as one 2-process torchrun on one node."""
    out = base / "reference"
    proc = launch(["train.py", f"output_dir={out}", *JOB], nproc=2, launcher="torchrun", timeout=TIMEOUT)
    assert [p for p in plan_lines(proc.stdout) if "world_size=2," in p], proc.stdout[-3000:]
    return out


def pod_env(kind: str, rank: int, port: int) -> dict[str, str]:
    """What Kubernetes puts in pod `rank`'s environment (with the entry point on this host's loopback)."""
    if kind == "pytorchjob":  # the training operator's variables (v1.9: envvar.go, master.go)
        values = dict(PET_NNODES="2", PET_NPROC_PER_NODE="1", PET_NODE_RANK=str(rank), PET_MASTER_ADDR="127.0.0.1",
                      PET_MASTER_PORT=str(port), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2",
                      RANK=str(rank))
    elif kind == "indexed-job":  # the Job controller's index, and the PET_* values indexed-job.yaml sets
        values = dict(JOB_COMPLETION_INDEX=str(rank), PET_NNODES="2", PET_NPROC_PER_NODE="1",
                      PET_MASTER_ADDR="127.0.0.1", PET_MASTER_PORT=str(port))
    else:
        raise ValueError(kind)
    env = job_env(**values)
    for name in ("PET_RDZV_BACKEND", "PET_NODE_RANK", "JOB_COMPLETION_INDEX"):  # only what this pod is given
        if name not in values:
            env.pop(name, None)
    return env


def pod_commands(kind: str, out: Path, port: int) -> list[tuple[list[str], dict[str, str]]]:
    return [(["bash", str(ENTRYPOINT), f"output_dir={out}", *JOB], pod_env(kind, rank, port)) for rank in (0, 1)]


@pytest.fixture(scope="module", params=["pytorchjob", "indexed-job"])
def two_pods(request, base):
    out = base / f"pods-{request.param}"  # one path for both pods: the volume they share
    procs = run_together(pod_commands(request.param, out, free_port()), base / f"pods-{request.param}-logs", TIMEOUT)
    for rank, proc in enumerate(procs):
        assert proc.returncode == 0, f"pod {rank} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return procs, out


@pytest.mark.processes
def test_two_pods_train_bitwise_like_one_torchrun(two_pods, reference):
    procs, out = two_pods
    assert_bitwise(final_checkpoint_tensors(out, STEPS), final_checkpoint_tensors(reference, STEPS))
    assert layout(out) == layout(reference)
    plans = plan_lines(procs[0].stdout)
    assert len(plans) == 1 and "world_size=2," in plans[0], procs[0].stdout[-3000:]
    assert plan_lines(procs[1].stdout) == []  # printed once, by global rank 0
    for rank, proc in enumerate(procs):  # the torchrun each pod ran: static rendezvous, its node rank
        line = next(x for x in proc.stdout.splitlines() if x.startswith("kubernetes/entrypoint.sh: node"))
        assert f"node {rank} of 2: " in line and f"--node-rank {rank} " in line and "--rdzv-backend static" in line


@pytest.mark.processes
def test_sigterm_to_one_pod_saves_exits_75_and_the_restarted_pods_resume_bitwise(base, reference):
    """A preemption of pod 0: the kubelet's SIGTERM reaches its entry point (PID 1). Every rank saves at the same
    step; pod 0 exits 75, pod 1 fails (its peer left). Both pods, restarted with the same command, resume from
    that checkpoint and end with the uninterrupted run's weights, bitwise."""
    out, logs = base / "preempted", base / "preempted-logs"
    logs.mkdir()
    commands = pod_commands("pytorchjob", out, free_port())
    files = [open(logs / f"{i}.out", "w") for i in range(len(commands))]
    procs = [subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=file, stderr=subprocess.STDOUT, start_new_session=True)
             for file, (cmd, env) in zip(files, commands)]
    try:
        deadline = time.monotonic() + TIMEOUT
        while not re.search(r"^step 5/", (logs / "0.out").read_text(), re.M):
            assert procs[0].poll() is None and time.monotonic() < deadline, (logs / "0.out").read_text()[-3000:]
            time.sleep(0.05)
        signalled = time.monotonic()
        procs[0].send_signal(signal.SIGTERM)  # the entry point only, as the kubelet signals PID 1
        codes = [proc.wait(timeout=120) for proc in procs]
        stop_seconds = time.monotonic() - signalled
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
        for file in files:
            file.close()
    text = (logs / "0.out").read_text()
    assert codes[0] == 75 and codes[1] != 0, f"{codes}\n{text[-3000:]}\n{(logs / '1.out').read_text()[-3000:]}"
    stopped = re.search(r"stopped by SIGTERM after optimizer step (\d+)", text)
    assert stopped and "training stopped after SIGTERM" in text, text[-3000:]
    step = int(stopped.group(1))
    assert 5 <= step < STEPS and (out / "checkpoints" / "latest").read_text().strip() == f"step-{step:08d}"
    assert stop_seconds < 60, f"{stop_seconds:.1f} s from SIGTERM to both pods' exit"  # the manifests allow 300
    print(f"\nSIGTERM to pod 0 at step {step}: both pods exited {stop_seconds:.2f} s later")

    restarted = run_together(commands, base / "resumed-logs", TIMEOUT)
    assert [p.returncode for p in restarted] == [0, 0], restarted[0].stdout[-3000:] + restarted[0].stderr[-3000:]
    assert re.search(rf"resumed from \S*step-{step:08d} at optimizer step {step}\b", restarted[0].stdout), \
        restarted[0].stdout[-3000:]
    assert_bitwise(final_checkpoint_tensors(out, STEPS), final_checkpoint_tensors(reference, STEPS))


# ---- refusals ------------------------------------------------------------------------------------------------

PYTORCHJOB_POD = dict(PET_NNODES="2", PET_NPROC_PER_NODE="1", PET_NODE_RANK="1", PET_MASTER_ADDR="127.0.0.1",
                      PET_MASTER_PORT="29500")


@pytest.mark.processes
@pytest.mark.parametrize("change,named", [
    ({"PET_NNODES": None}, "PET_NNODES is not set"),
    ({"PET_NPROC_PER_NODE": None}, "PET_NPROC_PER_NODE is not set"),
    ({"PET_NODE_RANK": None}, "PET_NODE_RANK is not set"),
    ({"PET_MASTER_ADDR": None}, "PET_MASTER_ADDR is not set"),
    ({"PET_MASTER_PORT": None}, "PET_MASTER_PORT is not set"),
    ({"PET_NNODES": "two"}, "PET_NNODES='two' is not valid"),
    ({"PET_NNODES": "1:4"}, "PET_NNODES='1:4' is a MIN:MAX range"),
    ({"PET_RDZV_BACKEND": "c10d"}, "PET_RDZV_BACKEND='c10d'"),
    ({"PET_NPROC_PER_NODE": "auto"}, "PET_NPROC_PER_NODE='auto' is not valid"),
    ({"PET_NODE_RANK": "2"}, "PET_NODE_RANK=2 is not below PET_NNODES=2"),
    ({"PET_MASTER_PORT": "70000"}, "PET_MASTER_PORT=70000 is not a TCP port"),
    ({"PET_NODE_RANK": None, "JOB_COMPLETION_INDEX": "-1"}, "PET_NODE_RANK='-1' is not valid"),
    ({"JOB_COMPLETION_INDEX": "0"}, "PET_NODE_RANK='1' and JOB_COMPLETION_INDEX='0' disagree"),
    ({"PET_MASTER_ADDR": "no-such-pod.invalid", "MASTER_WAIT_SECONDS": "0"},
     "PET_MASTER_ADDR=no-such-pod.invalid did not resolve within 0 s"),
])
def test_entrypoint_refuses_a_missing_or_bad_variable_by_name(tmp_path, change, named):
    env = {k: v for k, v in job_env().items() if not k.startswith("PET_") and k != "JOB_COMPLETION_INDEX"}
    env.update({k: v for k, v in {**PYTORCHJOB_POD, **change}.items() if v is not None})
    env["TORCHRUN"] = "echo torchrun-started"  # nothing must start: a refusal comes first
    proc = subprocess.run(["bash", str(ENTRYPOINT), f"output_dir={tmp_path}/run"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert named in proc.stderr, proc.stderr
    assert "torchrun-started" not in proc.stdout and not (tmp_path / "run").exists()


# ---- the manifests -------------------------------------------------------------------------------------------


def schema_errors(doc: dict) -> list[str]:
    root = json.loads(SCHEMAS.read_text())
    validator = jsonschema.Draft202012Validator({**root, "$ref": f"#/$defs/kind:{doc['kind']}"})
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


@pytest.mark.parametrize("name", ["pvc.yaml", "pytorchjob.yaml", "indexed-job.yaml"])
def test_manifests_are_valid_for_kubernetes_and_the_pytorchjob_crd(name):
    for doc in read_manifest(name):
        assert schema_errors(doc) == [], f"{name} {doc['kind']}"


def test_the_schemas_refuse_a_misspelled_field():
    """The check above can fail: unknown fields and wrong types are errors, as `kubectl apply` makes them."""
    job = read_manifest("pytorchjob.yaml")[0]
    job["spec"]["runPolicy"]["backofLimit"] = 3
    job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]["volumeMount"] = []
    errors = schema_errors(job)
    assert any("'backofLimit' was unexpected" in e for e in errors) and any("'volumeMount'" in e for e in errors)
    plain = read_manifest("indexed-job.yaml")[1]
    plain["spec"]["parallelism"] = "2"
    assert any(e.startswith("spec/parallelism:") for e in schema_errors(plain))


def pod_specs() -> dict[str, dict]:
    """Every pod template of both jobs, by name."""
    pytorchjob = read_manifest("pytorchjob.yaml")[0]
    specs = {f"pytorchjob {role}": replica["template"]["spec"]
             for role, replica in pytorchjob["spec"]["pytorchReplicaSpecs"].items()}
    specs["indexed-job"] = read_manifest("indexed-job.yaml")[1]["spec"]["template"]["spec"]
    return specs


def test_every_pod_runs_the_same_image_and_command_with_output_dir_on_the_shared_volume():
    claim = read_manifest("pvc.yaml")[0]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]  # one volume, mounted by pods on several nodes
    seen = set()
    for name, spec in pod_specs().items():
        (container,) = spec["containers"]
        seen.add((container["image"], tuple(container["command"]), tuple(container["args"]), container["workingDir"]))
        assert container["command"] == ["bash", "/app/launch/kubernetes/entrypoint.sh"], name
        volumes = {v["name"]: v for v in spec["volumes"]}
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        claimed = [v for v, vol in volumes.items()
                   if vol.get("persistentVolumeClaim", {}).get("claimName") == claim["metadata"]["name"]]
        assert len(claimed) == 1 and claimed[0] in mounts, name
        output_dir = next(a.split("=", 1)[1] for a in container["args"] if a.startswith("output_dir="))
        assert Path(output_dir).is_relative_to(mounts[claimed[0]]), f"{name}: {output_dir} is not on the volume"
        assert spec["terminationGracePeriodSeconds"] >= 120, name  # an optimizer step and a checkpoint write
        assert mounts.get("shm") == "/dev/shm" and volumes["shm"]["emptyDir"]["medium"] == "Memory", name
    assert len(seen) == 1, seen
    # The image: docker/Dockerfile puts the repository (launch/ included) in /app.
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    assert "WORKDIR /app" in dockerfile and "COPY launch/ launch/" in dockerfile


def test_pytorchjob_restarts_on_any_failure_and_gives_each_pod_its_gpus():
    job = read_manifest("pytorchjob.yaml")[0]
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert set(replicas) == {"Master", "Worker"} and replicas["Master"]["replicas"] == 1
    # OnFailure: 75 (preempted) and 124 (hang) are retried; ExitCode would retry only codes >= 128.
    assert all(r["restartPolicy"] == "OnFailure" for r in replicas.values())
    assert job["spec"]["runPolicy"]["backoffLimit"] >= 1
    gpus = int(job["spec"]["nprocPerNode"])
    for role, replica in replicas.items():
        (container,) = replica["template"]["spec"]["containers"]
        assert container["name"] == "pytorch", role  # the container the operator gives the PET_* variables
        assert container["resources"]["limits"]["nvidia.com/gpu"] == gpus, role
    (master,) = replicas["Master"]["template"]["spec"]["containers"]
    assert [p["name"] for p in master["ports"]] == ["pytorchjob-port"]


def test_indexed_job_names_pod_0_through_its_headless_service():
    service, job = read_manifest("indexed-job.yaml")
    spec, pod = job["spec"], job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert spec["completionMode"] == "Indexed"
    assert spec["parallelism"] == spec["completions"] == int(env["PET_NNODES"])
    assert int(env["PET_NPROC_PER_NODE"]) == container["resources"]["limits"]["nvidia.com/gpu"]
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"] is True
    assert pod["subdomain"] == service["metadata"]["name"]
    assert service["spec"]["selector"] == {"job-name": job["metadata"]["name"]}
    assert env["PET_MASTER_ADDR"] == f"{job['metadata']['name']}-0.{service['metadata']['name']}"
    assert int(env["PET_MASTER_PORT"]) == service["spec"]["ports"][0]["port"] == container["ports"][0]["containerPort"]
    assert "PET_NODE_RANK" not in env  # the entry point takes it from JOB_COMPLETION_INDEX


def test_indexed_job_retries_failures_but_not_disruptions_or_refusals():
    spec = read_manifest("indexed-job.yaml")[1]["spec"]
    assert spec["template"]["spec"]["restartPolicy"] == "Never"
    assert spec["backoffLimitPerIndex"] >= 1 and spec["maxFailedIndexes"] == 0
    assert spec["podReplacementPolicy"] == "Failed"  # no second pod 0 while the first still saves
    rules = spec["podFailurePolicy"]["rules"]
    assert {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]} in rules
    container = spec["template"]["spec"]["containers"][0]["name"]
    assert {"action": "FailJob", "onExitCodes": {"containerName": container, "operator": "In", "values": [2]}} in rules
