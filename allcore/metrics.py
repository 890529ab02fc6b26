"""Classification metrics, bootstrap confidence intervals, calibration and noise robustness.

Everything is plain numpy so a report can be rebuilt anywhere from saved predictions. Definitions
follow scikit-learn (the tests check them against it) so numbers are comparable with the
published recipes, which used sklearn / Keras metrics:

- precision / recall / F-beta use ``zero_division=0``: a class never predicted has precision 0.
- Macro averages weigh every class of the label set equally, including classes absent from
  ``y_true`` (like sklearn with ``labels=range(C)``).
- One-vs-rest ROC-AUC is NaN for a class with no positives (or no negatives) in ``y_true``: the
  AUC is undefined there, and the macro ROC-AUC is the mean over the classes where it is defined.

Labels are integer class indices ``0..C-1``; ``y_prob`` is an ``n x C`` array of probabilities.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any, Callable

import numpy as np
import torch

from allcore.transforms import add_gaussian_noise

CURVE_MAX_POINTS = 200  # per curve in the report JSON: enough to plot, small enough to diff


# ----------------------------------------------------------------------------- input checks

def _labels(y: Any, num_classes: int, name: str) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim != 1 or y.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D array of class indices, "
                         f"got shape {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"{name} must hold integer class indices, got dtype {y.dtype}; "
                         "map class names through LabelSet.index first")
    if y.min() < 0 or y.max() >= num_classes:
        raise ValueError(f"{name} holds indices outside 0..{num_classes - 1} "
                         f"(min {y.min()}, max {y.max()}); check num_classes / the label set")
    return y.astype(np.int64)


def _probs(y_prob: Any, n: int) -> np.ndarray:
    y_prob = np.asarray(y_prob, dtype=np.float64)
    if y_prob.ndim != 2 or y_prob.shape[0] != n or y_prob.shape[1] < 2:
        raise ValueError(f"y_prob must be an n x C array (n={n}, C>=2) of class probabilities, "
                         f"got shape {y_prob.shape}")
    return y_prob


def _binary(y_true: Any, y_score: Any) -> tuple[np.ndarray, np.ndarray]:
    y_true = np.asarray(y_true).astype(bool)
    y_score = np.asarray(y_score, dtype=np.float64)
    if y_true.ndim != 1 or y_true.shape != y_score.shape:
        raise ValueError(f"y_true and y_score must be 1-D of equal length, got {y_true.shape} "
                         f"and {y_score.shape}")
    return y_true, y_score


def _safe_divide(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den with 0 where den == 0 (sklearn's zero_division=0)."""
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    return np.divide(num, den, out=np.zeros(np.broadcast(num, den).shape), where=den != 0)


# ----------------------------------------------------------------------------- label metrics

