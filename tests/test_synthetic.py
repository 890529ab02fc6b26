"""allcore.data.synthetic: fields look like smears, classes differ in their cells, archives carry twins."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

from allcore.data.samples import discover_samples
from allcore.data.labels import get_label_set
from allcore.data.splits import image_hashes
from allcore.data.synthetic import make_field, write_archive

ALL4 = get_label_set("all4")


def stained(pixels: np.ndarray) -> np.ndarray:
    """Purple (stained white-cell) pixels: blue well above green, not the pink background."""
    r, g, b = (pixels[..., i].astype(int) for i in range(3))
    return (b - g > 30) & (b > r - 10)


def dark_nucleus(pixels: np.ndarray) -> np.ndarray:
    return stained(pixels) & (pixels.astype(int).sum(axis=-1) < 330)


def test_field_is_deterministic_and_cells_lie_in_their_boxes():
    img, boxes = make_field(np.random.default_rng(7), 2, size=224)
    again, same_boxes = make_field(np.random.default_rng(7), 2, size=224)
    assert np.array_equal(np.asarray(img), np.asarray(again)) and boxes == same_boxes
    assert img.mode == "RGB" and img.size == (224, 224) and 1 <= len(boxes) <= 3

    pixels = np.asarray(img)
    inside = np.zeros(pixels.shape[:2], bool)
    for x0, y0, x1, y1 in boxes:
        assert 0 <= x0 < x1 <= 224 and 0 <= y0 < y1 <= 224
        assert dark_nucleus(pixels[y0:y1, x0:x1]).mean() > 0.1  # every box holds a nucleus
        inside[y0:y1, x0:x1] = True
    assert stained(pixels)[~inside].mean() < 0.002  # no stained cells outside the boxes


def test_scale_bar_is_optional_and_in_the_corner():
    with_bar, _ = make_field(np.random.default_rng(3), 0, size=224)
    without, _ = make_field(np.random.default_rng(3), 0, size=224, scale_bar=False)
    corner = (slice(200, 224), slice(170, 224))
    assert np.asarray(with_bar)[corner].min() < 60 < np.asarray(without)[corner].min()


def test_classes_differ_in_nucleus_size():
    """The class signal is morphology: the mean nucleus share of a cell box grows by class."""
    rng = np.random.default_rng(0)
    shares = []
    for label_index in range(4):
        per_box = []
        for _ in range(8):
            img, boxes = make_field(rng, label_index, size=224)
            pixels = np.asarray(img)
            per_box += [dark_nucleus(pixels[y0:y1, x0:x1]).mean() for x0, y0, x1, y1 in boxes]
        shares.append(np.mean(per_box))
    assert shares[0] < shares[1] < shares[3] and shares[0] < shares[2] < shares[3], shares


def test_field_scales_and_validates():
    img, boxes = make_field(np.random.default_rng(0), 3, size=64)
    assert img.size == (64, 64) and all(b[2] <= 64 and b[3] <= 64 for b in boxes)
    with pytest.raises(ValueError, match="label_index"):
        make_field(np.random.default_rng(0), 4)


def test_write_archive_layout_boxes_and_twins(tmp_path):
    start = time.monotonic()
    samples = write_archive(tmp_path, label_set=ALL4, per_class=25, seed=4)
    assert time.monotonic() - start < 5, "100 fields should take a couple of seconds"
    assert samples == discover_samples(str(tmp_path), ALL4)
    assert {Path(s.path).name for s in samples} >= {"WBC-Benign-001.jpg", "WBC-Pro-025.jpg"}

    boxes = json.loads((tmp_path / "boxes.json").read_text())
    assert sorted(boxes) == sorted(Path(s.path).relative_to(tmp_path).as_posix() for s in samples)
    assert all(1 <= len(b) <= 3 for b in boxes.values())

    twins = json.loads((tmp_path / "duplicates.json").read_text())
    kinds = [kind for _, _, kind in twins]
    assert kinds.count("identical") == kinds.count("near") == 3 * 4
    for first, second, kind in twins:
        a, b = (tmp_path / first).read_bytes(), (tmp_path / second).read_bytes()
        assert (a == b) == (kind == "identical")
        hash_a, hash_b = (image_hashes(str(tmp_path / name)).phash for name in (first, second))
        distance = bin(hash_a ^ hash_b).count("1")
        assert distance <= 6, (first, second, distance)

    plain = tmp_path / "plain"
    write_archive(plain, label_set=get_label_set("binary"), per_class=9, size=64, near_duplicates=False)
    assert json.loads((plain / "duplicates.json").read_text()) == []
    assert sorted(p.name for p in plain.iterdir()) == [
        "benign", "boxes.json", "duplicates.json", "malignant"]
