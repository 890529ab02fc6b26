"""allcore.evaluation.evaluate: metrics.json and report with the corner-shortcut check and trust checks."""

from __future__ import annotations

import json
import shutil

from allcore.training import trust_fitting
from allcore.evaluation.evaluate import evaluate_artifact
from allcore.data.labels import get_label_set
from allcore.data.splits import split_samples
from allcore.data.synthetic import write_archive


def test_evaluation_reports_corner_shortcut_and_trust_when_the_card_has_it(tiny_artifact, tmp_path):
    artifact = str(shutil.copytree(tiny_artifact, tmp_path / "model"))
    samples = write_archive(tmp_path / "archive", label_set=get_label_set("all4"), per_class=6,
                            size=64, near_duplicates=False)
    manifest = split_samples(samples, fractions=(0.5, 0.25, 0.25))

    bare = evaluate_artifact(artifact, manifest.subset("test"), tmp_path / "bare", noise_sigmas=(),
                             n_boot=10)
    assert bare["trust"] is None and not (tmp_path / "bare" / "ood_scores.png").exists()
    shortcut = bare["corner_shortcut"]
    assert shortcut["trained_with_corner_masked"] is False
    assert 0 <= shortcut["accuracy_corner_masked"] <= 1
    assert shortcut["accuracy_corner_visible"] == bare["accuracy"]  # the card's own setting

    trust_fitting.attach_trust(artifact, manifest)
    summary = evaluate_artifact(artifact, manifest.subset("test"), tmp_path / "trusted",
                                noise_sigmas=(), n_boot=10)
    assert len(summary["trust"]["ood_scores"]) == summary["n"]
    assert 0 <= summary["trust"]["flag_rate"] <= 1
    assert json.loads((tmp_path / "trusted" / "metrics.json").read_text())["trust"]["temperature"] > 0
    assert (tmp_path / "trusted" / "reliability_temperature.png").exists()
    assert "How far to trust" in (tmp_path / "trusted" / "report.html").read_text()
