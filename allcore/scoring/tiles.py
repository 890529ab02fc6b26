"""Slides in the scoring pipeline: one listed slide becomes a slide row and its tile rows
(``expand_input``, a Ray Data ``flat_map`` in the pipeline, so one slide's tiles spread over every
actor), and when all its tiles are scored the driver makes its cells count once
(``finish_slides``) before they are committed together.

Every row leaving ``expand_input`` has the same columns: the listing's, plus ``slide_id`` ("" for
a camera field), ``tile_index`` (-1 for a field or the slide row itself) and ``tile_spec`` (JSON:
the slide's scale and this tile's boxes, or the slide's error). Geometry follows
``allcore.imaging.slides``: tiles are planned and read at the run's working scale; rows carry boxes and
centroids in level-0 slide pixels.
"""

from __future__ import annotations

import base64
import io
import json
import math
import posixpath
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from allcore.imaging import slides
from allcore.data.celldata import CellCropGeometry
from allcore.imaging.cells import CellFinderConfig
from allcore.imaging.files import CORRUPT, NO_PIXEL_SIZE, UNREADABLE, write_atomic
from allcore.scoring.rows import CELL, SLIDE, TILE

NO_SLIDE = {"slide_id": "", "tile_index": -1, "tile_spec": ""}


@dataclass(frozen=True)
class TileSpec:
    """What a tile row needs to be read and placed, carried as JSON through the pipeline."""

    mpp: float  # level-0 um/px
    working_mpp: float
    level: int
    level_downsample: float
    tile_count: int
    read: tuple[int, int, int, int] = (0, 0, 0, 0)  # working pixels
    core: tuple[int, int, int, int] = (0, 0, 0, 0)
    tissue_fraction: float = math.nan
    slide_size: tuple[int, int] = (0, 0)  # level-0 (width, height)
    sha256: str = ""
    thumbnail_png: str = ""  # slide row: base64 of the thumbnail's PNG (the overview image)
    error: str = ""
    error_kind: str = ""

    @property
    def scale(self) -> slides.SlideScale:
        return slides.SlideScale(self.mpp, self.working_mpp, self.level, self.level_downsample)

    @property
    def core_in_tile(self) -> tuple[int, int, int, int]:
        return tuple(v - self.read[i % 2] for i, v in enumerate(self.core))

    def point_to_level0(self, point: tuple[float, float]) -> tuple[float, float]:
        """A point in this tile's pixels (x, y) in level-0 slide pixels (pixel centres)."""
        f = self.scale.level0_per_working
        return ((point[0] + self.read[0] + 0.5) * f - 0.5, (point[1] + self.read[1] + 0.5) * f - 0.5)

    def to_level0(self, box) -> tuple[int, int, int, int]:
        """A box in this tile's pixels (x0 y0 x1 y1, x1/y1 exclusive) in level-0 slide pixels."""
        f = self.scale.level0_per_working
        return tuple(int(round((v + self.read[i % 2]) * f)) for i, v in enumerate(box))

    def _in_slide(self, point: tuple[float, float]) -> tuple[float, float]:
        return point[0] + self.read[0], point[1] + self.read[1]

    def owns(self, centroid: tuple[float, float]) -> bool:
        """Whether this tile reports the cell centred at ``centroid`` (tile pixels)."""
        return slides.owns(self.core, self._in_slide(centroid), self.scale.cell_diameter_px)

    def depth_in_core(self, centroid: tuple[float, float]) -> float:
        return slides.depth_in_core(self.core, self._in_slide(centroid))

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "TileSpec":
        values = json.loads(text)
        for key in ("read", "core", "slide_size"):
            values[key] = tuple(values[key])
        return cls(**values)


