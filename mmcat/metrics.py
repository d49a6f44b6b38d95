"""Classification metrics (scikit-learn) and their table rendering (the TensorBoard confusion-matrix figure is
:mod:`mmcat.train.tensorboard`'s)."""
from __future__ import annotations

from typing import Dict, List, Sequence

import numpy as np
from sklearn.metrics import accuracy_score, classification_report, confusion_matrix, f1_score

MODES = ("fused", "image_only", "text_only")  # of an image+text model: mmcat.modalities.modes_for


def classification_metrics(y_true: Sequence[int], y_pred: Sequence[int], labels: Sequence[str]) -> Dict:
    """Accuracy, macro/weighted F1, per-class report and confusion matrix over all ``labels`` (also absent ones)."""
    idx = list(range(len(labels)))
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    report = classification_report(
        y_true, y_pred, labels=idx, target_names=list(labels), output_dict=True, zero_division=0
    )
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)) if len(y_true) else 0.0,
        "macro_f1": float(f1_score(y_true, y_pred, labels=idx, average="macro", zero_division=0)),
        "weighted_f1": float(f1_score(y_true, y_pred, labels=idx, average="weighted", zero_division=0)),
        "num_samples": int(len(y_true)),
        "per_class": {name: report[name] for name in labels},
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=idx).tolist(),
    }


def summary(metrics: Dict) -> Dict[str, float]:
    """The headline numbers of one mode (what metrics.json and the table show)."""
    return {k: metrics[k] for k in ("accuracy", "macro_f1", "weighted_f1", "num_samples")}


def result_modes(results: Dict) -> List[str]:
    """The evaluation modes of a result dict, in their order (its other keys, e.g. skipped_samples, are not)."""
    return [k for k, v in results.items() if isinstance(v, dict) and "accuracy" in v]


def format_table(results: Dict[str, Dict], title: str = "") -> str:
    """A fixed-width table: one row per mode with accuracy and F1 scores."""
    lines = [title] if title else []
    modes = result_modes(results)
    w = max([12, *(len(m) + 2 for m in modes)])
    lines.append(f"{'mode':<{w}}{'accuracy':>10}{'macro_f1':>10}{'weighted_f1':>13}{'samples':>9}")
    for mode in modes:
        m = results[mode]
        lines.append(
            f"{mode:<{w}}{m['accuracy']:>10.4f}{m['macro_f1']:>10.4f}{m['weighted_f1']:>13.4f}{m['num_samples']:>9d}"
        )
    return "\n".join(lines)

