"""The scoring batch functions, without Ray, on dicts shaped like ``Dataset.take_batch()``."""

from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from allcore.models.artifact import load_artifact, read_card
from allcore.scoring.predict import Predictor
from allcore.scoring.prepare import prepare_batch, prepare_kwargs
from allcore.imaging.files import decode_rgb
from allcore.models.recipes import load_recipe
from allcore.imaging.transforms import eval_transform


def batch_of(paths: list[str]) -> dict[str, np.ndarray]:
    return {"source_uri": np.array(paths, dtype=object),
            "source_size": np.zeros(len(paths), np.int64),
            "source_mtime": np.array(["0"] * len(paths), dtype=object)}


def write_images(root: Path, n: int) -> list[str]:
    rng = np.random.default_rng(3)
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = root / f"img-{i}.jpg"
        colour = rng.integers(0, 255, 3)  # distinct colours, so a random model tells them apart
        noise = rng.integers(-20, 20, (70 + i, 90, 3))
        Image.fromarray(np.clip(colour + noise, 0, 255).astype(np.uint8)).save(path)
        paths.append(str(path))
    return paths


def test_prepare_batch_turns_every_bad_input_into_an_error_row(tmp_path, tiny_artifact, bad_images):
    convertible, bad = bad_images(tmp_path / "mixed")
    good = write_images(tmp_path / "good", 2)
    paths = good + convertible + list(bad)
    out = prepare_batch(batch_of(paths), **prepare_kwargs(read_card(tiny_artifact)))
    status = dict(zip(paths, out["status"]))
    errors = dict(zip(paths, out["error"]))
    assert all(status[p] == "ok" and errors[p] == "" for p in good + convertible)
    for path, fragment in bad.items():
        assert status[path] == "error", path
        assert fragment in errors[path], (path, errors[path])
    assert out["pixels"].shape == (len(paths), 3, 64, 64) and out["pixels"].dtype == np.float32
    first = Path(good[0]).read_bytes()
    assert out["content_sha256"][0] == hashlib.sha256(first).hexdigest()
    assert (out["box_x1"][0], out["box_y1"][0]) == (90, 70)
    expected = eval_transform(read_card(tiny_artifact).data_config_obj())(decode_rgb(first))
    np.testing.assert_allclose(out["pixels"][0], expected.numpy(), atol=1e-6)


def test_field_measurements_become_columns_null_where_there_is_no_field(tmp_path, tiny_artifact):
    paths = write_images(tmp_path / "good", 2)
    (tmp_path / "empty.jpg").write_bytes(b"")
    out = prepare_batch(batch_of([*paths, str(tmp_path / "empty.jpg")]),
                        **prepare_kwargs(read_card(tiny_artifact)),
                        measurements={"mean_red": lambda img: np.asarray(img)[..., 0].mean()})
    reds = [np.asarray(decode_rgb(Path(p).read_bytes()))[..., 0].mean() for p in paths]
    np.testing.assert_allclose(out["mean_red"][:2], reds, rtol=1e-5)
    assert out["mean_red"].dtype == np.float32 and np.isnan(out["mean_red"][2])
    assert list(out["row_kind"]) == ["field"] * 3


def test_predictor_matches_the_model_and_passes_error_rows_through(tmp_path, tiny_artifact):
    paths = write_images(tmp_path, 5) + [str(tmp_path / "missing.jpg")]
    card = read_card(tiny_artifact)
    prepared = prepare_batch(batch_of(paths), **prepare_kwargs(card))
    out = Predictor(tiny_artifact, expected_sha256=card.weights_sha256)(prepared)

    model, _ = load_artifact(tiny_artifact)
    transform = eval_transform(card.data_config_obj())
    x = torch.stack([transform(decode_rgb(Path(p).read_bytes())) for p in paths[:5]])
    with torch.no_grad():
        direct = torch.softmax(model(x), dim=1).numpy()
    probs = np.stack([out[f"prob_{c}"] for c in card.classes], axis=1)
    np.testing.assert_allclose(probs[:5], direct, atol=1e-4)
    assert list(out["pred_label"][:5]) == [card.classes[i] for i in direct.argmax(1)]
    np.testing.assert_allclose(out["confidence"][:5], direct.max(1), atol=1e-4)
    assert len(set(out["pred_label"][:5])) > 1, "tiny model should not predict one class for all"
    assert out["status"][5] == "error" and out["pred_label"][5] == ""
    assert np.isnan(probs[5]).all() and np.isnan(out["confidence"][5])
    assert "pixels" not in out and out["error"][5].startswith("unreadable input")


def test_predictor_refuses_an_artifact_replaced_mid_run(tiny_artifact):
    with pytest.raises(ValueError, match="replaced mid-run"):
        Predictor(tiny_artifact, expected_sha256="0" * 64)


def test_prepare_kwargs_follow_the_model_card(tiny_artifact):
    card = read_card(tiny_artifact)
    assert prepare_kwargs(card)["data_config"]["input_size"] == 64
    assert prepare_kwargs(card)["data_config"]["mask_corner"] is False
    masked = replace(card, data_config={**card.data_config, "mask_corner": True})
    assert prepare_kwargs(masked, max_pixels=10)["data_config"]["mask_corner"] is True
    # a card written before the data config carried mask_corner kept it only in the recipe
    # (`jobs/train.py --set mask_corner=true`): it must still score with the corner masked
    old = {k: v for k, v in card.data_config.items() if k != "mask_corner"}
    legacy = replace(card, data_config=old,
                     recipe=load_recipe("demo").override(["mask_corner=true"]).to_dict())
    assert prepare_kwargs(legacy)["data_config"]["mask_corner"] is True
