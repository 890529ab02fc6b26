"""Per-cell scoring: the batch function without Ray, the specimen summary, and --per-cell end to end."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from allcore.models.artifact import read_card
from allcore.imaging.cells import CellFinderConfig
from allcore.data.labels import LabelSet, get_label_set
from allcore.scoring.config import ScoringConfig
from allcore.scoring.inputs import INPUT_KEY, input_digest
from allcore.scoring.predict import Predictor
from allcore.scoring.prepare import NO_CELLS_NOTE, prepare_batch, prepare_kwargs
from allcore.scoring.chunks import CompleteInputs, whole_inputs
from allcore.scoring.store import OutputStore
from allcore.scoring.summary import specimen_summary, wilson_interval
from allcore.scoring.table import build_output_table, card_summary
from allcore.data.synthetic import make_field, write_archive

REPO = Path(__file__).resolve().parents[1]
FIELD_SIZE = 224  # the finder's defaults are tuned on 224 px fields
ARCHIVE_SIZE = 128  # end to end: small for speed; exact boxes are checked at FIELD_SIZE


def write_fields(root: Path) -> tuple[list[str], dict[str, list[list[int]]]]:
    """Three synthetic fields with known boxes (PNG: lossless), a field without white cells and a
    zero-byte file, in that order."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(4)
    boxes = {}
    for index in range(3):
        img, true_boxes = make_field(rng, index, FIELD_SIZE, scale_bar=False)
        path = root / f"field-{index}.png"
        img.save(path)
        boxes[str(path)] = true_boxes
    Image.new("RGB", (FIELD_SIZE, FIELD_SIZE), (232, 202, 210)).save(root / "empty.png")
    (root / "broken.jpg").write_bytes(b"")
    return [*boxes, str(root / "empty.png"), str(root / "broken.jpg")], boxes


def batch_of(paths: list[str]) -> dict[str, np.ndarray]:
    return {"source_uri": np.array(paths, dtype=object),
            "source_size": np.array([Path(p).stat().st_size for p in paths], np.int64),
            "source_mtime": np.array(["1"] * len(paths), dtype=object)}


def iou(a, b) -> float:
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def score_cells(paths: list[str], artifact: str) -> pa.Table:
    card = read_card(artifact)
    prepared = prepare_batch(batch_of(paths), **prepare_kwargs(card, cell_finder=CellFinderConfig()))
    return build_output_table(pa.table(Predictor(artifact)(prepared)), run_id="r1",
                              scored_at=__import__("datetime").datetime(2025, 1, 2),
                              model_summary=card_summary(card), specimen_pattern=None,
                              blast_classes=get_label_set(card.label_set).blast_classes_of(card.classes))


def test_cell_rows_follow_the_known_boxes_and_every_input_keeps_its_field_row(tmp_path,
                                                                            tiny_artifact):
    paths, true_boxes = write_fields(tmp_path / "S1")
    rows = score_cells(paths, tiny_artifact).to_pylist()
    fields = {r["source_uri"]: r for r in rows if r["row_kind"] == "field"}
    assert sorted(fields) == sorted(paths)  # exactly one field row per input, errors included

    for path, boxes in true_boxes.items():
        cells = [r for r in rows if r["source_uri"] == path and r["row_kind"] == "cell"]
        found = [(c["box_x0"], c["box_y0"], c["box_x1"], c["box_y1"]) for c in cells]
        assert fields[path]["cell_count"] == len(cells) == len(boxes)
        assert all(max(iou(t, f) for f in found) > 0.6 for t in boxes), (boxes, found)
        sha = fields[path]["content_sha256"]
        assert fields[path]["cell_id"] == f"{sha[:16]}:field"
        assert [c["cell_id"] for c in cells] == [f"{sha[:16]}:{x0},{y0},{x1},{y1}"
                                                for x0, y0, x1, y1 in found]
        assert all(c["status"] == "ok" and c["pred_label"] and c["cell_area"] > 0
                   and 0 < c["circularity"] <= 1 and c["cell_count"] is None for c in cells)
        probs = [sum(c[f"prob_{k}"] for k in ("Early", "Pre", "Pro")) for c in cells]
        np.testing.assert_allclose([c["blast_probability"] for c in cells], probs, rtol=1e-5)

    empty = fields[paths[3]]
    assert (empty["status"], empty["cell_count"], empty["note"]) == ("ok", 0, NO_CELLS_NOTE)
    broken = [r for r in rows if r["source_uri"] == paths[4]]
    assert len(broken) == 1 and broken[0]["status"] == "error" and "zero-byte" in broken[0]["error"]
    assert broken[0]["cell_id"] is None and broken[0]["cell_count"] is None

    again = score_cells(list(reversed(paths)), tiny_artifact)  # ids do not depend on batch order
    assert again["cell_id"].to_pylist() == [r["cell_id"] for r in rows]


