"""Label sets: the one place that owns class names, their order, and which folders map to them.

A trained model stores its class list in its artifact (see ``allcore.models.artifact``); scoring reads
the order from there, never from this module, so retraining with a new label set cannot silently
reorder probabilities.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class LabelSet:
    """An ordered set of classes and the folder / raw-label names that map onto each."""

    name: str
    classes: tuple[str, ...]
    aliases: dict[str, str]  # lower-cased raw label (folder name, manifest value) -> class
    blast_classes: tuple[str, ...]  # the malignant classes: summed into blast_probability
    description: str = ""

    def __post_init__(self) -> None:
        if not set(self.blast_classes) <= set(self.classes):
            raise ValueError(f"label set {self.name!r}: blast classes {self.blast_classes} "
                             f"are not all in its classes {self.classes}")

    def to_class(self, raw_label: str) -> str:
        """Map a raw label (folder name or manifest value) to a class of this set."""
        key = str(raw_label).strip().lower()
        if key in self.aliases:
            return self.aliases[key]
        known = sorted(set(self.aliases))
        raise ValueError(
            f"label {raw_label!r} is not part of label set {self.name!r}; "
            f"known labels: {', '.join(known)}. Pick another --label-set or fix the folder names."
        )

    def index(self, cls: str) -> int:
        return self.classes.index(cls)

    def blast_classes_of(self, classes: Sequence[str]) -> tuple[str, ...]:
        """The blast classes, checked against a model card's class list (which owns the order)."""
        missing = set(self.blast_classes) - set(classes)
        if missing:
            raise ValueError(f"model card classes {list(classes)} lack the blast classes "
                             f"{sorted(missing)} of label set {self.name!r}; the card is "
                             "inconsistent: re-export the model")
        return self.blast_classes

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def _aliases(mapping: dict[str, list[str]]) -> dict[str, str]:
    return {alias.lower(): cls for cls, names in mapping.items() for alias in [cls, *names]}


LABEL_SETS: dict[str, LabelSet] = {
    "all4": LabelSet(
        name="all4",
        classes=("Benign", "Early", "Pre", "Pro"),
        aliases=_aliases({"Benign": ["hematogones"], "Early": ["early_pre_b", "early pre-b"],
                          "Pre": ["pre_b", "pre-b"], "Pro": ["pro_b", "pro-b"]}),
        blast_classes=("Early", "Pre", "Pro"),
        description="Taleqani 4-class: hematogones vs Early Pre-B, Pre-B, Pro-B ALL",
    ),
    "binary": LabelSet(
        name="binary",
        classes=("benign", "malignant"),
        aliases=_aliases({"benign": ["hem", "normal"],
                          "malignant": ["early", "pre", "pro", "all"]}),
        blast_classes=("malignant",),
        description="benign vs malignant (Taleqani Benign vs Early+Pre+Pro; C-NMC hem vs all)",
    ),
    "all_hem": LabelSet(
        name="all_hem",
        classes=("HEM", "ALL"),
        aliases=_aliases({"HEM": ["normal", "benign"], "ALL": ["malignant", "blast"]}),
        blast_classes=("ALL",),
        description="C-NMC 2019 style: HEM (normal) vs ALL (blast) single-cell images",
    ),
    "blast": LabelSet(
        name="blast",
        classes=("not_blast", "blast"),
        aliases=_aliases({"not_blast": ["0", "not blast", "normal", "hem"],
                          "blast": ["1", "all", "malignant"]}),
        description="single white cell: blast vs not a blast (ALL-IDB cell crops)",
        blast_classes=("blast",),
    ),
}


def get_label_set(name: str) -> LabelSet:
    try:
        return LABEL_SETS[name]
    except KeyError:
        raise ValueError(
            f"unknown label set {name!r}; choose one of: {', '.join(sorted(LABEL_SETS))}"
        ) from None
