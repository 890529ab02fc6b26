"""allcore.metrics against scikit-learn on random predictions, plus calibration, bootstrap and
noise-robustness behaviour."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from sklearn import metrics as skm

from allcore import metrics

CASES = [(num_classes, seed) for num_classes in (2, 4) for seed in range(4)]


def random_predictions(num_classes: int, seed: int, n: int = 150, never_predicted: bool = False):
    """Noisy probabilities loosely tied to the labels, rounded to 2 decimals so ties occur."""
    rng = np.random.default_rng(seed)
    y_true = rng.integers(0, num_classes, n)
    logits = rng.normal(size=(n, num_classes)) + 1.5 * np.eye(num_classes)[y_true]
    if never_predicted:
        logits[:, -1] = -50.0  # the last class is never the argmax, but still has true members
    y_prob = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return y_true, np.round(y_prob, 2)


@pytest.fixture(params=[*CASES, (4, 99, "never_predicted")], ids=str)
def case(request):
    num_classes, seed, *edge = request.param
    y_true, y_prob = random_predictions(num_classes, seed, never_predicted=bool(edge))
    return num_classes, y_true, y_prob, y_prob.argmax(axis=1)


def test_label_metrics_match_sklearn(case):
    num_classes, y_true, _, y_pred = case
    labels = list(range(num_classes))
    np.testing.assert_array_equal(metrics.confusion_matrix(y_true, y_pred, num_classes),
                                  skm.confusion_matrix(y_true, y_pred, labels=labels))
    assert metrics.accuracy(y_true, y_pred) == pytest.approx(skm.accuracy_score(y_true, y_pred))

    scores = metrics.per_class_scores(y_true, y_pred, num_classes)
    precision, recall, f1, support = skm.precision_recall_fscore_support(
        y_true, y_pred, labels=labels, zero_division=0)
    f2 = skm.fbeta_score(y_true, y_pred, beta=2, labels=labels, average=None, zero_division=0)
    for ours, theirs in [("precision", precision), ("recall", recall), ("f1", f1), ("f2", f2),
                         ("support", support)]:
        np.testing.assert_allclose(scores[ours], theirs, err_msg=ours)

    averaged = metrics.averaged_scores(y_true, y_pred, num_classes)
    for average in ("macro", "weighted"):
        p, r, f, _ = skm.precision_recall_fscore_support(y_true, y_pred, labels=labels,
                                                         average=average, zero_division=0)
        f2_avg = skm.fbeta_score(y_true, y_pred, beta=2, labels=labels, average=average,
                                 zero_division=0)
        for name, expected in [("precision", p), ("recall", r), ("f1", f), ("f2", f2_avg)]:
            assert averaged[f"{name}_{average}"] == pytest.approx(expected), (name, average)
    assert metrics.macro_f1(y_true, y_pred, num_classes) == pytest.approx(averaged["f1_macro"])

    assert metrics.cohen_kappa(y_true, y_pred, num_classes) == pytest.approx(
        skm.cohen_kappa_score(y_true, y_pred, labels=labels))
    assert metrics.matthews_corrcoef(y_true, y_pred, num_classes) == pytest.approx(
        skm.matthews_corrcoef(y_true, y_pred))


def test_never_predicted_class_scores_zero():
    y_true, y_prob = random_predictions(4, 99, never_predicted=True)
    scores = metrics.per_class_scores(y_true, y_prob.argmax(axis=1), 4)
    assert scores["support"][-1] > 0
    assert scores["precision"][-1] == scores["recall"][-1] == scores["f1"][-1] == 0.0


def test_score_metrics_match_sklearn(case):
    num_classes, y_true, y_prob, _ = case
    aucs = metrics.roc_auc_per_class(y_true, y_prob)
    for k in range(num_classes):
        positives = y_true == k
        assert aucs[k] == pytest.approx(skm.roc_auc_score(positives, y_prob[:, k]))

        fpr, tpr, thresholds = metrics.roc_curve(positives, y_prob[:, k])
        sk_fpr, sk_tpr, sk_thresholds = skm.roc_curve(positives, y_prob[:, k])
        np.testing.assert_allclose(fpr, sk_fpr)
        np.testing.assert_allclose(tpr, sk_tpr)
        np.testing.assert_allclose(thresholds[1:], sk_thresholds[1:])
        assert skm.auc(fpr, tpr) == pytest.approx(aucs[k])

        precision, recall, pr_thresholds = metrics.precision_recall_curve(positives, y_prob[:, k])
        sk_precision, sk_recall, sk_pr_thresholds = skm.precision_recall_curve(positives,
                                                                               y_prob[:, k])
        np.testing.assert_allclose(precision, sk_precision)
        np.testing.assert_allclose(recall, sk_recall)
        np.testing.assert_allclose(pr_thresholds, sk_pr_thresholds)
        assert metrics.average_precision(positives, y_prob[:, k]) == pytest.approx(
            skm.average_precision_score(positives, y_prob[:, k]))

    normalised = y_prob / y_prob.sum(axis=1, keepdims=True)  # sklearn's ovr insists on sum 1
    if num_classes > 2:
        expected_macro = skm.roc_auc_score(y_true, normalised, multi_class="ovr", average="macro")
    else:
        expected_macro = skm.roc_auc_score(y_true, normalised[:, 1])
    assert metrics.roc_auc_macro(y_true, normalised) == pytest.approx(expected_macro)


def test_class_without_positives_has_nan_auc_and_is_left_out_of_macro():
    y_true, y_prob = random_predictions(4, 3)
    y_true[y_true == 2] = 0
    aucs = metrics.roc_auc_per_class(y_true, y_prob)
    assert math.isnan(aucs[2]) and not np.isnan(np.delete(aucs, 2)).any()
    assert metrics.roc_auc_macro(y_true, y_prob) == pytest.approx(np.delete(aucs, 2).mean())


def test_ece_is_near_zero_when_calibrated_and_large_when_overconfident():
    rng = np.random.default_rng(0)
    n = 20_000
    confidence = rng.uniform(0.5, 1.0, n)
    correct = rng.uniform(size=n) < confidence  # right exactly as often as it claims
    y_true = np.where(correct, 0, 1)
    y_prob = np.stack([confidence, 1 - confidence], axis=1)
    assert metrics.expected_calibration_error(y_true, y_prob) < 0.02

    overconfident = np.stack([np.full(n, 0.99), np.full(n, 0.01)], axis=1)
    y_true_coin = rng.integers(0, 2, n)  # only half right while claiming 99%
    assert metrics.expected_calibration_error(y_true_coin, overconfident) == pytest.approx(
        0.49, abs=0.02)


def test_bootstrap_ci_contains_estimate_and_narrows_with_more_data():
    widths = []
    for n in (100, 2000):
        y_true, y_prob = random_predictions(4, 5, n=n)
        y_pred = y_prob.argmax(axis=1)
        low, high = metrics.bootstrap_ci(metrics.accuracy, y_true, y_pred, n_boot=300, seed=1)
        assert low <= metrics.accuracy(y_true, y_pred) <= high
        widths.append(high - low)
    assert widths[1] < widths[0] / 2  # ~1/sqrt(n): 20x the data, ~4.5x narrower
    assert metrics.bootstrap_ci(metrics.accuracy, y_true, y_pred, n_boot=50, seed=3) == \
        metrics.bootstrap_ci(metrics.accuracy, y_true, y_pred, n_boot=50, seed=3)


def test_classification_report_is_json_ready_and_consistent():
    y_true, y_prob = random_predictions(4, 2, n=600)
    y_true[y_true == 3] = 0  # class "Pro" absent: its AUC must become null, not NaN
    names = ["Benign", "Early", "Pre", "Pro"]
    report = metrics.classification_report(y_true, y_prob, names, n_boot=100)
    text = json.dumps(report, allow_nan=False)  # fails on any NaN left behind
    assert json.loads(text)["class_names"] == names
    assert report["n"] == 600
    low, high = report["accuracy_ci95"]
    assert low <= report["accuracy"] <= high
    assert report["per_class"]["Pro"]["roc_auc"] is None
    assert report["per_class"]["Pro"]["support"] == 0
    assert sum(map(sum, report["confusion_matrix"])) == 600
    assert report["accuracy"] == pytest.approx(skm.accuracy_score(y_true, y_prob.argmax(1)))
    assert set(report["curves"]["roc"]) == {"Benign", "Early", "Pre"}
    for curve in report["curves"]["roc"].values():
        assert 2 <= len(curve["fpr"]) == len(curve["tpr"]) <= metrics.CURVE_MAX_POINTS
        assert curve["fpr"][0] == 0.0 and curve["tpr"][-1] == 1.0


def test_invalid_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="outside 0..1"):
        metrics.confusion_matrix([0, 2], [0, 1], 2)
    with pytest.raises(ValueError, match="class names"):
        metrics.classification_report([0, 1], np.eye(2), ["a", "b", "c"])
    with pytest.raises(ValueError, match="integer"):
        metrics.confusion_matrix(np.array([0.0, 1.0]), np.array([0, 1]), 2)
    with pytest.raises(ValueError, match="n x C"):
        metrics.roc_auc_per_class([0, 1, 1], np.eye(2))


def test_noise_robustness_table_degrades_with_noise():
    # Class is encoded in brightness (0.4 vs 0.6); the "model" reads one pixel, so pixel noise
    # of sigma 80/255 (~0.31) must flip a good share of predictions while sigma 0 flips none.
    labels = np.arange(64) % 2
    images = torch.full((64, 3, 8, 8), 0.4) + 0.2 * torch.tensor(labels, dtype=torch.float32
                                                                 ).view(-1, 1, 1, 1)
    clean = images.clone()

    def predict(batch: torch.Tensor) -> torch.Tensor:
        p1 = torch.sigmoid((batch[:, 0, 0, 0] - 0.5) * 40)
        return torch.stack([1 - p1, p1], dim=1)

    rows = metrics.noise_robustness_table(predict, images, labels, sigmas=(0, 80), batch_size=16)
    assert [r["sigma"] for r in rows] == [0.0, 80.0]
    assert set(rows[0]) == {"sigma", "accuracy", "precision_macro", "recall_macro", "f1_macro",
                            "roc_auc_macro"}
    assert rows[0]["accuracy"] == 1.0 and rows[0]["roc_auc_macro"] == 1.0
    assert rows[1]["accuracy"] < 0.9
    assert torch.equal(images, clean)  # the caller's images are not modified
    assert rows == metrics.noise_robustness_table(predict, images, labels, sigmas=(0, 80),
                                                  batch_size=16)
