"""Ray Data wiring for nightly batch scoring: list → prepare (CPU) → Predictor (actor pool).

The driver lists the inputs in chunks of ``commit_every`` names, drops those the ledger says are
done, and puts each chunk into the object store, so it never holds millions of names itself.
One streaming dataset then scores them all (the actor pool loads the model once per actor), and
the driver commits every ``commit_every`` result rows (see ``allcore.scoring.OutputStore``): a
crash loses at most the uncommitted rows, which the next run scores again.

On a CPU-only cluster Ray Data fuses the two stages into the actor pool (same resources), so
``--actors`` also bounds decoding; with GPUs they stay separate and decoding overlaps inference.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Callable

import pyarrow as pa
import ray

from pipelines import init_ray
from allcore.artifact import read_card
from allcore.inference import Predictor, prepare_batch, prepare_kwargs
from allcore.percell import (BLAST_CLASSES, CompleteInputs, blast_classes, prepare_cells_batch,
                             write_specimen_summary)
from allcore.scoring import (CELL, ERROR, OK, OutputStore, RunSummary, ScoringConfig,
                             build_output_table, card_summary, chunked, input_digest, iter_inputs,
                             new_run_id)

log = logging.getLogger("allcore.score")


def _list_todo(config: ScoringConfig, done: set[bytes], summary: RunSummary) -> list:
    """Object refs of Arrow tables of the inputs to score; counts listed and skipped."""
    refs = []
    for infos in chunked(iter_inputs(config), config.commit_every):
        summary.listed += len(infos)
        todo = []
        for info in infos:
            digest = input_digest(info.uri, info.size, info.mtime_or_etag)
            if digest not in done:  # also drops a path listed twice in one run
                done.add(digest)
                todo.append(info)
        summary.skipped += len(infos) - len(todo)
        # one block per model batch, so every actor of the pool gets work
        for block in chunked(todo, config.batch_size):
            init_ray()  # only once there is work: a rerun with nothing new costs just the listing
            refs.append(ray.put(pa.table({"source_uri": [i.uri for i in block],
                                          "source_size": [i.size for i in block],
                                          "source_mtime": [i.mtime_or_etag for i in block]})))
    return refs


def run_scoring(config: ScoringConfig, *,
                on_commit: Callable[[dict], None] | None = None) -> RunSummary:
    """Score every input of ``config`` not yet committed for this model; return the accounting.

    ``on_commit`` is called with each commit record right after it is written (progress
    reporting; the tests use it to kill a run between commits).

    With ``config.per_cell`` each input gives a field row and one row per white cell
    (``allcore.percell``); an input's rows are committed together, and at the end the specimen
    summary of the specimens this run scored is written beside the table.
    """
    store = OutputStore(config.output)
    run_id = new_run_id()
    store.acquire_writer(run_id)  # a second concurrent run would delete this one's new files
    try:
        return _score(config, store, run_id, on_commit)
    finally:
        store.release_writer(run_id)


def _score(config: ScoringConfig, store: OutputStore, run_id: str,
           on_commit: Callable[[dict], None] | None) -> RunSummary:
    card = read_card(config.model)
    model_summary = card_summary(card)
    for orphan in store.recover():
        log.warning("removed uncommitted file %s (left by an interrupted run)", orphan)
    done = set() if config.full else store.ledger(card.weights_sha256)
    summary = RunSummary(run_id=run_id, output=config.output,
                         max_error_rate=config.max_error_rate)
    store.write_config(summary.run_id, config)
    log.info("run %s: model %s %s (%s); %d inputs already committed for it",
             summary.run_id, card.model_name, card.model_version, card.weights_sha256[:12],
             len(done))
    started = time.perf_counter()
    refs = _list_todo(config, done, summary)
    log.info("listed %d inputs: %d to score, %d skipped", summary.listed,
             summary.listed - summary.skipped, summary.skipped)
    # --per-cell needs the blast classes (specimen summary); whole-image runs fill them if known
    blasts = (blast_classes(card.label_set, card.classes)
              if config.per_cell or card.label_set in BLAST_CLASSES else ())
    complete, specimens = CompleteInputs(), set()
    if refs:
        num_gpus = 1 if config.gpu or ray.cluster_resources().get("GPU", 0) > 0 else 0
        log.info("inference on %s", "GPU actors" if num_gpus else "CPU actors")
        scored_batches = (
            ray.data.from_arrow_refs(refs)
            .map_batches(prepare_cells_batch if config.per_cell else prepare_batch,
                         batch_size=config.batch_size,
                         fn_kwargs=prepare_kwargs(card, max_pixels=config.max_pixels))
            .map_batches(Predictor, batch_size=config.batch_size, num_gpus=num_gpus,
                         compute=ray.data.ActorPoolStrategy(min_size=config.actors[0],
                                                            max_size=config.actors[1]),
                         fn_constructor_kwargs={"artifact_uri": config.model,
                                                "expected_sha256": card.weights_sha256,
                                                "fast": config.fast})
            .iter_batches(batch_size=config.commit_every, batch_format="pyarrow")
        )
        for batch in scored_batches:
            scored = complete.add(batch)
            if scored.num_rows == 0:
                continue
            chunk = summary.chunks
            scored_at = dt.datetime.now(dt.timezone.utc)
            table = build_output_table(scored, run_id=summary.run_id, scored_at=scored_at,
                                       model_summary=model_summary,
                                       specimen_pattern=config.specimen_pattern,
                                       blast_classes=blasts)
            record = store.commit(table, run_id=summary.run_id, chunk=chunk,
                                  model_sha256=card.weights_sha256, scored_at=scored_at)
            errors = record["counts"][ERROR]
            summary.ok, summary.errors = summary.ok + record["counts"][OK], summary.errors + errors
            summary.cells += record["counts"][CELL]
            specimens.update(s for s in table["specimen_id"].to_pylist() if s is not None)
            summary.chunks += 1
            summary.seconds = time.perf_counter() - started
            log.info("chunk %d: %d rows (%d errors) -> %s; %d/%d scored, %.1f images/s",
                     chunk, table.num_rows, errors, record["files"][0]["path"], summary.scored,
                     summary.listed - summary.skipped, summary.scored / summary.seconds)
            if on_commit is not None:
                on_commit(record)
    if complete.pending_rows:  # a bug, not bad input: the accounting line will not balance
        log.error("%d rows of inputs missing some of their cell rows were not committed",
                  complete.pending_rows)
    if config.per_cell and specimens:
        written = write_specimen_summary(
            store, run_id=summary.run_id, model_sha256=card.weights_sha256, classes=card.classes,
            specimens=specimens, scored_date=f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d}")
        log.info("specimen summary of %d specimens -> %s", len(specimens), written)
    summary.seconds = time.perf_counter() - started
    store.finish(summary)
    log.info(summary.line())
    return summary
