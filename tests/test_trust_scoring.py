"""Scoring writes how far to trust each row: review columns, the drift summary, exit status 3."""

from __future__ import annotations

import datetime as dt
import json
import shutil
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pytest
from PIL import Image, ImageFilter

from allcore.trust import checks
from allcore.training import trust_fitting
from allcore.data.labels import get_label_set
from allcore.imaging.qc import QC_COLUMNS
from allcore.scoring.drift import DRIFT_JSON, DRIFT_PNG, write_drift_summary
from allcore.scoring.store import OutputStore
from allcore.scoring.table import build_output_table
from allcore.data.splits import split_samples
from allcore.data.synthetic import write_archive

CLASSES = ["Benign", "Early", "Pre", "Pro"]
BLASTS = ("Early", "Pre", "Pro")
SECTION = {"temperature": 1.5, "ood": {"method": "mahalanobis", "threshold": 2.0},
           "qc_reference": {name: {"low": 0.0, "high": 1.0, "median": 0.5} for name in checks.QC_CHECKS},
           "qc_columns": dict(QC_COLUMNS)}
SCORED_AT = dt.datetime(2025, 3, 4, tzinfo=dt.timezone.utc)


def summary(trust_section: dict) -> dict:
    return {"model_name": "tiny", "model_version": "1", "weights_sha256": "ab" * 32,
            "classes": CLASSES, "data_config": {}, "trust": trust_section}


def scored(rows: list[dict]) -> pa.Table:
    """Predict-stage columns of ``rows`` (uri, kind, status, ood, blur, prob of Pro)."""
    n = len(rows)
    pro = np.array([r["pro"] for r in rows], np.float32)
    ok = np.array([r["status"] == "ok" for r in rows])
    return pa.table({
        "source_uri": [r["uri"] for r in rows], "source_size": [1] * n, "source_mtime": ["1"] * n,
        "content_sha256": ["f" * 64] * n, "row_kind": [r["kind"] for r in rows],
        "status": [r["status"] for r in rows], "error": ["" if o else "broken" for o in ok],
        "error_kind": ["" if o else "corrupt" for o in ok],
        "note": [""] * n, **{f"box_{k}": np.arange(n, dtype=np.int32) for k in ("x0", "y0", "x1", "y1")},
        "cell_count": np.full(n, -1, np.int32), "cell_area": np.full(n, -1, np.int32),
        "circularity": np.full(n, np.nan, np.float32), "nucleus_cell_ratio": np.full(n, np.nan, np.float32),
        "pred_label": ["Pro" if p >= 0.5 else "Benign" for p in pro],
        "confidence": np.maximum(pro, 1 - pro), "prob_Benign": 1 - pro,
        "prob_Early": np.zeros(n, np.float32), "prob_Pre": np.zeros(n, np.float32), "prob_Pro": pro,
        "ood_score": np.array([r.get("ood", np.nan) for r in rows], np.float32),
        **{name: np.array([r.get(name, 0.5 if r["kind"] == "field" else np.nan) for r in rows])
           for name in QC_COLUMNS},
    })


ROWS = [
    {"uri": "/s/a.jpg", "kind": "field", "status": "ok", "ood": 1.0, "pro": 0.9},
    {"uri": "/s/a.jpg", "kind": "cell", "status": "ok", "pro": 0.2},
    {"uri": "/s/b.jpg", "kind": "field", "status": "ok", "ood": 3.0, "qc_blur": 1.5, "pro": 0.9},
    {"uri": "/s/b.jpg", "kind": "cell", "status": "ok", "pro": 0.9},
    {"uri": "/s/c.jpg", "kind": "field", "status": "ok", "ood": 1.0, "pro": 0.1},
    {"uri": "/s/d.jpg", "kind": "field", "status": "error", "pro": np.nan},
]


def table_of(rows: list[dict], trust_section: dict) -> list[dict]:
    return build_output_table(scored(rows), run_id="r1", scored_at=SCORED_AT,
                              model_summary=summary(trust_section), specimen_pattern=None,
                              blast_classes=BLASTS).to_pylist()


