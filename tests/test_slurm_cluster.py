"""The workflow on a real SLURM cluster (throw-away, one node: tests/slurm_cluster.py) through the
shipped profile ``workflow/profiles/slurm``, as a user runs it: every job an ``sbatch`` job with
the resources its rule declares, a job that runs out of time resubmitted and resumed, reruns that
submit only what they must, a cancelled job and a drained node.

The profile is used through a copy that differs from it only where the test cluster must: the
status command (no accounting, so ``squeue``), a short first status check, and the GPU-node sizing
of ``extract`` and ``train`` (one GPU, 8 cores, 32 GB), which a 2-core node without GPUs cannot
give; those two rules then ask for what they declare themselves, on the same ``gpu`` partition.

One tiny demo cohort is run once per module (its node drained for a while as it trains), and the
later tests build on its outputs, in order: forced retraining with one job cancelled, the run after
it with a feature store lost as well, and a training job past its time limit. Each Snakemake job
costs about 10 s on the cluster (two Snakemake starts before its command), so the module takes
minutes, most of them in the first run.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml
from slurm_cluster import SlurmCluster, slurm_cluster  # noqa: F401  (the session's cluster fixture)
from workflow_runner import REPO, SNAKEMAKE, job_blocks

PROFILE = REPO / "workflow/profiles/slurm/config.yaml"
#: what the copy of the profile changes (everything else must be the shipped profile's)
STATUS = {"slurm-status-command": "squeue", "slurm-init-seconds-before-status-checks": 1}
GPU_NODE_SIZING = ("gpu", "cpus_per_task", "mem_mb")
pytestmark = pytest.mark.slurm

TINY: dict[str, Any] = {
    "cohorts": {"TINY": {"demo": True}},
    "outdir": "out",
    "demo": {"patients": 6, "seed": 3, "long_side_px": 3000, "corrupt_slides": 0},
    "omics": {"n_folds": 2, "n_bins": 3},
    "models": ["snn", "abmil"],
    "extract": {"device": "cpu"},
    "training": {"epochs": 3, "max_patches_train": 256, "ensemble": 1, "device": "cpu"},
    "report": {"heatmap_slides": 2},
}
#: the time-limit test's training: epochs of the SNN, saving its state after every epoch, enough to
#: outlast a 1-minute limit (slurmctld ends such a job 60 to 90 s in) on a machine 1.7 times as fast
#: as the 2-core test machine, where the jobs SLURM ended had trained 4401 to 4489 epochs in 75 to 78
#: s; the resubmitted job gets 10 minutes for the rest. Every epoch more is paid twice (the resumed
#: job and the uninterrupted reference beside it), so no more than that margin.
LONG_EPOCHS = 9000
#: the time-limit test's training runtime: 1 minute on the first attempt, 10 on the resubmission
SHORT_THEN_LONG = "train:runtime=1 if attempt == 1 else 10"


@dataclass(frozen=True)
class Run:
    """One Snakemake run on the cluster: its exit status, output and the SLURM jobs it submitted."""

    returncode: int
    output: str
    job_ids: list[str]


def planned(dry_run_output: str) -> dict[str, dict[str, str]]:
    """The jobs a dry run plans (rule, wildcards, resources as Snakemake resolved them), keyed by
    the comment the SLURM executor gives each job: ``rule_<rule>_wildcards_<values joined by _>``."""
    jobs = {}
    for block in job_blocks(dry_run_output):
        values = [v.split("=", 1)[1] for v in block["wildcards"].split(", ")] if "wildcards" in block else []
        jobs[f"rule_{block['rule']}" + (f"_wildcards_{'_'.join(values)}" if values else "")] = block
    return jobs


def rule_of(job: dict[str, str]) -> str:
    """The rule a SLURM job runs, from the comment the executor gives it (rule_<rule>_wildcards_...)."""
    found = re.match(r"rule_(\w+?)(?:_wildcards_|$)", job["Comment"])
    assert found, f"job {job['JobId']} has no rule comment: {job['Comment']!r}"
    return found.group(1)


def model_of(comment: str, rule: str) -> re.Match:
    """The model (and for ``train`` the fold) in the comment of a job of ``rule``: the last wildcard
    values, whatever wildcards come before them."""
    tail = r"_(\d+)$" if rule == "train" else "$"
    found = re.match(rf"rule_{rule}_wildcards_.*_({'|'.join(TINY['models'])}){tail}", comment)
    assert found, f"not a {rule} job of a configured model: {comment!r}"
    return found


def rules_run(cluster: SlurmCluster, run: Run) -> list[str]:
    """The rules of a run's SLURM jobs, sorted."""
    return sorted(rule_of(cluster.job(j)) for j in run.job_ids)