def test_complete_inputs_never_splits_an_input_across_batches(tmp_path, tiny_artifact):
    paths, _ = write_fields(tmp_path / "S1")
    card = read_card(tiny_artifact)
    prepared = prepare_batch(batch_of(paths), **prepare_kwargs(card, cell_finder=CellFinderConfig()))
    table = pa.table({k: v for k, v in prepared.items() if k != "pixels"})
    shuffled = table.take(np.random.default_rng(0).permutation(table.num_rows))
    buffer, released = CompleteInputs(), []
    for start in range(0, shuffled.num_rows, 4):
        out = buffer.add(shuffled.slice(start, 4))
        counts = Counter(out["source_uri"].to_pylist())
        expected = Counter(table["source_uri"].to_pylist())
        assert all(counts[uri] == expected[uri] for uri in counts)  # whole inputs only
        released.append(out)
    assert buffer.pending_rows == 0
    assert pa.concat_tables(released).num_rows == table.num_rows


def test_wilson_interval_matches_the_textbook_value_and_rejects_bad_counts():
    low, high = wilson_interval(5, 20)
    assert (round(low, 3), round(high, 3)) == (0.112, 0.469)
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == pytest.approx(1.0)
    assert all(np.isnan(wilson_interval(0, 0)))
    with pytest.raises(ValueError, match="successes"):
        wilson_interval(3, 2)


def test_blast_classes_follow_the_label_set():
    all4 = get_label_set("all4")
    assert all4.blast_classes_of(all4.classes) == ("Early", "Pre", "Pro")
    assert get_label_set("binary").blast_classes_of(("benign", "malignant")) == ("malignant",)
    assert get_label_set("all_hem").blast_classes_of(("HEM", "ALL")) == ("ALL",)
    with pytest.raises(ValueError, match="not all in its classes"):
        LabelSet(name="x", classes=("a", "b"), aliases={}, blast_classes=("c",))
    with pytest.raises(ValueError, match="inconsistent"):
        all4.blast_classes_of(("Benign", "Early"))


def test_specimen_summary_counts_cells_per_class_and_picks_the_most_suspicious():
    def row(specimen, kind, label=None, blast=None, status="ok", cells=None, cid=None,
            review=False):
        is_blast = None if label is None else label != "Benign"
        call = None if label is None else "abstain" if review else "blast" if is_blast else "not blast"
        return {"specimen_id": specimen, "model_sha256": "m", "row_kind": kind, "status": status,
                "pred_label": label, "is_blast": is_blast, "blast_probability": blast,
                "cell_count": cells, "cell_id": cid, "needs_review": review, "call": call}

    rows = [row("A", "field", cells=3), row("A", "field", cells=1, review=True),
            row("A", "field", cells=0), row("A", "field", status="error"),
            row("A", "cell", "Pro", 0.9, cid="a1"), row("A", "cell", "Benign", 0.2, cid="a2"),
            row("A", "cell", "Pre", 0.95, cid="a3"), row("B", "field", cells=0),
            row("A", "cell", "Pro", 0.5, cid="a4", review=True)]  # its field needs review
    summary = {r["specimen_id"]: r for r in specimen_summary(pa.Table.from_pylist(rows),
                                                              ["Benign", "Early", "Pre", "Pro"])
               .to_pylist()}
    a = summary["A"]
    assert (a["fields_scored"], a["fields_with_errors"], a["fields_without_cells"]) == (3, 1, 1)
    assert a["fields_needing_review"] == 1
    assert (a["cells_total"], a["cells_Benign"], a["cells_Pre"], a["cells_Pro"]) == (4, 1, 1, 2)
    assert a["cells_abstained"] == 1 and a["blast_cells"] == 2
    assert a["blast_fraction"] == pytest.approx(2 / 3)  # the abstained cell counts in neither
    assert (a["blast_ci_low"], a["blast_ci_high"]) == pytest.approx(wilson_interval(2, 3))
    assert a["top_suspicious_cells"] == ["a3", "a1", "a4", "a2"]
    b = summary["B"]
    assert (b["cells_total"], b["blast_fraction"], b["top_suspicious_cells"]) == (0, None, [])

    # every cell of every specimen abstained: no fraction anywhere, and still a typed table
    only_b = specimen_summary(pa.Table.from_pylist([r for r in rows if r["specimen_id"] == "B"]
                                                   + [row("B", "cell", "Pro", 0.9, cid="b1", review=True)]),
                              ["Benign", "Early", "Pre", "Pro"])
    assert only_b.schema.field("blast_fraction").type == pa.float64()
    assert only_b.to_pylist()[0]["blast_fraction"] is None


