"""Model artifact: a folder (local or ``s3://``) holding ``model.safetensors`` + ``model_card.json``.

The card is the one place that owns everything scoring needs besides the weights: the class
order, the preprocessing, how to rebuild the architecture. Weights are safetensors (loading them
never unpickles code) and are refused unless their sha256 matches the card.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import datetime, timezone
from typing import TYPE_CHECKING

import allcore
from allcore.errors import ArtifactIntegrityError, ModelCardError
from allcore.imaging.data_config import DataConfig
from allcore.imaging.files import filesystem, join, read_bytes, write_atomic

# torch and the models (timm, torchvision) load only to save or rebuild a model: reading and
# verifying a card must stay cheap, since the scoring driver does it and never imports torch
if TYPE_CHECKING:
    import torch

    from allcore.models.registry import Classifier

SCHEMA_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "model_card.json"


def _utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass(kw_only=True)
class ModelCard:
    """Self-description of a trained model.

    ``model_name``, ``model_kwargs``, ``data_config`` and ``weights_sha256`` are filled from the
    model by ``save_artifact``, so they cannot disagree with the weights they describe.
    """

    classes: list[str]                  # logit order
    label_set: str
    model_version: str = ""             # defaults to "<model_name>-<created_at>" when saved
    recipe: dict = field(default_factory=dict)
    split_manifest_sha256: str = ""
    metrics: dict = field(default_factory=dict)
    trust: dict = field(default_factory=dict)  # allcore.trust.checks: calibration, OOD, QC ranges; {} = none
    cell_crop: dict = field(default_factory=dict)  # cell models only: allcore.data.celldata geometry
    model_name: str = ""
    model_kwargs: dict = field(default_factory=dict)
    data_config: dict = field(default_factory=dict)
    weights_sha256: str = ""
    schema_version: int = SCHEMA_VERSION
    allcore_version: str = allcore.__version__
    torch_version: str = ""               # filled by save_artifact
    created_at: str = field(default_factory=_utc_now)

    @property
    def sha256(self) -> str:
        return self.weights_sha256

    def data_config_obj(self) -> DataConfig:
        """The preprocessing of this model. Cards written before the data config carried
        ``mask_corner`` kept it only in the recipe: read it from there, so they score as before."""
        return DataConfig.from_dict({"mask_corner": self.recipe.get("mask_corner", False),
                                     **self.data_config})

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelCard":
        version = d.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ModelCardError(
                f"model card schema_version {version!r} is not supported by allcore "
                f"{allcore.__version__} (it reads version {SCHEMA_VERSION}); use a matching allcore "
                f"version or re-export the model"
            )
        names = {f.name for f in fields(cls)}
        required = {"classes", "label_set", "model_name", "model_kwargs", "data_config", "weights_sha256"}
        missing, unknown = sorted(required - set(d)), sorted(set(d) - names)
        if missing or unknown:
            raise ModelCardError(f"invalid model card: missing fields {missing}, unknown fields {unknown}; "
                             f"re-export the model with save_artifact")
        return cls(**d)


def save_artifact(out_dir: str, model: Classifier, card: ModelCard) -> str:
    """Write ``model`` and ``card`` to ``out_dir`` (local or s3://); returns ``out_dir``.

    The weights are written before the card, each file atomically, so a reader never sees a card
    whose weights are missing; a half-overwritten artifact fails its sha256 check instead of
    silently loading mixed weights.
    """
    import safetensors.torch
    import torch

    from allcore.models.registry import Classifier

    if not isinstance(model, Classifier):
        raise ValueError(f"save_artifact needs an allcore Classifier, got {type(model).__name__} "
                         f"(unwrap DDP / Ray models with .module first)")
    if len(card.classes) != model.num_classes:
        raise ValueError(f"card lists {len(card.classes)} classes {card.classes} but the model has "
                         f"{model.num_classes} outputs")
    from_model = {"model_name": model.model_name, "model_kwargs": dict(model.model_kwargs),
                  "data_config": model.data_config.to_dict()}
    for key, value in from_model.items():
        given = getattr(card, key)
        if given and given != value:
            raise ValueError(f"card.{key}={given!r} disagrees with the model ({value!r}); leave it "
                             f"empty: save_artifact fills it from the model")
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    weights = safetensors.torch.save(tensors)
    card = replace(card, **from_model, weights_sha256=hashlib.sha256(weights).hexdigest(),
                   torch_version=torch.__version__,
                   model_version=card.model_version or f"{model.model_name}-{card.created_at}")
    fs, path = filesystem(out_dir)
    fs.makedirs(path, exist_ok=True)
    write_atomic(fs, f"{path}/{WEIGHTS_FILE}", weights)
    write_atomic(fs, f"{path}/{CARD_FILE}", (json.dumps(card.to_dict(), indent=2) + "\n").encode())
    return out_dir


def read_card(uri: str) -> ModelCard:
    """The model card of the artifact at ``uri`` (no weights read)."""
    try:
        raw = read_bytes(join(uri, CARD_FILE))
    except FileNotFoundError:
        raise FileNotFoundError(f"no {CARD_FILE} in {uri}: is this a model artifact folder "
                                f"written by save_artifact?") from None
    try:
        card = json.loads(raw)
    except ValueError as exc:  # also a UnicodeDecodeError
        raise ModelCardError(f"{join(uri, CARD_FILE)} is not a JSON model card ({exc}): it was "
                             f"cut off or overwritten. Re-export the model or download the "
                             f"artifact again.") from None
    if not isinstance(card, dict):
        raise ModelCardError(f"{join(uri, CARD_FILE)} holds a JSON {type(card).__name__}, not a "
                             f"model card. Re-export the model or download the artifact again.")
    return ModelCard.from_dict(card)


def listed_files(card: ModelCard) -> dict[str, str]:
    """Name -> sha256 of every file of the artifact that ``card`` lists: the weights, and each
    entry of its sections with a ``file`` (the trust section's OOD detector, or one added later)."""
    files = {WEIGHTS_FILE: card.weights_sha256}

    def walk(value) -> None:
        if isinstance(value, dict):
            if "file" in value:
                if not (isinstance(value["file"], str) and isinstance(value.get("sha256"), str)):
                    raise ModelCardError(f"the model card names the file {value['file']!r} "
                                         f"without its sha256: it was edited. Re-export the model.")
                files[value["file"]] = value["sha256"]
            for item in value.values():
                walk(item)
        elif isinstance(value, list):
            for item in value:
                walk(item)

    walk({name: value for name, value in card.to_dict().items() if name != "weights_sha256"})
    return files


def verified_file(uri: str, name: str, sha256: str) -> bytes:
    """The bytes of the artifact's file ``name``, refused unless their sha256 is the card's."""
    try:
        data = read_bytes(join(uri, name))
    except FileNotFoundError:
        raise ArtifactIntegrityError(
            f"{join(uri, name)} is missing, but the model card in {uri} lists it: the artifact "
            f"was copied incompletely. Re-export the model or download the artifact again."
        ) from None
    if (actual := hashlib.sha256(data).hexdigest()) != sha256:
        raise ArtifactIntegrityError(
            f"{join(uri, name)} has sha256 {actual} but its model card expects {sha256}: the "
            f"file was modified, corrupted or belongs to another model. Re-export the model or "
            f"download the artifact again."
        )
    return data


def verified_weights(uri: str) -> tuple[ModelCard, bytes]:
    """The card and the weight file's bytes, refused unless the bytes' sha256 is the card's."""
    card = read_card(uri)
    return card, verified_file(uri, WEIGHTS_FILE, card.weights_sha256)


def verified_card(uri: str) -> ModelCard:
    """The card of the artifact at ``uri`` once it reads, every file it lists (``listed_files``)
    matches its sha256, and its trust section loads with its detector file, without building the
    model (no torch): a corrupt artifact is caught where this runs, before Ray starts. Whether the
    weights fit the architecture is checked by ``load_artifact``, where the model is built."""
    from allcore.trust.checks import load_trust  # trust reads its detector through verified_file

    card = read_card(uri)
    files = {name: verified_file(uri, name, sha256) for name, sha256 in listed_files(card).items()}
    if card.trust:
        load_trust(uri, card.trust, detector_bytes=files.get(card.trust.get("ood", {}).get("file")))
    return card


def load_artifact(uri: str, *, map_location: str | torch.device = "cpu") -> tuple[Classifier, ModelCard]:
    """Rebuild the model stored at ``uri`` in eval mode, after verifying its weights' sha256."""
    card, data = verified_weights(uri)
    return built_model(card, data, uri).to(map_location).eval(), card


def built_model(card: ModelCard, weights: bytes, uri: str) -> Classifier:
    """The model ``card`` describes with ``weights`` (the safetensors bytes of the artifact at
    ``uri``, which ``verified_weights`` checked) loaded, on the CPU."""
    import safetensors.torch

    from allcore.models.registry import create_model

    model = create_model(card.model_name, num_classes=len(card.classes), pretrained=False,
                         **card.model_kwargs)
    try:
        model.load_state_dict(safetensors.torch.load(weights), strict=True)
    except RuntimeError as err:
        raise ArtifactIntegrityError(
            f"the weights in {uri} do not fit the model its card describes ({card.model_name}, "
            f"{len(card.classes)} classes {card.classes}): the card was edited or belongs to other "
            f"weights. Re-export the model. Details: {err}"
        ) from err
    model.data_config = card.data_config_obj()
    return model
