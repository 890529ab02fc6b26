"""How well does a trained model say when not to trust it? Writes the numbers of docs/TRUST.md.

    PYTHONPATH=$PWD nice .venv/bin/python -m benchmarks.trust_eval \
        --model /tmp/trust_runs/s000m/model --split-manifest /tmp/trust_runs/s000m/split_manifest.csv \
        --data-root ../shared/data --output /tmp/trust_eval

In distribution: the Taleqani test split of the model's own split manifest. Other laboratories:
ALL-IDB1 fields, ALL-IDB2 crops, BCCD images. Corruptions of the Taleqani test fields: Gaussian
blur, over/under-exposure, JPEG quality 5, swapped colour channels (a wrong stain), and images
that are no smear at all (scikit-image's sample pictures, generated text and noise textures).
Every OOD method of ``allcore.trust.checks`` is fitted on the same features so they can be compared;
the review decision (OOD or QC) is the one scoring will use, with the method the card stores.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter
from scipy import ndimage
from sklearn.metrics import roc_auc_score
from skimage import data as skdata


from allcore.imaging import files
from allcore.evaluation import metrics
from allcore.trust import checks
from allcore.training import trust_fitting
from allcore.models.artifact import load_artifact
from allcore.data.splits import SplitManifest

SAMPLE_PICTURES = ("astronaut", "brick", "camera", "chelsea", "coffee", "grass", "gravel", "rocket",
                   "coins", "moon", "hubble_deep_field", "immunohistochemistry", "retina", "page")
WORDS = "blood smear specimen report patient sample lab field image scanner stain slide".split()


def _jpeg(img: Image.Image, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    img.save(buffer, format="JPEG", quality=quality)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


CORRUPTIONS = {
    "gaussian blur (sigma 3 px)": lambda img: img.filter(ImageFilter.GaussianBlur(3)),
    "overexposed (x2.0)": lambda img: ImageEnhance.Brightness(img).enhance(2.0),
    "underexposed (x0.4)": lambda img: ImageEnhance.Brightness(img).enhance(0.4),
    "JPEG quality 5": lambda img: _jpeg(img, 5),
    "swapped channels (RGB->BGR)": lambda img: Image.fromarray(np.asarray(img)[..., ::-1].copy()),
}


def non_smear_images(rng: np.random.Generator, n: int = 120) -> list[Image.Image]:
    """Random 224 px crops of scikit-image's sample pictures, rendered text and noise textures."""
    pictures = []
    for name in SAMPLE_PICTURES:
        array = getattr(skdata, name)()
        pictures.append(Image.fromarray(array).convert("RGB"))
    images = []
    for i in range(n):
        kind = i % 3
        if kind == 0:
            picture = pictures[rng.integers(len(pictures))]
            side = int(rng.integers(96, min(picture.size) + 1))
            x, y = (int(rng.integers(0, s - side + 1)) for s in picture.size)
            images.append(picture.crop((x, y, x + side, y + side)).resize((224, 224)))
        elif kind == 1:
            background = tuple(int(v) for v in rng.integers(180, 256, size=3))
            img = Image.new("RGB", (224, 224), background)
            draw = ImageDraw.Draw(img)
            for line in range(int(rng.integers(3, 12))):
                text = " ".join(rng.choice(WORDS, size=4))
                ink = tuple(int(v) for v in rng.integers(0, 120, size=3))
                draw.text((int(rng.integers(0, 40)), 8 + 18 * line), text, fill=ink)
            images.append(img)
        else:
            noise = rng.random((224, 224, 3))
            smooth = ndimage.gaussian_filter(noise, sigma=(float(rng.uniform(1, 12)),) * 2 + (0,))
            smooth = (smooth - smooth.min()) / max(np.ptp(smooth), 1e-9)
            images.append(Image.fromarray((smooth * 255).astype(np.uint8)))
    return images


def load_folder(paths: list[Path]) -> list[Image.Image]:
    return [files.decode_rgb(files.read_bytes(str(p))) for p in paths]


