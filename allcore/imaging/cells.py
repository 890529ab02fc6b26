"""Classical white-cell finder for Wright-Giemsa smear fields: boxes, masks and crops per cell.

A field holds several white cells (leukocytes, blasts) among red cells, and the label belongs to
the field. Finding the white cells lets a classifier look at one cell at a time and lets a person
see which cell drove a prediction. The stain gives a cheap, explainable cue: nuclei and blast
cytoplasm are purple (red *and* blue in CIELAB: a* > 0 and b* < 0), while red cells are pink
(b* > 0) or, in many Taleqani fields, grey-blue (a* near 0), and the background is near white.
So one threshold on ``purple = min(a*, -b*)`` separates them, then morphology and a watershed on
the distance transform split touching cells.

Archives differ in magnification (a white cell is ~22-28 px across in a 224 px Taleqani field,
~130 px in a 2592 px ALL-IDB field, ~180 px in a 640 px BCCD field), so every length the finder
uses is in white-cell diameters: a field whose white cells are wider than ``working_diameter_px``
is shrunk so they are that wide, a field with smaller cells is searched as it is (enlarging adds
pixels, not detail), and the boxes are mapped back to the field's own pixels. The diameter is
given per run (``cell_diameter_px``) or estimated per field from its stained blobs
(``estimate_cell_diameter``). No learning.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, fields
from typing import NamedTuple

import numpy as np
from PIL import Image
from scipy import ndimage as ndi
from skimage import feature, filters, measure, morphology, segmentation

from allcore.imaging.data_config import median_colour

Box = tuple[int, int, int, int]  # x0, y0, x1, y1 in pixels, x1/y1 exclusive

ESTIMATE_SIDE = 512
# Longer side (px) of the copy the diameter is estimated on: bounds the estimate's cost on large
# fields; a white cell is still >= 20 px across there in every archive we know.
ESTIMATE_MIN_AREA = 50
# Stained blobs smaller than this (px, on the estimate copy) are noise, whatever the scale.
ESTIMATE_MIN_HULL_FRACTION = 0.06
# Blobs whose convex hull is below this fraction of the field's largest are platelets or debris
# (a platelet is 2-3 um, a white cell 10-18 um: ~1/20 of the area), not cells to size.
ESTIMATE_MIN_SOLIDITY = 0.9
ESTIMATE_MIN_AXIS_RATIO = 0.65
# A stained blob measures one cell when it is convex and roundish: two touching cells make a blob
# about twice as long as wide, a cluster a less convex one. A field with no such blob (a lobed
# neutrophil alone, a touching pair) falls back to the width of every blob that is not a platelet.


@dataclass(frozen=True)
class CellFinderConfig:
    """Every setting of the finder. Lengths are in white-cell diameters and areas in squared
    diameters, so one config fits every magnification; the pixel values in the comments are at the
    working resolution at its widest (a white cell 28 px across, about a 224 px Taleqani field). The
    thresholds were tuned on every second Taleqani image (see docs/CELLS.md), the scale settings
    converted from those tuned at that resolution."""

    cell_diameter_px: float | None = None
    # Apparent diameter of a typical white cell in the input image, in its pixels (the same for a
    # whole archive taken on one microscope). None: estimated per field (estimate_cell_diameter).
    working_diameter_px: float = 28.0
    # Fields whose white cells are wider are shrunk so a cell is this many pixels across before
    # searching: 28 px keeps a 2592 px ALL-IDB field near 560 px, so time per field is bounded.
    # Fields with smaller cells (Taleqani's 21-29 px) are searched as they are: enlarging them to
    # 28 px cost 1.6x the CPU and agreed less with the dataset's masks (docs/CELLS.md).
    purple_threshold: float = 8.0
    # min(a*, -b*) above the field's median (its background and red cells) at which a pixel is
    # white-cell stain: pale cytoplasm sits ~10-14 above it, faint Pro-B blasts ~10-18, dense nuclei
    # 30-60. Relative to the median so a tinted or vignetted field does not light up as a whole.
    # 12 agrees better with the dataset's masks, but they drop pale cytoplasm and so does 12,
    # which breaks the nucleus:cell ratio (docs/CELLS.md).
    seed_threshold: float = 24.0
    # Hysteresis: a region is kept only if some pixel reaches this, so faint purple haze at field
    # edges and tinted red cells, which pass purple_threshold, are not cells unless stain-dense.
    min_solidity: float = 0.6
    # Area / convex-hull area: white cells are convex blobs; lower is a chain of red-cell rims.
    smoothing_sigma: float = 0.04
    # Gaussian blur (1.1 px) before thresholding: removes JPEG blocking and chromatin texture that
    # would punch holes in a nucleus.
    opening_radius: float = 0.08
    # Disk opening (2 px): cuts thin purple bridges and the rims of red cells touching a blast.
    min_area: float = 0.2
    # Smaller purple blobs (< 157 px) are platelets, stain debris or cell fragments at the edge.
    max_area: float = 12.0
    # Larger single regions (> 9,400 px) are smear edges or stain precipitate, not one cell.
    max_hole_area: float = 0.15
    # Holes in the stain up to this area are filled (pale nucleoli, a pale cytoplasm patch);
    # larger ones are red cells enclosed by a ring of touching white cells, which must stay holes
    # or the ring fills into one solid blob that no watershed can split.
    split_distance: float = 0.4
    # Watershed markers are peaks of the dense stain's distance transform at least this far apart
    # (11 px at 28 px cells): the centres of two touching cells are ~1 diameter apart.
    marker_radius: float = 0.25
    # ... and at least this deep inside the dense stain (7 px): a blast's nucleus is ~0.4 cell
    # diameters in radius, each lobe of a neutrophil's nucleus ~0.1, so lobes do not split a cell.
    # 0.2, 0.25 and 0.3 tried on the tuning parts (docs/CELLS.md): 0.25 best on BCCD and ALL-IDB.
    nucleus_contrast: float = 10.0
    # L* gap (lightness, 0-100) between the darker and lighter halves of a cell needed to call them
    # nucleus and cytoplasm; below it the cell is uniformly stained and no ratio is reported.
    crop_pad_fraction: float = 0.15
    # Context kept around a cell in a crop, per side, as a fraction of the box's longer side.

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None and f.name == "cell_diameter_px":
                continue
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not np.isfinite(value):
                raise ValueError(f"CellFinderConfig.{f.name} must be a finite number, got {value!r}")
        for name in ("smoothing_sigma", "opening_radius", "min_area", "max_hole_area", "split_distance",
                     "marker_radius", "nucleus_contrast", "crop_pad_fraction"):
            if getattr(self, name) < 0:
                raise ValueError(f"CellFinderConfig.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("cell_diameter_px", "working_diameter_px"):
            if getattr(self, name) is not None and getattr(self, name) < 4:
                raise ValueError(f"CellFinderConfig.{name} must be at least 4 pixels, got "
                                 f"{getattr(self, name)}; a white cell smaller than that cannot be "
                                 f"told from a platelet, rescan the slide at higher magnification")
        if self.seed_threshold < self.purple_threshold:
            raise ValueError(f"CellFinderConfig.seed_threshold ({self.seed_threshold}) must be >= "
                             f"purple_threshold ({self.purple_threshold}); equal disables hysteresis")
        if not 0 <= self.min_solidity <= 1:
            raise ValueError(f"CellFinderConfig.min_solidity must be in [0, 1], got {self.min_solidity}")
        if self.min_area >= self.max_area:
            raise ValueError(f"CellFinderConfig.min_area ({self.min_area}) must be below max_area "
                             f"({self.max_area})")


@dataclass
class Cell:
    """One white cell, in the input image's pixels. ``mask`` covers exactly ``box`` (shape
    y1 - y0, x1 - x0)."""

    box: Box
    centroid: tuple[float, float]  # x, y in image pixels
    area: int  # pixels
    circularity: float  # 4 pi area / perimeter^2: 1 for a disk, lower for lobed or torn shapes
    nucleus_area: int | None  # None where the cell shows no separate cytoplasm
    nucleus_cell_ratio: float | None  # nucleus_area / area, the N:C cue that grades blasts
    mask: np.ndarray


# sRGB -> CIELAB (D65) with a lookup table for the gamma step: skimage.color.rgb2lab takes ~17 ms
# per 224 x 224 field, this ~1.5 ms, and they agree to 1e-4. Image QC uses it too.
_SRGB_TO_LINEAR = np.array([c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4
                            for c in np.arange(256) / 255], dtype=np.float32)
_RGB_TO_XYZ_OVER_WHITE = (np.array([[0.412453, 0.357580, 0.180423],
                                    [0.212671, 0.715160, 0.072169],
                                    [0.019334, 0.119193, 0.950227]], dtype=np.float32)
                          / np.array([[0.95047], [1.0], [1.08883]], dtype=np.float32))


def cielab(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """L*, a*, b* (float32, each H x W) of a uint8 (H, W, 3) sRGB array. X, Y and Z are made
    contiguous planes before the cube root (on strided channels the conversion took 1.3x as long)."""
    # np.take: the same lookup as _SRGB_TO_LINEAR[rgb], in half the time
    xyz = np.moveaxis(np.take(_SRGB_TO_LINEAR, rgb) @ _RGB_TO_XYZ_OVER_WHITE.T, -1, 0).copy()
    f = np.cbrt(xyz)
    dark = xyz <= 0.008856  # the linear segment near black
    f[dark] = 7.787 * xyz[dark] + 16 / 116
    fx, fy, fz = f
    return 116 * fy - 16, 500 * (fx - fy), 200 * (fy - fz)


def rgb_array(img: Image.Image | np.ndarray) -> np.ndarray:
    """A uint8 (H, W, 3) array of a PIL image (converted to RGB) or an array already in that form;
    anything else is refused with what to do."""
    if isinstance(img, Image.Image):
        return np.asarray(img.convert("RGB"))
    rgb = np.asarray(img)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected an RGB image as a PIL image or a uint8 array of shape (H, W, 3), "
                         f"got dtype {rgb.dtype} shape {rgb.shape}; convert it with "
                         f"PIL.Image.open(path).convert('RGB')")
    return rgb


def _resampled(rgb: np.ndarray, scale: float) -> np.ndarray:
    """``rgb`` resized by ``scale``. PIL's bilinear filter widens its support when shrinking, so a
    large field is averaged, not aliased; ``reducing_gap`` lets it box-reduce by an integer
    factor first, ~3x faster on a 2592 px field for the same result to the eye."""
    if scale == 1:
        return rgb
    height, width = rgb.shape[:2]
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return np.asarray(Image.fromarray(rgb).resize(size, Image.Resampling.BILINEAR, reducing_gap=3.0))


def _stain(rgb: np.ndarray, sigma: float, lab: tuple | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The purple score relative to the field's median (blurred by ``sigma`` px) and L*;
    ``lab``: ``cielab(rgb)`` where the caller has it already."""
    lightness, a, b = cielab(rgb) if lab is None else lab
    purple = ndi.gaussian_filter(np.minimum(a, -b), sigma)
    return purple - np.median(purple), lightness


