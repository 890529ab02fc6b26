"""Fitting a model's trust section (``allcore.trust.checks``) at the end of training: one pass over the
artifact's own train and validation images gives the features, logits and QC values that the
temperature, the OOD detector and the QC ranges are fitted on. Needs torch (the model's forward
pass); scoring only applies the result, through ``allcore.trust.checks``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

import numpy as np
import torch

from allcore.imaging import files
from allcore.models.artifact import load_artifact, save_artifact
from allcore.imaging.data_config import preprocess_array
from allcore.data.labels import get_label_set
from allcore.evaluation.metrics import expected_calibration_error
from allcore.models.registry import batched_features_and_logits
from allcore.imaging.qc import QC_COLUMNS, image_qc
from allcore.trust.checks import (IN_DISTRIBUTION_FLAG_RATE, MAGNIFICATION_TOLERANCE,
                                  MAX_FALSE_BLAST_RATE, OOD_METHOD, QC_MARGIN, QC_QUANTILES,
                                  TRUST_FILE, TRUST_VERSION, calibrated_probabilities,
                                  fit_blast_threshold, fit_ood_detector, fit_temperature,
                                  negative_log_likelihood, qc_reference, write_trust_file)


def fit_trust(*, train: dict[str, np.ndarray], val: dict[str, np.ndarray],
              train_qc: Sequence[Mapping[str, float]], method: str = OOD_METHOD,
              flag_rate: float = IN_DISTRIBUTION_FLAG_RATE,
              blast_columns: Sequence[int] | None = None) -> tuple[dict, dict[str, np.ndarray]]:
    """Fit temperature, OOD detector and QC ranges. ``train``/``val`` hold ``features``,
    ``logits`` and ``labels`` arrays. With ``blast_columns`` (a cell model's blast classes) it
    also fits the blast threshold on val (``allcore.trust.checks.fit_blast_threshold``). Returns the
    card's ``trust`` section (without the file hash) and the detector's tensors for ``TRUST_FILE``."""
    if not 0 < flag_rate < 1:
        raise ValueError(f"flag_rate must be in (0, 1), got {flag_rate}")
    temperature = fit_temperature(val["logits"], val["labels"])
    detector = fit_ood_detector(method, train["features"], train["labels"], train["logits"])
    val_scores = detector.score(val["features"], val["logits"])
    threshold = float(np.quantile(val_scores, 1 - flag_rate))

    def ece(temp: float) -> float:
        return expected_calibration_error(val["labels"], calibrated_probabilities(val["logits"], temp))

    section = {
        "version": TRUST_VERSION,
        "temperature": temperature,
        "calibration": {"split": "val", "n": int(len(val["labels"])), "ece_before": ece(1.0),
                        "ece_after": ece(temperature),
                        "nll_before": negative_log_likelihood(np.asarray(val["logits"], float), val["labels"], 1.0),
                        "nll_after": negative_log_likelihood(np.asarray(val["logits"], float), val["labels"], temperature)},
        "ood": {"method": method, "params": detector.params(), "threshold": threshold,
                "target_flag_rate": flag_rate, "split": "val",
                "val_flag_rate": float(np.mean(val_scores > threshold)),
                "n_train": int(len(train["labels"])), "file": TRUST_FILE},
        "qc_reference": qc_reference(train_qc),
        "qc_quantiles": list(QC_QUANTILES), "qc_margin": QC_MARGIN,
        "qc_magnification_tolerance": MAGNIFICATION_TOLERANCE,
        "qc_columns": dict(QC_COLUMNS),
    }
    if blast_columns is not None:
        blast = calibrated_probabilities(val["logits"], temperature)[:, list(blast_columns)].sum(1)
        section["blast_threshold"] = fit_blast_threshold(blast, np.isin(val["labels"], blast_columns))
        section["blast_threshold_fit"] = {"split": "val", "max_false_blast_rate": MAX_FALSE_BLAST_RATE,
                                          "n_not_blast": int((~np.isin(val["labels"], blast_columns)).sum())}
    return section, detector.tensors()



@dataclass(frozen=True)
class Scored:
    """What one pass over labelled images gives: everything trust fitting and measuring needs."""

    features: np.ndarray
    logits: np.ndarray
    labels: np.ndarray
    qc: list[dict[str, float]]

    def arrays(self) -> dict[str, np.ndarray]:
        return {"features": self.features, "logits": self.logits, "labels": self.labels}


def score_images(model: torch.nn.Module, images: Sequence, labels: Sequence[int], *,
                 batch_size: int = 64, with_qc: bool = True) -> Scored:
    """Features, logits and QC of decoded RGB ``images`` (PIL), preprocessed exactly as
    scoring does (the model's data config, corner mask included)."""
    config = model.data_config
    with ThreadPoolExecutor(max_workers=2) as pool:
        pixels = list(pool.map(lambda img: preprocess_array(img, config), images))
        qc = list(pool.map(image_qc, images)) if with_qc else []
    features, logits = batched_features_and_logits(
        model, pixels, lambda batch: torch.from_numpy(np.stack(batch)), batch_size=batch_size)
    return Scored(features, logits, np.asarray(labels), qc)


def score_samples(model: torch.nn.Module, samples: Sequence, classes: Sequence[str], *,
                  with_qc: bool = True) -> Scored:
    """``score_images`` of labelled ``allcore.data.samples.Sample`` rows (decoded here)."""
    images = [files.decode_rgb(files.read_bytes(s.path)) for s in samples]
    return score_images(model, images, [list(classes).index(s.label) for s in samples],
                        with_qc=with_qc)


def attach_trust(artifact_uri: str, manifest, *, method: str = OOD_METHOD,
                 flag_rate: float = IN_DISTRIBUTION_FLAG_RATE) -> dict:
    """Fit the trust section on the artifact's own split (``manifest``: its ``SplitManifest``;
    train for the OOD reference and QC ranges, val for temperature and threshold) and store it
    in the artifact. Returns the section."""
    model, card = load_artifact(artifact_uri)
    train = score_samples(model, manifest.subset("train"), card.classes)
    val = score_samples(model, manifest.subset("val"), card.classes, with_qc=False)
    blast_columns = ([card.classes.index(c) for c in get_label_set(card.label_set).blast_classes]
                     if card.cell_crop else None)  # field models keep the 0.5 call (their rows' review is QC + OOD)
    section, tensors = fit_trust(train=train.arrays(), val=val.arrays(), train_qc=train.qc,
                                 method=method, flag_rate=flag_rate, blast_columns=blast_columns)
    section["ood"]["sha256"] = write_trust_file(artifact_uri, tensors)
    # the fields save_artifact derives from the model are left for it to fill again
    save_artifact(artifact_uri, model, replace(card, trust=section, model_name="", model_kwargs={},
                                               data_config={}))
    return section
