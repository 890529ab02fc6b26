"""The ledger: read from the 16-byte ledger files that commit records name (and from the inputs
that records of earlier releases list), transient errors left out, a path listed twice once."""

from __future__ import annotations

import json

from allcore.scoring.inputs import input_digest
from allcore.scoring.ledger import Ledger
from allcore.scoring.store import OutputStore
from allcore.scoring.table import build_output_table
from test_scoring import SCORED_AT, SUMMARY, scored_table

SHA = SUMMARY["weights_sha256"]


def commit(store: OutputStore, table, run_id: str = "r1", chunk: int = 0) -> dict:
    return store.commit(build_output_table(table, run_id=run_id, scored_at=SCORED_AT,
                                           model_summary=SUMMARY, specimen_pattern=None),
                        run_id=run_id, chunk=chunk, model_sha256=SHA, scored_at=SCORED_AT)


def test_records_name_a_ledger_file_not_inputs_and_old_records_still_count(tmp_path):
    store = OutputStore(str(tmp_path))
    record = commit(store, scored_table())
    assert "inputs" not in record and (tmp_path / record["ledger"]).exists()
    legacy = {"run_id": "old", "chunk": 0, "model_sha256": SHA, "files": [],
              "counts": {"ok": 1, "error": 0, "cell": 0}, "inputs": [["/old/z.jpg", 5, "9"]]}
    (tmp_path / "_commits" / "old-00000.json").write_text(json.dumps(legacy))
    assert set(store.ledger(SHA)) == {input_digest("/a/S1/y.jpg", 0, "2"),
                                      input_digest("/a/S2/x.jpg", 10, "1"),
                                      input_digest("/old/z.jpg", 5, "9")}


def test_transient_errors_stay_out_of_the_ledger(tmp_path):
    store = OutputStore(str(tmp_path))
    table = scored_table()
    table = table.set_column(table.column_names.index("error_kind"), "error_kind",
                             [["", "unreadable"]])
    record = commit(store, table)
    assert record["counts"]["retry"] == 1
    assert set(store.ledger(SHA)) == {input_digest("/a/S2/x.jpg", 10, "1")}


def test_an_orphan_ledger_file_is_removed_and_never_counts(tmp_path):
    store = OutputStore(str(tmp_path))
    record = commit(store, scored_table())
    (tmp_path / "_commits" / "r1-00000.json").unlink()  # crash before the record
    assert len(store.ledger(SHA)) == 0
    assert any(p.endswith(record["ledger"]) for p in store.recover())


def test_take_new_skips_committed_and_repeated_inputs():
    ledger = Ledger(__import__("numpy").array([b"a" * 16, b"c" * 16], "S16"))
    assert ledger.take_new([b"a" * 16, b"b" * 16, b"b" * 16, b"d" * 16]) == [False, True, False, True]
    assert b"b" * 16 in ledger and b"e" * 16 not in ledger and len(ledger) == 4


def test_ledger_of_parts_matches_every_byte_of_a_digest():
    """Digests are raw bytes: NULs inside or at the end, and digests that share their first
    8 bytes, must still be told apart exactly."""
    np = __import__("numpy")
    rng = np.random.default_rng(0)
    committed = [bytes(rng.integers(0, 256, 16, dtype=np.uint8)) for _ in range(500)]
    committed += [b"\0" * 16, b"x" * 8 + b"\0" * 8, b"x" * 8 + b"\0" * 7 + b"\1", b"\0" * 15 + b"y"]
    parts = [np.array(committed[:200], "S16"), np.array(committed[200:], "S16")]
    ledger = Ledger.of_parts(parts)
    assert len(ledger) == len(committed) and set(ledger) == set(committed)
    near = [b"x" * 8 + b"\0" * 6 + b"\1\0", b"\0" * 14 + b"y\0", b"\1" + b"\0" * 15]
    assert ledger.take_new(committed + near) == [False] * len(committed) + [True] * len(near)
