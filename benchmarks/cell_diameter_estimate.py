"""How well ``allcore.imaging.cells.estimate_cell_diameter`` reads the white-cell size, per dataset.

    python -m benchmarks.cell_diameter_estimate [--data ../shared/data] [--workers 2]

BCCD: the estimate over the mean side of the field's WBC boxes (people's boxes, fields with one
or more). ALL_IDB1 and Taleqani (every 20th Original field) have no boxes: the estimate in
pixels, against the data README's ~100-140 px (ALL-IDB) and the ~28 px the finder's working
resolution assumes (Taleqani). Prints median and 10th-90th percentiles.
"""

from __future__ import annotations

import argparse
import os
import sys
from multiprocessing import Pool
from pathlib import Path

import numpy as np
from PIL import Image


from allcore.imaging.cells import estimate_cell_diameter
from benchmarks.cell_detection import DEFAULT_DATA, voc_boxes


def estimate(path: Path) -> float | None:
    return estimate_cell_diameter(Image.open(path))


def summary(values: list[float | None]) -> str:
    found = np.array([v for v in values if v is not None])
    return (f"{len(values)} fields, {len(values) - len(found)} without estimate, median {np.median(found):.2f}, "
            f"10th-90th percentile {np.percentile(found, 10):.2f}-{np.percentile(found, 90):.2f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder holding bccd/, all-idb/, all-taleqani/")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    bccd = [(p, boxes) for p in sorted((args.data / "bccd" / "JPEGImages").glob("*.jpg"))
            if (boxes := voc_boxes(args.data / "bccd" / "Annotations" / f"{p.stem}.xml"))]
    idb = sorted((args.data / "all-idb" / "ALL_IDB1" / "im").glob("*.jpg"))
    taleqani = sorted((args.data / "all-taleqani" / "Original").glob("*/*.jpg"))[::20]
    with Pool(args.workers) as pool:
        bccd_estimates = pool.map(estimate, [p for p, _ in bccd])
        print("BCCD estimate / mean WBC box side:",
              summary([None if e is None else e / np.mean([(b[2] - b[0] + b[3] - b[1]) / 2 for b in boxes])
                       for e, (_, boxes) in zip(bccd_estimates, bccd)]))
        print("ALL_IDB1 estimate (px):", summary(pool.map(estimate, idb)))
        print("Taleqani estimate (px):", summary(pool.map(estimate, taleqani)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
