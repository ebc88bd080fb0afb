"""Is `healnet extract` with the default encoder as fast as it was at an earlier commit?

Checks out ``--base`` (a git revision) into a temporary worktree, tiles one slide with the current
code, then runs `healnet extract` on that slide alternately from the base tree and from this tree,
each in a fresh process as a workflow job runs it, ``--repeats`` times each. Prints each side's best
patches/s of the patch loop and best wall time of the whole job, their ratios (this tree / base:
above 1 is faster) as ``ratio_loop_vs_base`` and ``ratio_job_vs_base``, and whether the two stores
hold the same features.

    .venv/bin/python benchmarks/extract_versus_base.py [--base 7a20b68] [--slide SLIDE] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import zarr

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "output" / "data" / "DEMO" / "slides"
REAL = ROOT / ".." / "shared" / "data" / "slides" / "CMU-1-Small-Region.svs"
LOOP_RATE = re.compile(r"\(([0-9.]+) patches/s in the loop\)")


def default_slide() -> Path:
    """The first demo slide of a `make run`, else the real CMU-1 slide."""
    demo = sorted(DEMO.glob("*.svs"))
    return demo[0] if demo else REAL


def extract(tree: Path, slide: Path, tiles: Path, out: Path, threads: int) -> tuple[float, float]:
    """One `healnet extract` job run from ``tree``: (patches/s of the patch loop, wall seconds)."""
    command = [sys.executable, "-m", "healnet.cli", "extract", str(slide), str(tiles), "-o", str(out),
               "--encoder", "efficientnet_lite0", "--device", "cpu", "--threads", str(threads)]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=tree, capture_output=True, text=True, check=False,
                          env={**os.environ, "PYTHONPATH": str(tree)})
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"extract from {tree} failed:\n{done.stderr[-2000:]}")
    match = LOOP_RATE.search(done.stderr)
    if match is None:
        raise SystemExit(f"no patches/s line in the log of the job run from {tree}")
    return float(match.group(1)), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default="7a20b68", help="git revision to compare with")
    parser.add_argument("--slide", type=Path, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    slide = (args.slide or default_slide()).resolve()
    with tempfile.TemporaryDirectory(prefix="extract-vs-base-") as tmp:
        work = Path(tmp)
        base = work / "base"
        subprocess.run(["git", "worktree", "add", "--detach", str(base), args.base], cwd=ROOT, check=True,
                       capture_output=True)
        try:
            tiles = work / "tiles.parquet"
            subprocess.run([sys.executable, "-m", "healnet.cli", "tile", str(slide), "-o", str(tiles)],
                           cwd=ROOT, check=True, capture_output=True)
            rates: dict[str, list[tuple[float, float]]] = {"base": [], "this": []}
            for i in range(args.repeats):
                for side, tree in (("base", base), ("this", ROOT)):
                    rates[side].append(extract(tree, slide, tiles, work / f"{side}{i}.zarr", args.threads))
            same = np.array_equal(zarr.open_group(work / "base0.zarr", mode="r")["features"][:],
                                  zarr.open_group(work / "this0.zarr", mode="r")["features"][:])
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(base)], cwd=ROOT, check=False,
                           capture_output=True)
    best = {side: (max(r for r, _ in runs), min(s for _, s in runs)) for side, runs in rates.items()}
    print(f"slide {slide.name}, base {args.base}, {args.repeats} alternating runs each, "
          f"{args.threads} threads")
    for side, (rate, seconds) in best.items():
        print(f"{side}: {rate:.1f} patches/s in the loop, job {seconds:.1f} s")
    print(f"ratio_loop_vs_base: {best['this'][0] / best['base'][0]:.3f}")
    print(f"ratio_job_vs_base: {best['base'][1] / best['this'][1]:.3f}")
    print(f"same_features: {same}")


if __name__ == "__main__":
    main()
