"""Per-cell scoring (``--per-cell``): one row per detected white cell plus one row per field, and
the specimen summary table built from those rows. No Ray here; ``pipelines/score.py`` wires it.

Why per cell: a field label says "this smear has blasts", not which cell is one. Classifying each
crop found by ``allcore.cells.find_cells`` gives a blast count and a blast fraction per specimen,
the quantity a haematologist reports, and lets a person review the most suspicious cells. The
crops are classified with the field model (docs/CELLS.md: "Which model classifies a cell"),
so cell labels are weak labels inherited from the field.

One input becomes 1 + K rows; every input still has exactly one ``row_kind='field'`` row (ok or
error), which is what the accounting and the ledger count.
"""

from __future__ import annotations

import json
import math
import posixpath
import uuid
from collections.abc import Iterable, Sequence

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from allcore.cells import CellFinderConfig, cell_crop, find_cells
from allcore.inference import load_image
from allcore.io import join
from allcore.scoring import CELL, ERROR, FIELD, OK, SCHEMA_METADATA_KEY, OutputStore
from allcore.transforms import DataConfig, mask_scale_bar, preprocess_array

NO_CELLS_NOTE = "no cells found"
TOP_SUSPICIOUS = 5
# The classes that count as blasts (malignant) in each label set of allcore.labels.
BLAST_CLASSES: dict[str, tuple[str, ...]] = {
    "all4": ("Early", "Pre", "Pro"), "binary": ("malignant",), "all_hem": ("ALL",)}
_INPUT_KEY = ("source_uri", "source_size", "source_mtime")


def blast_classes(label_set: str, classes: Sequence[str]) -> tuple[str, ...]:
    """Blast classes of a model card's label set, checked against the card's class list."""
    if label_set not in BLAST_CLASSES:
        raise ValueError(f"label set {label_set!r} has no known blast classes; per-cell "
                         f"summaries support {sorted(BLAST_CLASSES)}: add it to "
                         "allcore.percell.BLAST_CLASSES")
    missing = set(BLAST_CLASSES[label_set]) - set(classes)
    if missing:
        raise ValueError(f"model card classes {list(classes)} lack the blast classes "
                         f"{sorted(missing)} of label set {label_set!r}; the card is inconsistent")
    return BLAST_CLASSES[label_set]


