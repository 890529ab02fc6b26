"""Generated smear-field archives for the demo and the tests: no real data needed.

A field is a pink background with pale red-cell discs and 1-3 purple-stained white cells. Only
the white cells' morphology depends on the class (nucleus size, shape, chromatin, nucleoli), as
in the real task; tint and scale bar do not, so a model that learns the synthetic data learns
cells, not shortcuts. Archives copy the real data's hazards: byte-identical and near-identical
neighbours, so split code is tested against the leak it must prevent.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from allcore.data.samples import Sample
from allcore.data.labels import LabelSet

Box = list[int]  # [x0, y0, x1, y1] in pixels, x1/y1 exclusive


@dataclass(frozen=True)
class _Morphology:
    cell_radius: tuple[float, float]  # at size 224
    nucleus_ratio: float  # nucleus radius / cell radius
    elongation: float  # nucleus long axis / short axis
    lobes: int  # 1 round, 2 cleaved
    chromatin_spots: int  # dark clumps in the nucleus
    nucleoli: int  # pale spots in the nucleus


# One per class index, loosely after the French-American-British descriptions of the blasts.
MORPHOLOGIES = (
    _Morphology((15, 18), 0.60, 1.0, 1, 2, 0),   # hematogone: small, dense round nucleus
    _Morphology((19, 23), 0.75, 1.25, 1, 10, 1),  # early pre-B: larger, oval, finer chromatin
    _Morphology((21, 25), 0.80, 1.1, 2, 6, 0),   # pre-B: cleaved (two-lobed) nucleus
    _Morphology((23, 27), 0.90, 1.0, 1, 18, 3),  # pro-B: nucleus fills the cell, nucleoli
)
_CYTOPLASM, _NUCLEUS = (178, 168, 218), (88, 42, 124)
_CHROMATIN, _NUCLEOLUS = (62, 24, 92), (150, 118, 188)
_RED_CELL, _RED_CELL_CENTRE = (224, 148, 160), (238, 186, 192)


def _ellipse(cx: float, cy: float, rx: float, ry: float, angle: float) -> list[tuple[float, float]]:
    t = np.linspace(0, 2 * np.pi, 32, endpoint=False)
    x, y = rx * np.cos(t), ry * np.sin(t)
    c, s = np.cos(angle), np.sin(angle)
    return list(zip(cx + c * x - s * y, cy + s * x + c * y))


def _place_cells(rng: np.random.Generator, radii: list[float], size: int) -> list[tuple[float, float]]:
    """Non-overlapping white-cell centres, clear of the image edge and the scale-bar corner."""
    centres: list[tuple[float, float]] = []
    for radius in radii:
        for _ in range(200):
            x, y = rng.uniform(radius + 2, size - radius - 2, size=2)
            clear_of_bar = x < 0.7 * size or y < 0.8 * size
            if clear_of_bar and all(np.hypot(x - a, y - b) > radius + r + 2
                                    for (a, b), r in zip(centres, radii)):
                break
        centres.append((float(x), float(y)))
    return centres


def make_field(rng: np.random.Generator, label_index: int, size: int = 224, *,
               scale_bar: bool = True) -> tuple[Image.Image, list[Box]]:
    """One smear field of class ``label_index`` and the boxes of its white cells."""
    if not 0 <= label_index < len(MORPHOLOGIES):
        raise ValueError(f"label_index must be in 0..{len(MORPHOLOGIES) - 1}, got {label_index}")
    morph, scale = MORPHOLOGIES[label_index], size / 224
    background = tuple(int(v) for v in np.array([232, 202, 210]) + rng.integers(-8, 9, size=3))
    img = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(img)
    for _ in range(int(34 * scale ** 2)):
        x, y = rng.uniform(0, size, size=2)
        r = rng.uniform(9, 13) * scale
        draw.ellipse((x - r, y - r, x + r, y + r), fill=_RED_CELL)
        draw.ellipse((x - 0.45 * r, y - 0.45 * r, x + 0.45 * r, y + 0.45 * r), fill=_RED_CELL_CENTRE)

    radii = [rng.uniform(*morph.cell_radius) * scale for _ in range(rng.integers(1, 4))]
    boxes = []
    for (x, y), radius in zip(_place_cells(rng, radii, size), radii):
        draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=_CYTOPLASM)
        nucleus = radius * morph.nucleus_ratio
        angle = rng.uniform(0, np.pi)
        rx, ry = nucleus * np.sqrt(morph.elongation), nucleus / np.sqrt(morph.elongation)
        offset = (radius - nucleus) * rng.uniform(0, 0.8)
        nx, ny = x + offset * np.cos(angle), y + offset * np.sin(angle)
        for lobe in range(morph.lobes):  # lobes side by side along the short axis: a cleft
            shift = (lobe - (morph.lobes - 1) / 2) * 0.55 * ry
            lx, ly = nx - shift * np.sin(angle), ny + shift * np.cos(angle)
            draw.polygon(_ellipse(lx, ly, rx, ry / morph.lobes ** 0.5, angle), fill=_NUCLEUS)
        for count, colour, spot_radius in ((morph.chromatin_spots, _CHROMATIN, 1.2),
                                           (morph.nucleoli, _NUCLEOLUS, 2.2)):
            for _ in range(count):
                d, t = 0.6 * nucleus * np.sqrt(rng.uniform()), rng.uniform(0, 2 * np.pi)
                sx, sy, sr = nx + d * np.cos(t), ny + d * np.sin(t), spot_radius * scale
                draw.ellipse((sx - sr, sy - sr, sx + sr, sy + sr), fill=colour)
        boxes.append([max(0, int(x - radius)), max(0, int(y - radius)),
                      min(size, int(np.ceil(x + radius)) + 1), min(size, int(np.ceil(y + radius)) + 1)])

    if scale_bar:
        bar_w, bar_h, margin = int(30 * scale), max(2, int(3 * scale)), int(6 * scale)
        x1, y1 = size - margin, size - margin
        draw.rectangle((x1 - bar_w, y1 - bar_h, x1, y1), fill=(30, 30, 30))
    pixels = np.asarray(img.filter(ImageFilter.GaussianBlur(0.7 * scale)), dtype=np.float32)
    pixels += rng.normal(0, 4, size=pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)), boxes


def _jpeg(img: Image.Image, quality: int) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def _near_copy(rng: np.random.Generator, img: Image.Image,
               boxes: list[Box]) -> tuple[Image.Image, list[Box]]:
    """The same field re-captured: shifted a pixel or two, slightly brighter or darker."""
    dx, dy = (int(v) for v in rng.integers(-2, 3, size=2))
    pixels = np.roll(np.asarray(img, dtype=np.float32), (dy, dx), axis=(0, 1)) * rng.uniform(0.96, 1.04)
    size = img.width
    shifted = [[min(max(b[0] + dx, 0), size), min(max(b[1] + dy, 0), size),
                min(max(b[2] + dx, 0), size), min(max(b[3] + dy, 0), size)] for b in boxes]
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)), shifted


def write_archive(root: str | Path, *, label_set: LabelSet, per_class: int = 24, size: int = 224,
                  seed: int = 0, near_duplicates: bool = True) -> list[Sample]:
    """Write ``root/<Class>/WBC-<Class>-NNN.jpg`` for every class and return the samples.

    With ``near_duplicates``, every 8th field's next neighbour is a byte-identical copy and every
    other 8th a near-identical re-capture, as in the real archive. ``boxes.json`` maps each file
    (relative path) to its white-cell boxes; ``duplicates.json`` lists the [first, second, kind]
    neighbour pairs, the ground truth for split tests.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    boxes_by_file: dict[str, list[Box]] = {}
    twins: list[list[str]] = []
    samples = []
    for label_index, cls in enumerate(label_set.classes):
        (root / cls).mkdir(parents=True, exist_ok=True)
        previous: tuple[Image.Image, list[Box], bytes, str] | None = None
        for number in range(1, per_class + 1):
            name = f"{cls}/WBC-{cls}-{number:03d}.jpg"
            kind = {0: "identical", 4: "near"}.get(number % 8) if near_duplicates else None
            if kind and previous:
                img, boxes, data, previous_name = previous
                if kind == "near":
                    img, boxes = _near_copy(rng, img, boxes)
                    data = _jpeg(img, quality=88)
                twins.append([previous_name, name, kind])
            else:
                img, boxes = make_field(rng, label_index, size)
                data = _jpeg(img, quality=92)
            (root / name).write_bytes(data)
            boxes_by_file[name] = boxes
            samples.append(Sample(str(root / name), cls))
            previous = (img, boxes, data, name)
    (root / "boxes.json").write_text(json.dumps(boxes_by_file, indent=1))
    (root / "duplicates.json").write_text(json.dumps(twins, indent=1))
    return sorted(samples, key=lambda s: s.path)