def write_profile(folder: Path) -> Path:
    """The shipped profile with the test cluster's changes (see the module docstring)."""
    profile = yaml.safe_load(PROFILE.read_text())
    for rule in ("extract", "train"):
        for key in GPU_NODE_SIZING:
            profile["set-resources"][rule].pop(key, None)
    profile.pop("set-threads", None)
    profile.update(STATUS)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.yaml").write_text(yaml.safe_dump(profile))
    return folder


def snakemake(cluster: SlurmCluster, workdir: Path, profile: Path, *args: str, config: str = "config.yaml",
              during: Callable[[subprocess.Popen], Any] | None = None, timeout: float = 600) -> Run:
    """Snakemake with the profile, from the repository root as a user runs it, on the cluster;
    ``during(process)`` runs while it does (to cancel a job, drain the node...)."""
    log = workdir / f"snakemake-{time.monotonic_ns()}.log"
    cmd = [SNAKEMAKE, "-s", str(REPO / "Snakefile"), "-d", str(workdir), "--profile", str(profile),
           "--configfile", str(workdir / config), "--replace-workflow-config", *args]
    with log.open("w") as out:
        process = subprocess.Popen(cmd, cwd=REPO, env=cluster.env, stdout=out, stderr=subprocess.STDOUT)
        try:
            if during is not None:
                during(process)
            process.wait(timeout=timeout)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    output = log.read_text()
    return Run(process.returncode, output, re.findall(r"submitted with SLURM jobid (\d+)", output))


def wait_for(what: str, check: Callable[[], Any], process: subprocess.Popen, timeout: float = 240) -> Any:
    """Poll ``check`` until it returns something true (returned) while Snakemake still runs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if found := check():
            return found
        assert process.poll() is None, f"Snakemake ended (status {process.returncode}) before {what}"
        time.sleep(0.5)
    raise AssertionError(f"no {what} within {timeout} s")


def queue(cluster: SlurmCluster) -> list[dict[str, str]]:
    """squeue's view of every job it knows: id, state, rule comment and reason."""
    shown = cluster.run("squeue", "--states=all", "--noheader", "--format=%i|%T|%k|%r")
    keys = ("JobId", "JobState", "Comment", "Reason")
    return [dict(zip(keys, line.split("|"), strict=True)) for line in shown.stdout.splitlines()]


def one(outdir: Path, pattern: str) -> Path:
    """The one path under ``outdir`` matching ``pattern`` (the layout below outdir may change)."""
    found = sorted(outdir.glob(pattern))
    assert len(found) == 1, f"{pattern}: {found}"
    return found[0]