def run_working_mpp(cell_finder, cell_card=None) -> float:
    """The um/px a run tiles its slides at: the finer of the cell finder's working resolution
    and the cell model's (``pixels_per_cell_diameter`` of its crop geometry), so neither sees a
    cell enlarged."""
    finder_px = (cell_finder or CellFinderConfig()).working_diameter_px
    model_px = 0.0 if cell_card is None else CellCropGeometry.from_card(cell_card).pixels_per_cell_diameter
    return slides.working_mpp(max(finder_px, model_px))


def expand_input(row: dict, *, working_mpp: float, mpp: float | None = None,
                 max_pixels: int) -> list[dict]:
    """The rows of one listed input: itself for a camera field (or an input with a listing
    error); for a slide, the slide row (``tile_index`` -1, ``tile_count`` in its spec, or the
    slide's error) followed by one row per tile showing smear. Never raises for a bad slide."""
    uri = str(row["source_uri"])
    is_slide = (not row.get("listing_error") and slides.is_slide_name(uri) and (
        not uri.lower().endswith(slides.TIFF_EXTENSIONS) or slides.is_pyramid_tiff(uri, max_pixels)))
    if not is_slide:
        return [{**row, **NO_SLIDE}]
    base = {**row, "slide_id": slides.slide_id(uri), "tile_index": -1}
    try:
        reader = slides.cached_slide(uri)
        scale = slides.slide_scale(reader, working_mpp=working_mpp, mpp_override=mpp)
        thumbnail = reader.thumbnail()
        tiles = slides.plan_tiles(reader, scale, thumbnail=thumbnail)
        sha = slides.sha256_of(uri)
    except slides.SlideError as exc:
        kind = NO_PIXEL_SIZE if str(exc) == slides.NO_MPP_ERROR else CORRUPT
        error = TileSpec(math.nan, working_mpp, 0, 1.0, 0, error=str(exc), error_kind=kind)
        return [{**base, "tile_spec": error.to_json()}]
    except OSError as exc:
        error = TileSpec(math.nan, working_mpp, 0, 1.0, 0, error=f"unreadable slide ({exc})",
                         error_kind=UNREADABLE)
        return [{**base, "tile_spec": error.to_json()}]
    from allcore.imaging.overlay import png_bytes

    common = dict(mpp=scale.mpp, working_mpp=working_mpp, level=scale.level,
                  level_downsample=scale.level_downsample, tile_count=len(tiles),
                  slide_size=reader.dimensions, sha256=sha)
    out = [{**base, "tile_spec": TileSpec(**common, thumbnail_png=base64.b64encode(
        png_bytes(thumbnail)).decode()).to_json()}]
    out += [{**base, "tile_index": tile.index, "tile_spec": TileSpec(
        **common, read=tile.read, core=tile.core, tissue_fraction=tile.tissue_fraction).to_json()}
        for tile in tiles]
    return out


def finish_slides(rows: pa.Table) -> pa.Table:
    """Complete inputs' rows with each slide's cells counted once: of two cells from different
    tiles that are one cell (``slides.duplicate_cells``), the copy less deep in its own tile's core
    is dropped, and the slide and tile rows' ``cell_count`` say how many cells remain."""
    kinds = np.asarray(rows["row_kind"].to_pylist(), dtype=object)
    if not (kinds == SLIDE).any():
        return rows
    uris = np.asarray(rows["source_uri"].to_pylist(), dtype=object)
    tiles = rows["tile_index"].to_numpy(zero_copy_only=False)
    keep = np.ones(rows.num_rows, bool)
    counts = rows["cell_count"].to_numpy(zero_copy_only=False).copy()
    boxes = np.stack([rows[f"box_{k}"].to_numpy(zero_copy_only=False) for k in ("x0", "y0", "x1", "y1")], 1)
    depth = rows["core_depth"].to_numpy(zero_copy_only=False)
    for uri in set(uris[kinds == SLIDE]):
        cells = np.flatnonzero((uris == uri) & (kinds == CELL))
        keep[cells[slides.duplicate_cells(boxes[cells], tiles[cells], depth[cells])]] = False
        kept = cells[keep[cells]]
        for at in np.flatnonzero((uris == uri) & (kinds == TILE) & (counts >= 0)):
            counts[at] = int((tiles[kept] == tiles[at]).sum())
        counts[np.flatnonzero((uris == uri) & (kinds == SLIDE))] = len(kept)
    rows = rows.set_column(rows.column_names.index("cell_count"), "cell_count",
                           pa.array(counts, rows.schema.field("cell_count").type))
    return rows.filter(pa.array(keep))


