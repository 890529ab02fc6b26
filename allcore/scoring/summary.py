"""What a run reports at its end: its accounting (every listed input is ok, an error, or
skipped) and, for ``--per-cell`` runs, one row per specimen summarising its cells.

Why per specimen: a field label says "this smear has blasts", not which cell is one. Counting
the cells classified as blasts gives a blast fraction per specimen, the quantity a
haematologist reports, and lists the most suspicious cells for review. With ``--cell-model`` the
cells are classified by a model trained on cell crops (counts per cell-model class); without it
by the field model on crops, whose cell labels are weak labels inherited from the field
(docs/CELLS.md: "Which model classifies a cell").
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import duckdb
import pyarrow as pa
from scipy.stats import binomtest

from allcore.imaging.files import write_atomic
from allcore.scoring.store import OutputStore
from allcore.scoring.rows import SCHEMA_METADATA_KEY

TOP_SUSPICIOUS = 5


@dataclass
class RunSummary:
    """Accounting for one run. Invariant: listed == ok + errors + skipped."""

    run_id: str
    output: str
    listed: int = 0
    ok: int = 0
    errors: int = 0
    skipped: int = 0  # already committed for this model (or listed twice)
    cells: int = 0  # cell rows written (--per-cell); not inputs, so not in the balance
    chunks: int = 0
    seconds: float = 0.0
    max_error_rate: float = 1.0
    flagged: int = 0  # ok field rows that need review (allcore.trust.checks); 0 without trust checks
    max_review_rate: float = 1.0
    cell_diameter_px: float | None = None  # --per-cell: the run's white-cell diameter
    cell_diameter_source: str = ""  # given, or how it was estimated
    slide_working_mpp: float | None = None  # slides were tiled at this um/px (allcore.imaging.slides)
    inference: dict = dataclasses.field(default_factory=dict)  # model role -> {path, reason}

    @property
    def scored(self) -> int:
        return self.ok + self.errors

    @property
    def to_score(self) -> int:
        return self.listed - self.skipped

    @property
    def balanced(self) -> bool:
        return self.listed == self.ok + self.errors + self.skipped

    @property
    def error_rate(self) -> float:
        return self.errors / self.scored if self.scored else 0.0

    @property
    def failed(self) -> bool:
        return self.error_rate > self.max_error_rate or not self.balanced

    @property
    def review_rate(self) -> float:
        return self.flagged / self.ok if self.ok else 0.0

    @property
    def review_rate_exceeded(self) -> bool:
        """Too many rows flagged: the archive has probably drifted from the training data."""
        return self.review_rate > self.max_review_rate

    def add_reviews(self, table: pa.Table) -> None:
        """Count the flagged field rows of one committed output table."""
        con = duckdb.connect()
        con.register("committed", table)
        self.flagged += con.execute("SELECT count(*) FROM committed WHERE row_kind IN ('field', "
                                    "'slide') AND status = 'ok' AND needs_review").fetchone()[0]

    def add_commit(self, record: dict) -> None:
        """Count one commit record (``OutputStore.commit``) into the accounting."""
        self.ok += record["counts"]["ok"]
        self.errors += record["counts"]["error"]
        self.cells += record["counts"]["cell"]
        self.chunks += 1

    def progress(self, uncommitted: int = 0) -> str:
        """Images done / total, rate and time left: the driver's line after each commit (and
        between commits, counting the ``uncommitted`` images scored since the last one)."""
        done = self.scored + uncommitted
        rate = done / self.seconds if self.seconds > 0 else 0.0
        left = (self.to_score - done) / rate if rate > 0 else math.inf
        eta = "unknown" if math.isinf(left) else f"{left // 3600:.0f}h{left % 3600 // 60:02.0f}m{left % 60:02.0f}s"
        share = done / self.to_score if self.to_score else 1.0
        return (f"{done:,}/{self.to_score:,} images ({share:.1%}), {self.errors:,} errors, "
                f"{rate:.1f} images/s, about {eta} left")

    def line(self) -> str:
        rate = self.scored / self.seconds if self.seconds > 0 else 0.0
        return (f"run {self.run_id}: {self.listed} inputs = {self.ok} ok + {self.errors} errors "
                f"+ {self.skipped} skipped ({'balanced' if self.balanced else 'UNBALANCED'}); "
                f"error rate {self.error_rate:.2%} (max {self.max_error_rate:.2%}); "
                f"{self.flagged} flagged for review ({self.review_rate:.2%}, max "
                f"{self.max_review_rate:.2%}); "
                f"{rate:.1f} images/s; {self.chunks} chunks committed to {self.output}")

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "scored": self.scored, "balanced": self.balanced,
                "error_rate": self.error_rate, "failed": self.failed,
                "review_rate": self.review_rate, "review_rate_exceeded": self.review_rate_exceeded}


RUN_REPORT = "report.html"  # beside the run's summary.json


def write_run_report(store: OutputStore, run_id: str, accounting: dict, slides: Sequence) -> str:
    """``_runs/<run_id>/report.html``, the page a person opens after a run: its accounting and
    each slide it scored as its overview linked to its GeoJSON (``allcore.evaluation.report.run_report_html``;
    ``slides`` are the ``ScoredSlide`` of ``allcore.scoring.tiles.write_slide_outputs``).
    Returns its uri."""
    from allcore.evaluation.report import run_report_html  # matplotlib, as the drift plot: only when writing

    relative = f"_runs/{run_id}/{RUN_REPORT}"
    page = run_report_html(accounting, slides, root_href="../..")  # the output root, from the page
    write_atomic(store.fs, f"{store.path}/{relative}", page.encode())
    return store.uri(relative)


def wilson_interval(successes: int, trials: int) -> tuple[float, float]:
    """95% Wilson score interval for a proportion (SciPy's): unlike the normal approximation it
    stays inside [0, 1] and is sensible for the few cells a specimen may have. NaN for 0 trials
    (SciPy refuses them; a specimen without cells has no fraction)."""
    if trials < 0 or not 0 <= successes <= trials:
        raise ValueError(f"need 0 <= successes <= trials, got {successes}/{trials}")
    if trials == 0:
        return math.nan, math.nan
    interval = binomtest(successes, trials).proportion_ci(confidence_level=0.95, method="wilson")
    return float(interval.low), float(interval.high)


SUMMARY_DESCRIPTIONS = {
    "specimen_id": "specimen (as in the cell table)",
    "model_sha256": "model whose predictions are summarised",
    "run_id": "run that wrote this summary",
    "fields_scored": "fields (inputs) of the specimen scored ok; a slide's tiles scored ok",
    "fields_with_errors": "inputs (fields, slides) and slide tiles that could not be scored",
    "fields_without_cells": "fields or slide tiles scored ok in which no white cell was found",
    "fields_needing_review": "fields or slide tiles scored ok that need review (needs_review)",
    "cells_total": "white cells classified",
    "cells_<class>": "cells predicted as <class>",
    "cells_abstained": "cells whose call is 'abstain' (their field needs review): not counted "
                       "in blast_fraction",
    "blast_cells": "cells whose call is 'blast' (rows written before the call column existed: "
                   "predicted as a blast class)",
    "blast_fraction": "blast_cells / (cells_total - cells_abstained): over trusted cells only "
                      "(null without any)",
    "blast_ci_low": "95% Wilson interval, lower bound",
    "blast_ci_high": "95% Wilson interval, upper bound",
    "top_suspicious_cells": f"cell_id of the {TOP_SUSPICIOUS} cells with the highest "
                            "blast_probability, for review",
}


def specimen_summary(rows: pa.Table, classes: Sequence[str]) -> pa.Table:
    """One row per specimen from the rows of a per-cell table (field and cell rows of one model,
    latest scoring per input). Counts are a plain group-by, so they can be checked with SQL."""
    con = duckdb.connect()
    con.register("scored", rows)
    per_class = ", ".join(f"count(*) FILTER (row_kind = 'cell' AND pred_label = '{c}')::BIGINT "
                          f"AS \"cells_{c}\"" for c in classes)
    table = con.sql(f"""
        SELECT specimen_id, any_value(model_sha256) AS model_sha256,
               count(*) FILTER (row_kind IN ('field', 'tile') AND status = 'ok')::BIGINT AS fields_scored,
               count(*) FILTER (row_kind != 'cell' AND status = 'error')::BIGINT
                   AS fields_with_errors,
               count(*) FILTER (row_kind IN ('field', 'tile') AND status = 'ok' AND cell_count = 0)::BIGINT
                   AS fields_without_cells,
               count(*) FILTER (row_kind IN ('field', 'tile') AND status = 'ok' AND needs_review)::BIGINT
                   AS fields_needing_review,
               count(*) FILTER (row_kind = 'cell')::BIGINT AS cells_total, {per_class},
               count(*) FILTER (row_kind = 'cell' AND call = 'abstain')::BIGINT AS cells_abstained,
               count(*) FILTER (row_kind = 'cell' AND coalesce(call = 'blast', is_blast))::BIGINT
                   AS blast_cells,
               coalesce(list(cell_id ORDER BY blast_probability DESC, cell_id)
                        FILTER (row_kind = 'cell')[1:{TOP_SUSPICIOUS}], [])
                   AS top_suspicious_cells
        FROM scored GROUP BY specimen_id ORDER BY specimen_id""").to_arrow_table()
    blast = table["blast_cells"].to_pylist()
    total = [n - a for n, a in zip(table["cells_total"].to_pylist(),
                                   table["cells_abstained"].to_pylist())]
    intervals = [wilson_interval(b, n) for b, n in zip(blast, total)]
    extra = {"blast_fraction": [b / n if n else None for b, n in zip(blast, total)],
             "blast_ci_low": [None if n == 0 else low for (low, _), n in zip(intervals, total)],
             "blast_ci_high": [None if n == 0 else high for (_, high), n in zip(intervals, total)]}
    at = table.column_names.index("top_suspicious_cells")
    for offset, (name, values) in enumerate(extra.items()):
        table = table.add_column(at + offset, pa.field(name, pa.float64()), pa.array(values, pa.float64()))
    return table


def latest_rows(store: OutputStore, model_sha256: str, specimens: Iterable[str]) -> pa.Table:
    """Committed rows of ``model_sha256`` for ``specimens``, newest scoring per input: what the
    summary describes, so a resumed or repeated run summarises the same cells."""
    files = store.committed_files()
    specimens = sorted(set(specimens))
    if not files or not specimens:
        return pa.table({})
    con = duckdb.connect()
    if store.root.startswith("s3://"):
        con.register_filesystem(store.fs)
    con.execute("CREATE TABLE wanted (specimen_id VARCHAR)")
    con.executemany("INSERT INTO wanted VALUES (?)", [[s] for s in specimens])
    return con.sql("""
        WITH rows AS (
            SELECT * FROM read_parquet(?, union_by_name = true)
            WHERE model_sha256 = ? AND specimen_id IN (SELECT specimen_id FROM wanted)),
        latest AS (
            SELECT source_uri, run_id FROM rows WHERE coalesce(row_kind, 'field') IN ('field', 'slide')
            QUALIFY row_number() OVER (PARTITION BY source_uri
                                       ORDER BY scored_at DESC, run_id DESC) = 1)
        SELECT rows.* FROM rows JOIN latest USING (source_uri, run_id)""",
                   params=[files, model_sha256]).to_arrow_table()


def write_specimen_summary(store: OutputStore, *, run_id: str, model_sha256: str,
                           classes: Sequence[str], specimens: Iterable[str],
                           scored_date: str) -> str | None:
    """Write ``<out>/specimen_summary/scored_date=<date>/part-<run_id>.parquet`` for the
    specimens this run scored, after all its chunks are committed. Derived data, published like
    a chunk (readers never see a partial file); a crash before it loses only this file: the
    next run summarises the killed run's specimens too (``OutputStore.unsummarised_runs``).
    Returns the file's uri."""
    rows = latest_rows(store, model_sha256, specimens)
    if rows.num_rows == 0:
        return None
    table = specimen_summary(rows, classes)
    table = table.add_column(2, "run_id", pa.array([run_id] * table.num_rows, pa.string()))
    descriptions = {**{k: v for k, v in SUMMARY_DESCRIPTIONS.items() if k != "cells_<class>"},
                    **{f"cells_{c}": f"cells predicted as {c}" for c in classes}}
    table = table.replace_schema_metadata(
        {SCHEMA_METADATA_KEY: json.dumps({"columns": descriptions}).encode()})
    return store.uri(store.publish(
        table, f"specimen_summary/scored_date={scored_date}/part-{run_id}.parquet", run_id=run_id))
