"""Discovering labelled samples (folders per class, or a manifest).

Labels are mapped through the ``LabelSet`` at discovery time, so everything downstream (splits,
training, metrics) sees only the label set's own class names.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from dataclasses import dataclass

import pandas as pd

from allcore.imaging.files import IMAGE_EXTENSIONS, filesystem, iter_image_files, join, list_subdirs
from allcore.data.labels import LabelSet

MANIFEST_SUFFIXES = (".csv", ".parquet", ".pq")
_FOLD_DIR = re.compile(r"fold_?\d+", re.IGNORECASE)  # C-NMC 2019: fold_0/all, fold_0/hem, ...


@dataclass(frozen=True)
class Sample:
    path: str  # local path or s3:// uri
    label: str  # class name of the label set (already mapped through LabelSet.to_class)
    group: str | None = None  # samples sharing a group never land in different splits


def _is_manifest(uri: str) -> bool:
    return uri.lower().endswith(MANIFEST_SUFFIXES)


def _read_manifest(manifest: str, label_set: LabelSet) -> list[Sample]:
    fs, path = filesystem(manifest)
    with fs.open(path, "rb") as handle:
        table = pd.read_csv(handle) if manifest.lower().endswith(".csv") else pd.read_parquet(handle)
    missing = {"path", "label"} - set(table.columns)
    if missing:
        raise ValueError(
            f"manifest {manifest} lacks column(s) {', '.join(sorted(missing))}; it has "
            f"{', '.join(map(str, table.columns))}. Expected path,label[,group].")
    base = manifest.rsplit("/", 1)[0] if manifest.startswith("s3://") else os.path.dirname(path)
    groups = table["group"] if "group" in table.columns else [None] * len(table)
    samples = []
    for raw_path, raw_label, group in zip(table["path"], table["label"], groups):
        raw_path = str(raw_path)
        absolute = raw_path.startswith("s3://") or os.path.isabs(raw_path)
        samples.append(Sample(
            path=raw_path if absolute else join(base, raw_path),
            label=label_set.to_class(raw_label),
            group=None if group is None or pd.isna(group) else str(group),
        ))
    return samples


def _class_folders(source: str, label_set: LabelSet) -> list[tuple[str, str]]:
    """(folder uri, class) pairs: class folders under ``source``, or under its C-NMC folds."""
    names = list_subdirs(source)
    if names and all(_FOLD_DIR.fullmatch(name) for name in names):
        return [pair for fold in names for pair in _class_folders(join(source, fold), label_set)]
    return [(join(source, name), label_set.to_class(name)) for name in names]


def discover_samples(source: str, label_set: LabelSet, *, manifest: str | None = None) -> list[Sample]:
    """All labelled images of a folder-per-class tree or of a CSV/Parquet manifest.

    ``source`` is a folder (local or s3://) holding one folder per class, or a manifest file.
    ``manifest`` names a manifest kept elsewhere; it then takes the place of ``source``. Paths in a
    manifest that are relative are read relative to the manifest's own folder, so a data folder
    and its manifest can move together. Output is sorted by path.
    """
    manifest = manifest or (source if _is_manifest(source) else None)
    if manifest:
        samples = _read_manifest(manifest, label_set)
    else:
        samples = [Sample(info.uri, cls)
                   for folder, cls in _class_folders(source, label_set)
                   for info in iter_image_files(folder)]
    if not samples:
        raise ValueError(
            f"no images found in {manifest or source}; expected folders named after classes "
            f"({', '.join(label_set.classes)}) holding {', '.join(IMAGE_EXTENSIONS)} files, "
            "or a manifest with path,label columns")
    repeated = sorted(path for path, n in Counter(s.path for s in samples).items() if n > 1)
    if repeated:
        raise ValueError(f"manifest lists these paths more than once: {repeated[:5]}; "
                         "remove the repeats")
    return sorted(samples, key=lambda s: s.path)
