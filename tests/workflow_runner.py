"""Running this repository's Snakefile from tests, as a user would (shared by the test modules)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = str(Path(sys.executable).parent / "snakemake")


def snakemake(workdir: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """Snakemake in ``workdir`` with ``workdir/config.yaml`` as the whole config (not merged)."""
    cmd = [SNAKEMAKE, "-s", str(REPO / "Snakefile"), "-d", str(workdir), "--configfile",
           str(workdir / "config.yaml"), "--replace-workflow-config", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO)


def job_counts(stdout: str) -> dict[str, str]:
    """Rule -> number of jobs, from the job table a (dry) run prints."""
    return dict(re.findall(r"^(\w+)\s+(\d+)$", stdout, flags=re.M))


def job_blocks(stdout: str) -> list[dict[str, str]]:
    """One dict per job a (dry) run prints: ``rule`` and its fields (``output``, ``log``,
    ``benchmark``, ``resources``, ... and ``shell`` when run with ``-p``), each as printed."""
    jobs: list[dict[str, str]] = []
    for line in stdout.splitlines():
        rule = re.match(r"^(?:local)?rule (\w+):$", line)
        if rule:
            jobs.append({"rule": rule.group(1)})
        elif jobs and (field := re.match(r"^    (\w+): (.*)$", line)):
            jobs[-1].setdefault(field.group(1), field.group(2))
        elif jobs and line.startswith("Shell command: "):
            jobs[-1]["shell"] = line.removeprefix("Shell command: ")
    return jobs
