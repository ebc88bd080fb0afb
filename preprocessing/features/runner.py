"""The encoder on one device: uint8 patch batches in, float32 features out (:class:`FeatureRunner`)."""

from __future__ import annotations

import os

import torch

from preprocessing.features.encoder_file import freeze_model
from preprocessing.features.encoders import Encoder
from preprocessing.features.patch_transforms import Normalise


def usable_cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


#: patches per forward pass on CPU: larger batches fall out of the CPU caches and run slower
CPU_MICRO_BATCH = 16


class FeatureRunner:
    """Encoder + normalisation on one device: uint8 NHWC batches in, float32 features out.

    channels_last memory on CPU and GPU; on CPU the model is traced and frozen
    (:func:`preprocessing.features.encoder_file.freeze_model`, unless it comes frozen from an encoder
    file); on CUDA autocast (bf16 where supported, else fp16) and non-blocking copies from pinned memory.
    ``pad_to`` pads shorter batches with blank patches (dropped from the output), so that the model
    sees a single batch shape: each new shape costs seconds of one-off set-up in every process,
    and a slide's short first and last batches would pay it twice more.
    """

    def __init__(self, encoder: Encoder, device: torch.device, freeze: bool = True,
                 pad_to: int | None = None) -> None:
        self.device = device
        self.pad_to = pad_to
        self.model = encoder.model.to(device).to(memory_format=torch.channels_last).eval()
        self.normalise = Normalise(encoder.mean, encoder.std).to(device)
        self.feature_dim = encoder.feature_dim
        self.input_size = encoder.input_size
        self.amp_dtype: torch.dtype | None = None
        self.frozen = False
        if device.type == "cuda":
            # No cuDNN autotuning: reading bounds extraction (the GPU runs far faster than the
            # readers), and autotuning the first batch costs every fresh process seconds.
            torch.backends.cudnn.benchmark = False
            self.amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        elif freeze:
            # Frozen (batch norm folded) and optimised for this CPU: several times faster than eager mode.
            frozen = (self.model if isinstance(self.model, torch.jit.ScriptModule)
                      else freeze_model(self.model, encoder.input_size))
            if frozen is not None:
                with torch.inference_mode():
                    self.model, self.frozen = torch.jit.optimize_for_inference(frozen), True

    @torch.inference_mode()
    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        """Features of a uint8 (N, H, W, 3) batch, float32 (N, D) on the runner's device."""
        if self.device.type == "cpu" and len(batch) > CPU_MICRO_BATCH:
            return torch.cat([self(part) for part in batch.split(CPU_MICRO_BATCH)])
        n = len(batch)
        x = batch.to(self.device, non_blocking=True)
        if self.pad_to is not None and n < self.pad_to:
            x = torch.cat([x, x.new_zeros((self.pad_to - n, *x.shape[1:]))])
        x = self.normalise(x)
        if self.amp_dtype is not None:
            with torch.autocast(self.device.type, dtype=self.amp_dtype):
                out = self.model(x)
        else:
            out = self.model(x)
        return out[:n].float()

    def warm_up(self) -> None:
        """Run one blank batch of the padded shape, so that the one-off set-up is done before real
        batches come (nothing to do without ``pad_to``, which extraction sets on a GPU only).

        Called while the reader processes fill their first batches, which hides its cost.
        """
        if self.pad_to is None:
            return
        height, width = self.input_size
        self(torch.zeros((self.pad_to, height, width, 3), dtype=torch.uint8))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