def test_per_cell_run_balances_by_inputs_and_summary_matches_the_cell_rows(
        tmp_path, ray_session, tiny_artifact):
    from pipelines.score import run_scoring

    inputs = tmp_path / "in"
    samples = write_archive(inputs, label_set=get_label_set("all4"), per_class=2, size=ARCHIVE_SIZE)
    (inputs / "Pro" / "WBC-Pro-999.jpg").write_bytes(b"not a jpeg")
    paths = [s.path for s in samples] + [str(inputs / "Pro" / "WBC-Pro-999.jpg")]
    out = tmp_path / "out"
    config = ScoringConfig(model=tiny_artifact, input=str(inputs), output=str(out), batch_size=3,
                           actors=(1, 1), commit_every=5, per_cell=True, max_error_rate=0.5)
    summary = run_scoring(config)
    assert (summary.listed, summary.ok, summary.errors, summary.skipped) == (9, 8, 1, 0)
    assert summary.balanced and not summary.failed and summary.cells > 0

    con = duckdb.connect()
    sql = (REPO / "sql" / "bi_queries.sql").read_text().replace("${OUTPUT}", str(out))
    for statement in con.extract_statements(sql):
        con.execute(statement)
    rows = con.execute("SELECT * FROM latest_predictions").to_arrow_table().to_pylist()
    fields = Counter(r["source_uri"] for r in rows if r["row_kind"] == "field")
    assert fields == Counter(paths)  # one field (or error) row per input, none dropped
    assert sum(r["row_kind"] == "cell" for r in rows) == summary.cells
    assert sum(r["cell_count"] or 0 for r in rows if r["row_kind"] == "field") == summary.cells
    records = [json.loads(p.read_text()) for p in (out / "_commits").glob("*.json")]
    ledger = list(OutputStore(str(out)).ledger(records[0]["model_sha256"]))
    assert sorted(ledger) == sorted(input_digest(*(r[c] for c in INPUT_KEY))
                                    for r in rows if r["row_kind"] == "field")
    assert len(ledger) == len(paths)  # the ledger keys by input, each exactly once

    files = list((out / "specimen_summary").rglob(f"part-{summary.run_id}.parquet"))
    assert len(files) == 1
    written = {r["specimen_id"]: r for r in pq.read_table(files[0]).to_pylist()}
    expected = con.execute("""
        SELECT specimen_id, count(*) AS cells, count(*) FILTER (call = 'blast') AS blasts,
               count(*) FILTER (pred_label = 'Pre') AS pre
        FROM cell_predictions GROUP BY specimen_id""").fetchall()
    assert {s: (c, b, p) for s, c, b, p in expected} == {
        s: (r["cells_total"], r["blast_cells"], r["cells_Pre"]) for s, r in written.items()
        if r["cells_total"]}
    assert written["Pro"]["fields_with_errors"] == 1
    view = {r[0]: r[1:] for r in con.execute(
        "SELECT specimen_id, cells_total, blast_fraction, blast_ci_low, top_suspicious_cells "
        "FROM specimen_summary").fetchall()}
    for specimen, (cells, fraction, low, top) in view.items():
        assert (cells, top) == (written[specimen]["cells_total"],
                                written[specimen]["top_suspicious_cells"])
        assert (fraction, low) == pytest.approx((written[specimen]["blast_fraction"],
                                                 written[specimen]["blast_ci_low"]))

    again = run_scoring(config)
    assert (again.listed, again.skipped, again.ok, again.cells) == (9, 9, 0, 0)


