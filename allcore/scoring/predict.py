"""The predict stage: the model on prepared pixels, on CPU or GPU, eager or fast.

``Predictor`` is the ``map_batches`` class of ``pipelines/score.py`` (one per actor, so the model
is loaded once per actor); it takes and returns ``dict[str, np.ndarray]`` batches, so it is
tested without Ray. ``probability_function`` is the pixels -> probabilities function alone.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable

import numpy as np
import torch

from allcore.artifact import load_artifact
from allcore.labels import get_label_set
from allcore.scoring.table import CELL, OK, prob_column

log = logging.getLogger("allcore.scoring.predict")


def eager_probabilities(model: torch.nn.Module, device: torch.device) -> Callable[[np.ndarray], np.ndarray]:
    """The reference path: the model as trained, fp32, eager, ``inference_mode``."""
    model.to(device).eval()

    def probabilities(pixels: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            logits = model(torch.from_numpy(np.ascontiguousarray(pixels)).to(device))
            return torch.softmax(logits.float(), dim=1).cpu().numpy()

    return probabilities


def _onnx_session(model: torch.nn.Module, input_size: int):
    """Export ``model`` to ONNX in memory and open an ONNX Runtime session, or None when
    ``onnxruntime`` is not installed (the ``fast`` extra). Threads: ``torch.get_num_threads()``,
    which follows OMP_NUM_THREADS, i.e. the CPUs Ray gave this actor."""
    try:
        import onnxruntime
    except ImportError:
        return None
    buffer = io.BytesIO()
    example = torch.zeros(1, 3, input_size, input_size)
    torch.onnx.export(model, (example,), buffer, input_names=["pixels"], output_names=["logits"],
                      dynamic_axes={"pixels": {0: "batch"}, "logits": {0: "batch"}},
                      opset_version=17, dynamo=False)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    return onnxruntime.InferenceSession(buffer.getvalue(), options,
                                        providers=["CPUExecutionProvider"])


def fast_probabilities(model: torch.nn.Module, device: torch.device,
                       input_size: int) -> Callable[[np.ndarray], np.ndarray]:
    """The fast path, same fp32 weights. CPU: ONNX Runtime (graph fusions; 7-10x eager on
    MobileNetV2, see docs/PERFORMANCE.md), else a frozen TorchScript trace in channels_last;
    both agree with eager to ~1e-6 in probability. CUDA: channels_last + bf16 (fp16 without
    bf16) autocast, which moves probabilities by up to ~1e-2, the usual AMP tolerance."""
    model.to(device).eval()
    if device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        model.to(memory_format=torch.channels_last)

        def probabilities(pixels: np.ndarray) -> np.ndarray:
            x = torch.from_numpy(np.ascontiguousarray(pixels)).to(device)
            with torch.inference_mode(), torch.autocast("cuda", dtype=dtype):
                logits = model(x.contiguous(memory_format=torch.channels_last))
            return torch.softmax(logits.float(), dim=1).cpu().numpy()

        return probabilities
    session = _onnx_session(model, input_size)
    if session is not None:
        def probabilities(pixels: np.ndarray) -> np.ndarray:
            logits = session.run(None, {"pixels": np.ascontiguousarray(pixels, np.float32)})[0]
            return torch.softmax(torch.from_numpy(logits), dim=1).numpy()

        return probabilities
    log.warning("onnxruntime is not installed (pip install 'allcore[fast]'); the fast path uses "
                "a frozen TorchScript trace instead, which is slower")
    model.to(memory_format=torch.channels_last)
    example = torch.zeros(1, 3, input_size, input_size).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        frozen = torch.jit.freeze(torch.jit.trace(model, example))

    def probabilities(pixels: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(pixels)).contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            return torch.softmax(frozen(x), dim=1).numpy()

    return probabilities


def probability_function(model: torch.nn.Module, *, input_size: int, fast: bool,
                         device: torch.device | None = None) -> Callable[[np.ndarray], np.ndarray]:
    """float32 N x 3 x S x S pixels -> float32 N x C softmax probabilities. The device is picked
    here, once: CUDA when available, else CPU."""
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if fast:
        return fast_probabilities(model, device, input_size)
    return eager_probabilities(model, device)


class Predictor:
    """Scores prepared batches. ``__init__`` loads the artifact once per actor; class names and
    their order come from its model card, never from this code. ``fast`` selects
    ``fast_probabilities`` instead of the eager reference path.

    ``expected_sha256`` guards against the artifact being replaced while a run is going: the
    driver recorded one model in the table, so every actor must score with that one.

    With ``cell_artifact_uri`` (``--cell-model``) cell rows are scored by that model on their
    ``cell_pixels`` instead: their ``pred_label`` and ``confidence`` are the cell model's, their
    field-class probabilities stay NaN, and ``blast_probability`` carries the cell model's
    probability of its blast classes (NaN on field rows, whose value the table derives).
    """

    def __init__(self, artifact_uri: str, expected_sha256: str | None = None, fast: bool = False,
                 cell_artifact_uri: str | None = None, cell_expected_sha256: str | None = None):
        card, self.probabilities = _loaded(artifact_uri, expected_sha256, fast)
        self.classes = list(card.classes)
        self.cell_probabilities = None
        if cell_artifact_uri is not None:
            cell_card, self.cell_probabilities = _loaded(cell_artifact_uri, cell_expected_sha256, fast)
            self.cell_classes = list(cell_card.classes)
            self.cell_blast = [self.cell_classes.index(c) for c in
                               get_label_set(cell_card.label_set).blast_classes_of(self.cell_classes)]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = {k: v for k, v in batch.items() if k not in ("pixels", "cell_pixels")}
        ok = np.asarray(batch["status"] == OK, dtype=bool)
        n = len(ok)
        by_cell_model = np.zeros(n, bool)
        if self.cell_probabilities is not None:
            by_cell_model = ok & (np.asarray(batch["row_kind"]) == CELL)
        by_field_model = ok & ~by_cell_model
        probs = np.full((n, len(self.classes)), np.nan, np.float32)
        if by_field_model.any():
            probs[by_field_model] = self.probabilities(batch["pixels"][by_field_model])
        labels, confidence = _best(probs, self.classes, by_field_model)
        if self.cell_probabilities is not None:
            cell_probs = np.full((n, len(self.cell_classes)), np.nan, np.float32)
            if by_cell_model.any():
                cell_probs[by_cell_model] = self.cell_probabilities(batch["cell_pixels"][by_cell_model])
            cell_labels, cell_confidence = _best(cell_probs, self.cell_classes, by_cell_model)
            labels = np.where(by_cell_model, cell_labels, labels)
            confidence = np.where(by_cell_model, cell_confidence, confidence)
            out["blast_probability"] = cell_probs[:, self.cell_blast].sum(axis=1)
        out["pred_label"], out["confidence"] = labels, confidence
        for j, cls in enumerate(self.classes):
            out[prob_column(cls)] = probs[:, j]
        return out


def _loaded(artifact_uri: str, expected_sha256: str | None, fast: bool):
    """(model card, probability function) of an artifact, refusing one replaced mid-run."""
    model, card = load_artifact(artifact_uri)
    if expected_sha256 is not None and card.weights_sha256 != expected_sha256:
        raise ValueError(f"artifact {artifact_uri} now has weights {card.weights_sha256}, "
                         f"but this run started with {expected_sha256}; it was replaced "
                         "mid-run: rerun the job")
    return card, probability_function(
        model, input_size=int(card.data_config["input_size"]), fast=fast)


def _best(probs: np.ndarray, classes: list[str], scored: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(label, its probability) per row; "" and NaN where ``scored`` is False."""
    best = np.argmax(np.nan_to_num(probs, nan=-1.0), axis=1)
    labels = np.array([classes[b] if good else "" for b, good in zip(best, scored)], dtype=object)
    confidence = np.where(scored, probs[np.arange(len(probs)), best], np.nan).astype(np.float32)
    return labels, confidence
