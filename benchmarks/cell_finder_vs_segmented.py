"""Measure the white-cell finder (allcore/imaging/cells.py) against the Taleqani dataset's own segmentation.

    python -m benchmarks.cell_finder_vs_segmented [--data /work/shared/data/all-taleqani] [--out docs/CELLS.md]
    python -m benchmarks.cell_finder_vs_segmented --tune      # grid search on the tuning half first
    python -m benchmarks.cell_finder_vs_segmented --cell-diameter 28   # one diameter for every field

Images of each class are sorted by name; even positions are the tuning half (defaults of
CellFinderConfig were chosen there with --tune), odd positions the report half. Neighbours are often
near-duplicates, so the halves are not independent; the split still keeps the reported numbers off
the images the thresholds were chosen on. The results table replaces the block between the
``<!-- results:start -->`` and ``<!-- results:end -->`` markers of --out.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
from dataclasses import asdict, dataclass, replace
from multiprocessing import Pool
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage as ndi
from skimage import morphology


from allcore.imaging.cells import CellFinderConfig, find_cells

CLASSES = ("Benign", "Early", "Pre", "Pro")
REFERENCE_MIN_CHANNEL = 20  # Segmented background is JPEG-noisy black: max(R, G, B) <= 20
NEAR_EMPTY_FRACTION = 0.01  # cleaned reference foreground below 1% of the field: the mask failed
MARKERS = ("<!-- results:start -->", "<!-- results:end -->")
DEFAULT_DATA = Path(os.environ.get("ALLCORE_SHARED_DATA")
                    or Path(__file__).resolve().parents[2] / "shared" / "data") / "all-taleqani"


def reference_mask(segmented: np.ndarray, config: CellFinderConfig) -> np.ndarray:
    """The dataset's kept (non-black) pixels, cleaned like ours: 3 x 3 opening against JPEG
    speckle, holes filled (their masks drop dark nuclei in places), blobs below the finder's
    minimum cell area dropped (at the working resolution: Taleqani fields are about that scale
    as they are)."""
    mask = ndi.binary_opening(segmented.max(axis=2) > REFERENCE_MIN_CHANNEL, np.ones((3, 3), bool))
    min_area = int(config.min_area * config.working_diameter_px ** 2)
    return morphology.remove_small_objects(ndi.binary_fill_holes(mask), max_size=min_area)


@dataclass(frozen=True)
class ImageResult:
    cls: str
    excluded: bool  # near-empty reference mask
    iou: float
    count: int
    reference_count: int
    cpu_ms: float


def evaluate_one(args: tuple[str, Path, Path, CellFinderConfig]) -> ImageResult:
    cls, original, segmented, config = args
    rgb = np.asarray(Image.open(original).convert("RGB"))
    reference = reference_mask(np.asarray(Image.open(segmented).convert("RGB")), config)
    start = time.process_time()
    cells = find_cells(rgb, config)
    cpu_ms = (time.process_time() - start) * 1000
    ours = np.zeros(rgb.shape[:2], dtype=bool)
    for cell in cells:
        x0, y0, x1, y1 = cell.box
        ours[y0:y1, x0:x1] |= cell.mask
    union = (ours | reference).sum()
    return ImageResult(cls, reference.mean() < NEAR_EMPTY_FRACTION,
                       float((ours & reference).sum() / union) if union else 1.0,
                       len(cells), ndi.label(reference)[1], cpu_ms)


def list_pairs(data: Path, half: int) -> list[tuple[str, Path, Path]]:
    """(class, original, segmented) for every ``half``-th (0 tuning, 1 report) image per class."""
    pairs = []
    for cls in CLASSES:
        originals = sorted((data / "Original" / cls).glob("*.jpg"))
        if not originals:
            raise SystemExit(f"no images under {data / 'Original' / cls}; pass --data <all-taleqani folder>")
        pairs += [(cls, path, data / "Segmented" / cls / path.name) for path in originals[half::2]
                  if (data / "Segmented" / cls / path.name).is_file()]
    return pairs


def run(pairs: list[tuple[str, Path, Path]], config: CellFinderConfig, pool: Pool) -> list[ImageResult]:
    return pool.map(evaluate_one, [(*pair, config) for pair in pairs], chunksize=16)


def summarise(results: list[ImageResult]) -> dict[str, dict[str, float]]:
    rows = {}
    for cls in (*CLASSES, "all"):
        mine = [r for r in results if cls in ("all", r.cls)]
        kept = [r for r in mine if not r.excluded]
        iou = np.array([r.iou for r in kept])
        diff = np.array([r.count - r.reference_count for r in kept])
        rows[cls] = {"images": len(mine), "excluded": len(mine) - len(kept),
                     "median_iou": float(np.median(iou)), "iou_q25": float(np.percentile(iou, 25)),
                     "iou_q75": float(np.percentile(iou, 75)), "mean_count_diff": float(diff.mean()),
                     "count_match": float((diff == 0).mean()), "count_within_1": float((abs(diff) <= 1).mean()),
                     "median_cpu_ms": float(np.median([r.cpu_ms for r in mine]))}
    return rows


def score(rows: dict[str, dict[str, float]]) -> float:
    """Tuning objective: mean over classes of median IoU plus half the exact-count agreement, so
    neither one class nor the foreground alone decides. Classes whose reference masks mostly
    failed (Pro) are left out: what is left of them are failed masks too, noise to tune on."""
    usable = [c for c in CLASSES if rows[c]["excluded"] < rows[c]["images"] / 2]
    return float(np.mean([rows[c]["median_iou"] + 0.5 * rows[c]["count_match"] for c in usable]))


def tune(pairs: list[tuple[str, Path, Path]], pool: Pool) -> CellFinderConfig:
    # Thresholds centred on the best of a first, coarser grid (purple 6-10, seed 12-18, solidity
    # 0.75-0.9) run on the same images; the marker settings are chosen on BCCD and ALL-IDB
    # (benchmarks/cell_detection.py), so only the one that matters for Taleqani clusters is here.
    grid = {"purple_threshold": (8.0, 10.0, 12.0), "seed_threshold": (18.0, 24.0),
            "min_solidity": (0.6, 0.75), "marker_radius": (0.2, 0.25)}
    best, best_score = CellFinderConfig(), -1.0
    for values in itertools.product(*grid.values()):
        config = replace(CellFinderConfig(), **dict(zip(grid, values)))
        value = score(summarise(run(pairs, config, pool)))
        print(f"  {dict(zip(grid, values))}: {value:.4f}", flush=True)
        if value > best_score:
            best, best_score = config, value
    print(f"best on the tuning half ({best_score:.4f}): {asdict(best)}")
    return best


def table(rows: dict[str, dict[str, float]], config: CellFinderConfig) -> str:
    lines = ["| class | images | excluded (near-empty reference) | median IoU | IoU IQR | mean count diff "
             "(ours - ref) | counts equal | counts within 1 | median CPU ms |",
             "|---|---|---|---|---|---|---|---|---|"]
    for cls, r in rows.items():
        lines.append(f"| {cls} | {r['images']} | {r['excluded']} | {r['median_iou']:.3f} | "
                     f"{r['iou_q25']:.3f}-{r['iou_q75']:.3f} | {r['mean_count_diff']:+.2f} | "
                     f"{r['count_match']:.1%} | {r['count_within_1']:.1%} | {r['median_cpu_ms']:.1f} |")
    settings = ", ".join(f"{k}={v:g}" for k, v in asdict(config).items() if v is not None)
    return "\n".join([MARKERS[0], f"Report half (odd positions), config: `{settings}`.", "", *lines,
                      MARKERS[1]])


def write_results(out: Path, block: str, markers: tuple[str, str] = MARKERS) -> None:
    """Replace the text between ``markers`` in ``out`` (created when missing) with ``block``."""
    text = out.read_text() if out.is_file() else f"{markers[0]}\n{markers[1]}\n"
    start, end = text.find(markers[0]), text.find(markers[1])
    if start < 0 or end < start:
        raise SystemExit(f"{out} lacks the {markers[0]} ... {markers[1]} block to replace")
    out.write_text(text[:start] + block + text[end + len(markers[1]):])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the all-taleqani folder")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "docs" / "CELLS.md")
    parser.add_argument("--tune", action="store_true", help="grid-search the config on the tuning half first")
    parser.add_argument("--tune-stride", type=int, default=6,
                        help="tune on every n-th image of the tuning half (the grid has 24 points)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--cell-diameter", type=float, default=None,
                        help="white-cell diameter in px for every field (default: estimated per field)")
    args = parser.parse_args(argv)
    with Pool(args.workers) as pool:
        tuning = list_pairs(args.data, 0)[::args.tune_stride]
        config = replace(tune(tuning, pool) if args.tune else CellFinderConfig(), cell_diameter_px=args.cell_diameter)
        block = table(summarise(run(list_pairs(args.data, 1), config, pool)), config)
    print(block)
    write_results(args.out, block)
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
