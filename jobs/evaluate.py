"""Evaluate a model artifact: metrics.json, predictions.csv and an HTML report with plots.

    python jobs/evaluate.py --model runs/demo/model --split-manifest runs/demo/split_manifest.csv
    python jobs/evaluate.py --model runs/demo/model --data path/to/labelled/folder
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if not __package__:  # run as a file (python jobs/x.py, ray job submit): see jobs/__init__.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from allcore import errors  # noqa: E402
from allcore.models.artifact import verified_card  # noqa: E402
from allcore.evaluation.evaluate import NOISE_SIGMAS, evaluate_artifact, select_samples  # noqa: E402
from allcore.trust.checks import NO_TRUST_WARNING  # noqa: E402
from allcore.imaging.files import absolute_location  # noqa: E402


@errors.job_main  # a tampered artifact, a path not found: one line and its status
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=absolute_location, required=True, help="model artifact folder (local or s3://)")
    parser.add_argument("--data", type=absolute_location, help="labelled folder-per-class tree or manifest")
    parser.add_argument("--split-manifest", type=absolute_location, help="evaluate one split of this manifest")
    parser.add_argument("--split", default="test", help="which split of --split-manifest (default test)")
    parser.add_argument("--output", type=absolute_location, help="report folder (default: <model>/../evaluation)")
    parser.add_argument("--noise-sigmas", default=",".join(f"{s:g}" for s in NOISE_SIGMAS),
                        help="Gaussian noise levels in pixel units for the robustness table ('' to skip)")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for CIs")
    args = parser.parse_args(argv)

    card = verified_card(args.model)  # every file of the artifact, before the evaluation's minutes
    samples = select_samples(args.data, card.label_set, split_manifest=args.split_manifest,
                             split=args.split)
    if args.output is None and "://" in args.model:
        parser.error("--output is required when --model is remote: the report is written locally")
    out = args.output or str(Path(args.model).parent / "evaluation")
    sigmas = tuple(float(s) for s in args.noise_sigmas.split(",") if s.strip())
    summary = evaluate_artifact(args.model, samples, out, noise_sigmas=sigmas, n_boot=args.bootstrap)
    low, high = summary["accuracy_ci95"]
    print(f"accuracy {summary['accuracy']:.4f} (95% CI {low:.4f}-{high:.4f}), "
          f"macro-F1 {summary['f1_macro']:.4f}, kappa {summary['cohen_kappa']:.3f}, "
          f"n={summary['n']}")
    shortcut = summary["corner_shortcut"]
    print(f"scale-bar corner masked: accuracy {shortcut['accuracy_corner_masked']:.4f}; visible: "
          f"{shortcut['accuracy_corner_visible']:.4f}")
    if summary["trust"]:
        checks = summary["trust"]
        print(f"trust: ECE {checks['ece_before']:.4f} -> {checks['ece_after']:.4f} after temperature "
              f"{checks['temperature']:.2f}; {checks['flag_rate']:.1%} of images flagged for review")
    else:
        print(f"WARNING: {NO_TRUST_WARNING}")
    print(f"report: {Path(out) / 'report.html'}\nmetrics: {Path(out) / 'metrics.json'}")
    return errors.OK


if __name__ == "__main__":
    sys.exit(main())
