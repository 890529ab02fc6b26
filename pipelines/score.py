"""Ray Data wiring for batch scoring, in stage order:

    list (driver) -> prepare (CPU tasks) -> predict (actor pool) -> table -> commit -> summarise

The driver lists the inputs in chunks of ``commit_every`` names, drops those the ledger says are
done, and puts each chunk into the object store, so it never holds millions of names itself.
One streaming dataset then prepares and scores them all (the actor pool loads the model once per
actor), and the driver turns every ``commit_every`` result rows into output rows and commits them
(``allcore.scoring.store``): a crash loses at most the uncommitted rows, which the next run
scores again. The driver logs one progress line per commit (images done / total, rate, time
left); Ray's own INFO logs and progress bars are off unless ``config.verbose``.

On a CPU-only cluster Ray Data fuses prepare into the actor pool (same resources), so
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
from allcore.artifact import load_artifact
from allcore.cells import CellFinderConfig
from allcore.labels import LABEL_SETS, get_label_set
from allcore.scoring.config import ScoringConfig
from allcore.scoring.drift import write_drift_summary
from allcore.scoring.inputs import chunked, iter_inputs, new_inputs
from allcore.scoring.predict import Predictor
from allcore.scoring.prepare import prepare_batch, prepare_kwargs
from allcore.scoring.store import CompleteInputs, Ledger, OutputStore, new_run_id
from allcore.scoring.summary import RunSummary, write_specimen_summary
from allcore.scoring.table import build_output_table, card_summary
from allcore.trust import NO_TRUST_WARNING

log = logging.getLogger("allcore.score")


def run_scoring(config: ScoringConfig, *,
                on_commit: Callable[[dict], None] | None = None) -> RunSummary:
    """Score every input of ``config`` not yet committed for this model; return the accounting.

    ``on_commit`` is called with each commit record right after it is written (the tests use it
    to kill a run between commits). With ``config.per_cell`` each input gives a field row and
    one row per white cell; an input's rows are committed together, and at the end the specimen
    summary of the specimens this run scored is written beside the table.
    """
    # the weights' integrity, on the driver before the lock, the listing or Ray: a tampered
    # artifact ends here with one ArtifactIntegrityError line, not in every actor
    _, card = load_artifact(config.model)
    store = OutputStore(config.output)
    run_id = new_run_id()
    store.acquire_writer(run_id)  # a second concurrent run would delete this one's new files
    try:
        return _score(config, store, run_id, card, on_commit)
    finally:
        store.release_writer(run_id)


def _score(config: ScoringConfig, store: OutputStore, run_id: str, card,
           on_commit: Callable[[dict], None] | None) -> RunSummary:
    for orphan in store.recover():
        log.warning("removed uncommitted file %s (left by an interrupted run)", orphan)
    done = Ledger() if config.full else store.ledger(card.weights_sha256)
    summary = RunSummary(run_id=run_id, output=config.output, max_error_rate=config.max_error_rate,
                         max_review_rate=config.max_review_rate)
    if not card.trust:
        log.warning("%s", NO_TRUST_WARNING)
    store.write_config(run_id, config)
    log.info("run %s: model %s %s (%s); %d inputs already committed for it", run_id,
             card.model_name, card.model_version, card.weights_sha256[:12], len(done))
    started = time.perf_counter()

    # list
    blocks = _list_todo(config, done, summary)
    log.info("listed %d inputs: %d to score, %d skipped", summary.listed, summary.to_score,
             summary.skipped)
    specimens: set[str] = set()
    run_files: list[str] = []
    if blocks:
        _quiet_ray(config.verbose)
        # prepare -> predict
        scored = _scored_batches(config, card, blocks)
        # table -> commit
        complete = CompleteInputs()
        model_summary = card_summary(card)
        # --per-cell needs the blast classes (specimen summary); field runs fill them if known
        blasts = (get_label_set(card.label_set).blast_classes_of(card.classes)
                  if config.per_cell or card.label_set in LABEL_SETS else ())
        for batch in scored:
            rows = complete.add(batch)
            if rows.num_rows == 0:
                continue
            scored_at = dt.datetime.now(dt.timezone.utc)
            table = build_output_table(rows, run_id=run_id, scored_at=scored_at,
                                       model_summary=model_summary,
                                       specimen_pattern=config.specimen_pattern,
                                       blast_classes=blasts)
            record = store.commit(table, run_id=run_id, chunk=summary.chunks,
                                  model_sha256=card.weights_sha256, scored_at=scored_at)
            summary.add_commit(record)
            summary.add_reviews(table)
            run_files += [store.uri(f["path"]) for f in record["files"]]
            summary.seconds = time.perf_counter() - started
            specimens.update(s for s in table["specimen_id"].to_pylist() if s is not None)
            log.info("chunk %d committed: %s", record["chunk"], summary.progress())
            if on_commit is not None:
                on_commit(record)
        if complete.pending_rows:  # a bug, not bad input: the accounting line will not balance
            log.error("%d rows of inputs missing some of their cell rows were not committed",
                      complete.pending_rows)
    # summarise
    if config.per_cell and specimens:
        written = write_specimen_summary(
            store, run_id=run_id, model_sha256=card.weights_sha256, classes=card.classes,
            specimens=specimens, scored_date=f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d}")
        log.info("specimen summary of %d specimens -> %s", len(specimens), written)
    if run_files:
        drift = write_drift_summary(store.uri(f"_runs/{run_id}"), run_files, card.trust,
                                    max_review_rate=config.max_review_rate)
        log.info("drift summary -> %s (%.1f%% of fields flagged for review: %s)",
                 store.uri(f"_runs/{run_id}/drift.json"), 100 * drift["flagged_fraction"],
                 drift["reasons"] or "none")
    summary.seconds = time.perf_counter() - started
    store.finish(run_id, summary.to_dict(), passed=not summary.failed)
    log.info(summary.line())
    return summary


def _list_todo(config: ScoringConfig, done: Ledger, summary: RunSummary) -> list:
    """Object refs of Arrow tables of the inputs to score; counts listed and skipped."""
    refs = []
    for listed, todo in new_inputs(iter_inputs(config), done, config.commit_every):
        summary.listed += listed
        summary.skipped += listed - len(todo)
        # one block per model batch, so every actor of the pool gets work
        for block in chunked(todo, config.batch_size):
            init_ray(verbose=config.verbose)  # only once there is work: a rerun with nothing new costs just the listing
            refs.append(ray.put(pa.table({"source_uri": [i.uri for i in block],
                                          "source_size": [i.size for i in block],
                                          "source_mtime": [i.mtime_or_etag for i in block],
                                          "listing_error": [i.listing_error for i in block],
                                          "error_kind": [i.error_kind for i in block]})))
    return refs


def _scored_batches(config: ScoringConfig, card, blocks: list):
    """prepare (a CPU function) then predict (``Predictor`` actors), streamed back to the driver
    in batches of ``commit_every`` rows."""
    num_gpus = 1 if config.gpu or ray.cluster_resources().get("GPU", 0) > 0 else 0
    log.info("inference on %s", "GPU actors" if num_gpus else "CPU actors")
    finder = CellFinderConfig() if config.per_cell else None
    return (
        ray.data.from_arrow_refs(blocks)
        .map_batches(prepare_batch, batch_size=config.batch_size,
                     fn_kwargs=prepare_kwargs(card, max_pixels=config.max_pixels,
                                              cell_finder=finder))
        .map_batches(Predictor, batch_size=config.batch_size, num_gpus=num_gpus,
                     compute=ray.data.ActorPoolStrategy(min_size=config.actors[0],
                                                        max_size=config.actors[1]),
                     fn_constructor_kwargs={"artifact_uri": config.model,
                                            "expected_sha256": card.weights_sha256,
                                            "fast": config.fast})
        .iter_batches(batch_size=config.commit_every, batch_format="pyarrow")
    )


def _quiet_ray(verbose: bool) -> None:
    """Ray Data's progress bars count blocks, not images (a whole per-cell run shows 0/1), and
    its INFO logs are for Ray developers: off unless asked for; ``RunSummary.progress`` replaces
    them."""
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = verbose
    context.enable_operator_progress_bars = verbose
    context.enable_auto_log_stats = verbose
    for name in ("ray", "ray.data"):
        logging.getLogger(name).setLevel(logging.INFO if verbose else logging.WARNING)
