"""The prepare stage (CPU): read, hash, decode and preprocess each input of a batch.

One input gives its field row (the whole field, preprocessed as the model card says; an error
row for a bad input) and, when a cell finder is given (``--per-cell``), one row per white cell.
A cell row's pixels are, with a cell model (``--cell-model``), the crop its card's geometry
prescribes at the run's cell diameter, preprocessed as that card says, in ``cell_pixels``;
without one, the square crop around the cell preprocessed like the field (the field model on
crops, unvalidated). A whole-slide input arrives already expanded (``allcore.scoring.tiles``):
its slide row passes through, each tile is read at the run's working scale and prepared like a
field, its cells placed in level-0 slide pixels. Every row has ``row_kind`` ('field', 'slide',
'tile' or 'cell'), so later stages never guess the mode.

Batches are ``dict[str, np.ndarray]``, the shape Ray Data's ``map_batches`` passes; nothing here
raises for a bad input: the row gets ``status='error'`` and a message, and flows on to the table
so that every listed input is accounted for.

Per-row measurements of the decoded field (e.g. image-quality numbers) are added by putting a
function into ``FIELD_MEASUREMENTS`` (column name -> function of the decoded RGB image, returning
a float) and declaring the column in ``allcore.scoring.table.COLUMNS``. Cell and error rows get
NaN (null in the table).

Every field row also gets the image QC statistics (``allcore.imaging.qc.QC_COLUMNS``), which the review
decision compares with the model card's training ranges, computed on the field as it was read
(``--per-cell`` runs too: the ranges were fitted that way).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image

from allcore.data.celldata import CellCropGeometry, box_centre, cut_cell_crop
from allcore.imaging.cells import (CellFinderConfig, cell_crop, estimate_cell_diameter, find_cells,
                           median_cell_diameter)
from allcore.imaging.files import (FRAMES_INFO_KEY, MAX_PIXELS, UNREADABLE, ImageDecodeError, decode_rgb,
                        read_bytes)
from allcore.imaging.qc import QC_COLUMNS, image_qc
from allcore.imaging import slides
from allcore.imaging.files import CORRUPT
from allcore.scoring.rows import CELL, ERROR, FIELD, OK, SLIDE, TILE
from allcore.scoring.tiles import NO_SLIDE, TileSpec
from allcore.imaging.data_config import DataConfig, mask_scale_bar, median_colour, preprocess_array

NO_CELLS_NOTE = "no cells found"
FieldMeasurement = Callable[[Image.Image], float]
# column name -> measurement of the decoded field image; declare each column in table.COLUMNS
FIELD_MEASUREMENTS: dict[str, FieldMeasurement] = {}


@dataclass(frozen=True)
class CellModelInput:
    """What a cell model sees: crops cut with its card's geometry, preprocessed with its card's
    data config (which may differ from the field model's, e.g. in input size)."""

    geometry: CellCropGeometry
    data_config: dict


def prepare_kwargs(card, *, max_pixels: int = MAX_PIXELS,
                   cell_finder: CellFinderConfig | None = None, cell_card=None,
                   mpp: float | None = None) -> dict:
    """``prepare_batch`` keyword arguments for a model card (and a cell model's card): scoring
    preprocesses exactly as each model was evaluated in training (the card's data config,
    scale-bar masking included; the cell card's crop geometry)."""
    cell_model = None if cell_card is None else CellModelInput(
        CellCropGeometry.from_card(cell_card), cell_card.data_config_obj().to_dict())
    return {"data_config": card.data_config_obj().to_dict(), "max_pixels": max_pixels,
            "cell_finder": cell_finder, "cell_model": cell_model, "mpp": mpp}


def load_image(uri: str, *, max_pixels: int = MAX_PIXELS
               ) -> tuple[str | None, Image.Image | None, str | None, str]:
    """(content sha256, RGB image, error, error kind) of one input; never raises for a bad input.
    The sha is kept when the bytes could be read, even if they do not decode, so broken copies
    can be found."""
    try:
        data = read_bytes(uri)
    except OSError as exc:
        return None, None, (f"unreadable input ({type(exc).__name__}: {exc}); check that the "
                            "file still exists and that this job may read it"), UNREADABLE
    sha = hashlib.sha256(data).hexdigest()
    try:
        return sha, decode_rgb(data, max_pixels=max_pixels), None, ""
    except ImageDecodeError as exc:
        return sha, None, str(exc), exc.kind


def prepare_batch(batch: dict[str, np.ndarray], *, data_config: dict, max_pixels: int = MAX_PIXELS, cell_finder: CellFinderConfig | None = None,
                  measurements: Mapping[str, FieldMeasurement] = FIELD_MEASUREMENTS,
                  cell_model: CellModelInput | None = None, mpp: float | None = None) -> dict[str, np.ndarray]:
    """Rows of the inputs ``batch`` names (``source_uri``; its other columns, e.g. the rest of
    ``INPUT_KEY``, are carried onto every row of the input): the field row of each, plus its cell
    rows when ``cell_finder`` is given. Rows of a slide (``allcore.scoring.tiles.expand_input``)
    give the slide row as it is and, per tile, a tile row (the tile read at the run's working
    scale, scored like a field) and the cells the tile owns, placed in level-0 slide pixels.

    Adds content_sha256, row_kind, status, error, note, box_x0/y0/x1/y1 (field rows: the whole
    image), centroid_x/y, mpp (``mpp``: a camera field's um/px, from --mpp), cell_count,
    cell_area, circularity, nucleus_cell_ratio, one column per measurement and ``pixels``
    (float32 N x 3 x S x S, zeros for error rows so the column keeps one shape).
    With the data config's ``mask_corner`` the scale bar is painted out before cells are searched,
    so its label is neither found as a cell nor seen in a crop (not on slide tiles: a scanner
    prints no scale bar into the scan). With ``cell_model`` every row also has ``cell_pixels``
    (the cell model's crops; zeros on field and error rows).
    """
    cfg = DataConfig.from_dict(data_config)
    batch = {**_unexpanded_slide_columns(len(batch["source_uri"])), **batch}
    rows: list[dict] = []
    listing_errors = batch.get("listing_error", [""] * len(batch["source_uri"]))
    for i, uri in enumerate(batch["source_uri"]):
        base = {"input": i, "content_sha256": "", "error_kind": "", "row_kind": FIELD,
                "status": OK, "error": "", "cell_count": -1, "tile_count": -1, "note": "", "cell_area": -1,
                "circularity": math.nan, "nucleus_cell_ratio": math.nan, "box": (0, 0, 0, 0),
                "centroid": (math.nan, math.nan), "mpp": math.nan, "core_depth": math.nan,
                "source_cell_diameter_px": math.nan,
                "pixels": None, **{name: math.nan for name in (*measurements, *QC_COLUMNS)}}
        if batch["slide_id"][i]:
            rows += _slide_rows(str(uri), int(batch["tile_index"][i]), TileSpec.from_json(batch["tile_spec"][i]),
                                base, cfg=cfg, cell_finder=cell_finder, measurements=measurements,
                                cell_model=cell_model)
            continue
        if listing_errors[i]:  # never listed as a readable file: nothing to open
            sha, img, error, error_kind = None, None, listing_errors[i], batch["error_kind"][i]
        else:
            sha, img, error, error_kind = load_image(str(uri), max_pixels=max_pixels)
        frames = img.info.get(FRAMES_INFO_KEY, 1) if img is not None else 1
        field_row = {**base, "content_sha256": sha or "", "mpp": math.nan if mpp is None else mpp,
                     "note": f"scored on frame 1 of {frames}" if frames > 1 else ""}
        if img is None:
            rows.append({**field_row, "status": ERROR, "error": error, "error_kind": error_kind})
            continue
        # the field model's pixels as training made them (reduced decode, then the mask); the
        # finder and the crops work on the field with the scale bar painted out
        searched = mask_scale_bar(img) if cell_finder is not None and cfg.mask_corner else img
        rows += _image_rows(img, searched, field_row, cfg=cfg, cell_finder=cell_finder,
                            measurements=measurements, cell_model=cell_model)
    return _columns(batch, rows, cfg, measurements, cell_model)


def _unexpanded_slide_columns(n: int) -> dict[str, np.ndarray]:
    """The slide columns of a batch that never went through the expansion stage (a run whose
    listing named no slide)."""
    return {key: np.full(n, value, dtype=object if isinstance(value, str) else np.int64)
            for key, value in NO_SLIDE.items()}


def _image_rows(img: Image.Image, searched: Image.Image, field_row: dict, *, cfg: DataConfig,
                cell_finder: CellFinderConfig | None, measurements: Mapping[str, FieldMeasurement],
                cell_model: CellModelInput | None, tile: TileSpec | None = None) -> list[dict]:
    """The field (or tile) row of a decoded image and, with a finder, one row per white cell it
    holds. For a slide's ``tile``: the slide's cell diameter, only the cells the tile owns
    (``allcore.imaging.slides.owns``), boxes and centroids in level-0 slide pixels, and each cell's depth
    in the tile's core (the tie-break of ``allcore.imaging.slides.duplicate_cells``)."""
    crop_cfg = replace(cfg, mask_corner=False)  # crops come from the already masked field
    field_row = {**field_row, "box": (0, 0, *img.size), "pixels": preprocess_array(img, cfg),
                 **{name: float(measure(img)) for name, measure in measurements.items()}}
    if tile is not None:  # a tile row stands for its core
        field_row["box"] = tile.to_level0(tile.core_in_tile)
    if cell_finder is None:
        return [{**field_row, **image_qc(img)}]
    # one diameter for finding and cutting: the slide's, the run's, else this field's estimate
    diameter = ((tile and tile.scale.cell_diameter_px) or cell_finder.cell_diameter_px
                or estimate_cell_diameter(searched, cell_finder))
    cells = [] if diameter is None else find_cells(
        searched, replace(cell_finder, cell_diameter_px=diameter))
    if tile is not None:
        cells = [cell for cell in cells if tile.owns(cell.centroid)]
    field_row.update(image_qc(img))
    pixel_key = "pixels" if cell_model is None else "cell_pixels"
    background = median_colour(searched) if cells else None  # beyond the edge of every crop
    rows = [{**field_row, "cell_count": len(cells),
             "note": field_row["note"] or ("" if cells else NO_CELLS_NOTE)}]
    rows += [{**field_row, "row_kind": CELL, "cell_count": -1,
              "box": cell.box if tile is None else tile.to_level0(cell.box),
              "centroid": cell.centroid if tile is None else tile.point_to_level0(cell.centroid),
              "core_depth": math.nan if tile is None else tile.depth_in_core(cell.centroid),
              "cell_area": cell.area, "circularity": cell.circularity,
              "nucleus_cell_ratio": (math.nan if cell.nucleus_cell_ratio is None
                                     else cell.nucleus_cell_ratio),
              **{name: math.nan for name in (*measurements, *QC_COLUMNS)},
              "pixels": None,  # a cell row's pixels are the crop's, under pixel_key
              pixel_key: cell_input(searched, cell, diameter, finder=cell_finder,
                                    crop_cfg=crop_cfg, cell_model=cell_model, fill=background)}
             for cell in cells]
    return rows


def _slide_rows(uri: str, tile_index: int, spec: TileSpec, base: dict, *, cfg: DataConfig,
                cell_finder: CellFinderConfig | None, measurements: Mapping[str, FieldMeasurement],
                cell_model: CellModelInput | None) -> list[dict]:
    """A slide row (``tile_index`` -1: the whole slide, or the slide's error), or one tile's
    rows: the tile scored like a field at the working scale, its cells in level-0 pixels."""
    row = {**base, "content_sha256": spec.sha256, "mpp": spec.mpp}
    if tile_index < 0:
        if spec.error:
            return [{**row, "row_kind": SLIDE, "status": ERROR, "error": spec.error,
                     "error_kind": spec.error_kind}]
        return [{**row, "row_kind": SLIDE, "box": (0, 0, *spec.slide_size), "tile_count": spec.tile_count,
                 "note": "" if spec.tile_count else "no smear found on the slide's thumbnail"}]
    # a white cell's width in the pixels the tile was read from: what its cells' review compares
    # with the cell model's resolution (a field's is estimated by image QC instead)
    row = {**row, "row_kind": TILE, "source_cell_diameter_px": slides.WHITE_CELL_DIAMETER_UM / (
        spec.mpp * spec.level_downsample),
           "note": slides.DENSE_NOTE if spec.tissue_fraction >= slides.DENSE_TISSUE_FRACTION else ""}
    try:
        pixels = slides.read_tile(slides.cached_slide(uri), spec.scale, spec.read)
    except Exception as exc:  # a damaged tile: its error row; the slide's other tiles still score
        return [{**row, "box": spec.to_level0(spec.core_in_tile), "status": ERROR,
                 "error": f"unreadable tile ({type(exc).__name__}: {exc}); the slide file is "
                          "probably damaged there: re-copy it", "error_kind": CORRUPT}]
    return _image_rows(pixels, pixels, row, cfg=replace(cfg, mask_corner=False),
                       cell_finder=cell_finder, measurements=measurements, cell_model=cell_model,
                       tile=spec)


def sampled_cell_diameter(uris: Iterable[str], *, data_config: DataConfig,
                          max_pixels: int = MAX_PIXELS) -> float | None:
    """One white-cell diameter for a run: the median of the per-field estimates over ``uris``
    (a sample of the inputs; unreadable ones skipped), on the fields as prepare sees them (scale
    bar masked when the model's data config says so). None when nothing could be measured."""
    images = (img for img in (load_image(uri, max_pixels=max_pixels)[1] for uri in uris)
              if img is not None)
    return median_cell_diameter(mask_scale_bar(img) if data_config.mask_corner else img
                                for img in images)


def cell_input(field: Image.Image, cell, diameter: float, *, finder: CellFinderConfig,
               crop_cfg: DataConfig, cell_model: CellModelInput | None,
               fill: np.ndarray | None = None) -> np.ndarray:
    """The preprocessed pixels of one found cell as the model that classifies it sees them: the
    cell model's crop (its geometry at ``diameter``, its data config), else the field model's
    square crop around the box (``crop_cfg``); beyond the field's edge either is ``fill``, the
    field's median colour, taken once per field by the caller."""
    if cell_model is None:
        return preprocess_array(cell_crop(field, cell, finder.crop_pad_fraction, fill=fill), crop_cfg)
    crop = cut_cell_crop(field, box_centre(cell.box), cell_diameter_px=diameter,
                         geometry=cell_model.geometry, fill=fill)
    return preprocess_array(crop, DataConfig.from_dict(cell_model.data_config))


def _columns(batch: dict[str, np.ndarray], rows: list[dict], cfg: DataConfig,
             measurements: Mapping, cell_model: CellModelInput | None = None) -> dict[str, np.ndarray]:
    """The rows as a column batch; the batch's own columns are repeated onto each input's rows."""
    inputs = np.array([r["input"] for r in rows], np.int64)
    out = {k: np.asarray(v)[inputs] for k, v in batch.items()}
    out.update({k: np.array([r[k] for r in rows], dtype=object)
                for k in ("content_sha256", "row_kind", "status", "error", "error_kind", "note")})
    out.update({k: np.array([r[k] for r in rows], np.int32) for k in ("cell_count", "tile_count", "cell_area")})
    out.update({k: np.array([r[k] for r in rows], np.float32)
                for k in ("circularity", "nucleus_cell_ratio", "mpp", *measurements, *QC_COLUMNS)})
    out.update({k: np.array([r[k] for r in rows], np.float64) for k in ("core_depth", "source_cell_diameter_px")})
    out.update({f"centroid_{k}": np.array([r["centroid"][j] for r in rows], np.float64)
                for j, k in enumerate("xy")})
    out.update({f"box_{k}": np.array([r["box"][j] for r in rows], np.int32)
                for j, k in enumerate(("x0", "y0", "x1", "y1"))})
    out["pixels"] = _stacked(rows, "pixels", cfg.input_size)
    if cell_model is not None:
        out["cell_pixels"] = _stacked(rows, "cell_pixels",
                                      DataConfig.from_dict(cell_model.data_config).input_size)
    return out


def _stacked(rows: list[dict], key: str, size: int) -> np.ndarray:
    """One pixel column, zeros where a row has none, so the column keeps one shape. Only the
    rows with pixels are written: the zeros of the others (a field's cell rows in the field
    column, its field row in the cell column) stay untouched pages of one ``np.zeros``, which
    the predict stage never reads (stacking a blank per row was a fifth of a per-cell field's
    preparation)."""
    column = np.zeros((len(rows), 3, size, size), np.float32)
    for i, row in enumerate(rows):
        if row.get(key) is not None:
            column[i] = row[key]
    return column