SLIDE_OUTPUTS = "slides"  # folder of the per-slide GeoJSON and overview, under the output root


@dataclass(frozen=True)
class ScoredSlide:
    """A slide whose files ``write_slide_outputs`` wrote: ``<SLIDE_OUTPUTS>/<name>.geojson`` and
    ``.png`` under the output root, ``name`` being ``<slide_id>-<sha256[:16]>`` (the hash keeps
    two slides of one file name apart), and how its cells were called."""

    slide_id: str
    name: str
    cells: int
    blast: int
    abstain: int

    @property
    def geojson(self) -> str:
        return slide_output(self.name, ".geojson")

    @property
    def overview(self) -> str:
        return slide_output(self.name, ".png")


def slide_output(name: str, suffix: str) -> str:
    """Path of a slide's GeoJSON (``.geojson``) or overview (``.png``), relative to the root."""
    return f"{SLIDE_OUTPUTS}/{name}{suffix}"


def slide_output_names(store) -> list[str]:
    """Names of the slides with both files under ``store``'s root, sorted. The overview is
    written after the GeoJSON, so a slide listed by its overview has both."""
    overviews = store.fs.glob(posixpath.join(store.path, slide_output("*", ".png")))
    return sorted(posixpath.basename(p)[:-len(".png")] for p in overviews)


def write_slide_outputs(store, scored: pa.Table, table: pa.Table) -> list[ScoredSlide]:
    """Per slide scored ok in ``table`` (a committed chunk; ``scored`` its rows before the output
    columns, which still carry the slide row's thumbnail): its GeoJSON, the cells for QuPath
    (``allcore.review.geojson.slide_feature_collection``), and its overview, the thumbnail with
    every cell coloured by its call (``ScoredSlide`` says where). Written after the chunk is
    committed, whole or not at all, the overview last."""
    from PIL import Image

    from allcore.imaging.overlay import png_bytes, slide_overview
    from allcore.review.geojson import slide_feature_collection

    kinds = scored["row_kind"].to_pylist()
    specs = {uri: TileSpec.from_json(spec) for uri, kind, spec, status in zip(
        scored["source_uri"].to_pylist(), kinds, scored["tile_spec"].to_pylist(),
        scored["status"].to_pylist()) if kind == SLIDE and status == "ok"}
    if not specs:
        return []
    frame = table.filter(pc.is_in(table["source_uri"], pa.array(list(specs)))).to_pandas()
    written = []
    for uri, rows in frame.groupby("source_uri", sort=True):
        spec, cells = specs[uri], rows[rows["row_kind"] == CELL]
        calls = cells["call"].where(cells["call"].notna(), None)
        slide = ScoredSlide(slide_id=rows["slide_id"].iloc[0],
                            name=f"{rows['slide_id'].iloc[0]}-{spec.sha256[:16]}", cells=len(cells),
                            blast=int((calls == "blast").sum()), abstain=int((calls == "abstain").sum()))
        collection = slide_feature_collection(cells)
        thumbnail = Image.open(io.BytesIO(base64.b64decode(spec.thumbnail_png)))
        overview = slide_overview(thumbnail, spec.slide_size,
                                  list(zip(cells["centroid_x"], cells["centroid_y"], calls)))
        for path, data in ((slide.geojson, json.dumps(collection).encode()), (slide.overview, png_bytes(overview))):
            write_atomic(store.fs, posixpath.join(store.path, path), data)
        written.append(slide)
    return written
