"""Reviewers' decisions as a Parquet table, and that table as training data.

Each decision is one row (accept: the label is the model's; correct: another class), written
with the scoring output's protocol (``OutputStore.publish`` stages the file and moves it into
place; a commit record written atomically makes it count) under ``<output>/review/``::

    <output>/review/corrections/part-<correction_id>.parquet
    <output>/review/_commits/<correction_id>.json

The browser makes one ``correction_id`` per decision and sends it again on a retry. File and
record are named by it, so a retried or doubled request finds the record and writes nothing, and
even two copies racing write the same file and record: one row per decision, exactly once. A
reviewer who changes their mind makes a new decision; the newest per cell is what training uses.
"""

from __future__ import annotations

import datetime as dt
import json
import posixpath
import re
from collections.abc import Mapping
from dataclasses import dataclass

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from allcore.errors import AllcoreError
from allcore.data.celldata import MANIFEST_FILE, CellCropGeometry, box_centre, cut_cell_crop
from allcore.imaging.cells import estimate_cell_diameter
from allcore.imaging.files import (decode_rgb, filesystem, join, read_bytes, write_atomic,
                                   write_bytes)
from allcore.imaging.overlay import png_bytes
from allcore.review.queue import ReviewQueue
from allcore.scoring.store import OutputStore
from allcore.scoring.rows import CELL, FIELD

CORRECTIONS_FOLDER = "review"  # under the scoring output root
CORRECTION_ID = re.compile(r"[A-Za-z0-9-]{8,64}")
ACCEPT, CORRECT = "accept", "correct"
CORRECTION_SCHEMA = pa.schema([
    pa.field("correction_id", pa.string()),  # one per decision, made by the browser
    pa.field("cell_id", pa.string()),  # the scored row's cell_id (content_sha256[:16]:box)
    pa.field("row_kind", pa.string()),  # 'field' or 'cell'
    pa.field("source_uri", pa.string()),
    pa.field("specimen_id", pa.string()),
    *(pa.field(f"box_{k}", pa.int32()) for k in ("x0", "y0", "x1", "y1")),
    pa.field("model_label", pa.string()),  # the model's pred_label
    pa.field("model_call", pa.string()),  # the row's call ('abstain' for flagged rows)
    pa.field("label", pa.string()),  # the class the reviewer says is right
    pa.field("decision", pa.string()),  # 'accept' (label == model_label) or 'correct'
    pa.field("reviewer", pa.string()),
    pa.field("reviewed_at", pa.timestamp("us", tz="UTC")),
    pa.field("model_sha256", pa.string()),  # weights of the model that made the call
])
MANIFEST_FILES = {CELL: MANIFEST_FILE, FIELD: "fields.csv"}  # what export_manifest writes


class CorrectionError(AllcoreError, ValueError):
    """A decision that cannot be recorded; the message says what to send instead."""


@dataclass(frozen=True)
class Correction:
    correction_id: str
    row: dict  # the committed row decided on (ReviewQueue.row): facts come from it, not the client
    label: str
    reviewer: str
    reviewed_at: dt.datetime

    def __post_init__(self) -> None:
        if not CORRECTION_ID.fullmatch(self.correction_id or ""):
            raise CorrectionError(f"correction_id must be 8-64 letters, digits or '-', got "
                                  f"{self.correction_id!r}")
        if self.label not in list(self.row["classes"]):
            raise CorrectionError(f"label {self.label!r} is not a class of the model that made "
                                  f"this call; choose one of {', '.join(self.row['classes'])}")
        if not self.reviewer.strip():
            raise CorrectionError("reviewer is empty: give the reviewer's name or initials")

    def table(self) -> pa.Table:
        row = self.row
        by_cell_model = row["row_kind"] == CELL and isinstance(row.get("cell_model_sha256"), str)
        return pa.Table.from_pylist([{
            "correction_id": self.correction_id, "cell_id": row["cell_id"],
            "row_kind": row["row_kind"], "source_uri": row["source_uri"],
            "specimen_id": row["specimen_id"],
            **{f"box_{k}": int(row[f"box_{k}"]) for k in ("x0", "y0", "x1", "y1")},
            "model_label": row["pred_label"], "model_call": row["call"], "label": self.label,
            "decision": ACCEPT if self.label == row["pred_label"] else CORRECT,
            "reviewer": self.reviewer.strip(), "reviewed_at": self.reviewed_at,
            "model_sha256": row["cell_model_sha256"] if by_cell_model else row["model_sha256"],
        }], schema=CORRECTION_SCHEMA)


