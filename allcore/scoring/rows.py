"""The row vocabulary every scoring stage shares: a row's status, its kind, and the names the
output schema is versioned and per-class columns are named by.

One input gives one row of an input kind (a field, or a slide), a slide adds one row per tile,
and ``--per-cell`` adds one row per white cell. Prepare, predict, tiles, the commit protocol and
the table all speak these words; the columns themselves are declared once, in
``allcore.scoring.table.COLUMNS``, which builds the Arrow schema from them.
"""

from __future__ import annotations

OK, ERROR = "ok", "error"  # status
FIELD, CELL = "field", "cell"  # row_kind: one field row per input, plus cell rows with --per-cell
SLIDE, TILE = "slide", "tile"  # a slide input's one row, and one row per tile of it
INPUT_KINDS = (FIELD, SLIDE)  # one row of these kinds per input: what the accounting counts
IMAGE_KINDS = (FIELD, TILE)  # rows the field model scores and image QC judges

SCHEMA_METADATA_KEY = b"allcore.schema"  # the schema's description in every Parquet file
# 2: prob_<class>, confidence and blast_probability are temperature-scaled when the model card has
# a trust section; qc_*, ood_score, needs_review, review_reason and call added (docs/SCORING.md)
# 3: slides: row kinds 'slide' and 'tile'; slide_id, tile_index, centroid_x/y, mpp, centroid_*_um
SCHEMA_VERSION = 3


def prob_column(cls: str) -> str:
    """The column of the field model's probability of class ``cls``."""
    return f"prob_{cls}"
