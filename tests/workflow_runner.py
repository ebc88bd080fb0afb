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