class CorrectionStore:
    """The corrections table of one scoring output root."""

    def __init__(self, output_root: str):
        self.store = OutputStore(join(output_root, CORRECTIONS_FOLDER))

    def _record_path(self, correction_id: str) -> str:
        return posixpath.join(self.store.path, "_commits", f"{correction_id}.json")

    def append(self, correction: Correction) -> bool:
        """Record ``correction`` unless its correction_id is recorded already; True if it was new."""
        record_path = self._record_path(correction.correction_id)
        if self.store.fs.exists(record_path):
            return False
        table = correction.table()
        relative = self.store.publish(
            table, posixpath.join("corrections", f"part-{correction.correction_id}.parquet"),
            run_id=correction.correction_id)
        record = {"correction_id": correction.correction_id,
                  "committed_at": dt.datetime.now(dt.timezone.utc).isoformat(),
                  "files": [{"path": relative, "rows": table.num_rows}]}
        write_atomic(self.store.fs, record_path, json.dumps(record).encode())
        return True

    def read(self) -> pa.Table:
        """Every committed correction (files without a commit record are not read)."""
        parts = []
        for uri in self.store.committed_files():
            fs, path = filesystem(uri)
            with fs.open(path, "rb") as handle:
                parts.append(pq.read_table(handle, schema=CORRECTION_SCHEMA))
        return pa.concat_tables(parts) if parts else CORRECTION_SCHEMA.empty_table()

    def newest(self) -> pd.DataFrame:
        """The newest decision per cell_id: what training and export use."""
        frame = self.read().to_pandas()
        return frame.sort_values("reviewed_at", kind="stable").drop_duplicates("cell_id", keep="last")


def cell_crop_of(row: dict, geometry: CellCropGeometry, cell_diameter_px: float | None = None) -> Image.Image:
    """The crop of a corrected cell as a cell model is trained on it: ``geometry`` around the
    box centre at ``cell_diameter_px``, the diameter scoring cut the cell's crop at
    (``scored_crop_diameters``), so the crop has the scale the model saw. Without one (the run
    estimated the diameter field by field) the field's own estimate is taken again, as scoring
    did (on the field as read: behind a field model that masks the scale bar scoring estimated
    it on the masked field, which can move it slightly), then the box's longer side for a field
    the estimate cannot measure."""
    x0, y0, x1, y1 = (int(row[f"box_{k}"]) for k in ("x0", "y0", "x1", "y1"))
    field = decode_rgb(read_bytes(row["source_uri"]))
    diameter = cell_diameter_px or estimate_cell_diameter(field) or max(x1 - x0, y1 - y0)
    return cut_cell_crop(field, box_centre((x0, y0, x1, y1)), cell_diameter_px=diameter, geometry=geometry)


def scored_crop_diameters(output_root: str) -> dict[str, float]:
    """cell_id -> the white-cell diameter its crop was cut at: the one diameter of the scoring
    run that wrote the row (``_runs/<run_id>/summary.json``), for the cells the review app shows
    (each input's newest scoring). Cells of runs that estimated it per field are left out."""
    rows = ReviewQueue(output_root).rows()
    cells = rows[rows["row_kind"] == CELL]
    store = OutputStore(output_root)
    by_run = {run_id: (store.run_summary(run_id) or {}).get("cell_diameter_px")
              for run_id in cells["run_id"].unique()}
    return {cell_id: by_run[run_id] for cell_id, run_id in zip(cells["cell_id"], cells["run_id"])
            if by_run[run_id]}


def export_manifest(corrections: pd.DataFrame, out_dir: str, *,
                    geometry: CellCropGeometry = CellCropGeometry(),
                    crop_diameters: Mapping[str, float] | None = None) -> dict[str, str]:
    """Write training manifests (``path,label,group``, what ``jobs/train.py --data`` reads) of
    the newest decisions: ``cells.csv`` over crops cut into ``crops/`` (``cell_crop_of``, at
    each cell's ``crop_diameters`` entry: ``scored_crop_diameters`` of the output) and
    ``fields.csv`` over the source fields themselves. ``group`` is the source field's content
    hash, so a field and its cells never land in different splits. Returns {row kind: uri}."""
    written = {}
    for kind, name in MANIFEST_FILES.items():
        rows = corrections[corrections["row_kind"] == kind].to_dict("records")
        if not rows:
            continue
        entries = []
        for row in rows:
            group = row["cell_id"].split(":")[0]
            if kind == CELL:
                relative = f"crops/{group}_{'_'.join(str(int(row[f'box_{k}'])) for k in ('x0', 'y0', 'x1', 'y1'))}.png"
                write_bytes(join(out_dir, relative), png_bytes(cell_crop_of(
                    row, geometry, (crop_diameters or {}).get(row["cell_id"]))))
                entries.append((relative, row["label"], group))
            else:
                entries.append((row["source_uri"], row["label"], group))
        uri = join(out_dir, name)
        write_bytes(uri, pd.DataFrame(entries, columns=["path", "label", "group"]).to_csv(index=False).encode())
        written[kind] = uri
    return written
