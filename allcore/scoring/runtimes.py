"""The model on prepared pixels with torch: the eager reference path and the fast paths.

Each path is a ``ModelOutputs`` function (``allcore.scoring.onnx``): float32 N x 3 x S x S pixels
-> (features, logits), float32 numpy N x F and N x C from one forward pass. The features are the
penultimate layer the card's OOD detector was fitted on (``allcore.models.registry.features_and_logits``),
so every path must return them. ``allcore.scoring.predict`` imports this module only where it
needs torch: an actor whose fast path is already in the ONNX export cache never does.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable

import numpy as np
import torch
from scipy import special

from allcore.models.registry import FeaturesAndLogits, features_and_logits
from allcore.scoring import onnx
from allcore.scoring.onnx import ModelOutputs

log = logging.getLogger("allcore.scoring.runtimes")


def _numpy(features: torch.Tensor, logits: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    return features.float().cpu().numpy(), logits.float().cpu().numpy()


def eager_outputs(model: torch.nn.Module, device: torch.device) -> ModelOutputs:
    """The reference path: the model as trained, fp32, eager, ``inference_mode``."""
    model.to(device).eval()

    def outputs(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x = torch.from_numpy(np.ascontiguousarray(pixels)).to(device)
        return _numpy(*features_and_logits(model, x))

    return outputs


def export_onnx(model: torch.nn.Module, input_size: int) -> bytes:
    """``model``'s features and logits as an ONNX graph (fp32, any batch size)."""
    buffer = io.BytesIO()
    example = torch.zeros(1, 3, input_size, input_size)
    # the wrapper in eval mode: export puts a module back into the mode it had, and a new
    # module is in training mode, which would leave ``model`` with batch-statistics BatchNorm
    torch.onnx.export(FeaturesAndLogits(model).eval(), (example,), buffer, input_names=["pixels"],
                      output_names=["features", "logits"],
                      dynamic_axes={"pixels": {0: "batch"}, "features": {0: "batch"},
                                    "logits": {0: "batch"}},
                      opset_version=onnx.OPSET, dynamo=False)
    return buffer.getvalue()


def onnx_session(model: torch.nn.Module, input_size: int, cache_key: str | None = None):
    """An ONNX Runtime session of ``model``, or None when ``onnxruntime`` is not installed (the
    ``fast`` extra). With ``cache_key`` (``onnx.cache_key`` of the model's verified weights) the
    export is read from, or kept in, the local export cache."""
    if not onnx.installed():
        return None
    session = onnx.cached_session(cache_key) if cache_key else None
    if session is None:
        exported = export_onnx(model, input_size)
        if cache_key:
            onnx.store(cache_key, exported)
        session = onnx.open_session(exported)
    return session


def fast_outputs(model: torch.nn.Module, device: torch.device, input_size: int,
                 cache_key: str | None = None) -> ModelOutputs:
    """The fast path, same fp32 weights. CPU: ONNX Runtime (graph fusions; 7-10x eager on
    MobileNetV2, see docs/PERFORMANCE.md; ``cache_key`` as in ``onnx_session``), else a frozen
    TorchScript trace in channels_last; both agree with eager to ~1e-6 in probability. CUDA:
    channels_last + bf16 (fp16 without bf16) autocast, which moves probabilities by up to
    ~1e-2, the usual AMP tolerance."""
    model.to(device).eval()
    if device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        model.to(memory_format=torch.channels_last)

        def outputs(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            x = torch.from_numpy(np.ascontiguousarray(pixels)).to(device)
            with torch.autocast("cuda", dtype=dtype):
                return _numpy(*features_and_logits(model, x.contiguous(memory_format=torch.channels_last)))

        return outputs
    session = onnx_session(model, input_size, cache_key)
    if session is not None:
        return onnx.session_outputs(session, input_size)
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
                  device: torch.device | str | None = None, cache_key: str | None = None) -> ModelOutputs:
    """The pixels -> (features, logits) function of one path. The device is picked here, once,
    unless given: CUDA when available, else CPU. ``cache_key``: see ``onnx_session``."""
    device = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if fast:
        return fast_outputs(model, device, input_size, cache_key)
    return eager_outputs(model, device)


def probability_function(model: torch.nn.Module, *, input_size: int, fast: bool,
                         device: torch.device | None = None) -> Callable[[np.ndarray], np.ndarray]:
    """float32 N x 3 x S x S pixels -> float32 N x C softmax probabilities (uncalibrated: the
    benchmarks' view of one path)."""
    outputs = model_outputs(model, input_size=input_size, fast=fast, device=device)
    return lambda pixels: special.softmax(outputs(pixels)[1], axis=1).astype(np.float32)