def review_flags(result: trust_fitting.Scored, scores: np.ndarray, section: dict) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(OOD flag, QC flag, reason) per row, as scoring will decide them."""
    fitted = checks.trust_from_card_section(section)
    qc_flag = np.array([bool(checks.qc_reasons(q, fitted.qc_reference)) for q in result.qc])
    reasons = []
    for q, s in zip(result.qc, scores):
        reasons.append(checks.review_row(q, float(s), 0.0, fitted).review_reason or "")
    return scores > fitted.ood_threshold, qc_flag, reasons


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--split-manifest", required=True)
    parser.add_argument("--data-root", default="../shared/data")
    parser.add_argument("--output", default="/tmp/trust_eval")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    root = Path(args.data_root)

    model, card = load_artifact(args.model)
    manifest = SplitManifest.read(args.split_manifest)
    classes = list(card.classes)

    def log(message: str) -> None:
        print(f"[trust_eval] {message}", flush=True)

    log("scoring train / val / test splits")
    splits = {name: trust_fitting.score_samples(model, manifest.subset(name), classes,
                                        with_qc=name != "val")
              for name in ("train", "val", "test")}
    test_images = load_folder([Path(s.path) for s in manifest.subset("test")])

    def score_set(images: list[Image.Image]) -> trust_fitting.Scored:
        return trust_fitting.score_images(model, images, [-1] * len(images))

    foreign: dict[str, trust_fitting.Scored] = {}
    log("scoring other laboratories")
    foreign["ALL-IDB1 fields"] = score_set(load_folder(sorted((root / "all-idb/ALL_IDB1/im").glob("*.jpg"))))
    foreign["ALL-IDB2 crops"] = score_set(load_folder(sorted((root / "all-idb/ALL_IDB2/img").glob("*.tif"))))
    foreign["BCCD"] = score_set(load_folder(sorted((root / "bccd/JPEGImages").glob("*.jpg"))))
    log("scoring corruptions of the test split")
    for name, corrupt in CORRUPTIONS.items():
        foreign[name] = score_set([corrupt(img) for img in test_images])
    foreign["not a smear (pictures, text, noise)"] = score_set(non_smear_images(rng))

    log("fitting detectors")
    results: dict = {"model": args.model, "split_manifest": args.split_manifest,
                     "n": {k: len(v.labels) for k, v in splits.items()}, "methods": {}}
    test = splits["test"]
    for method in checks.OOD_DETECTORS:
        section, tensors = trust_fitting.fit_trust(train=splits["train"].arrays(), val=splits["val"].arrays(),
                                           train_qc=splits["train"].qc, method=method)
        detector = checks.OOD_DETECTORS[method].from_stored(tensors, section["ood"]["params"])
        test_scores = detector.score(test.features, test.logits)
        ood, qc_flag, _ = review_flags(test, test_scores, section)
        flagged = ood | qc_flag
        predicted = test.logits.argmax(1)
        correct = predicted == test.labels
        probs = checks.calibrated_probabilities(test.logits, 1.0)
        calibrated = checks.calibrated_probabilities(test.logits, section["temperature"])
        entry = {
            "temperature": section["temperature"], "calibration_val": section["calibration"],
            "test_ece_before": metrics.expected_calibration_error(test.labels, probs),
            "test_ece_after": metrics.expected_calibration_error(test.labels, calibrated),
            "threshold": section["ood"]["threshold"],
            "in_distribution": {"n": int(len(test.labels)), "ood_flag_rate": float(ood.mean()),
                                "qc_flag_rate": float(qc_flag.mean()), "flag_rate": float(flagged.mean()),
                                "accuracy_all": float(correct.mean()),
                                "accuracy_unflagged": float(correct[~flagged].mean()),
                                "accuracy_flagged": float(correct[flagged].mean()) if flagged.any() else None},
            "sets": {},
        }
        for name, scored in foreign.items():
            scores = detector.score(scored.features, scored.logits)
            ood, qc_flag, reasons = review_flags(scored, scores, section)
            auroc = roc_auc_score(np.r_[np.zeros(len(test_scores)), np.ones(len(scores))],
                                 np.r_[test_scores, scores])
            counts: dict[str, int] = {}
            for reason in reasons:
                for part in filter(None, reason.split("; ")):
                    counts[part] = counts.get(part, 0) + 1
            entry["sets"][name] = {"n": len(scores), "auroc": auroc, "ood_flag_rate": float(ood.mean()),
                                   "qc_flag_rate": float(qc_flag.mean()),
                                   "flag_rate": float((ood | qc_flag).mean()), "reasons": counts,
                                   "ood_scores": scores.tolist()}
        entry["test_ood_scores"] = test_scores.tolist()
        results["methods"][method] = entry
        log(f"{method}: in-dist flag {entry['in_distribution']['flag_rate']:.3f}; " + ", ".join(
            f"{k} auroc {v['auroc']:.3f} flag {v['flag_rate']:.2f}" for k, v in entry["sets"].items()))
    results["qc"] = {"reference": section["qc_reference"],
                     "test": test.qc, **{name: s.qc for name, s in foreign.items()}}
    (out / "trust_eval.json").write_text(json.dumps(metrics.to_jsonable(results), indent=1))
    (out / "summary.md").write_text(markdown_summary(results))
    print(markdown_summary(results))
    return 0


def markdown_summary(results: dict) -> str:
    lines = []
    for method, entry in results["methods"].items():
        ind = entry["in_distribution"]
        lines += [f"### OOD method `{method}`", "",
                  f"Temperature {entry['temperature']:.3f}; ECE on val {entry['calibration_val']['ece_before']:.4f} -> "
                  f"{entry['calibration_val']['ece_after']:.4f}, on test {entry['test_ece_before']:.4f} -> "
                  f"{entry['test_ece_after']:.4f}.", "",
                  f"Taleqani test split (n={ind['n']}): flagged {ind['flag_rate']:.1%} (OOD {ind['ood_flag_rate']:.1%}, "
                  f"QC {ind['qc_flag_rate']:.1%}); accuracy all {ind['accuracy_all']:.4f}, unflagged "
                  f"{ind['accuracy_unflagged']:.4f}.", "",
                  "| set | n | AUROC (OOD score) | OOD flagged | QC flagged | flagged (OOD or QC) | top reasons |",
                  "|---|---|---|---|---|---|---|"]
        for name, s in entry["sets"].items():
            top = ", ".join(f"{k} {v}" for k, v in sorted(s["reasons"].items(), key=lambda kv: -kv[1])[:3])
            lines.append(f"| {name} | {s['n']} | {s['auroc']:.3f} | {s['ood_flag_rate']:.1%} | "
                         f"{s['qc_flag_rate']:.1%} | {s['flag_rate']:.1%} | {top} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
