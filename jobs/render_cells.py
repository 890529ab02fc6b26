"""Draw the white cells found in one smear field, optionally with a model's label per cell.

    python jobs/render_cells.py --image field.jpg --out cells.png
    python jobs/render_cells.py --image field.jpg --model runs/demo/model --out cells.png

Each box is numbered in the finder's order (top to bottom, left to right). With --model, every cell
crop is classified on its own and its label and confidence are written beside its box, so a person
can see which cells carry a field-level call. Cells are also listed on stdout.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout or working_dir

from allcore.cells import Cell, CellFinderConfig, cell_crop, find_cells  # noqa: E402
from allcore.io import absolute_location, decode_rgb, read_bytes  # noqa: E402

BOX_COLOUR, TEXT_COLOUR, TEXT_BACKGROUND = (0, 200, 80), (255, 255, 255), (0, 0, 0)


def classify_cells(model_uri: str, img: Image.Image, cells: list[Cell],
                   config: CellFinderConfig) -> list[tuple[str, float]]:
    """(label, softmax confidence) per cell, preprocessed exactly as the artifact's card says."""
    import torch

    from allcore.artifact import load_artifact
    from allcore.transforms import preprocess_array

    model, card = load_artifact(model_uri)
    data_config = card.data_config_obj()
    batch = np.stack([preprocess_array(cell_crop(img, cell, config.crop_pad_fraction), data_config)
                      for cell in cells])
    with torch.no_grad():
        probabilities = torch.softmax(model.eval()(torch.from_numpy(batch)), dim=1)
    confidence, index = probabilities.max(dim=1)
    return [(card.classes[i], float(c)) for i, c in zip(index.tolist(), confidence.tolist())]


def render(img: Image.Image, cells: list[Cell], labels: list[tuple[str, float]] | None = None) -> Image.Image:
    """A copy of ``img`` with numbered boxes and, when given, 'label confidence' per box."""
    canvas = img.convert("RGB")
    draw = ImageDraw.Draw(canvas)
    for number, cell in enumerate(cells, start=1):
        x0, y0, x1, y1 = cell.box
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), outline=BOX_COLOUR, width=2)
        text = str(number) if labels is None else f"{number} {labels[number - 1][0]} {labels[number - 1][1]:.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), text)
        tx = min(x0, canvas.width - (right - left))
        ty = y0 - (bottom - top) - 2 if y0 >= bottom - top + 2 else y1 + 1
        draw.rectangle((tx, ty, tx + right - left, ty + bottom - top), fill=TEXT_BACKGROUND)
        draw.text((tx - left, ty - top), text, fill=TEXT_COLOUR)
    return canvas


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image", type=absolute_location, required=True, help="smear field (local path or s3:// uri)")
    parser.add_argument("--model", type=absolute_location, help="model artifact folder: classify each cell crop")
    parser.add_argument("--out", type=absolute_location, required=True, help="output PNG")
    args = parser.parse_args(argv)

    config = CellFinderConfig()
    img = decode_rgb(read_bytes(args.image))
    cells = find_cells(img, config)
    labels = classify_cells(args.model, img, cells, config) if args.model and cells else None
    render(img, cells, labels).save(args.out)
    for number, cell in enumerate(cells, start=1):
        ratio = "n/a" if cell.nucleus_cell_ratio is None else f"{cell.nucleus_cell_ratio:.2f}"
        label = "" if labels is None else f"  {labels[number - 1][0]} {labels[number - 1][1]:.2f}"
        print(f"{number}: box {cell.box} area {cell.area} circularity {cell.circularity:.2f} "
              f"N:C {ratio}{label}")
    print(f"{len(cells)} cell(s) -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
