"""How far to trust one prediction: calibrated probabilities, an out-of-distribution score, and
image QC against the training data's ranges, combined into a review decision per row.

Training fits everything here once, after the best model is exported
(``allcore.training.trust_fitting.attach_trust``), and stores it in the model card's ``trust`` section; the
arrays an OOD detector needs (too large for JSON) go to ``trust.safetensors`` beside the weights,
checked by sha256 like them. Scoring then needs, per batch, only the forward pass it already runs
(``allcore.models.registry.features_and_logits``), the QC values of its prepare stage
(``allcore.imaging.qc.image_qc``) and ``review_row``. This module needs NumPy and SciPy (and the QC
column definitions) only: the scoring driver imports it (for the output table's review columns)
and never imports torch.

The OOD detector works on the model's own penultimate features (the backbone output, pooled):
images the model never learnt to represent land far from the training images there, whatever
the softmax says. ``OOD_METHOD`` was chosen by measurement (docs/TRUST.md).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import NamedTuple

import numpy as np
import safetensors.numpy
from scipy import optimize, special

from allcore.imaging import files
from allcore.errors import ArtifactIntegrityError
from allcore.models.artifact import CARD_FILE, verified_file
from allcore.imaging.qc import QC_COLUMNS

TRUST_VERSION = 1
TRUST_FILE = "trust.safetensors"
OOD_METHOD = "mahalanobis"  # docs/TRUST.md: best AUROC against other labs and corruptions
IN_DISTRIBUTION_FLAG_RATE = 0.02  # share of validation images above the OOD threshold
QC_QUANTILES = (0.005, 0.995)  # training-data range of each QC statistic ...
QC_MARGIN = 0.25  # ... widened by this share of its width on each side
MAGNIFICATION_TOLERANCE = 1.6  # cell size (a field's magnification) within median / 1.6 .. median x 1.6
SCALE_STATISTICS = ("qc_cell_diameter_fraction",)  # the QC statistics that measure magnification
BLAST_THRESHOLD = 0.5  # calibrated blast probability at and above which the call is "blast"
MAX_FALSE_BLAST_RATE = 0.02  # a cell model's blast threshold: at most this share of val not-blasts above it
BLAST_UNCERTAIN = "blast uncertain"  # a cell between BLAST_THRESHOLD and its model's blast threshold
MAX_CELL_ENLARGEMENT = 1.5  # cell crops enlarged more than this get "cell size differs"
CELL_SIZE_DIFFERS = "cell size differs"

# QC statistic -> (reason when below the training range, reason when above); None: not checked.
QC_CHECKS: dict[str, tuple[str | None, str | None]] = {
    "qc_blur": (None, "blurred"),
    "qc_dark_fraction": (None, "underexposed"),
    "qc_bright_fraction": (None, "overexposed"),
    "qc_lightness_mean": ("underexposed", "overexposed"),
    "qc_lightness_std": ("low contrast", "stain differs"),
    "qc_a_mean": ("stain differs", "stain differs"),
    "qc_b_mean": ("stain differs", "stain differs"),
    "qc_blockiness": (None, "compression artefacts"),
    "qc_cell_count": ("no white cells found", None),
    "qc_cell_diameter_fraction": (CELL_SIZE_DIFFERS, CELL_SIZE_DIFFERS),
}
OUT_OF_DISTRIBUTION = "out of distribution"
REVIEW_REASONS = (OUT_OF_DISTRIBUTION, BLAST_UNCERTAIN) + tuple(dict.fromkeys(
    reason for pair in QC_CHECKS.values() for reason in pair if reason))
CALLS = ("blast", "not blast", "abstain")
NO_TRUST_CHECKS = "no trust checks in model card"  # review_reason of rows scored without them
NO_TRUST_WARNING = ("the model card has no trust section (the model was trained before allcore "
                    "fitted one): rows carry no calibration, out-of-distribution or image QC "
                    "checks. Retrain, or fit one with allcore.training.trust_fitting.attach_trust("
                    "artifact, split_manifest)")


# ----------------------------------------------------------------------------- calibration

def calibrated_probabilities(logits: np.ndarray, temperature: float) -> np.ndarray:
    return special.softmax(np.asarray(logits, dtype=np.float64) / temperature, axis=1)


def negative_log_likelihood(logits: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    log_probs = special.log_softmax(logits / temperature, axis=1)
    return float(-log_probs[np.arange(len(labels)), labels].mean())


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """Temperature scaling (Guo et al. 2017): the T > 0 minimising the NLL of softmax(logits / T).
    One parameter, so it cannot change which class wins, only how sure the model claims to be."""
    logits, labels = np.asarray(logits, dtype=np.float64), np.asarray(labels)
    result = optimize.minimize_scalar(lambda log_t: negative_log_likelihood(logits, labels, math.exp(log_t)),
                                      bounds=(math.log(0.05), math.log(20.0)), method="bounded")
    return float(math.exp(result.x))


# ----------------------------------------------------------------------------- OOD detectors
# Each detector: fit(features, labels, logits) -> detector; score(features, logits) -> higher is
# further from the training data; tensors()/params() to store it; from_stored(tensors, params).

def fit_blast_threshold(blast_probability: np.ndarray, is_blast: np.ndarray,
                        max_false_blast_rate: float = MAX_FALSE_BLAST_RATE) -> float:
    """The lowest calibrated blast probability (never below ``BLAST_THRESHOLD``) at and above which
    at most ``max_false_blast_rate`` of the not-blast cells lie: a lab acts on a cell called
    blast, so a false blast costs more than a blast sent to review."""
    negatives = np.sort(np.asarray(blast_probability, float)[~np.asarray(is_blast, bool)])[::-1]
    allowed = int(np.floor(max_false_blast_rate * len(negatives)))
    if allowed >= len(negatives):
        return BLAST_THRESHOLD
    return float(max(BLAST_THRESHOLD, np.nextafter(negatives[allowed], np.inf)))


def _unit_rows(features: np.ndarray) -> np.ndarray:
    features = np.asarray(features, dtype=np.float32)
    return features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)


@dataclass(frozen=True)
class KNNDetector:
    """Distance to the k-th nearest training image in unit-normalised feature space (Sun et al.
    2022): no assumption that a class is one Gaussian blob, which smear fields are not."""

    bank: np.ndarray  # (N, F) unit-normalised training features
    k: int = 10

    @classmethod
    def fit(cls, features: np.ndarray, labels: np.ndarray, logits: np.ndarray, *, k: int = 10) -> "KNNDetector":
        return cls(bank=_unit_rows(features), k=min(k, len(features)))

    def score(self, features: np.ndarray, logits: np.ndarray) -> np.ndarray:
        # unit rows: |q - b|^2 = 2 - 2 q.b, one BLAS product; the k-th smallest by partition
        squared = 2.0 - 2.0 * (_unit_rows(features) @ self.bank.astype(np.float32).T)
        kth = np.partition(squared, self.k - 1, axis=1)[:, self.k - 1]
        return np.sqrt(np.maximum(kth, 0.0))

    def tensors(self) -> dict[str, np.ndarray]:
        return {"bank": self.bank.astype(np.float16)}  # half the size, distances change < 1e-3

    def params(self) -> dict:
        return {"k": self.k}

    @classmethod
    def from_stored(cls, tensors: dict[str, np.ndarray], params: dict) -> "KNNDetector":
        return cls(bank=tensors["bank"].astype(np.float32), k=int(params["k"]))


@dataclass(frozen=True)
class MahalanobisDetector:
    """Smallest class-conditional Mahalanobis distance with one shared, Ledoit-Wolf shrunk
    covariance (Lee et al. 2018); the shrinkage keeps it invertible with more features than
    training images per class."""

    means: np.ndarray  # (C, F)
    precision: np.ndarray  # (F, F)

    @classmethod
    def fit(cls, features: np.ndarray, labels: np.ndarray, logits: np.ndarray) -> "MahalanobisDetector":
        features = np.asarray(features, dtype=np.float64)
        classes = np.unique(labels)
        means = np.stack([features[labels == c].mean(axis=0) for c in classes])
        centred = features - means[np.searchsorted(classes, labels)]
        # fitting happens once, in training; scoring's driver imports this module and must not
        # pay for scikit-learn
        from sklearn.covariance import LedoitWolf

        precision = LedoitWolf(assume_centered=True).fit(centred).precision_
        return cls(means=means.astype(np.float32), precision=precision.astype(np.float32))

    def score(self, features: np.ndarray, logits: np.ndarray) -> np.ndarray:
        diff = np.asarray(features, dtype=np.float32)[:, None, :] - self.means[None]  # (N, C, F)
        flat = diff.reshape(-1, diff.shape[-1])
        # one (N*C, F) x (F, F) product through BLAS; a three-operand einsum does not use it and
        # took 15% of per-cell scoring
        distances = np.einsum("kf,kf->k", flat @ self.precision, flat).reshape(diff.shape[:2])
        return np.sqrt(np.maximum(distances.min(axis=1), 0))

    def tensors(self) -> dict[str, np.ndarray]:
        return {"means": self.means, "precision": self.precision}

    def params(self) -> dict:
        return {}

    @classmethod
    def from_stored(cls, tensors: dict[str, np.ndarray], params: dict) -> "MahalanobisDetector":
        return cls(means=tensors["means"], precision=tensors["precision"])


@dataclass(frozen=True)
class EnergyDetector:
    """Negative free energy -logsumexp(logits) (Liu et al. 2020): needs only the logits."""

    @classmethod
    def fit(cls, features: np.ndarray, labels: np.ndarray, logits: np.ndarray) -> "EnergyDetector":
        return cls()

    def score(self, features: np.ndarray, logits: np.ndarray) -> np.ndarray:
        return -special.logsumexp(np.asarray(logits, dtype=np.float64), axis=1)

    def tensors(self) -> dict[str, np.ndarray]:
        return {}

    def params(self) -> dict:
        return {}

    @classmethod
    def from_stored(cls, tensors: dict[str, np.ndarray], params: dict) -> "EnergyDetector":
        return cls()


OOD_DETECTORS = {"knn": KNNDetector, "mahalanobis": MahalanobisDetector, "energy": EnergyDetector}


def fit_ood_detector(method: str, features: np.ndarray, labels: np.ndarray, logits: np.ndarray):
    if method not in OOD_DETECTORS:
        raise ValueError(f"unknown OOD method {method!r}; choose one of {sorted(OOD_DETECTORS)}")
    return OOD_DETECTORS[method].fit(np.asarray(features), np.asarray(labels), np.asarray(logits))


# ----------------------------------------------------------------------------- QC reference

def qc_reference(rows: Sequence[Mapping[str, float]], quantiles: tuple[float, float] = QC_QUANTILES,
                 margin: float = QC_MARGIN,
                 magnification_tolerance: float | None = MAGNIFICATION_TOLERANCE) -> dict[str, dict[str, float]]:
    """Accepted range of every checked QC statistic: the ``quantiles`` of the training images'
    values widened by ``margin`` of their width on each side, plus the median for drift plots.

    Cell size (``SCALE_STATISTICS``) is also held within ``magnification_tolerance`` times its
    median either way. A field imaged at another magnification scales every cell by the same
    factor, and an additive band around a wide spread let a healthy field at half the training
    magnification pass (its lymphocytes as small in the model's input as nothing it learnt, and
    called Pro-B with confidence: docs/TRUST.md, "Magnification"). None: no such bound."""
    reference = {}
    for name in QC_CHECKS:
        values = np.array([row[name] for row in rows], dtype=np.float64)
        values = values[np.isfinite(values)]
        if not len(values):
            continue
        low, high = np.quantile(values, quantiles)
        pad, median = margin * (high - low), float(np.median(values))
        low, high = low - pad, high + pad
        if name in SCALE_STATISTICS and magnification_tolerance:
            low, high = max(low, median / magnification_tolerance), min(high, median * magnification_tolerance)
        reference[name] = {"low": float(low), "high": float(high), "median": median}
    return reference


# ----------------------------------------------------------------------------- the trust section

@dataclass(frozen=True)
class Trust:
    """The model card's ``trust`` section plus the loaded OOD detector (``load_trust``)."""

    temperature: float
    ood_method: str
    ood_threshold: float
    qc_reference: dict[str, dict[str, float]]
    detector: object = None
    blast_threshold: float = BLAST_THRESHOLD  # a cell model's: fit_blast_threshold

    def ood_scores(self, features: np.ndarray, logits: np.ndarray) -> np.ndarray:
        return self.detector.score(np.asarray(features), np.asarray(logits))


