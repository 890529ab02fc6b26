"""The fast inference path scores like the eager reference path (allcore.scoring.predict)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from allcore.models.artifact import load_artifact
from allcore.models.registry import create_model
from allcore.scoring.inference_path import (FAST_PATH_VERIFIED, artifact_inference_path, inference_path,
                                            ood_survives_fast_path)
from allcore.scoring.predict import Predictor
from allcore.scoring.runtimes import model_outputs, probability_function
from allcore.scoring.rows import OK, prob_column
from allcore.data.synthetic import make_field
from allcore.imaging.data_config import preprocess_array

# fp32 throughout (ONNX Runtime or a frozen trace): only operator fusion and summation order
# differ from eager, so probabilities agree far below anything that could flip a decision.
PROBABILITY_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def pixels() -> np.ndarray:
    return np.random.default_rng(0).normal(0, 1.5, (12, 3, 64, 64)).astype(np.float32)


@pytest.mark.parametrize("onnx", [True, False], ids=["onnxruntime", "torchscript"])
def test_fast_path_agrees_with_eager(tiny_artifact, pixels, onnx, monkeypatch):
    if onnx:
        pytest.importorskip("onnxruntime")
    else:  # the fallback when the `fast` extra is not installed
        monkeypatch.setattr("allcore.scoring.runtimes.onnx_session", lambda *args: None)
    cpu = torch.device("cpu")
    eager = probability_function(load_artifact(tiny_artifact)[0], input_size=64, fast=False,
                                 device=cpu)(pixels)
    fast = probability_function(load_artifact(tiny_artifact)[0], input_size=64, fast=True,
                                device=cpu)(pixels)
    assert len(set(eager.argmax(1))) > 1, "the fixture model must not predict one class only"
    assert fast.shape == eager.shape and fast.dtype == np.float32
    np.testing.assert_array_equal(fast.argmax(1), eager.argmax(1))
    np.testing.assert_allclose(fast, eager, atol=PROBABILITY_TOLERANCE, rtol=0)


@pytest.mark.parametrize("onnx", [True, False], ids=["onnxruntime", "torchscript"])
def test_fast_path_returns_the_same_features_for_the_ood_score(tiny_artifact, pixels, onnx,
                                                               monkeypatch):
    """The OOD detector works on the penultimate features: the fast path exports them as a second
    output of the same forward pass, so --fast keeps the trust checks."""
    if onnx:
        pytest.importorskip("onnxruntime")
    else:
        monkeypatch.setattr("allcore.scoring.runtimes.onnx_session", lambda *args: None)
    cpu = torch.device("cpu")
    eager = model_outputs(load_artifact(tiny_artifact)[0], input_size=64, fast=False, device=cpu)
    fast = model_outputs(load_artifact(tiny_artifact)[0], input_size=64, fast=True, device=cpu)
    (eager_features, eager_logits), (fast_features, fast_logits) = eager(pixels), fast(pixels)
    assert fast_features.shape == eager_features.shape and eager_features.shape[1] > 1
    scale = np.abs(eager_features).max()
    np.testing.assert_allclose(fast_features, eager_features, atol=1e-4 * scale, rtol=0)
    np.testing.assert_allclose(fast_logits, eager_logits, atol=1e-3, rtol=0)


def test_fast_predictor_keeps_error_rows_and_batch_size(tiny_artifact, pixels):
    """A batch size the export never saw, with an error row in it: the fast path must take any
    batch size and score only the ok rows, exactly like the eager Predictor."""
    pytest.importorskip("onnxruntime")
    status = np.array([OK] * 6 + ["error"] + [OK] * 2, dtype=object)
    batch = {"source_uri": np.array([f"img{i}.jpg" for i in range(9)], dtype=object),
             "status": status, "pixels": pixels[:9]}
    eager, fast = Predictor(tiny_artifact)(batch), Predictor(tiny_artifact, fast=True)(batch)
    assert list(fast["pred_label"]) == list(eager["pred_label"])
    assert np.isnan(fast["confidence"][6]) and np.isnan(eager["confidence"][6])  # error row: unscored
    column = prob_column("Benign")
    np.testing.assert_allclose(fast[column], eager[column], atol=PROBABILITY_TOLERANCE)


@pytest.mark.parametrize("name", sorted(FAST_PATH_VERIFIED))
def test_every_verified_model_agrees_on_generated_fields(name):
    """The default path of each model on the verified list (scored fast without --fast) computes
    what eager fp32 does: a random copy at 64 px on generated smear fields. The list's real-image
    measurement is benchmarks/fast_path_agreement.py; this catches an export or runtime change.
    Default initialisation keeps BatchNorm well conditioned (statistics fitted on a few images
    make near-constant channels amplify rounding), so features and logits must agree to 1e-4 of
    their scale; fp32 gives ~1e-6."""
    pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = create_model(name, num_classes=4, input_size=64).eval()
    rng = np.random.default_rng(1)
    pixels = np.stack([preprocess_array(make_field(rng, k % 4, 64)[0], model.data_config)
                       for k in range(16)])
    cpu = torch.device("cpu")
    eager_features, eager_logits = model_outputs(model, input_size=64, fast=False, device=cpu)(pixels)
    fast_features, fast_logits = model_outputs(model, input_size=64, fast=True, device=cpu)(pixels)
    assert not any(m.training for m in model.modules()), "the export must leave the model in eval mode"
    np.testing.assert_array_equal(fast_logits.argmax(1), eager_logits.argmax(1))
    np.testing.assert_allclose(fast_features, eager_features, rtol=0,
                               atol=1e-4 * np.abs(eager_features).max())
    np.testing.assert_allclose(fast_logits, eager_logits, rtol=0, atol=1e-4 * np.abs(eager_logits).max())


def test_default_path_is_the_fast_one_only_where_verified(monkeypatch):
    verified, unverified = "mobilenet_v2", "vgg16_cnn"
    monkeypatch.setattr("allcore.scoring.inference_path.FAST_PATH_VERIFIED", frozenset({verified}))
    if importlib.util.find_spec("onnxruntime") is not None:
        assert inference_path(verified).fast
        assert inference_path(verified).name == "onnxruntime fp32"
    assert not inference_path(unverified).fast
    assert "not verified" in inference_path(unverified).reason
    assert inference_path(unverified, mode="fast").fast  # --fast: the user's call
    assert not inference_path(verified, mode="exact").fast
    assert not inference_path(verified, cuda=True).fast  # bf16 autocast: not measured yet
    assert inference_path(verified, mode="fast", cuda=True).name == "bf16 autocast (CUDA)"
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)  # the `fast` extra absent
    path = inference_path(verified)
    assert not path.fast and "onnxruntime is not installed" in path.reason
    with pytest.raises(ValueError, match="inference mode"):
        inference_path(verified, mode="quick")


def test_a_card_whose_ood_scores_the_fast_path_would_move_scores_eager():
    """A detector fitted on features that barely vary (a huge precision matrix, as the README
    demo's) cannot be reproduced by fp32 reordering: the default path is eager for it."""
    from allcore.trust.checks import MahalanobisDetector, Trust

    def trust(precision_scale: float) -> Trust:
        detector = MahalanobisDetector(means=np.full((2, 8), 0.2, np.float32),
                                       precision=np.eye(8, dtype=np.float32) * precision_scale)
        return Trust(temperature=1.0, ood_method="mahalanobis", ood_threshold=10.0,
                     qc_reference={}, detector=detector)

    assert ood_survives_fast_path(None) and ood_survives_fast_path(trust(100.0))
    assert not ood_survives_fast_path(trust(1e16))
    path = inference_path("mobilenet_v2", ood_stable=False)
    assert not path.fast and "OOD detector" in path.reason
    assert inference_path("mobilenet_v2", mode="fast", ood_stable=False).fast


def test_exact_and_fast_flags_reach_the_scoring_config():
    from allcore.scoring.config import ScoringConfig
    from jobs.score import parse_args

    paths = ["--model", "m", "--input", "i", "--output", "o"]
    assert parse_args(paths).inference == "auto"  # the fastest verified path
    assert parse_args([*paths, "--exact"]).inference == "exact"
    config = parse_args([*paths, "--fast"])
    assert config.inference == "fast"
    assert ScoringConfig.from_json(config.to_json()) == config
    with pytest.raises(SystemExit):
        parse_args([*paths, "--fast", "--exact"])
    # config.json of runs before the default changed: eager unless --fast
    earlier = json.loads(config.to_json())
    del earlier["inference"]
    assert ScoringConfig.from_json(json.dumps({**earlier, "fast": False})).inference == "exact"
    assert ScoringConfig.from_json(json.dumps({**earlier, "fast": True})).inference == "fast"


def test_the_trust_file_is_read_only_where_auto_would_pick_the_fast_path(tiny_artifact):
    from dataclasses import replace

    from allcore.models.artifact import read_card

    # a trust section whose detector file is not there: reading it fails loudly
    card = replace(read_card(tiny_artifact), trust={"ood": {"file": "missing.safetensors",
                                                            "sha256": "0" * 64, "method": "mahalanobis"}})
    assert card.model_name in FAST_PATH_VERIFIED
    assert artifact_inference_path(tiny_artifact, card, mode="exact").reason == "--exact"
    assert artifact_inference_path(tiny_artifact, card, mode="fast").fast
    assert not artifact_inference_path(tiny_artifact, card, cuda=True).fast
    from allcore.errors import ArtifactIntegrityError

    with pytest.raises(ArtifactIntegrityError, match="missing"):
        artifact_inference_path(tiny_artifact, card)  # auto on CPU: the detector is probed


# A scoring actor as pipelines/score.py builds one on a CPU node: prints whether it imported torch
# and whether it built the model, and saves its probabilities.
_CPU_ACTOR = """
import sys
import numpy as np
from allcore.scoring.predict import ScoringModel
model = ScoringModel(sys.argv[1], fast=True, device="cpu")
probs, ood = model(np.random.default_rng(0).normal(0, 1.5, (5, 3, 64, 64)).astype(np.float32))
np.save(sys.argv[2], probs)
print("torch" in sys.modules, model.model is not None)
"""


def test_a_cached_export_scores_without_torch(tiny_artifact, tmp_path):
    """The first CPU actor on the fast path exports the model and keeps the export; the next
    one opens it with ONNX Runtime alone (no torch, no model built) and scores the same."""
    pytest.importorskip("onnxruntime")
    from allcore.scoring.onnx import CACHE_ENV

    env = {**os.environ, CACHE_ENV: str(tmp_path / "cache")}

    def actor(out: str) -> list[str]:
        run = subprocess.run([sys.executable, "-c", _CPU_ACTOR, tiny_artifact, str(tmp_path / out)],
                             env=env, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr
        return run.stdout.split()

    assert actor("first.npy") == ["True", "True"]
    assert [p.suffix for p in (tmp_path / "cache" / "onnx").iterdir()] == [".onnx"]
    assert actor("second.npy") == ["False", "False"]
    np.testing.assert_array_equal(np.load(tmp_path / "first.npy"), np.load(tmp_path / "second.npy"))


def test_a_damaged_or_unwritable_export_cache_only_costs_an_export(tiny_artifact, tmp_path,
                                                                  monkeypatch, caplog):
    pytest.importorskip("onnxruntime")
    from allcore.models.artifact import read_card
    from allcore.scoring import onnx
    from allcore.scoring.predict import ScoringModel

    pixels = np.random.default_rng(1).random((4, 3, 64, 64), dtype=np.float32)
    expected = ScoringModel(tiny_artifact)(pixels)[0]  # eager
    monkeypatch.setenv(onnx.CACHE_ENV, str(tmp_path))
    cached = tmp_path / "onnx" / onnx.cache_key(read_card(tiny_artifact).weights_sha256, 64)
    cached.parent.mkdir()
    cached.write_bytes(b"half an export")
    model = ScoringModel(tiny_artifact, fast=True, device="cpu")
    assert model.model is not None and "does not open" in caplog.text
    np.testing.assert_allclose(model(pixels)[0], expected, atol=PROBABILITY_TOLERANCE, rtol=0)
    assert onnx.cached_session(cached.name) is not None  # replaced by a good export

    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    monkeypatch.setenv(onnx.CACHE_ENV, str(blocked))
    model = ScoringModel(tiny_artifact, fast=True, device="cpu")
    assert "could not keep the ONNX export" in caplog.text
    np.testing.assert_allclose(model(pixels)[0], expected, atol=PROBABILITY_TOLERANCE, rtol=0)
