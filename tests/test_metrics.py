"""allcore.evaluation.metrics: the project's conventions on top of scikit-learn (every class of the label
set counts, undefined AUCs are NaN), grouped bootstrap intervals, calibration, the report
contract and noise robustness."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from allcore.evaluation import metrics

def random_predictions(num_classes: int, seed: int, n: int = 150, never_predicted: bool = False):
    """Noisy probabilities loosely tied to the labels, rounded to 2 decimals so ties occur."""
    rng = np.random.default_rng(seed)
    y_true = rng.integers(0, num_classes, n)
    logits = rng.normal(size=(n, num_classes)) + 1.5 * np.eye(num_classes)[y_true]
    if never_predicted:
        logits[:, -1] = -50.0  # the last class is never the argmax, but still has true members
    y_prob = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return y_true, np.round(y_prob, 2)


def test_never_predicted_class_scores_zero():
    y_true, y_prob = random_predictions(4, 99, never_predicted=True)
    scores = metrics.per_class_scores(y_true, y_prob.argmax(axis=1), 4)
    assert scores["support"][-1] > 0
    assert scores["precision"][-1] == scores["recall"][-1] == scores["f1"][-1] == 0.0


def test_a_class_missing_from_the_split_keeps_its_row_and_counts_in_macro():
    # a small test split without any "Pro" image: the label set still has four classes, so the
    # report keeps a zero row for it and the macro average is over all four (not the three seen)
    y_true = np.array([0, 0, 1, 1, 2, 2])
    y_pred = np.array([0, 0, 1, 1, 2, 3])
    cm = metrics.confusion_matrix(y_true, y_pred, 4)
    assert cm.shape == (4, 4) and cm[3].sum() == 0 and cm[2, 3] == 1
    scores = metrics.per_class_scores(y_true, y_pred, 4)
    assert scores["support"].tolist() == [2, 2, 2, 0]
    assert scores["recall"].tolist() == [1.0, 1.0, 0.5, 0.0]
    averaged = metrics.averaged_scores(y_true, y_pred, 4)
    assert averaged["recall_macro"] == pytest.approx(2.5 / 4)
    assert averaged["recall_weighted"] == pytest.approx(5 / 6)  # support-weighted: Pro weighs 0
    assert metrics.macro_f1(y_true, y_pred, 4) == pytest.approx(averaged["f1_macro"])


def test_agreement_scores_on_perfect_and_single_class_predictions():
    y = np.array([0, 1, 2, 0, 1, 2])
    assert metrics.cohen_kappa(y, y, 3) == pytest.approx(1.0)
    assert metrics.matthews_corrcoef(y, y, 3) == pytest.approx(1.0)
    only_benign = np.zeros(6, dtype=int)
    assert math.isnan(metrics.cohen_kappa(only_benign, only_benign, 3))  # chance is already 1
    assert metrics.matthews_corrcoef(y, only_benign, 3) == 0.0  # undefined: 0, as in sklearn


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


def test_bootstrap_resamples_duplicate_groups_not_images():
    # every image copied 5 times: resampling copies one by one pretends there is 5x the evidence
    # (an interval ~sqrt(5) narrower); resampling the copy groups gives the original's interval
    y_true, y_prob = random_predictions(4, 7, n=200)
    y_pred = y_prob.argmax(axis=1)
    original = metrics.bootstrap_ci(metrics.accuracy, y_true, y_pred, n_boot=400, seed=2)
    copies_true, copies_pred = np.repeat(y_true, 5), np.repeat(y_pred, 5)
    groups = np.repeat([f"group-{i}" for i in range(200)], 5)
    by_image = metrics.bootstrap_ci(metrics.accuracy, copies_true, copies_pred, n_boot=400, seed=2)
    by_group = metrics.bootstrap_ci(metrics.accuracy, copies_true, copies_pred, groups=groups,
                                    n_boot=400, seed=2)
    width = lambda ci: ci[1] - ci[0]
    assert width(by_group) == pytest.approx(width(original), rel=0.25)
    assert width(by_image) < 0.6 * width(by_group)
    report = metrics.classification_report(copies_true, np.repeat(y_prob, 5, axis=0),
                                           ["a", "b", "c", "d"], groups=groups, n_boot=100)
    assert "200 duplicate groups" in report["ci95_method"]
    assert math.isnan(metrics.bootstrap_ci(metrics.accuracy, y_true, y_pred,
                                           groups=["one"] * 200)[0])  # nothing to resample
    with pytest.raises(ValueError, match="one id per row"):
        metrics.bootstrap_ci(metrics.accuracy, y_true, y_pred, groups=["a", "b"])


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
    assert report["accuracy"] == pytest.approx(np.mean(y_true == y_prob.argmax(1)))
    assert "600 images" in report["ci95_method"] and "seed 0" in report["ci95_method"]
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