class Review(NamedTuple):
    needs_review: bool
    review_reason: str | None  # "; "-joined REVIEW_REASONS, None when nothing is wrong
    call: str  # one of CALLS


def qc_reasons(qc: Mapping[str, float], qc_reference: Mapping[str, Mapping[str, float]]) -> list[str]:
    """Why the QC values fall outside the training range (empty when they do not). A missing
    or NaN value (e.g. cell size without cells) is not judged: another check covers it."""
    reasons = []
    for name, (below, above) in QC_CHECKS.items():
        value, limits = qc.get(name), qc_reference.get(name)
        if value is None or limits is None or not math.isfinite(value):
            continue
        if below and value < limits["low"]:
            reasons.append(below)
        elif above and value > limits["high"]:
            reasons.append(above)
    return list(dict.fromkeys(reasons))


def review_row(qc: Mapping[str, float], ood_score: float, blast_probability: float,
               trust: Trust | Mapping) -> Review:
    """The review decision of one scored row.

    ``blast_probability`` is the calibrated sum over the label set's blast classes (scoring
    owns which classes are blasts). A row outside the model's domain or failing QC keeps its
    probabilities but gets ``needs_review`` and the call "abstain": a lab must not act on it.
    ``trust`` is a ``Trust`` or the card's ``trust`` dict.
    """
    if isinstance(trust, Mapping):
        trust = trust_from_card_section(trust)
    reasons = ([OUT_OF_DISTRIBUTION] if ood_score > trust.ood_threshold else [])
    reasons += qc_reasons(qc, trust.qc_reference)
    if reasons:
        return Review(True, "; ".join(reasons), "abstain")
    return Review(False, None, probability_call(blast_probability))


