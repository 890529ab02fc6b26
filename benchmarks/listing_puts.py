"""What handing the to-do list to Ray costs: one ``ray.put`` of an Arrow block of listed inputs per
block, as ``pipelines/score.py`` puts them before scoring starts.

    python -m benchmarks.listing_puts [--blocks 2000] [--batch-size 64] [--actors 2]

Synthetic listing rows with the to-do columns (uri, size, mtime, listing error, error kind); a
local Ray with one CPU. Measures the time of one put of a batch-sized block and of a
``LARGE_BLOCK_INPUTS`` block, then prints, for 1% of 10M new inputs and a first run of 10M, the
puts and their time with one block per model batch (before) and with the block sizes
``pipelines.score.todo_blocks`` cuts (now).
"""

from __future__ import annotations

import argparse
import time

import pyarrow as pa
import ray

from allcore.scoring.config import ScoringConfig
from pipelines.score import LARGE_BLOCK_INPUTS, todo_blocks


def block(index: int, rows: int) -> pa.Table:
    first = index * rows
    return pa.table({"source_uri": [f"/archive/day{index // 1000:04d}/field-{first + j:09d}.jpg"
                                    for j in range(rows)],
                     "source_size": [100_000] * rows,
                     "source_mtime": [str(1_700_000_000_000_000_000 + first + j) for j in range(rows)],
                     "listing_error": [""] * rows, "error_kind": [""] * rows})


def seconds_per_put(rows: int, blocks: int) -> float:
    tables = [block(i, rows) for i in range(blocks)]
    started = time.perf_counter()
    for table in tables:
        ray.put(table)
    return (time.perf_counter() - started) / blocks


def block_sizes(config: ScoringConfig, inputs: int) -> list[int]:
    """The block sizes ``pipelines.score.todo_blocks`` cuts a to-do list of ``inputs`` into,
    arriving in listing chunks of ``commit_every``."""
    chunks = (range(start, min(start + config.commit_every, inputs))
              for start in range(0, inputs, config.commit_every))
    return [len(block) for block in todo_blocks(config, chunks)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", type=int, default=2000, help="puts timed per block size")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--actors", type=int, default=2, help="the actor pool's maximum")
    args = parser.parse_args()
    config = ScoringConfig(input="unused", output="unused", model="unused",
                           batch_size=args.batch_size, actors=(1, args.actors))
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    small = seconds_per_put(args.batch_size, args.blocks)
    large = seconds_per_put(LARGE_BLOCK_INPUTS, max(1, args.blocks // 20))
    print(f"one put: {1000 * small:.2f} ms a {args.batch_size}-input block, "
          f"{1000 * large:.2f} ms a {LARGE_BLOCK_INPUTS}-input block")
    for label, inputs in (("1% of 10M new", 100_000), ("first run of 10M", 10_000_000)):
        before = -(-inputs // args.batch_size)
        sizes = block_sizes(config, inputs)
        now = sum(small if size <= args.batch_size else large for size in sizes)
        print(f"{label}: one block a batch: {before:,} puts, {before * small:.1f} s; "
              f"todo_blocks: {len(sizes):,} puts, {now:.1f} s before scoring starts")


if __name__ == "__main__":
    main()
