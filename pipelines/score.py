"""Ray Data wiring for nightly batch scoring: list → prepare (CPU tasks) → Predictor (actor pool).

The listing is consumed in chunks of ``commit_every`` inputs; each chunk is one small Ray
Dataset whose result is committed (see ``allcore.scoring.OutputStore``) before the next chunk is
listed, so the driver holds one chunk of names at a time and a crash loses at most one chunk.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Callable

import pyarrow as pa
import ray

from allcore.artifact import read_card
from allcore.inference import Predictor, prepare_batch, prepare_kwargs
from allcore.scoring import (OK, OutputStore, RunSummary, ScoringConfig, build_output_table,
                             card_summary, chunked, input_key, iter_inputs, new_run_id)

log = logging.getLogger("allcore.score")


def _score_chunk(items: list[dict], config: ScoringConfig, card, num_gpus: int) -> pa.Table:
    """Run one chunk through both stages and collect it on the driver (names and numbers only:
    pixels never leave the workers)."""
    dataset = (
        ray.data.from_items(items)
        .map_batches(prepare_batch, batch_size=config.batch_size,
                     fn_kwargs=prepare_kwargs(card, max_pixels=config.max_pixels))
        .map_batches(Predictor, batch_size=config.batch_size, concurrency=tuple(config.actors),
                     num_gpus=num_gpus,
                     fn_constructor_kwargs={"artifact_uri": config.model,
                                            "expected_sha256": card.weights_sha256})
    )
    return pa.concat_tables(dataset.iter_batches(batch_size=None, batch_format="pyarrow"))


def run_scoring(config: ScoringConfig, *,
                on_commit: Callable[[dict], None] | None = None) -> RunSummary:
    """Score every input of ``config`` not yet committed for this model; return the accounting.

    ``on_commit`` is called with each commit record right after it is written (progress
    reporting; the tests use it to crash a run between chunks).
    """
    if not ray.is_initialized():
        ray.init()  # joins RAY_ADDRESS / `ray job submit`'s cluster, else starts one in-process
    card = read_card(config.model)
    model_summary = card_summary(card)
    num_gpus = 1 if ray.cluster_resources().get("GPU", 0) > 0 else 0
    store = OutputStore(config.output)
    for orphan in store.recover():
        log.warning("removed uncommitted file %s (left by an interrupted run)", orphan)
    done = set() if config.full else store.ledger(card.weights_sha256)
    summary = RunSummary(run_id=new_run_id(), output=config.output,
                         max_error_rate=config.max_error_rate)
    store.write_config(summary.run_id, config)
    log.info("run %s: model %s %s (%s), %d inputs already committed, %s",
             summary.run_id, card.model_name, card.model_version, card.weights_sha256[:12],
             len(done), "GPU" if num_gpus else "CPU")
    started = time.perf_counter()
    for chunk_index, infos in enumerate(chunked(iter_inputs(config), config.commit_every)):
        summary.listed += len(infos)
        todo = []
        for info in infos:
            key = input_key(info)
            if key not in done:  # also drops a path listed twice in one run
                done.add(key)
                todo.append(info)
        summary.skipped += len(infos) - len(todo)
        if not todo:
            continue
        chunk_started = time.perf_counter()
        scored_at = dt.datetime.now(dt.timezone.utc)
        scored = _score_chunk([{"source_uri": i.uri, "source_size": i.size,
                                "source_mtime": i.mtime_or_etag} for i in todo],
                              config, card, num_gpus)
        if scored.num_rows != len(todo):  # never commit a chunk that would mark lost rows done
            raise RuntimeError(f"chunk {chunk_index}: {len(todo)} inputs went in but "
                               f"{scored.num_rows} rows came out; nothing was committed for it")
        table = build_output_table(scored, run_id=summary.run_id, scored_at=scored_at,
                                   model_summary=model_summary,
                                   specimen_pattern=config.specimen_pattern)
        record = store.commit(table, run_id=summary.run_id, chunk=chunk_index,
                              inputs=[input_key(i) for i in todo],
                              model_sha256=card.weights_sha256, scored_at=scored_at)
        summary.ok += record["counts"][OK]
        summary.errors += table.num_rows - record["counts"][OK]
        summary.chunks += 1
        summary.seconds = time.perf_counter() - started
        log.info("chunk %d: %d listed, %d scored (%d errors), %d skipped, %.1f images/s -> %s",
                 chunk_index, len(infos), table.num_rows, table.num_rows - record["counts"][OK],
                 len(infos) - len(todo), table.num_rows / (time.perf_counter() - chunk_started),
                 record["files"][0]["path"])
        if on_commit is not None:
            on_commit(record)
    summary.seconds = time.perf_counter() - started
    store.finish(summary)
    log.info(summary.line())
    return summary
