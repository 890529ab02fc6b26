"""One scoring run's bookkeeping on the driver, Ray-free: the writer lock, the ledger, the scored
rows on their way into commits, and the run's summaries.

``pipelines/score.py`` lists the inputs against ``ScoringRun.ledger``, streams the prepared and
predicted batches into ``ScoringRun.commit`` and ends with ``ScoringRun.summarize``; everything
that must happen between those stages for a run to be exactly-once and accounted for is here.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Callable, Iterable

import pyarrow as pa
import pyarrow.compute as pc

from allcore.scoring.chunks import CompleteInputs, whole_inputs
from allcore.scoring.config import ScoringConfig
from allcore.scoring.drift import write_drift_summary
from allcore.scoring.ledger import Ledger
from allcore.scoring.rows import INPUT_KINDS
from allcore.scoring.store import OutputStore, new_run_id
from allcore.scoring.summary import RunSummary, write_run_report, write_specimen_summary
from allcore.scoring.table import blast_classes, build_output_table, card_summary
from allcore.scoring.tiles import finish_slides, write_slide_outputs
from allcore.trust.checks import NO_TRUST_WARNING, stale_qc_warning

log = logging.getLogger("allcore.score")  # the driver's logger: one run, one name in its lines
PROGRESS_SECONDS = 10.0  # at most one progress line this often between commits


class ScoringRun:
    """A run of ``config`` with the verified ``card`` (and ``cell_card`` with --cell-model).

    Entered (``with``), it takes the writer lock, removes what an interrupted run left
    uncommitted, loads the ledger of its model (empty with ``--full``), notes the runs killed
    before their specimen summary, writes its config and starts its clock; leaving it releases
    the lock. ``commit`` turns scored batches into committed chunks of whole inputs;
    ``summarize`` writes the specimen summary, drift summary, run report and accounting.
    ``on_commit`` is called with each commit record right after it is written (the tests use it
    to kill a run between commits)."""

    def __init__(self, config: ScoringConfig, card, cell_card=None, *,
                 on_commit: Callable[[dict], None] | None = None):
        self.config, self.card, self.cell_card = config, card, cell_card
        self.on_commit = on_commit
        self.store = OutputStore(config.output)
        self.run_id = new_run_id()
        # a new cell model rescores the inputs: its cell rows are new rows
        self.ledger_key = card.weights_sha256 + ("" if cell_card is None
                                                 else f".cell-{cell_card.weights_sha256}")
        self.summary = RunSummary(run_id=self.run_id, output=config.output,
                                  max_error_rate=config.max_error_rate,
                                  max_review_rate=config.max_review_rate)
        self.ledger: Ledger | None = None  # set on entering
        self._started = 0.0
        self._killed: dict[str, list[str]] = {}  # killed run id -> its table files
        self._specimens: set[str] = set()  # specimens to summarise (--per-cell)
        self._run_files: list[str] = []  # uris of this run's table files, for the drift summary
        self._scored_slides: list = []  # ScoredSlide of each slide committed, for the run report
        self._model_summary: dict = {}  # set by commit: what each table file records of the models
        self._blasts: tuple[tuple, tuple] = ((), ())  # and the field and cell models' blast classes

    # ------------------------------------------------------------------ lock, recovery, ledger

    def __enter__(self) -> "ScoringRun":
        self.store.acquire_writer(self.run_id)  # a second concurrent run would delete this one's new files
        try:
            self._open()
        except BaseException:
            self.store.release_writer(self.run_id)
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.store.release_writer(self.run_id)

    def _open(self) -> None:
        store, config, card = self.store, self.config, self.card
        for orphan in store.recover():
            log.warning("removed uncommitted file %s (left by an interrupted run)", orphan)
        self.ledger = Ledger() if config.full else store.ledger(self.ledger_key)
        if not card.trust:
            log.warning("%s", NO_TRUST_WARNING)
        elif stale := stale_qc_warning(card.trust):  # only the field card's QC ranges judge rows
            log.warning("%s", stale)
        store.write_config(self.run_id, config)
        log.info("run %s: model %s %s (%s); %d inputs already committed for it", self.run_id,
                 card.model_name, card.model_version, card.weights_sha256[:12], len(self.ledger))
        # specimens a killed run committed but never summarised: this run summarises them too
        # (noted before this run commits anything, which would make it look killed as well)
        self._killed = store.unsummarised_runs(self.ledger_key) if config.per_cell else {}
        self._specimens = store.column_values(
            [f for files in self._killed.values() for f in files], "specimen_id")
        self._started = time.perf_counter()

    # ------------------------------------------------------------------ commit

    def commit(self, scored: Iterable[pa.Table]) -> None:
        """Commit the rows of complete inputs in chunks of ``commit_every`` rows (and the rest at
        the end); between commits log the images done at most every ``PROGRESS_SECONDS``, so a
        run of large fields shows progress long before its first commit."""
        complete = CompleteInputs()
        self._model_summary = card_summary(self.card, self.cell_card)
        # --per-cell needs the blast classes (specimen summary); field runs fill them if known
        self._blasts = blast_classes(self.card, self.cell_card, required=self.config.per_cell)
        commit_every = self.config.commit_every
        ready: list[pa.Table] = []
        last_line = time.perf_counter()
        for batch in scored:
            rows = finish_slides(complete.add(batch))
            if rows.num_rows:
                ready.append(rows)
            if sum(t.num_rows for t in ready) >= commit_every:
                rest = pa.concat_tables(ready)
                while rest.num_rows >= commit_every:
                    chunk, rest = whole_inputs(rest, commit_every)
                    self._commit_chunk(chunk)
                ready, last_line = ([rest] if rest.num_rows else []), time.perf_counter()
            elif time.perf_counter() - last_line >= PROGRESS_SECONDS:
                self.summary.seconds = time.perf_counter() - self._started
                images = sum(pc.sum(pc.is_in(t["row_kind"], pa.array(INPUT_KINDS))).as_py() or 0
                             for t in ready)
                log.info("scoring: %s", self.summary.progress(uncommitted=images))
                last_line = time.perf_counter()
        if ready:
            self._commit_chunk(pa.concat_tables(ready))
        if complete.pending_rows:  # a bug, not bad input: the accounting line will not balance
            log.error("%d rows of inputs missing some of their cell rows were not committed",
                      complete.pending_rows)

    def _commit_chunk(self, rows: pa.Table) -> None:
        """Table rows from the scored batches' columns, committed as the next chunk, counted, and
        each slide's outputs written once its rows are committed."""
        store, summary = self.store, self.summary
        scored_at = dt.datetime.now(dt.timezone.utc)
        blasts, cell_blasts = self._blasts
        table = build_output_table(rows, run_id=self.run_id, scored_at=scored_at,
                                   model_summary=self._model_summary,
                                   specimen_pattern=self.config.specimen_pattern,
                                   blast_classes=blasts, cell_blast_classes=cell_blasts)
        record = store.commit(table, run_id=self.run_id, chunk=summary.chunks,
                              model_sha256=self.ledger_key, scored_at=scored_at)
        summary.add_commit(record)
        summary.add_reviews(table)
        self._run_files.extend(store.uri(f["path"]) for f in record["files"])
        for slide in write_slide_outputs(store, rows, table):
            self._scored_slides.append(slide)
            log.info("slide %s: %d cells -> %s, overview %s", slide.slide_id, slide.cells,
                     store.uri(slide.geojson), store.uri(slide.overview))
        summary.seconds = time.perf_counter() - self._started
        self._specimens.update(s for s in table["specimen_id"].to_pylist() if s is not None)
        log.info("chunk %d committed: %s", record["chunk"], summary.progress())
        if self.on_commit is not None:
            self.on_commit(record)

    # ------------------------------------------------------------------ summarize

    def summarize(self) -> RunSummary:
        """The specimen summary (--per-cell), the drift summary of this run's files, the run
        report and the accounting (``summary.json``, and ``_SUCCESS`` when the run passed)."""
        store, config, card, run_id, summary = (self.store, self.config, self.card, self.run_id,
                                                self.summary)
        if config.per_cell and self._specimens:
            written = write_specimen_summary(
                store, run_id=run_id, model_sha256=card.weights_sha256,
                classes=(card if self.cell_card is None else self.cell_card).classes,
                specimens=self._specimens,
                scored_date=f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d}")
            log.info("specimen summary of %d specimens -> %s", len(self._specimens), written)
            if self._killed:
                store.mark_summarised(sorted(self._killed), run_id)
                log.info("it covers the specimens of %d run(s) killed before their summary: %s",
                         len(self._killed), ", ".join(sorted(self._killed)))
        if self._run_files:
            drift = write_drift_summary(store.uri(f"_runs/{run_id}"), self._run_files, card.trust,
                                        max_review_rate=config.max_review_rate)
            log.info("drift summary -> %s (%.1f%% of fields flagged for review: %s)",
                     store.uri(f"_runs/{run_id}/drift.json"), 100 * drift["flagged_fraction"],
                     drift["reasons"] or "none")
        summary.seconds = time.perf_counter() - self._started
        log.info("run report -> %s", write_run_report(store, run_id, summary.to_dict(),
                                                      self._scored_slides))
        store.finish(run_id, summary.to_dict(), passed=not summary.failed)
        log.info(summary.line())
        return summary
