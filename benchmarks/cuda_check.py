"""Does cross-validated training give the same answer on a GPU as on the CPU?

Builds the small synthetic cohort of the training tests (tests/factory.py, training_cohort: 24
patients, some without a slide or omics, a planted risk in a few genes and patches), runs
``healnet train`` for each model on the CPU and on CUDA, and prints the per-fold c-index of both and
their largest difference. GPU kernels sum in other orders, so small differences are expected
(dropout is switched off, since its masks come from each device's own random stream); a large one
points at a device bug (a tensor left on the CPU, a mask lost in a copy, mixed precision where it
should not be).

    python benchmarks/cuda_check.py [--models healnet,abmil,snn,perceiver,late_fusion] [--epochs 3]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from factory import train_args, training_cohort, write_config  # noqa: E402

from healnet.cli import main as healnet_main  # noqa: E402


def fold_c_index(results_dir: Path) -> pd.Series:
    """Per-fold c-index of the full-modality setting from a ``healnet train`` results folder."""
    table = pd.read_csv(results_dir / "folds.csv")
    full = table[(table["setting"] == "full") & (table["metric"] == "c_index")]
    return full.set_index("fold")["value"]


def main(argv: list[str] | None = None) -> int:
    """Train every model on both devices; exit 1 when CUDA is missing or a device differs by > 0.05."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="healnet,abmil,snn,perceiver,late_fusion")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--devices", default="cpu,cuda", help="the two devices to compare")
    args = parser.parse_args(argv)
    first, second = args.devices.split(",")
    if "cuda" in (first, second) and not torch.cuda.is_available():
        print("no CUDA device: nothing to compare")
        return 1
    worst = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        cohort = training_cohort(root)
        # no dropout of any kind: its masks come from a different random stream on each device
        config = write_config(root / "config.yaml",
                              {"epochs": args.epochs, "baseline_dropout": 0.0, "modality_dropout": 0.0},
                              {"attn_dropout": 0.0, "ff_dropout": 0.0})
        for model in args.models.split(","):
            scores = {}
            for i, device in enumerate((first, second)):
                out = root / f"{i}-{device}"
                cmd = train_args(cohort, config, model, out, device=device, workers=None)
                start = time.perf_counter()
                if healnet_main(cmd) != 0:
                    print(f"{model} on {device}: healnet train failed")
                    return 1
                scores[i] = fold_c_index(out / "results" / model)
                print(f"{model} on {device}: {time.perf_counter() - start:.1f} s, c-index per fold "
                      f"{scores[i].round(4).tolist()}", flush=True)
            diff = float((scores[0] - scores[1]).abs().max())
            worst = max(worst, diff)
            print(f"{model}: largest per-fold |{first} - {second}| = {diff:.4f}", flush=True)
    print(f"largest difference over all models: {worst:.4f}")
    return 0 if worst <= 0.05 else 1


if __name__ == "__main__":
    sys.exit(main())
