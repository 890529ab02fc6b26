"""Evaluate a model artifact on labelled images: metrics.json, per-image predictions, report.

Preprocessing comes from the artifact's model card (input size, normalisation, scale-bar mask),
never from the caller, so evaluation sees pixels exactly as scoring does.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from allcore.imaging import files
from allcore.evaluation import metrics, report
from allcore.trust import checks
from allcore.models.artifact import load_artifact
from allcore.data.samples import Sample, discover_samples
from allcore.data.labels import get_label_set
from allcore.models.registry import batched_features_and_logits, probabilities
from allcore.imaging.qc import image_qc
from allcore.data.splits import SplitManifest
from allcore.imaging.data_config import DataConfig, normalise_array, unit_array

NOISE_SIGMAS = (0.0, 2.0, 5.0, 8.0, 10.0)  # the MobileNet_M robustness study


def select_samples(data: str | None, label_set_name: str, *, split_manifest: str | None,
                   split: str) -> list[Sample]:
    """Images to evaluate: one split of a split manifest, or every image under ``data``."""
    if split_manifest:
        samples = SplitManifest.read(split_manifest).subset(split)
        if not samples:
            raise ValueError(f"split {split!r} of {split_manifest} is empty; pick another --split")
        return samples
    if not data:
        raise ValueError("pass --data (folder or manifest) or --split-manifest")
    return discover_samples(data, get_label_set(label_set_name))


def evaluate_artifact(model_uri: str, samples: list[Sample], out_dir: str | Path, *,
                      noise_sigmas: tuple[float, ...] = NOISE_SIGMAS, batch_size: int = 64,
                      n_boot: int = 1000) -> dict:
    """Score ``samples`` with the artifact and write metrics.json, predictions.csv and report.html.
Confidence intervals resample the samples' duplicate ``group`` (set by a split manifest).

    The selected images are held in memory, decoded and as float32 (N x 3 x S x S: ~0.2 MB each
    at 128 px), because the noise-robustness table re-scores the same pixels at every sigma and
    the corner-shortcut check re-prepares them with the corner masked and visible. That suits test
    splits of thousands of images; score whole archives with ``jobs/score.py`` instead.
    """
    model, card = load_artifact(model_uri)
    data_config = card.data_config_obj()
    classes = list(card.classes)
    labels = np.array([classes.index(s.label) if s.label in classes else -1 for s in samples])
    if (labels < 0).any():
        unknown = sorted({s.label for s in samples if s.label not in classes})
        raise ValueError(f"labels {unknown} are not classes of this model ({classes}); "
                         "evaluate with data of the model's label set")
    with ThreadPoolExecutor(max_workers=4) as pool:
        decoded = list(pool.map(lambda s: files.decode_rgb(files.read_bytes(s.path)), samples))
        units = list(pool.map(lambda img: unit_array(img, data_config), decoded))
        qc = list(pool.map(image_qc, decoded)) if card.trust else []
    images = torch.from_numpy(np.stack(units))

    def pixels(unit_batch: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(normalise_array(unit_batch.numpy(), data_config))

    def predict(unit_batch: torch.Tensor) -> np.ndarray:
        return probabilities(model, pixels(unit_batch)).numpy()

    features, logits = batched_features_and_logits(model, images, pixels, batch_size=batch_size)
    probs = checks.calibrated_probabilities(logits, 1.0)  # plain softmax: metrics judge the raw model
    # CIs resample the split manifest's duplicate groups; images without one stand alone
    groups = (None if all(s.group is None for s in samples)
              else [s.group if s.group is not None else s.path for s in samples])
    result = metrics.classification_report(labels, probs, classes, groups=groups, n_boot=n_boot)
    shortcut = _corner_shortcut(predict, decoded, labels, data_config, batch_size)
    trust_summary = (_trust_summary(model_uri, card, features, logits, labels, qc)
                     if card.trust else None)
    noise = (metrics.noise_robustness_table(predict, images, labels, sigmas=noise_sigmas,
                                            batch_size=batch_size) if noise_sigmas else None)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = {"model": model_uri, "model_name": card.model_name, "model_version": card.model_version,
               "n_images": len(samples), **result, "noise_robustness": noise,
               "corner_shortcut": shortcut, "trust": trust_summary}
    (out / "metrics.json").write_text(json.dumps(summary, indent=2))
    predictions = pd.DataFrame({"path": [s.path for s in samples], "label": [s.label for s in samples],
                                "pred_label": [classes[i] for i in probs.argmax(1)],
                                **{f"prob_{c}": probs[:, k] for k, c in enumerate(classes)}})
    predictions.to_csv(out / "predictions.csv", index=False)
    history = _history_beside(model_uri)
    report.write_report(out, result, history=history, noise_table=noise,
                        title=f"{card.model_name} on {len(samples)} images",
                        model_card=card.to_dict(), shortcut=shortcut, trust=trust_summary)
    return summary


def _corner_shortcut(predict, decoded: list, labels: np.ndarray, data_config: DataConfig,
                     batch_size: int) -> dict:
    """Accuracy with the scale-bar corner masked and visible: a large gap means the model reads
    the class-coloured label (or, trained masked, that it meets an unseen corner)."""
    accuracy = {}
    for masked in (True, False):
        units = np.stack([unit_array(img, replace(data_config, mask_corner=masked))
                          for img in decoded])
        probs = np.concatenate([predict(torch.from_numpy(units[i:i + batch_size]))
                                for i in range(0, len(units), batch_size)])
        accuracy[masked] = metrics.accuracy(labels, probs.argmax(1))
    return {"trained_with_corner_masked": data_config.mask_corner,
            "accuracy_corner_masked": accuracy[True],
            "accuracy_corner_visible": accuracy[False]}


def _trust_summary(model_uri: str, card, features: np.ndarray, logits: np.ndarray,
                   labels: np.ndarray, qc: list[dict]) -> dict:
    """Calibration before/after the card's temperature, OOD scores and the review decisions of
    the evaluated images (the decision scoring writes per row)."""
    fitted = checks.load_trust(model_uri, card.trust)
    scores = fitted.ood_scores(features, logits)
    calibrated = checks.calibrated_probabilities(logits, fitted.temperature)
    raw = checks.calibrated_probabilities(logits, 1.0)
    reviews = [checks.review_row(q, float(score), 0.0, fitted) for q, score in zip(qc, scores)]
    flagged = np.array([r.needs_review for r in reviews])
    correct = logits.argmax(1) == labels
    reasons: dict[str, int] = {}
    for review in reviews:
        for reason in (review.review_reason or "").split("; "):
            if reason:
                reasons[reason] = reasons.get(reason, 0) + 1
    return metrics.to_jsonable({
        "temperature": fitted.temperature, "ood_method": fitted.ood_method,
        "ood_threshold": fitted.ood_threshold,
        "ece_before": metrics.expected_calibration_error(labels, raw),
        "ece_after": metrics.expected_calibration_error(labels, calibrated),
        "calibration_before": metrics.calibration_bins(labels, raw),
        "calibration_after": metrics.calibration_bins(labels, calibrated),
        "ood_scores": scores, "flag_rate": flagged.mean(), "review_reasons": reasons,
        "accuracy_unflagged": correct[~flagged].mean() if (~flagged).any() else None,
        "accuracy_flagged": correct[flagged].mean() if flagged.any() else None,
    })


def _history_beside(model_uri: str) -> list[dict] | None:
    """Training curves saved by the training job next to the artifact, when present."""
    uri = files.join(model_uri, "history.json")
    return json.loads(files.read_bytes(uri)) if files.exists(uri) else None
