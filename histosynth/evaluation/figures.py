"""Figures for people: matplotlib on the Agg backend, saved atomically as PNG at one resolution."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from histosynth.files import atomic_file  # noqa: E402

DPI = 120


def save_figure(fig, path: str | Path) -> Path:
    """Write `fig` to `path` as a tightly cropped PNG (nothing half-written) and close it."""
    path = Path(path)
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=DPI, bbox_inches="tight", format="png")
    plt.close(fig)
    return path
