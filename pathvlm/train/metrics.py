"""metrics.csv (one row per log or eval event, columns as they appear) and loss_curve.png."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any


class MetricsLog:
    """Rows of ``{"step": int, name: float, ...}``; rewritten whole on save (small files, atomic)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.rows: list[dict[str, Any]] = []

    def load(self, keep_until: int) -> None:
        """Read an existing file, dropping rows past ``keep_until`` (logged after the checkpoint)."""
        if not self.path.exists():
            return
        with self.path.open(newline="") as fh:
            rows = list(csv.DictReader(fh))
        self.rows = [{k: float(v) if k != "step" else int(v) for k, v in r.items() if v not in ("", None)}
                     for r in rows if int(r["step"]) <= keep_until]

    def add(self, row: dict[str, Any]) -> None:
        self.rows.append(dict(row))

    def columns(self) -> list[str]:
        cols: list[str] = []
        for row in self.rows:
            cols += [k for k in row if k not in cols]
        return cols

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        with tmp.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=self.columns())
            writer.writeheader()
            writer.writerows(self.rows)
        tmp.replace(self.path)

    def series(self, name: str) -> tuple[list[int], list[float]]:
        pts = [(r["step"], r[name]) for r in self.rows if name in r]
        return [p[0] for p in pts], [p[1] for p in pts]

    def plot(self, path: Path) -> None:
        """Training loss against step, with every val/* metric on a second axis."""
        from matplotlib.figure import Figure  # no pyplot: no global backend state

        fig = Figure(figsize=(7, 4))
        ax = fig.subplots()
        steps, loss = self.series("train/loss")
        ax.plot(steps, loss, color="tab:blue", label="train loss")
        ax.set_xlabel("step")
        ax.set_ylabel("train loss")
        val_names = [c for c in self.columns() if c.startswith("val/")]
        if val_names:
            ax2 = ax.twinx()
            for name in val_names:
                xs, ys = self.series(name)
                ax2.plot(xs, ys, marker="o", linestyle="--", label=name)
            ax2.set_ylabel("validation")
            ax2.legend(loc="upper right", fontsize=8)
        ax.legend(loc="upper left", fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