def test_a_run_killed_before_its_summary_has_its_specimens_summarised_by_the_next(
        tmp_path, ray_session, tiny_artifact):
    """A kill after the first commit leaves that chunk's specimens committed (every rerun skips
    their inputs) and unsummarised: the resumed run summarises them with its own, once."""
    from pipelines.score import run_scoring

    inputs, out = tmp_path / "in", tmp_path / "out"
    # one input a specimen: the killed run's first commit holds a whole specimen
    write_archive(inputs, label_set=get_label_set("all4"), per_class=1, size=ARCHIVE_SIZE)
    config = ScoringConfig(model=tiny_artifact, input=str(inputs), output=str(out), batch_size=1,
                           actors=(1, 1), commit_every=1, per_cell=True)

    def kill(record: dict) -> None:
        raise KeyboardInterrupt("simulated kill after the first commit")

    with pytest.raises(KeyboardInterrupt):
        run_scoring(config, on_commit=kill)
    assert not (out / "specimen_summary").exists()
    [killed] = {json.loads(p.read_text())["run_id"] for p in (out / "_commits").glob("*.json")}
    resumed = run_scoring(config)
    assert resumed.skipped >= 1 and resumed.balanced
    [written] = (out / "specimen_summary").rglob("*.parquet")
    assert written.name == f"part-{resumed.run_id}.parquet"
    assert set(pq.read_table(written)["specimen_id"].to_pylist()) == {"Benign", "Early", "Pre", "Pro"}
    assert (out / "_runs" / killed / "specimens_summarised_by").read_text() == resumed.run_id
    again = run_scoring(config)  # nothing new, nobody left to summarise
    assert again.skipped == 4 and len(list((out / "specimen_summary").rglob("*.parquet"))) == 1


def test_cell_model_classifies_the_cell_rows_from_its_own_crops(tmp_path, tiny_artifact,
                                                                tiny_cell_artifact):
    """With a cell model, cell rows carry its call on the crop its card's geometry cuts at the
    given diameter; field rows keep the field model; field-class probabilities stay null on cells."""
    import torch

    from allcore.models.artifact import load_artifact
    from allcore.data.celldata import CellCropGeometry, box_centre, cut_cell_crop
    from allcore.imaging.data_config import preprocess_array

    paths, _ = write_fields(tmp_path / "S1")
    card, cell_model_card = read_card(tiny_artifact), read_card(tiny_cell_artifact)
    diameter = 30.0
    prepared = prepare_batch(batch_of(paths), **prepare_kwargs(
        card, cell_finder=CellFinderConfig(cell_diameter_px=diameter), cell_card=cell_model_card))
    predictor = Predictor(tiny_artifact, cell_artifact_uri=tiny_cell_artifact)
    rows = build_output_table(pa.table(predictor(prepared)), run_id="r1",
                              scored_at=__import__("datetime").datetime(2025, 1, 2),
                              model_summary=card_summary(card, cell_model_card),
                              specimen_pattern=None, blast_classes=("Early", "Pre", "Pro"),
                              cell_blast_classes=("blast",)).to_pylist()
    cells = [r for r in rows if r["row_kind"] == "cell"]
    assert len(cells) >= 3

    model, _ = load_artifact(tiny_cell_artifact)
    geometry = CellCropGeometry.from_card(cell_model_card)
    by_path = {p: Image.open(p).convert("RGB") for p in paths[:3]}
    crops = np.stack([preprocess_array(cut_cell_crop(
        by_path[c["source_uri"]], box_centre((c["box_x0"], c["box_y0"], c["box_x1"], c["box_y1"])),
        cell_diameter_px=diameter, geometry=geometry), cell_model_card.data_config_obj())
        for c in cells])
    with torch.no_grad():
        expected = torch.softmax(model(torch.from_numpy(crops)), dim=1).numpy()
    blast = cell_model_card.classes.index("blast")
    assert [c["pred_label"] for c in cells] == [cell_model_card.classes[i] for i in expected.argmax(1)]
    np.testing.assert_allclose([c["blast_probability"] for c in cells], expected[:, blast], rtol=1e-4)
    assert [c["is_blast"] for c in cells] == [bool(i == blast) for i in expected.argmax(1)]
    assert all(c["prob_Benign"] is None and c["prob_Pro"] is None for c in cells)
    assert {c["cell_model_sha256"] for c in cells} == {cell_model_card.weights_sha256}
    assert {c["cell_model_version"] for c in cells} == {"cell-test-1"}

    fields = [r for r in rows if r["row_kind"] == "field" and r["status"] == "ok"]
    assert all(f["pred_label"] in card.classes and f["prob_Benign"] is not None
               and f["cell_model_sha256"] is None for f in fields)
    np.testing.assert_allclose([f["blast_probability"] for f in fields],
                               [f["prob_Early"] + f["prob_Pre"] + f["prob_Pro"] for f in fields],
                               rtol=1e-5)


