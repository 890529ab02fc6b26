"""Leak-free splits: duplicate and near-duplicate groups, stratified grouped splits, k-fold.

Smear archives hold byte-identical copies and re-captured neighbours of the same field (see
``shared/data/README.md``). A per-image random split puts such twins on both sides and inflates
test scores, so every split here assigns whole *groups*, where a group joins every pair of
images that are byte-identical or perceptually close, plus (optionally) contiguous file-number
blocks, which approximate acquisition sessions when patient ids are lost.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache

import imagehash
import numpy as np
from PIL import Image
from scipy.cluster.hierarchy import DisjointSet

from allcore.data.samples import Sample
from allcore.imaging.files import decode_rgb, read_bytes, write_bytes

STRATEGIES = ("duplicates", "blocks", "none")
SPLIT_COLUMNS = ("path", "label", "group", "split")


def perceptual_hash(img: Image.Image) -> int:
    """``imagehash.phash`` as a 64-bit int: low DCT frequencies of a 32x32 grey thumbnail above
    their median. Re-encoding, small shifts and mild colour changes flip only a few bits, so the
    Hamming distance between hashes finds near-identical fields; an int keeps the banded search
    in :func:`near_duplicate_pairs` on numpy's uint64."""
    return int(str(imagehash.phash(img)), 16)


@dataclass(frozen=True)
class ImageHashes:
    sha256: str  # content hash: byte-identical files
    phash: int  # perceptual hash: near-identical fields


@lru_cache(maxsize=None)
def image_hashes(path: str) -> ImageHashes:
    """Hashes of one file, cached for the life of the process (files are not edited mid-run)."""
    data = read_bytes(path)
    return ImageHashes(hashlib.sha256(data).hexdigest(), perceptual_hash(decode_rgb(data)))


def hash_samples(samples: Sequence[Sample], *, workers: int = 8) -> list[ImageHashes]:
    """Hashes of every sample; threads overlap reads (s3) and JPEG decodes (which drop the GIL)."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(image_hashes, [s.path for s in samples]))


def near_duplicate_pairs(phashes: Sequence[int], max_distance: int) -> list[tuple[int, int]]:
    """Index pairs (i < j) whose hashes differ in at most ``max_distance`` bits.

    Pigeonhole: cut the 64 bits into ``max_distance + 1`` bands; two hashes that close agree
    exactly on at least one band, so only hashes sharing a band value are ever compared.
    """
    if not 0 <= max_distance < 64:
        raise ValueError(f"phash_distance must be in 0..63 bits, got {max_distance}")
    hashes = np.asarray(phashes, dtype=np.uint64)
    edges = np.linspace(0, 64, max_distance + 2).astype(int)
    pairs: set[tuple[int, int]] = set()
    for low, high in zip(edges[:-1], edges[1:]):
        band = (hashes >> np.uint64(low)) & np.uint64((1 << int(high - low)) - 1)
        order = np.argsort(band, kind="stable")
        for bucket in np.split(order, np.flatnonzero(np.diff(band[order])) + 1):
            for position, i in enumerate(bucket[:-1]):
                others = bucket[position + 1:]
                close = others[np.bitwise_count(hashes[i] ^ hashes[others]) <= max_distance]
                pairs.update((min(int(i), int(j)), max(int(i), int(j))) for j in close)
    return sorted(pairs)


def _block_key(sample: Sample, block_size: int) -> str:
    numbers = re.findall(r"\d+", os.path.splitext(os.path.basename(sample.path))[0])
    if not numbers:
        raise ValueError(f"strategy 'blocks' needs a number in every file name; {sample.path} has "
                         "none. Use strategy='duplicates' or give groups in a manifest.")
    return f"{sample.label}/block-{int(numbers[-1]) // block_size:04d}"


def assign_groups(samples: Sequence[Sample], *, strategy: str = "duplicates", block_size: int = 20,
                  phash_distance: int = 6) -> list[str]:
    """A group id per sample; samples sharing an id must stay in the same split.

    Start: a sample's own ``group`` (e.g. patient id from a manifest) when given, else its file
    number block within its class ("blocks") or itself ("duplicates", "none"). Then, except for
    "none", byte-identical and perceptually near images (Hamming <= ``phash_distance``) are merged
    on top, so twins across a block edge still land together. A group is named after the smallest
    starting key among its members: the same data gives the same ids, whatever the input order.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown grouping strategy {strategy!r}; "
                         f"choose one of: {', '.join(STRATEGIES)}")
    if block_size < 1:
        raise ValueError(f"block_size must be at least 1, got {block_size}")
    keys = [s.group if s.group is not None
            else _block_key(s, block_size) if strategy == "blocks" else s.path for s in samples]
    components = DisjointSet(range(len(samples)))
    first_with_key: dict[str, int] = {}
    for i, key in enumerate(keys):
        components.merge(first_with_key.setdefault(key, i), i)
    if strategy != "none":
        hashes = hash_samples(samples)
        first_with_content: dict[str, int] = {}
        for i, h in enumerate(hashes):
            components.merge(first_with_content.setdefault(h.sha256, i), i)
        for i, j in near_duplicate_pairs([h.phash for h in hashes], phash_distance):
            components.merge(i, j)
    names: dict[int, str] = {}
    for i, key in enumerate(keys):
        root = components[i]
        names[root] = min(names.get(root, key), key)
    return [names[components[i]] for i in range(len(samples))]


@dataclass(frozen=True)
class SplitRow:
    path: str
    label: str
    group: str
    split: str


