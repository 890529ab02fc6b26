"""Cheap per-image quality control: is this picture the kind the model was trained on?

No model is involved, so it runs in the CPU prepare stage beside decoding. Each statistic is a
plain number with a one-line meaning in ``QC_COLUMNS`` (the one place that names and describes
them; scoring writes them as columns of the same names). Whether a value is acceptable is not
decided here: ``allcore.trust.checks`` compares it with the range seen on the model's training images,
because "sharp enough" or "the right stain" depends on the archive the model learnt from.

Focus, exposure and colour are measured on a copy resized so its shorter side is
``WORKING_SIDE`` pixels, so they do not depend on how many pixels a scanner writes. Cell size is
reported in pixels of the original image and as a fraction of its shorter side: the model sees
every image resized to its input size, so the fraction is what it sees. Cell count and size come
from a survey of the field's white-cell stain (``allcore.imaging.cells.survey_stain``), not from finding
each cell: QC runs on every scored field, and the finder cost three times all of the rest of a
field's preparation (docs/PERFORMANCE.md).
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image
from skimage import color, measure

from allcore.imaging.cells import cielab, rgb_array, survey_stain

WORKING_SIDE = 224  # shorter side (px) for focus/exposure/colour: the Taleqani field size
DARK_LEVEL = 10  # a pixel whose channels are all <= this (0-255) is clipped black
BRIGHT_LEVEL = 250  # a pixel whose channels are all >= this is clipped white
JPEG_BLOCK = 8  # JPEG's block size in pixels
BLOCKINESS_MAX_SIDE = 1024  # blockiness looks at most at this top-left square (cost)

QC_COLUMNS: dict[str, str] = {
    "qc_blur": "blur (skimage.measure.blur_effect of the grey image at 224 px shorter side): "
               "0 sharp .. 1 fully blurred",
    "qc_dark_fraction": f"fraction of pixels clipped black (every channel <= {DARK_LEVEL})",
    "qc_bright_fraction": f"fraction of pixels clipped white (every channel >= {BRIGHT_LEVEL})",
    "qc_lightness_mean": "mean CIELAB L* (0 black .. 100 white): overall exposure",
    "qc_lightness_std": "standard deviation of L*: contrast between stained cells and background",
    "qc_a_mean": "mean CIELAB a* (green - .. + red/magenta): stain hue",
    "qc_b_mean": "mean CIELAB b* (blue - .. + yellow): stain hue",
    "qc_blockiness": "mean grey step across 8 px JPEG block borders over the mean step elsewhere "
                     "(original pixels): about 1, well above 1 for heavy JPEG compression",
    "qc_cell_count": "stained blobs that are not platelets or debris (allcore.imaging.cells.survey_stain): "
                     "white cells, touching ones counted once",
    "qc_cell_diameter_px": "apparent diameter of a typical white cell in original-image pixels: "
                           "median convex-hull diameter of the single, roundish stained blobs "
                           "(allcore.imaging.cells.survey_stain; NaN without white-cell stain)",
    "qc_cell_diameter_fraction": "qc_cell_diameter_px / shorter image side: the cell size the "
                                 "model sees after resizing (NaN without cells)",
}


def _resized(rgb: np.ndarray, shorter_side: int) -> np.ndarray:
    """Area-averaged resize (box filter: no ringing that would look like sharpness)."""
    height, width = rgb.shape[:2]
    scale = shorter_side / min(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return np.asarray(Image.fromarray(rgb).resize(size, Image.Resampling.BOX))


def jpeg_blockiness(rgb: np.ndarray) -> float:
    """JPEG codes 8 x 8 pixel blocks separately; heavy compression leaves steps at their borders.
    Measured on the original pixel grid (resizing would blur the grid away), on the top-left
    ``BLOCKINESS_MAX_SIDE`` square at most (cost); +0.5 grey levels keep flat images at 1."""
    red, green, blue = (channel.astype(np.float32) for channel in
                        np.moveaxis(rgb[:BLOCKINESS_MAX_SIDE, :BLOCKINESS_MAX_SIDE], -1, 0))
    grey = (red + green + blue) / 3  # mean(axis=2) to the bit, 5x faster channel by channel
    steps_x, steps_y = np.abs(np.diff(grey, axis=1)), np.abs(np.diff(grey, axis=0))
    border_x = (np.arange(steps_x.shape[1]) + 1) % JPEG_BLOCK == 0
    border_y = (np.arange(steps_y.shape[0]) + 1) % JPEG_BLOCK == 0
    border = np.concatenate([steps_x[:, border_x].ravel(), steps_y[border_y].ravel()])
    inside = np.concatenate([steps_x[:, ~border_x].ravel(), steps_y[~border_y].ravel()])
    if not border.size or not inside.size:
        return 1.0
    return float((border.mean() + 0.5) / (inside.mean() + 0.5))


def cell_statistics(rgb: np.ndarray, lab: tuple | None = None) -> dict[str, float]:
    """Count and typical size of the white cells from the stain survey, which works on a copy
    of at most ``allcore.imaging.cells.ESTIMATE_SIDE`` px (a 2592 px field still pays for that resize);
    ``lab``: ``cielab(rgb)`` where the caller has it."""
    survey = survey_stain(rgb, lab=lab)
    diameter = math.nan if survey.diameter is None else survey.diameter
    return {"qc_cell_count": float(survey.blobs), "qc_cell_diameter_px": diameter,
            "qc_cell_diameter_fraction": diameter / min(rgb.shape[:2])}


def image_qc(img: Image.Image | np.ndarray) -> dict[str, float]:
    """The ``QC_COLUMNS`` statistics of one decoded RGB image (PIL or uint8 HxWx3 array)."""
    rgb = rgb_array(img)
    small = _resized(rgb, WORKING_SIDE)
    lab = lightness, a, b = cielab(small)
    red, green, blue = np.moveaxis(small, -1, 0)  # channel by channel: max(axis=2) is 30x slower
    values = {
        # float32 filters: 0.73x the time of float64, the same value to 3e-8 (64 Taleqani fields)
        "qc_blur": float(measure.blur_effect(color.rgb2gray(small).astype(np.float32))),
        "qc_dark_fraction": float(np.mean(np.maximum(np.maximum(red, green), blue) <= DARK_LEVEL)),
        "qc_bright_fraction": float(np.mean(np.minimum(np.minimum(red, green), blue) >= BRIGHT_LEVEL)),
        "qc_lightness_mean": float(lightness.mean()),
        "qc_lightness_std": float(lightness.std()),
        "qc_a_mean": float(a.mean()),
        "qc_b_mean": float(b.mean()),
        "qc_blockiness": jpeg_blockiness(rgb),
        # a field already WORKING_SIDE px is its own copy (same pixels): the survey reuses its L*a*b*
        **cell_statistics(rgb, lab if small.shape == rgb.shape else None),
    }
    assert list(values) == list(QC_COLUMNS), "QC_COLUMNS and image_qc disagree"
    return values
