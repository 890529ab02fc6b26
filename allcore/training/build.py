"""Everything a training run needs besides the loop itself (``engine.fit``): the model, datasets,
loaders and loss of a recipe, and the checkpoint file. Plain Python; the Ray Train worker
(``pipelines/train.py``) and the benchmark build their runs from the same functions here.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.utils.class_weight import compute_class_weight

from allcore.training import distributed, engine
from allcore.data.samples import Sample
from allcore.imaging.data_config import DataConfig
from allcore.imaging.files import decode_rgb, read_bytes
from allcore.data.labels import LabelSet
from allcore.models.registry import Classifier, create_model
from allcore.models.recipes import Recipe
from allcore.data.splits import SplitManifest
from allcore.imaging.transforms import desaturate_hsv, eval_transform, train_transform

STATE_FILE = "training_state.pt"


def _generator_seed(seed: int, epoch: int, index: int) -> int:
    """A well-mixed 63-bit seed per (run seed, epoch, sample): independent of worker layout."""
    words = np.random.SeedSequence([seed, epoch, index]).generate_state(2, dtype=np.uint32)
    return (int(words[0]) << 31) ^ int(words[1])


class ImageDataset(torch.utils.data.Dataset):
    """(image tensor, class index) pairs, decoded on demand.

    With ``seed`` set, the transform also receives a ``torch.Generator`` seeded from
    (seed, epoch, index): augmentation is then the same whatever the number of DataLoader workers
    or the order they fetch in. Call ``set_epoch`` before each epoch (workers copy the dataset
    when iteration starts, so do not combine this with ``persistent_workers``).
    """

    def __init__(self, samples: list[Sample], label_set: LabelSet,
                 transform: Callable[..., torch.Tensor], *, seed: int | None = None):
        self.samples = list(samples)
        self.targets = [label_set.index(s.label) for s in self.samples]
        self.transform = transform
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        img = decode_rgb(read_bytes(self.samples[index].path))
        if self.seed is None:
            return self.transform(img), self.targets[index]
        generator = torch.Generator().manual_seed(_generator_seed(self.seed, self.epoch, index))
        return self.transform(img, generator), self.targets[index]


def _desaturated(transform):
    """MobileNet_M's minority oversampling: the same image with HSV saturation removed."""
    return lambda img, generator: transform(desaturate_hsv(img), generator)


def minority_class(samples: list[Sample]) -> str:
    counts = Counter(s.label for s in samples)
    return min(counts, key=lambda label: (counts[label], label))


def build_datasets(manifest: SplitManifest, recipe: Recipe, label_set: LabelSet,
                   data_config: DataConfig) -> dict[str, torch.utils.data.Dataset]:
    """train / val / test datasets of one split manifest, augmented as the recipe says."""
    train_tf = train_transform(data_config, recipe.augment)
    eval_tf = eval_transform(data_config)
    missing = {"train", "val"} - set(manifest.names)
    if missing:
        raise ValueError(f"split manifest has no {' or '.join(sorted(missing))} images; "
                         "use more data or larger split fractions")
    train_samples = manifest.subset("train")
    train = ImageDataset(train_samples, label_set, train_tf, seed=recipe.seed)
    if recipe.balance == "desaturate_minority":
        minority = minority_class(train_samples)
        extra = [s for s in train_samples if s.label == minority]
        train = EpochConcat([train, ImageDataset(extra, label_set, _desaturated(train_tf),
                                                 seed=recipe.seed + 1)])
    return {
        "train": train,
        "val": ImageDataset(manifest.subset("val"), label_set, eval_tf),
        # a manifest without test rows (e.g. a train/val-only split) evaluates nothing
        "test": ImageDataset(manifest.subset("test") if "test" in manifest.names else [],
                             label_set, eval_tf),
    }


class EpochConcat(torch.utils.data.ConcatDataset):
    """ConcatDataset that forwards ``set_epoch`` so every part re-seeds its augmentation."""

    def set_epoch(self, epoch: int) -> None:
        for part in self.datasets:
            part.set_epoch(epoch)


