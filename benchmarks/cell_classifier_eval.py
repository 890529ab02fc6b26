"""Cell classifier: grouped cross-validation by source field on ALL-IDB cell crops.

    nice python -m benchmarks.cell_classifier_eval --data ../shared/data/all-idb \
        --cache /tmp/cellclf/crops --recipe cell_blast --folds 5 --epochs 6 --out cell_blast.json

Every crop is scored once, by the fold model that never saw its field group (source field plus
overlapping fields and its contiguous number block; ``allcore.data.celldata``). Out-of-fold scores give
AUROC, sensitivity at 95% specificity and per-class recall at the argmax call; 95% CIs come from a
bootstrap over source fields (a field's cells are resampled together: cells of one field are not
independent). The same script runs the s003 / s004 recipes on the same crops (``--recipe
s004_mobilenet_m --set label_set=blast --set pretrained=false``).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from scipy import stats
from sklearn.metrics import roc_auc_score, roc_curve


from allcore.data import celldata
from allcore.training import engine
from allcore.data.samples import discover_samples
from allcore.data.labels import get_label_set
from allcore.models.recipes import load_recipe
from allcore.data.splits import SplitManifest, kfold_samples
from allcore.training.build import build_datasets, build_model, class_weights, targets_of

TARGET_SPECIFICITY = 0.95


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = cell_training_parser(__doc__, data_help="ALL-IDB root", input_size=128, bootstrap=2000)
    parser.add_argument("--folds", type=int, default=5)
    return checked_args(parser, argv)


def cell_training_parser(doc: str, *, data_help: str, input_size: int, bootstrap: int) -> argparse.ArgumentParser:
    """The options every cell-model benchmark takes (data, crop cache, recipe and its CPU budget,
    output JSON or a table of earlier outputs)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help=data_help)
    parser.add_argument("--cache", help="folder for the prepared crops (reused)")
    parser.add_argument("--recipe", default="cell_blast")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE")
    parser.add_argument("--epochs", type=int, help="cap on the recipe's epochs (CPU budget)")
    parser.add_argument("--input-size", type=int, default=input_size)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--bootstrap", type=int, default=bootstrap)
    parser.add_argument("--out", help="write the scores and the metrics as JSON")
    parser.add_argument("--table", nargs="+", metavar="JSON",
                        help="print earlier --out results as a markdown table and exit")
    return parser


def checked_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    args = parser.parse_args(argv)
    if not args.table and not (args.data and args.cache):
        parser.error("--data and --cache are required unless --table is given")
    return args


def cell_recipe(args: argparse.Namespace):
    """The recipe with the command line's overrides, input size and epoch cap (in-process data)."""
    recipe = load_recipe(args.recipe).override([*args.set, f"input_size={args.input_size}", "num_workers=0"])
    if args.epochs:
        recipe = recipe.override([f"epochs={min(args.epochs, recipe.epochs)}"])
    return recipe


def _accuracy(oof: dict) -> float:
    """Cell accuracy at the argmax call, the figure the s003 / s004 papers report."""
    return float(((np.asarray(oof["blast_probability"]) >= 0.5) == np.asarray(oof["y"])).mean())


def markdown_table(paths: list[str]) -> str:
    """One row per result file; every interval is the 95% field-bootstrap CI."""
    cell = lambda m: f"{m[0]:.3f} ({m[1]:.3f}-{m[2]:.3f})"  # noqa: E731
    lines = ["| recipe (model, init) | folds | epochs | input | AUROC | sensitivity at 95% specificity "
             "| blasts called blast | not-blast called not-blast | healthy-field cells called blast "
             "| accuracy | cells (blast / not) |", "|" + "---|" * 11]
    for path in paths:
        result = json.loads(Path(path).read_text())
        recipe, m = result["recipe"], result["metrics"]
        init = "ImageNet" if recipe["pretrained"] else "random"
        lines.append(
            f"| {recipe['name']} ({recipe['model']}, {init}) | {result['folds']} | {recipe['epochs']} "
            f"| {recipe['input_size']} | {cell(m['auroc'])} | {cell(m['sensitivity_at_95_specificity'])} "
            f"| {cell(m['blast_recall'])} | {cell(m['not_blast_recall'])} "
            f"| {cell(m['healthy_field_cells_called_blast'])} "
            f"| {_accuracy(result['oof']):.3f} | {m['n_cells']['blast']} / {m['n_cells']['not_blast']} |")
    return "\n".join(lines)