def confusion_matrix(y_true: Any, y_pred: Any, num_classes: int) -> np.ndarray:
    """C x C counts; rows are true classes, columns predicted (sklearn's orientation)."""
    y_true = _labels(y_true, num_classes, "y_true")
    y_pred = _labels(y_pred, num_classes, "y_pred")
    if y_true.shape != y_pred.shape:
        raise ValueError(f"y_true and y_pred differ in length: {y_true.size} vs {y_pred.size}")
    return np.bincount(y_true * num_classes + y_pred,
                       minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def accuracy(y_true: Any, y_pred: Any) -> float:
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    if y_true.shape != y_pred.shape or y_true.size == 0:
        raise ValueError(f"y_true and y_pred must be non-empty and equal in shape, got "
                         f"{y_true.shape} and {y_pred.shape}")
    return float(np.mean(y_true == y_pred))


def _fbeta(tp: np.ndarray, predicted: np.ndarray, support: np.ndarray, beta: float) -> np.ndarray:
    # (1+b^2) tp / ((1+b^2) tp + b^2 fn + fp), and b^2 (tp+fn) + (tp+fp) is the same denominator.
    b2 = beta * beta
    return _safe_divide((1 + b2) * tp, b2 * support + predicted)


def per_class_scores(y_true: Any, y_pred: Any, num_classes: int) -> dict[str, np.ndarray]:
    """Arrays of length C: precision, recall, f1, f2 and support (true count) per class."""
    cm = confusion_matrix(y_true, y_pred, num_classes)
    tp, predicted, support = np.diag(cm), cm.sum(axis=0), cm.sum(axis=1)
    return {
        "precision": _safe_divide(tp, predicted),
        "recall": _safe_divide(tp, support),
        "f1": _fbeta(tp, predicted, support, 1.0),
        "f2": _fbeta(tp, predicted, support, 2.0),
        "support": support,
    }


def averaged_scores(y_true: Any, y_pred: Any, num_classes: int) -> dict[str, float]:
    """``{precision,recall,f1,f2}_{macro,weighted}``: macro weighs classes equally (what matters
    for rare ALL subtypes), weighted by support (what the published papers mostly report)."""
    scores = per_class_scores(y_true, y_pred, num_classes)
    weights = scores["support"] / scores["support"].sum()
    out = {}
    for name in ("precision", "recall", "f1", "f2"):
        out[f"{name}_macro"] = float(scores[name].mean())
        out[f"{name}_weighted"] = float(scores[name] @ weights)
    return out


def macro_f1(y_true: Any, y_pred: Any, num_classes: int) -> float:
    return float(per_class_scores(y_true, y_pred, num_classes)["f1"].mean())


def cohen_kappa(y_true: Any, y_pred: Any, num_classes: int) -> float:
    """Agreement beyond chance; NaN when chance agreement is already perfect (one class only)."""
    cm = confusion_matrix(y_true, y_pred, num_classes).astype(np.float64)
    n = cm.sum()
    observed = np.trace(cm) / n
    expected = float(cm.sum(axis=1) @ cm.sum(axis=0)) / (n * n)
    return float("nan") if expected == 1.0 else float((observed - expected) / (1.0 - expected))


def matthews_corrcoef(y_true: Any, y_pred: Any, num_classes: int) -> float:
    """Multiclass MCC (Gorodkin's R_K); 0 when undefined, as in sklearn."""
    cm = confusion_matrix(y_true, y_pred, num_classes).astype(np.float64)
    n, correct = cm.sum(), np.trace(cm)
    true_counts, pred_counts = cm.sum(axis=1), cm.sum(axis=0)
    cov_yp = correct * n - true_counts @ pred_counts
    cov_pp = n * n - pred_counts @ pred_counts
    cov_yy = n * n - true_counts @ true_counts
    denom = math.sqrt(cov_pp * cov_yy)
    return 0.0 if denom == 0 else float(cov_yp / denom)


# ----------------------------------------------------------------------------- score metrics

def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks with ties sharing their mean rank (what makes rank AUC count a tie as 1/2)."""
    order = np.argsort(values, kind="mergesort")
    sorted_values = values[order]
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_values)) + 1]
    ends = np.r_[starts[1:], values.size]
    mean_rank = (starts + ends + 1) / 2.0
    ranks = np.empty(values.size)
    ranks[order] = np.repeat(mean_rank, ends - starts)
    return ranks


def binary_roc_auc(y_true: Any, y_score: Any) -> float:
    """Mann-Whitney AUC: P(score of a positive > score of a negative), ties counting 1/2.
    Equals the trapezoidal area under sklearn's ROC curve. NaN if either class is absent."""
    y_true, y_score = _binary(y_true, y_score)
    n_pos = int(y_true.sum())
    n_neg = y_true.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    rank_sum = _average_ranks(y_score)[y_true].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def roc_auc_per_class(y_true: Any, y_prob: Any) -> np.ndarray:
    """One-vs-rest ROC-AUC per class; NaN for a class without positives in y_true."""
    y_prob = _probs(y_prob, np.asarray(y_true).size)
    y_true = _labels(y_true, y_prob.shape[1], "y_true")
    return np.array([binary_roc_auc(y_true == k, y_prob[:, k]) for k in range(y_prob.shape[1])])


def roc_auc_macro(y_true: Any, y_prob: Any) -> float:
    """Mean one-vs-rest AUC over the classes where it is defined (NaN if none is)."""
    aucs = roc_auc_per_class(y_true, y_prob)
    return float("nan") if np.isnan(aucs).all() else float(np.nanmean(aucs))


def _binary_clf_curve(y_true: np.ndarray, y_score: np.ndarray
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cumulative false/true positive counts at each distinct threshold, highest first."""
    order = np.argsort(y_score, kind="mergesort")[::-1]
    y_score, y_true = y_score[order], y_true[order]
    last_of_each_value = np.r_[np.flatnonzero(np.diff(y_score)), y_true.size - 1]
    tps = np.cumsum(y_true)[last_of_each_value].astype(np.float64)
    fps = 1.0 + last_of_each_value - tps
    return fps, tps, y_score[last_of_each_value]


def roc_curve(y_true: Any, y_score: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds) like ``sklearn.metrics.roc_curve`` (drop_intermediate=True):
    collinear points are dropped, and the curve starts at (0, 0) with threshold +inf."""
    y_true, y_score = _binary(y_true, y_score)
    if y_true.all() or not y_true.any():
        raise ValueError("roc_curve needs both positives and negatives in y_true; "
                         "skip classes absent from the evaluation set")
    fps, tps, thresholds = _binary_clf_curve(y_true, y_score)
    if fps.size > 2:
        corners = np.flatnonzero(np.r_[True, (np.diff(fps, 2) != 0) | (np.diff(tps, 2) != 0), True])
        fps, tps, thresholds = fps[corners], tps[corners], thresholds[corners]
    fpr, tpr = np.r_[0.0, fps] / fps[-1], np.r_[0.0, tps] / tps[-1]
    return fpr, tpr, np.r_[np.inf, thresholds]


def precision_recall_curve(y_true: Any, y_score: Any
                           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(precision, recall, thresholds) like ``sklearn.metrics.precision_recall_curve``: ordered
    by increasing threshold, ending at the point (recall 0, precision 1)."""
    y_true, y_score = _binary(y_true, y_score)
    if not y_true.any():
        raise ValueError("precision_recall_curve needs at least one positive in y_true; "
                         "skip classes absent from the evaluation set")
    fps, tps, thresholds = _binary_clf_curve(y_true, y_score)
    precision, recall = _safe_divide(tps, tps + fps), tps / tps[-1]
    return np.r_[precision[::-1], 1.0], np.r_[recall[::-1], 0.0], thresholds[::-1]


def average_precision(y_true: Any, y_score: Any) -> float:
    """Step-wise area under the PR curve (sklearn's average_precision_score, no interpolation)."""
    precision, recall, _ = precision_recall_curve(y_true, y_score)
    return float(-np.sum(np.diff(recall) * precision[:-1]))


# ----------------------------------------------------------------------------- calibration

def calibration_bins(y_true: Any, y_prob: Any, n_bins: int = 15) -> dict[str, np.ndarray]:
    """Top-label reliability data over equal-width confidence bins ``(lo, hi]``: per bin the
    count, mean confidence and accuracy (NaN for empty bins), plus the bin edges."""
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    y_prob = _probs(y_prob, np.asarray(y_true).size)
    y_true = _labels(y_true, y_prob.shape[1], "y_true")
    confidence = y_prob.max(axis=1)
    correct = (y_prob.argmax(axis=1) == y_true).astype(np.float64)
    bin_index = np.clip(np.ceil(confidence * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    count = np.bincount(bin_index, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_confidence = np.bincount(bin_index, confidence, n_bins) / count
        bin_accuracy = np.bincount(bin_index, correct, n_bins) / count
    return {"edges": np.linspace(0.0, 1.0, n_bins + 1), "count": count,
            "confidence": mean_confidence, "accuracy": bin_accuracy}


def expected_calibration_error(y_true: Any, y_prob: Any, n_bins: int = 15) -> float:
    """Top-label ECE: support-weighted mean |accuracy - confidence| over equal-width bins."""
    bins = calibration_bins(y_true, y_prob, n_bins)
    filled = bins["count"] > 0
    gap = np.abs(bins["accuracy"][filled] - bins["confidence"][filled])
    return float(gap @ bins["count"][filled] / bins["count"].sum())


# ----------------------------------------------------------------------------- uncertainty

def bootstrap_ci(metric_fn: Callable[[np.ndarray, np.ndarray], float], y_true: Any,
                 y_pred_or_prob: Any, n_boot: int = 1000, alpha: float = 0.05, seed: int = 0
                 ) -> tuple[float, float]:
    """Percentile bootstrap (1 - alpha) interval of ``metric_fn(y_true, y_pred_or_prob)``,
    resampling evaluation images with replacement. Test sets here hold a few hundred images,
    so a single accuracy hides an interval of several points; report it. Resamples where the
    metric is undefined (NaN) are left out."""
    if n_boot < 1 or not 0.0 < alpha < 1.0:
        raise ValueError(f"need n_boot >= 1 and 0 < alpha < 1, got n_boot={n_boot}, alpha={alpha}")
    y_true, y_other = np.asarray(y_true), np.asarray(y_pred_or_prob)
    if y_true.size == 0 or y_other.shape[0] != y_true.shape[0]:
        raise ValueError(f"y_true and y_pred_or_prob must be non-empty with the same number of "
                         f"rows, got {y_true.shape} and {y_other.shape}")
    rng = np.random.default_rng(seed)
    stats = np.empty(n_boot)
    for b in range(n_boot):
        idx = rng.integers(0, y_true.size, y_true.size)
        stats[b] = metric_fn(y_true[idx], y_other[idx])
    stats = stats[~np.isnan(stats)]
    if stats.size == 0:
        return float("nan"), float("nan")
    low, high = np.percentile(stats, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(low), float(high)


# ----------------------------------------------------------------------------- report bundle

def _downsample(*arrays: np.ndarray, max_points: int = CURVE_MAX_POINTS) -> list[list[float]]:
    """Evenly spaced points of equal-length curve arrays, always keeping both ends."""
    keep = np.unique(np.linspace(0, arrays[0].size - 1, min(max_points, arrays[0].size)).round()
                     ).astype(np.int64)
    return [a[keep].tolist() for a in arrays]


def to_jsonable(value: Any) -> Any:
    """numpy scalars/arrays to Python floats/ints/lists, NaN/inf to None (JSON has no NaN)."""
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    return value


def classification_report(y_true: Any, y_prob: Any, class_names: list[str] | tuple[str, ...], *,
                          n_boot: int = 1000, seed: int = 0) -> dict:
    """Everything the HTML report and metrics.json need, as JSON-ready data (NaN -> None).
    Predictions are the argmax of ``y_prob``; CIs are 95% percentile bootstraps."""
    class_names = [str(c) for c in class_names]
    y_prob = _probs(y_prob, np.asarray(y_true).size)
    if y_prob.shape[1] != len(class_names):
        raise ValueError(f"y_prob has {y_prob.shape[1]} columns but {len(class_names)} class names "
                         "were given; pass the class list stored with the model")
    num_classes = len(class_names)
    y_true = _labels(y_true, num_classes, "y_true")
    y_pred = y_prob.argmax(axis=1)

    per_class = per_class_scores(y_true, y_pred, num_classes)
    aucs = roc_auc_per_class(y_true, y_prob)
    curves: dict[str, dict] = {"roc": {}, "pr": {}}
    for k, name in enumerate(class_names):
        positives = y_true == k
        if positives.any():
            precision, recall, _ = precision_recall_curve(positives, y_prob[:, k])
            curves["pr"][name] = dict(zip(("precision", "recall"), _downsample(precision, recall)))
        if positives.any() and not positives.all():
            fpr, tpr, _ = roc_curve(positives, y_prob[:, k])
            curves["roc"][name] = dict(zip(("fpr", "tpr"), _downsample(fpr, tpr)))

    report = {
        "n": int(y_true.size),
        "class_names": class_names,
        "accuracy": accuracy(y_true, y_pred),
        "accuracy_ci95": bootstrap_ci(accuracy, y_true, y_pred, n_boot=n_boot, seed=seed),
        **averaged_scores(y_true, y_pred, num_classes),
        "macro_f1_ci95": bootstrap_ci(partial(macro_f1, num_classes=num_classes), y_true, y_pred,
                                      n_boot=n_boot, seed=seed),
        "per_class": {name: {**{key: values[k] for key, values in per_class.items()},
                             "roc_auc": aucs[k]}
                      for k, name in enumerate(class_names)},
        "cohen_kappa": cohen_kappa(y_true, y_pred, num_classes),
        "mcc": matthews_corrcoef(y_true, y_pred, num_classes),
        "roc_auc_macro": roc_auc_macro(y_true, y_prob),
        "ece": expected_calibration_error(y_true, y_prob),
        "calibration": calibration_bins(y_true, y_prob),
        "confusion_matrix": confusion_matrix(y_true, y_pred, num_classes),
        "curves": curves,
    }
    return to_jsonable(report)


# ----------------------------------------------------------------------------- robustness

def noise_robustness_table(predict_fn: Callable[[torch.Tensor], Any], images: torch.Tensor,
                           labels: Any, sigmas: tuple[float, ...] = (0, 2, 5, 8, 10), seed: int = 0,
                           batch_size: int = 64) -> list[dict]:
    """Metrics under additive Gaussian pixel noise (recipe s004's robustness study).

    ``images`` are UNNORMALISED [0, 1] tensors N x C x H x W (noise is defined in 0-255 pixel
    units on raw pixels); ``predict_fn`` normalises and returns N x K probabilities. Every sigma
    uses the same seeded generator, so rows differ only by the noise level.
    """
    if images.ndim != 4 or images.shape[0] == 0:
        raise ValueError(f"images must be a non-empty N x C x H x W tensor, "
                         f"got {tuple(images.shape)}")
    labels = np.asarray(labels)
    if labels.shape != (images.shape[0],):
        raise ValueError(f"labels must have one entry per image: {labels.shape} "
                         f"vs {images.shape[0]} images")
    rows = []
    for sigma in sigmas:
        generator = torch.Generator().manual_seed(seed)
        probs = []
        for start in range(0, images.shape[0], batch_size):
            noisy = add_gaussian_noise(images[start:start + batch_size], float(sigma), generator)
            out = predict_fn(noisy)
            if isinstance(out, torch.Tensor):
                out = out.detach().cpu().numpy()
            probs.append(np.asarray(out))
        y_prob = np.concatenate(probs).astype(np.float64)
        y_true = _labels(labels, y_prob.shape[1], "labels")
        averaged = averaged_scores(y_true, y_prob.argmax(axis=1), y_prob.shape[1])
        rows.append(to_jsonable({
            "sigma": float(sigma),
            "accuracy": accuracy(y_true, y_prob.argmax(axis=1)),
            "precision_macro": averaged["precision_macro"],
            "recall_macro": averaged["recall_macro"],
            "f1_macro": averaged["f1_macro"],
            "roc_auc_macro": roc_auc_macro(y_true, y_prob),
        }))
    return rows
