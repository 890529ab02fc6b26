"""Rerun start-up of scoring against a large history: driver time and peak RSS to recover the
output root, load the ledger and filter the listing down to the new inputs.

    nice python benchmarks/ledger_scale.py --committed 1000000 10000000 --new-share 0.01

For each size a synthetic history is written in the current layout (one ledger file and one
commit record per 4,096 inputs, as ``--commit-every`` 4096 would write them), then a fresh
process measures the start-up a rerun pays before Ray starts: ``OutputStore.recover`` +
``OutputStore.ledger`` + ``new_inputs`` over a synthetic listing of every committed input plus
``--new-share`` new ones (the listing itself is generated, not read from a file system, so the
number is the ledger's cost, not the storage's; the time to generate the listing alone is
measured too and reported apart). Targets (issue 9): 10M committed in <= 60 s and
<= 1 GB driver RSS.
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pyarrow as pa  # noqa: E402

from allcore.io import FileInfo  # noqa: E402
from allcore.scoring.inputs import input_digest, new_inputs  # noqa: E402
from allcore.scoring.store import DIGEST, OutputStore  # noqa: E402

MODEL = "0" * 64
CHUNK = 4096


def synthetic_listing(committed: int, new: int):
    """Every committed input again (same key), then ``new`` more."""
    for i in range(committed + new):
        yield FileInfo(f"/archive/day{i // 100_000:04d}/field-{i:09d}.jpg", 100_000 + i % 977,
                       str(1_700_000_000_000_000_000 + i))


def write_history(root: str, committed: int) -> None:
    """Ledger files and commit records as ``OutputStore.commit`` writes them (the table files
    are left out: a rerun's start-up reads only the records and the ledger files)."""
    store = OutputStore(root)
    listing = synthetic_listing(committed, 0)
    for chunk in range(0, committed, CHUNK):
        digests = [input_digest(i.uri, i.size, i.mtime_or_etag)
                   for _, i in zip(range(min(CHUNK, committed - chunk)), listing)]
        ledger = store.publish(pa.table({"digest": pa.array(digests, DIGEST)}),
                               f"_ledger/{MODEL}/history-{chunk // CHUNK:05d}.parquet",
                               run_id="history")
        record = {"run_id": "history", "chunk": chunk // CHUNK, "model_sha256": MODEL,
                  "committed_at": dt.datetime.now(dt.timezone.utc).isoformat(), "files": [],
                  "ledger": ledger, "counts": {"ok": len(digests), "error": 0, "cell": 0}}
        Path(root, "_commits").mkdir(exist_ok=True)
        Path(root, "_commits", f"history-{chunk // CHUNK:05d}.json").write_text(json.dumps(record))


def measure(root: str, committed: int, new: int) -> dict:
    """In this (fresh) process: what a rerun pays before it starts Ray."""
    started = time.perf_counter()
    store = OutputStore(root)
    store.recover()
    ledger = store.ledger(MODEL)
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
    return {"committed": committed, "new": new, "listed": listed,
            "ledger_load_s": round(loaded, 2), "startup_s": round(startup, 2),
            "of_which_synthetic_listing_s": round(listing, 2),
            "ledger_cost_s": round(startup - listing, 2), "peak_rss_mb": round(peak_rss)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--committed", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--new-share", type=float, default=0.01)
    parser.add_argument("--measure", nargs=3, metavar=("ROOT", "COMMITTED", "NEW"),
                        help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args()
    if args.measure:
        root, committed, new = args.measure
        print(json.dumps(measure(root, int(committed), int(new))))
        return
    for committed in args.committed:
        with tempfile.TemporaryDirectory(prefix="ledger-scale-") as root:
            started = time.perf_counter()
            write_history(root, committed)
            print(f"history of {committed:,} inputs written in {time.perf_counter() - started:.0f} s",
                  file=sys.stderr)
            new = int(committed * args.new_share)
            child = subprocess.run([sys.executable, __file__, "--measure", root, str(committed),
                                    str(new)], capture_output=True, text=True, check=True,
                                   env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
            print(child.stdout.strip(), flush=True)


if __name__ == "__main__":
    main()
