"""Scored rows and reviewers' corrections as GeoJSON, one FeatureCollection per image, the way
QuPath imports objects: pixel coordinates of the original image (x right, y down), each box a
closed polygon, ``properties.objectType`` 'annotation' for the field row (the whole image) and
'detection' for cells, ``properties.classification`` {name, color} with the reviewer's label
where there is one (else the model's), numbers under ``properties.measurements``."""

from __future__ import annotations

import json
import math
import posixpath

import pandas as pd

from allcore.imaging.files import join, write_bytes
from allcore.data.labels import LABEL_SETS
from allcore.imaging.overlay import ABSTAIN_COLOUR, BLAST_COLOUR, BOX_COLOUR
from allcore.scoring.rows import FIELD

MEASUREMENTS = ("blast_probability", "confidence", "ood_score")
# A reviewer's label is coloured as a blast when some label set calls it one: the exported rows
# do not name their label set, and no two label sets use one class name in opposite senses.
BLAST_CLASSES = frozenset(c for labels in LABEL_SETS.values() for c in labels.blast_classes)


def box_polygon(x0: int, y0: int, x1: int, y1: int) -> dict:
    """A box as a GeoJSON Polygon: one exterior ring, counter-clockwise in y-up terms as RFC 7946
    asks (clockwise on screen), closed (last point equals the first)."""
    ring = [[x0, y0], [x0, y1], [x1, y1], [x1, y0], [x0, y0]]
    return {"type": "Polygon", "coordinates": [ring]}


def _colour(call: str | None, corrected: str | None) -> list[int]:
    if corrected is not None:
        return list(BLAST_COLOUR if corrected in BLAST_CLASSES else BOX_COLOUR)
    if call == "abstain":
        return list(ABSTAIN_COLOUR)
    return list(BLAST_COLOUR if call == "blast" else BOX_COLOUR)


def feature(row: dict, correction: dict | None) -> dict:
    label = correction["label"] if correction else row["pred_label"]
    properties = {
        "objectType": "annotation" if row["row_kind"] == FIELD else "detection",
        "classification": {"name": label, "color": _colour(row["call"], correction and label)},
        "measurements": {k: float(row[k]) for k in MEASUREMENTS
                         if row.get(k) is not None and not math.isnan(float(row[k]))},
        "cell_id": row["cell_id"], "row_kind": row["row_kind"], "model_label": row["pred_label"],
        "call": row["call"], "needs_review": None if pd.isna(row["needs_review"]) else bool(row["needs_review"]),
        "review_reason": row["review_reason"], "model_sha256": row["model_sha256"],
    }
    if correction:
        properties.update(reviewer=correction["reviewer"], decision=correction["decision"],
                          reviewed_at=pd.Timestamp(correction["reviewed_at"]).isoformat())
    box = (int(row[f"box_{k}"]) for k in ("x0", "y0", "x1", "y1"))
    return {"type": "Feature", "id": row["cell_id"], "geometry": box_polygon(*box),
            "properties": properties}


def feature_collections(rows: pd.DataFrame, corrections: pd.DataFrame) -> dict[str, dict]:
    """{source_uri: FeatureCollection} of ``rows`` (the newest row per cell_id), each row's
    classification replaced by its newest correction where there is one."""
    decided = {r["cell_id"]: r for r in corrections.to_dict("records")}
    out: dict[str, dict] = {}
    for uri, image_rows in rows.groupby("source_uri", sort=True):
        ordered = image_rows.sort_values(["row_kind", "box_y0", "box_x0"], ascending=[False, True, True])
        out[uri] = {"type": "FeatureCollection", "features": [
            feature(r, decided.get(r["cell_id"])) for r in ordered.to_dict("records")]}
    return out


def write_feature_collections(collections: dict[str, dict], out_dir: str) -> list[str]:
    """One ``<image name>-<content hash>.geojson`` per image under ``out_dir`` (the hash keeps
    two images of the same name apart); returns their uris."""
    written = []
    for uri, collection in collections.items():
        stem = posixpath.splitext(posixpath.basename(uri.replace("\\", "/")))[0]
        sha = collection["features"][0]["id"].split(":")[0] if collection["features"] else "empty"
        target = join(out_dir, f"{stem}-{sha}.geojson")
        write_bytes(target, json.dumps(collection, indent=1).encode())
        written.append(target)
    return written


def slide_feature_collection(cells: pd.DataFrame) -> dict:
    """A slide's cells (its committed cell rows) as the FeatureCollection QuPath imports onto the
    slide: one 'detection' per cell in level-0 slide pixels, classified by the model's label
    (coloured by ``call``), with ``measurements`` a map of the class probabilities the row has
    (``prob_<class>``; the cell model's blast probability), confidence, OOD score and the review
    flag as 0/1 (QuPath measurements are numbers)."""
    features = []
    for row in cells.sort_values(["box_y0", "box_x0"]).to_dict("records"):
        item = feature(row, None)
        numbers = {k: float(v) for k, v in row.items()
                   if k.startswith("prob_") and v is not None and not pd.isna(v)}
        if row.get("needs_review") is not None and not pd.isna(row["needs_review"]):
            numbers["needs_review"] = float(bool(row["needs_review"]))
        item["properties"]["measurements"].update(numbers)
        item["properties"]["slide_id"] = row["slide_id"]
        features.append(item)
    return {"type": "FeatureCollection", "features": features}
