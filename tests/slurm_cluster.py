"""A throw-away one-node SLURM cluster on this machine, for the tests of the SLURM profile.

:func:`slurm_cluster` starts munged, slurmctld and slurmd with their own key, configuration, spool,
state, log and pid files under one temporary folder; every SLURM command (and Snakemake) reaches
that cluster through ``SLURM_CONF``, never the machine's own configuration. The node has the
machine's CPUs and a little less than its memory, in two partitions, ``cpu`` and ``gpu`` (the
partition names of the shipped profile), without GPUs. No accounting: a finished job stays known
to ``scontrol show job`` for ``MinJobAge`` seconds, and Snakemake polls job states with ``squeue``.

At the end every job is cancelled and every daemon stopped by its process id; a process that still
carries the cluster's ``SLURM_CONF`` in its environment or the cluster's folder in its command line
after that is killed and fails the session (no process of the test cluster outlives it). The module
skips its tests only where the SLURM and munge packages are missing and cannot be installed (not
root, or no apt-get); a cluster that does not start is a failure carrying the daemons' logs.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

#: the programs the cluster needs, from the Debian packages slurm-wlm and munge
PROGRAMS = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "squeue", "scontrol", "scancel", "sinfo")
PACKAGES = ("slurm-wlm", "munge")
CLUSTER_NAME = "healnettest"
#: seconds a finished job stays known to slurmctld (and so to squeue and scontrol)
MIN_JOB_AGE = 3600


@dataclass
class SlurmCluster:
    """A running test cluster: its folder, configuration file, node name and daemons' pids."""

    root: Path
    conf: Path
    node: str
    pids: dict[str, int] = field(default_factory=dict)

    @property
    def env(self) -> dict[str, str]:
        """This process's environment with ``SLURM_CONF`` set to the cluster's configuration, and
        the cluster's ``bin`` folder first on ``PATH`` (see :func:`write_srun_wrapper`)."""
        path = f"{self.root / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"
        return {**os.environ, "SLURM_CONF": str(self.conf), "PATH": path}

    def run(self, *args: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
        """One SLURM command against this cluster; its stdout and stderr as text."""
        done = subprocess.run(list(args), env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and done.returncode != 0:
            raise AssertionError(f"{' '.join(args)} exited {done.returncode}: {done.stderr}\n{self.logs()}")
        return done

    def jobs(self) -> list[dict[str, str]]:
        """Every job slurmctld knows (pending, running, or ended less than MinJobAge ago), each as
        ``scontrol show job``'s fields."""
        shown = self.run("scontrol", "show", "job", "--oneliner")
        return [parse_fields(line) for line in shown.stdout.splitlines() if line.startswith("JobId=")]

    def job(self, job_id: str | int) -> dict[str, str]:
        """``scontrol show job <id>``'s fields."""
        return parse_fields(self.run("scontrol", "show", "job", "--oneliner", str(job_id)).stdout)

    def node_state(self) -> str:
        """The node's state as ``sinfo`` prints it (``idle``, ``mixed``, ``drained``, ...)."""
        return self.run("sinfo", "--noheader", "--nodes", self.node, "--format=%T").stdout.split()[0]

    def logs(self, tail: int = 40) -> str:
        """The last lines of every daemon's log, for failure messages."""
        parts = []
        for log in sorted((self.root / "log").glob("*.log")):
            lines = log.read_text(errors="replace").splitlines()[-tail:]
            parts.append(f"--- {log.name} (last {len(lines)} lines)\n" + "\n".join(lines))
        return "\n".join(parts)


def parse_fields(line: str) -> dict[str, str]:
    """``Key=value`` pairs of one ``scontrol --oneliner`` line (a value runs to the next key)."""
    return dict(re.findall(r"(\w[\w:/]*)=(.*?)(?=\s+\w[\w:/]*=|\s*$)", line.strip()))


def ensure_packages() -> None:
    """Install slurm-wlm and munge with apt-get when a program is missing and we may; otherwise skip."""
    missing = [p for p in PROGRAMS if shutil.which(p) is None and not Path("/usr/sbin", p).exists()]
    if not missing:
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.skip(f"SLURM test cluster: {', '.join(missing)} missing and cannot be installed "
                    "(needs root and apt-get; `make slurm-packages` installs them)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *PACKAGES]):
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, f"{' '.join(cmd)} failed: {done.stderr[-3000:]}"


def program(name: str) -> str:
    """The path of a SLURM or munge program (the daemons are in /usr/sbin, often not on PATH)."""
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    assert found, f"{name} not found"
    return found


def free_port() -> int:
    """A TCP port nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def memory_mb() -> int:
    """This machine's memory in MB (from /proc/meminfo)."""
    kb = re.search(r"^MemTotal:\s+(\d+) kB", Path("/proc/meminfo").read_text(), flags=re.M)
    assert kb, "no MemTotal in /proc/meminfo"
    return int(kb.group(1)) // 1024


def write_conf(root: Path, node: str, munge_socket: Path) -> Path:
    """The cluster's slurm.conf: one node with this machine's CPUs, partitions cpu and gpu."""
    cpus = os.cpu_count() or 1
    lines = {
        "ClusterName": CLUSTER_NAME,
        "SlurmctldHost": "localhost",
        "SlurmctldPort": free_port(),
        "SlurmdPort": free_port(),
        "SlurmUser": "root",
        "SlurmdUser": "root",
        "AuthType": "auth/munge",
        "CredType": "cred/munge",
        "AuthInfo": f"socket={munge_socket}",
        "StateSaveLocation": root / "state",
        "SlurmdSpoolDir": root / "spool",
        "SlurmctldPidFile": root / "run/slurmctld.pid",
        "SlurmdPidFile": root / "run/slurmd.pid",
        "SlurmctldLogFile": root / "log/slurmctld.log",
        "SlurmdLogFile": root / "log/slurmd.log",
        "SlurmctldDebug": "info",
        "SlurmdDebug": "info",
        "ProctrackType": "proctrack/linuxproc",
        "TaskPlugin": "task/none",
        "SelectType": "select/cons_tres",
        "SelectTypeParameters": "CR_Core_Memory",
        "SchedulerType": "sched/backfill",
        "SchedulerParameters": "bf_interval=2",
        "AccountingStorageType": "accounting_storage/none",
        "JobAcctGatherType": "jobacct_gather/none",
        "JobCompType": "jobcomp/none",
        "MpiDefault": "none",
        "ReturnToService": 2,
        "MinJobAge": MIN_JOB_AGE,
        "OverTimeLimit": 0,
        "KillWait": 2,
        "InactiveLimit": 0,
        "MessageTimeout": 5,
        "SlurmctldTimeout": 10,
        "SlurmdTimeout": 30,
        "TCPTimeout": 2,
        "MailProg": "/bin/true",
    }
    text = "".join(f"{k}={v}\n" for k, v in lines.items())
    text += (f"NodeName={node} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={int(memory_mb() * 0.85)} "
             "State=UNKNOWN\n"
             f"PartitionName=cpu Nodes={node} Default=YES MaxTime=INFINITE State=UP\n"
             f"PartitionName=gpu Nodes={node} MaxTime=INFINITE State=UP\n")
    conf = root / "etc/slurm.conf"
    conf.write_text(text)
    return conf


def write_srun_wrapper(root: Path, conf: Path) -> Path:
    """``root/bin/srun``: the real srun with ``SLURM_CONF`` set. Snakemake's SLURM job-step executor
    starts each rule with ``srun`` inside the batch job after removing every ``SLURM_*`` variable
    but the job's identity from the environment, ``SLURM_CONF`` included; a real cluster's srun then
    finds /etc/slurm/slurm.conf, this cluster's would find nothing (or the machine's own cluster)."""
    wrapper = root / "bin/srun"
    srun = shlex.quote(program("srun"))
    wrapper.write_text(f'#!/bin/sh\nSLURM_CONF={shlex.quote(str(conf))} exec {srun} "$@"\n')
    wrapper.chmod(0o755)
    return wrapper


def read_pid(path: Path, what: str, cluster: SlurmCluster, timeout: float = 20) -> int:
    """The pid a daemon wrote to ``path`` once it is alive (fails with the logs when it is not)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.is_file() and (text := path.read_text().strip()).isdigit() and alive(int(text)):
            return int(text)
        time.sleep(0.2)
    raise AssertionError(f"{what} did not start (no live pid in {path})\n{cluster.logs()}")


def alive(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in status


def new_cluster(root: Path) -> SlurmCluster:
    """The folders and slurm.conf of a cluster under ``root`` (nothing started yet)."""
    for sub in ("bin", "etc", "munge", "state", "spool", "log", "run"):
        (root / sub).mkdir(parents=True, exist_ok=True)
        (root / sub).chmod(0o700)
    node = socket.gethostname().split(".")[0]
    conf = write_conf(root, node, root / "munge/munge.socket")
    write_srun_wrapper(root, conf)
    return SlurmCluster(root, conf, node)


def start_cluster(cluster: SlurmCluster) -> None:
    """Start munged, slurmctld and slurmd (recording their pids as they start) and wait for the node
    to be idle; fails with the daemons' logs if they do not start."""
    root, node = cluster.root, cluster.node
    munge_socket = root / "munge/munge.socket"
    key = root / "munge/munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    subprocess.run([program("munged"), "--force", f"--socket={munge_socket}", f"--key-file={key}",
                    f"--pid-file={root / 'run/munged.pid'}", f"--seed-file={root / 'munge/munged.seed'}",
                    f"--log-file={root / 'log/munged.log'}"], check=True, capture_output=True, timeout=30)
    cluster.pids["munged"] = read_pid(root / "run/munged.pid", "munged", cluster)
    for daemon in ("slurmctld", "slurmd"):
        started = subprocess.run([program(daemon), "-f", str(cluster.conf)], env=cluster.env,
                                 capture_output=True, text=True, timeout=60)
        assert started.returncode == 0, \
            f"{daemon} exited {started.returncode}: {started.stderr}\n{cluster.logs()}"
        cluster.pids[daemon] = read_pid(root / f"run/{daemon}.pid", daemon, cluster)
    deadline = time.monotonic() + 60
    state = ""
    while time.monotonic() < deadline:
        shown = cluster.run("sinfo", "--noheader", "--nodes", node, "--format=%T", check=False)
        state = shown.stdout.strip().split("\n")[0]
        if shown.returncode == 0 and state == "idle":
            return
        time.sleep(0.5)
    raise AssertionError(f"node {node} is {state!r}, not idle, 60 s after the start\n{cluster.logs()}")


def cluster_processes(cluster: SlurmCluster) -> list[int]:
    """Pids of the processes that belong to the cluster: its daemons, the job steps and jobs they
    started (their environment holds the cluster's SLURM_CONF) and anything naming its folder."""
    mine, conf, root = os.getpid(), f"SLURM_CONF={cluster.conf}".encode(), str(cluster.root).encode()
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == mine or not alive(int(proc.name)):
            continue
        try:
            environ = (proc / "environ").read_bytes().split(b"\0")
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if conf in environ or root in cmdline or int(proc.name) in cluster.pids.values():
            found.append(int(proc.name))
    return found


def stop_cluster(cluster: SlurmCluster, timeout: float = 30) -> list[str]:
    """Cancel every job, stop slurmd, slurmctld and munged by their pids (SIGTERM, then SIGKILL),
    and kill whatever of the cluster is left; returns what had to be killed that way."""
    if alive(cluster.pids.get("slurmctld", -1)):
        cluster.run("scancel", "--full", "--user", str(os.geteuid()), check=False)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            active = cluster.run("squeue", "--noheader", "--format=%i", check=False)
            if active.returncode != 0 or not active.stdout.strip():
                break
            time.sleep(0.5)
    for daemon in ("slurmd", "slurmctld", "munged"):
        pid = cluster.pids.get(daemon)
        if pid is None or not alive(pid):
            continue
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if alive(pid):
            os.kill(pid, signal.SIGKILL)
    survivors = []
    for pid in cluster_processes(cluster):
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            survivors.append(f"{pid}: {command}")
            os.kill(pid, signal.SIGKILL)
        except OSError:
            continue
    return survivors


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    """The session's one-node SLURM cluster (see the module docstring); stopped at the end, and no
    process of it may outlive the session."""
    ensure_packages()
    # a short folder: munge's and slurm's socket paths must stay below the 108-byte limit
    root = Path(tmp_path_factory.mktemp("slurm"))
    cluster = new_cluster(root)
    try:
        start_cluster(cluster)
        yield cluster
    finally:
        survivors = stop_cluster(cluster)
        assert not survivors, f"processes of the test cluster outlived it (killed now): {survivors}"
        assert not cluster_processes(cluster), "processes of the test cluster are still running"
