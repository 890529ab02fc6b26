"""Which inference path each model of a run scores with, and why (recorded in the run summary).

Decided once per model on the driver, from the model's registry name, its card's OOD detector
and what is installed; NumPy only, so the driver (which never imports torch) can decide it and
``allcore.scoring.predict`` builds the chosen path in the actors.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import numpy as np

from allcore.scoring.config import INFERENCE_MODES
from allcore.trust.checks import Trust, load_trust


# Registry models whose fast CPU path (ONNX Runtime, fp32) was measured against the eager fp32
# path on real Taleqani images by benchmarks/fast_path_agreement.py (docs/PERFORMANCE.md, "Which
# path scores by default"): identical argmax on >= 99.5 % of the images and faster. This list is
# the benchmark's verdict and the one place the default path reads it. Agreement of an fp32
# export is a property of the architecture's operators and the runtime (the same graph computes
# the same sums in another order), not of one set of trained weights, so one measurement per
# registry model covers every artifact of it, including those trained before the measurement;
# tests/test_fast_path.py re-checks each listed model on generated images at every test run.
FAST_PATH_VERIFIED = frozenset({"efficientnet_b3", "efficientnet_lite0", "efficientnet_lite1",
                                "efficientnet_lite2", "mobilenet_m", "mobilenet_v1", "mobilenet_v2",
                                "vgg16_cnn"})


# The fast path changes penultimate features by up to 2.9e-6 of their scale (docs/PERFORMANCE.md,
# agreement table). A card whose OOD scores move by more than OOD_MAX_SHIFT of its threshold
# under a change that size scores eager: its detector was fitted on features that barely vary
# (the README demo's, one epoch on generated images: ONNX Runtime flagged all 24 sample fields
# out of distribution, the eager path 2), and only the bit-identical eager features reproduce
# its scores.
FEATURE_REORDERING = 3e-6
OOD_MAX_SHIFT = 0.01


def ood_survives_fast_path(trust: Trust | None) -> bool:
    """Whether the card's OOD scores stay put under the fast path's fp32 reordering, probed at
    the feature-space points the detector stores (class means, its feature bank), each moved by
    ``FEATURE_REORDERING`` of itself in random directions. Detectors on logits only pass."""
    points = next(iter(trust.detector.tensors().values()), None) if trust is not None else None
    if points is None:
        return True
    points = points[:16].astype(np.float32)
    signs = np.random.default_rng(0).choice([-1.0, 1.0], points.shape).astype(np.float32)
    logits = np.zeros((len(points), 1), np.float32)  # not read by feature-space detectors
    shift = np.abs(trust.detector.score(points * (1 + FEATURE_REORDERING * signs), logits)
                   - trust.detector.score(points, logits)).max()
    return bool(shift <= OOD_MAX_SHIFT * trust.ood_threshold)


@dataclass(frozen=True)
class InferencePath:
    """How one model scores in a run, and why: recorded in the run summary."""

    fast: bool  # fast_outputs instead of eager_outputs
    name: str
    reason: str


def inference_path(model_name: str, *, mode: str = "auto", cuda: bool = False,
                   ood_stable: bool = True) -> InferencePath:
    """The path a model scores with. ``auto`` (the default): the fastest path verified for this
    registry model (``FAST_PATH_VERIFIED``) when its card's OOD scores survive it
    (``ood_stable``, see ``ood_survives_fast_path``), else eager fp32; ``exact``: eager fp32,
    the path the model was evaluated with; ``fast``: the fast path even where it is not
    verified. On CUDA the fast path is bf16 autocast, which is not verified (no GPU measurement
    yet), so ``auto`` stays eager there."""
    if mode not in INFERENCE_MODES:
        raise ValueError(f"inference mode must be one of {INFERENCE_MODES}, got {mode!r}")
    eager = "eager fp32" + (" (CUDA)" if cuda else "")
    if mode == "exact":
        return InferencePath(False, eager, "--exact")
    if cuda:
        if mode == "fast":
            return InferencePath(True, "bf16 autocast (CUDA)", "--fast")
        return InferencePath(False, eager, "the GPU fast path (bf16 autocast) is not verified "
                             "yet; --fast uses it")
    onnx = importlib.util.find_spec("onnxruntime") is not None
    fast_name = "onnxruntime fp32" if onnx else "torchscript fp32 (onnxruntime not installed)"
    if mode == "fast":
        return InferencePath(True, fast_name, "--fast")
    if model_name not in FAST_PATH_VERIFIED:
        return InferencePath(False, eager, f"{model_name} is not verified for the fast path "
                             "(docs/PERFORMANCE.md)")
    if not onnx:
        return InferencePath(False, eager, "onnxruntime is not installed (pip install "
                             "'allcore[fast]')")
    if not ood_stable:
        return InferencePath(False, eager, "the card's OOD detector is too sensitive for the fast "
                             "path's fp32 rounding (its features barely vary); --fast overrides")
    return InferencePath(True, fast_name, f"verified for {model_name} (docs/PERFORMANCE.md); "
                         "--exact for eager fp32")


def artifact_inference_path(artifact_uri: str, card, *, mode: str = "auto",
                            cuda: bool = False) -> InferencePath:
    """``inference_path`` of one artifact: its registry model and, only where ``auto`` would
    pick the fast path, its card's OOD detector (the trust file is read for that alone)."""
    path = inference_path(card.model_name, mode=mode, cuda=cuda)
    if mode != "auto" or not path.fast or not card.trust:
        return path
    return inference_path(card.model_name, mode=mode, cuda=cuda,
                          ood_stable=ood_survives_fast_path(load_trust(artifact_uri, card.trust)))
