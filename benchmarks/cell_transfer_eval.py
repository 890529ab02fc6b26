"""Cell model transfer between laboratories: leave one laboratory out.

    python -m benchmarks.cell_transfer_eval --data ../shared/data --cache /tmp/cells \
        --augment stain+optics --epochs 4 --out transfer-stain-optics.json
    python -m benchmarks.cell_transfer_eval --table transfer-recipe.json transfer-stain-optics.json

For each of ALL-IDB, BCCD and Taleqani, a cell model is trained on the other two (their crops
split train / val by field group) and scores every crop of the one it never saw. The calls are
made the way scoring makes them (``allcore.trust.checks.cell_call``): temperature, cell-level OOD
detector and blast threshold fitted on the training laboratories' validation split only
(``allcore.training.trust_fitting.fit_trust``), so a row says what a lab that is new to the model would get.

BCCD's white cells come from blood without leukaemia: every one called blast is a false blast.
Taleqani's cell labels are its fields' labels (Benign: hematogones, not blast; the other classes:
blast), so its blast recall is a lower bound (an ALL field's odd normal cell counts as a missed
blast). Intervals: 95% bootstrap over source fields.
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
from sklearn.metrics import roc_auc_score


from allcore.data import celldata
from allcore.imaging import files
from allcore.trust import checks
from allcore.data.samples import discover_samples
from allcore.imaging.data_config import preprocess_array
from allcore.data.labels import get_label_set
from allcore.data.splits import SplitManifest, SplitRow, split_samples
from allcore.training.trust_fitting import fit_trust, score_samples
from benchmarks.cell_classifier_eval import (cell_recipe, cell_training_parser, checked_args,
                                  field_bootstrap, train_cell_model)

LAB_FOLDERS = {celldata.ALL_IDB: "all-idb", celldata.BCCD: "bccd", celldata.TALEQANI: "all-taleqani"}
# Augmentations added to the recipe's own for the ablation (allcore.imaging.transforms.Augment).
AUGMENTS = {
    "recipe": {},
    "stain": {"hed": 0.2, "gamma": [0.8, 1.25]},
    "stain+optics": {"hed": 0.2, "gamma": [0.8, 1.25], "blur": 1.0, "resolution": [0.35, 1.0],
                     "jpeg": [40, 95]},
}
VAL_FRACTION = 0.15


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = cell_training_parser(__doc__, data_help="folder holding all-idb/, bccd/ and all-taleqani/",
                                  input_size=96, bootstrap=1000)
    parser.add_argument("--augment", choices=AUGMENTS, default="recipe")
    parser.add_argument("--held-out", nargs="+", choices=LAB_FOLDERS, default=list(LAB_FOLDERS))
    parser.add_argument("--adapt-batchnorm", action="store_true",
                        help="before scoring the held-out laboratory, re-estimate every BatchNorm "
                             "layer's statistics on its crops (AdaBN; no labels used)")
    parser.add_argument("--balance-labs", action="store_true",
                        help="draw training crops so every (laboratory, label) pair weighs the "
                             "same, instead of shuffling: the label cannot be read off the lab")
    return checked_args(parser, argv)


def fold_manifest(samples, labs: np.ndarray, held_out: str, seed: int) -> SplitManifest:
    """Train / val over the other laboratories' crops (grouped by field), test: all of ``held_out``."""
    training = [s for s, lab in zip(samples, labs) if lab != held_out]
    inner = split_samples(training, fractions=(1 - VAL_FRACTION, VAL_FRACTION), names=("train", "val"),
                          seed=seed)
    test = [SplitRow(s.path, s.label, s.group or s.path, "test") for s, lab in zip(samples, labs)
            if lab == held_out]
    return SplitManifest([*inner.rows, *test])