@pytest.fixture(scope="module")
def profile(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_profile(tmp_path_factory.mktemp("profile"))


@dataclass(frozen=True)
class MainRun:
    """The module's run of the tiny cohort: its folder, SLURM's record of each job (``scontrol show
    job`` right after the run), the jobs the dry run before it planned, what was seen while the node
    was drained, and what later tests leave for the ones after them."""

    workdir: Path
    jobs: dict[str, dict[str, str]]
    plan: dict[str, dict[str, str]]
    drained: dict[str, Any]
    notes: dict[str, Any]


def drain_while_training(cluster: SlurmCluster, plan: dict[str, dict[str, str]], workdir: Path,
                         seen: dict[str, Any]) -> Callable[[subprocess.Popen], None]:
    """What to do during a run: once a training job runs, drain the node; once a job waits for the
    drained node, note it, the node's state and which of its outputs exist; then resume the node."""

    def drain(process: subprocess.Popen) -> None:
        wait_for("running training job", lambda: any(j["JobState"] == "RUNNING" and j["Comment"].startswith(
            "rule_train_") for j in queue(cluster)), process, timeout=480)
        cluster.run("scontrol", "update", f"nodename={cluster.node}", "state=drain", "reason=healnet-test")
        try:
            held = wait_for("job held by the drained node", lambda: next(
                (j for j in queue(cluster) if j["JobState"] == "PENDING"
                 and re.search("DRAINED|ReqNodeNotAvail", j["Reason"])), None), process, timeout=120)
            outputs = plan[held["Comment"]]["output"].split(", ")
            seen.update(held, node=cluster.node_state(), outputs=outputs,
                        existing=[o for o in outputs if (workdir / o).exists()])
        finally:
            cluster.run("scontrol", "update", f"nodename={cluster.node}", "state=resume")

    return drain


@pytest.fixture(scope="module")
def main_run(slurm_cluster: SlurmCluster, profile: Path,  # noqa: F811
             tmp_path_factory: pytest.TempPathFactory) -> MainRun:
    """The tiny cohort run end to end on the cluster, the node drained for a while as it trains."""
    workdir = tmp_path_factory.mktemp("slurm_run")
    (workdir / "config.yaml").write_text(yaml.safe_dump(TINY))
    dry = snakemake(slurm_cluster, workdir, profile, "-n")
    assert dry.returncode == 0 and not dry.job_ids, dry.output[-3000:]
    plan, drained = planned(dry.output), {}
    run = snakemake(slurm_cluster, workdir, profile,
                    during=drain_while_training(slurm_cluster, plan, workdir, drained))
    assert run.returncode == 0, run.output[-6000:] + slurm_cluster.logs()
    jobs = {j: slurm_cluster.job(j) for j in run.job_ids}
    record = pd.DataFrame(jobs.values())[["JobId", "Comment", "JobState", "Partition", "NumCPUs",
                                          "MinMemoryNode", "TimeLimit"]]
    record.to_csv(workdir / "slurm-jobs.tsv", sep="\t", index=False)  # SLURM's record, for reading later
    return MainRun(workdir, jobs, plan, drained, {})


def test_the_profile_copy_differs_only_where_the_test_cluster_must(profile: Path) -> None:
    shipped = yaml.safe_load(PROFILE.read_text())
    used = yaml.safe_load((profile / "config.yaml").read_text())
    assert {k: v for k, v in used.items() if k not in STATUS} == {
        **{k: v for k, v in shipped.items() if k != "set-threads"},
        "set-resources": {rule: {k: v for k, v in res.items() if rule not in ("extract", "train")
                                 or k not in GPU_NODE_SIZING}
                          for rule, res in shipped["set-resources"].items()}}
    assert used["executor"] == "slurm" and used["retries"] >= 1
    assert {used["set-resources"][r]["slurm_partition"] for r in ("extract", "train")} == {"gpu"}


def test_every_job_is_an_sbatch_job_with_its_rules_resources(slurm_cluster: SlurmCluster,  # noqa: F811
                                                             main_run: MainRun) -> None:
    """Every job the dry run planned ran as one sbatch job, and SLURM recorded for it the partition,
    CPUs, memory and time limit that Snakemake resolved from its rule and the profile."""
    jobs, plan = main_run.jobs, main_run.plan
    out = main_run.workdir / "out"
    assert (one(out, "results/**/summary.csv")).stat().st_size > 0
    assert {rule_of(j) for j in jobs.values()} == {"demo", "tile", "encoder", "extract", "omics",
                                                   "config_snapshot", "train", "collect", "evaluate",
                                                   "report"}
    assert sorted(j["Comment"] for j in jobs.values()) == sorted(c for c in plan if c != "rule_all")
    for job_id, job in jobs.items():
        assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0", job
        declared = dict(re.findall(r"(\w+)=([^,\s]+)", plan[job["Comment"]]["resources"]))
        minutes = int(declared["runtime"])
        assert job["Partition"] == declared["slurm_partition"], (job_id, job["Partition"], declared)
        assert job["NumCPUs"] == declared["cpus_per_task"], (job_id, job["NumCPUs"], declared)
        assert job["MinMemoryNode"] == f"{declared['mem_mb']}M", (job_id, job["MinMemoryNode"], declared)
        assert job["TimeLimit"] == f"{minutes // 60:02d}:{minutes % 60:02d}:00", (job_id, job["TimeLimit"])
        assert "gpu" not in job["TRES"], job["TRES"]
    # the shipped profile's placement: slide embedding and training on the gpu partition, the rest
    # on cpu; the demo job with its two writer processes' cores
    by_rule = {rule_of(j): j for j in jobs.values()}
    assert {rule_of(j) for j in jobs.values() if j["Partition"] == "gpu"} == {"extract", "train"}
    assert by_rule["demo"]["NumCPUs"] == "2"


def test_a_node_drained_mid_run_holds_its_next_job_and_the_run_completes_after_resume(
        slurm_cluster: SlurmCluster, main_run: MainRun) -> None:  # noqa: F811
    """Draining the node while a fold trains lets the running job finish (SLURM does not kill it) and
    holds the next job, none of whose outputs exists meanwhile; once resumed, the run completes."""
    drained = main_run.drained
    assert drained["node"] in ("drained", "draining"), drained
    assert drained["outputs"] and drained["existing"] == [], drained
    held = next(j for j in main_run.jobs.values() if j["JobId"] == drained["JobId"])
    assert held["JobState"] == "COMPLETED" and held["Comment"] == drained["Comment"]
    assert all((main_run.workdir / o).exists() for o in drained["outputs"])
    assert slurm_cluster.node_state() == "idle"


def test_forced_retraining_submits_only_training_and_a_cancelled_job_leaves_nothing_finished(
        slurm_cluster: SlurmCluster, profile: Path, main_run: MainRun) -> None:  # noqa: F811
    """``--forcerun train --until collect`` submits the training jobs and nothing before them; one of
    them cancelled with scancel (no retry) fails the run and leaves none of its fold's outputs, and a
    dry run then plans that fold and its joined results again (the joined results of the run before
    are still on disk, older than the retrained folds: they do not pass for current)."""
    workdir = main_run.workdir
    cancelled: dict[str, str] = {}

    def cancel_a_training_job(process: subprocess.Popen) -> None:
        job = wait_for("running training job", lambda: next(
            (j for j in queue(slurm_cluster) if j["JobState"] == "RUNNING"
             and j["Comment"].startswith("rule_train_")), None), process)
        slurm_cluster.run("scancel", job["JobId"])
        cancelled.update(job)

    run = snakemake(slurm_cluster, workdir, profile, "--forcerun", "train", "--until", "collect",
                    "--retries", "0", during=cancel_a_training_job)
    assert run.returncode != 0, run.output[-3000:]
    rules = rules_run(slurm_cluster, run)
    assert set(rules) <= {"train", "collect"} and rules.count("train") == 4, rules
    assert slurm_cluster.job(cancelled["JobId"])["JobState"] == "CANCELLED"
    model, fold = model_of(cancelled["Comment"], "train").groups()
    out = workdir / "out"
    assert not list(out.glob(f"models/**/{model}/fold{fold}.pt"))
    assert not list(out.glob(f"results/**/{model}/fold{fold}/*"))
    assert not list(out.glob(f"models/**/{model}/unfinished-fold{fold}*"))
    dry = snakemake(slurm_cluster, workdir, profile, "-n")
    again = [b for b in job_blocks(dry.output) if b["rule"] in ("train", "collect")]
    assert sorted(b["rule"] for b in again) == ["collect", "train"], dry.output[-3000:]
    assert all(f"model={model}" in b["wildcards"] for b in again)
    main_run.notes["cancelled"] = cancelled["Comment"]


def test_the_next_run_completes_and_a_lost_store_resubmits_that_slide_and_what_follows(
        slurm_cluster: SlurmCluster, profile: Path, main_run: MainRun) -> None:  # noqa: F811
    """The run after the cancelled one, with a feature store lost as well: it trains the cancelled
    fold, embeds the lost slide again and retrains only what reads it (the slide model's folds), then
    joins, compares and reports; nothing else (no tiling, no other extraction, no omics-only fold)."""
    workdir = main_run.workdir
    store = sorted((workdir / "out").glob("features/**/*.zarr"))[0]
    shutil.rmtree(store)
    run = snakemake(slurm_cluster, workdir, profile)
    assert run.returncode == 0, run.output[-3000:]
    assert store.is_dir()
    jobs = [slurm_cluster.job(j) for j in run.job_ids]
    assert all(j["JobState"] == "COMPLETED" for j in jobs), jobs
    by_rule = {r: sorted(j["Comment"] for j in jobs if rule_of(j) == r) for r in {rule_of(j) for j in jobs}}
    assert set(by_rule) == {"extract", "train", "collect", "evaluate", "report"}, by_rule
    assert len(by_rule["extract"]) == 1 and by_rule["extract"][0].endswith(f"_{store.stem}")
    cancelled = model_of(main_run.notes["cancelled"], "train")
    assert {model_of(c, "train").groups() for c in by_rule["train"]} == \
        {("abmil", str(k)) for k in range(TINY["omics"]["n_folds"])} | {cancelled.groups()}
    assert {model_of(c, "collect").group(1) for c in by_rule["collect"]} == {"abmil", cancelled.group(1)}
    assert len(by_rule["evaluate"]) == len(by_rule["report"]) == 1
    assert len(list((workdir / "out").glob("results/**/fold*/folds.csv"))) == 4


def test_a_job_past_its_time_limit_is_resubmitted_and_resumes(
        slurm_cluster: SlurmCluster, profile: Path, main_run: MainRun) -> None:  # noqa: F811
    """A training job given 1 minute for several minutes of training: SLURM ends it (TIMEOUT), the
    profile's retry resubmits it (with 10 minutes), and it resumes from the fold's saved state; its
    results equal those of the same training run without interruption (``healnet train`` outside
    SLURM, started beside it)."""
    workdir = main_run.workdir
    out = workdir / "out"
    config = {**TINY, "models": ["snn"],
              "training": {**TINY["training"], "epochs": LONG_EPOCHS, "save_state_minutes": 0}}
    (workdir / "long.yaml").write_text(yaml.safe_dump(config))
    target = one(out, "models/**/snn/fold0.pt").relative_to(workdir)
    snapshot = one(out, "results/**/snn/config.json")
    reference: dict[str, Any] = {}

    def train_beside(process: subprocess.Popen) -> None:
        wait_for("new training settings", lambda: f'"epochs": {LONG_EPOCHS}' in snapshot.read_text(), process)
        shutil.copy(snapshot, workdir / "long.json")
        store = next(out.glob("features/**/*.zarr"))
        cmd = [sys.executable, "-m", "healnet.cli", "train", "--config", str(workdir / "long.json"),
               "--cohort", "TINY", "--model", "snn", "--folds", "0",
               "--omics-dir", str(one(out, "omics/**/manifest.parquet").parent),
               "--features-dir", str(store.parent), "--models-dir", str(workdir / "reference/models"),
               "--results-dir", str(workdir / "reference/results"), "--threads", "1", "--workers", "0",
               "--save-state-minutes", "60", "--device", "cpu"]  # no saves: same numbers, much faster
        # its log (a line per epoch) to a file: into a pipe nobody reads until the end, it would fill
        # the pipe and stall the training until the cluster run is over
        with (workdir / "reference.log").open("w") as log:
            reference["process"] = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=log)

    try:
        run = snakemake(slurm_cluster, workdir, profile, str(target), "--set-resources", SHORT_THEN_LONG,
                        "train:slurm_partition=gpu", config="long.yaml", during=train_beside)
        reference["process"].wait(timeout=600)
    finally:
        if "process" in reference and reference["process"].poll() is None:
            reference["process"].kill()
    assert run.returncode == 0, run.output[-4000:]
    assert reference["process"].returncode == 0, (workdir / "reference.log").read_text()[-3000:]
    trains = [slurm_cluster.job(j) for j in run.job_ids if rule_of(slurm_cluster.job(j)) == "train"]
    assert [j["JobState"] for j in trains] == ["TIMEOUT", "COMPLETED"], trains
    assert [j["TimeLimit"] for j in trains] == ["00:01:00", "00:10:00"]
    assert all(j["Partition"] == "gpu" for j in trains)
    log = one(out, "logs/train/**/snn/fold0.log").read_text()
    resumed = re.search(r"resuming at epoch (\d+) from ", log)
    assert resumed and 0 < int(resumed.group(1)) < LONG_EPOCHS, log[:2000]
    fold = one(out, "results/**/snn/fold0/folds.csv").parent
    pd.testing.assert_frame_equal(pd.read_csv(fold / "folds.csv"),
                                  pd.read_csv(workdir / "reference/results/folds.csv"))
    pd.testing.assert_frame_equal(pd.read_parquet(fold / "predictions.parquet"),
                                  pd.read_parquet(workdir / "reference/results/predictions.parquet"))
    history = json.loads((fold / "log.json").read_text())
    assert len(history["folds"][0]["epochs"]) == LONG_EPOCHS

