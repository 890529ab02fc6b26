"""Which model should classify a cell crop? Field model on the whole field vs on each cell.

    python -m benchmarks.cell_model_choice --model /tmp/real/runs/s000-128-e5/model \\
        --split-manifest /tmp/real/runs/s000-128-e5/split_manifest.csv

On the test split of the model's own leakage-safe split manifest (never used in training or model
selection) it compares, per field:
  (B) field:  the field model on the whole field (what whole-image scoring reports);
  (A) cells:  the same model on every crop ``--per-cell`` scoring makes (``prepare_batch`` with a cell finder),
              aggregated per field as the mean of the cell probabilities, and as a majority vote;
              fields without cells fall back to (B) and are counted.
Cell labels are inherited from the field (weak labels), so the per-cell agreement with the field
label is reported too: it is an upper bound on nothing, only a hint of how far crops are from the
field images the model was trained on. Results go in docs/CELLS.md ("Which model classifies a cell").
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
from sklearn.metrics import accuracy_score, f1_score


from allcore.models.artifact import read_card
from allcore.imaging.cells import CellFinderConfig
from allcore.scoring.predict import Predictor
from allcore.scoring.prepare import prepare_batch, prepare_kwargs
from allcore.data.splits import SplitManifest


def score_split(model: str, paths: list[str], batch_size: int = 16) -> dict[str, np.ndarray]:
    """Field and cell rows of ``paths`` exactly as ``--per-cell`` scoring produces them."""
    kwargs = prepare_kwargs(read_card(model), cell_finder=CellFinderConfig())
    predictor = Predictor(model)
    parts = []
    for start in range(0, len(paths), batch_size):
        chunk = np.array(paths[start:start + batch_size], dtype=object)
        batch = {"source_uri": chunk, "source_size": np.zeros(len(chunk), np.int64),
                 "source_mtime": np.array([""] * len(chunk), dtype=object)}
        parts.append(predictor(prepare_batch(batch, **kwargs)))
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def field_predictions(rows: dict[str, np.ndarray], paths: list[str],
                      classes: list[str]) -> dict[str, list[str]]:
    """Per field: (B) the field row's label, (A) mean of its cells' probabilities, majority vote."""
    probs = np.stack([rows[f"prob_{c}"] for c in classes], axis=1)
    by_uri: dict[str, list[int]] = {}
    for i, uri in enumerate(rows["source_uri"]):
        by_uri.setdefault(uri, []).append(i)
    out: dict[str, list[str]] = {"field": [], "cells_mean": [], "cells_vote": []}
    for path in paths:
        index = by_uri[path]
        field = next(i for i in index if rows["row_kind"][i] == "field")
        cells = [i for i in index if rows["row_kind"][i] == "cell"]
        field_label = classes[int(np.argmax(probs[field]))]
        out["field"].append(field_label)
        if not cells:
            out["cells_mean"].append(field_label)
            out["cells_vote"].append(field_label)
            continue
        out["cells_mean"].append(classes[int(np.argmax(probs[cells].mean(axis=0)))])
        votes = np.bincount(np.argmax(probs[cells], axis=1), minlength=len(classes))
        out["cells_vote"].append(classes[int(np.argmax(votes))])
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="field model artifact")
    parser.add_argument("--split-manifest", required=True, help="the model's split_manifest.csv")
    parser.add_argument("--split", default="test")
    args = parser.parse_args(argv)

    samples = SplitManifest.read(args.split_manifest).subset(args.split)
    if not samples:
        raise SystemExit(f"split {args.split!r} of {args.split_manifest} is empty")
    classes = list(read_card(args.model).classes)
    paths, truth = [s.path for s in samples], [s.label for s in samples]
    started = time.perf_counter()
    rows = score_split(args.model, paths)
    seconds = time.perf_counter() - started
    if (rows["status"] != "ok").any():
        raise SystemExit(f"{int((rows['status'] != 'ok').sum())} test images failed to decode")
    predictions = field_predictions(rows, paths, classes)

    is_cell = rows["row_kind"] == "cell"
    cells_per_field = rows["cell_count"][rows["row_kind"] == "field"]
    label_of = dict(zip(paths, truth))
    cell_truth = [label_of[u] for u in rows["source_uri"][is_cell]]
    print(f"{args.split} split: {len(paths)} fields, {int(is_cell.sum())} cells "
          f"(median {np.median(cells_per_field):.0f} per field, {int((cells_per_field == 0).sum())} "
          f"fields without cells), {seconds:.0f} s")
    print("| method | accuracy | macro-F1 |\n|---|---|---|")
    for name, predicted in predictions.items():
        print(f"| {name} | {accuracy_score(truth, predicted):.4f} | "
              f"{f1_score(truth, predicted, average='macro'):.4f} |")
    print(f"| single cell vs inherited field label | "
          f"{accuracy_score(cell_truth, rows['pred_label'][is_cell]):.4f} | "
          f"{f1_score(cell_truth, list(rows['pred_label'][is_cell]), average='macro'):.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