def _stain_mask(purple: np.ndarray, config: CellFinderConfig) -> np.ndarray:
    """White-cell stain: hysteresis on the purple score."""
    return filters.apply_hysteresis_threshold(purple, config.purple_threshold, config.seed_threshold)


class StainSurvey(NamedTuple):
    """A field's white-cell stain at a glance, without finding the cells one by one: what image
    QC reports, and the ruler the finder resizes by."""

    blobs: int  # stained blobs that are not platelets or debris; touching cells count once
    diameter: float | None  # apparent diameter (px of the field) of a typical white cell


def survey_stain(img: Image.Image | np.ndarray, config: CellFinderConfig = CellFinderConfig(),
                 lab: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None) -> StainSurvey:
    """Count the stained blobs of a field and estimate the diameter of a typical white cell.

    The field is shrunk to ESTIMATE_SIDE and its stain mask taken as the finder does; blobs far
    smaller than the largest (platelets) are dropped, and the median convex-hull diameter of the
    convex, roundish blobs (single cells) is the estimate (None when no blob is left). Red cells
    would be an alternative ruler (7.5 um in every smear), but they touch and overlap in dense
    fields and their pale centres break a threshold (tried on BCCD: far off); the stained cells
    are what the finder must size anyway. A field whose compact clusters outnumber its single
    cells reads too large: a run on one microscope should pass the median over several fields as
    ``cell_diameter_px``, steadier than any one field (docs/CELLS.md gives both).

    ``lab`` is ``cielab(img)`` where the caller has it (image QC converts a 224 px field for its
    colour statistics anyway); used only when the field is surveyed as it is, not shrunk.
    """
    rgb = rgb_array(img)
    scale = min(1.0, ESTIMATE_SIDE / max(rgb.shape[:2]))
    mask = _stain_mask(_stain(_resampled(rgb, scale), 1.0, lab if scale == 1 else None)[0], config)
    labels = ndi.label(ndi.binary_opening(_holes_filled(mask)))[0]
    roundish = _axis_ratios(labels) >= ESTIMATE_MIN_AXIS_RATIO
    blobs = [r for r in measure.regionprops(labels) if r.area >= ESTIMATE_MIN_AREA]
    if not blobs:
        return StainSurvey(0, None)
    # A convex hull lies inside its box and holds the blob, so a blob whose box is below the hull
    # fraction of the largest blob's area is below it of the largest hull too: dropped without
    # computing its hull (the hulls were a quarter of this function's time).
    least_hull = ESTIMATE_MIN_HULL_FRACTION * max(r.area for r in blobs)
    blobs = [r for r in blobs if r.image.size >= least_hull]
    # For the same reason the largest hull is found in order of box size, stopping at a box no
    # larger than the largest hull so far; a blob whose own area reaches the fraction of it is
    # kept without its hull; and only roundish blobs need theirs for solidity. The hulls of the
    # elongated blobs (two in five on Taleqani fields) are then taken only if no single cell is
    # left to measure.
    largest = 0
    for blob in sorted(blobs, key=lambda r: r.image.size, reverse=True):
        if blob.image.size <= largest:
            break
        largest = max(largest, blob.area_convex)
    least_hull = ESTIMATE_MIN_HULL_FRACTION * largest
    blobs = [r for r in blobs if r.area >= least_hull or r.area_convex >= least_hull]
    single = [r for r in blobs if roundish[r.label] and r.solidity >= ESTIMATE_MIN_SOLIDITY]
    # The convex hull, not the stained area: a lobed nucleus or a pale rim still spans its cell.
    # Without a single cell, an elongated blob is touching cells side by side: its hull's width
    # (minor axis) is about one cell across.
    diameter = float(np.median([np.sqrt(4 * r.area_convex / np.pi) if roundish[r.label] else
                                measure.regionprops(r.image_convex.astype(np.uint8))[0].axis_minor_length
                                for r in single or blobs]) / scale)
    return StainSurvey(len(blobs), diameter)


