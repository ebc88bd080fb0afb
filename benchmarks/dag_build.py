"""How long Snakemake takes to plan a run, as the number of slides in a cohort grows.

A pathologist's first `snakemake -n` on a 500-slide cohort should answer in seconds, and the time
should grow in proportion to the slides (each slide adds two jobs), not with their square. For each
cohort size the script makes, in a temporary folder, a folder of empty ``.svs`` files (a dry run
checks only that inputs exist) and a working directory whose config.yaml names that one cohort, and times
``snakemake -n --quiet`` there. It prints the seconds per size, the seconds per extra slide
between consecutive sizes, and the ratio of the last to the first of those costs: about 1 when the
planning time is linear in the slides, about the ratio of the sizes when it is quadratic.

    .venv/bin/python benchmarks/dag_build.py [--slides 100,500,1000]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def make_workdir(scratch: Path, n_slides: int) -> Path:
    """A working directory under ``scratch`` planning one cohort of ``n_slides`` (empty) slide files."""
    work = scratch / f"n{n_slides}"
    slides = work / "slides"
    slides.mkdir(parents=True)
    for i in range(n_slides):
        (slides / f"TCGA-ZZ-{i:04d}-01Z-00-DX1.svs").touch()
    config = yaml.safe_load((ROOT / "config.yaml").read_text())
    config["cohorts"] = {"BIG": {"slides": str(slides), "omics": str(work / "omics")}}
    (work / "config.yaml").write_text(yaml.safe_dump(config))
    return work


def plan_seconds(work: Path) -> float:
    """Wall time of one dry run in ``work``."""
    cmd = [sys.executable, "-m", "snakemake", "-n", "--quiet", "--cores", "2",
           "-s", str(ROOT / "Snakefile"), "-d", str(work)]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"dry run in {work} failed:\n{done.stderr[-2000:]}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slides", default="100,500,1000", help="comma-separated cohort sizes")
    args = parser.parse_args()
    sizes = sorted(int(s) for s in args.slides.split(","))
    if len(sizes) < 3:  # two sizes give one step, whose cost per slide compares with nothing
        raise SystemExit("give at least three cohort sizes")
    seconds = {}
    with tempfile.TemporaryDirectory(prefix="dag_build_") as scratch:
        for n in sizes:
            seconds[n] = plan_seconds(make_workdir(Path(scratch), n))
            print(f"{n:6d} slides: dry run {seconds[n]:6.1f} s", flush=True)
    steps = list(zip(sizes, sizes[1:], strict=False))
    marginal = [(seconds[b] - seconds[a]) / (b - a) for a, b in steps]
    for (a, b), cost in zip(steps, marginal, strict=True):
        print(f"{a}->{b} slides: {1000 * cost:.1f} ms per extra slide")
    print(f"cost per slide, last step / first step: {marginal[-1] / marginal[0]:.2f} "
          f"(linear ~1; quadratic ~{(sizes[-1] + sizes[-2]) / (sizes[1] + sizes[0]):.1f})")


if __name__ == "__main__":
    main()
