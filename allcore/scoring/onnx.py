"""ONNX Runtime on CPU, without torch: open an exported model, run it in cache-sized chunks,
and keep each export in a local cache so the next run's actors skip torch altogether.

A scoring actor on the fast CPU path used to import torch and the model code (about 2.8 CPU-s),
rebuild the model and export it to ONNX (0.3-0.4 s a model) before scoring its first block; a
nightly run did that again for the same weights in every actor. The export is a pure function
of the weights, the input size, torch's exporter, the opset and what we put in the graph, so it
is stored once per node under ``cache_dir()`` with all five in its name; a later actor that
finds it opens it with ONNX Runtime alone (``allcore.scoring.predict.ScoringModel``). The
weights' sha256 is the card's, which the actor verifies against the weight file before it
trusts the name.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import logging
import os
import sys
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np

log = logging.getLogger("allcore.scoring.onnx")

OPSET = 17  # the ONNX opset every export uses (allcore.scoring.runtimes.export_onnx)
EXPORT_FORMAT = 1
# What export_onnx puts in the graph (its input, its two outputs, the features-and-logits
# wrapper): raise it when that changes, so exports cached before are not opened again.
CACHE_ENV = "ALLCORE_CACHE_DIR"
# Where exports are kept: $ALLCORE_CACHE_DIR, else $XDG_CACHE_HOME/allcore, else ~/.cache/allcore.
# Safe to delete at any time (the next run exports again).

ONNX_CHUNK_PIXELS = 150_000
# Input pixels (rows x side x side) per ONNX Runtime call on CPU. A large batch's activations
# spill out of the CPU caches: MobileNetV2 ran 1.2-1.3x slower per image in calls of 256 rows
# than in these chunks (96, 128 and 224 px, 1 and 2 threads; benchmarks/onnx_chunk_rows.py,
# docs/PERFORMANCE.md), so a batch is run in chunks of about this many pixels: 2 rows at 224 px,
# 9 at 128, 16 at 96.

# float32 N x 3 x S x S pixels -> (features, logits), float32 N x F and N x C
ModelOutputs = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


def installed() -> bool:
    """Whether ONNX Runtime (the ``fast`` extra) is importable."""
    return importlib.util.find_spec("onnxruntime") is not None


def threads() -> int:
    """Intra-op threads: torch's count where this process has loaded torch (a caller may have
    set it), else OMP_NUM_THREADS, which torch would follow and Ray sets to the CPUs it gave
    the actor, else every CPU."""
    torch = sys.modules.get("torch")
    if torch is not None:
        return torch.get_num_threads()
    return int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count() or 1)


def open_session(model: bytes):
    """An ONNX Runtime CPU session of an exported model (all graph optimisations)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads()
    options.inter_op_num_threads = 1
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    return onnxruntime.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def session_outputs(session, input_size: int) -> ModelOutputs:
    """The session as a pixels -> (features, logits) function, run ``ONNX_CHUNK_PIXELS`` at a time."""
    rows = max(1, ONNX_CHUNK_PIXELS // input_size ** 2)

    def outputs(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        pixels = np.ascontiguousarray(pixels, np.float32)
        chunks = [session.run(None, {"pixels": pixels[start:start + rows]})
                  for start in range(0, len(pixels), rows)] or [session.run(None, {"pixels": pixels})]
        features, logits = (np.concatenate(parts) for parts in zip(*chunks))
        return features, logits

    return outputs


def cache_dir() -> Path:
    """The export cache's folder (``CACHE_ENV``)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "allcore"


def cache_key(weights_sha256: str, input_size: int) -> str:
    """The file name of one export: the weights, the input size, torch's exporter (read from the
    installed package's metadata: no torch import), the opset and ``EXPORT_FORMAT``."""
    return (f"{weights_sha256}-{input_size}px-torch{importlib.metadata.version('torch')}"
            f"-opset{OPSET}-format{EXPORT_FORMAT}.onnx")


def cached_session(key: str):
    """The session of the cached export ``key``, or None when there is none or it does not open
    (a damaged file is removed: the caller exports again)."""
    path = cache_dir() / "onnx" / key
    try:
        model = path.read_bytes()
    except OSError:
        return None
    try:
        return open_session(model)
    except Exception as err:  # ONNX Runtime raises its own exception types for a bad model
        log.warning("cached ONNX export %s does not open (%s); exporting again", path, err)
        path.unlink(missing_ok=True)
        return None


def store(key: str, model: bytes) -> None:
    """Keep an export under ``key`` (written under a temporary name, then renamed, so a reader
    never sees half a file). A cache that cannot be written is logged, not raised: scoring goes
    on with the export in memory."""
    folder = cache_dir() / "onnx"
    partial = folder / f".{key}.{uuid.uuid4().hex[:8]}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        partial.write_bytes(model)
        os.replace(partial, folder / key)
    except OSError as err:
        with contextlib.suppress(OSError):
            partial.unlink()
        log.warning("could not keep the ONNX export in %s (%s): the next run exports again; set "
                    "%s to a writable folder", folder, err, CACHE_ENV)