def mosaic_region(fields: list[np.ndarray], *, columns: int, margin: int,
                  glass: int = 244) -> tuple[int, int, Callable[[int, int, int, int], np.ndarray]]:
    """(width, height, region) of a slide that lays ``fields`` (uint8 RGB arrays of one size)
    row by row, ``columns`` a row, on glass with ``margin`` px around: ``region(x, y, w, h)`` is
    what ``allcore.imaging.slides.write_pyramid_tiff`` reads. Field i's top-left is
    ``mosaic_offset(i, ...)``."""
    fh, fw = fields[0].shape[:2]
    rows = -(-len(fields) // columns)
    width, height = 2 * margin + columns * fw, 2 * margin + rows * fh

    def region(x: int, y: int, w: int, h: int) -> np.ndarray:
        out = np.full((h, w, 3), glass, np.uint8)
        # only the grid cells the region overlaps: a 40k px slide lays ~8,000 fields, and a
        # loop over all of them for each of its ~25,000 tiles took most of the writing time
        cols = range(max(0, (x - margin) // fw), min(columns, (x + w - 1 - margin) // fw + 1))
        for row in range(max(0, (y - margin) // fh), min(rows, (y + h - 1 - margin) // fh + 1)):
            for i in (row * columns + col for col in cols if row * columns + col < len(fields)):
                fx, fy = mosaic_offset(i, columns=columns, margin=margin, field_size=(fw, fh))
                x0, y0, x1, y1 = max(x, fx), max(y, fy), min(x + w, fx + fw), min(y + h, fy + fh)
                if x1 > x0 and y1 > y0:
                    out[y0 - y:y1 - y, x0 - x:x1 - x] = fields[i][y0 - fy:y1 - fy, x0 - fx:x1 - fx]
        return out

    return width, height, region


def mosaic_offset(index: int, *, columns: int, margin: int, field_size: tuple[int, int]) -> tuple[int, int]:
    return margin + (index % columns) * field_size[0], margin + (index // columns) * field_size[1]


def write_slide(path: str | Path, *, columns: int = 6, rows: int = 4, field_size: int = 448,
                mpp: float | None = 0.15, margin: int = 300, seed: int = 0) -> list[Box]:
    """A pyramidal TIFF slide (``allcore.imaging.slides.write_pyramid_tiff``) of ``columns`` x ``rows``
    generated fields without scale bars on glass, ``mpp`` um/px in its resolution tags (none when
    None): a white cell is ~9-15 um across at 448 px and 0.15 um/px. Returns every white cell's
    box in level-0 slide pixels."""
    from allcore.imaging.slides import write_pyramid_tiff

    rng = np.random.default_rng(seed)
    fields, boxes = [], []
    for i in range(columns * rows):
        img, field_boxes = make_field(rng, int(rng.integers(0, len(MORPHOLOGIES))), field_size,
                                      scale_bar=False)
        fx, fy = mosaic_offset(i, columns=columns, margin=margin, field_size=(field_size, field_size))
        fields.append(np.asarray(img))
        boxes += [[b[0] + fx, b[1] + fy, b[2] + fx, b[3] + fy] for b in field_boxes]
    width, height, region = mosaic_region(fields, columns=columns, margin=margin)
    write_pyramid_tiff(str(path), width, height, region, mpp=mpp)
    return boxes