def lab_label_weights(samples, labs: list[str]) -> np.ndarray:
    """One weight a crop, 1 / (crops of its laboratory and label): each pair weighs the same."""
    keys = [(lab, s.label) for s, lab in zip(samples, labs)]
    counts = Counter(keys)
    return np.array([1.0 / counts[key] for key in keys])


def adapt_batchnorm(model: torch.nn.Module, samples, batch_size: int = 64) -> torch.nn.Module:
    """A copy of ``model`` whose BatchNorm statistics are those of ``samples`` (AdaBN, Li et al.
    2016): the cumulative mean and variance over one pass, every other layer as trained."""
    adapted = copy.deepcopy(model).eval()
    norms = [m for m in adapted.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average over the pass
        norm.train()
    pixels = [preprocess_array(files.decode_rgb(files.read_bytes(s.path)), adapted.data_config)
              for s in samples]
    with torch.no_grad():
        for start in range(0, len(pixels), batch_size):
            adapted(torch.from_numpy(np.stack(pixels[start:start + batch_size])))
    return adapted.eval()


def run_fold(recipe, label_set, manifest: SplitManifest, lab_of: dict[str, str] | None = None,
             adapt: bool = False) -> dict:
    """Train, fit trust on the training laboratories' val split, and call every test cell
    (``lab_of``, path -> laboratory: train with ``lab_label_weights``; ``adapt``: score the test
    laboratory with ``adapt_batchnorm`` on its crops)."""
    train = manifest.subset("train")
    weights = None if lab_of is None else lab_label_weights(train, [lab_of[s.path] for s in train])
    model, history = train_cell_model(recipe, label_set, manifest, sample_weights=weights)
    test_model = adapt_batchnorm(model, manifest.subset("test")) if adapt else model
    scored = {split: score_samples(test_model if split == "test" else model, manifest.subset(split),
                                   label_set.classes, with_qc=False)
              for split in ("train", "val", "test")}
    blast = [label_set.index(c) for c in label_set.blast_classes]
    section, tensors = fit_trust(train=scored["train"].arrays(), val=scored["val"].arrays(), train_qc=[],
                                 blast_columns=blast)
    detector = checks.OOD_DETECTORS[section["ood"]["method"]].from_stored(tensors, section["ood"]["params"])
    fitted = dataclasses.replace(checks.trust_from_card_section(section), detector=detector)
    test = scored["test"]
    probability = checks.calibrated_probabilities(test.logits, fitted.temperature)[:, blast].sum(1)
    ood = fitted.ood_scores(test.features, test.logits)
    calls = [checks.cell_call(o, p, fitted).call for o, p in zip(ood, probability)]
    return {"paths": [s.path for s in manifest.subset("test")], "blast_probability": probability.tolist(),
            "ood_score": ood.tolist(), "call": calls, "temperature": section["temperature"],
            "ood_threshold": section["ood"]["threshold"], "blast_threshold": section["blast_threshold"],
            "history": history}


def lab_metrics(cells: dict, *, n: int) -> dict:
    """Blast recall, healthy cells called blast, abstentions and AUROC of one held-out laboratory."""
    y, field = np.asarray(cells["y"]), np.asarray(cells["field"])
    healthy = np.asarray(cells["healthy"])
    call = np.asarray(cells["call"])
    argmax = (np.asarray(cells["blast_probability"]) >= 0.5).astype(float)
    as_blast = (call == "blast").astype(float)
    abstain = (call == "abstain").astype(float)
    share = lambda values, rows: (field_bootstrap(lambda a, b: float(b.mean()), y[rows], values[rows],  # noqa: E731
                                                  field[rows], n=n) if rows.any() else None)
    out = {"cells": int(len(y)), "blasts": int(y.sum()), "healthy": int(healthy.sum()),
           "blast_recall": share(as_blast, y == 1), "blast_recall_argmax": share(argmax, y == 1),
           "healthy_called_blast": share(as_blast, healthy), "healthy_called_blast_argmax": share(argmax, healthy),
           "abstain_healthy": share(abstain, healthy), "abstain_blast": share(abstain, y == 1),
           "abstain_all": float(abstain.mean())}
    if 0 < y.sum() < len(y):
        out["auroc"] = float(roc_auc_score(y, cells["blast_probability"]))
    return out


def markdown_table(paths: list[str]) -> str:
    cell = lambda m: "n/a" if m is None else f"{m[0]:.3f} ({m[1]:.3f}-{m[2]:.3f})"  # noqa: E731
    lines = ["| input, colour, augment | held-out lab (trained on the other two) | cells (blast / healthy) | blast recall | "
             "healthy called blast | abstain (healthy / blast) | argmax: blast recall, healthy called blast | AUROC |",
             "|" + "---|" * 8]
    for path in paths:
        result = json.loads(Path(path).read_text())
        for lab, m in result["metrics"].items():
            abstain = " / ".join("n/a" if m[k] is None else f"{m[k][0]:.3f}" for k in ("abstain_healthy", "abstain_blast"))
            argmax = ", ".join("n/a" if m[k] is None else f"{m[k][0]:.3f}"
                               for k in ("blast_recall_argmax", "healthy_called_blast_argmax"))
            auroc = f"{m['auroc']:.3f}" if "auroc" in m else "n/a"
            recipe = result["recipe"]
            lines.append(f"| {recipe['input_size']} px{', frozen ImageNet backbone' if recipe.get('freeze_backbone') else ''}, {recipe.get('stain_normalise', 'none')}, {result['augment']}{', lab-balanced' if result.get('balance_labs') else ''}{', AdaBN' if result.get('adapt_batchnorm') else ''} | {lab} | {m['blasts']} / {m['healthy']} | {cell(m['blast_recall'])} "
                         f"| {cell(m['healthy_called_blast'])} | {abstain} | {argmax} | {auroc} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.table:
        print(markdown_table(args.table))
        return 0
    torch.set_num_threads(args.threads)
    recipe = cell_recipe(args).override([f"augment.{k}={json.dumps(v)}" for k, v in AUGMENTS[args.augment].items()])
    label_set = get_label_set(recipe.label_set)
    started = time.perf_counter()
    cells = celldata.prepare_cell_crops([str(Path(args.data) / f) for f in LAB_FOLDERS.values()], args.cache,
                                        geometry=celldata.CellCropGeometry(recipe.cell_crop_side, args.input_size))
    table = celldata.read_cell_manifest(cells.manifest)
    samples = discover_samples(cells.manifest, label_set)
    labs = table.set_index("path").loc[[s.path for s in samples], "lab"].to_numpy()
    result = {"recipe": recipe.to_dict(), "augment": args.augment, "balance_labs": args.balance_labs,
              "adapt_batchnorm": args.adapt_batchnorm,
              "crop_geometry": cells.card_entry(),
              "folds": {}, "metrics": {}}
    for held_out in args.held_out:
        manifest = fold_manifest(samples, labs, held_out, recipe.seed)
        print(f"[held out {held_out}] {manifest.counts()}", flush=True)
        fold = run_fold(recipe, label_set, manifest,
                        dict(zip((s.path for s in samples), labs)) if args.balance_labs else None,
                        adapt=args.adapt_batchnorm)
        rows = table.set_index("path").loc[fold["paths"]]
        fold.update(y=(rows["label"] == "blast").astype(int).tolist(),
                    healthy=((rows["label"] == "not_blast") & (rows["field_label"] == 0)).tolist(),
                    field=[f or g for f, g in zip(rows["source_fields"], rows["group"])],
                    origin=rows["origin"].tolist())
        result["folds"][held_out] = fold
        result["metrics"][held_out] = lab_metrics(fold, n=args.bootstrap)
        print(json.dumps(result["metrics"][held_out]), flush=True)
    result["seconds"] = time.perf_counter() - started
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    print(markdown_table([args.out]) if args.out else json.dumps(result["metrics"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
