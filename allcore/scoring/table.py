"""The output table: its columns, declared once, and the rows built from scored batches.

Every column is one ``Column`` entry in ``COLUMNS``: its name, Arrow type and description. The
schema (with the descriptions in its metadata, so a file explains itself), the docs' column
table (``columns_markdown``) and the rows all follow from that list. To add a column, add an
entry: by default its values are the scored batch's column of the same name (computed by the
prepare or predict stage), null on error rows and where the value is missing; give ``derive``
when the value is computed from other columns. The words rows are made of (status, row kind,
schema version) are ``allcore.scoring.rows``; the review columns apply ``allcore.trust``'s rules.

Missing values travel through Ray Data as NaN (floats), -1 (integers) and "" (text), because
Ray Data cannot re-batch an all-None column; the table stores them as nulls.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import posixpath
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import pyarrow as pa

from allcore.data.labels import LABEL_SETS, get_label_set
from allcore.imaging.qc import QC_COLUMNS
from allcore.scoring.rows import (CELL, FIELD, IMAGE_KINDS, OK, SCHEMA_METADATA_KEY, SCHEMA_VERSION,
                                  SLIDE, TILE, prob_column)
from allcore.trust.checks import (NO_TRUST_CHECKS, Review, review_by_field, review_cell, review_image,
                           review_slide, trust_from_card_section, unchecked)


@dataclass(frozen=True)
class ScoredRows:
    """A chunk of scored rows (prepare + predict output, sorted) and the run facts the table's
    columns are derived from."""

    table: pa.Table
    run_id: str
    scored_at: dt.datetime
    model_summary: dict
    specimen_pattern: str | None
    blast_classes: tuple[str, ...]
    cell_blast_classes: tuple[str, ...] = ()  # the cell model's (--cell-model runs)

    @property
    def num_rows(self) -> int:
        return self.table.num_rows

    @cached_property
    def ok(self) -> np.ndarray:
        return np.array([s == OK for s in self.table["status"].to_pylist()], dtype=bool)

    def text(self, name: str) -> list[str | None]:
        """Missing text arrives as None, "" or NaN (an all-None column re-batched): all null."""
        return [v if isinstance(v, str) and v else None for v in self.table[name].to_pylist()]

    def numbers(self, name: str) -> np.ndarray:
        return self.table[name].to_numpy(zero_copy_only=False)

    def repeat(self, value) -> list:
        return [value] * self.num_rows

    @cached_property
    def reviews(self) -> list:
        return _reviews(self)


@dataclass(frozen=True)
class Column:
    """One output column. ``derive`` computes its values from the scored rows; without it they
    are the scored column of the same name, nulled where missing and (``ok_only``) on error rows.
    ``per_class`` columns are repeated for each class of the model card, ``{cls}`` in the name
    and description standing for the class."""

    name: str
    type: pa.DataType
    description: str
    derive: Callable[[ScoredRows], Sequence | pa.Array] | None = None
    ok_only: bool = True
    per_class: bool = False

    def expand(self, classes: Sequence[str]) -> list["Column"]:
        if not self.per_class:
            return [self]
        return [Column(self.name.format(cls=c), self.type, self.description.format(cls=c),
                       self.derive, self.ok_only) for c in classes]

    def values(self, rows: ScoredRows) -> pa.Array | pa.ChunkedArray:
        if self.derive is not None:
            values = self.derive(rows)
            if isinstance(values, (pa.Array, pa.ChunkedArray)):
                return values.cast(self.type)
            return pa.array(values, type=self.type)
        missing = ~rows.ok if self.ok_only else np.zeros(rows.num_rows, bool)
        if pa.types.is_string(self.type):
            text = rows.text(self.name)
            return pa.array([None if m else v for v, m in zip(text, missing)], type=self.type)
        data = rows.numbers(self.name)
        missing |= np.isnan(data.astype(np.float64))
        if pa.types.is_integer(self.type):
            missing |= data < 0
        return pa.array(data, mask=missing).cast(self.type)


def specimen_id(uri: str, pattern: str | None) -> str | None:
    """Group 1 of ``pattern`` (or the whole match) searched in ``uri``; default: parent folder."""
    if pattern is None:
        return posixpath.basename(posixpath.dirname(uri.replace(os.sep, "/"))) or None
    match = re.search(pattern, uri)
    if match is None:
        return None
    return match.group(1) if match.re.groups else match.group(0)


def cell_id(sha: str, row_kind: str, box: tuple[int, int, int, int], tile_index: int = -1) -> str:
    """Deterministic row id: the same bytes and box give the same id in every run and model
    (a slide's cells: their box in level-0 slide pixels)."""
    if row_kind in (FIELD, SLIDE):
        return f"{sha[:16]}:{row_kind}"
    if row_kind == TILE:
        return f"{sha[:16]}:tile{tile_index}"
    return f"{sha[:16]}:{','.join(map(str, box))}"


def _cell_ids(rows: ScoredRows) -> list[str | None]:
    boxes = zip(*(rows.numbers(f"box_{k}").tolist() for k in ("x0", "y0", "x1", "y1")))
    return [cell_id(sha, kind, box, tile) if good and sha else None
            for sha, kind, box, tile, good in zip(rows.text("content_sha256"),
                                                  rows.table["row_kind"].to_pylist(), boxes,
                                                  rows.numbers("tile_index").tolist(), rows.ok)]


def _specimen_ids(rows: ScoredRows) -> list[str | None]:
    """A slide is its own specimen (its slide_id) unless --specimen-pattern says otherwise."""
    slide_ids = rows.text("slide_id")
    return [slide if slide and rows.specimen_pattern is None else specimen_id(uri, rows.specimen_pattern)
            for uri, slide in zip(rows.table["source_uri"].to_pylist(), slide_ids)]


def _micrometres(axis: str) -> Callable[[ScoredRows], pa.Array]:
    def values(rows: ScoredRows) -> pa.Array:
        um = rows.numbers(f"centroid_{axis}").astype(np.float64) * rows.numbers("mpp").astype(np.float64)
        return pa.array(um, mask=~rows.ok | np.isnan(um))
    return values


def _blast_probability(rows: ScoredRows) -> pa.Array:
    total = (sum(rows.numbers(prob_column(c)).astype(np.float64) for c in rows.blast_classes)
             if rows.blast_classes else np.full(rows.num_rows, np.nan))
    if "blast_probability" in rows.table.column_names:  # cell rows scored by a cell model
        by_cell_model = rows.numbers("blast_probability").astype(np.float64)
        total = np.where(np.isnan(by_cell_model), total, by_cell_model)
    return pa.array(total, mask=~rows.ok | np.isnan(total))


def _cell_model(key: str) -> Callable[[ScoredRows], list[str | None]]:
    """A fact of the cell model (``model_summary['cell_model']``) on the cell rows it scored."""
    def values(rows: ScoredRows) -> list[str | None]:
        cell_model = rows.model_summary.get("cell_model")
        value = None if cell_model is None else cell_model[key]
        return [value if kind == CELL and good else None
                for kind, good in zip(rows.table["row_kind"].to_pylist(), rows.ok)]
    return values


def _is_blast(rows: ScoredRows) -> list[bool | None]:
    field_blast = set(rows.blast_classes)
    cell_blast = set(rows.cell_blast_classes) if rows.model_summary.get("cell_model") else field_blast
    blasts = [cell_blast if kind == CELL else field_blast for kind in rows.table["row_kind"].to_pylist()]
    return [(label in blast) if good and blast and label else None
            for label, blast, good in zip(rows.table["pred_label"].to_pylist(), blasts, rows.ok)]


def _as_listed(rows: ScoredRows, name: str) -> pa.ChunkedArray:
    return rows.table[name]


def _ood_score(rows: ScoredRows) -> pa.Array:
    """Field rows: the field model's detector on the field. Cell rows: the cell model's detector
    on the crop in --cell-model runs; else null, since the field model's detector was fitted on
    whole fields and a crop's distance to them says nothing."""
    scores = rows.numbers("ood_score").astype(np.float64)
    judged = np.array([k in IMAGE_KINDS for k in rows.table["row_kind"].to_pylist()])
    if rows.model_summary.get("cell_model"):
        judged[:] = True
    return pa.array(scores, mask=~rows.ok | ~judged | np.isnan(scores))


def _reviews(rows: ScoredRows) -> list[Review | None]:
    """The review decision of every row (None for error rows): which of ``allcore.trust``'s rules
    judges each row, and with what (docs/SCORING.md, "Trust columns and drift").

    A field (or a slide's tile) is judged on its own QC and OOD score (``review_image``); a cell
    by its field (``review_by_field``: the crop's image is the field's), or in --cell-model runs
    by the cell model's trust section (``review_cell``: the field model's domain is not the cell
    model's); a slide by its tiles (``review_slide``). Without a trust section in a card nothing
    is checked (``unchecked``)."""
    section = rows.model_summary.get("trust") or None
    trust = trust_from_card_section(section) if section else None
    cell_model = rows.model_summary.get("cell_model")
    cell_section = (cell_model or {}).get("trust") or None
    cell_trust = trust_from_card_section(cell_section) if cell_section else None
    blast = _blast_probability(rows).to_pylist()
    kinds, uris = rows.table["row_kind"].to_pylist(), rows.table["source_uri"].to_pylist()
    images = list(zip(uris, rows.numbers("tile_index").tolist()))  # a field, or a slide's tile
    qc = {name: rows.numbers(name) for name in QC_COLUMNS}
    ood = rows.numbers("ood_score")
    # a slide tile's cell size is known from its pixel size; a field's is estimated by image QC
    known = rows.numbers("source_cell_diameter_px")
    field_reviews: dict[tuple, Review] = {}
    field_diameters: dict[tuple, float] = {}  # the field's white-cell size, for its cells' review
    out: list[Review | None] = []
    for i, (good, kind, image, p) in enumerate(zip(rows.ok, kinds, images, blast)):
        if kind in IMAGE_KINDS:
            field_diameters[image] = float(known[i] if known[i] > 0 else qc["qc_cell_diameter_px"][i])
        if not good:
            review = None
        elif kind == SLIDE:  # rows are sorted: its tiles came first
            review = review_slide([field_reviews[k] for k in field_reviews if k[0] == image[0]])
        elif kind == CELL and cell_model:
            review = (unchecked(p) if cell_trust is None else review_cell(
                float(ood[i]), math.nan if p is None else p, cell_trust,
                cell_diameter_px=field_diameters.get(image, math.nan),
                pixels_per_cell_diameter=float(cell_model["cell_crop"]["pixels_per_cell_diameter"])))
        elif trust is None:
            review = unchecked(p)
        elif kind in IMAGE_KINDS:
            review = review_image({k: float(v[i]) for k, v in qc.items()}, float(ood[i]), p, trust)
            field_reviews[image] = review
        else:  # rows are sorted: the field (tile) row of an input comes before its cells
            review = review_by_field(field_reviews[image], p)
        out.append(review)
    return out


def _review_column(index: int) -> Callable[[ScoredRows], list]:
    return lambda rows: [None if r is None else r[index] for r in rows.reviews]


COLUMNS: tuple[Column, ...] = (
    Column("run_id", pa.string(), "scoring run that wrote the row (UTC start time + random suffix)",
           lambda r: r.repeat(r.run_id)),
    Column("scored_at", pa.timestamp("us", tz="UTC"), "UTC time the row's chunk was scored",
           lambda r: r.repeat(r.scored_at)),
    Column("model_name", pa.string(), "model architecture name from the model card",
           lambda r: r.repeat(r.model_summary["model_name"])),
    Column("model_version", pa.string(), "model version from the model card",
           lambda r: r.repeat(r.model_summary["model_version"])),
    Column("model_sha256", pa.string(),
           "sha256 of the model weights (the incremental ledger is per model_sha256)",
           lambda r: r.repeat(r.model_summary["weights_sha256"])),
    Column("cell_model_version", pa.string(), "version of the cell model (--cell-model) that "
           "classified this cell row; null on field rows and without a cell model, where cell "
           "rows are the field model on crops (unvalidated)", _cell_model("model_version")),
    Column("cell_model_sha256", pa.string(), "sha256 of the cell model's weights (cell rows "
           "of --cell-model runs; else null)", _cell_model("weights_sha256")),
    Column("source_uri", pa.string(), "local path or s3:// uri of the input image",
           lambda r: _as_listed(r, "source_uri")),
    Column("source_size", pa.int64(),
           "input size in bytes at listing time (-1 if it could not be listed)",
           lambda r: _as_listed(r, "source_size")),
    Column("source_mtime", pa.string(),
           "mtime in ns (local) or ETag (s3) at listing time: the change detector",
           lambda r: _as_listed(r, "source_mtime")),
    Column("content_sha256", pa.string(), "sha256 of the bytes actually scored (null if unreadable)",
           ok_only=False),
    Column("specimen_id", pa.string(), "specimen the image belongs to (regex on source_uri; "
           "default: a slide's slide_id, a field's parent folder)", _specimen_ids),
    Column("cell_id", pa.string(), "deterministic id: content_sha256[:16]:x0,y0,x1,y1 for a cell, "
           "content_sha256[:16]:field for the whole field, :slide for a slide, :tile<N> for its "
           "tile N (null for error rows)", _cell_ids),
    Column("row_kind", pa.string(), "'field' (one per camera-field input, also for errors), "
           "'slide' (one per whole-slide input, also for errors), 'tile' (one per scored tile of "
           "a slide) or 'cell' (one per detected white cell, --per-cell runs only)",
           lambda r: _as_listed(r, "row_kind")),
    Column("slide_id", pa.string(), "the slide (specimen) a slide, tile or cell row of a "
           "whole-slide input belongs to: its file name without extension (a DICOM-WSI folder's "
           "name); null for fields",
           lambda r: r.text("slide_id")),
    Column("tile_index", pa.int32(), "tile number within its slide, row by row over the tiles "
           "that show smear (tile rows and a slide's cell rows; else null)", ok_only=False),
    Column("tile_count", pa.int32(), "tiles of the slide that show smear, each scored as a tile "
           "row (slide rows; else null)"),
    Column("box_x0", pa.int32(), "box left in pixels of the original image, level-0 pixels for "
           "slides (field rows: 0; slide rows: the whole slide; tile rows: the tile's core)"),
    Column("box_y0", pa.int32(), "box top (field rows: 0)"),
    Column("box_x1", pa.int32(), "box right, exclusive (field rows: width)"),
    Column("box_y1", pa.int32(), "box bottom, exclusive (field rows: height)"),
    Column("centroid_x", pa.float32(), "cell centroid x in the same pixels as the box (cell rows; "
           "else null)"),
    Column("centroid_y", pa.float32(), "cell centroid y (cell rows; else null)"),
    Column("mpp", pa.float32(), "micrometres per pixel of the box and centroid coordinates: the "
           "slide's level-0 pixel size (metadata or --mpp), a field's --mpp; null when unknown"),
    Column("centroid_x_um", pa.float32(), "centroid_x in micrometres from the image's top-left "
           "corner (null without mpp)", _micrometres("x")),
    Column("centroid_y_um", pa.float32(), "centroid_y in micrometres (null without mpp)",
           _micrometres("y")),
    Column("cell_count", pa.int32(), "white cells found in the field, tile or whole slide, each "
           "counted once (field, tile and slide rows of --per-cell runs; else null)"),
    Column("cell_area", pa.int32(), "cell area in pixels (cell rows; else null)"),
    Column("circularity", pa.float32(),
           "4 pi area / perimeter^2 of the cell, 1 for a disk (cell rows; else null)"),
    Column("nucleus_cell_ratio", pa.float32(),
           "nucleus area / cell area (cell rows where the nucleus is distinct)"),
    Column("pred_label", pa.string(), "class with the highest probability (null for error rows); "
           "cell rows of --cell-model runs: the cell model's class (e.g. 'blast', 'not_blast')"),
    Column("confidence", pa.float32(), "probability of pred_label (null for error rows), from "
           "the model that made pred_label"),
    Column("prob_{cls}", pa.float32(), "field model's calibrated (temperature-scaled, the model "
           "card's trust.temperature) probability of class {cls!r}; the plain softmax when the card "
           "has no trust section (null for error rows, and for cell rows of --cell-model runs)",
           per_class=True),
    Column("blast_probability", pa.float32(), "sum of the calibrated probabilities of the label "
           "set's blast classes (LabelSet.blast_classes in allcore/data/labels.py) under the model that "
           "made pred_label: the cell model on cell rows of --cell-model runs, else the field "
           "model; null for error rows", _blast_probability),
    Column("is_blast", pa.bool_(), "pred_label is a blast class of the model that made it (null "
           "for error rows); what the model says, whether or not it can be trusted: act on `call`",
           _is_blast),
    *(Column(name, pa.float64(), f"image QC: {text} (field rows; else null)")
      for name, text in QC_COLUMNS.items()),
    Column("ood_score", pa.float32(), "out-of-distribution score on the model's own penultimate "
           "features (allcore.trust.checks; higher is further from the training images); above the "
           "card's trust.ood.threshold the row needs review. Field rows: the field model on the "
           "field; cell rows of --cell-model runs: the cell model on the crop; null for other cell "
           "rows and without a trust section", _ood_score),
    Column("needs_review", pa.bool_(), "the field is out of distribution or fails image QC "
           "against the training ranges (cell rows: their field does; cell rows of --cell-model "
           "runs: the crop is out of the cell model's distribution); its probabilities are kept "
           "but `call` is 'abstain'. Null for error rows and when the model card has no trust "
           "section", _review_column(0)),
    Column("review_reason", pa.string(), "why the row needs review: '; '-joined "
           "allcore.trust.checks.REVIEW_REASONS (e.g. 'out of distribution; blurred'); "
           f"'{NO_TRUST_CHECKS}' when nothing could be checked; else null", _review_column(1)),
    Column("call", pa.string(), "what a lab may act on: 'blast' (blast_probability >= "
           "allcore.trust.checks.BLAST_THRESHOLD; cell rows of --cell-model runs: >= the cell model's "
           "blast_threshold, fitted for <= 2% false blasts, with 'blast uncertain' review between "
           "the two), 'not blast', or 'abstain' when the row needs review "
           "(null for error rows and label sets without blast classes)", _review_column(2)),
    Column("status", pa.string(), "'ok' or 'error'", lambda r: _as_listed(r, "status")),
    Column("error", pa.string(), "why the input could not be scored (null for ok rows)",
           lambda r: [None if good else e for e, good in zip(r.text("error"), r.ok)]),
    Column("error_kind", pa.string(), "'unreadable', 'unlistable', 'no pixel size' (a slide "
           "without um/px: retried by the next run, which may give --mpp), "
           "'bad name', 'empty', 'not an image', 'corrupt', 'too large' (not retried until the file "
           "changes); null for ok rows", ok_only=False),
    Column("note", pa.string(), "remark on an ok row, e.g. 'no cells found' on a --per-cell field "
           "row without cells", ok_only=False),
)


def output_columns(classes: Iterable[str]) -> list[Column]:
    """``COLUMNS`` with the per-class columns expanded in the model card's class order."""
    classes = list(classes)
    return [c for column in COLUMNS for c in column.expand(classes)]


def output_schema(classes: Iterable[str], model_summary: dict) -> pa.Schema:
    """Arrow schema of a predictions file; column descriptions and the model card summary are
    stored in the schema metadata so a file explains itself without this repository."""
    columns = output_columns(classes)
    metadata = {"version": SCHEMA_VERSION, "columns": {c.name: c.description for c in columns},
                "model": model_summary,
                "partitioning": "hive: scored_date=YYYY-MM-DD (UTC date of scored_at)"}
    return pa.schema([pa.field(c.name, c.type) for c in columns],
                     metadata={SCHEMA_METADATA_KEY: json.dumps(metadata).encode()})


def columns_markdown() -> str:
    """The column table of docs/SCORING.md, generated from ``COLUMNS``."""
    lines = ["| column | type | meaning |", "|---|---|---|"]
    lines += [f"| `{c.name.replace('{cls}', '<class>')}` | {c.type} | "
              f"{c.description.replace('{cls!r}', '<class>')} |" for c in COLUMNS]
    return "\n".join(lines)


def blast_classes(card, cell_card=None, *, required: bool = True) -> tuple[tuple, tuple]:
    """(the field model's, the cell model's) blast classes, from their label sets. A field model
    whose label set allcore does not know has none unless ``required`` (per-cell work needs them:
    then get_label_set says what is missing)."""
    blasts = (get_label_set(card.label_set).blast_classes_of(card.classes)
              if required or card.label_set in LABEL_SETS else ())
    cell_blasts = (() if cell_card is None else
                   get_label_set(cell_card.label_set).blast_classes_of(cell_card.classes))
    return blasts, cell_blasts


def card_summary(card, cell_card=None) -> dict:
    """What a predictions file records about the models that produced it (the cell model's
    entry is None without ``--cell-model``)."""
    cell_model = None if cell_card is None else {**_model_facts(cell_card),
                                                 "cell_crop": dict(cell_card.cell_crop)}
    return {**_model_facts(card), "cell_model": cell_model}


def _model_facts(card) -> dict:
    return {"model_name": card.model_name, "model_version": str(card.model_version),
            "weights_sha256": card.weights_sha256, "classes": list(card.classes),
            "data_config": dict(card.data_config), "trust": dict(card.trust)}


# Scored columns that only slides and --mpp fill (allcore.scoring.prepare): their missing value
# where a scored table has none of them (rows prepared before slides, or for one uploaded field).
SLIDE_SCORED_COLUMNS = {"slide_id": (pa.string(), ""), "tile_index": (pa.int64(), -1),
                        "tile_count": (pa.int64(), -1), "centroid_x": (pa.float64(), math.nan),
                        "centroid_y": (pa.float64(), math.nan), "mpp": (pa.float32(), math.nan),
                        "source_cell_diameter_px": (pa.float64(), math.nan)}


def build_output_table(scored: pa.Table, *, run_id: str, scored_at: dt.datetime,
                       model_summary: dict, specimen_pattern: str | None,
                       blast_classes: Iterable[str] = (),
                       cell_blast_classes: Iterable[str] = ()) -> pa.Table:
    """Rows of the output schema from the predict stage's columns (see ``allcore.scoring.prepare``
    and ``allcore.scoring.predict``). Rows are sorted by source_uri, field row first, then cells
    top to bottom, so a chunk's file is reproducible."""
    for name, (kind, missing) in SLIDE_SCORED_COLUMNS.items():  # scored without a slide in mind
        if name not in scored.column_names:
            scored = scored.append_column(name, pa.array([missing] * scored.num_rows, kind))
    scored = scored.sort_by([("source_uri", "ascending"), ("row_kind", "descending"),
                             ("box_y0", "ascending"), ("box_x0", "ascending")])
    classes = model_summary["classes"]
    rows = ScoredRows(scored, run_id, scored_at, model_summary, specimen_pattern,
                      tuple(c for c in classes if c in set(blast_classes)),
                      tuple(cell_blast_classes))
    schema = output_schema(classes, model_summary)
    return pa.Table.from_arrays([c.values(rows) for c in output_columns(classes)], schema=schema)
