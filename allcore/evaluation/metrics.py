"""Classification metrics, bootstrap confidence intervals, calibration and noise robustness.

The metrics are scikit-learn's, called with this project's conventions so a report can be
rebuilt anywhere from saved predictions and compared with the published recipes (which used
sklearn / Keras metrics). The thin wrappers below exist only where the project's meaning differs
from sklearn's defaults:

- Every function takes the label set's size ``num_classes`` and scores all classes ``0..C-1``
  (sklearn's ``labels=range(C)``), so a class absent from a small test split still appears,
  with zero counts, instead of silently shrinking the macro average.
- precision / recall / F-beta use ``zero_division=0``: a class never predicted has precision 0.
- One-vs-rest ROC-AUC is NaN (sklearn raises) for a class with no positives or no negatives in
  ``y_true``; the macro ROC-AUC is the mean over the classes where it is defined.
- Confidence intervals resample duplicate *groups* (the split manifest's ``group`` column), not
  images: near-duplicate fields are not independent evidence.

Labels are integer class indices ``0..C-1``; ``y_prob`` is an ``n x C`` array of probabilities.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any, Callable, Sequence

import numpy as np
import torch
from scipy import stats
from sklearn import metrics as skm

from allcore.imaging.transforms import add_gaussian_noise

CURVE_MAX_POINTS = 200  # per curve in the report JSON: enough to plot, small enough to diff
CI_METHOD = "percentile"  # scipy's BCa needs a jackknife per group and is NaN on a perfect score


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


def _label_pair(y_true: Any, y_pred: Any, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    y_true = _labels(y_true, num_classes, "y_true")
    y_pred = _labels(y_pred, num_classes, "y_pred")
    if y_true.shape != y_pred.shape:
        raise ValueError(f"y_true and y_pred differ in length: {y_true.size} vs {y_pred.size}")
    return y_true, y_pred


def _probs(y_prob: Any, n: int) -> np.ndarray:
    y_prob = np.asarray(y_prob, dtype=np.float64)
    if y_prob.ndim != 2 or y_prob.shape[0] != n or y_prob.shape[1] < 2:
        raise ValueError(f"y_prob must be an n x C array (n={n}, C>=2) of class probabilities, "
                         f"got shape {y_prob.shape}")
    return y_prob


# ----------------------------------------------------------------------------- label metrics

def confusion_matrix(y_true: Any, y_pred: Any, num_classes: int) -> np.ndarray:
    """C x C counts; rows are true classes, columns predicted (sklearn's orientation)."""
    y_true, y_pred = _label_pair(y_true, y_pred, num_classes)
    return skm.confusion_matrix(y_true, y_pred, labels=np.arange(num_classes))


def accuracy(y_true: Any, y_pred: Any) -> float:
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    if y_true.shape != y_pred.shape or y_true.size == 0:
        raise ValueError(f"y_true and y_pred must be non-empty and equal in shape, got "
                         f"{y_true.shape} and {y_pred.shape}")
    return float(skm.accuracy_score(y_true, y_pred))


def _scores(y_true: Any, y_pred: Any, num_classes: int, average: str | None) -> dict[str, Any]:
    """precision, recall, f1, f2 over every class of the label set (see the module notes)."""
    y_true, y_pred = _label_pair(y_true, y_pred, num_classes)
    common = {"labels": np.arange(num_classes), "average": average, "zero_division": 0}
    precision, recall, f1, support = skm.precision_recall_fscore_support(y_true, y_pred, **common)
    f2 = skm.fbeta_score(y_true, y_pred, beta=2.0, **common)
    return {"precision": precision, "recall": recall, "f1": f1, "f2": f2, "support": support}


def per_class_scores(y_true: Any, y_pred: Any, num_classes: int) -> dict[str, np.ndarray]:
    """Arrays of length C: precision, recall, f1, f2 and support (true count) per class."""
    return _scores(y_true, y_pred, num_classes, average=None)


def averaged_scores(y_true: Any, y_pred: Any, num_classes: int) -> dict[str, float]:
    """``{precision,recall,f1,f2}_{macro,weighted}``: macro weighs classes equally (what matters
    for rare ALL subtypes), weighted by support (what the published papers mostly report)."""
    out = {}
    for average in ("macro", "weighted"):
        scores = _scores(y_true, y_pred, num_classes, average=average)
        out.update({f"{name}_{average}": float(scores[name])
                    for name in ("precision", "recall", "f1", "f2")})
    return out


def macro_f1(y_true: Any, y_pred: Any, num_classes: int) -> float:
    return float(_scores(y_true, y_pred, num_classes, average="macro")["f1"])


def cohen_kappa(y_true: Any, y_pred: Any, num_classes: int) -> float:
    """Agreement beyond chance; NaN when chance agreement is already perfect (one class only)."""
    y_true, y_pred = _label_pair(y_true, y_pred, num_classes)
    if np.unique(np.r_[y_true, y_pred]).size == 1:
        return float("nan")  # sklearn would divide 0 by 0 here, with a RuntimeWarning
    return float(skm.cohen_kappa_score(y_true, y_pred, labels=np.arange(num_classes)))


def matthews_corrcoef(y_true: Any, y_pred: Any, num_classes: int) -> float:
    """Multiclass MCC (Gorodkin's R_K); 0 when undefined, as in sklearn."""
    y_true, y_pred = _label_pair(y_true, y_pred, num_classes)
    return float(skm.matthews_corrcoef(y_true, y_pred))


# ----------------------------------------------------------------------------- score metrics

def roc_auc_per_class(y_true: Any, y_prob: Any) -> np.ndarray:
    """One-vs-rest ROC-AUC per class; NaN where it is undefined (a class without positives or
    without negatives in y_true), where sklearn would raise."""
    y_prob = _probs(y_prob, np.asarray(y_true).size)
    y_true = _labels(y_true, y_prob.shape[1], "y_true")
    aucs = np.full(y_prob.shape[1], np.nan)
    for k in range(y_prob.shape[1]):
        positives = y_true == k
        if positives.any() and not positives.all():
            aucs[k] = skm.roc_auc_score(positives, y_prob[:, k])
    return aucs


def roc_auc_macro(y_true: Any, y_prob: Any) -> float:
    """Mean one-vs-rest AUC over the classes where it is defined (NaN if none is)."""
    aucs = roc_auc_per_class(y_true, y_prob)
    return float("nan") if np.isnan(aucs).all() else float(np.nanmean(aucs))


# ----------------------------------------------------------------------------- calibration

def calibration_bins(y_true: Any, y_prob: Any, n_bins: int = 15) -> dict[str, np.ndarray]:
    """Top-label reliability data over equal-width confidence bins ``(lo, hi]``: per bin the
    count, mean confidence and accuracy (NaN for empty bins), plus the bin edges. (sklearn's
    ``calibration_curve`` is binary only; this is the multiclass top-label version.)"""
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
                 y_pred_or_prob: Any, *, groups: Sequence[Any] | None = None, n_boot: int = 1000,
                 alpha: float = 0.05, seed: int = 0) -> tuple[float, float]:
    """(1 - alpha) percentile-bootstrap interval of ``metric_fn(y_true, y_pred_or_prob)``
    (``scipy.stats.bootstrap``, seeded).

    Whole ``groups`` are resampled with replacement (one id per row, e.g. the split manifest's
    duplicate group): near-duplicate images share their errors, so resampling them one by one
    would count the same evidence several times and give too narrow an interval. Without
    ``groups`` every image is its own group. Test sets here hold a few hundred images, so a
    single accuracy hides an interval of several points; report it. NaN when there are fewer
    than two groups (nothing to resample).
    """
    if n_boot < 1 or not 0.0 < alpha < 1.0:
        raise ValueError(f"need n_boot >= 1 and 0 < alpha < 1, got n_boot={n_boot}, alpha={alpha}")
    y_true, y_other = np.asarray(y_true), np.asarray(y_pred_or_prob)
    if y_true.size == 0 or y_other.shape[0] != y_true.shape[0]:
        raise ValueError(f"y_true and y_pred_or_prob must be non-empty with the same number of "
                         f"rows, got {y_true.shape} and {y_other.shape}")
    members = _group_members(groups, y_true.shape[0])
    if len(members) < 2:
        return float("nan"), float("nan")

    def statistic(chosen: np.ndarray) -> float:
        rows = np.concatenate([members[g] for g in chosen])
        return metric_fn(y_true[rows], y_other[rows])

    result = stats.bootstrap((np.arange(len(members)),), statistic, n_resamples=n_boot,
                             vectorized=False, confidence_level=1.0 - alpha, method=CI_METHOD,
                             rng=np.random.default_rng(seed))
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def _group_members(groups: Sequence[Any] | None, n: int) -> list[np.ndarray]:
    """Row indices of each group (each row alone when ``groups`` is None)."""
    if groups is None:
        return list(np.arange(n)[:, None])
    groups = np.asarray(groups)
    if groups.shape != (n,):
        raise ValueError(f"groups must hold one id per row ({n}), got shape {groups.shape}")
    inverse = np.unique(groups, return_inverse=True)[1]
    order = np.argsort(inverse, kind="stable")
    return np.split(order, np.cumsum(np.bincount(inverse))[:-1])


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
                          groups: Sequence[Any] | None = None, n_boot: int = 1000,
                          seed: int = 0) -> dict:
    """Everything the HTML report and metrics.json need, as JSON-ready data (NaN -> None).
    Predictions are the argmax of ``y_prob``; CIs are 95% percentile bootstraps over ``groups``
    (see :func:`bootstrap_ci`), and ``ci95_method`` says how they were drawn."""
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
            precision, recall, _ = skm.precision_recall_curve(positives, y_prob[:, k])
            curves["pr"][name] = dict(zip(("precision", "recall"), _downsample(precision, recall)))
        if positives.any() and not positives.all():
            fpr, tpr, _ = skm.roc_curve(positives, y_prob[:, k])
            curves["roc"][name] = dict(zip(("fpr", "tpr"), _downsample(fpr, tpr)))

    n_groups = y_true.size if groups is None else len(set(groups))
    ci = partial(bootstrap_ci, y_true=y_true, y_pred_or_prob=y_pred, groups=groups,
                 n_boot=n_boot, seed=seed)
    report = {
        "n": int(y_true.size),
        "class_names": class_names,
        "accuracy": accuracy(y_true, y_pred),
        "accuracy_ci95": ci(accuracy),
        **averaged_scores(y_true, y_pred, num_classes),
        "macro_f1_ci95": ci(partial(macro_f1, num_classes=num_classes)),
        "ci95_method": (f"{CI_METHOD} bootstrap (scipy.stats.bootstrap, seed {seed}), "
                        f"{n_boot} resamples of {n_groups} "
                        f"{'images' if groups is None else 'duplicate groups'}"),
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