class SplitManifest:
    """Which sample belongs to which split. Its sha256 (over canonical CSV bytes) goes into the
    model card, so every reported number can be traced to the exact split it was measured on."""

    def __init__(self, rows: Iterable[SplitRow]):
        self.rows = tuple(sorted(rows, key=lambda r: r.path))

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def names(self) -> list[str]:
        return sorted({r.split for r in self.rows})

    def subset(self, name: str) -> list[Sample]:
        if name not in self.names:
            raise ValueError(f"no split named {name!r}; this manifest has {', '.join(self.names)}")
        return [Sample(r.path, r.label, r.group) for r in self.rows if r.split == name]

    def counts(self) -> dict[str, dict[str, int]]:
        """{split: {label: number of samples}}."""
        table: dict[str, Counter] = defaultdict(Counter)
        for r in self.rows:
            table[r.split][r.label] += 1
        return {split: dict(sorted(c.items())) for split, c in sorted(table.items())}

    def to_csv_bytes(self) -> bytes:
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(SPLIT_COLUMNS)
        writer.writerows((r.path, r.label, r.group, r.split) for r in self.rows)
        return buffer.getvalue().encode("utf-8")

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.to_csv_bytes()).hexdigest()

    def write(self, uri: str) -> str:
        """Write the CSV (local or s3://) and return its sha256."""
        data = self.to_csv_bytes()
        write_bytes(uri, data)
        return hashlib.sha256(data).hexdigest()

    @classmethod
    def read(cls, uri: str) -> SplitManifest:
        reader = csv.DictReader(io.StringIO(read_bytes(uri).decode("utf-8")))
        if tuple(reader.fieldnames or ()) != SPLIT_COLUMNS:
            raise ValueError(f"{uri} is not a split manifest: columns {reader.fieldnames}, expected "
                             f"{', '.join(SPLIT_COLUMNS)}. Write it with SplitManifest.write.")
        return cls(SplitRow(**row) for row in reader)


def _assign_bins(groups: Sequence[str], labels: Sequence[str], fractions: Sequence[float],
                 rng: np.random.Generator) -> dict[str, int]:
    """Group id -> bin index, stratified by class and balanced toward ``fractions``.

    A group counts toward its members' majority class. Within a class, groups are visited
    largest first (seeded random order among equal sizes) and each joins the bin furthest below
    its target count: big duplicate clusters are placed while there is still room to balance.
    """
    member_labels: dict[str, list[str]] = defaultdict(list)
    for group, label in zip(groups, labels):
        member_labels[group].append(label)
    pools: dict[str, list[tuple[str, int]]] = defaultdict(list)
    for group, group_labels in sorted(member_labels.items()):
        majority = min(Counter(group_labels).items(), key=lambda item: (-item[1], item[0]))[0]
        pools[majority].append((group, len(group_labels)))
    assignment: dict[str, int] = {}
    for label in sorted(pools):
        pool = [pools[label][i] for i in rng.permutation(len(pools[label]))]
        pool.sort(key=lambda item: -item[1])
        targets = np.asarray(fractions, dtype=float) * sum(size for _, size in pool)
        filled = np.zeros(len(targets))
        for group, size in pool:
            chosen = int(np.argmax(targets - filled))
            assignment[group] = chosen
            filled[chosen] += size
    return assignment


def split_samples(samples: Sequence[Sample], *, fractions: Sequence[float] = (0.8, 0.1, 0.1),
                  seed: int = 0, strategy: str = "duplicates",
                  names: Sequence[str] = ("train", "val", "test"), block_size: int = 20,
                  phash_distance: int = 6) -> SplitManifest:
    """A stratified, grouped split: no group (duplicate cluster, block) straddles two splits."""
    if len(fractions) != len(names) or len(set(names)) != len(names):
        raise ValueError(f"need one distinct name per fraction; got fractions {tuple(fractions)} "
                         f"and names {tuple(names)}")
    if min(fractions) < 0 or abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"fractions must be non-negative and sum to 1, got {tuple(fractions)}")
    groups = assign_groups(samples, strategy=strategy, block_size=block_size,
                           phash_distance=phash_distance)
    bins = _assign_bins(groups, [s.label for s in samples], fractions, np.random.default_rng(seed))
    return SplitManifest(SplitRow(s.path, s.label, g, names[bins[g]]) for s, g in zip(samples, groups))


def kfold_samples(samples: Sequence[Sample], *, k: int, seed: int = 0, strategy: str = "duplicates",
                  val_fraction: float = 0.125, block_size: int = 20,
                  phash_distance: int = 6) -> list[SplitManifest]:
    """k grouped, stratified folds; manifest i tests on fold i and splits the rest train/val."""
    if k < 2:
        raise ValueError(f"k-fold needs k >= 2, got {k}")
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be between 0 and 1, got {val_fraction}")
    groups = assign_groups(samples, strategy=strategy, block_size=block_size,
                           phash_distance=phash_distance)
    if len(set(groups)) < k:
        raise ValueError(f"only {len(set(groups))} groups for {k} folds; "
                         "lower k or use strategy='none'")
    labels = [s.label for s in samples]
    rng = np.random.default_rng(seed)
    fold_of = _assign_bins(groups, labels, [1.0 / k] * k, rng)
    manifests = []
    for fold in range(k):
        rest = [i for i, g in enumerate(groups) if fold_of[g] != fold]
        inner = _assign_bins([groups[i] for i in rest], [labels[i] for i in rest],
                             (1.0 - val_fraction, val_fraction), rng)
        manifests.append(SplitManifest(
            SplitRow(s.path, s.label, g, "test" if fold_of[g] == fold else ("train", "val")[inner[g]])
            for s, g in zip(samples, groups)))
    return manifests