def test_review_columns_abstain_on_flagged_fields_and_their_cells():
    by_key = {(r["source_uri"], r["row_kind"]): r for r in table_of(ROWS, SECTION)}
    clean, clean_cell = by_key["/s/a.jpg", "field"], by_key["/s/a.jpg", "cell"]
    assert (clean["needs_review"], clean["review_reason"], clean["call"]) == (False, None, "blast")
    assert clean["ood_score"] == pytest.approx(1.0) and clean["qc_blur"] == pytest.approx(0.5)
    assert (clean_cell["needs_review"], clean_cell["call"]) == (False, "not blast")  # its own prob
    assert clean_cell["ood_score"] is None and clean_cell["qc_blur"] is None  # fields only
    flagged, flagged_cell = by_key["/s/b.jpg", "field"], by_key["/s/b.jpg", "cell"]
    assert flagged["review_reason"] == "out of distribution; blurred"
    assert (flagged["needs_review"], flagged["call"]) == (True, "abstain")
    assert flagged["prob_Pro"] == pytest.approx(0.9)  # kept, only not acted on
    assert (flagged_cell["needs_review"], flagged_cell["review_reason"], flagged_cell["call"]) == \
        (True, "out of distribution; blurred", "abstain")
    assert by_key["/s/c.jpg", "field"]["call"] == "not blast"
    error = by_key["/s/d.jpg", "field"]
    assert all(error[c] is None for c in ("needs_review", "review_reason", "call", "ood_score", "qc_blur"))


def test_cell_rows_of_a_cell_model_run_are_judged_by_the_cell_models_trust():
    """A field foreign to the field model (another laboratory) may hold cells the cell model
    knows: its cells follow the cell model's detector on the crop, not the field's flag."""
    cell_section = {**SECTION, "ood": {"method": "mahalanobis", "threshold": 5.0}}
    rows = [{"uri": "/s/b.jpg", "kind": "field", "status": "ok", "ood": 3.0, "pro": 0.9,
             "qc_cell_diameter_px": 110.0},
            {"uri": "/s/b.jpg", "kind": "cell", "status": "ok", "ood": 4.0, "pro": 0.9},
            {"uri": "/s/b.jpg", "kind": "cell", "status": "ok", "ood": 6.0, "pro": 0.9},
            # cells 20 px across, cut for a model that sees 48 px a diameter: enlarged 2.4x
            {"uri": "/s/t.jpg", "kind": "field", "status": "ok", "ood": 1.0, "pro": 0.9,
             "qc_cell_diameter_px": 20.0},
            {"uri": "/s/t.jpg", "kind": "cell", "status": "ok", "ood": 4.0, "pro": 0.1}]
    model_summary = {**summary(SECTION), "cell_model": {
        **summary(cell_section), "cell_crop": {"pixels_per_cell_diameter": 48.0}}}
    field, familiar, foreign, _, small = build_output_table(
        scored(rows), run_id="r1", scored_at=SCORED_AT, model_summary=model_summary,
        specimen_pattern=None, blast_classes=BLASTS, cell_blast_classes=BLASTS).to_pylist()
    assert (field["needs_review"], field["call"]) == (True, "abstain")
    assert (familiar["needs_review"], familiar["call"], familiar["ood_score"]) == \
        (False, "blast", pytest.approx(4.0))
    assert (foreign["needs_review"], foreign["review_reason"], foreign["call"]) == \
        (True, checks.OUT_OF_DISTRIBUTION, "abstain")
    assert (small["needs_review"], small["review_reason"], small["call"]) == \
        (True, checks.CELL_SIZE_DIFFERS, "abstain")


def test_without_a_trust_section_rows_say_nothing_was_checked():
    rows = table_of(ROWS, {})
    field = next(r for r in rows if r["source_uri"] == "/s/b.jpg" and r["row_kind"] == "field")
    assert field["needs_review"] is None and field["review_reason"] == checks.NO_TRUST_CHECKS
    assert field["call"] == "blast"  # follows the probabilities


def test_drift_summary_compares_the_run_with_the_card_reference(tmp_path):
    store = OutputStore(str(tmp_path))
    rows = [{"uri": f"/s/{i}.jpg", "kind": "field", "status": "ok", "ood": 1.0, "pro": 0.9,
             "qc_blur": 0.1 * i} for i in range(20)]  # qc_blur 0 .. 1.9: above 1.0 is blurred
    table = build_output_table(scored(rows), run_id="r1", scored_at=SCORED_AT,
                               model_summary=summary(SECTION), specimen_pattern=None,
                               blast_classes=BLASTS)
    record = store.commit(table, run_id="r1", chunk=0, model_sha256="ab" * 32, scored_at=SCORED_AT)
    files = [store.uri(f["path"]) for f in record["files"]]
    drift = write_drift_summary(store.uri("_runs/r1"), files, SECTION, max_review_rate=0.25)
    assert json.loads((tmp_path / "_runs" / "r1" / DRIFT_JSON).read_text()) == drift
    assert (tmp_path / "_runs" / "r1" / DRIFT_PNG).read_bytes()[:4] == b"\x89PNG"
    assert (drift["fields"], drift["flagged"]) == (20, 9)  # 1.1 .. 1.9
    assert drift["reasons"] == {"blurred": 9} and drift["review_rate_exceeded"]
    blur = drift["qc"]["qc_blur"]
    assert blur["share_above"] == pytest.approx(9 / 20) and blur["share_below"] == 0
    assert blur["quantiles"]["0.5"] == pytest.approx(0.95)
    assert drift["ood_score"]["share_above"] == 0
    no_trust = write_drift_summary(store.uri("_runs/r1"), files, {}, max_review_rate=0.25)
    assert not no_trust["review_rate_exceeded"] and "reference" not in no_trust["qc"]["qc_blur"]


