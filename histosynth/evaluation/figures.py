"""Figures for people: matplotlib on the Agg backend, saved atomically as PNG at one resolution,
and the layout helpers the report's figures share."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from histosynth.files import atomic_file  # noqa: E402

DPI = 120
GROUP_WIDTH = 0.8  # width of a tick's group of side-by-side bars


def save_figure(fig, path: str | Path) -> Path:
    """Write `fig` to `path` as a tightly cropped PNG (nothing half-written) and close it."""
    path = Path(path)
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=DPI, bbox_inches="tight", format="png")
    plt.close(fig)
    return path


def bar_offset(k: int, n: int) -> float:
    """x offset of the k-th of n side-by-side bars (or boxes) around a tick."""
    return (k - (n - 1) / 2) * GROUP_WIDTH / n


def wrap(text: str, width: int) -> str:
    """`text` broken into lines of at most `width` characters (a figure's title or note)."""
    return "\n".join(textwrap.wrap(text, width))


def ratio_order(values, order: Sequence[str] | None) -> list[str]:
    """The distinct `values` (ratio names), those in `order` first in its order, the rest as they come."""
    present = list(dict.fromkeys(values))
    return [r for r in (order or []) if r in present] + [r for r in present if r not in (order or [])]
