"""Rerun start-up of scoring against a large history: driver time and peak RSS to recover the
output root, load the ledger and filter the listing down to the new inputs.

    nice python -m benchmarks.ledger_scale --committed 1000000 10000000 --new-share 0.01

For each size a synthetic history is written in the current layout (one ledger file and one
commit record per 4,096 inputs, as ``--commit-every`` 4096 would write them), then a fresh
process measures the start-up a rerun pays before Ray starts: ``OutputStore.recover`` +
``OutputStore.ledger`` + ``new_inputs`` over a synthetic listing of every committed input plus
``--new-share`` new ones (the listing itself is generated, not read from a file system, so the
number is the ledger's cost, not the storage's; the time to generate the listing alone is
measured too and reported apart). Targets (issue 9): 10M committed in <= 60 s and
<= 1 GB driver RSS.

    nice python -m benchmarks.ledger_scale --committed 1000000 10000000 --format delta

writes the same history as a Delta table of digests instead (deltalake, one append commit per
chunk, partitioned by model), measures the same start-up reading the digests from the table's
snapshot, then again after ``optimize.compact()`` and a checkpoint. Both formats report the
commit latency per chunk and the files written (docs/SCORING.md, "The ledger at scale").
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


import duckdb
import numpy as np
import pyarrow as pa

from allcore.imaging.files import FileInfo
from allcore.scoring.inputs import input_digest, new_inputs
from allcore.scoring.ledger import DIGEST, Ledger
from allcore.scoring.store import OutputStore

try:  # only --format delta needs it; not a project dependency (docs/SCORING.md says why)
    from deltalake import DeltaTable, write_deltalake
except ImportError:
    DeltaTable = write_deltalake = None

MODEL = "0" * 64
CHUNK = 4096


def synthetic_listing(committed: int, new: int):
    """Every committed input again (same key), then ``new`` more."""
    for i in range(committed + new):
        yield FileInfo(f"/archive/day{i // 100_000:04d}/field-{i:09d}.jpg", 100_000 + i % 977,
                       str(1_700_000_000_000_000_000 + i))


def history_chunks(committed: int):
    """``(chunk, digests)`` of a history of ``committed`` inputs, 4,096 inputs a chunk."""
    listing = synthetic_listing(committed, 0)
    for chunk in range(0, committed, CHUNK):
        digests = [input_digest(i.uri, i.size, i.mtime_or_etag)
                   for _, i in zip(range(min(CHUNK, committed - chunk)), listing)]
        yield chunk // CHUNK, pa.array(digests, DIGEST)


def commit_records_chunk(root: str, chunk: int, digests: pa.Array) -> None:
    """One chunk's ledger file and commit record as ``OutputStore.commit`` writes them (the
    table file is left out: a rerun's start-up reads only the records and the ledger files)."""
    store = OutputStore(root)
    ledger = store.publish(pa.table({"digest": digests}),
                           f"_ledger/{MODEL}/history-{chunk:05d}.parquet", run_id="history")
    record = {"run_id": "history", "chunk": chunk, "model_sha256": MODEL,
              "committed_at": dt.datetime.now(dt.timezone.utc).isoformat(), "files": [],
              "ledger": ledger, "counts": {"ok": len(digests), "error": 0, "cell": 0}}
    Path(root, "_commits").mkdir(exist_ok=True)
    Path(root, "_commits", f"history-{chunk:05d}.json").write_text(json.dumps(record))


def commit_delta_chunk(root: str, chunk: int, digests: pa.Array) -> None:
    """One chunk appended to a Delta table of digests partitioned by model, one Delta commit
    (a Parquet file and a log entry; deltalake checkpoints the log every 100 commits by default)."""
    write_deltalake(root, pa.table({"model_sha256": pa.array([MODEL] * len(digests)),
                                    "digest": digests}), mode="append", partition_by=["model_sha256"])


def records_ledger(root: str) -> Ledger:
    store = OutputStore(root)
    store.recover()
    return store.ledger(MODEL)


def delta_ledger(root: str) -> Ledger:
    """The model's digests read from the Delta table's current snapshot (its log decides which
    files count, so there is no ``recover``: unlisted files are invisible until vacuumed)."""
    digests = DeltaTable(root).to_pyarrow_table(columns=["digest"],
                                                filters=[("model_sha256", "=", MODEL)])["digest"]
    flat = digests.cast(DIGEST).combine_chunks() if len(digests) else pa.array([], DIGEST)
    return Ledger(np.frombuffer(flat.buffers()[1], "S16")[flat.offset:flat.offset + len(flat)])


FORMATS = {  # how a chunk is committed, how a rerun loads the ledger
    "records": (commit_records_chunk, records_ledger),  # today's layout (docs/SCORING.md)
    "delta": (commit_delta_chunk, delta_ledger),
}


