"""The parts of a scoring run's commit side, each alone and without Ray: the writer lock, the
ledger's digests, the review rules, and ``ScoringRun`` from lock to summary."""

from __future__ import annotations

import json
import socket
import time
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fsspec.implementations.local import LocalFileSystem

from allcore.scoring.config import ScoringConfig
from allcore.scoring.inputs import input_digest
from allcore.scoring.ledger import ledger_digests, ledger_table, settled_inputs
from allcore.errors import WriterLockedError
from allcore.scoring.lock import WRITER_LEASE_SECONDS, WriterLock
from allcore.scoring.run import ScoringRun
from allcore.scoring.tiles import NO_SLIDE
from allcore.trust.checks import (NO_TRUST_CHECKS, OUT_OF_DISTRIBUTION, Review, Trust, review_by_field,
                           review_image, review_slide, unchecked)
from test_scoring import SUMMARY, scored_table


def lock_at(root) -> WriterLock:
    path = str(root / "_runs" / "_writer.lock")
    return WriterLock(LocalFileSystem(), path, path, str(root))


def test_the_writer_lock_is_held_by_one_run_and_released_only_by_it(tmp_path):
    lock = lock_at(tmp_path)
    lock.create("a")
    lock.check_held("a")
    with pytest.raises(WriterLockedError, match="run a .* delete"):
        lock.create("b")
    with pytest.raises(WriterLockedError, match="same instant"):
        lock.check_held("b")
    lock.release("b")
    assert (tmp_path / "_runs" / "_writer.lock").exists()
    lock.release("a")
    assert not (tmp_path / "_runs" / "_writer.lock").exists()


def test_a_lock_past_its_lease_is_taken_over_even_from_another_host(tmp_path):
    (tmp_path / "_runs").mkdir()
    (tmp_path / "_runs" / "_writer.lock").write_text(json.dumps({
        "run_id": "old", "host": f"not-{socket.gethostname()}", "pid": 1,
        "since": time.time() - WRITER_LEASE_SECONDS - 60}))
    lock = lock_at(tmp_path)
    lock.create("new")
    lock.check_held("new")


def test_ledger_files_hold_the_digests_of_the_inputs_a_chunk_settles():
    rows = pa.table({"source_uri": ["a", "b", "c"], "source_size": [1, 2, 3],
                     "source_mtime": ["1", "2", "3"], "error_kind": ["", "unreadable", None]})
    settled = settled_inputs(rows)  # an unreadable input is tried again by the next run
    assert settled["source_uri"].to_pylist() == ["a", "c"]
    sink = pa.BufferOutputStream()
    pq.write_table(ledger_table(settled), sink)
    digests = np.concatenate(ledger_digests(sink.getvalue().to_pybytes()))
    assert [bytes(d).ljust(16, b"\0") for d in digests] == [input_digest("a", 1, "1"),
                                                             input_digest("c", 3, "3")]


def test_review_rules_for_images_cells_and_slides():
    flagged, fine = Review(True, "blurred", "abstain"), Review(False, None, "not blast")
    assert review_by_field(flagged, 0.9) == flagged  # a cell of a flagged field abstains
    assert review_by_field(fine, 0.9) == Review(False, None, "blast")
    assert unchecked(0.2) == Review(None, NO_TRUST_CHECKS, "not blast")
    assert unchecked(None) == Review(None, NO_TRUST_CHECKS, None)
    trust = Trust(temperature=1.0, ood_method="mahalanobis", ood_threshold=1.0, qc_reference={})
    assert review_image({}, 0.5, None, trust) == Review(False, None, None)  # no blast classes
    assert review_image({}, 2.0, None, trust) == Review(True, OUT_OF_DISTRIBUTION, "abstain")
    assert review_image({}, 0.5, 0.7, trust) == Review(False, None, "blast")
    assert review_slide([]) == Review(None, None, None)
    assert review_slide([unchecked(0.9)]) == Review(None, NO_TRUST_CHECKS, None)
    assert review_slide([flagged] + [fine] * 9) == Review(False, None, None)  # 10 %: not more
    assert review_slide([flagged] * 2 + [fine] * 8) == Review(
        True, "2 of 10 tiles need review: blurred", None)


CARD = SimpleNamespace(model_name=SUMMARY["model_name"], model_version=SUMMARY["model_version"],
                       weights_sha256=SUMMARY["weights_sha256"], classes=SUMMARY["classes"],
                       label_set="tiny", data_config=SUMMARY["data_config"], trust={})


def test_a_scoring_run_locks_commits_whole_chunks_and_balances_without_ray(tmp_path):
    config = ScoringConfig(model="m", input="i", output=str(tmp_path), commit_every=1)
    records = []
    with ScoringRun(config, CARD, on_commit=records.append) as run:
        assert (tmp_path / "_runs" / "_writer.lock").exists() and len(run.ledger) == 0
        with pytest.raises(WriterLockedError):  # a second run on the same output stops
            ScoringRun(config, CARD).__enter__()
        run.summary.listed = 2
        scored = scored_table()  # as the prepare stage passes them, with its (empty) slide columns
        for name, value in NO_SLIDE.items():
            scored = scored.append_column(name, pa.array([value] * scored.num_rows))
        run.commit([scored])
        summary = run.summarize()
    assert not (tmp_path / "_runs" / "_writer.lock").exists()
    assert [r["chunk"] for r in records] == [0, 1]  # one input a chunk at commit_every=1
    assert summary.balanced and (summary.ok, summary.errors, summary.chunks) == (1, 1, 2)
    written = json.loads((tmp_path / "_runs" / run.run_id / "summary.json").read_text())
    assert written["ok"] == 1 and written["failed"]  # 1 error in 2: over the 5 % error rate
    assert not (tmp_path / "_runs" / run.run_id / "_SUCCESS").exists()
    with ScoringRun(config, CARD) as again:  # the next run's ledger holds both inputs
        assert len(again.ledger) == 2
