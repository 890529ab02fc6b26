"""Does image QC flag fields at another magnification? The numbers of docs/TRUST.md, "Magnification".

    python -m benchmarks.magnification_check --data ../shared/data

QC ranges are fitted as training fits them (``allcore.trust.checks.qc_reference``) on every 8th Taleqani
field of each class (sorted by name), with and without the magnification bound
(``MAGNIFICATION_TOLERANCE``), and applied to: the Taleqani fields 4 positions later (the same
microscope: what the bound costs), BCCD and healthy ALL-IDB fields (other laboratories and
magnifications), and Benign Taleqani fields at half the magnification (four fields shrunk to half
their side and tiled into one 224 px field: a camera that sees twice the width of smear). No model
is involved: these are the review reasons a Taleqani field model's rows would get from QC.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image


from allcore.trust import checks
from allcore.imaging.qc import image_qc

CLASSES = ("Benign", "Early", "Pre", "Pro")


def half_magnification(paths: list[Path]) -> list[Image.Image]:
    """Fields of four consecutive images at half their side, tiled 2 x 2: cells half as wide."""
    fields = []
    for start in range(0, len(paths) - 3, 4):
        field = Image.new("RGB", (224, 224))
        for k, path in enumerate(paths[start:start + 4]):
            small = Image.open(path).convert("RGB").resize((112, 112), Image.Resampling.BOX)
            field.paste(small, ((k % 2) * 112, (k // 2) * 112))
        fields.append(field)
    return fields


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    args = parser.parse_args(argv)
    qc = lambda images: [image_qc(img) for img in images]  # noqa: E731
    opened = lambda paths: (Image.open(p).convert("RGB") for p in paths)  # noqa: E731
    taleqani = {c: sorted((args.data / "all-taleqani/Original" / c).glob("*.jpg")) for c in CLASSES}
    fit = qc(opened([p for c in CLASSES for p in taleqani[c][0::8]]))
    sets = {
        "Taleqani, same microscope (every 8th field, from the 5th)": qc(opened(
            [p for c in CLASSES for p in taleqani[c][4::8]])),
        "BCCD (another laboratory, higher magnification)": qc(opened(sorted((args.data / "bccd/JPEGImages").glob("*.jpg")))),
        "ALL-IDB healthy donors (another laboratory)": qc(opened(sorted((args.data / "all-idb/ALL_IDB1/im").glob("*_0.jpg")))),
        "Taleqani Benign at half magnification": qc(half_magnification(taleqani["Benign"][1::2])),
    }
    references = {"without the bound": checks.qc_reference(fit, magnification_tolerance=None),
                  f"with the bound ({checks.MAGNIFICATION_TOLERANCE}x)": checks.qc_reference(fit)}
    print(f"Taleqani QC fit: {len(fit)} fields; cell diameter / field side median "
          f"{references['without the bound']['qc_cell_diameter_fraction']['median']:.3f}")
    print("| fields | n | cell diameter / side, median (10th-90th) | " +
          " | ".join(f"'{checks.CELL_SIZE_DIFFERS}' {k} | any QC reason {k}" for k in references) + " |")
    print("|" + "---|" * (3 + 2 * len(references)))
    for name, rows in sets.items():
        fraction = np.array([r["qc_cell_diameter_fraction"] for r in rows])
        cells = [f"{name}", f"{len(rows)}", f"{np.nanmedian(fraction):.3f} ({np.nanpercentile(fraction, 10):.3f}-"
                 f"{np.nanpercentile(fraction, 90):.3f})"]
        for reference in references.values():
            reasons = [checks.qc_reasons(r, reference) for r in rows]
            cells += [f"{np.mean([checks.CELL_SIZE_DIFFERS in r for r in reasons]):.2f}",
                      f"{np.mean([bool(r) for r in reasons]):.2f}"]
        print("| " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
