"""What the trainer shows beyond plain scalars: a confusion matrix a person can read (class names on both axes,
counts, a colour scale, axis titles), and per-class F1 as scalars (one curve per class, so a class that stops
improving is visible). mmcat.train.trackers sends the figure to each tracker of ``train.report_to`` that takes
images (TensorBoard as an RGB array, MLflow as a PNG).

matplotlib draws off-screen (the Agg canvas, no pyplot, no display): the trainer may run on a head-less node.
"""
from __future__ import annotations

from typing import Any, Dict, Sequence

import numpy as np

MAX_ANNOTATED = 25  # classes up to which every cell carries its count


def confusion_figure(matrix: Sequence[Sequence[int]], labels: Sequence[str]) -> Any:
    """A matplotlib Figure: row-normalised colour (share of the true class), counts in the cells, class names on
    both axes and a colour bar. It grows with the number of classes so names stay legible."""
    from matplotlib.figure import Figure

    m = np.asarray(matrix, dtype=np.int64)
    n = len(labels)
    share = m / np.maximum(m.sum(axis=1, keepdims=True), 1)
    per_class = 0.42 if n <= MAX_ANNOTATED else 0.22  # inches per row: room for a count, else for a 7 pt name
    side = float(min(30.0, max(4.5, per_class * n + 2.5)))
    fig = Figure(figsize=(side + 1.2, side), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    font = 9 if n <= 25 else 7
    ax.set_xticks(range(n), labels=list(labels), rotation=45 if n <= 12 else 90, ha="right" if n <= 12 else "center",
                  rotation_mode="anchor" if n <= 12 else "default", fontsize=font)
    ax.set_yticks(range(n), labels=list(labels), fontsize=font)
    ax.set_xlabel("predicted label")
    ax.set_ylabel("true label")
    if n <= MAX_ANNOTATED:
        for i in range(n):
            for j in range(n):
                if m[i, j]:
                    ax.text(j, i, str(m[i, j]), ha="center", va="center", fontsize=font,
                            color="white" if share[i, j] > 0.5 else "black")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    return fig


def figure_rgb(fig: Any) -> np.ndarray:
    """The figure rendered to an RGB uint8 array (HWC), what ``SummaryWriter.add_image`` takes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def per_class_f1(per_class: Dict[str, Dict[str, float]], prefix: str = "val/per_class_f1/") -> Dict[str, float]:
    """``{prefix + class name: F1}`` of a classification report's per-class dict."""
    return {f"{prefix}{name}": float(v["f1-score"]) for name, v in per_class.items()}
