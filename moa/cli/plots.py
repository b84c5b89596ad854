"""PNG plots for `moa demo` and `moa bench` (matplotlib, headless Agg backend)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_loss_curve(steps: Sequence[int], losses: Sequence[float], path: str | Path,
                    title: str = "training loss",
                    references: dict[str, float] | None = None) -> Path:
    """Line plot of the cross-entropy loss against step, with dashed reference levels
    (e.g. {"chance": 2.77, "best possible": 0.035})."""
    figure, axes = plt.subplots(figsize=(6, 4))
    axes.plot(list(steps), list(losses), color="tab:blue", label="training loss")
    for (label, level), color in zip((references or {}).items(), ("tab:gray", "tab:green")):
        axes.axhline(level, color=color, linewidth=0.9, linestyle="--",
                     label=f"{label} ({level:.3f})")
    axes.set_xlabel("step")
    axes.set_ylabel("cross-entropy (nats)")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    if references:
        axes.legend(fontsize=8)
    return _save(figure, path)


def plot_heatmap(values: Sequence[Sequence[float]], row_labels: Sequence[str],
                 column_labels: Sequence[str], path: str | Path, title: str,
                 colorbar_label: str,
                 value_range: tuple[float, float] | None = None) -> Path:
    """Heatmap of a rows x columns matrix (routers x experts), each cell annotated. The
    colours span value_range, or 0 to the largest value (so that gates near 1/E differ)."""
    rows, columns = len(row_labels), len(column_labels)
    finite = [v for row in values for v in row if v == v]
    low, high = value_range or (0.0, max(finite, default=1.0) or 1.0)
    figure, axes = plt.subplots(figsize=(2.5 + 0.9 * columns, 2.5 + 0.5 * rows))
    image = axes.imshow(values, aspect="auto", cmap="viridis", vmin=low, vmax=high)
    axes.set_xticks(range(columns), list(column_labels), rotation=45, ha="right")
    axes.set_yticks(range(rows), list(row_labels))
    axes.set_xlabel("expert")
    axes.set_ylabel("router")
    for r in range(rows):
        for c in range(columns):
            value = values[r][c]
            axes.text(c, r, f"{value:.2f}", ha="center", va="center", fontsize=7,
                      color="white" if value < low + 0.6 * (high - low) else "black")
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
    axes.set_ylim(top=max(list(values) + [reference_line or 0.0]) * 1.12)
    return _save(figure, path)


def _save(figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def plot_loss_curves(curves: dict[str, Sequence[tuple[int, float]]], path: str | Path,
                     title: str = "loss") -> Path:
    """Line plot of several (step, loss) series, e.g. {"training loss": [(1, 2.3), ...],
    "eval loss": [(50, 1.9), ...]}; a series of few points is drawn with markers."""
    figure, axes = plt.subplots(figsize=(6, 4))
    for (label, points), color in zip(curves.items(), ("tab:blue", "tab:orange", "tab:green",
                                                       "tab:red")):
        steps, losses = zip(*points) if points else ((), ())
        axes.plot(steps, losses, color=color, label=label,
                  marker="o" if len(points) <= 20 else None, markersize=3)
    axes.set_xlabel("step")
    axes.set_ylabel("cross-entropy (nats)")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    return _save(figure, path)


def plot_comparison(points: Sequence[tuple[str, int, float, float, float]],
                    curves: dict[str, Sequence[Sequence[Sequence[float]]]], path: str | Path,
                    base_accuracy: float | None = None, title: str = "comparison") -> Path:
    """Two panels. Left: per variant (name, trainable parameters, mean accuracy, interval
    low, high) a point with its interval as the error bar, against trainable parameters on a
    log scale, and the base model's accuracy as a dashed line. Right: the training loss of
    every run ({variant: [[(step, loss), ...] per seed]}), one colour per variant."""
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    colours = plt.get_cmap("tab10")
    for index, (name, parameters, mean, low, high) in enumerate(points):
        colour = colours(index % 10)
        left.errorbar([parameters], [mean], yerr=[[mean - low], [high - mean]], fmt="o",
                      color=colour, capsize=4, label=name)
        left.annotate(name, (parameters, mean), textcoords="offset points",
                      xytext=(6, 4 - 10 * (index % 3)), fontsize=8)  # apart where they meet
        for run, losses in enumerate(curves.get(name, [])):
            steps, values = zip(*losses) if losses else ((), ())
            right.plot(steps, values, color=colour, alpha=0.7, linewidth=0.9,
                       label=name if run == 0 else None)
    if base_accuracy is not None:
        left.axhline(base_accuracy, color="tab:gray", linewidth=0.9, linestyle="--",
                     label=f"base model ({base_accuracy:.3f})")
    left.set_xscale("log")
    left.set_xlabel("trainable parameters (log scale)")
    left.set_ylabel("test accuracy (mean over seeds, 95% interval)")
    left.set_title(title)
    left.grid(alpha=0.3)
    left.legend(fontsize=7)
    right.set_xlabel("step")
    right.set_ylabel("training loss, cross-entropy (nats)")
    right.set_title("training loss of every run")
    right.grid(alpha=0.3)
    right.legend(fontsize=7)
    return _save(figure, path)
