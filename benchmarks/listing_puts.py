"""What handing the to-do list to Ray costs: ``ray.put`` of one Arrow block of listed inputs, as
``pipelines/score.py`` puts one per block before scoring starts.

    python benchmarks/listing_puts.py [--blocks 5000] [--rows 64]

Synthetic listing rows with the to-do columns (uri, size, mtime, listing error, error kind); a
local Ray with one CPU. Prints the time per block, and what that means for 1% of 10M new inputs
and for a first run of 10M.
"""

from __future__ import annotations

import argparse
import time

import pyarrow as pa
import ray


def block(index: int, rows: int) -> pa.Table:
    first = index * rows
    return pa.table({"source_uri": [f"/archive/day{index // 1000:04d}/field-{first + j:09d}.jpg"
                                    for j in range(rows)],
                     "source_size": [100_000] * rows,
                     "source_mtime": [str(1_700_000_000_000_000_000 + first + j) for j in range(rows)],
                     "listing_error": [""] * rows, "error_kind": [""] * rows})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", type=int, default=5000)
    parser.add_argument("--rows", type=int, default=64, help="inputs per block (--batch-size)")
    args = parser.parse_args()
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    tables = [block(i, args.rows) for i in range(args.blocks)]
    started = time.perf_counter()
    refs = [ray.put(table) for table in tables]
    per_block = (time.perf_counter() - started) / len(refs)
    for label, inputs in (("1% of 10M new", 100_000), ("first run of 10M", 10_000_000)):
        print(f"{label}: {inputs // args.rows:,} blocks x {1000 * per_block:.2f} ms = "
              f"{inputs / args.rows * per_block:.1f} s of ray.put before scoring starts")


if __name__ == "__main__":
    main()
