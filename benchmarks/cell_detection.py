"""Measure the white-cell finder (allcore/imaging/cells.py) against people's annotations: BCCD white-cell
boxes and ALL-IDB blast centroids, plus time per field at three magnifications.

    python -m benchmarks.cell_detection [--data ../shared/data] [--out docs/CELLS.md] [--workers 2]

- BCCD (``bccd/``: 640 x 480 fields, Pascal VOC boxes): white-cell precision and recall at
  IoU >= 0.5, found cells matched one to one to the WBC boxes (greedy, highest IoU first).
- ALL_IDB1 (``all-idb/ALL_IDB1``: 1712 and 2592 px fields, one centroid per blast): the fraction
  of blast centroids inside exactly one found cell's box, the fraction inside a cell holding no
  other centroid (a cluster kept as one box fails it), and cells per field with (Y = 1) and
  without (Y = 0) blasts.
- Time: median CPU ms per field of ``find_cells`` (diameter estimate included, image decoded
  beforehand; CPU time, not wall, as the machine is shared), one thread, at 224 (Taleqani),
  640 (BCCD), 1712 and 2592 px (ALL-IDB).

Every number is given for two diameter sources: ``field`` (estimated on each field, the default)
and ``archive`` (one ``cell_diameter_px`` per dataset: the median of the per-field estimates over
its tuning part, as a run on one microscope would pass). Tuning parts, on which the estimator's
filters and the finder's scale settings were chosen: BCCD images at sorted positions divisible by
3; ALL_IDB1 fields at even sorted positions. Tables give tuning, report (the rest) and all.
The table replaces the block between the ``<!-- detection:start -->`` and
``<!-- detection:end -->`` markers of --out.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass, replace
from multiprocessing import Pool
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # one thread per field: CPU time is then per field

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from allcore.data import celldata
from allcore.imaging.cells import CellFinderConfig, find_cells, median_cell_diameter
from benchmarks.cell_finder_vs_segmented import write_results

MARKERS = ("<!-- detection:start -->", "<!-- detection:end -->")
IOU_MATCH = 0.5
DEFAULT_DATA = Path(os.environ.get("ALLCORE_SHARED_DATA")
                    or Path(__file__).resolve().parents[2] / "shared" / "data")
TUNING_STRIDE = {"bccd": 3, "idb": 2}  # the tuning part: every n-th field in sorted order
TIMED_TALEQANI = 40  # Taleqani fields timed (every 50th of the sorted Original images)


def box_iou(a, b) -> float:
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def voc_boxes(xml_path: Path, name: str = "WBC") -> list[tuple[int, int, int, int]]:
    """Boxes of class ``name`` in a Pascal VOC file (``allcore.data.celldata.voc_boxes``)."""
    return celldata.voc_boxes(xml_path.read_bytes(), name)


def matched_pairs(truth: list, found: list) -> int:
    """One-to-one matches at IoU >= IOU_MATCH, greedy from the highest IoU."""
    pairs = sorted(((box_iou(t, f), i, j) for i, t in enumerate(truth) for j, f in enumerate(found)), reverse=True)
    used_t, used_f = set(), set()
    for iou, i, j in pairs:
        if iou < IOU_MATCH:
            break
        if i not in used_t and j not in used_f:
            used_t.add(i)
            used_f.add(j)
    return len(used_t)


@dataclass(frozen=True)
class FieldResult:
    name: str
    tuning: bool
    found: int
    truth: int  # BCCD: WBC boxes; ALL-IDB: blast centroids
    matched: int  # BCCD: matched boxes; ALL-IDB: centroids inside exactly one box
    alone: int  # ALL-IDB: centroids inside a cell that holds no other centroid
    blasts_field: bool
    ms: float
    width: int


def timed_find(rgb: np.ndarray, config: CellFinderConfig) -> tuple[list, float]:
    start = time.process_time()
    cells = find_cells(rgb, config)
    return cells, (time.process_time() - start) * 1000


def bccd_one(args: tuple[Path, bool, CellFinderConfig]) -> FieldResult:
    path, tuning, config = args
    rgb = np.asarray(Image.open(path).convert("RGB"))
    truth = voc_boxes(path.parents[1] / "Annotations" / f"{path.stem}.xml")
    cells, ms = timed_find(rgb, config)
    found = [c.box for c in cells]
    return FieldResult(path.stem, tuning, len(found), len(truth), matched_pairs(truth, found), 0, False, ms,
                       rgb.shape[1])


def idb_one(args: tuple[Path, bool, CellFinderConfig]) -> FieldResult:
    path, tuning, config = args
    rgb = np.asarray(Image.open(path).convert("RGB"))
    xyc = path.parents[1] / "xyc" / f"{path.stem}.xyc"
    text = xyc.read_text().split() if xyc.is_file() else []
    centroids = np.array(text, dtype=float).reshape(-1, 2)
    cells, ms = timed_find(rgb, config)
    inside = np.array([[c.box[0] <= x < c.box[2] and c.box[1] <= y < c.box[3] for c in cells]
                       for x, y in centroids], dtype=bool).reshape(len(centroids), len(cells))
    once = inside.sum(axis=1) == 1
    alone = once & (inside[:, inside.argmax(axis=1)].sum(axis=0) == 1) if len(cells) else once
    return FieldResult(path.stem, tuning, len(cells), len(centroids), int(once.sum()), int(alone.sum()),
                       path.stem.endswith("_1"), ms, rgb.shape[1])


def archive_config(paths: list[Path], config: CellFinderConfig) -> CellFinderConfig:
    """One diameter for the dataset: the median per-field estimate over ``paths``."""
    return replace(config, cell_diameter_px=median_cell_diameter((Image.open(p) for p in paths), config))


def parts(results: list[FieldResult]):
    """(part name, its fields) for the tuning part, the report part and all fields."""
    for part, keep in (("tuning", True), ("report", False), ("all", None)):
        mine = [r for r in results if keep is None or r.tuning == keep]
        if mine:
            yield part, mine


def bccd_rows(results: list[FieldResult]) -> dict[str, str]:
    rows = {}
    for part, mine in parts(results):
        truth, found, matched = (sum(getattr(r, k) for r in mine) for k in ("truth", "found", "matched"))
        rows[part] = (f"{len(mine)} | {truth} | {found} | {matched / truth:.3f} | {matched / max(found, 1):.3f} | "
                      f"{median_ms(mine)}")
    return rows


def idb_rows(results: list[FieldResult]) -> dict[str, str]:
    rows = {}
    for part, mine in parts(results):
        truth = sum(r.truth for r in mine)
        blasts = [r.found for r in mine if r.blasts_field]
        healthy = [r.found for r in mine if not r.blasts_field]
        rows[part] = (f"{len(mine)} | {truth} | {sum(r.matched for r in mine) / truth:.3f} | "
                      f"{sum(r.alone for r in mine) / truth:.3f} | {np.mean(blasts):.1f} | "
                      f"{np.mean(healthy):.1f} | {median_ms(mine)}")
    return rows


def median_ms(results: list[FieldResult], width: int | None = None) -> str:
    """Median ms over the fields (of ``width`` pixels, when given)."""
    return f"{np.median([r.ms for r in results if width in (None, r.width)]):.0f}"


def taleqani_ms(data: Path, config: CellFinderConfig) -> float:
    paths = sorted((data / "all-taleqani" / "Original").glob("*/*.jpg"))[::50][:TIMED_TALEQANI]
    return float(np.median([timed_find(np.asarray(Image.open(p).convert("RGB")), config)[1] for p in paths]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder holding bccd/ and all-idb/")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "docs" / "CELLS.md")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    bccd = sorted((args.data / "bccd" / "JPEGImages").glob("*.jpg"))
    idb = sorted((args.data / "all-idb" / "ALL_IDB1" / "im").glob("*.jpg"))
    if not bccd or not idb:
        raise SystemExit(f"no BCCD or ALL_IDB1 images under {args.data}; pass --data <shared data folder>")
    config = CellFinderConfig()
    lines = ["| dataset | diameter | part | fields | truth | found | recall | precision | median ms |",
             "|---|---|---|---|---|---|---|---|---|"]
    idb_lines = ["| diameter | part | fields | blast centroids | in exactly one box | in a box of its own | "
                 "cells per Y=1 field | cells per Y=0 field | median ms |", "|---|---|---|---|---|---|---|---|---|"]
    paths, evaluate = {"bccd": bccd, "idb": idb}, {"bccd": bccd_one, "idb": idb_one}

    def run(name: str, config: CellFinderConfig) -> list[FieldResult]:
        stride = TUNING_STRIDE[name]
        return pool.map(evaluate[name], [(p, i % stride == 0, config) for i, p in enumerate(paths[name])])

    with Pool(args.workers) as pool:
        per_field = {name: run(name, config) for name in paths}
        diameters = {name: archive_config(paths[name][::TUNING_STRIDE[name]], config) for name in paths}
        per_archive = {name: run(name, diameters[name]) for name in paths}
    for source, results in (("field", per_field), ("archive", per_archive)):
        label = "per field" if source == "field" else f"{diameters['bccd'].cell_diameter_px:.0f} px"
        for part, row in bccd_rows(results["bccd"]).items():
            lines.append(f"| BCCD WBC | {label} | {part} | {row} |")
        label = "per field" if source == "field" else f"{diameters['idb'].cell_diameter_px:.0f} px"
        for part, row in idb_rows(results["idb"]).items():
            idb_lines.append(f"| {label} | {part} | {row} |")
    taleqani = replace(config, cell_diameter_px=config.working_diameter_px)
    timing = (f"Median CPU ms per field of `find_cells` (one thread, image decoded beforehand), diameter "
              f"estimated per field / given: 224 px Taleqani {taleqani_ms(args.data, config):.0f} / "
              f"{taleqani_ms(args.data, taleqani):.0f} ms ({TIMED_TALEQANI} fields, given "
              f"{taleqani.cell_diameter_px:g} px), 640 x 480 BCCD {median_ms(per_field['bccd'])} / "
              f"{median_ms(per_archive['bccd'])} ms, 1712 x 1368 ALL-IDB "
              f"{median_ms(per_field['idb'], 1712)} / {median_ms(per_archive['idb'], 1712)} ms, "
              f"2592 x 1944 ALL-IDB {median_ms(per_field['idb'], 2592)} / {median_ms(per_archive['idb'], 2592)} ms.")
    block = "\n".join([MARKERS[0], "BCCD white cells, IoU >= 0.5, one-to-one:", "", *lines, "",
                       "ALL_IDB1 blast centroids:", "", *idb_lines, "", timing, MARKERS[1]])
    print(block)
    write_results(args.out, block, MARKERS)
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
