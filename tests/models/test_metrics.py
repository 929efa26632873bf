"""Classification metrics and the test report, against hand-computed reference numbers."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from medssl.models.metrics import (
    bootstrap_interval,
    classification_report,
    mean_metrics,
    roc_auc,
    target_metrics,
)


def _probs(p1: list[float]) -> np.ndarray:
    p1 = np.asarray(p1)
    return np.stack([1 - p1, p1], 1)


def test_binary_auc_and_accuracies_by_hand() -> None:
    # Pairs (neg, pos): (0.1,0.35) (0.1,0.8) (0.4,0.35) (0.4,0.8) -> 3 of 4 ordered: AUC 0.75.
    labels = np.array([0, 0, 1, 1, -1])
    probs = _probs([0.1, 0.4, 0.35, 0.8, 0.99])  # the -1 row is ignored
    m = target_metrics(labels, probs)
    assert m["auc"] == pytest.approx(0.75) and m["n"] == 4
    # Predictions 0, 0, 0, 1: accuracy 3/4; recall class 0 = 1, class 1 = 1/2 -> 0.75.
    assert m["acc"] == pytest.approx(0.75) and m["bacc"] == pytest.approx(0.75)
    imbalanced = target_metrics(np.array([0, 0, 0, 1]), _probs([0.1, 0.2, 0.3, 0.4]))
    assert imbalanced["acc"] == pytest.approx(0.75) and imbalanced["bacc"] == pytest.approx(0.5)


def test_multiclass_auc_is_one_vs_rest_macro() -> None:
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1, 2], 5)
    probs = rng.dirichlet(np.ones(3), size=15)
    assert roc_auc(labels, probs) == pytest.approx(
        roc_auc_score(labels, probs, multi_class="ovr", average="macro"))
    # Class 2 absent (a small fold): the mean of the present classes' one-vs-rest AUCs.
    sub = labels < 2
    expected = np.mean([roc_auc_score(labels[sub] == c, probs[sub, c]) for c in (0, 1)])
    assert roc_auc(labels[sub], probs[sub]) == pytest.approx(expected)


def test_undefined_metrics_are_nan_and_skipped_in_the_mean() -> None:
    assert math.isnan(roc_auc(np.array([1, 1, 1]), _probs([0.2, 0.5, 0.9])))
    empty = target_metrics(np.array([-1, -1]), _probs([0.2, 0.5]))
    assert empty["n"] == 0 and all(math.isnan(empty[k]) for k in ("auc", "acc", "bacc"))
    mean = mean_metrics({"a": {"auc": 0.8, "acc": 0.5, "bacc": 0.6},
                         "b": {"auc": float("nan"), "acc": 1.0, "bacc": 1.0}})
    assert mean == pytest.approx({"auc": 0.8, "acc": 0.75, "bacc": 0.8})


def test_bootstrap_interval() -> None:
    perfect = bootstrap_interval(np.array([0] * 10 + [1] * 10),
                                 _probs([0.1] * 10 + [0.9] * 10), n_resamples=200)
    assert perfect == (1.0, 1.0)
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 300)
    scores = np.clip(0.5 + 0.25 * (labels - 0.5) + rng.normal(0, 0.25, 300), 0, 1)
    point = roc_auc(labels, _probs(scores))
    low, high = bootstrap_interval(labels, _probs(scores), n_resamples=500, seed=3)
    assert low < point < high
    # The normal approximation of the AUC's standard error (Hanley & McNeil 1982) gives the
    # interval's width independently: within 25% of it.
    n1, n0 = labels.sum(), (1 - labels).sum()
    q1, q2 = point / (2 - point), 2 * point**2 / (1 + point)
    se = math.sqrt((point * (1 - point) + (n1 - 1) * (q1 - point**2)
                    + (n0 - 1) * (q2 - point**2)) / (n1 * n0))
    assert high - low == pytest.approx(2 * 1.96 * se, rel=0.25)
    assert bootstrap_interval(labels, _probs(scores), n_resamples=500, seed=3) == (low, high)


def test_report_files(tmp_path) -> None:
    classes = {"sex": ["F", "M"], "grade": ["0", "1", "2"]}
    labels = {"sex": np.array([0, 1, 1, -1]), "grade": np.array([0, 1, 2, 2])}
    probs = {"sex": _probs([0.2, 0.7, 0.6, 0.5]),
             "grade": np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.2, 0.3, 0.5],
                                [0.5, 0.3, 0.2]])}
    report, figures = classification_report(tmp_path, ["a", "b", "c", "d"], labels, probs,
                                            classes, n_resamples=50, extra={"note": 1})
    table = pd.read_csv(tmp_path / "predictions.csv", dtype=str, keep_default_na=False)
    assert list(table.columns) == ["PatientID", "sex", "sex_prob_F", "sex_prob_M", "sex_pred",
                                   "grade", "grade_prob_0", "grade_prob_1", "grade_prob_2",
                                   "grade_pred"]
    assert table["sex"].tolist() == ["F", "M", "M", ""]
    assert table["grade_pred"].tolist() == ["0", "1", "2", "0"]
    assert table["sex_prob_M"].astype(float).tolist() == pytest.approx([0.2, 0.7, 0.6, 0.5])
    assert table["sex_pred"].tolist() == ["F", "M", "M", "F"]  # a 0.5 tie goes to the first
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert written["targets"]["sex"]["auc"] == 1.0 and written["targets"]["sex"]["n"] == 3
    assert written["targets"]["grade"]["acc"] == pytest.approx(0.75)
    assert written["note"] == 1 and written["n_subjects"] == 4
    assert written["mean"]["acc"] == pytest.approx((1.0 + 0.75) / 2)
    for name in figures:
        assert (tmp_path / f"{name}.png").stat().st_size > 1000
    assert set(figures) == {"roc_sex", "confusion_sex", "roc_grade", "confusion_grade"}
