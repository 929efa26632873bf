"""Classification metrics and the test report: per-target ROC AUC, accuracy and balanced
accuracy (scikit-learn), bootstrap intervals, ``predictions.csv``, ``metrics.json`` and the
ROC-curve and confusion-matrix figures.

Labels are category indices with -1 for "no value" (a row without this target); such rows
are left out of that target's metrics.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from sklearn.metrics import (
    ConfusionMatrixDisplay,
    RocCurveDisplay,
    accuracy_score,
    balanced_accuracy_score,
    roc_auc_score,
)

from medssl.errors import InputError

__all__ = ["METRICS", "bootstrap_interval", "classification_report", "confusion_figure",
           "mean_metrics", "roc_auc", "roc_figure", "target_metrics"]

METRICS = ("auc", "acc", "bacc")
NAN = float("nan")


def _labelled(labels: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    keep = labels >= 0
    return labels[keep], probs[keep]


def roc_auc(labels: np.ndarray, probs: np.ndarray) -> float:
    """ROC AUC of class probabilities; NaN when fewer than two classes are present.

    Two classes: the AUC of ``probs[:, 1]``. More: one-vs-rest macro average (sklearn's
    ``multi_class="ovr"``), taken over the classes present in ``labels``, since a class
    without rows has no ROC curve (a small validation fold may lack one).

    Args:
        labels: (N,) category indices (rows with -1 are ignored).
        probs: (N, C) class probabilities.
    """
    labels, probs = _labelled(np.asarray(labels), np.asarray(probs))
    present = np.unique(labels)
    if len(present) < 2:
        return NAN
    if probs.shape[1] == 2:
        return float(roc_auc_score(labels, probs[:, 1]))
    return float(np.mean([roc_auc_score(labels == c, probs[:, c]) for c in present]))


def target_metrics(labels: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """AUC (``roc_auc``), accuracy and balanced accuracy of the arg-max prediction.

    Args:
        labels: (N,) category indices, -1 for rows without this target.
        probs: (N, C) class probabilities.

    Returns:
        ``{"auc", "acc", "bacc", "n"}``; NaN metrics when no row is labelled.
    """
    labels, probs = _labelled(np.asarray(labels), np.asarray(probs))
    if not len(labels):
        return {"auc": NAN, "acc": NAN, "bacc": NAN, "n": 0}
    pred = probs.argmax(1)
    return {"auc": roc_auc(labels, probs), "acc": float(accuracy_score(labels, pred)),
            "bacc": float(balanced_accuracy_score(labels, pred)), "n": len(labels)}


def mean_metrics(per_target: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """Each metric averaged over the targets where it is defined (NaN where none is)."""
    out = {}
    for name in METRICS:
        values = [m[name] for m in per_target.values() if not math.isnan(m[name])]
        out[name] = float(np.mean(values)) if values else NAN
    return out


def bootstrap_interval(labels: np.ndarray, probs: np.ndarray, n_resamples: int = 1000,
                       level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of ``roc_auc`` over rows drawn with replacement.

    Resamples that hold a single class (no AUC) are skipped; with fewer than two classes
    overall the interval is NaN.

    Args:
        labels: (N,) category indices (-1 rows ignored).
        probs: (N, C) class probabilities.
        n_resamples: bootstrap resamples (1000 is customary; more for 3-digit stability).
        level: coverage of the interval.
        seed: random seed, so the interval is reproducible.
    """
    if not 0 < level < 1:
        raise InputError(f"level must be in (0, 1), got {level}")
    labels, probs = _labelled(np.asarray(labels), np.asarray(probs))
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(n_resamples):
        pick = rng.integers(0, len(labels), len(labels))
        value = roc_auc(labels[pick], probs[pick])
        if not math.isnan(value):
            values.append(value)
    if not values:
        return NAN, NAN
    low, high = np.quantile(values, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


def roc_figure(labels: np.ndarray, probs: np.ndarray, classes: Sequence[str],
               title: str) -> Figure:
    """ROC curve (binary: of ``classes[1]``; multi-class: one-vs-rest per present class)."""
    labels, probs = _labelled(np.asarray(labels), np.asarray(probs))
    fig = Figure(figsize=(4.5, 4.5), layout="constrained")
    ax = fig.subplots()
    shown = [1] if len(classes) == 2 else range(len(classes))
    for c in shown:
        if 0 < (labels == c).sum() < len(labels):
            RocCurveDisplay.from_predictions(labels == c, probs[:, c], name=str(classes[c]),
                                             ax=ax)
    ax.plot([0, 1], [0, 1], linestyle=":", color="grey")
    ax.set_title(title)
    return fig


def confusion_figure(labels: np.ndarray, probs: np.ndarray, classes: Sequence[str],
                     title: str) -> Figure:
    """Confusion matrix of the arg-max prediction (rows: true class)."""
    labels, probs = _labelled(np.asarray(labels), np.asarray(probs))
    fig = Figure(figsize=(4.5, 4.5), layout="constrained")
    ax = fig.subplots()
    ConfusionMatrixDisplay.from_predictions(
        labels, probs.argmax(1), labels=list(range(len(classes))),
        display_labels=[str(c) for c in classes], ax=ax, colorbar=False,
        xticks_rotation="vertical")
    ax.set_title(title)
    return fig


def classification_report(out_dir: str | Path, ids: Sequence[str],
                          labels: Mapping[str, np.ndarray], probs: Mapping[str, np.ndarray],
                          classes: Mapping[str, Sequence[str]], n_resamples: int = 1000,
                          seed: int = 0, extra: Mapping | None = None,
                          rows: Sequence[str] | None = None,
                          ) -> tuple[dict, dict[str, Figure]]:
    """Write ``predictions.csv``, ``metrics.json`` and the figures (PNG) into ``out_dir``.

    ``predictions.csv`` has one row per test row: ``PatientID``, ``row`` (where it is in the
    CSV, when given: one patient may have several rows, e.g. two knees), then per target
    ``<target>`` (the true category, empty when the row has none), ``<target>_prob_<class>``
    for every class in encoding order, and ``<target>_pred``.

    Args:
        out_dir: output folder (created).
        ids: (N,) PatientID per row.
        labels: target -> (N,) category indices, -1 where the row has no value.
        probs: target -> (N, C) class probabilities.
        classes: target -> category names in encoding order.
        n_resamples, seed: bootstrap settings of the AUC intervals.
        extra: more entries for ``metrics.json`` (e.g. the label fraction).
        rows: (N,) the CSV row of each prediction (file and line), written after PatientID.

    Returns:
        (metrics as written to metrics.json, figures by name).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    table: dict[str, object] = {"PatientID": list(ids)}
    if rows is not None:
        table["row"] = list(rows)
    per_target, figures = {}, {}
    for target, names in classes.items():
        y, p = np.asarray(labels[target]), np.asarray(probs[target])
        table[target] = [names[v] if v >= 0 else "" for v in y]
        for c, name in enumerate(names):
            table[f"{target}_prob_{name}"] = p[:, c]
        table[f"{target}_pred"] = [names[v] for v in p.argmax(1)]
        metrics = target_metrics(y, p)
        metrics["auc_ci95"] = list(bootstrap_interval(y, p, n_resamples, seed=seed))
        metrics["classes"] = list(names)
        per_target[target] = metrics
        figures[f"roc_{target}"] = roc_figure(y, p, names, f"{target}: ROC")
        figures[f"confusion_{target}"] = confusion_figure(y, p, names, f"{target}: confusion")
    pd.DataFrame(table).to_csv(out_dir / "predictions.csv", index=False)
    report = {"mean": mean_metrics(per_target), "targets": per_target, "n_subjects": len(ids),
              **dict(extra or {})}
    # NaN is not JSON: an undefined metric is written as null.
    (out_dir / "metrics.json").write_text(json.dumps(_nan_to_none(report), indent=1))
    for name, fig in figures.items():
        fig.savefig(out_dir / f"{name}.png", dpi=100)
    return report, figures


def _nan_to_none(obj: object) -> object:
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, Mapping):
        return {k: _nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_nan_to_none(v) for v in obj]
    return obj
