"""Training bags kept in the device's memory (``training.bags_on_device``), when they fit.

Reading a bag from its feature store at every epoch costs the readers' time; bags kept on the device
after one read are cut into batches there instead. They are kept only when asked for (``auto``: on a
GPU) and when they fit in three quarters of the free memory.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import torch

from healnet.data.bags import BagDataset
from healnet.data.resident import ResidentBags

log = logging.getLogger(__name__)


def free_memory(device: torch.device) -> int:
    """Bytes free on ``device``: the GPU's free memory, or the machine's available RAM."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def resident_bags(
    dataset: BagDataset, rows: Sequence[int], device: torch.device, workers: int, setting: bool | str
) -> ResidentBags | None:
    """The training bags kept on ``device`` when ``training.bags_on_device`` asks for it (``auto``: on
    a GPU) and they fit in three quarters of its free memory; otherwise None, and the loader's
    readers read them at every epoch (said in the log when the bags were asked for but do not fit)."""
    wanted = setting is True or (setting == "auto" and device.type == "cuda")
    if not wanted or not dataset.read_wsi or not dataset.has_wsi[list(rows)].any():
        return None
    need, free = ResidentBags.nbytes(dataset, rows), free_memory(device)
    if need > 0.75 * free:
        log.warning("training.bags_on_device: the training bags need %.1f GiB, %.1f GiB of %s memory is "
                    "free; they are read from the stores at every epoch instead", need / 2**30,
                    free / 2**30, device.type)
        return None
    try:
        bags = ResidentBags(dataset, rows, device, workers)
    except torch.OutOfMemoryError:
        if device.type == "cuda":
            torch.cuda.empty_cache()
        log.warning("training.bags_on_device: %s memory ran out while the bags were loaded; they are "
                    "read from the stores at every epoch instead", device.type)
        return None
    log.info("%d training bags (%.1f GiB) kept in %s memory", len(bags.features), need / 2**30, device.type)
    return bags
