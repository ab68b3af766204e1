"""The loss CSV of a training, appended as it runs and cut back to the checkpoint on resume."""

from __future__ import annotations

import csv
from pathlib import Path

from histosynth.files import atomic_file

BASE_COLUMNS = ("step", "epoch", "loss", "lr", "seconds", "samples_per_s")


class LossLog:
    """The loss CSV, appended as training runs. On resume, rows after the checkpoint's step are
    dropped (they belong to the interrupted run and will be recomputed)."""

    def __init__(self, path: Path, extra_columns=(), resume_step: int | None = None):
        self.path, self.columns = Path(path), [*BASE_COLUMNS, *extra_columns]
        if self.path.is_file():
            with open(self.path, newline="") as f:
                rows = list(csv.DictReader(f))
            keep = [r for r in rows if resume_step is not None and int(r["step"]) <= resume_step]
            with atomic_file(self.path) as tmp, open(tmp, "w", newline="") as f:
                writer = csv.DictWriter(f, self.columns, extrasaction="ignore")
                writer.writeheader()
                writer.writerows(keep)
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "w", newline="") as f:
                csv.DictWriter(f, self.columns).writeheader()

    def write(self, row: dict) -> None:
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, self.columns, extrasaction="ignore").writerow(
                {k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()}
            )