def test_a_field_model_is_refused_as_cell_model(tiny_artifact):
    with pytest.raises(ValueError, match="not a cell model"):
        prepare_kwargs(read_card(tiny_artifact), cell_finder=CellFinderConfig(),
                       cell_card=read_card(tiny_artifact))
    with pytest.raises(ValueError, match="add --per-cell"):
        ScoringConfig(model="m", input="i", output="o", cell_model="c")


def test_cell_model_run_uses_one_estimated_diameter_and_balances(
        tmp_path, ray_session, tiny_artifact, tiny_cell_artifact):
    from allcore.imaging.cells import median_cell_diameter
    from pipelines.score import run_scoring

    inputs = tmp_path / "in"
    paths, _ = write_fields(inputs / "S1")
    out = tmp_path / "out"
    config = ScoringConfig(model=tiny_artifact, input=str(inputs), output=str(out), batch_size=4,
                           actors=(1, 2), commit_every=6, per_cell=True, max_error_rate=0.5,
                           cell_model=tiny_cell_artifact)
    summary = run_scoring(config)
    assert (summary.listed, summary.ok, summary.errors, summary.skipped) == (5, 4, 1, 0)
    assert summary.balanced and summary.cells >= 3
    expected = median_cell_diameter(Image.open(p).convert("RGB") for p in paths[:4])
    assert summary.cell_diameter_px == pytest.approx(expected)
    finished = json.loads((out / "_runs" / summary.run_id / "summary.json").read_text())
    assert finished["cell_diameter_px"] == pytest.approx(expected)

    rows = pa.concat_tables(pq.read_table(f) for f in OutputStore(str(out)).committed_files()
                            ).to_pylist()
    cells = [r for r in rows if r["row_kind"] == "cell"]
    cell_sha = read_card(tiny_cell_artifact).weights_sha256
    assert len(cells) == summary.cells
    assert all(c["pred_label"] in ("blast", "not_blast") and c["cell_model_sha256"] == cell_sha
               for c in cells)
    assert Counter(r["source_uri"] for r in rows if r["row_kind"] == "field") == Counter(paths)

    (written,) = (out / "specimen_summary").rglob(f"part-{summary.run_id}.parquet")
    (specimen,) = pq.read_table(written).to_pylist()
    assert specimen["cells_total"] == len(cells)
    assert specimen["cells_blast"] == specimen["blast_cells"] == sum(c["is_blast"] for c in cells)

    field_model_only = run_scoring(ScoringConfig(model=tiny_artifact, input=str(inputs),
                                                 output=str(out), per_cell=True,
                                                 max_error_rate=0.5, cell_diameter_px=30.0))
    assert field_model_only.ok == 4 and field_model_only.cell_diameter_px == 30.0


def test_commit_chunks_holdwhole_inputs():
    uris = ["a", "c", "a", "b", "c", "a", "c", "c"]  # a: 3 rows, c: 4 rows, b: 1 row, interleaved
    rows = pa.table({"source_uri": uris, "source_size": [1] * 8, "source_mtime": ["1"] * 8})
    chunk, rest = whole_inputs(rows, 4)
    assert chunk["source_uri"].to_pylist() == ["a", "a", "a"]  # a + c would be 7 rows
    assert sorted(rest["source_uri"].to_pylist()) == ["b", "c", "c", "c", "c"]
    chunk, rest = whole_inputs(rest, 2)
    assert chunk["source_uri"].to_pylist() == ["c"] * 4  # one input larger than the limit, whole
    assert rest["source_uri"].to_pylist() == ["b"]
