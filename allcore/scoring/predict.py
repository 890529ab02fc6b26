"""The predict stage: the model on prepared pixels, on CPU or GPU, eager or fast.

``Predictor`` is the ``map_batches`` class of ``pipelines/score.py`` (one per actor, so the model
is loaded once per actor); it takes and returns ``dict[str, np.ndarray]`` batches, so it is
tested without Ray. ``model_outputs`` is the pixels -> (features, logits) function alone.

With a ``trust`` section in the model card the probabilities are temperature-scaled (calibrated)
and every ok row gets an ``ood_score`` from the same forward pass (``allcore.trust``); without
one they are the plain softmax and ``ood_score`` is NaN (the driver warns once).
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable

import numpy as np
import torch
from scipy import special

from allcore.artifact import load_artifact
from allcore.labels import get_label_set
from allcore.scoring.table import CELL, OK, prob_column
from allcore.models import FeaturesAndLogits, features_and_logits
from allcore.trust import calibrated_probabilities, load_trust

log = logging.getLogger("allcore.scoring.predict")


# A model-outputs function: float32 N x 3 x S x S pixels -> (features, logits), float32 numpy
# N x F and N x C from one forward pass. The features are the penultimate layer the card's OOD
# detector was fitted on (allcore.models.features_and_logits), so every path must return them.
ModelOutputs = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


def _numpy(features: torch.Tensor, logits: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    return features.float().cpu().numpy(), logits.float().cpu().numpy()


def eager_outputs(model: torch.nn.Module, device: torch.device) -> ModelOutputs:
    """The reference path: the model as trained, fp32, eager, ``inference_mode``."""
    model.to(device).eval()

    def outputs(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x = torch.from_numpy(np.ascontiguousarray(pixels)).to(device)
        return _numpy(*features_and_logits(model, x))

    return outputs


ONNX_CHUNK_PIXELS = 150_000
# Input pixels (rows x side x side) per ONNX Runtime call on CPU. A large batch's activations
# spill out of the CPU caches: MobileNetV2 ran 1.2-1.3x slower per image in calls of 256 rows
# than in these chunks (96, 128 and 224 px, 1 and 2 threads; benchmarks/onnx_chunk_rows.py,
# docs/PERFORMANCE.md), so a batch is run in chunks of about this many pixels: 2 rows at 224 px,
# 9 at 128, 16 at 96.


def onnx_session(model: torch.nn.Module, input_size: int):
    """Export ``model`` (features and logits) to ONNX in memory and open an ONNX Runtime
    session, or None when ``onnxruntime`` is not installed (the ``fast`` extra). Threads:
    ``torch.get_num_threads()``, which follows OMP_NUM_THREADS, i.e. the CPUs Ray gave this actor."""
    try:
        import onnxruntime
    except ImportError:
        return None
    buffer = io.BytesIO()
    example = torch.zeros(1, 3, input_size, input_size)
    # the wrapper in eval mode: export puts a module back into the mode it had, and a new
    # module is in training mode, which would leave ``model`` with batch-statistics BatchNorm
    torch.onnx.export(FeaturesAndLogits(model).eval(), (example,), buffer, input_names=["pixels"],
                      output_names=["features", "logits"],
                      dynamic_axes={"pixels": {0: "batch"}, "features": {0: "batch"},
                                    "logits": {0: "batch"}},
                      opset_version=17, dynamo=False)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    return onnxruntime.InferenceSession(buffer.getvalue(), options,
                                        providers=["CPUExecutionProvider"])


def fast_outputs(model: torch.nn.Module, device: torch.device, input_size: int) -> ModelOutputs:
    """The fast path, same fp32 weights. CPU: ONNX Runtime (graph fusions; 7-10x eager on
    MobileNetV2, see docs/PERFORMANCE.md), else a frozen TorchScript trace in channels_last;
    both agree with eager to ~1e-6 in probability. CUDA: channels_last + bf16 (fp16 without
    bf16) autocast, which moves probabilities by up to ~1e-2, the usual AMP tolerance."""
    model.to(device).eval()
    if device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        model.to(memory_format=torch.channels_last)

        def outputs(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            x = torch.from_numpy(np.ascontiguousarray(pixels)).to(device)
            with torch.autocast("cuda", dtype=dtype):
                return _numpy(*features_and_logits(model, x.contiguous(memory_format=torch.channels_last)))

        return outputs
    session = onnx_session(model, input_size)
    if session is not None:
        rows = max(1, ONNX_CHUNK_PIXELS // input_size ** 2)

        def outputs(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            pixels = np.ascontiguousarray(pixels, np.float32)
            chunks = [session.run(None, {"pixels": pixels[start:start + rows]})
                      for start in range(0, len(pixels), rows)] or [session.run(None, {"pixels": pixels})]
            features, logits = (np.concatenate(parts) for parts in zip(*chunks))
            return features, logits

        return outputs
    log.warning("onnxruntime is not installed (pip install 'allcore[fast]'); the fast path uses "
                "a frozen TorchScript trace instead, which is slower")
    model.to(memory_format=torch.channels_last)
    example = torch.zeros(1, 3, input_size, input_size).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        frozen = torch.jit.freeze(torch.jit.trace(FeaturesAndLogits(model).eval(), example))

    def outputs(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x = torch.from_numpy(np.ascontiguousarray(pixels)).contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            return _numpy(*frozen(x))

    return outputs


def model_outputs(model: torch.nn.Module, *, input_size: int, fast: bool,
                  device: torch.device | None = None) -> ModelOutputs:
    """The pixels -> (features, logits) function of one path. The device is picked here, once:
    CUDA when available, else CPU."""
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if fast:
        return fast_outputs(model, device, input_size)
    return eager_outputs(model, device)


def probability_function(model: torch.nn.Module, *, input_size: int, fast: bool,
                         device: torch.device | None = None) -> Callable[[np.ndarray], np.ndarray]:
    """float32 N x 3 x S x S pixels -> float32 N x C softmax probabilities (uncalibrated: the
    benchmarks' view of one path)."""
    outputs = model_outputs(model, input_size=input_size, fast=fast, device=device)
    return lambda pixels: special.softmax(outputs(pixels)[1], axis=1).astype(np.float32)


class ScoringModel:
    """One artifact as scoring runs it: pixels -> (probabilities, OOD scores) from one forward
    pass. With a ``trust`` section in the card the probabilities are temperature-scaled and the
    OOD scores come from its detector; without one they are the plain softmax and NaN.

    ``expected_sha256`` guards against the artifact being replaced while a run is going: the
    driver recorded one model in the table, so every actor must score with that one."""

    def __init__(self, artifact_uri: str, expected_sha256: str | None = None, fast: bool = False):
        model, self.card = load_artifact(artifact_uri)
        self.model = model  # the review app's saliency uses this same, verified model
        if expected_sha256 is not None and self.card.weights_sha256 != expected_sha256:
            raise ValueError(f"artifact {artifact_uri} now has weights {self.card.weights_sha256}, "
                             f"but this run started with {expected_sha256}; it was replaced "
                             "mid-run: rerun the job")
        self.classes = list(self.card.classes)
        self.trust = load_trust(artifact_uri, self.card.trust) if self.card.trust else None
        self.outputs = model_outputs(model, input_size=int(self.card.data_config["input_size"]),
                                     fast=fast)

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
                 cell_fast: bool = False):
        self.field_model = ScoringModel(artifact_uri, expected_sha256, fast)
        self.cell_model = None
        if cell_artifact_uri is not None:
            self.cell_model = ScoringModel(cell_artifact_uri, cell_expected_sha256, cell_fast)
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
