"""Synthetic laboratories' roots for the cell-crop tests: ALL-IDB, BCCD and Taleqani layouts
(``allcore.data.celldata.lab_of_root`` recognises each), with white cells where ``make_field`` drew them."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image

from allcore.data import celldata
from allcore.data.synthetic import make_field

SIZE, DIAMETER = 448, 80.0  # synthetic white cells at size 448 are ~60-108 px across
LEUKAEMIC, HEALTHY = (1, 2, 3, 4), (6, 7)
OVERLAPPING = 12  # a healthy field that re-captures field 7 shifted: same cells, another block


def write_all_idb(root: Path) -> dict[str, list]:
    """An ALL-IDB-like tree: ALL_IDB1 fields (leukaemic ones with every white cell's centroid
    marked), a field overlapping field 7, and two ALL_IDB2 crops. Returns each field's boxes."""
    rng = np.random.default_rng(0)
    (root / "ALL_IDB1/im").mkdir(parents=True)
    (root / "ALL_IDB1/xyc").mkdir(parents=True)
    (root / "ALL_IDB2/img").mkdir(parents=True)
    boxes = {}
    for number in LEUKAEMIC + HEALTHY:
        y = int(number in LEUKAEMIC)
        img, cell_boxes = make_field(rng, 3 if y else 0, SIZE, scale_bar=False)
        name = f"Im{number:03d}_{y}"
        img.save(root / f"ALL_IDB1/im/{name}.jpg", quality=95)
        if y:  # every white cell of a leukaemic synthetic field is a marked blast
            lines = [f"{(b[0] + b[2]) / 2:.0f}\t{(b[1] + b[3]) / 2:.0f}" for b in cell_boxes]
            (root / f"ALL_IDB1/xyc/{name}.xyc").write_text("\n".join(lines) + "\n")
        boxes[name] = cell_boxes
    seven = np.asarray(Image.open(root / "ALL_IDB1/im/Im007_0.jpg"))
    Image.fromarray(np.roll(seven, (6, 9), axis=(0, 1))).save(
        root / f"ALL_IDB1/im/Im{OVERLAPPING:03d}_0.jpg", quality=95)
    # ALL_IDB2-style crops (128 px, centred on a cell) cut from fields 1 and 7
    for crop_number, field in ((1, "Im001_1"), (20, "Im007_0")):
        x0, y0, x1, y1 = boxes[field][0]
        cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
        field_img = Image.open(root / f"ALL_IDB1/im/{field}.jpg")
        field_img.crop((cx - 64, cy - 64, cx + 64, cy + 64)).save(
            root / f"ALL_IDB2/img/Im{crop_number:03d}_{field[-1]}.tif")
    return boxes


def write_bccd(root: Path, numbers: Iterable[int] = range(4)) -> int:
    """A BCCD-like tree: fields with their white cells as Pascal VOC WBC boxes (and RBC noise),
    one per image number (blocks of ``celldata.BCCD_BLOCK`` numbers are one group). Returns the
    number of WBC boxes."""
    rng = np.random.default_rng(5)
    (root / "JPEGImages").mkdir(parents=True)
    (root / "Annotations").mkdir()
    count = 0
    for number in numbers:
        img, boxes = make_field(rng, 1, SIZE, scale_bar=False)
        img.save(root / f"JPEGImages/BloodImage_{number:05d}.jpg", quality=95)
        objects = "".join(f"<object><name>{name}</name><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin>"
                          f"<xmax>{b[2] - 1}</xmax><ymax>{b[3] - 1}</ymax></bndbox></object>"
                          for name, b in [*(("WBC", b) for b in boxes), ("RBC", (1, 1, 20, 20))])
        (root / f"Annotations/BloodImage_{number:05d}.xml").write_text(f"<annotation>{objects}</annotation>")
        count += len(boxes)
    return count


def write_taleqani(root: Path) -> dict[str, int]:
    """A Taleqani-like tree: ``Original/<class>/`` with two 224 px fields per class."""
    rng = np.random.default_rng(6)
    fields = {}
    for index, name in enumerate(celldata.TALEQANI_CLASSES):
        (root / "Original" / name).mkdir(parents=True)
        for number in range(1, 3):
            make_field(rng, index, 224)[0].save(root / f"Original/{name}/WBC-{name}-{number:03d}.jpg")
        fields[name] = 2
    return fields