def targets_of(dataset: torch.utils.data.Dataset) -> list[int]:
    if isinstance(dataset, torch.utils.data.ConcatDataset):
        return [t for part in dataset.datasets for t in targets_of(part)]
    return list(dataset.targets)


def class_weights(targets: list[int], num_classes: int) -> torch.Tensor:
    """Inverse-frequency weights n / (C * count) (sklearn's "balanced"): a balanced loss on
    imbalanced data."""
    missing = sorted(set(range(num_classes)) - set(targets))
    if missing:
        raise ValueError(f"class index(es) {missing} have no training images; check the split")
    weights = compute_class_weight("balanced", classes=np.arange(num_classes), y=np.asarray(targets))
    return torch.as_tensor(weights, dtype=torch.float32)


def build_model(recipe: Recipe, label_set: LabelSet) -> Classifier:
    """The recipe's model for the label set, with its body frozen when the recipe says so."""
    model = create_model(recipe.model, num_classes=label_set.num_classes,
                         pretrained=recipe.pretrained, input_size=recipe.input_size,
                         mask_corner=recipe.mask_corner, stain_normalise=recipe.stain_normalise)
    if recipe.freeze_backbone:
        model.freeze_backbone()
    return model


def build_criterion(recipe: Recipe, train: torch.utils.data.Dataset, num_classes: int,
                    device: torch.device) -> torch.nn.Module:
    """Cross-entropy, class-weighted when the recipe balances by weights."""
    weights = (class_weights(targets_of(train), num_classes).to(device)
               if recipe.balance == "class_weights" else None)
    return torch.nn.CrossEntropyLoss(weight=weights)


def build_loaders(datasets: dict[str, torch.utils.data.Dataset], recipe: Recipe,
                  device: torch.device, *, rank: int = 0,
                  world_size: int = 1) -> tuple[torch.utils.data.DataLoader,
                                                torch.utils.data.DataLoader]:
    """Shuffled training and ordered validation loaders of rank ``rank`` of ``world_size``.

    ``recipe.batch_size`` is the global batch: each rank loads its 1/N of every batch, in an
    order seeded by the recipe's seed and the epoch (``allcore.training.distributed.GlobalBatchSampler``),
    and 1/N of the validation images. The last training batch is dropped when there is more
    than one: a batch of one breaks BatchNorm."""
    train = datasets["train"]
    loader_args = {"num_workers": recipe.num_workers, "pin_memory": device.type == "cuda"}
    sampler = distributed.GlobalBatchSampler(
        len(train), recipe.batch_size, rank=rank, world_size=world_size, seed=recipe.seed,
        drop_last=len(train) > recipe.batch_size)
    return (torch.utils.data.DataLoader(train, batch_sampler=sampler, **loader_args),
            torch.utils.data.DataLoader(distributed.shard(datasets["val"], rank, world_size),
                                        batch_size=recipe.batch_size // world_size, **loader_args))


def test_split_metrics(model: torch.nn.Module, manifest: SplitManifest, recipe: Recipe,
                       label_set: LabelSet) -> dict:
    """Held-out test accuracy and macro-F1 for the model card, computed on the CPU after
    training; the full report with CIs and plots is ``jobs/evaluate.py``."""
    test = build_datasets(manifest, recipe, label_set, model.data_config)["test"]
    if len(test) == 0:
        return {"n": 0, "accuracy": math.nan, "macro_f1": math.nan}
    device = torch.device("cpu")
    result = engine.evaluate(model, torch.utils.data.DataLoader(test, batch_size=recipe.batch_size),
                             device, engine.MixedPrecision.resolve(device, False),
                             label_set.num_classes)
    return {"n": len(test), "accuracy": result["val_acc"], "macro_f1": result["val_macro_f1"]}


def save_state(directory: str | Path, state: dict[str, Any]) -> None:
    torch.save(state, Path(directory) / STATE_FILE)


def load_state(directory: str | Path) -> dict[str, Any]:
    """Training state of a checkpoint; ``weights_only`` refuses anything but tensors and plain data."""
    return torch.load(Path(directory) / STATE_FILE, map_location="cpu", weights_only=True)
