"""Classification metrics on integer labels: balanced accuracy, weighted F1, per-class recall,
confusion matrix (and its PNG), expected calibration error, and bootstrap 95% intervals (of one
figure, or of the difference between two predictions of the same items).

Written on numpy so the definitions are visible; tests check them against scikit-learn.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np


def confusion_matrix(y_true: Sequence[int], y_pred: Sequence[int], n_classes: int) -> np.ndarray:
    """[C, C] counts; rows are true classes, columns predicted."""
    cm = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(cm, (np.asarray(y_true, dtype=int), np.asarray(y_pred, dtype=int)), 1)
    return cm


def per_class_recall(cm: np.ndarray) -> np.ndarray:
    """Recall of every class; NaN for classes absent from y_true."""
    support = cm.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(support > 0, np.diag(cm) / np.maximum(support, 1), np.nan)


def balanced_accuracy(cm: np.ndarray) -> float:
    """Mean recall over the classes present in y_true."""
    recall = per_class_recall(cm)
    return float(np.nanmean(recall)) if np.any(~np.isnan(recall)) else float("nan")


def weighted_f1(cm: np.ndarray) -> float:
    """Per-class F1 averaged with weights = true support (precision 0 when nothing predicted)."""
    tp = np.diag(cm).astype(float)
    support = cm.sum(axis=1).astype(float)
    predicted = cm.sum(axis=0).astype(float)
    denom = support + predicted
    f1 = np.where(denom > 0, 2 * tp / np.maximum(denom, 1e-12), 0.0)
    return float((f1 * support).sum() / support.sum()) if support.sum() else float("nan")


def expected_calibration_error(probs: np.ndarray, y_true: Sequence[int], n_bins: int = 15) -> float:
    """ECE of the top-1 confidence: sum over equal-width bins of |accuracy - confidence| x share."""
    probs = np.asarray(probs, dtype=float)
    y_true = np.asarray(y_true, dtype=int)
    if len(y_true) == 0:
        return float("nan")
    conf = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == y_true).astype(float)
    # bins (lo, hi]; the first bin also takes confidence 0
    idx = np.clip(np.ceil(conf * n_bins).astype(int) - 1, 0, n_bins - 1)
    ece = 0.0
    for b in range(n_bins):
        sel = idx == b
        if sel.any():
            ece += sel.mean() * abs(correct[sel].mean() - conf[sel].mean())
    return float(ece)


def classification_metrics(
    y_true: Sequence[int],
    y_pred: Sequence[int],
    class_names: Sequence[str],
    probs: np.ndarray | None = None,
) -> dict[str, Any]:
    """The point estimates every eval reports, keyed by class name where per class."""
    n_classes = len(class_names)
    cm = confusion_matrix(y_true, y_pred, n_classes)
    recall = per_class_recall(cm)
    out: dict[str, Any] = {
        "accuracy": float(np.trace(cm) / max(cm.sum(), 1)),
        "balanced_accuracy": balanced_accuracy(cm),
        "weighted_f1": weighted_f1(cm),
        "per_class_recall": {
            c: (None if np.isnan(r) else float(r)) for c, r in zip(class_names, recall)
        },
        "confusion_matrix": {"labels": list(class_names), "counts": cm.tolist()},
        "n": int(cm.sum()),
    }
    if probs is not None:
        out["ece"] = expected_calibration_error(probs, y_true)
    return out


def bootstrap_ci(
    statistic: Callable[[np.ndarray], float],
    n_items: int,
    groups: Sequence[str] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``statistic(indices)``.

    With ``groups`` (e.g. specimens) whole groups are resampled, since images of one specimen are
    not independent; otherwise single items are.
    """
    rng = np.random.default_rng(seed)
    if groups is not None:
        groups = np.asarray(groups)
        members = [np.flatnonzero(groups == g) for g in np.unique(groups)]
    values = []
    for _ in range(n_boot):
        if groups is not None:
            pick = rng.integers(0, len(members), len(members))
            idx = np.concatenate([members[i] for i in pick])
        else:
            idx = rng.integers(0, n_items, n_items)
        v = statistic(idx)
        if not np.isnan(v):
            values.append(v)
    if not values:
        return float("nan"), float("nan")
    alpha = (1 - level) / 2
    lo, hi = np.quantile(values, [alpha, 1 - alpha])
    return float(lo), float(hi)


def paired_difference_ci(
    y_true: Sequence[int],
    pred_a: Sequence[int],
    pred_b: Sequence[int],
    n_classes: int,
    n_boot: int = 1000,
    seed: int = 0,
) -> tuple[float, float, float]:
    """Balanced accuracy of ``pred_b`` minus that of ``pred_a`` on the same items, and its paired
    percentile-bootstrap 95% interval: each draw resamples the items once and scores both
    predictions on them, so the interval is that of the difference, not of two separate figures."""
    y_true, pred_a, pred_b = (np.asarray(v, dtype=int) for v in (y_true, pred_a, pred_b))
    if not len(y_true) == len(pred_a) == len(pred_b):
        raise ValueError(f"paired predictions differ in length: {len(y_true)}, {len(pred_a)}, {len(pred_b)}")

    def diff(idx: np.ndarray) -> float:
        return (balanced_accuracy(confusion_matrix(y_true[idx], pred_b[idx], n_classes))
                - balanced_accuracy(confusion_matrix(y_true[idx], pred_a[idx], n_classes)))

    lo, hi = bootstrap_ci(diff, len(y_true), None, n_boot, seed)
    return diff(np.arange(len(y_true))), lo, hi


def metric_cis(
    y_true: Sequence[int],
    y_pred: Sequence[int],
    n_classes: int,
    groups: Sequence[str] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, list[float]]:
    """Bootstrap 95% intervals of accuracy, balanced accuracy and weighted F1."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)

    def stat(fn):
        return lambda idx: fn(confusion_matrix(y_true[idx], y_pred[idx], n_classes))

    return {
        "accuracy": list(
            bootstrap_ci(
                stat(lambda cm: np.trace(cm) / cm.sum()), len(y_true), groups, n_boot, seed
            )
        ),
        "balanced_accuracy": list(
            bootstrap_ci(stat(balanced_accuracy), len(y_true), groups, n_boot, seed)
        ),
        "weighted_f1": list(bootstrap_ci(stat(weighted_f1), len(y_true), groups, n_boot, seed)),
    }


def save_confusion_png(
    cm: np.ndarray, class_names: Sequence[str], path: str | Path, title: str = ""
) -> Path:
    """Row-normalised confusion matrix with counts, as a PNG."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state

    cm = np.asarray(cm)
    rows = cm.sum(axis=1, keepdims=True)
    norm = np.where(rows > 0, cm / np.maximum(rows, 1), 0.0)
    size = 1.2 + 0.6 * len(class_names)
    fig = Figure(figsize=(size + 1, size))
    ax = fig.add_subplot()
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(class_names)), class_names, rotation=45, ha="right")
    ax.set_yticks(range(len(class_names)), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(
                j,
                i,
                str(cm[i, j]),
                ha="center",
                va="center",
                color="white" if norm[i, j] > 0.5 else "black",
                fontsize=8,
            )
    fig.colorbar(im, ax=ax, fraction=0.046)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path
