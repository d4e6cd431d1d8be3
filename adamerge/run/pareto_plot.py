"""``front.png`` of ``adamerge pareto``: the amortized Pareto front in metric space (matplotlib,
Agg backend, imported only here and only when a plot is written).

Two tasks: the front's predicted metrics as a curve of points, the measured points overlaid, the
picked λ's prediction and measurement highlighted. More tasks: a grid of pairwise task-metric
scatter plots (row task against column task) with the same layers.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

logger = logging.getLogger(__name__)


def plot_front(path: Path, tasks: list[str], front: torch.Tensor, measured: torch.Tensor, picked: torch.Tensor, metric: str) -> bool:
    """Write the front's figure to ``path``; ``False`` (logged) when matplotlib is not installed.

    Args:
        path: the PNG file.
        tasks: the K task names.
        front: ``(F, K)`` predicted metrics of the front points.
        measured: ``(N, K)`` measured metrics of the sampled points.
        picked: ``(2, K)``: the picked λ's predicted, then measured, metrics.
        metric: the metric's name (axis labels).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("front.png not written: matplotlib is not installed (pip install matplotlib)")
        return False
    k = len(tasks)
    pairs = [(0, 1)] if k == 2 else [(i, j) for i in range(k) for j in range(k) if i != j]
    side = 1 if k == 2 else k
    figure, axes = plt.subplots(side, side, figsize=(5.5, 5) if k == 2 else (2.6 * k, 2.6 * k), squeeze=False)
    for i, j in pairs:
        axis = axes[0, 0] if k == 2 else axes[i, j]
        x, y = (0, 1) if k == 2 else (j, i)
        axis.scatter(front[:, x], front[:, y], s=8, color="tab:blue", label="front (predicted)")
        axis.scatter(measured[:, x], measured[:, y], s=14, marker="x", color="tab:gray", label="sampled (measured)")
        axis.scatter(picked[0, x], picked[0, y], s=90, marker="*", color="tab:red", label="picked (predicted)")
        axis.scatter(picked[1, x], picked[1, y], s=60, marker="o", facecolors="none", edgecolors="tab:red", label="picked (measured)")
        axis.set_xlabel(f"{tasks[x]} {metric}")
        axis.set_ylabel(f"{tasks[y]} {metric}")
    if k > 2:
        for i in range(k):
            axes[i, i].axis("off")
            axes[i, i].text(0.5, 0.5, tasks[i], ha="center", va="center", fontsize=12)
    handles, labels = (axes[0, 0] if k == 2 else axes[0, 1]).get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=2, fontsize=8)
    figure.suptitle(f"amortized Pareto front (MAP): {metric} per task")
    figure.tight_layout(rect=(0, 0.1 if k == 2 else 0.05, 1, 0.97))
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True
