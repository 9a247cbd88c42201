"""A real one-host SLURM cluster for the tests: munged, slurmctld and slurmd in a temporary directory.

Follows /work/shared/reference/slurm.md (Debian's slurmctld, slurmd, slurm-client and munge packages):
its own munge key and socket, a slurm.conf selected through $SLURM_CONF (nothing under /etc is touched),
free ports, `hostname -s` as the node name with CPUs = the usable cores. The daemons are stopped by the
pids in their pid files. Installing the packages is .ci/run's job, never the tests'.

    with SlurmCluster() as cluster:          # or cluster.start() / cluster.stop()
        job = cluster.sbatch(["--ntasks=2", "script.sh"], cwd=...)
        state = cluster.wait_for_job(job, timeout=120)

`python -m tests.support.slurm_cluster` (from the repository root) starts one, runs `sinfo` and stops it
again (a quick manual check).
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

DAEMONS = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "scontrol", "sinfo", "squeue", "scancel", "srun")
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                "DEADLINE", "PREEMPTED"}


class SlurmUnavailable(RuntimeError):
    """SLURM cannot run here (not installed, not root, ...): the reason is the message."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _find(name: str) -> str | None:
    return shutil.which(name) or next(
        (str(p) for d in ("/usr/sbin", "/usr/bin", "/sbin") if (p := Path(d) / name).exists()), None)


def unavailable_reason() -> str | None:
    """Why a SLURM cluster cannot be started here, or None if it can be tried."""
    missing = [name for name in DAEMONS if _find(name) is None]
    if missing:
        return ("SLURM is not installed (missing " + ", ".join(missing) + "); .ci/run installs it as root with "
                "`apt-get install slurmctld slurmd slurm-client munge`")
    if os.geteuid() != 0:
        return "starting slurmd and munged needs root"
    if _find("runuser") is None:
        return "no runuser (util-linux) to start munged as the munge user"
    try:
        pwd.getpwnam("munge")
    except KeyError:
        return "no 'munge' user (the munge package creates it)"
    return None


