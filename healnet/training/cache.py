"""A run's private folder of decoded features (``training.feature_cache``), removed when the run ends."""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from preprocessing.core.errors import InputError

log = logging.getLogger(__name__)


@contextmanager
def decoded_feature_cache(root: str | Path | None) -> Iterator[Path | None]:
    """A private folder under ``root`` for this run's decoded features, removed when the run ends
    (None without ``root``). Private to the run, so no other job's or an older run's files are
    ever read: the stores cannot change under it."""
    if not root:
        yield None
        return
    try:
        Path(root).mkdir(parents=True, exist_ok=True)
        folder = tempfile.mkdtemp(prefix="healnet-features-", dir=root)
    except OSError as err:
        reason = f"cannot make a folder in {root} ({err.strerror or err})"
        raise InputError("training.feature_cache", reason) from err
    try:
        log.info("decoded features cached in %s for this run", folder)
        yield Path(folder)
    finally:
        # Readers of a run ended by an exception (SIGTERM included) may still be writing: once the
        # folder is gone they cannot make it again, so a few tries remove it for good.
        for _ in range(20):
            shutil.rmtree(folder, ignore_errors=True)
            if not Path(folder).exists():
                break
            time.sleep(0.1)