def _holes_filled(mask: np.ndarray) -> np.ndarray:
    """``ndi.binary_fill_holes(mask)`` from one labelling of the background: the holes are its
    4-connected parts that touch no border, which scipy finds by dilating from the border until
    nothing changes (3.5x slower on a 224 px field; the same result on 300 random masks)."""
    background, count = ndi.label(~mask)
    is_hole = np.ones(count + 1, dtype=bool)
    is_hole[np.concatenate([background[0], background[-1], background[:, 0], background[:, -1]])] = False
    return mask | is_hole[background]


def estimate_cell_diameter(img: Image.Image | np.ndarray,
                           config: CellFinderConfig = CellFinderConfig()) -> float | None:
    """Apparent diameter (px of ``img``) of a typical white cell, or None when the field shows no
    convex stained blob to measure (``survey_stain``)."""
    return survey_stain(img, config).diameter


def _axis_ratios(labels: np.ndarray) -> np.ndarray:
    """Minor over major axis length of every label of ``labels`` (index 0, the background: NaN):
    the ratio of ``regionprops``' ``axis_minor_length`` and ``axis_major_length``, from the
    eigenvalues of each region's pixel-coordinate covariance, summed for all regions at once
    (one ``regionprops`` moments computation per blob was a fifth of the survey's time) over
    the labelled pixels only (the background is most of a field: 5x faster, the same sums)."""
    where = np.flatnonzero(labels)
    own = labels.ravel()[where]
    count = np.maximum(np.bincount(own, minlength=labels.max() + 1), 1)
    rows, cols = (axis.astype(np.float64) for axis in np.divmod(where, labels.shape[1]))

    def mean(values: np.ndarray) -> np.ndarray:
        return np.bincount(own, values, len(count)) / count

    row, col = mean(rows), mean(cols)
    var_row, var_col = mean(rows * rows) - row ** 2, mean(cols * cols) - col ** 2
    cov = mean(rows * cols) - row * col
    centre, spread = (var_row + var_col) / 2, np.hypot((var_row - var_col) / 2, cov)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.sqrt(np.clip(centre - spread, 0, None) / (centre + spread))


