"""Recipes are data: one TOML file per published study, read into a frozen dataclass.

Every field has its default here, in one place, with the reason beside it. A recipe file or the
command line (``--set field=value``) overrides fields by name; an unknown name fails loudly so a
typo never silently trains with a default.
"""

from __future__ import annotations

import ast
import dataclasses
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from allcore.imaging.data_config import STAIN_NORMALISATIONS

# the recipe files are package data: an installed wheel finds them as a checkout does
RECIPE_DIR = resources.files("allcore") / "configs" / "recipes"

SCHEDULES = ("constant", "one_cycle", "plateau")
BALANCING = ("none", "class_weights", "desaturate_minority")
OPTIMIZERS = ("adam", "adamw", "sgd")


@dataclass(frozen=True)
class Recipe:
    name: str
    model: str
    label_set: str = "all4"
    description: str = ""
    pretrained: bool = True  # every reference study fine-tunes ImageNet weights
    freeze_backbone: bool = False
    input_size: int | None = None  # None: the model's own input size (from its weights)
    cell_crop_side: float = 2.0  # cell crops (allcore.data.celldata): side in cell diameters
    mask_corner: bool = False  # hide the bottom-right scale bar (a class shortcut in Taleqani data)
    stain_normalise: str = "none"  # colour normalisation before the model (allcore.imaging.data_config)
    augment: dict[str, Any] = field(default_factory=dict)
    balance: str = "none"
    optimizer: str = "adam"
    lr: float = 1e-3
    backbone_lr_mult: float = 1.0  # <1 gives discriminative rates (fastai slice(lo, hi))
    weight_decay: float = 0.0
    schedule: str = "constant"
    lr_finder: bool = False  # run an LR range test first; one-cycle then peaks at its suggestion
    plateau_factor: float = 0.1
    plateau_patience: int = 5
    min_lr: float = 1e-6
    early_stopping_patience: int = 0  # epochs without val-loss improvement; 0 disables
    epochs: int = 30
    batch_size: int = 32
    mixed_precision: bool = False  # used only where the device supports it (CUDA)
    folds: int = 1  # >1: k-fold by group, one model per fold
    split: tuple[float, float, float] = (0.8, 0.1, 0.1)
    split_strategy: str = "duplicates"  # never let (near-)identical images straddle splits
    seed: int = 0
    num_workers: int = 2  # DataLoader processes per training worker
    reported: dict[str, Any] = field(default_factory=dict)  # the paper's figures, for comparison

    def __post_init__(self) -> None:
        _check_choice("schedule", self.schedule, SCHEDULES)
        _check_choice("balance", self.balance, BALANCING)
        _check_choice("optimizer", self.optimizer, OPTIMIZERS)
        _check_choice("stain_normalise", self.stain_normalise, STAIN_NORMALISATIONS)
        if len(self.split) != 3 or abs(sum(self.split) - 1.0) > 1e-6:
            raise ValueError(f"split must be three fractions summing to 1, got {self.split}")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("epochs and batch_size must be positive")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Recipe":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(
                f"unknown recipe field(s) {unknown}; valid fields: {', '.join(sorted(names))}"
            )
        data = dict(data)
        if "split" in data:
            data["split"] = tuple(float(x) for x in data["split"])
        return cls(**data)

    def override(self, assignments: list[str]) -> "Recipe":
        """Apply ``field=value`` strings (values parsed as Python/TOML literals where possible)."""
        data = self.to_dict()
        for item in assignments:
            key, sep, raw = item.partition("=")
            if not sep:
                raise ValueError(f"override {item!r} must look like field=value")
            key = key.strip()
            if key.startswith("augment."):
                data["augment"] = {**data["augment"], key.split(".", 1)[1]: _parse_value(raw)}
            else:
                data[key] = _parse_value(raw)
        return Recipe.from_dict(data)


def _parse_value(raw: str) -> Any:
    raw = raw.strip()
    lowered = raw.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return raw


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


def list_recipes() -> list[str]:
    files = RECIPE_DIR.iterdir() if RECIPE_DIR.is_dir() else ()
    return sorted(p.name.removesuffix(".toml") for p in files if p.name.endswith(".toml"))


def load_recipe(name_or_path: str) -> Recipe:
    """Load a recipe by name (``allcore/configs/recipes/<name>.toml``) or from a TOML file path."""
    path = Path(name_or_path)
    source = RECIPE_DIR / f"{name_or_path}.toml" if not path.suffix else path
    if not source.is_file():
        raise ValueError(
            f"recipe {name_or_path!r} not found; known recipes: {', '.join(list_recipes())} "
            "(or pass a path to a .toml file)"
        )
    with source.open("rb") as fh:
        data = tomllib.load(fh)
    data.setdefault("name", path.stem)
    return Recipe.from_dict(data)
