"""Fast path (ONNX Runtime fp32) against eager fp32 for every registry model, on real images.

    python -m benchmarks.fast_path_agreement --data ../shared/data/all-taleqani/Original \\
        [--images 192] [--models mobilenet_v2,vgg16_cnn] [--json agreement.json]

Per model: its ImageNet backbone (the offline weights; random where none is installed, said in
the table) with a fresh 4-class head, at the model's own input size, exported the way scoring
exports it (``allcore.scoring.runtimes.fast_outputs``), run on the same preprocessed images as the
eager model (``eager_outputs``). Reported: identical argmax, max |dp| of the softmax (a card's
temperature rescales the same logits), the largest feature difference relative to the feature scale (the OOD detector's input),
max |d logit|, export seconds and model-only images/s of both paths. An untrained head gives
logits that are close to each other, so argmax flips more easily than with a trained model: a
strict test. Verdict "verified" = identical argmax >= 99.5 % (with 192 images: none may
differ) and the fast path faster; the
verified models are what ``FAST_PATH_VERIFIED`` lists (the default path reads it from there).

``--artifacts URI ...`` adds trained artifacts scored as scoring runs them (``ScoringModel``:
calibrated probabilities, OOD scores from the card's detector), eager against fast: max |dp|,
the largest OOD-score difference over the largest score, how many rows change their
out-of-distribution flag, and whether the card passes ``ood_survives_fast_path``.

Images: ``--images`` of the folder, taken class by class in turn over the sorted file names.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np


from allcore.data.samples import discover_samples
from allcore.data.labels import get_label_set
from allcore.models.registry import WeightsUnavailableError, create_model, list_models

AGREEMENT_BAR = 0.995  # identical argmax, issue 14
BATCH = 32


def chosen_images(data: str, count: int) -> list[str]:
    label_set = get_label_set("all4")
    by_class = [[s.path for s in discover_samples(data, label_set) if s.label == cls]
                for cls in label_set.classes]
    chosen = [path for group in zip(*by_class) for path in group][:count]
    if len(chosen) < count:
        raise SystemExit(f"--data {data} has only {len(chosen)} images class by class")
    return chosen


def compare(name: str, paths: list[str]) -> dict:
    import torch
    from scipy import special

    from allcore.scoring.runtimes import eager_outputs, fast_outputs
    from allcore.scoring.prepare import prepare_batch

    torch.manual_seed(0)
    try:
        model, weights = create_model(name, num_classes=4, pretrained=True), "ImageNet"
    except WeightsUnavailableError:
        model, weights = create_model(name, num_classes=4), "random (no offline weights)"
    model.eval()
    size = model.data_config.input_size
    pixels = np.concatenate([prepare_batch({"source_uri": np.array(paths[i:i + BATCH], dtype=object)},
                                           data_config=model.data_config.to_dict())["pixels"]
                             for i in range(0, len(paths), BATCH)])
    cpu = torch.device("cpu")
    eager = eager_outputs(model, cpu)
    started = time.perf_counter()
    fast = fast_outputs(model, cpu, size)
    export_s = time.perf_counter() - started
    seconds, outputs = {}, {}
    for path, fn in (("eager", eager), ("fast", fast)):
        fn(pixels[:BATCH])  # warm-up
        started = time.perf_counter()
        parts = [fn(pixels[i:i + BATCH]) for i in range(0, len(pixels), BATCH)]
        seconds[path] = time.perf_counter() - started
        outputs[path] = tuple(np.concatenate(p) for p in zip(*parts))
    (eager_f, eager_l), (fast_f, fast_l) = outputs["eager"], outputs["fast"]
    eager_p, fast_p = special.softmax(eager_l, axis=1), special.softmax(fast_l, axis=1)
    identical = float((eager_p.argmax(1) == fast_p.argmax(1)).mean())
    speedup = seconds["eager"] / seconds["fast"]
    return {"model": name, "input_size": size, "weights": weights, "images": len(paths),
            "identical_argmax": identical,
            "max_abs_dp": float(np.abs(eager_p - fast_p).max()),
            "max_feature_diff_rel": float(np.abs(eager_f - fast_f).max() / np.abs(eager_f).max()),
            "max_abs_dlogit": float(np.abs(eager_l - fast_l).max()),
            "export_s": export_s,
            "eager_images_per_s": len(paths) / seconds["eager"],
            "fast_images_per_s": len(paths) / seconds["fast"], "speedup": speedup,
            "verified": identical >= AGREEMENT_BAR and speedup > 1}


def compare_artifact(uri: str, paths: list[str]) -> str:
    """One table row: a trained artifact scored eager and fast, calibration and OOD included."""
    from allcore.models.artifact import read_card
    from allcore.scoring.inference_path import ood_survives_fast_path
    from allcore.scoring.predict import ScoringModel
    from allcore.scoring.prepare import prepare_batch, prepare_kwargs

    card = read_card(uri)
    pixels = np.concatenate([prepare_batch({"source_uri": np.array(paths[i:i + BATCH], dtype=object)},
                                           **prepare_kwargs(card))["pixels"]
                             for i in range(0, len(paths), BATCH)])
    eager, fast = ScoringModel(uri, fast=False), ScoringModel(uri, fast=True)
    (eager_p, eager_ood), (fast_p, fast_ood) = eager(pixels), fast(pixels)
    threshold = eager.trust.ood_threshold if eager.trust else np.inf
    flips = int(((eager_ood > threshold) != (fast_ood > threshold)).sum())
    return (f"| {card.model_version} | {card.model_name} | {card.data_config['input_size']} | "
            f"{100 * (eager_p.argmax(1) == fast_p.argmax(1)).mean():.1f} % | "
            f"{np.abs(eager_p - fast_p).max():.1e} | "
            f"{np.abs(eager_ood - fast_ood).max() / np.abs(eager_ood).max():.1e} | {flips} | "
            f"{'yes' if ood_survives_fast_path(eager.trust) else 'no'} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="class-folder tree of real images")
    parser.add_argument("--images", type=int, default=192)
    parser.add_argument("--models", default=",".join(list_models()))
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--artifacts", nargs="*", default=[], help="trained artifacts to compare "
                        "with calibration and OOD scores")
    parser.add_argument("--artifacts-only", action="store_true", help="skip the registry models")
    args = parser.parse_args(argv)
    paths = chosen_images(args.data, args.images)
    if args.artifacts:
        print("| artifact | model | input px | identical argmax | max abs dp (calibrated) | max OOD "
              "diff (rel.) | OOD flags changed | passes the OOD check |\n"
              "|---|---|---:|---:|---:|---:|---:|---|", flush=True)
        for uri in args.artifacts:
            print(compare_artifact(uri, paths), flush=True)
    if args.artifacts_only:
        return 0
    print("| model | input px | backbone weights | identical argmax | max abs dp | max feature "
          "diff (rel.) | max abs d logit | export s | eager img/s | fast img/s | speed-up | "
          "verdict |\n|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|", flush=True)
    rows = []
    for name in args.models.split(","):
        row = compare(name, paths)
        rows.append(row)
        print(f"| {name} | {row['input_size']} | {row['weights']} | "
              f"{100 * row['identical_argmax']:.1f} % | {row['max_abs_dp']:.1e} | "
              f"{row['max_feature_diff_rel']:.1e} | {row['max_abs_dlogit']:.1e} | "
              f"{row['export_s']:.1f} | {row['eager_images_per_s']:.1f} | "
              f"{row['fast_images_per_s']:.1f} | {row['speedup']:.1f}x | "
              f"{'verified' if row['verified'] else 'not verified'} |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
