"""Evaluate a model artifact on labelled images: metrics.json, per-image predictions, report.

Preprocessing comes from the artifact's model card (input size, normalisation, scale-bar mask),
never from the caller, so evaluation sees pixels exactly as scoring does.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from allcore import io, metrics, report
from allcore.artifact import load_artifact
from allcore.data import Sample, discover_samples
from allcore.labels import get_label_set
from allcore.models import probabilities
from allcore.splits import SplitManifest
from allcore.transforms import normalise_array, unit_array

NOISE_SIGMAS = (0.0, 2.0, 5.0, 8.0, 10.0)  # the MobileNet_M robustness study


def select_samples(data: str | None, label_set_name: str, *, split_manifest: str | None,
                   split: str) -> list[Sample]:
    """Images to evaluate: one split of a split manifest, or every image under ``data``."""
    if split_manifest:
        samples = SplitManifest.read(split_manifest).subset(split)
        if not samples:
            raise ValueError(f"split {split!r} of {split_manifest} is empty; pick another --split")
        return samples
    if not data:
        raise ValueError("pass --data (folder or manifest) or --split-manifest")
    return discover_samples(data, get_label_set(label_set_name))


def evaluate_artifact(model_uri: str, samples: list[Sample], out_dir: str | Path, *,
                      noise_sigmas: tuple[float, ...] = NOISE_SIGMAS, batch_size: int = 64,
                      n_boot: int = 1000) -> dict:
    """Score ``samples`` with the artifact and write metrics.json, predictions.csv and report.html.
Confidence intervals resample the samples' duplicate ``group`` (set by a split manifest).

    The selected images are held in memory as float32 (N x 3 x S x S: ~0.2 MB each at 128 px),
    because the noise-robustness table re-scores the same pixels at every sigma. That suits test
    splits of thousands of images; score whole archives with ``jobs/score.py`` instead.
    """
    model, card = load_artifact(model_uri)
    data_config = card.data_config_obj()
    classes = list(card.classes)
    labels = np.array([classes.index(s.label) if s.label in classes else -1 for s in samples])
    if (labels < 0).any():
        unknown = sorted({s.label for s in samples if s.label not in classes})
        raise ValueError(f"labels {unknown} are not classes of this model ({classes}); "
                         "evaluate with data of the model's label set")
    with ThreadPoolExecutor(max_workers=4) as pool:
        units = list(pool.map(lambda s: unit_array(io.decode_rgb(io.read_bytes(s.path)), data_config),
                              samples))
    images = torch.from_numpy(np.stack(units))

    def predict(unit_batch: torch.Tensor) -> np.ndarray:
        batch = torch.from_numpy(normalise_array(unit_batch.numpy(), data_config))
        return probabilities(model, batch).numpy()

    probs = np.concatenate([predict(images[i:i + batch_size])
                            for i in range(0, len(images), batch_size)])
    # CIs resample the split manifest's duplicate groups; images without one stand alone
    groups = (None if all(s.group is None for s in samples)
              else [s.group if s.group is not None else s.path for s in samples])
    result = metrics.classification_report(labels, probs, classes, groups=groups, n_boot=n_boot)
    noise = (metrics.noise_robustness_table(predict, images, labels, sigmas=noise_sigmas,
                                            batch_size=batch_size) if noise_sigmas else None)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = {"model": model_uri, "model_name": card.model_name, "model_version": card.model_version,
               "n_images": len(samples), **result, "noise_robustness": noise}
    (out / "metrics.json").write_text(json.dumps(summary, indent=2))
    predictions = pd.DataFrame({"path": [s.path for s in samples], "label": [s.label for s in samples],
                                "pred_label": [classes[i] for i in probs.argmax(1)],
                                **{f"prob_{c}": probs[:, k] for k, c in enumerate(classes)}})
    predictions.to_csv(out / "predictions.csv", index=False)
    history = _history_beside(model_uri)
    report.write_report(out, result, history=history, noise_table=noise,
                        title=f"{card.model_name} on {len(samples)} images",
                        model_card=card.to_dict())
    return summary


def _history_beside(model_uri: str) -> list[dict] | None:
    """Training curves saved by the training job next to the artifact, when present."""
    uri = io.join(model_uri, "history.json")
    return json.loads(io.read_bytes(uri)) if io.exists(uri) else None