# ----------------------------------------------------------------------------- end to end

def corruptions(path: str) -> dict[str, Image.Image]:
    """Foreign or broken versions of one in-distribution field."""
    img = Image.open(path).convert("RGB")
    rng = np.random.default_rng(1)
    return {"blurred": img.filter(ImageFilter.GaussianBlur(4)),
            "channel_swapped": Image.fromarray(np.asarray(img)[..., ::-1].copy()),
            "texture": Image.fromarray(rng.integers(0, 256, (*img.size[::-1], 3), np.uint8))}


@pytest.mark.slow
def test_corrupted_and_foreign_images_get_needs_review_end_to_end(tmp_path, ray_session,
                                                                   tiny_artifact, caplog):
    from jobs.score import main

    artifact = str(shutil.copytree(tiny_artifact, tmp_path / "model"))
    samples = write_archive(tmp_path / "archive", label_set=get_label_set("all4"), per_class=12,
                            size=64, near_duplicates=False)
    manifest = split_samples(samples, fractions=(0.5, 0.25, 0.25), names=("train", "val", "test"))
    trust_fitting.attach_trust(artifact, manifest)
    inputs = tmp_path / "in"
    (inputs / "clean").mkdir(parents=True)
    test = [s.path for s in manifest.subset("test")]
    for path in test:
        shutil.copy(path, inputs / "clean" / Path(path).name)
    (inputs / "foreign").mkdir()
    for i, path in enumerate(test[:4]):
        for kind, img in corruptions(path).items():
            img.save(inputs / "foreign" / f"{kind}-{i}.png")

    out = tmp_path / "out"
    status = main(["--model", artifact, "--input", str(inputs), "--output", str(out),
                   "--max-review-rate", "0.2"])
    rows = duckdb.sql(f"SELECT specimen_id, source_uri, needs_review, review_reason, call "
                      f"FROM read_parquet('{out}/predictions/**/*.parquet')").fetchall()
    foreign = [r for r in rows if r[0] == "foreign"]
    clean = [r for r in rows if r[0] == "clean"]
    assert len(foreign) == 12 and len(clean) == len(test)
    assert all(needs and call == "abstain" for _, _, needs, _, call in foreign), foreign
    assert sum(needs for _, _, needs, _, _ in clean) <= len(clean) // 4, clean
    assert all(call in ("blast", "not blast") for _, _, needs, _, call in clean if not needs)
    # more than 20% flagged: exit 3, and the drift summary is beside the run's accounting
    assert status == 3
    run_dir = next((out / "_runs").glob("*/drift.json")).parent
    drift = json.loads((run_dir / DRIFT_JSON).read_text())
    assert drift["flagged"] == sum(r[2] for r in rows) and (run_dir / DRIFT_PNG).exists()
    assert (run_dir / "_SUCCESS").exists()  # everything is still committed

    # an artifact from before trust sections: still scores, warns, and says so in every row
    caplog.clear()
    assert main(["--model", tiny_artifact, "--input", str(inputs), "--output",
                 str(tmp_path / "out-old")]) == 0
    assert checks.NO_TRUST_WARNING in caplog.text
    old = duckdb.sql(f"SELECT DISTINCT review_reason, needs_review FROM "
                     f"read_parquet('{tmp_path}/out-old/predictions/**/*.parquet')").fetchall()
    assert old == [(checks.NO_TRUST_CHECKS, None)]


def test_max_review_rate_reaches_the_config_and_is_checked():
    from allcore.scoring.config import ScoringConfig
    from jobs.score import parse_args

    paths = ["--model", "m", "--input", "i", "--output", "o"]
    assert parse_args([*paths, "--max-review-rate", "0.3"]).max_review_rate == 0.3
    with pytest.raises(ValueError, match=r"max_review_rate must be in \[0, 1\]"):
        ScoringConfig(model="m", input="i", output="o", max_review_rate=2)