def write_history(root: str, committed: int, table_format: str) -> dict:
    """The history in ``table_format``, timing the commits apart from hashing the synthetic
    inputs (scoring commits every 4,096 rows, so a commit's latency is paid once a chunk)."""
    commit, _ = FORMATS[table_format]
    latencies = []
    for chunk, digests in history_chunks(committed):
        started = time.perf_counter()
        commit(root, chunk, digests)
        latencies.append(time.perf_counter() - started)
    latencies = np.array(latencies)
    return {"commits": len(latencies), "commit_total_s": round(latencies.sum(), 1),
            "commits_per_s": round(len(latencies) / latencies.sum(), 1),
            "commit_p50_ms": round(np.median(latencies) * 1000, 1),
            "commit_max_ms": round(latencies.max() * 1000, 1)}


def compact_delta(root: str) -> dict:
    """``optimize.compact()`` and a checkpoint: the maintenance a run would do at its end. The
    replaced files stay on disk until a vacuum (7 days by default), so a reader that globs the
    Parquet files instead of reading the Delta log counts their rows twice meanwhile."""
    started = time.perf_counter()
    table = DeltaTable(root)
    table.optimize.compact()
    table.create_checkpoint()
    return {"compact_s": round(time.perf_counter() - started, 1),
            "active_files": len(DeltaTable(root).file_uris()), "files": files_under(root),
            "rows_a_parquet_glob_reads": duckdb.execute(
                f"SELECT count(*) FROM read_parquet('{root}/model_sha256=*/*.parquet')").fetchone()[0]}


def files_under(root: str) -> int:
    return sum(len(files) for _, _, files in os.walk(root))


def measure(root: str, table_format: str, committed: int, new: int) -> dict:
    """In this (fresh) process: what a rerun pays before it starts Ray. The process first imports
    what the scoring driver imports (``pipelines.score``: Ray Data, the scoring package; no torch),
    whose RSS is reported apart from the peak."""
    import pipelines.score  # noqa: F401  (the driver's imports)

    import_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    started = time.perf_counter()
    ledger = FORMATS[table_format][1](root)
    loaded = time.perf_counter() - started
    todo = listed = 0
    for count, fresh in new_inputs(synthetic_listing(committed, new), ledger, CHUNK):
        listed += count
        todo += len(fresh)
    assert todo == new, (todo, new)
    startup = time.perf_counter() - started
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    started = time.perf_counter()
    for _ in synthetic_listing(committed, new):  # what generating the listing alone costs
        pass
    listing = time.perf_counter() - started
    return {"format": table_format, "committed": committed, "new": new, "listed": listed,
            "ledger_load_s": round(loaded, 2), "startup_s": round(startup, 2),
            "of_which_synthetic_listing_s": round(listing, 2),
            "ledger_cost_s": round(startup - listing, 2), "peak_rss_mb": round(peak_rss),
            "import_rss_mb": round(import_rss)}


def measure_in_child(root: str, table_format: str, committed: int, new: int) -> dict:
    child = subprocess.run([sys.executable, "-m", "benchmarks.ledger_scale", "--measure", root,
                            table_format, str(committed), str(new)], capture_output=True, text=True,
                           check=True,
                           env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    return json.loads(child.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--committed", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--new-share", type=float, default=0.01)
    parser.add_argument("--format", choices=FORMATS, default="records", dest="table_format",
                        help="records: today's commit records and ledger files; delta: a Delta "
                             "table of digests (deltalake), measured again after compaction")
    parser.add_argument("--measure", nargs=4, metavar=("ROOT", "FORMAT", "COMMITTED", "NEW"),
                        help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args()
    if args.table_format == "delta" and DeltaTable is None:
        parser.error("--format delta needs deltalake: pip install deltalake")
    if args.measure:
        root, table_format, committed, new = args.measure
        print(json.dumps(measure(root, table_format, int(committed), int(new))))
        return
    for committed in args.committed:
        with tempfile.TemporaryDirectory(prefix="ledger-scale-") as root:
            started = time.perf_counter()
            written = write_history(root, committed, args.table_format)
            print(f"history of {committed:,} inputs written in {time.perf_counter() - started:.0f} s",
                  file=sys.stderr)
            new = int(committed * args.new_share)
            result = {**measure_in_child(root, args.table_format, committed, new), **written,
                      "files": files_under(root)}
            print(json.dumps(result), flush=True)
            if args.table_format == "delta":
                compacted = compact_delta(root)
                print(json.dumps({**measure_in_child(root, args.table_format, committed, new),
                                  **compacted, "after": "compact + checkpoint"}), flush=True)


if __name__ == "__main__":
    main()
