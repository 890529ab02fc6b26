"""Drawing on a smear field: numbered cell boxes coloured by the cell call, and saliency heat maps.

``jobs/render_cells.py`` (documentation pictures) and the review app draw through here, so a box
looks the same in a figure and on a reviewer's screen.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
from matplotlib import colormaps
from PIL import Image, ImageDraw, ImageFont

from allcore.imaging.cells import Box

BOX_COLOUR, BLAST_COLOUR, TEXT_COLOUR, TEXT_BACKGROUND = (0, 200, 80), (230, 30, 30), (255, 255, 255), (0, 0, 0)
LINE_FRACTION = 1 / 250  # box line width as a fraction of the image's shorter side (at least 1 px)
ABSTAIN_COLOUR = (240, 190, 0)  # a call of 'abstain': neither colour until a person decides
HEAT_OPACITY = 0.45  # share of the heat map's colour in a saliency overlay; the cells stay visible

# What a box is labelled with: (label, probability shown, blast call) per cell
CellCall = tuple[str, float, bool]


def render(img: Image.Image, boxes: Sequence[Box], calls: Sequence[CellCall] | None = None,
           side: int | None = None) -> Image.Image:
    """A copy of ``img`` (resized so its longer side is ``side``) with numbered boxes (red: blast
    call) and, when given, 'label value'. Boxes are in ``img``'s pixels, numbered from 1 in the
    order given."""
    scale = 1.0 if side is None else side / max(img.size)
    canvas = img.convert("RGB")
    if scale != 1.0:
        canvas = canvas.resize((round(img.width * scale), round(img.height * scale)),
                               Image.Resampling.LANCZOS)
    draw = ImageDraw.Draw(canvas)
    width = max(1, round(min(canvas.size) * LINE_FRACTION))
    font = ImageFont.load_default(size=max(10, 6 * width))
    for number, box in enumerate(boxes, start=1):
        x0, y0, x1, y1 = (round(v * scale) for v in box)
        blast = calls is not None and calls[number - 1][2]
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), outline=BLAST_COLOUR if blast else BOX_COLOUR,
                       width=width)
        text = str(number) if calls is None else f"{number} {calls[number - 1][0]} {calls[number - 1][1]:.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        tx = min(x0, canvas.width - (right - left))
        ty = y0 - (bottom - top) - 2 if y0 >= bottom - top + 2 else y1 + 1
        draw.rectangle((tx, ty, tx + right - left, ty + bottom - top), fill=TEXT_BACKGROUND)
        draw.text((tx - left, ty - top), text, fill=TEXT_COLOUR, font=font)
    return canvas


def heat_overlay(img: Image.Image, heat: np.ndarray, *, side: int | None = None) -> Image.Image:
    """``img`` (resized so its longer side is ``side``) under a jet-coloured ``heat`` map (values
    0..1, any shape: it is stretched over the whole image, as a Grad-CAM map covers the input)."""
    canvas = img.convert("RGB")
    if side is not None and max(canvas.size) != side:
        scale = side / max(canvas.size)
        canvas = canvas.resize((round(canvas.width * scale), round(canvas.height * scale)),
                               Image.Resampling.LANCZOS)
    heat = Image.fromarray(np.uint8(np.clip(heat, 0, 1) * 255)).resize(canvas.size, Image.Resampling.BILINEAR)
    coloured = colormaps["jet"](np.asarray(heat) / 255.0)[..., :3] * 255
    blended = (1 - HEAT_OPACITY) * np.asarray(canvas, np.float32) + HEAT_OPACITY * coloured
    return Image.fromarray(np.uint8(np.clip(blended, 0, 255)))


def png_bytes(img: Image.Image) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, "PNG", optimize=True)
    return buffer.getvalue()


def slide_overview(thumbnail: Image.Image, slide_size: tuple[int, int],
                   cells: Sequence[tuple[float, float, str | None]]) -> Image.Image:
    """The slide's thumbnail with a dot per cell at its centroid (level-0 pixels), coloured by
    ``call``: red blast, green not blast, yellow abstain (the review queue's colour)."""
    canvas = thumbnail.convert("RGB").copy()
    draw = ImageDraw.Draw(canvas)
    scale = canvas.width / slide_size[0]
    radius = max(2, round(min(canvas.size) / 200))
    colours = {"blast": BLAST_COLOUR, "abstain": ABSTAIN_COLOUR}
    for x, y, call in cells:
        cx, cy = x * scale, y * scale
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius),
                     fill=colours.get(call, BOX_COLOUR), outline=TEXT_BACKGROUND)
    return canvas
