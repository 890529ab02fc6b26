"""Scoring config, output schema, accounting and the commit protocol, without Ray or a model."""

from __future__ import annotations

import datetime as dt
import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from allcore.imaging.qc import QC_COLUMNS
from allcore.scoring.config import ScoringConfig
from allcore.scoring.inputs import chunked, input_digest, iter_input_list
from allcore.scoring.store import OutputStore
from allcore.scoring.summary import RunSummary
from allcore.scoring.rows import SCHEMA_METADATA_KEY
from allcore.scoring.table import build_output_table, columns_markdown, output_schema, specimen_id

SUMMARY = {"model_name": "tiny", "model_version": "1", "weights_sha256": "ab" * 32,
           "classes": ["Benign", "Early"], "data_config": {"input_size": 64}}
SCORED_AT = dt.datetime(2025, 3, 4, 5, 6, 7, tzinfo=dt.timezone.utc)


def scored_table() -> pa.Table:
    """Columns as the predict stage returns them: one ok row, one error row (out of order)."""
    return pa.table({
        "source_uri": ["/a/S2/x.jpg", "/a/S1/y.jpg"], "source_size": [10, 0],
        "source_mtime": ["1", "2"], "content_sha256": ["f" * 64, None],
        "row_kind": ["field", "field"], "note": ["", ""],
        "box_x0": np.zeros(2, np.int32), "box_y0": np.zeros(2, np.int32),
        "box_x1": np.array([80, 0], np.int32), "box_y1": np.array([60, 0], np.int32),
        "cell_count": np.full(2, -1, np.int32), "cell_area": np.full(2, -1, np.int32),
        "circularity": np.full(2, np.nan, np.float32),
        "nucleus_cell_ratio": np.full(2, np.nan, np.float32),
        "status": ["ok", "error"], "error": [None, "zero-byte file: the file is empty"],
        "error_kind": ["", "empty"],
        "pred_label": ["Early", None], "confidence": np.array([0.75, np.nan], np.float32),
        "prob_Benign": np.array([0.25, np.nan], np.float32),
        "prob_Early": np.array([0.75, np.nan], np.float32),
        "ood_score": np.full(2, np.nan, np.float32),
        **{name: np.full(2, np.nan) for name in QC_COLUMNS},
    })


def test_config_rejects_bad_values_with_clear_messages():
    with pytest.raises(ValueError, match="MIN,MAX"):
        ScoringConfig(model="m", input="i", output="o", actors=(3, 1))
    with pytest.raises(ValueError, match="at most one capture group"):
        ScoringConfig(model="m", input="i", output="o", specimen_pattern=r"(a)(b)")
    with pytest.raises(ValueError, match="not a valid regex"):
        ScoringConfig(model="m", input="i", output="o", specimen_pattern=r"(")
    with pytest.raises(ValueError, match=r"max_error_rate must be in \[0, 1\]"):
        ScoringConfig(model="m", input="i", output="o", max_error_rate=5)


def test_config_json_round_trip_and_unknown_keys_fail():
    config = ScoringConfig(model="m", input="i", output="o", actors=(2, 4), full=True)
    assert ScoringConfig.from_json(config.to_json()) == config
    # config.json of earlier runs named the input list "manifest"
    earlier = json.dumps({"model": "m", "input": "i", "output": "o", "manifest": "list.txt"})
    assert ScoringConfig.from_json(earlier).input_list == "list.txt"
    with pytest.raises(ValueError, match="unknown scoring config keys.*'workers'"):
        ScoringConfig.from_json(json.dumps({"model": "m", "input": "i", "output": "o",
                                            "workers": 3}))


def test_specimen_id_default_pattern_and_no_match():
    assert specimen_id("s3://bucket/lab/SP-17/img.jpg", None) == "SP-17"
    assert specimen_id("/data/P042_field3.jpg", r"(P\d+)_field") == "P042"
    assert specimen_id("/data/P042_field3.jpg", r"P\d+") == "P042"
    assert specimen_id("/data/other.jpg", r"(P\d+)_field") is None


def test_schema_describes_every_column_and_keeps_card_class_order():
    schema = output_schema(["Pro", "Benign"], SUMMARY)
    meta = json.loads(schema.metadata[SCHEMA_METADATA_KEY])
    assert set(meta["columns"]) == set(schema.names)
    assert [n for n in schema.names if n.startswith("prob_")] == ["prob_Pro", "prob_Benign"]
    assert meta["model"]["weights_sha256"] == SUMMARY["weights_sha256"]


def test_readme_column_table_is_the_declared_columns():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert columns_markdown() in readme, "regenerate the README table with columns_markdown()"


def test_output_table_nulls_predictions_of_error_rows():
    table = build_output_table(scored_table(), run_id="r1", scored_at=SCORED_AT,
                               model_summary=SUMMARY, specimen_pattern=None)
    rows = table.to_pylist()
    assert [r["source_uri"] for r in rows] == ["/a/S1/y.jpg", "/a/S2/x.jpg"]
    error, ok = rows
    assert error["status"] == "error" and error["error"].startswith("zero-byte")
    assert all(error[c] is None for c in ("pred_label", "confidence", "prob_Benign", "cell_id",
                                          "box_x1", "content_sha256"))
    assert ok["error"] is None and ok["pred_label"] == "Early"
    assert ok["prob_Early"] == pytest.approx(0.75) and ok["cell_id"] == "f" * 16 + ":field"
    assert (ok["box_x0"], ok["box_y0"], ok["box_x1"], ok["box_y1"]) == (0, 0, 80, 60)
    assert ok["specimen_id"] == "S2" and ok["model_sha256"] == SUMMARY["weights_sha256"]
    assert table.schema.equals(output_schema(SUMMARY["classes"], SUMMARY), check_metadata=True)