def with_validation(manifest: SplitManifest) -> SplitManifest:
    """A fold whose inner split left no group for validation (few, large field groups) gets its
    smallest training group as validation, so every fold selects its epoch the same way."""
    if "val" in manifest.names:
        return manifest
    sizes = Counter(r.group for r in manifest.rows if r.split == "train")
    moved = min(sizes, key=lambda g: (sizes[g], g))
    return SplitManifest(dataclasses.replace(r, split="val") if r.group == moved else r
                         for r in manifest.rows)


def train_cell_model(recipe, label_set, manifest, *,
                     sample_weights: np.ndarray | None = None) -> tuple[torch.nn.Module, dict]:
    """Train on the manifest's train split and return the model of the epoch with the lowest
    validation loss, with the fit's history. ``sample_weights`` (one per train image) draws each
    epoch's images with replacement in proportion to them instead of shuffling."""
    torch.manual_seed(recipe.seed)
    model = build_model(recipe, label_set)
    data = build_datasets(manifest, recipe, label_set, model.data_config)
    weights = (class_weights(targets_of(data["train"]), label_set.num_classes)
               if recipe.balance == "class_weights" else None)
    criterion = torch.nn.CrossEntropyLoss(weight=weights)
    best = {"val_loss": np.inf}

    def keep_best(row: dict, state: dict) -> None:
        if row["val_loss"] < best["val_loss"]:
            best.update(val_loss=row["val_loss"], weights=copy.deepcopy(model.state_dict()))

    history = engine.fit(model, criterion, _loader(data["train"], recipe, True, sample_weights),
                         _loader(data["val"], recipe, False), torch.device("cpu"), recipe,
                         num_classes=label_set.num_classes, on_epoch_end=keep_best,
                         log=lambda line: print(f"  {line}", flush=True))
    model.load_state_dict(best["weights"])
    return model, history


def _loader(dataset, recipe, shuffle: bool,
            sample_weights: np.ndarray | None = None) -> torch.utils.data.DataLoader:
    drop_last = shuffle and len(dataset) > recipe.batch_size
    if sample_weights is None:
        return torch.utils.data.DataLoader(dataset, batch_size=recipe.batch_size, shuffle=shuffle,
                                           drop_last=drop_last)
    sampler = torch.utils.data.WeightedRandomSampler(
        sample_weights.tolist(), len(dataset), generator=torch.Generator().manual_seed(recipe.seed))
    return torch.utils.data.DataLoader(dataset, batch_size=recipe.batch_size, sampler=sampler,
                                       drop_last=drop_last)


def train_fold(recipe, label_set, manifest) -> tuple[np.ndarray, np.ndarray, list[str], dict]:
    """Train on the fold's train split (``train_cell_model``) and return the test split's blast
    probabilities, labels and paths."""
    model, history = train_cell_model(recipe, label_set, manifest)
    test = build_datasets(manifest, recipe, label_set, model.data_config)["test"]
    device = torch.device("cpu")
    probs, labels = engine.predict(model, _loader(test, recipe, False), device,
                                   engine.MixedPrecision.resolve(device, False))
    blast = [label_set.index(c) for c in label_set.blast_classes]
    return probs[:, blast].sum(1), labels, [s.path for s in test.samples], {"history": history}


def sensitivity_at_specificity(y: np.ndarray, score: np.ndarray, specificity: float) -> float:
    fpr, tpr, _ = roc_curve(y, score)
    return float(tpr[fpr <= 1 - specificity].max())


