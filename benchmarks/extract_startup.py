"""Start-up of one extraction job: the encoder built through timm against the frozen encoder file.

Every `healnet extract` job is a fresh process, so its start-up is paid once per slide. Each variant
runs here in its own fresh process, alternating, and prints a timeline through the code a job runs
(:func:`preprocessing.features.encoders.build_encoder` or
:func:`~preprocessing.features.encoder_file.load_frozen_encoder`,
then :class:`preprocessing.features.runner.FeatureRunner` and its warm-up): torch imported, extraction
modules imported, encoder ready, runner on the device, first batch of random patches embedded.
Then the features of both variants are compared with the eager model's in float32 on the same
patches (on a GPU both variants run under autocast, so their difference from float32 is bf16
rounding).

    .venv/bin/python benchmarks/extract_startup.py [--device cuda] [--repeats 2] [--batch-size 256]
"""

from __future__ import annotations

import time

STARTED = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def child(variant: str, device_name: str, batch_size: int, work: Path) -> None:
    """One job's start-up: print the timeline as JSON, save the first batch's features."""
    marks: dict[str, float] = {}

    def mark(what: str) -> None:
        marks[what] = round(time.perf_counter() - STARTED, 2)

    import torch

    mark("torch imported")
    from preprocessing.features.encoder_file import load_frozen_encoder
    from preprocessing.features.encoders import build_encoder
    from preprocessing.features.runner import FeatureRunner

    mark("extraction modules imported")
    device = torch.device(device_name)
    if variant == "frozen":
        encoder = load_frozen_encoder(work / "encoder.pt", device)
    else:
        encoder = build_encoder("efficientnet_lite0")
    mark("encoder ready")
    runner = FeatureRunner(encoder, device, pad_to=batch_size if device.type == "cuda" else None)
    mark("runner on the device")
    runner.warm_up()
    patches = torch.randint(0, 256, (batch_size, *encoder.input_size, 3), dtype=torch.uint8,
                            generator=torch.Generator().manual_seed(0))
    features = runner(patches).cpu()
    mark("first batch embedded")
    print(json.dumps({"variant": variant, "timm_imported": "timm" in sys.modules, **marks}), flush=True)
    torch.save(features, work / f"{variant}.pt")
    if variant == "timm":  # the reference: the eager model in float32 on the same device
        reference = FeatureRunner(encoder, device, freeze=False)
        reference.amp_dtype = None
        torch.save(reference(patches).cpu(), work / "float32.pt")


def main(argv: list[str] | None = None) -> int:
    """Alternate the two variants in fresh processes; print timelines and feature agreement."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--child", choices=["timm", "frozen"], help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child, args.device, args.batch_size, args.work)
        return 0

    import torch

    from preprocessing.features.encoder_file import save_frozen_encoder
    from preprocessing.features.encoders import build_encoder

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        save_frozen_encoder(build_encoder("efficientnet_lite0"), work / "encoder.pt")
        for repeat in range(args.repeats):
            for variant in ("timm", "frozen"):
                cmd = [sys.executable, __file__, "--child", variant, "--device", args.device,
                       "--batch-size", str(args.batch_size), "--work", str(work)]
                done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False,
                                      env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})  # as healnet does
                if done.returncode != 0:
                    print(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed")
                    return 1
                line = json.loads(done.stdout.strip().splitlines()[-1])
                steps = ", ".join(f"{k} {v:.2f} s" for k, v in line.items()
                                  if k not in ("variant", "timm_imported"))
                print(f"repeat {repeat} {variant:6s}: {steps}; timm imported: {line['timm_imported']}",
                      flush=True)
        reference = torch.load(work / "float32.pt")
        for variant in ("timm", "frozen"):
            features = torch.load(work / f"{variant}.pt")
            cos = torch.nn.functional.cosine_similarity(features, reference, dim=1)
            largest = float((features - reference).abs().max())
            print(f"{variant} against the eager model in float32: cosine mean {float(cos.mean()):.5f}, "
                  f"min {float(cos.min()):.5f}; largest difference {largest:.4f} "
                  f"(mean |feature| {float(reference.abs().mean()):.4f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