def commit(store: OutputStore, run_id: str, chunk: int, sha: str = SUMMARY["weights_sha256"]):
    table = build_output_table(scored_table(), run_id=run_id, scored_at=SCORED_AT,
                               model_summary=SUMMARY, specimen_pattern=None)
    return store.commit(table, run_id=run_id, chunk=chunk, model_sha256=sha, scored_at=SCORED_AT)


def test_commit_publishes_partitioned_file_with_schema_metadata_and_ledger(tmp_path):
    store = OutputStore(str(tmp_path))
    record = commit(store, "r1", 0)
    path = tmp_path / record["files"][0]["path"]
    assert path.parent.name == "scored_date=2025-03-04"
    assert SCHEMA_METADATA_KEY in pq.read_schema(path).metadata
    assert not any((tmp_path / "_staging").rglob("*.parquet"))
    assert set(store.ledger(SUMMARY["weights_sha256"])) == {input_digest("/a/S1/y.jpg", 0, "2"),
                                                       input_digest("/a/S2/x.jpg", 10, "1")}
    assert input_digest("/a/S2/x.jpg", 10, "changed") not in store.ledger(SUMMARY["weights_sha256"])
    assert len(store.ledger("another-model")) == 0
    assert store.committed_files() == [str(path)]


def test_recover_removes_files_no_commit_record_lists(tmp_path):
    """A crash after publishing but before the commit record: the file is deleted on the next
    run and its inputs are not in the ledger, so they are scored again exactly once."""
    store = OutputStore(str(tmp_path))
    kept = tmp_path / commit(store, "r1", 0)["files"][0]["path"]
    orphan = kept.with_name("part-r2-00000.parquet")
    orphan.write_bytes(kept.read_bytes())
    staged = tmp_path / "_staging" / "r2" / "part-r2-00001.parquet"
    staged.parent.mkdir(parents=True)
    staged.write_bytes(b"partial")
    assert store.recover() == [str(orphan)]
    assert kept.exists() and not orphan.exists() and not staged.exists()
    assert len(store.ledger(SUMMARY["weights_sha256"])) == 2


def test_finish_writes_success_only_when_the_run_passed(tmp_path):
    store = OutputStore(str(tmp_path))
    good = RunSummary("good", str(tmp_path), listed=3, ok=2, errors=0, skipped=1,
                      max_error_rate=0.1)
    bad = RunSummary("bad", str(tmp_path), listed=4, ok=2, errors=2, max_error_rate=0.1)
    for summary in (good, bad):
        store.finish(summary.run_id, summary.to_dict(), passed=not summary.failed)
    assert (tmp_path / "_runs" / "good" / "_SUCCESS").exists()
    assert not (tmp_path / "_runs" / "bad" / "_SUCCESS").exists()
    accounting = json.loads((tmp_path / "_runs" / "bad" / "summary.json").read_text())
    assert accounting["failed"] and accounting["error_rate"] == 0.5 and accounting["balanced"]
    assert not RunSummary("x", "o", listed=3, ok=1).balanced


def test_input_list_joins_relative_paths_and_keeps_missing_files_for_an_error_row(tmp_path):
    (tmp_path / "imgs").mkdir()
    present = tmp_path / "imgs" / "a.jpg"
    present.write_bytes(b"12345")
    input_list = tmp_path / "list.txt"
    input_list.write_text(f"# nightly list\nimgs/a.jpg\n\n{tmp_path}/imgs/gone.jpg\n")
    infos = list(iter_input_list(str(input_list), str(tmp_path)))
    assert [i.uri for i in infos] == [str(present), str(tmp_path / "imgs" / "gone.jpg")]
    assert infos[0].size == 5 and infos[0].mtime_or_etag == str(os.stat(present).st_mtime_ns)
    assert infos[1].size == -1


def test_progress_line_reads_images_done_rate_and_time_left():
    summary = RunSummary("r", "o", listed=10, skipped=2, ok=3, errors=1, seconds=2.0)
    assert summary.progress() == "4/8 images (50.0%), 1 errors, 2.0 images/s, about 0h00m02s left"
    assert RunSummary("r", "o", listed=5).progress().endswith("about unknown left")


def test_chunked_covers_every_item_once():
    assert list(chunked(iter(range(7)), 3)) == [[0, 1, 2], [3, 4, 5], [6]]


def test_one_writer_per_output_root(tmp_path):
    import json
    import subprocess
    import sys

    from allcore.errors import WriterLockedError
    from allcore.scoring.store import OutputStore

    first, second = OutputStore(str(tmp_path)), OutputStore(str(tmp_path))
    first.acquire_writer("run-a")
    with pytest.raises(WriterLockedError, match="run-a .* delete"):
        second.acquire_writer("run-b")
    second.release_writer("run-b")  # not its lock: must not remove run-a's
    with pytest.raises(WriterLockedError):
        second.acquire_writer("run-b")
    first.release_writer("run-a")
    second.acquire_writer("run-b")
    second.release_writer("run-b")

    # a lock left by a killed run (its process is gone) is taken over
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    lock = tmp_path / "_runs" / "_writer.lock"
    assert not lock.exists(), "released when the run ends"
    first.acquire_writer("run-c")
    stale = {**json.loads(lock.read_text()), "pid": int(dead.stdout)}
    lock.write_text(json.dumps(stale))
    second.acquire_writer("run-d")
    assert json.loads(lock.read_text())["run_id"] == "run-d"
