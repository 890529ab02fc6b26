"""allcore.evaluation.report: the HTML page and its plots, built from a classification_report dict."""

from __future__ import annotations

import base64
import re

import numpy as np
import pytest

from allcore.evaluation.metrics import classification_report
from allcore.evaluation.report import run_report_html, write_report
from allcore.scoring.summary import RunSummary
from allcore.scoring.tiles import ScoredSlide

CLASSES = ["Benign", "Early", "Pre", "Pro<b>"]  # a name with markup must come out escaped


@pytest.fixture
def metrics() -> dict:
    rng = np.random.default_rng(0)
    y_true = rng.integers(0, 4, 120)
    logits = rng.normal(size=(120, 4)) + 2.0 * np.eye(4)[y_true]
    y_prob = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return classification_report(y_true, y_prob, CLASSES, n_boot=50)


def test_report_writes_self_contained_html_and_pngs(tmp_path, metrics):
    history = [{"epoch": e, "train_loss": 1 / e, "train_acc": 0.5 + e / 10, "val_loss": 1.2 / e,
                "val_acc": 0.45 + e / 10, "val_macro_f1": 0.4 + e / 10, "lr": 1e-3}
               for e in (1, 2, 3)]
    noise = [{"sigma": s, "accuracy": 0.9 - s / 100, "precision_macro": 0.9, "recall_macro": 0.9,
              "f1_macro": 0.9 - s / 100, "roc_auc_macro": None} for s in (0, 5, 10)]
    card = {"model_name": "mobilenetv2_100", "class_names": CLASSES, "recipe": {"epochs": 30},
            "split_manifest_sha256": "ab12cd34"}

    html_path = write_report(tmp_path / "out", metrics, history=history, noise_table=noise,
                             title="s000 <test>", model_card=card)
    page = html_path.read_text(encoding="utf-8")

    pngs = sorted(p.stem for p in html_path.parent.glob("*.png"))
    assert pngs == sorted(["training_curves", "confusion_matrix", "roc_curves", "pr_curves",
                           "noise_robustness", "reliability"])
    embedded = re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page)
    assert len(embedded) == len(pngs) == page.count("<img")
    assert all(base64.b64decode(data).startswith(b"\x89PNG") for data in embedded)
    assert "src='http" not in page and "src=\"" not in page  # nothing fetched from elsewhere

    assert f"{metrics['accuracy']:.4f}" in page
    for name in CLASSES[:3]:
        assert name in page
    assert "Pro&lt;b&gt;" in page and "Pro<b>" not in page
    assert "s000 &lt;test&gt;" in page
    assert "mobilenetv2_100" in page and "ab12cd34" in page
    assert "Few test images" in page  # 120 images over 4 classes: every class is below 30


def test_report_without_optional_parts(tmp_path, metrics):
    html_path = write_report(tmp_path, metrics, title="bare")
    assert not (tmp_path / "training_curves.png").exists()
    assert not (tmp_path / "noise_robustness.png").exists()
    assert html_path.read_text(encoding="utf-8").count("<img") == 4


def test_report_rejects_a_dict_that_is_not_a_classification_report(tmp_path):
    with pytest.raises(ValueError, match="classification_report"):
        write_report(tmp_path, {"accuracy": 0.9}, title="x")


def test_report_shows_calibration_ood_scores_and_the_corner_shortcut(tmp_path, metrics):
    from allcore.evaluation.metrics import calibration_bins, to_jsonable

    rng = np.random.default_rng(1)
    y_true = rng.integers(0, 4, 80)
    probs = rng.dirichlet(np.ones(4), size=80)
    trust = to_jsonable({
        "temperature": 1.7, "ood_method": "knn", "ood_threshold": 0.8, "ece_before": 0.12,
        "ece_after": 0.03, "calibration_before": calibration_bins(y_true, probs),
        "calibration_after": calibration_bins(y_true, probs), "ood_scores": rng.random(80),
        "flag_rate": 0.05, "review_reasons": {"out of distribution": 3, "blurred": 1},
        "accuracy_unflagged": 0.97, "accuracy_flagged": 0.5})
    shortcut = {"trained_with_corner_masked": True, "accuracy_corner_masked": 0.9612,
                "accuracy_corner_visible": 0.9433}
    page = write_report(tmp_path, metrics, title="trust", shortcut=shortcut, trust=trust
                        ).read_text(encoding="utf-8")
    assert (tmp_path / "reliability_temperature.png").exists() and (tmp_path / "ood_scores.png").exists()
    assert page.count("<img") == 6
    assert "0.9612" in page and "0.9433" in page and "trained with the corner masked" in page
    assert "out of distribution 3, blurred 1" in page and "0.1200 / 0.0300" in page


def test_run_report_shows_each_slide_s_overview_linked_to_its_geojson():
    run = RunSummary(run_id="20251201T000000Z-ab12", output="/data/out", listed=3, ok=2, errors=1,
                     cells=57).to_dict()
    slides = [ScoredSlide("case <7>", "case <7>-0123456789abcdef", cells=50, blast=4, abstain=1),
              ScoredSlide("case-8", "case-8-fedcba9876543210", cells=7, blast=0, abstain=0)]
    page = run_report_html(run, slides, root_href="../..")
    images = re.findall(r"<img src='([^']+)'", page)
    assert images == ["../../slides/case%20%3C7%3E-0123456789abcdef.png",
                      "../../slides/case-8-fedcba9876543210.png"]
    links = set(re.findall(r"<a href='([^']+)'", page))
    assert links == {"../../slides/case%20%3C7%3E-0123456789abcdef.geojson",
                     "../../slides/case-8-fedcba9876543210.geojson"}
    assert "case &lt;7&gt;: 50 cells, 4 called blast, 1 abstained" in page and "case <7>" not in page
    assert "20251201T000000Z-ab12" in page and "<td>error rows</td><td>1</td>" in page
    without = run_report_html(run, [], root_href="../..")
    assert "<img" not in without and "Slides" not in without
