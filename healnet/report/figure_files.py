"""Writing the report's figures: a PNG saved atomically, or a placeholder that says why there is none.

Every figure of the report goes through here, so that ``figures`` and ``attention`` share these
helpers without importing each other. Matplotlib draws off-screen (Agg): the report runs in batch jobs.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from preprocessing.core.atomic import atomic_output  # noqa: E402


def save_figure(fig: plt.Figure, path: Path) -> None:
    """Save a figure atomically as PNG and close it."""
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def message_figure(path: Path, title: str, message: str) -> None:
    """A figure that says in words why there is nothing to plot (the report keeps its layout)."""
    fig, ax = plt.subplots(figsize=(6, 2))
    ax.axis("off")
    ax.set_title(title)
    ax.text(0.5, 0.5, message, ha="center", va="center", wrap=True)
    save_figure(fig, path)
