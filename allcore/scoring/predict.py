"""The predict stage: the model on prepared pixels, on CPU or GPU, eager or fast.

``Predictor`` is the ``map_batches`` class of ``pipelines/score.py`` (one per actor, so the model
is loaded once per actor); it takes and returns ``dict[str, np.ndarray]`` batches, so it is
tested without Ray. The paths themselves (pixels -> features and logits) are
``allcore.scoring.runtimes``; this module imports torch only through it, and not at all when a
CPU actor's fast path is in the ONNX export cache (``allcore.scoring.onnx``).

With a ``trust`` section in the model card the probabilities are temperature-scaled (calibrated)
and every ok row gets an ``ood_score`` from the same forward pass (``allcore.trust``); without
one they are the plain softmax and ``ood_score`` is NaN (the driver warns once).
"""

from __future__ import annotations

import logging

import numpy as np
from scipy import special

from allcore.models.artifact import built_model, verified_weights
from allcore.data.labels import get_label_set
from allcore.scoring import onnx
from allcore.scoring.rows import CELL, OK, SLIDE, prob_column
from allcore.trust.checks import calibrated_probabilities, load_trust

log = logging.getLogger("allcore.scoring.predict")


class ScoringModel:
    """One artifact as scoring runs it: pixels -> (probabilities, OOD scores) from one forward
    pass. With a ``trust`` section in the card the probabilities are temperature-scaled and the
    OOD scores come from its detector; without one they are the plain softmax and NaN.

    ``expected_sha256`` guards against the artifact being replaced while a run is going: the
    driver recorded one model in the table, so every actor must score with that one.

    ``device`` is where the driver placed the actor ('cpu' or 'cuda'; None: CUDA when
    available). On 'cpu' with ``fast``, an export of these weights already in the ONNX export
    cache is opened without torch or the model code (about 3 CPU-s of an actor's start); then
    ``model`` is None. Otherwise the model is built, and a fast CPU path's export is cached.
    """

    def __init__(self, artifact_uri: str, expected_sha256: str | None = None, fast: bool = False,
                 device: str | None = None):
        self.card, weights = verified_weights(artifact_uri)
        if expected_sha256 is not None and self.card.weights_sha256 != expected_sha256:
            raise ValueError(f"artifact {artifact_uri} now has weights {self.card.weights_sha256}, "
                             f"but this run started with {expected_sha256}; it was replaced "
                             "mid-run: rerun the job")
        self.classes = list(self.card.classes)
        self.trust = load_trust(artifact_uri, self.card.trust) if self.card.trust else None
        input_size = int(self.card.data_config["input_size"])
        cache_key = onnx.cache_key(self.card.weights_sha256, input_size)
        session = (onnx.cached_session(cache_key) if fast and device == "cpu" and onnx.installed()
                   else None)
        if session is not None:
            self.model = None
            self.outputs = onnx.session_outputs(session, input_size)
            return
        from allcore.scoring.runtimes import model_outputs

        self.model = built_model(self.card, weights, artifact_uri).eval()  # the review app's saliency uses it
        self.outputs = model_outputs(self.model, input_size=input_size, fast=fast, device=device,
                                     cache_key=cache_key)

    def __call__(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        features, logits = self.outputs(pixels)
        if self.trust is None:
            return special.softmax(logits, axis=1), np.full(len(logits), np.nan, np.float32)
        return (calibrated_probabilities(logits, self.trust.temperature),
                self.trust.ood_scores(features, logits))


class Predictor:
    """Scores prepared batches. ``__init__`` loads the artifacts once per actor; class names and
    their order come from the model cards, never from this code. ``fast`` and ``cell_fast``
    select ``fast_outputs`` instead of the eager reference path for each model; the driver
    decides them once (``inference_path``) and records them in the run summary.

    With ``cell_artifact_uri`` (``--cell-model``) cell rows are scored by that model on their
    ``cell_pixels`` instead: their ``pred_label`` and ``confidence`` are the cell model's
    (calibrated with its own card's temperature), their ``ood_score`` is the cell model's
    detector on the crop, their field-class probabilities stay NaN, and ``blast_probability``
    carries the cell model's probability of its blast classes (NaN on field rows, whose value the
    table derives).
    """

    def __init__(self, artifact_uri: str, expected_sha256: str | None = None, fast: bool = False,
                 cell_artifact_uri: str | None = None, cell_expected_sha256: str | None = None,
                 cell_fast: bool = False, device: str | None = None):
        self.field_model = ScoringModel(artifact_uri, expected_sha256, fast, device)
        self.cell_model = None
        if cell_artifact_uri is not None:
            self.cell_model = ScoringModel(cell_artifact_uri, cell_expected_sha256, cell_fast, device)
            cell_classes = self.cell_model.classes
            self.cell_blast = [cell_classes.index(c) for c in get_label_set(
                self.cell_model.card.label_set).blast_classes_of(cell_classes)]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = {k: v for k, v in batch.items() if k not in ("pixels", "cell_pixels")}
        ok = np.asarray(batch["status"] == OK, dtype=bool)
        n = len(ok)
        by_cell_model = np.zeros(n, bool)
        if self.cell_model is not None:
            by_cell_model = ok & (np.asarray(batch["row_kind"]) == CELL)
        if "row_kind" in batch:  # a slide row has no pixels to score
            ok &= np.asarray(batch["row_kind"]) != SLIDE
        by_field_model = ok & ~by_cell_model
        classes = self.field_model.classes
        probs = np.full((n, len(classes)), np.nan, np.float32)
        out["ood_score"] = np.full(n, np.nan, np.float32)
        if by_field_model.any():
            probs[by_field_model], out["ood_score"][by_field_model] = self.field_model(
                batch["pixels"][by_field_model])
        labels, confidence = _best(probs, classes, by_field_model)
        if self.cell_model is not None:
            cell_probs = np.full((n, len(self.cell_model.classes)), np.nan, np.float32)
            if by_cell_model.any():
                cell_probs[by_cell_model], out["ood_score"][by_cell_model] = self.cell_model(
                    batch["cell_pixels"][by_cell_model])
            cell_labels, cell_confidence = _best(cell_probs, self.cell_model.classes, by_cell_model)
            labels = np.where(by_cell_model, cell_labels, labels)
            confidence = np.where(by_cell_model, cell_confidence, confidence)
            out["blast_probability"] = cell_probs[:, self.cell_blast].sum(axis=1)
        out["pred_label"], out["confidence"] = labels, confidence
        for j, cls in enumerate(classes):
            out[prob_column(cls)] = probs[:, j]
        return out


def _best(probs: np.ndarray, classes: list[str], scored: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(label, its probability) per row; "" and NaN where ``scored`` is False."""
    best = np.argmax(np.nan_to_num(probs, nan=-1.0), axis=1)
    labels = np.array([classes[b] if good else "" for b, good in zip(best, scored)], dtype=object)
    confidence = np.where(scored, probs[np.arange(len(probs)), best], np.nan).astype(np.float32)
    return labels, confidence