def cell_call(ood_score: float, blast_probability: float, trust: Trust | Mapping) -> Review:
    """A cell model's decision on one crop: out of its distribution -> abstain; a calibrated
    blast probability at or above its ``blast_threshold`` -> blast; between ``BLAST_THRESHOLD``
    and that threshold -> abstain (``BLAST_UNCERTAIN``: likely a blast, not sure enough to act on);
    below -> not blast."""
    if isinstance(trust, Mapping):
        trust = trust_from_card_section(trust)
    review = review_row({}, ood_score, blast_probability, trust)
    if review.needs_review or not BLAST_THRESHOLD <= blast_probability < trust.blast_threshold:
        return review
    return Review(True, BLAST_UNCERTAIN, "abstain")


def review_cell(ood_score: float, blast_probability: float, trust: Trust | Mapping, *,
                cell_diameter_px: float, pixels_per_cell_diameter: float) -> Review:
    """The review decision of one cell row scored by a cell model: its OOD score on the crop
    against the cell model's threshold, and the cell size. A crop is resized so a cell diameter
    spans ``pixels_per_cell_diameter`` (the cell card's geometry); cells much smaller than that in
    the field's pixels are enlarged, and an enlarged crop lacks the detail the model learned from
    (e.g. 224 px Taleqani fields, 27 px cells, before a cell model trained on 120 px ALL-IDB
    cells), so above ``MAX_CELL_ENLARGEMENT`` the row needs review. A NaN diameter is not judged."""
    review = cell_call(ood_score, blast_probability, trust)
    if not cell_diameter_px * MAX_CELL_ENLARGEMENT < pixels_per_cell_diameter:
        return review
    reasons = [r for r in (review.review_reason, CELL_SIZE_DIFFERS) if r]
    return Review(True, "; ".join(reasons), "abstain")