def median_cell_diameter(images: Iterable[Image.Image | np.ndarray],
                         config: CellFinderConfig = CellFinderConfig()) -> float | None:
    """One ``cell_diameter_px`` for a set of fields from one microscope: the median of their
    per-field estimates (fields without white-cell stain skipped), steadier than any one field's.
    None when no field has any stain to measure."""
    estimates = [d for d in (estimate_cell_diameter(img, config) for img in images) if d is not None]
    return float(np.median(estimates)) if estimates else None


def _cell_regions(rgb: np.ndarray, config: CellFinderConfig, cell: float
                  ) -> tuple[list, np.ndarray, np.ndarray]:
    """Region properties of the white cells, the label image they were measured on and the L*
    channel of ``rgb``, which is already at the working resolution, where a white cell is
    ``cell`` pixels across."""
    purple, lightness = _stain(rgb, config.smoothing_sigma * cell)
    mask = _stain_mask(purple, config)
    radius = round(config.opening_radius * cell)
    if radius:
        mask = ndi.binary_opening(mask, morphology.disk(radius))
    min_area = config.min_area * cell ** 2
    mask = morphology.remove_small_holes(mask, max_size=int(config.max_hole_area * cell ** 2))
    mask = morphology.remove_small_objects(mask, max_size=int(min_area))
    # Touching cells merge in the stain mask (pale cytoplasm, blur), but their dense parts (nuclei,
    # blast cytoplasm) stay apart: one marker per thick peak of the dense stain, and one at the
    # innermost point of a region without any (a lobed or pale cell is still one cell).
    distance = ndi.distance_transform_edt(mask & (purple >= config.seed_threshold))
    components, count = ndi.label(mask)
    peaks = feature.peak_local_max(distance, min_distance=max(1, round(config.split_distance * cell)),
                                   threshold_abs=config.marker_radius * cell, labels=components,
                                   exclude_border=False)
    unmarked = np.setdiff1d(np.arange(1, count + 1), components[tuple(peaks.T)])
    peaks = np.concatenate([peaks, _innermost_points(mask, components, unmarked)])
    markers = np.zeros(mask.shape, dtype=np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    labels = segmentation.watershed(-distance, markers, mask=mask)
    areas = np.bincount(labels.ravel())
    keep = (areas >= min_area) & (areas <= config.max_area * cell ** 2)
    keep[0] = False
    labels = np.where(keep[labels], labels, 0)
    # Solidity is area over hull area, and the hull lies inside the box: a region filling enough
    # of its box is solid enough without computing its hull (most cells; the hulls were 18 % of
    # the finder's time).
    return [r for r in measure.regionprops(labels) if r.area >= config.min_solidity * r.image.size
            or r.solidity >= config.min_solidity], labels, lightness


# skimage.measure.perimeter's weights by neighbourhood code (1 for the pixel, 2 per border
# pixel beside it, 10 per border pixel diagonal to it): a border run straight, diagonal or turning
_PERIMETER_WEIGHTS = np.zeros(50)
_PERIMETER_WEIGHTS[[5, 7, 15, 17, 25, 27]] = 1
_PERIMETER_WEIGHTS[[21, 33]] = np.sqrt(2)
_PERIMETER_WEIGHTS[[13, 23]] = (1 + np.sqrt(2)) / 2


def _perimeters(labels: np.ndarray) -> np.ndarray:
    """``skimage.measure.perimeter(region.image, 4)`` of every label of ``labels`` (index 0:
    the background) from one pass over the field: a pixel is on its region's border when a
    4-neighbour is not its region (or is beyond the field), and each border pixel's code counts
    the border pixels of its own region around it, as skimage's erosion and convolution do on
    each region's box. One call per cell was a tenth of the finder's time."""
    padded = np.pad(labels, 1)
    height, width = labels.shape

    def shifted(image: np.ndarray, dy: int, dx: int) -> np.ndarray:
        return image[1 + dy:1 + dy + height, 1 + dx:1 + dx + width]

    border = (labels > 0) & np.logical_or.reduce(
        [shifted(padded, dy, dx) != labels for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1))])
    border_labels = np.pad(np.where(border, labels, 0), 1)
    code = border.astype(np.int64)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            if dy or dx:
                code += (2 if 0 in (dy, dx) else 10) * (shifted(border_labels, dy, dx) == labels)
    histograms = np.bincount(labels[border] * 50 + code[border],
                             minlength=50 * (labels.max() + 1)).reshape(-1, 50)
    return np.array([histogram @ _PERIMETER_WEIGHTS for histogram in histograms])


