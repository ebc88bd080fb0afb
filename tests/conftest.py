"""Shared test fixtures: paths to the repository and to the real data beside it."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_SHARED_DATA = REPO.parent / "shared" / "data"


def require(path: Path, what: str) -> Path:
    """``path`` when it exists; otherwise skip the test, or fail it where ``CI`` is set (a CI run
    that silently skipped the real-data tests would pass without testing them)."""
    if path.exists():
        return path
    message = f"{what} is not present ({path})"
    if os.environ.get("CI"):
        pytest.fail(f"{message}, and CI is set: the real-data tests must run there", pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` beside the checkout, the one owner of that path: tests using it skip when
    it is absent, and fail when the environment variable ``CI`` is set."""
    return require(_SHARED_DATA, "../shared/data")


@pytest.fixture(scope="session")
def real_slide(shared_data: Path) -> Path:
    """The real Aperio slide of the shared data (skips, or fails under ``CI``, like ``shared_data``)."""
    return require(shared_data / "slides" / "CMU-1-Small-Region.svs", "the real Aperio slide")


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """Tiny models run fastest single-threaded on a shared machine; restore global torch state after."""
    import torch

    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic)
