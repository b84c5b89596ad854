"""PNG plots for `moa demo` and `moa bench` (matplotlib, headless Agg backend)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_loss_curve(steps: Sequence[int], losses: Sequence[float], path: str | Path,
                    title: str = "training loss") -> Path:
    """Line plot of loss against step."""
    figure, axes = plt.subplots(figsize=(6, 4))
    axes.plot(list(steps), list(losses), color="tab:blue")
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    return _save(figure, path)


def plot_heatmap(values: Sequence[Sequence[float]], row_labels: Sequence[str],
                 column_labels: Sequence[str], path: str | Path, title: str,
                 colorbar_label: str) -> Path:
    """Heatmap of a rows x columns matrix (layers x experts), each cell annotated."""
    rows, columns = len(row_labels), len(column_labels)
    figure, axes = plt.subplots(figsize=(2.5 + 0.9 * columns, 2.5 + 0.5 * rows))
    image = axes.imshow(values, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0)
    axes.set_xticks(range(columns), list(column_labels), rotation=45, ha="right")
    axes.set_yticks(range(rows), list(row_labels))
    for r in range(rows):
        for c in range(columns):
            value = values[r][c]
            axes.text(c, r, f"{value:.2f}", ha="center", va="center", fontsize=7,
                      color="white" if value < 0.6 else "black")
    axes.set_title(title)
    figure.colorbar(image, ax=axes, label=colorbar_label)
    return _save(figure, path)


def plot_bars(labels: Sequence[str], values: Sequence[float], path: str | Path, title: str,
              ylabel: str, reference_line: float | None = 1.0) -> Path:
    """Bar chart (benchmark ratios), with an optional horizontal reference line."""
    figure, axes = plt.subplots(figsize=(max(6, 0.7 * len(labels)), 4))
    axes.bar(range(len(labels)), list(values), color="tab:blue")
    axes.set_xticks(range(len(labels)), list(labels), rotation=45, ha="right")
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    if reference_line is not None:
        axes.axhline(reference_line, color="black", linewidth=0.8, linestyle="--")
    for i, value in enumerate(values):
        axes.text(i, value, f"{value:.2f}", ha="center", va="bottom", fontsize=7)
    return _save(figure, path)


def _save(figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