class SlurmCluster:
    def __init__(self, startup_timeout: float = 60.0):
        self.startup_timeout = startup_timeout
        self.dir: Path | None = None
        self.env: dict[str, str] = {}
        self.node = socket.gethostname().split(".")[0]  # `hostname -s`
        self.cpus = len(os.sched_getaffinity(0))

    # ---- lifecycle ---------------------------------------------------------------------------------------

    def start(self) -> "SlurmCluster":
        reason = unavailable_reason()
        if reason:
            raise SlurmUnavailable(reason)
        # Not under pytest's tmp dirs: those are mode 700 and munged runs as the munge user.
        self.dir = Path(tempfile.mkdtemp(prefix="acctrain-slurm-"))
        self.dir.chmod(0o755)
        try:
            self._start_munge()
            self._write_conf()
            for daemon in ("slurmctld", "slurmd"):
                self._run([_find(daemon), "-f", str(self.conf)], timeout=30)
            self._wait_until_idle()
        except BaseException as err:
            logs = self.logs()
            self.stop()
            if isinstance(err, SlurmUnavailable):
                raise SlurmUnavailable(f"{err}\n{logs}") from None
            raise
        return self

    def stop(self) -> None:
        """Cancel this cluster's jobs, stop slurmd, slurmctld and munged by their pid files, remove the directory."""
        if self.dir is None:
            return
        if (self.dir / "slurmctld.pid").exists():
            subprocess.run([_find("scancel"), "--user", pwd.getpwuid(os.geteuid()).pw_name], env=self.env,
                           capture_output=True, timeout=15, check=False)
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and self.squeue():
                time.sleep(0.2)
        for pid_file in ("slurmd.pid", "slurmctld.pid", "munge/munged.pid"):
            _stop_pid_file(self.dir / pid_file)
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir = None

    def __enter__(self) -> "SlurmCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- commands ----------------------------------------------------------------------------------------

    def sbatch(self, args: list[str], cwd: str | Path, env: dict[str, str] | None = None) -> str:
        proc = self._run([_find("sbatch"), "--parsable", *args], cwd=cwd, env=env, timeout=30)
        return proc.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job -o` as a dict (JobState, Reason, Restarts, ExitCode, StdOut, ...)."""
        proc = subprocess.run([_find("scontrol"), "show", "job", "-o", job_id], env=self.env, capture_output=True,
                              text=True, timeout=15, check=False)
        return dict(re.findall(r"(\w+)=(\S*)", proc.stdout))

    def wait_for_job(self, job_id: str, timeout: float, states=FINAL_STATES, poll: float = 0.25) -> dict[str, str]:
        """Poll until the job is in one of `states`; on timeout cancel it and raise TimeoutError."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            if time.monotonic() > deadline:
                self.scancel(job_id)
                raise TimeoutError(f"job {job_id} still {info.get('JobState')} ({info.get('Reason')}) after {timeout} s")
            time.sleep(poll)

    def scancel(self, job_id: str, *options: str) -> None:
        self._run([_find("scancel"), *options, job_id], timeout=15)

    def scontrol(self, *args: str) -> str:
        return self._run([_find("scontrol"), *args], timeout=15).stdout

    def squeue(self) -> list[str]:
        proc = subprocess.run([_find("squeue"), "-h", "-o", "%i"], env=self.env, capture_output=True, text=True,
                              timeout=15, check=False)
        return proc.stdout.split()

    def logs(self) -> str:
        if self.dir is None:
            return ""
        parts = []
        for log in sorted(self.dir.glob("**/*.log")):
            parts.append(f"--- {log.name} (last lines)\n" + "\n".join(log.read_text(errors="replace").splitlines()[-25:]))
        return "\n".join(parts)

    # ---- internals ---------------------------------------------------------------------------------------

    @property
    def conf(self) -> Path:
        return self.dir / "slurm.conf"

    def _run(self, cmd: list[str], timeout: float, cwd=None, env=None) -> subprocess.CompletedProcess:
        proc = subprocess.run(cmd, cwd=cwd, env=env or self.env or None, capture_output=True, text=True,
                              timeout=timeout, check=False)
        if proc.returncode != 0:
            raise SlurmUnavailable(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stdout}{proc.stderr}")
        return proc

    def _start_munge(self) -> None:
        munge = pwd.getpwnam("munge")
        key_dir, sock_dir = self.dir / "munge", self.dir / "munge-run"
        for path, mode in ((key_dir, 0o700), (sock_dir, 0o755)):
            path.mkdir(mode=mode)
            os.chown(path, munge.pw_uid, munge.pw_gid)
        as_munge = ["runuser", "-u", "munge", "--"]
        self._run([*as_munge, _find("mungekey"), "--create", "--keyfile", str(key_dir / "munge.key")], timeout=30)
        self.munge_socket = sock_dir / "munge.socket"
        self._run([*as_munge, _find("munged"), "--force", f"--socket={self.munge_socket}",
                   f"--key-file={key_dir / 'munge.key'}", f"--log-file={key_dir / 'munged.log'}",
                   f"--pid-file={key_dir / 'munged.pid'}", f"--seed-file={key_dir / 'munged.seed'}"], timeout=30)

    def _write_conf(self) -> None:
        d = self.dir
        for sub in ("state", "spool", "log"):
            (d / sub).mkdir()
        self.conf.write_text(f"""\
ClusterName=acctrain-test
SlurmctldHost={self.node}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
AuthType=auth/munge
AuthInfo=socket={self.munge_socket},cred_expire=5
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=1
ReturnToService=2
MpiDefault=none
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
KillWait=10
StateSaveLocation={d / 'state'}
SlurmdSpoolDir={d / 'spool'}
SlurmctldPidFile={d / 'slurmctld.pid'}
SlurmdPidFile={d / 'slurmd.pid'}
SlurmctldLogFile={d / 'log' / 'slurmctld.log'}
SlurmdLogFile={d / 'log' / 'slurmd.log'}
NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} State=UNKNOWN
PartitionName=debug Nodes={self.node} Default=YES MaxTime=INFINITE State=UP
""")
        # Only this cluster: no job variables of an enclosing SLURM job, our own config.
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}
        self.env["SLURM_CONF"] = str(self.conf)

    def _wait_until_idle(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        state = ""
        while time.monotonic() < deadline:
            proc = subprocess.run([_find("sinfo"), "-h", "-N", "-o", "%t"], env=self.env, capture_output=True,
                                  text=True, timeout=15, check=False)
            state = proc.stdout.strip()
            if state == "idle":
                return
            time.sleep(0.3)
        raise SlurmUnavailable(f"node {self.node} not idle after {self.startup_timeout} s (sinfo: {state!r})")


def _stop_pid_file(pid_file: Path, timeout: float = 10.0) -> None:
    try:
        pid = int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 2.0)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not _alive(pid):
                return
            time.sleep(0.1)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (not our child, so we cannot reap it) counts as stopped
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


if __name__ == "__main__":
    reason = unavailable_reason()
    if reason:
        raise SystemExit(f"cannot start SLURM: {reason}")
    with SlurmCluster() as cluster:
        print(subprocess.run(["sinfo"], env=cluster.env, capture_output=True, text=True, timeout=15).stdout)
        print(f"SLURM_CONF={cluster.conf} (stopped again now)")
