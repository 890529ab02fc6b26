"""Draw the white cells found in one smear field, coloured by the cell call of a model.

    python jobs/render_cells.py --image field.jpg --out cells.png
    python jobs/render_cells.py --image field.jpg --cell-model runs/cell/model --out cells.png
    python jobs/render_cells.py --image field.jpg --model runs/s000/model --out cells.png

Each box is numbered in the finder's order (top to bottom, left to right). With --cell-model every
cell is classified as scoring classifies it (the crop its card's geometry cuts) and its box is red
for a blast call, green otherwise, with the blast probability beside it; with --model (a field
model) the crop around the box is classified and labelled with that model's class, unvalidated
(docs/CELLS.md). Cells are also listed on stdout. Lines and text scale with the image, and
--side draws on the field resized so its longer side has that many pixels (e.g. for documentation).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image

if not __package__:  # run as a file (python jobs/x.py, ray job submit): see jobs/__init__.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from allcore import errors  # noqa: E402
from allcore.models.artifact import verified_card  # noqa: E402
from allcore.imaging.cells import Cell, CellFinderConfig, estimate_cell_diameter, find_cells  # noqa: E402
from allcore.imaging.files import absolute_location, decode_rgb, read_bytes  # noqa: E402
from allcore.imaging.overlay import CellCall, render  # noqa: E402

def classify_cells(model_uri: str, img: Image.Image, cells: list[Cell], diameter: float,
                   *, cell_model: bool) -> list[CellCall]:
    """(label, probability shown, blast call) per cell, preprocessed exactly as scoring does
    (``allcore.scoring.prepare.cell_input``). A cell model shows its blast probability, a field
    model the confidence of its label."""
    from allcore.data.labels import get_label_set
    from allcore.scoring.predict import ScoringModel
    from allcore.scoring.prepare import cell_input, prepare_kwargs

    model = ScoringModel(model_uri)
    card = model.card
    kwargs = prepare_kwargs(card, cell_finder=CellFinderConfig(), cell_card=card if cell_model else None)
    crop_cfg = replace(card.data_config_obj(), mask_corner=False)
    pixels = np.stack([cell_input(img, cell, diameter, finder=kwargs["cell_finder"], crop_cfg=crop_cfg,
                                  cell_model=kwargs["cell_model"]) for cell in cells])
    probabilities = model(pixels)[0]  # calibrated with the card's temperature, as scoring writes them
    blasts = [card.classes.index(c) for c in get_label_set(card.label_set).blast_classes_of(card.classes)]
    calls = []
    for row in probabilities:
        best = int(row.argmax())
        shown = float(row[blasts].sum()) if cell_model else float(row[best])
        calls.append((card.classes[best], shown, best in blasts))
    return calls


@errors.job_main  # a tampered artifact, a path not found: one line and its status
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image", type=absolute_location, required=True, help="smear field (local path or s3:// uri)")
    models = parser.add_mutually_exclusive_group()
    models.add_argument("--cell-model", type=absolute_location, help="cell model artifact (recipe cell_blast): colour by its call")
    models.add_argument("--model", type=absolute_location, help="field model artifact: label each crop (unvalidated)")
    parser.add_argument("--cell-diameter", type=float, metavar="PX",
                        help="white-cell diameter in pixels (default: estimated from the field)")
    parser.add_argument("--side", type=int, help="draw on the field resized so its longer side is this")
    parser.add_argument("--colours", type=int, help="save with a palette of this many colours "
                        "(a PNG several times smaller)")
    parser.add_argument("--out", type=absolute_location, required=True, help="output PNG")
    args = parser.parse_args(argv)

    model = args.cell_model or args.model
    if model:
        verified_card(model)  # a tampered artifact fails before the field is searched
    img = decode_rgb(read_bytes(args.image))
    diameter = args.cell_diameter or estimate_cell_diameter(img)
    cells = [] if diameter is None else find_cells(img, CellFinderConfig(cell_diameter_px=diameter))
    calls = (classify_cells(model, img, cells, diameter, cell_model=args.cell_model is not None)
             if model and cells else None)
    canvas = render(img, [cell.box for cell in cells], calls, args.side)
    (canvas.quantize(args.colours) if args.colours else canvas).save(args.out, optimize=True)
    for number, cell in enumerate(cells, start=1):
        ratio = "n/a" if cell.nucleus_cell_ratio is None else f"{cell.nucleus_cell_ratio:.2f}"
        call = "" if calls is None else f"  {calls[number - 1][0]} {calls[number - 1][1]:.2f}"
        print(f"{number}: box {cell.box} area {cell.area} circularity {cell.circularity:.2f} "
              f"N:C {ratio}{call}")
    print(f"{len(cells)} cell(s) at {diameter or 0:.1f} px diameter -> {args.out}")
    return errors.OK


if __name__ == "__main__":
    sys.exit(main())
