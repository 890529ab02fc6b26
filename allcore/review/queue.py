"""The review queue: the committed rows of a scoring output that need review, most suspicious
first, grouped by specimen.

Rows are read only through the output's commit records (``OutputStore.committed_files``), so a
chunk being written or left by a crash never shows up. An input scored by several runs is judged
by its newest scoring only, the rule of the ``latest_predictions`` view in sql/bi_queries.sql
(the run of its newest field row, with that run's cells); a cell some reviewer has already
decided on leaves the queue.
"""

from __future__ import annotations

import json
import threading

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from allcore.imaging.files import filesystem
from allcore.scoring.store import OutputStore
from allcore.scoring.rows import CELL, FIELD, SCHEMA_METADATA_KEY
from allcore.trust.checks import BLAST_THRESHOLD

ROW_COLUMNS = ("cell_id", "row_kind", "source_uri", "specimen_id", "scored_at", "run_id", "model_sha256",
               "cell_model_sha256", "box_x0", "box_y0", "box_x1", "box_y1", "pred_label",
               "confidence", "blast_probability", "call", "needs_review", "review_reason",
               "ood_score", "status")
NO_SPECIMEN = "(no specimen)"  # specimen_id of rows whose uri the specimen pattern did not match


def _model_facts(metadata: dict, row_kind: str) -> tuple[list[str], float]:
    """(classes, OOD threshold) of the model that made a row's call: the cell model's on cell
    rows of --cell-model runs, else the field model's (NaN threshold without a trust section)."""
    model = metadata["model"]
    maker = model.get("cell_model") if row_kind == CELL and model.get("cell_model") else model
    threshold = ((maker.get("trust") or {}).get("ood") or {}).get("threshold", np.nan)
    return list(maker["classes"]), float(threshold)


def read_rows(uri: str) -> pd.DataFrame:
    """``ROW_COLUMNS`` of one committed file (columns an older schema lacks are null), plus the
    classes a reviewer may choose from and the OOD threshold of the model behind each row."""
    fs, path = filesystem(uri)
    with fs.open(path, "rb") as handle:
        parquet = pq.ParquetFile(handle)
        metadata = json.loads(parquet.schema_arrow.metadata[SCHEMA_METADATA_KEY])
        present = [c for c in ROW_COLUMNS if c in parquet.schema_arrow.names]
        frame = parquet.read(columns=present).to_pandas()
    for column in set(ROW_COLUMNS) - set(present):
        frame[column] = None
    frame["row_kind"] = frame["row_kind"].fillna(FIELD)  # files older than row_kind: fields only
    facts = {kind: _model_facts(metadata, kind) for kind in frame["row_kind"].unique()}
    frame["classes"] = [facts[kind][0] for kind in frame["row_kind"]]
    frame["ood_threshold"] = [facts[kind][1] for kind in frame["row_kind"]]
    return frame


def latest(rows: pd.DataFrame) -> pd.DataFrame:
    """The ok rows of each input's newest scoring: the run of its newest field row (by
    ``scored_at``, then ``run_id``) with that run's cell rows, as the ``latest_predictions`` view
    keeps them. A cell of an older run is gone once a newer run scored its field, even when that
    run found no cells or could not read the file (its error row is the newest, and not ok)."""
    newest = (rows[rows["row_kind"] == FIELD].sort_values(["scored_at", "run_id"], kind="stable")
              .drop_duplicates("source_uri", keep="last")[["source_uri", "run_id"]])
    kept = rows.merge(newest, on=["source_uri", "run_id"])
    return kept[kept["status"] == "ok"]


def most_suspicious_first(rows: pd.DataFrame) -> pd.DataFrame:
    """``rows`` ordered for a reviewer: furthest outside the model's training distribution first
    (OOD score over the threshold of the model that made the call, so field and cell models'
    scales compare), then, among rows flagged by QC alone, the most undecided (blast probability
    nearest ``BLAST_THRESHOLD``). Adds ``ood_ratio`` and ``margin``."""
    rows = rows.assign(
        ood_ratio=(rows["ood_score"].astype(float) / rows["ood_threshold"]).fillna(0.0),
        margin=(rows["blast_probability"].astype(float) - BLAST_THRESHOLD).abs().fillna(np.inf))
    return rows.sort_values(["ood_ratio", "margin", "cell_id"], ascending=[False, True, True],
                            kind="stable")


class ReviewQueue:
    """The flagged rows of one output root. Committed files are read once each and kept (only
    ``ROW_COLUMNS``), so a long-running app reads
    just the chunks committed since the last request."""

    def __init__(self, output_root: str):
        self.store = OutputStore(output_root)
        self._files: dict[str, pd.DataFrame] = {}
        self._lock = threading.Lock()

    def rows(self) -> pd.DataFrame:
        """The ok rows of every input's newest scoring (``latest``; one file read per new commit)."""
        with self._lock:
            for uri in self.store.committed_files():
                if uri not in self._files:
                    self._files[uri] = read_rows(uri)
            frames = [f for f in self._files.values() if len(f)]
        if not frames:
            return pd.DataFrame(columns=[*ROW_COLUMNS, "classes", "ood_threshold"])
        return latest(pd.concat(frames, ignore_index=True))

    def row(self, cell_id: str) -> dict:
        """The newest committed row of ``cell_id``, or KeyError."""
        rows = self.rows()
        match = rows[rows["cell_id"] == cell_id]
        if match.empty:
            raise KeyError(f"no committed row has cell_id {cell_id!r}; reload the queue")
        return match.iloc[0].to_dict()

    def pending(self, reviewed: set[str], specimen: str | None = None) -> pd.DataFrame:
        """Rows that need review and no reviewer has decided yet, most suspicious first; only
        ``specimen``'s when given (``NO_SPECIMEN`` for rows without one)."""
        rows = self.rows()
        rows = rows[rows["needs_review"].fillna(False).astype(bool) & ~rows["cell_id"].isin(reviewed)]
        rows = rows.assign(specimen_id=rows["specimen_id"].fillna(NO_SPECIMEN))
        if specimen is not None:
            rows = rows[rows["specimen_id"] == specimen]
        return most_suspicious_first(rows)

    def specimens(self, reviewed: set[str]) -> list[dict]:
        """Per specimen with pending rows: how many fields and cells wait, most first."""
        pending = self.pending(reviewed)
        counts = pending.groupby("specimen_id")["row_kind"].value_counts().unstack(fill_value=0)
        out = [{"specimen_id": name, "fields": int(row.get(FIELD, 0)), "cells": int(row.get(CELL, 0))}
               for name, row in counts.iterrows()]
        return sorted(out, key=lambda s: (-(s["fields"] + s["cells"]), s["specimen_id"]))


def box_of(row: dict) -> tuple[int, int, int, int]:
    return tuple(int(row[f"box_{k}"]) for k in ("x0", "y0", "x1", "y1"))


def queue_item(row: dict) -> dict:
    """What the browser shows of one pending row (JSON-ready)."""
    def number(value):
        return None if value is None or pd.isna(value) else float(value)
    return {"cell_id": row["cell_id"], "row_kind": row["row_kind"], "source_uri": row["source_uri"],
            "specimen_id": row["specimen_id"], "box": list(box_of(row)),
            "pred_label": row["pred_label"], "blast_probability": number(row["blast_probability"]),
            "call": row["call"], "review_reason": row["review_reason"],
            "ood_score": number(row["ood_score"]), "ood_ratio": number(row.get("ood_ratio")),
            "classes": list(row["classes"])}

