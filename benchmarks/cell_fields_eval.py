"""Field-level check of per-cell scoring against the ALL_IDB1 blast centroids.

    python jobs/score.py --model FIELD_MODEL --cell-model CELL_MODEL --per-cell \
        --input ../shared/data/all-idb/ALL_IDB1/im --output /tmp/idb1_scored
    python -m benchmarks.cell_fields_eval --data ../shared/data/all-idb --scored /tmp/idb1_scored \
        [--oof cell_blast.json --crops /tmp/cellclf/crops/cells.csv] [--out fields.json]

Per field (ALL_IDB1, one centroid per annotated blast, file name ``ImNNN_Y``: Y = 1 leukaemic):

- predicted blast count (cell rows called blast) against the annotated count: mean absolute error;
- leukaemic vs healthy fields separated by the field's blast fraction (blast cells / cells): AUROC;
- cells in healthy (Y = 0) fields called blast: share (target <= 5%);
- annotated blasts whose centroid lies in a found cell's box called blast: share (target >= 90%),
  beside the share that lies in any found box (what detection alone allows).

``--scored`` reads a scoring run's committed rows, so it measures the pipeline as a lab runs it,
but the cell model it names was trained on crops of these same fields: those numbers are
**in-sample**. ``--oof`` gives the honest counterpart: the out-of-fold crop scores of
``benchmarks/cell_classifier_eval.py --out`` (every crop scored by the fold model that never saw
its field group) aggregated per source field from its crop manifest (``cells.csv``). Its cells are
the training crops (one per annotated blast plus found not-blast cells), not the cells scoring
finds. 95% intervals: percentile bootstrap over fields (cells of one field are not independent).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
from sklearn.metrics import roc_auc_score

from allcore.scoring.store import OutputStore

BOOTSTRAP = 2000


def centroids(data: Path, field: str) -> np.ndarray:
    """(x, y) of the annotated blasts of one ALL_IDB1 field; none for a healthy field."""
    path = data / "ALL_IDB1" / "xyc" / f"{field}.xyc"
    if not path.is_file() or not path.read_text().strip():
        return np.zeros((0, 2))
    return np.loadtxt(path, ndmin=2)[:, :2]


def field_label(field: str) -> int:
    return int(field.rsplit("_", 1)[1])


def scored_fields(data: Path, scored: str) -> pd.DataFrame:
    """One row per scored field: cells, blast cells, annotated blasts, and centroids found in
    any box / in a box called blast, from the committed rows of a --per-cell run."""
    rows = pd.concat([pq.read_table(f).to_pandas() for f in OutputStore(scored).committed_files()])
    rows["field"] = rows["source_uri"].map(lambda u: Path(u).stem)
    rows = rows[rows["status"] == "ok"]
    out = []
    for field, group in rows.groupby("field"):
        cells = group[group["row_kind"] == "cell"]
        boxes = cells[["box_x0", "box_y0", "box_x1", "box_y1"]].to_numpy()
        blast = cells["is_blast"].fillna(False).to_numpy(bool)
        points = centroids(data, field)
        inside = ((points[:, None, 0] >= boxes[None, :, 0]) & (points[:, None, 0] < boxes[None, :, 2])
                  & (points[:, None, 1] >= boxes[None, :, 1]) & (points[:, None, 1] < boxes[None, :, 3]))
        out.append({"field": field, "label": field_label(field), "cells": len(cells),
                    "blast_cells": int(blast.sum()), "annotated": len(points),
                    "annotated_in_cell": int(inside.any(axis=1).sum()),
                    "annotated_in_blast_cell": int(inside[:, blast].any(axis=1).sum())})
    return pd.DataFrame(out)


def oof_fields(data: Path, oof_json: Path, crops_csv: Path) -> pd.DataFrame:
    """The same per-field table from out-of-fold crop scores: each crop counts for every ALL_IDB1
    field it comes from; the field's crops labelled blast are its annotated blasts (one per
    centroid, or the ALL_IDB2 crop showing it), and every one is a cell by construction, so
    ``annotated_in_cell`` is not measured here (NaN)."""
    oof = json.loads(oof_json.read_text())["oof"]
    manifest = pd.read_csv(crops_csv)
    root = crops_csv.parent
    called = {str(Path(p).resolve().relative_to(root.resolve())): s >= 0.5
              for p, s in zip(oof["path"], oof["blast_probability"])}
    manifest["called"] = manifest["path"].map(called)
    missing = manifest["called"].isna().sum()
    if missing:
        raise SystemExit(f"{missing} crops of {crops_csv} have no out-of-fold score in {oof_json}")
    manifest["source_fields"] = manifest["source_fields"].fillna("").str.split("|")
    crops = manifest.explode("source_fields")
    crops = crops[crops["source_fields"] != ""]
    out = []
    for field in sorted(p.stem for p in (data / "ALL_IDB1" / "im").iterdir()):
        group = crops[crops["source_fields"] == field]
        blasts = group[group["label"] == "blast"]
        out.append({"field": field, "label": field_label(field), "cells": len(group),
                    "blast_cells": int(group["called"].sum()), "annotated": len(blasts),
                    "annotated_in_cell": np.nan,
                    "annotated_in_blast_cell": int(blasts["called"].sum())})
    return pd.DataFrame(out)


def metrics(fields: pd.DataFrame) -> dict:
    """The four field-level numbers of one per-field table."""
    fraction = np.where(fields["cells"] > 0, fields["blast_cells"] / fields["cells"].clip(lower=1), 0.0)
    healthy = fields[fields["label"] == 0]
    both = fields["label"].nunique() == 2
    return {
        "fields": len(fields), "cells": int(fields["cells"].sum()),
        "count_mae": float((fields["blast_cells"] - fields["annotated"]).abs().mean()),
        "field_auroc": float(roc_auc_score(fields["label"], fraction)) if both else float("nan"),
        "healthy_cells_called_blast": float(healthy["blast_cells"].sum() / max(healthy["cells"].sum(), 1)),
        "blasts_in_blast_cell": float(fields["annotated_in_blast_cell"].sum()
                                      / max(fields["annotated"].sum(), 1)),
        "blasts_in_any_cell": float(fields["annotated_in_cell"].sum(skipna=False)
                                    / max(fields["annotated"].sum(), 1)),
    }


def with_intervals(fields: pd.DataFrame, seed: int = 0) -> dict:
    """``metrics`` and a 95% percentile bootstrap interval per number (fields resampled within
    each label, so every resample has leukaemic and healthy fields)."""
    point = metrics(fields)
    rng = np.random.default_rng(seed)
    groups = [g.reset_index(drop=True) for _, g in fields.groupby("label")]
    draws = [metrics(pd.concat([g.iloc[rng.integers(0, len(g), len(g))] for g in groups]))
             for _ in range(BOOTSTRAP)]
    return {k: v if k in ("fields", "cells") else (v, np.nan, np.nan) if np.isnan(v) else
            (v, *np.nanpercentile([d[k] for d in draws], [2.5, 97.5]).tolist())
            for k, v in point.items()}


def table(results: dict[str, dict]) -> str:
    names = {"count_mae": "blast count MAE per field", "field_auroc": "field AUROC (blast fraction)",
             "healthy_cells_called_blast": "healthy-field cells called blast (target <= 0.05)",
             "blasts_in_blast_cell": "annotated blasts in a cell called blast (target >= 0.90)",
             "blasts_in_any_cell": "annotated blasts in any found cell"}
    lines = ["| measure | " + " | ".join(results) + " |", "|---|" + "---|" * len(results)]
    for key, name in names.items():
        lines.append(f"| {name} | " + " | ".join("n/a" if np.isnan(r[key][0]) else
                                                 f"{r[key][0]:.3f} ({r[key][1]:.3f}-{r[key][2]:.3f})"
                                                 for r in results.values()) + " |")
    lines.append("| fields / cells | " + " | ".join(f"{r['fields']} / {r['cells']}" for r in results.values()) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="ALL-IDB root (ALL_IDB1/im, ALL_IDB1/xyc)")
    parser.add_argument("--scored", help="output root of a jobs/score.py --per-cell run on ALL_IDB1/im")
    parser.add_argument("--oof", type=Path, help="benchmarks/cell_classifier_eval.py --out JSON")
    parser.add_argument("--crops", type=Path, help="the cells.csv of the crops that JSON scored")
    parser.add_argument("--out", type=Path, help="write the per-field tables and numbers as JSON")
    args = parser.parse_args(argv)
    if not args.scored and not args.oof:
        parser.error("give --scored and/or --oof")
    if args.oof and not args.crops:
        parser.error("--oof needs --crops")

    tables = {}
    if args.scored:
        tables["scoring run (cell model in-sample)"] = scored_fields(args.data, args.scored)
    if args.oof:
        tables["out-of-fold crops"] = oof_fields(args.data, args.oof, args.crops)
    results = {name: with_intervals(fields) for name, fields in tables.items()}
    print(table(results))
    if args.out:
        args.out.write_text(json.dumps({"results": results, "fields": {
            name: fields.to_dict(orient="records") for name, fields in tables.items()}}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