def probability_call(blast_probability: float) -> str:
    """The call the probabilities alone make ("blast" / "not blast"), for a row nothing flags."""
    return "blast" if blast_probability >= BLAST_THRESHOLD else "not blast"


def review_image(qc: Mapping[str, float], ood_score: float, blast_probability: float | None,
                 trust: Trust | Mapping) -> Review:
    """The review decision of one field, or one tile of a slide: ``review_row``. Without a blast
    probability (a label set without blast classes) an image nothing flags makes no call."""
    review = review_row(qc, ood_score, math.nan if blast_probability is None else blast_probability,
                        trust)
    if blast_probability is None and not review.needs_review:
        review = review._replace(call=None)
    return review


def review_by_field(field: Review, blast_probability: float | None) -> Review:
    """The review decision of a cell scored without a cell model: its image is its field's, so it
    needs review when its field does (``field``: the field's review); else its own probability
    makes the call."""
    if field.needs_review:
        return field
    return Review(False, None, _call(blast_probability))


def unchecked(blast_probability: float | None) -> Review:
    """A row of a model without a trust section: nothing is checked (``needs_review`` unknown,
    the reason says so) and the probabilities make the call."""
    return Review(None, NO_TRUST_CHECKS, _call(blast_probability))


SLIDE_REVIEW_SHARE = 0.10  # a slide needs review when more than this share of its tiles do


