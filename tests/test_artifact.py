"""Model artifact round trip and its integrity checks."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from allcore.models.artifact import (CARD_FILE, WEIGHTS_FILE, ArtifactIntegrityError, ModelCard,
                                     load_artifact, read_card, save_artifact, verified_card)
from allcore.data.labels import get_label_set
from allcore.models.registry import create_model

SIZE = 64


def _card(label_set: str = "all4") -> ModelCard:
    labels = get_label_set(label_set)
    return ModelCard(classes=list(labels.classes), label_set=labels.name,
                     recipe={"name": "s004"}, metrics={"val_accuracy": 0.5},
                     split_manifest_sha256="ab" * 32)


@pytest.fixture(scope="module")
def _saved_once(tmp_path_factory) -> tuple[torch.nn.Module, Path]:
    torch.manual_seed(0)
    model = create_model("mobilenet_m", num_classes=4, input_size=SIZE, dropout=0.3).eval()
    # Non-default BN statistics, so a round trip that dropped buffers would change outputs.
    with torch.no_grad():
        model.train()(torch.randn(4, 3, SIZE, SIZE))
    model.eval()
    out = tmp_path_factory.mktemp("saved") / "artifact"
    assert save_artifact(str(out), model, _card()) == str(out)
    return model, out


@pytest.fixture
def saved(_saved_once, tmp_path) -> tuple[torch.nn.Module, Path]:
    """A private copy of the saved artifact, so tests can tamper with it."""
    model, original = _saved_once
    return model, Path(shutil.copytree(original, tmp_path / "artifact"))


def test_round_trip_gives_identical_outputs(saved):
    model, out = saved
    loaded, card = load_artifact(str(out))
    x = torch.randn(3, 3, SIZE, SIZE)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert not loaded.training
    assert card.classes == ["Benign", "Early", "Pre", "Pro"] and card.label_set == "all4"
    assert card.model_name == "mobilenet_m"
    assert card.model_kwargs == {"dropout": 0.3, "input_size": SIZE, "l1_head": 0.015}
    assert card.data_config_obj() == model.data_config == loaded.data_config
    assert len(card.sha256) == 64 and card.sha256 == card.weights_sha256
    assert card.model_version.startswith("mobilenet_m-") and card.created_at.endswith("+00:00")
    assert card.torch_version == torch.__version__ and verified_card(str(out)) == card
    assert sorted(p.name for p in out.iterdir()) == [WEIGHTS_FILE, CARD_FILE]  # no temp files left


def test_tampered_weights_are_refused(saved):
    _, out = saved
    weights = out / WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0x01
    weights.write_bytes(bytes(data))
    for load in (load_artifact, verified_card):  # the scoring driver checks without torch
        with pytest.raises(ArtifactIntegrityError, match="modified, corrupted"):
            load(str(out))


def _edit_card(out: Path, **changes) -> None:
    card = json.loads((out / CARD_FILE).read_text())
    card.update(changes)
    (out / CARD_FILE).write_text(json.dumps(card))


def test_card_whose_classes_do_not_match_the_weights_is_refused(saved):
    _, out = saved
    _edit_card(out, classes=["benign", "malignant"])
    with pytest.raises(ArtifactIntegrityError, match="do not fit .*2 classes"):
        load_artifact(str(out))


def test_unknown_schema_version_is_refused(saved):
    _, out = saved
    _edit_card(out, schema_version=99)
    with pytest.raises(ValueError, match="schema_version 99"):
        read_card(str(out))


def test_card_missing_fields_is_refused(saved):
    _, out = saved
    card = json.loads((out / CARD_FILE).read_text())
    del card["classes"]
    (out / CARD_FILE).write_text(json.dumps(card))
    with pytest.raises(ValueError, match=r"missing fields \['classes'\]"):
        load_artifact(str(out))


def test_not_an_artifact_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="model artifact"):
        load_artifact(str(tmp_path))


def test_save_refuses_card_that_disagrees_with_model(tmp_path):
    model = create_model("mobilenet_v2", num_classes=2, input_size=SIZE)
    with pytest.raises(ValueError, match="2 outputs"):
        save_artifact(str(tmp_path), model, _card("all4"))
    card = _card("binary")
    card.model_name = "vgg16_cnn"
    with pytest.raises(ValueError, match="model_name"):
        save_artifact(str(tmp_path), model, card)


def test_card_carries_scale_bar_masking_in_its_data_config(tmp_path):
    model = create_model("mobilenet_v2", num_classes=4, input_size=SIZE, mask_corner=True)
    save_artifact(str(tmp_path), model, _card())
    loaded, card = load_artifact(str(tmp_path))
    assert card.data_config["mask_corner"] is True
    assert card.data_config_obj().mask_corner and loaded.data_config.mask_corner
