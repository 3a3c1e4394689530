"""What a run writes for people: CSV and TensorBoard scalars, a final metrics JSON, and a PNG of the curves."""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path
from typing import Any


class RunLog:
    """Scalars to ``scalars.csv`` (long format: step, name, value) and, if available, TensorBoard; rank 0 only."""

    def __init__(self, out_dir: Path, *, tensorboard: bool, enabled: bool = True) -> None:
        self.out_dir, self.enabled = out_dir, enabled
        self.rows: list[tuple[int, str, float]] = []
        self._writer = None
        if not enabled:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        self._csv_path = out_dir / "scalars.csv"
        if self._csv_path.exists():  # a resumed run keeps its history
            with self._csv_path.open() as f:
                self.rows = [(int(r["step"]), r["name"], float(r["value"])) for r in csv.DictReader(f)]
        else:
            self._csv_path.write_text("step,name,value\n")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._writer = SummaryWriter(str(out_dir / "tensorboard"))
            except ImportError:  # tensorboard is in the [train] extra; CSV keeps working without it
                self._writer = None

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        with self._csv_path.open("a", newline="") as f:
            writer = csv.writer(f)
            for name, value in values.items():
                self.rows.append((step, name, float(value)))
                writer.writerow([step, name, f"{float(value):.8g}"])
                if self._writer is not None:
                    self._writer.add_scalar(name, value, step)

    def rewind(self, step: int) -> None:
        """Forgets every scalar logged after ``step`` (a run resumed from its step-``step`` checkpoint logs them again).

        The CSV is rewritten through a temp file and a rename, so a kill here leaves the old or the new file; the
        TensorBoard writer is reopened with ``purge_step`` so that its readers hide the stale events too.
        """
        if not self.enabled:
            return
        kept = [row for row in self.rows if row[0] <= step]
        if len(kept) != len(self.rows):
            tmp = self._csv_path.with_name(self._csv_path.name + ".tmp")
            with tmp.open("w", newline="") as f:
                writer = csv.writer(f)
                writer.writerow(["step", "name", "value"])
                writer.writerows([s, name, f"{value:.8g}"] for s, name, value in kept)
            os.replace(tmp, self._csv_path)
            self.rows = kept
        if self._writer is not None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer.close()
            self._writer = SummaryWriter(str(self.out_dir / "tensorboard"), purge_step=step + 1)

    def write_json(self, name: str, payload: dict[str, Any]) -> Path:
        path = self.out_dir / name
        path.write_text(json.dumps(payload, indent=2, sort_keys=True))
        return path

    def plot(self, path: Path, *, title: str) -> Path | None:
        """Loss curve (left) and kNN accuracy curves (right) from the logged scalars."""
        if not self.enabled or not self.rows:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        series: dict[str, tuple[list[int], list[float]]] = {}
        for step, name, value in self.rows:
            if math.isfinite(value):
                xs, ys = series.setdefault(name, ([], []))
                xs.append(step)
                ys.append(value)
        fig, (ax_loss, ax_knn) = plt.subplots(1, 2, figsize=(11, 4))
        if "train/loss" in series:
            ax_loss.plot(*series["train/loss"], lw=1)
        ax_loss.set(xlabel="step", ylabel="loss", title="training loss")
        for name, (xs, ys) in series.items():
            if name.startswith("knn/"):
                ax_knn.plot(xs, ys, marker="o", label=name[4:])
        ax_knn.set(xlabel="step", ylabel="kNN top-1", title="kNN monitor", ylim=(0, 1))
        if ax_knn.lines:
            ax_knn.legend()
        fig.suptitle(title)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