def _innermost_points(mask: np.ndarray, components: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """(row, col) of the innermost pixel (largest distance to the background of ``mask``, the
    first in raster order on ties) of each component in ``labels``.

    Each distance is taken on the component's box grown by one pixel, where everything but the
    component counts as background: the same distances as over the whole field, because a
    component's nearest pixel that is not its own is background (its 4-connected neighbours
    are) and lies in that grown box. A whole-field transform cost 2 ms of a 224 px field for
    the few components without a marker."""
    boxes = ndi.find_objects(components)
    height, width = components.shape
    points = []
    for label in labels:
        rows, cols = boxes[label - 1]
        grown = (slice(max(rows.start - 1, 0), min(rows.stop + 1, height)),
                 slice(max(cols.start - 1, 0), min(cols.stop + 1, width)))
        own = components[grown] == label
        # a component filling its whole grown box touches the field's edges all round: its
        # background lies beyond the box
        distance = (ndi.distance_transform_edt(own) if not own.all()
                    else ndi.distance_transform_edt(mask)[grown])
        row, col = np.unravel_index(np.argmax(np.where(own, distance, -1.0)), own.shape)
        points.append((grown[0].start + row, grown[1].start + col))
    return np.array(points, dtype=int).reshape(-1, 2)


def _nucleus_fraction(lightness: np.ndarray, config: CellFinderConfig) -> float | None:
    """Fraction of a cell's pixels in its darker (nucleus) part, split at the midpoint of a
    two-means clustering of L*, or None when the two parts are not distinct or one is a sliver.
    The means of each split come from one sort and its running sums (the iteration was 12 % of
    the finder's time as boolean masks)."""
    values = np.sort(lightness, axis=None).astype(np.float64)
    sums, n = np.cumsum(values), len(values)
    threshold = float(np.median(lightness))
    for _ in range(20):
        dark_count = int(np.searchsorted(values, threshold, side="right"))  # values <= threshold
        if dark_count in (0, n):
            return None
        dark_mean = sums[dark_count - 1] / dark_count
        light_mean = (sums[-1] - sums[dark_count - 1]) / (n - dark_count)
        new = (dark_mean + light_mean) / 2
        if abs(new - threshold) < 0.05:
            break
        threshold = new
    if (light_mean - dark_mean < config.nucleus_contrast
            or min(dark_count, n - dark_count) < 0.05 * n):
        return None
    return dark_count / n


def _to_image(region, scale: float, shape: tuple[int, int]) -> tuple[Box, np.ndarray]:
    """A working-resolution region's box and mask in the input image's pixels."""
    y0, x0, y1, x1 = region.bbox
    height, width = shape
    box = (max(0, int(np.floor(x0 / scale))), max(0, int(np.floor(y0 / scale))),
           min(width, int(np.ceil(x1 / scale))), min(height, int(np.ceil(y1 / scale))))
    if scale == 1:
        return box, region.image.copy()
    mask = Image.fromarray(region.image).resize((box[2] - box[0], box[3] - box[1]), Image.Resampling.NEAREST)
    return box, np.asarray(mask).copy()


def _find(rgb: np.ndarray, config: CellFinderConfig) -> list[Cell]:
    diameter = config.cell_diameter_px or estimate_cell_diameter(rgb, config)
    if diameter is None:  # no diameter given and no stained cell to estimate it from
        return []
    scale = min(1.0, config.working_diameter_px / diameter)  # working pixels per field pixel
    regions, labels, lightness = _cell_regions(_resampled(rgb, scale), config, diameter * scale)
    perimeters = _perimeters(labels)
    cells = []
    for region in regions:
        box, mask = _to_image(region, scale, rgb.shape[:2])
        area = int(mask.sum())
        # Digital perimeters run short on small disks, so 4 pi A / P^2 can exceed 1: cap it.
        circularity = min(1.0, 4 * np.pi * region.area / max(perimeters[region.label], 1.0) ** 2)
        y0, x0, y1, x1 = region.bbox
        fraction = _nucleus_fraction(lightness[y0:y1, x0:x1][region.image], config)
        cy, cx = region.centroid
        cells.append(Cell(box=box, centroid=(float((cx + 0.5) / scale - 0.5), float((cy + 0.5) / scale - 0.5)),
                          area=area, circularity=float(circularity),
                          nucleus_area=None if fraction is None else round(fraction * area),
                          nucleus_cell_ratio=fraction, mask=mask))
    return sorted(cells, key=lambda c: (c.box[1], c.box[0]))


def find_cells(img: Image.Image | np.ndarray, config: CellFinderConfig = CellFinderConfig()) -> list[Cell]:
    """White cells of one smear field, ordered top to bottom, then left to right (by box), in the
    field's own pixels whatever resolution they were searched at. Empty when the field shows no
    white-cell stain."""
    return _find(rgb_array(img), config)


def padded_square(img: Image.Image | np.ndarray, left: int, top: int, side: int,
                  fill: np.ndarray | None = None) -> Image.Image:
    """The ``side`` x ``side`` square of ``img`` from (``left``, ``top``); parts beyond the image
    edge are filled with ``fill``, by default the field's median colour (its background), not
    black, which would look like a stain artefact. A caller cutting many cells from one field
    passes its ``median_colour`` once: on a 5-megapixel ALL-IDB field taking it, and copying the
    field to take it, cost ~20 ms a cell at the edge. Inside the field it is a plain crop."""
    field = img if isinstance(img, Image.Image) and img.mode == "RGB" else Image.fromarray(rgb_array(img))
    width, height = field.size
    if left >= 0 and top >= 0 and left + side <= width and top + side <= height:
        return field.crop((left, top, left + side, top + side))
    colour = median_colour(field) if fill is None else fill
    canvas = Image.new("RGB", (side, side), tuple(int(v) for v in colour))
    sx0, sy0, sx1, sy1 = max(left, 0), max(top, 0), min(left + side, width), min(top + side, height)
    if sx1 > sx0 and sy1 > sy0:
        canvas.paste(field.crop((sx0, sy0, sx1, sy1)), (sx0 - left, sy0 - top))
    return canvas


def cell_crop(img: Image.Image | np.ndarray, cell: Cell,
              pad_fraction: float = CellFinderConfig.crop_pad_fraction, size: int | None = None,
              fill: np.ndarray | None = None) -> Image.Image:
    """Square crop centred on ``cell`` (``padded_square``, with its ``fill``): a classifier
    trained on square inputs sees the cell undistorted. ``size`` resizes to a square."""
    if pad_fraction < 0:
        raise ValueError(f"pad_fraction must be >= 0, got {pad_fraction}")
    if size is not None and size < 1:
        raise ValueError(f"size must be a positive number of pixels or None, got {size}")
    x0, y0, x1, y1 = cell.box
    side = max(1, round(max(x1 - x0, y1 - y0) * (1 + 2 * pad_fraction)))
    crop = padded_square(img, round((x0 + x1 - side) / 2), round((y0 + y1 - side) / 2), side, fill)
    return crop if size is None else crop.resize((size, size), Image.Resampling.BILINEAR)
