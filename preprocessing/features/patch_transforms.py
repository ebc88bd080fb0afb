"""What happens to a patch between the slide and the encoder: RGBA to RGB, resizing, stain
normalisation (in the reader processes) and scaling by the encoder's mean and std (on its device).
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch
from torch import nn

from preprocessing.core.errors import InputError
from preprocessing.features.weights import sha256_file

#: cv2 flags for the interpolation names found in timm's pretrained configs (used when enlarging).
_CV2_INTERPOLATION = {
    "nearest": cv2.INTER_NEAREST,
    "bilinear": cv2.INTER_LINEAR,
    "bicubic": cv2.INTER_CUBIC,
    "lanczos": cv2.INTER_LANCZOS4,
}


def rgba_to_rgb(rgba: np.ndarray) -> np.ndarray:
    """Composite an RGBA uint8 image (OpenSlide's output, not premultiplied) on white."""
    rgb = rgba[..., :3]
    alpha = rgba[..., 3]
    if alpha.min() == 255:
        return np.ascontiguousarray(rgb)
    a = alpha[..., None].astype(np.float32) / 255.0
    return (rgb.astype(np.float32) * a + 255.0 * (1.0 - a) + 0.5).astype(np.uint8)


def resize_patch(rgb: np.ndarray, size: tuple[int, int], interpolation: str = "bicubic") -> np.ndarray:
    """Resize an RGB patch to ``size`` (height, width): area averaging when shrinking, the model's
    interpolation when enlarging, unchanged when already that size."""
    height, width = size
    if rgb.shape[:2] == (height, width):
        return rgb
    shrinking = rgb.shape[0] >= height and rgb.shape[1] >= width
    flag = cv2.INTER_AREA if shrinking else _CV2_INTERPOLATION.get(interpolation, cv2.INTER_LINEAR)
    return cv2.resize(rgb, (width, height), interpolation=flag)


class Normalise(nn.Module):
    """uint8 batch (N, H, W, 3) -> float (N, 3, H, W) in channels-last memory, scaled by mean/std.

    Done on the model's device, so only bytes travel from the reader processes (and to a GPU).
    """

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        std_t = torch.tensor(std, dtype=torch.float32) * 255.0
        self.register_buffer("scale", (1.0 / std_t).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("shift", (torch.tensor(mean) * 255.0 / std_t).view(1, 3, 1, 1),
                             persistent=False)

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        """Scale a uint8 NHWC batch; the result keeps NHWC strides (channels_last)."""
        x = batch.permute(0, 3, 1, 2).float()
        return x * self.scale - self.shift


STAIN_METHODS = ("macenko", "vahadane", "reinhard")


class StainNormaliser:
    """tiatoolbox stain normaliser fitted on a reference image. A patch it cannot handle (e.g. one
    with no stain at all) is returned unchanged, flagged so that the caller can count it."""

    def __init__(self, method: str, reference: str | Path) -> None:
        if method not in STAIN_METHODS:
            raise InputError("--stain-norm", f"unknown method {method!r}: use {', '.join(STAIN_METHODS)}")
        reference = Path(reference)
        image = cv2.imread(str(reference), cv2.IMREAD_COLOR)
        if image is None:
            raise InputError(reference, "stain reference image missing or unreadable")
        from tiatoolbox.tools.stainnorm import get_normalizer

        self.method = method
        self.reference = reference
        self.reference_sha256 = sha256_file(reference)
        self._normaliser = get_normalizer(method)
        try:
            self._normaliser.fit(cv2.cvtColor(image, cv2.COLOR_BGR2RGB))
        except Exception as err:  # noqa: BLE001 - any fitting failure is a bad reference
            raise InputError(reference, f"cannot fit {method} stain normaliser ({err})") from err

    def __call__(self, rgb: np.ndarray) -> tuple[np.ndarray, bool]:
        """Normalise one RGB uint8 patch; returns (patch, whether it was normalised)."""
        try:
            return np.ascontiguousarray(self._normaliser.transform(rgb.copy()), dtype=np.uint8), True
        except (ValueError, ZeroDivisionError, np.linalg.LinAlgError):
            return rgb, False

    def describe(self) -> dict[str, str]:
        """JSON-ready description for the store's attributes."""
        return {"method": self.method, "reference": self.reference.name,
                "reference_sha256": self.reference_sha256}