def wilson_interval(successes: int, trials: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval (95% by default) for a proportion: unlike the normal approximation
    it stays inside [0, 1] and is sensible for the few cells a specimen may have."""
    if trials < 0 or not 0 <= successes <= trials:
        raise ValueError(f"need 0 <= successes <= trials, got {successes}/{trials}")
    if trials == 0:
        return math.nan, math.nan
    p = successes / trials
    centre = (p + z * z / (2 * trials)) / (1 + z * z / trials)
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / (1 + z * z / trials)
    return max(0.0, centre - half), min(1.0, centre + half)


def prepare_cells_batch(batch: dict[str, np.ndarray], *, data_config: dict,
                        mask_corner: bool = False, max_pixels: int = 40_000_000,
                        finder: CellFinderConfig = CellFinderConfig()) -> dict[str, np.ndarray]:
    """``prepare_batch`` for ``--per-cell``: each input gives its field row (the whole field,
    preprocessed as the card says; an error row for a bad input) followed by one row per white
    cell, whose pixels are the square crop around the cell, preprocessed the same way.

    With ``mask_corner`` the scale bar is painted out before the cells are searched, so its label
    is neither found as a cell nor seen in a crop. Missing numbers are NaN / -1 and missing text
    is "" (Ray Data cannot re-batch an all-None column); ``build_output_table`` makes them null.
    """
    cfg = DataConfig.from_dict(data_config)
    rows: list[dict] = []
    for i, uri in enumerate(batch["source_uri"]):
        source = {k: batch[k][i] for k in _INPUT_KEY}
        sha, img, error = load_image(str(uri), max_pixels=max_pixels)
        field_row = {**source, "content_sha256": sha or "", "row_kind": FIELD, "status": OK,
                     "error": "", "note": "", "cell_count": -1, "cell_area": -1,
                     "circularity": math.nan, "nucleus_cell_ratio": math.nan,
                     "box": (0, 0, 0, 0), "pixels": None}
        if img is None:
            rows.append({**field_row, "status": ERROR, "error": error})
            continue
        field_row["pixels"] = preprocess_array(img, cfg, mask_corner=mask_corner)
        searched = mask_scale_bar(img) if mask_corner else img
        cells = find_cells(searched, finder)
        rows.append({**field_row, "box": (0, 0, *img.size), "cell_count": len(cells),
                     "note": "" if cells else NO_CELLS_NOTE})
        rows += [{**field_row, "row_kind": CELL, "box": cell.box, "cell_count": -1,
                  "cell_area": cell.area, "circularity": cell.circularity,
                  "nucleus_cell_ratio": (math.nan if cell.nucleus_cell_ratio is None
                                         else cell.nucleus_cell_ratio),
                  "pixels": preprocess_array(cell_crop(searched, cell, finder.crop_pad_fraction), cfg)}
                 for cell in cells]
    blank = np.zeros((3, cfg.input_size, cfg.input_size), np.float32)
    out = {k: np.array([r[k] for r in rows], dtype=object) for k in
           (*_INPUT_KEY, "content_sha256", "row_kind", "status", "error", "note")}
    out["source_size"] = out["source_size"].astype(np.int64)
    out.update({k: np.array([r[k] for r in rows], np.int32) for k in ("cell_count", "cell_area")})
    out.update({k: np.array([r[k] for r in rows], np.float32)
                for k in ("circularity", "nucleus_cell_ratio")})
    out.update({f"box_{k}": np.array([r["box"][j] for r in rows], np.int32)
                for j, k in enumerate(("x0", "y0", "x1", "y1"))})
    out["width"], out["height"] = out["box_x1"].copy(), out["box_y1"].copy()
    out["pixels"] = np.stack([blank if r["pixels"] is None else r["pixels"] for r in rows]) \
        if rows else np.zeros((0, *blank.shape), np.float32)
    return out


class CompleteInputs:
    """Holds scored rows until every row of their input has arrived, so a commit never splits an
    input's field row from its cell rows (Ray Data may reorder and re-batch rows of one input).
    Complete means: the field row, plus as many cell rows as its ``cell_count`` says (an error
    row, or a whole-image row, needs none)."""

    def __init__(self) -> None:
        self._pending: list[pa.Table] = []

    @property
    def pending_rows(self) -> int:
        return sum(t.num_rows for t in self._pending)

    def add(self, table: pa.Table) -> pa.Table:
        """Rows of every input now complete, in arrival order; the rest stay pending."""
        if "row_kind" not in table.column_names:  # whole-image batches: one row per input
            return table
        rows = pa.concat_tables([*self._pending, table]) if self._pending else table
        keys = list(zip(*(rows[k].to_pylist() for k in _INPUT_KEY)))
        kinds, counts = rows["row_kind"].to_pylist(), rows["cell_count"].to_pylist()
        expected: dict[tuple, int] = {}
        seen: dict[tuple, int] = {}
        for key, kind, count in zip(keys, kinds, counts):
            if kind == FIELD:
                expected[key] = max(int(count), 0)
            else:
                seen[key] = seen.get(key, 0) + 1
        done = np.array([key in expected and seen.get(key, 0) == expected[key] for key in keys],
                        dtype=bool)
        self._pending = [rows.filter(pa.array(~done))] if not done.all() else []
        return rows.filter(pa.array(done))


# ---------------------------------------------------------------- specimen summary

SUMMARY_DESCRIPTIONS = {
    "specimen_id": "specimen (as in the cell table)",
    "model_sha256": "model whose predictions are summarised",
    "run_id": "run that wrote this summary",
    "fields_scored": "fields (inputs) of the specimen scored ok",
    "fields_with_errors": "inputs that could not be scored",
    "fields_without_cells": "fields scored ok in which no white cell was found",
    "cells_total": "white cells classified",
    "cells_<class>": "cells predicted as <class>",
    "blast_cells": "cells predicted as a blast class",
    "blast_fraction": "blast_cells / cells_total (null without cells)",
    "blast_ci_low": "95% Wilson interval, lower bound",
    "blast_ci_high": "95% Wilson interval, upper bound",
    "top_suspicious_cells": f"cell_id of the {TOP_SUSPICIOUS} cells with the highest "
                            "blast_probability, for review",
}


def specimen_summary(rows: pa.Table, classes: Sequence[str]) -> pa.Table:
    """One row per specimen from the rows of a per-cell table (field and cell rows of one model,
    latest scoring per input). Counts are a plain group-by, so they can be checked with SQL."""
    con = duckdb.connect()
    con.register("scored", rows)
    per_class = ", ".join(f"count(*) FILTER (row_kind = 'cell' AND pred_label = '{c}')::BIGINT "
                          f"AS \"cells_{c}\"" for c in classes)
    table = con.sql(f"""
        SELECT specimen_id, any_value(model_sha256) AS model_sha256,
               count(*) FILTER (row_kind = 'field' AND status = 'ok')::BIGINT AS fields_scored,
               count(*) FILTER (row_kind = 'field' AND status = 'error')::BIGINT
                   AS fields_with_errors,
               count(*) FILTER (row_kind = 'field' AND status = 'ok' AND cell_count = 0)::BIGINT
                   AS fields_without_cells,
               count(*) FILTER (row_kind = 'cell')::BIGINT AS cells_total, {per_class},
               count(*) FILTER (row_kind = 'cell' AND is_blast)::BIGINT AS blast_cells,
               coalesce(list(cell_id ORDER BY blast_probability DESC, cell_id)
                        FILTER (row_kind = 'cell')[1:{TOP_SUSPICIOUS}], [])
                   AS top_suspicious_cells
        FROM scored GROUP BY specimen_id ORDER BY specimen_id""").to_arrow_table()
    blast, total = table["blast_cells"].to_pylist(), table["cells_total"].to_pylist()
    intervals = [wilson_interval(b, n) for b, n in zip(blast, total)]
    extra = {"blast_fraction": [b / n if n else None for b, n in zip(blast, total)],
             "blast_ci_low": [None if n == 0 else low for (low, _), n in zip(intervals, total)],
             "blast_ci_high": [None if n == 0 else high for (_, high), n in zip(intervals, total)]}
    at = table.column_names.index("top_suspicious_cells")
    for offset, (name, values) in enumerate(extra.items()):
        table = table.add_column(at + offset, pa.field(name, pa.float64()), pa.array(values))
    return table


def latest_rows(store: OutputStore, model_sha256: str, specimens: Iterable[str]) -> pa.Table:
    """Committed rows of ``model_sha256`` for ``specimens``, newest scoring per input: what the
    summary describes, so a resumed or repeated run summarises the same cells."""
    files = store.committed_files()
    specimens = sorted(set(specimens))
    if not files or not specimens:
        return pa.table({})
    con = duckdb.connect()
    if store.root.startswith("s3://"):
        con.register_filesystem(store.fs)
    con.execute("CREATE TABLE wanted (specimen_id VARCHAR)")
    con.executemany("INSERT INTO wanted VALUES (?)", [[s] for s in specimens])
    return con.sql("""
        WITH rows AS (
            SELECT * FROM read_parquet(?, union_by_name = true)
            WHERE model_sha256 = ? AND specimen_id IN (SELECT specimen_id FROM wanted)),
        latest AS (
            SELECT source_uri, run_id FROM rows WHERE coalesce(row_kind, 'field') = 'field'
            QUALIFY row_number() OVER (PARTITION BY source_uri
                                       ORDER BY scored_at DESC, run_id DESC) = 1)
        SELECT rows.* FROM rows JOIN latest USING (source_uri, run_id)""",
                   params=[files, model_sha256]).to_arrow_table()


def write_specimen_summary(store: OutputStore, *, run_id: str, model_sha256: str,
                           classes: Sequence[str], specimens: Iterable[str],
                           scored_date: str) -> str | None:
    """Write ``<out>/specimen_summary/scored_date=<date>/part-<run_id>.parquet`` for the
    specimens this run scored, after all its chunks are committed. Derived data: staged, then
    moved into place (readers never see a partial file); a crash before it loses only this file,
    and any later run over the specimen writes it again. Returns the file's uri."""
    rows = latest_rows(store, model_sha256, specimens)
    if rows.num_rows == 0:
        return None
    table = specimen_summary(rows, classes)
    table = table.add_column(2, "run_id", pa.array([run_id] * table.num_rows, pa.string()))
    descriptions = {**{k: v for k, v in SUMMARY_DESCRIPTIONS.items() if k != "cells_<class>"},
                    **{f"cells_{c}": f"cells predicted as {c}" for c in classes}}
    table = table.replace_schema_metadata(
        {SCHEMA_METADATA_KEY: json.dumps({"columns": descriptions}).encode()})
    name = f"part-{run_id}.parquet"
    staged = posixpath.join(store.path, "_staging", run_id, f"{uuid.uuid4().hex[:8]}-{name}")
    final = posixpath.join(store.path, "specimen_summary", f"scored_date={scored_date}", name)
    store.fs.makedirs(posixpath.dirname(staged), exist_ok=True)
    with store.fs.open(staged, "wb") as handle:
        pq.write_table(table, handle)
    store.fs.makedirs(posixpath.dirname(final), exist_ok=True)
    store.fs.mv(staged, final)
    return join(store.root, posixpath.relpath(final, store.path))
