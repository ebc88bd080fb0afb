"""Does fusion help, over many cohorts? HEALNet against the unimodal models and the linear Cox model.

For each seed (default 301-308: disjoint from DEMO's 7 and from every seed used to choose a default,
11, 101-110 and 201-208 in FINDINGS.md) a demo-generator cohort of the demo's size is run through the
whole workflow (its own output folder, the four models of ``MODELS``, this repository's config.yaml
otherwise), and from its ``folds.csv`` tables this prints, per cohort and pooled over cohorts:

- HEALNet minus the best unimodal model (SNN or ABMIL, the one with the higher mean), fold-paired;
- HEALNet with the slides removed (its ``omics_only`` setting) minus the SNN;
- HEALNet minus ``coxph`` (both on both modalities).

Each pooled line is the mean over cohorts of the per-cohort mean fold difference, with a 95%
bootstrap interval over cohorts (10,000 resamples, seeded). One cohort costs about two thirds of
a ``make run``; a cohort already run is not run again.

    .venv/bin/python benchmarks/fusion_gain.py [--seeds 301,302,...] [--cores 2] [--patients N]
        [--encoder efficientnet_lite0] [--config config.yaml] [--scratch output/benchmark-scratch/fusion_gain]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

ROOT = Path(__file__).resolve().parents[1]
SEEDS = tuple(range(301, 309))
COMPARISONS = ("healnet - best unimodal", "healnet omics_only - snn", "healnet - coxph")
#: the models the comparisons read (the Perceiver and late fusion are left out: a third of the cost)
MODELS = ["healnet", "snn", "abmil", "coxph"]


def run_cohort(seed: int, scratch: Path, cores: int, patients: int | None, base: Path) -> Path:
    """Run the workflow on the demo cohort of ``seed`` up to its summary (settings from ``base``);
    returns its results folder."""
    config = yaml.safe_load(base.read_text())
    config["cohorts"] = {"DEMO": {"demo": True}}
    config["models"] = MODELS
    config["outdir"] = str((scratch / f"seed{seed}").resolve())
    config["demo"] = {**config.get("demo", {}), "seed": seed, **({"patients": patients} if patients else {})}
    path = scratch / f"seed{seed}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config))
    target = f"{config['outdir']}/results/DEMO/summary.csv"
    cmd = [str(Path(sys.executable).parent / "snakemake"), target, "-s", str(ROOT / "Snakefile"),
           "-d", str(scratch), "--cores", str(cores), "--configfile", str(path.resolve()),
           "--replace-workflow-config", "--quiet", "rules"]
    subprocess.run(cmd, check=True, cwd=ROOT)
    return Path(config["outdir"]) / "results" / "DEMO"


def c_indices(results: Path, encoder: str) -> pd.DataFrame:
    """Per-fold c-index, columns ``{model}`` (full setting) and ``healnet omics_only``."""
    def table(run: str) -> pd.DataFrame:
        frame = pd.read_csv(results / run / "folds.csv")
        c = frame[frame["metric"] == "c_index"]
        return c.pivot_table(index="fold", columns="setting", values="value")

    columns = {"snn": table("none/snn")["full"], "abmil": table(f"{encoder}/abmil")["full"],
               "coxph": table(f"{encoder}/coxph")["full"]}
    healnet = table(f"{encoder}/healnet")
    columns |= {"healnet": healnet["full"], "healnet omics_only": healnet["omics_only"]}
    return pd.DataFrame(columns)


def differences(c: pd.DataFrame) -> dict[str, float]:
    """The three fold-paired mean differences of one cohort."""
    best = "snn" if c["snn"].mean() >= c["abmil"].mean() else "abmil"
    return {
        "healnet - best unimodal": float((c["healnet"] - c[best]).mean()),
        "healnet omics_only - snn": float((c["healnet omics_only"] - c["snn"]).mean()),
        "healnet - coxph": float((c["healnet"] - c["coxph"]).mean()),
    }


def bootstrap_interval(values: np.ndarray, n: int = 10_000, seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of the mean over cohorts, resampling cohorts with replacement."""
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), (n, len(values)))].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def main(argv: list[str] | None = None) -> int:
    """Run every cohort, print its differences, then the pooled means with their intervals."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default=",".join(map(str, SEEDS)))
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--patients", type=int, help="patients per cohort (default: the config's demo size)")
    parser.add_argument("--encoder", default="efficientnet_lite0")
    parser.add_argument("--config", type=Path, default=ROOT / "config.yaml",
                        help="settings of every run (its cohorts and outdir are replaced)")
    parser.add_argument("--scratch", type=Path, default=ROOT / "output/benchmark-scratch/fusion_gain")
    args = parser.parse_args(argv)
    rows = []
    for seed in (int(s) for s in args.seeds.split(",")):
        results = run_cohort(seed, args.scratch, args.cores, args.patients, args.config)
        diff = differences(c_indices(results, args.encoder))
        rows.append({"seed": seed, **diff})
        print(f"seed {seed}: " + "  ".join(f"{k} {v:+.3f}" for k, v in diff.items()), flush=True)
    table = pd.DataFrame(rows)
    for name in COMPARISONS:
        values = table[name].to_numpy(float)
        low, high = bootstrap_interval(values)
        print(f"pooled over {len(values)} cohorts: {name} {values.mean():+.3f} (95% interval {low:+.3f} to "
              f"{high:+.3f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