def review_slide(tiles: Sequence[Review]) -> Review:
    """A slide's review from its scored tiles' reviews: it needs one when more than
    ``SLIDE_REVIEW_SHARE`` of its checked tiles do (its cells are judged tile by tile); a slide
    makes no call of its own."""
    checked = [t for t in tiles if t.needs_review is not None]
    if not checked:
        return Review(None, NO_TRUST_CHECKS if tiles else None, None)
    flagged = [t for t in checked if t.needs_review]
    if len(flagged) <= SLIDE_REVIEW_SHARE * len(checked):
        return Review(False, None, None)
    reasons = sorted({r for t in flagged for r in (t.review_reason or "").split("; ") if r})
    return Review(True, f"{len(flagged)} of {len(checked)} tiles need review: {'; '.join(reasons)}", None)


def _call(blast_probability: float | None) -> str | None:
    return None if blast_probability is None else probability_call(blast_probability)


def stale_qc_checks(section: Mapping) -> list[str]:
    """The QC statistics whose range in the card was fitted on another definition than the one
    ``allcore.imaging.qc`` computes now (the card keeps each statistic's description, ``qc_columns``):
    judging new values by old ranges would flag or pass fields for the wrong reason, so those
    ranges are not applied until the trust section is refitted."""
    fitted = section.get("qc_columns", {})
    return [name for name in section["qc_reference"] if fitted.get(name) != QC_COLUMNS.get(name)]


def stale_qc_warning(section: Mapping) -> str | None:
    """What to tell a user whose card has stale QC ranges (None when it has none)."""
    stale = stale_qc_checks(section)
    return None if not stale else (
        f"the model card's image QC ranges for {', '.join(stale)} were fitted on an earlier "
        f"definition of those statistics and are not applied: their review reasons cannot occur "
        f"in this run. Refit the trust section with allcore.training.trust_fitting.attach_trust(artifact, "
        f"split_manifest), or retrain")


def trust_from_card_section(section: Mapping) -> Trust:
    """The card's trust section, less the QC ranges ``stale_qc_checks`` names."""
    stale = stale_qc_checks(section)
    return Trust(temperature=float(section["temperature"]), ood_method=section["ood"]["method"],
                 ood_threshold=float(section["ood"]["threshold"]),
                 blast_threshold=float(section.get("blast_threshold", BLAST_THRESHOLD)),
                 qc_reference={k: dict(v) for k, v in section["qc_reference"].items() if k not in stale})


def write_trust_file(artifact_uri: str, tensors: dict[str, np.ndarray]) -> str:
    """Write the detector's arrays beside the weights; returns their sha256 for the card."""
    data = safetensors.numpy.save({k: np.ascontiguousarray(v) for k, v in tensors.items()})
    files.write_bytes(files.join(artifact_uri, TRUST_FILE), data)
    return hashlib.sha256(data).hexdigest()


def load_trust(artifact_uri: str, section: Mapping, *, detector_bytes: bytes | None = None) -> Trust:
    """The card's trust section with its OOD detector loaded and hash-checked (``detector_bytes``:
    the detector file's bytes, where the caller verified them already). A section and file that
    do not make a detector (the card edited, another model's file) raise
    ``ArtifactIntegrityError``."""
    try:
        ood = section["ood"]
        data = (verified_file(artifact_uri, ood["file"], ood["sha256"]) if detector_bytes is None
                else detector_bytes)
        detector = OOD_DETECTORS[ood["method"]].from_stored(safetensors.numpy.load(data), ood["params"])
        return replace(trust_from_card_section(section), detector=detector)
    except ArtifactIntegrityError:
        raise
    # safetensors raises its own SafetensorError; a detector missing an array, a KeyError
    except (KeyError, TypeError, ValueError, IndexError, safetensors.SafetensorError) as exc:
        raise ArtifactIntegrityError(
            f"the trust section of {files.join(artifact_uri, CARD_FILE)} and its detector file do "
            f"not make an OOD detector ({type(exc).__name__}: {exc}): the card was edited or the "
            f"file belongs to another model. Re-export the model, or refit its trust section "
            f"with allcore.training.trust_fitting.attach_trust(artifact, split_manifest)."
        ) from exc