def field_bootstrap(metric, y: np.ndarray, score: np.ndarray, field: np.ndarray, *, n: int,
                    seed: int = 0) -> tuple[float, float, float]:
    """(estimate, low, high): percentile 95% CI resampling whole source fields."""
    names = np.unique(field)
    members = [np.flatnonzero(field == f) for f in names]

    def statistic(chosen):
        rows = np.concatenate([members[int(i)] for i in chosen])
        try:
            return metric(y[rows], score[rows])
        except ValueError:  # a resample with one class only has no AUROC
            return np.nan

    result = stats.bootstrap((np.arange(len(names)),), statistic, n_resamples=n, vectorized=False,
                             method="percentile", random_state=seed)
    low, high = result.confidence_interval
    return float(metric(y, score)), float(low), float(high)


def summarise(y, score, field, healthy, *, n) -> dict:
    called = lambda t, s: float(((s >= 0.5) == t).mean())  # noqa: E731 (recall of class t among rows)
    out = {
        "auroc": field_bootstrap(roc_auc_score, y, score, field, n=n),
        "sensitivity_at_95_specificity": field_bootstrap(
            lambda a, b: sensitivity_at_specificity(a, b, TARGET_SPECIFICITY), y, score, field, n=n),
        "blast_recall": field_bootstrap(lambda a, b: called(True, b[a == 1]), y, score, field, n=n),
        "not_blast_recall": field_bootstrap(lambda a, b: called(False, b[a == 0]), y, score, field, n=n),
    }
    h = healthy & (y == 0)
    out["healthy_field_cells_called_blast"] = field_bootstrap(
        lambda a, b: float((b >= 0.5).mean()), y[h], score[h], field[h], n=n)
    out["n_cells"] = {"blast": int((y == 1).sum()), "not_blast": int((y == 0).sum()),
                      "not_blast_in_healthy_fields": int(h.sum())}
    out["n_fields"] = int(len(np.unique(field)))
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.table:
        print(markdown_table(args.table))
        return 0
    torch.set_num_threads(args.threads)
    recipe = cell_recipe(args)
    label_set = get_label_set(recipe.label_set)
    if not label_set.blast_classes:
        raise SystemExit(f"label set {label_set.name} marks no blast classes; add --set label_set=blast")
    started = time.perf_counter()
    cells = celldata.prepare_all_idb(args.data, args.cache, geometry=celldata.CellCropGeometry(
        recipe.cell_crop_side, args.input_size))
    table = celldata.read_cell_manifest(cells.manifest)
    samples = discover_samples(cells.manifest, label_set)
    manifests = kfold_samples(samples, k=args.folds, seed=recipe.seed, strategy=recipe.split_strategy)
    scores, labels, paths, folds = [], [], [], []
    for fold, manifest in enumerate(manifests):
        manifest = with_validation(manifest)
        celldata.check_no_field_leaks(manifest, cells.manifest)
        print(f"[fold {fold}] {manifest.counts()}", flush=True)
        s, y, p, info = train_fold(recipe, label_set, manifest)
        scores.append(s), labels.append(y), paths.append(p), folds.append(info)
    score, y = np.concatenate(scores), np.concatenate(labels)
    y = (y == label_set.index(label_set.blast_classes[0])).astype(int)
    row_of = {p: i for i, p in enumerate(table["path"])}
    rows = table.iloc[[row_of[p] for p in np.concatenate(paths)]]
    field = np.asarray([s.split("|")[0] or g for s, g in zip(rows["source_fields"], rows["group"])])
    healthy = rows["field_label"].to_numpy() == 0
    result = {"recipe": recipe.to_dict(), "folds": args.folds, "crop_geometry": cells.card_entry(),
              "metrics": summarise(y, score, field, healthy, n=args.bootstrap),
              "by_origin_blast_called": {o: float((score[(rows["origin"] == o).to_numpy()] >= 0.5).mean())
                                         for o in sorted(rows["origin"].unique())},
              "seconds": time.perf_counter() - started, "fold_history": folds}
    print(json.dumps({k: result[k] for k in ("metrics", "by_origin_blast_called", "seconds")}, indent=2))
    if args.out:
        result["oof"] = {"path": list(rows["path"]), "blast_probability": score.tolist(), "y": y.tolist()}
        Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
