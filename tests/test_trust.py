"""Temperature scaling, OOD detectors, the review decision and the card's trust section."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from allcore.trust import checks
from allcore.training import trust_fitting
from allcore.models.artifact import (CARD_FILE, ArtifactIntegrityError, load_artifact, read_card,
                                     verified_card)
from allcore.data.labels import get_label_set
from allcore.models.registry import features_and_logits
from allcore.imaging.qc import QC_COLUMNS
from allcore.data.splits import split_samples
from allcore.data.synthetic import write_archive


def test_temperature_scaling_recovers_a_known_temperature():
    rng = np.random.default_rng(0)
    true_logits = rng.normal(scale=2.0, size=(4000, 4))
    probs = checks.calibrated_probabilities(true_logits, 1.0)
    labels = np.array([rng.choice(4, p=p) for p in probs])
    overconfident = true_logits * 2.5  # a model that claims too much: T = 2.5 undoes it
    assert checks.fit_temperature(overconfident, labels) == pytest.approx(2.5, rel=0.1)
    assert checks.fit_temperature(true_logits, labels) == pytest.approx(1.0, rel=0.1)


def _clusters(rng: np.random.Generator, n: int, offset: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    labels = rng.integers(0, 3, size=n)
    centres = np.eye(3, 16) * 6.0
    return centres[labels] + rng.normal(size=(n, 16)) + offset, labels


@pytest.mark.parametrize("method", sorted(checks.OOD_DETECTORS))
def test_every_ood_detector_flags_far_features_and_survives_storage(method):
    rng = np.random.default_rng(1)
    head = np.eye(16, 3) * 2.0  # each class logit reads its own cluster direction
    (train, train_y), (val, val_y) = _clusters(rng, 600), _clusters(rng, 300)
    far, _ = _clusters(rng, 100, offset=-8.0)  # a shifted blob: far from every training class
    section, tensors = trust_fitting.fit_trust(
        train={"features": train, "logits": train @ head, "labels": train_y},
        val={"features": val, "logits": val @ head, "labels": val_y},
        train_qc=[{name: 1.0 for name in QC_COLUMNS}], method=method)
    detector = checks.OOD_DETECTORS[method].from_stored(tensors, section["ood"]["params"])
    threshold = section["ood"]["threshold"]
    assert section["ood"]["val_flag_rate"] <= 0.03
    if method == "energy":  # logits only: a far point whose logits are small
        far_logits = np.zeros((100, 3))
    else:
        far_logits = far @ head
    assert np.mean(detector.score(far, far_logits) > threshold) >= 0.95


def _section() -> dict:
    reference = {name: {"low": 0.0, "high": 1.0, "median": 0.5} for name in checks.QC_CHECKS}
    return {"temperature": 1.5, "ood": {"method": "knn", "threshold": 2.0},
            "qc_reference": reference, "qc_columns": dict(QC_COLUMNS)}


def test_review_row_abstains_with_every_reason_and_calls_clean_rows():
    qc = {name: 0.5 for name in QC_COLUMNS}
    assert checks.review_row(qc, 1.0, 0.9, _section()) == checks.Review(False, None, "blast")
    assert checks.review_row(qc, 1.0, 0.1, _section()).call == "not blast"
    far = checks.review_row(qc, 3.0, 0.9, _section())
    assert far == checks.Review(True, "out of distribution", "abstain")
    blurred = checks.review_row({**qc, "qc_blur": 1.5, "qc_cell_diameter_fraction": -1}, 3.0, 0.9,
                               _section())
    assert blurred.review_reason == "out of distribution; blurred; cell size differs"
    # NaN (no cells, so no size) is left to the cell-count check, not called a size difference
    assert not checks.review_row({**qc, "qc_cell_diameter_fraction": float("nan")}, 1.0, 0.9,
                                _section()).needs_review
    assert set(checks.qc_reasons({"qc_blur": 2.0}, _section()["qc_reference"])) <= set(checks.REVIEW_REASONS)


def test_ranges_fitted_on_an_earlier_qc_definition_are_not_applied():
    section = _section()
    assert checks.stale_qc_checks(section) == [] and checks.stale_qc_warning(section) is None
    section["qc_columns"]["qc_cell_diameter_fraction"] = "median equivalent diameter of the found cells"
    too_large = {**{name: 0.5 for name in QC_COLUMNS}, "qc_cell_diameter_fraction": 9.0}
    assert checks.stale_qc_checks(section) == ["qc_cell_diameter_fraction"]
    assert "qc_cell_diameter_fraction" in checks.stale_qc_warning(section)
    assert "attach_trust" in checks.stale_qc_warning(section)
    assert not checks.review_row(too_large, 1.0, 0.9, section).needs_review
    assert checks.review_row(too_large, 1.0, 0.9, _section()).review_reason == "cell size differs"


def test_qc_reference_widens_the_training_range():
    rows = [{name: float(v) for name in QC_COLUMNS} for v in range(101)]
    limits = checks.qc_reference(rows, quantiles=(0.0, 1.0), margin=0.1)["qc_blur"]
    assert limits == {"low": -10.0, "high": 110.0, "median": 50.0}


def test_cell_size_is_held_to_one_magnification():
    """A wide spread of per-field estimates must not let a field at half the magnification pass."""
    rng = np.random.default_rng(0)
    fractions = 0.11 * np.exp(rng.normal(0, 0.15, 500))  # Taleqani-like: median 0.11, +-15%
    rows = [{**{name: 1.0 for name in QC_COLUMNS}, "qc_cell_diameter_fraction": f} for f in fractions]
    reference = checks.qc_reference(rows)
    limits = reference["qc_cell_diameter_fraction"]
    assert limits["low"] == pytest.approx(limits["median"] / checks.MAGNIFICATION_TOLERANCE)
    assert limits["high"] == pytest.approx(limits["median"] * checks.MAGNIFICATION_TOLERANCE)
    half = checks.qc_reasons({"qc_cell_diameter_fraction": 0.055}, reference)
    assert half == [checks.CELL_SIZE_DIFFERS]
    assert checks.qc_reasons({"qc_cell_diameter_fraction": 0.11}, reference) == []
    assert np.mean([bool(checks.qc_reasons(r, reference)) for r in rows]) < 0.01
    wide = checks.qc_reference(rows, magnification_tolerance=None)["qc_cell_diameter_fraction"]
    assert wide["low"] < 0.055  # without the bound the half-magnification field passed


def test_features_and_logits_match_the_model_forward(tiny_artifact):
    model, _ = load_artifact(tiny_artifact)
    pixels = torch.rand(2, 3, 64, 64)
    features, logits = features_and_logits(model, pixels)
    assert features.shape == (2, model.get_classifier().in_features)
    with torch.no_grad():
        torch.testing.assert_close(logits, model(pixels))


def test_a_card_without_trust_still_loads(tiny_artifact, tmp_path):
    card = json.loads((Path(tiny_artifact) / CARD_FILE).read_text())
    card.pop("trust", None)  # written before the trust section existed
    (tmp_path / CARD_FILE).write_text(json.dumps(card))
    assert read_card(str(tmp_path)).trust == {}


def test_attach_trust_round_trips_through_the_artifact(tiny_artifact, tmp_path):
    artifact = str(shutil.copytree(tiny_artifact, tmp_path / "model"))
    samples = write_archive(tmp_path / "archive", label_set=get_label_set("all4"), per_class=8,
                            size=64, near_duplicates=False)
    manifest = split_samples(samples, fractions=(0.5, 0.5, 0.0), names=("train", "val", "test"))
    section = trust_fitting.attach_trust(artifact, manifest)
    model, card = load_artifact(artifact)  # the weights still match their hash
    assert card.trust == json.loads(json.dumps(section))
    assert set(card.trust["qc_reference"]) <= set(checks.QC_CHECKS)
    loaded = checks.load_trust(artifact, card.trust)
    assert loaded.temperature == pytest.approx(section["temperature"]) and loaded.temperature > 0
    features, logits = features_and_logits(model, torch.rand(3, 3, 64, 64))
    assert loaded.ood_scores(features.numpy(), logits.numpy()).shape == (3,)
    # a detector file that does not belong to the card is refused
    (tmp_path / "model" / checks.TRUST_FILE).write_bytes(b"not the detector")
    with pytest.raises(ArtifactIntegrityError, match="sha256"):
        checks.load_trust(artifact, card.trust)
    with pytest.raises(ArtifactIntegrityError, match=checks.TRUST_FILE):
        verified_card(artifact)  # what the scoring driver checks before Ray starts


def test_blast_threshold_keeps_false_blasts_at_the_chosen_rate():
    rng = np.random.default_rng(0)
    not_blast, blast = rng.beta(2, 5, 1000), rng.beta(5, 2, 300)
    p = np.concatenate([not_blast, blast])
    is_blast = np.r_[np.zeros(1000, bool), np.ones(300, bool)]
    threshold = checks.fit_blast_threshold(p, is_blast, 0.02)
    assert np.mean(not_blast >= threshold) <= 0.02
    assert np.mean(not_blast >= threshold - 1e-3) > 0.02 - 1e-3  # the lowest such threshold
    assert checks.fit_blast_threshold(np.r_[0.1, 0.2, 0.9], np.r_[False, False, True]) == checks.BLAST_THRESHOLD
    assert checks.fit_blast_threshold(np.r_[0.1, 0.7, 0.9], np.r_[False, False, True], 0.0) > 0.7


def test_cell_call_sends_uncertain_blasts_to_review():
    section = {**_section(), "blast_threshold": 0.8}
    assert checks.cell_call(1.0, 0.9, section) == checks.Review(False, None, "blast")
    assert checks.cell_call(1.0, 0.6, section) == checks.Review(True, checks.BLAST_UNCERTAIN, "abstain")
    assert checks.cell_call(1.0, 0.3, section) == checks.Review(False, None, "not blast")
    assert checks.cell_call(3.0, 0.9, section) == checks.Review(True, "out of distribution", "abstain")
    # a card fitted before the blast threshold existed keeps the plain 0.5 call
    assert checks.cell_call(1.0, 0.6, _section()).call == "blast"
    small = checks.review_cell(1.0, 0.6, section, cell_diameter_px=10, pixels_per_cell_diameter=48)
    assert small.review_reason == f"{checks.BLAST_UNCERTAIN}; {checks.CELL_SIZE_DIFFERS}"
