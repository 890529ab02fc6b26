"""Chunking: scored rows into commit-sized chunks that never split an input.

Ray Data may reorder and re-batch the rows of one input (a field row and its cell rows; a slide
row, its tiles and their cells), and a commit must hold every row of each input it holds, so a
crash can never leave an input half-written in the ledger. ``CompleteInputs`` holds rows back
until their input is complete; ``whole_inputs`` cuts a chunk of whole inputs off the front.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from allcore.scoring.inputs import INPUT_KEY
from allcore.scoring.rows import CELL, FIELD, INPUT_KINDS, SLIDE, TILE


class CompleteInputs:
    """Holds scored rows until every row of their input has arrived, so a commit never splits an
    input's field row from its cell rows (Ray Data may reorder and re-batch rows of one input).
    Complete means: the field row, plus as many cell rows as its ``cell_count`` says (an error
    row, or a field row of a run without cells, needs none); for a slide, the slide row, as many
    tile rows as its ``tile_count`` says, and as many cell rows as those tiles' ``cell_count``
    add up to. A slide is thus committed only once all its tiles are scored."""

    def __init__(self) -> None:
        self._pending: list[pa.Table] = []

    @property
    def pending_rows(self) -> int:
        return sum(t.num_rows for t in self._pending)

    def add(self, table: pa.Table) -> pa.Table:
        """Rows of every input now complete, in arrival order; the rest stay pending."""
        rows = pa.concat_tables([*self._pending, table]) if self._pending else table
        keys = list(zip(*(rows[k].to_pylist() for k in INPUT_KEY)))
        kinds, counts = rows["row_kind"].to_pylist(), rows["cell_count"].to_pylist()
        tile_counts = (rows["tile_count"].to_pylist() if "tile_count" in rows.column_names
                       else [0] * rows.num_rows)
        has_input_row: set[tuple] = set()
        expected = Counter()  # cell and tile rows the input's field, slide and tile rows announce
        seen = Counter()
        for key, kind, count, tiles in zip(keys, kinds, counts, tile_counts):
            if kind in INPUT_KINDS:
                has_input_row.add(key)
            if kind == SLIDE:
                expected[key, TILE] += max(int(tiles), 0)
            elif kind in (FIELD, TILE):
                expected[key, CELL] += max(int(count), 0)
            if kind in (TILE, CELL):
                seen[key, kind] += 1
        done = np.array([key in has_input_row and all(seen[key, k] == expected[key, k] for k in (TILE, CELL))
                         for key in keys], dtype=bool)
        self._pending = [rows.filter(pa.array(~done))] if not done.all() else []
        return rows.filter(pa.array(done))


def whole_inputs(rows: pa.Table, limit: int) -> tuple[pa.Table, pa.Table]:
    """(the rows of the first inputs that fit in ``limit`` rows, the rest): a chunk never splits
    an input's field row from its cell rows, and holds at least one input even when that input
    alone has more than ``limit`` rows. Field runs (one row per input) get exactly ``limit``."""
    keys = list(zip(*(rows[k].to_pylist() for k in INPUT_KEY)))
    sizes = Counter(keys)  # rows per input, in order of first appearance
    taken, total = set(), 0
    for key, size in sizes.items():
        if taken and total + size > limit:
            break
        taken.add(key)
        total += size
    head = pa.array([key in taken for key in keys])
    return rows.filter(head), rows.filter(pc.invert(head))
