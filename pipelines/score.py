"""Ray Data wiring for batch scoring, in stage order:

    list (driver) -> [expand slides into tiles] -> prepare (CPU tasks) -> predict (actor pool)
        -> commit (driver) -> summarize (driver)

The driver lists the inputs in chunks of ``commit_every`` names, drops those the ledger says are
done, and puts the rest into the object store as blocks (``todo_blocks``: a few input-sized ones
so every actor starts at once, then large ones, so a listing of millions costs a few thousand
puts), so it never holds millions of names itself. It imports no torch: the model is verified by
its weight file's sha256 and built only in the actors (``Predictor``). One streaming dataset
then prepares and scores them all (the actor pool loads the model once per actor). What the
driver does around that, Ray-free, is ``allcore.scoring.run.ScoringRun``: the writer lock, the
ledger, every ``commit_every`` result rows turned into output rows and committed (a crash loses
at most the uncommitted rows, which the next run scores again), one progress line per commit
(images done / total, rate, time left) and the summaries. Ray's own INFO logs and progress bars
are off unless ``config.verbose``.

A whole-slide input is listed as one row like any file (a DICOM-WSI slide, a folder of .dcm
instances, as one row for the folder); when the listing names possible slides
(``allcore.imaging.slides.SLIDE_EXTENSIONS``, DICOM-WSI folders) a ``flat_map`` stage turns each into
its slide row and one row per tile (``allcore.scoring.tiles.expand_input``), re-blocked a few
tiles a block so one slide's tiles spread over every actor. The driver commits a slide once all
its tiles are back (``allcore.scoring.chunks.CompleteInputs``), after counting each cell once
(``finish_slides``), then writes the slide's GeoJSON and overview image
(``write_slide_outputs``); the run's report page shows every slide it scored
(``write_run_report``).

On a CPU-only cluster Ray Data fuses prepare into the actor pool (same resources), so
``--actors`` also bounds decoding; with GPUs they stay separate and decoding overlaps inference.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterable, Iterator

import pyarrow as pa
import ray

from pipelines import init_ray, quiet_logs
from allcore.imaging import slides
from allcore.models.artifact import verified_card
from allcore.data.celldata import CellCropGeometry
from allcore.imaging.cells import CellFinderConfig
from allcore.scoring.config import ScoringConfig
from allcore.imaging.files import FileInfo
from allcore.scoring.inference_path import artifact_inference_path
from allcore.scoring.inputs import chunked, iter_inputs, new_inputs
from allcore.scoring.ledger import Ledger
from allcore.scoring.predict import Predictor
from allcore.scoring.prepare import prepare_batch, prepare_kwargs, sampled_cell_diameter
from allcore.scoring.run import ScoringRun
from allcore.scoring.summary import RunSummary
from allcore.scoring.tiles import expand_input, run_working_mpp

log = logging.getLogger("allcore.score")
PER_CELL_BLOCK_BYTES = 384 * 1024  # --per-cell blocks: consecutive inputs up to this many bytes
PER_CELL_BLOCK_INPUTS = 64  # of image files, at most this many, at least one: a large field is a
# block of its own, so large fields spread over every actor, and small ones share a block instead
# of paying the per-block overhead each (docs/PERFORMANCE.md, "Per-cell scoring")
SMALL_BLOCKS_PER_ACTOR = 4  # field runs: the first blocks hold one model batch each ...
LARGE_BLOCK_INPUTS = 4096  # ... the rest this many inputs (benchmarks/listing_puts.py)
DIAMETER_SAMPLE = 32  # inputs whose median white-cell size is the run's cell diameter
TILES_PER_BLOCK = 2  # slide runs: rows a block after expansion (a per-cell tile takes ~0.3 s)


def run_scoring(config: ScoringConfig, *,
                on_commit: Callable[[dict], None] | None = None) -> RunSummary:
    """Score every input of ``config`` not yet committed for this model; return the accounting.

    ``on_commit`` is called with each commit record right after it is written (the tests use it
    to kill a run between commits). With ``config.per_cell`` each input gives a field row and
    one row per white cell; an input's rows are committed together, and at the end the specimen
    summary of the specimens this run scored (and of those a killed run committed but did not
    summarise) is written beside the table.
    """
    # every file of both artifacts checked against its card on the driver, before the lock, the
    # listing or Ray: a tampered artifact ends here with one ArtifactIntegrityError line
    card, cell_card = _verified_cards(config)
    # the writer lock, what an interrupted run left, the ledger (allcore.scoring.run)
    with ScoringRun(config, card, cell_card, on_commit=on_commit) as run:
        # list
        blocks, sample, may_hold_slides = _list_todo(config, run.ledger, run.summary)
        log.info("listed %d inputs: %d to score, %d skipped", run.summary.listed,
                 run.summary.to_score, run.summary.skipped)
        if blocks:
            _quiet_ray(config.verbose)
            finder = _cell_finder(config, card, sample, run.summary) if config.per_cell else None
            # prepare -> predict
            scored = _scored_batches(config, card, cell_card, finder, blocks, run.summary,
                                     may_hold_slides)
            # commit
            run.commit(scored)
        # summarize
        return run.summarize()


def _verified_cards(config: ScoringConfig):
    """The model card and, with ``--cell-model``, the cell model's card, each after every file
    it lists was checked against it (``verified_card``, no model built): a corrupt artifact stops
    the run here, on the driver, not in every actor."""
    card = verified_card(config.model)
    if config.cell_model is None:
        if config.per_cell:
            log.warning("--per-cell without --cell-model: cell rows are the field model applied "
                        "to crops, which was never validated against people's cell labels "
                        "(docs/CELLS.md); pass a cell model, e.g. one trained with the "
                        "cell_blast recipe")
        return card, None
    cell_card = verified_card(config.cell_model)
    CellCropGeometry.from_card(cell_card)  # refuses a field model passed as --cell-model
    log.info("cell model %s %s (%s)", cell_card.model_name, cell_card.model_version,
             cell_card.weights_sha256[:12])
    return card, cell_card


def _cell_finder(config: ScoringConfig, card, sample: list[str],
                 summary: RunSummary) -> CellFinderConfig:
    """The finder with one white-cell diameter for the whole run: ``--cell-diameter``, else the
    median of the per-field estimates over ``sample`` (docs/CELLS.md: one diameter per archive
    finds cells more precisely than each field's own estimate). Recorded in the run summary."""
    diameter, source = config.cell_diameter_px, "given (--cell-diameter)"
    if diameter is None and config.mpp is not None:
        diameter = slides.WHITE_CELL_DIAMETER_UM / config.mpp
        source = f"{slides.WHITE_CELL_DIAMETER_UM:g} um at --mpp {config.mpp:g} um/px"
    if diameter is None:
        diameter = sampled_cell_diameter(sample, data_config=card.data_config_obj(),
                                          max_pixels=config.max_pixels)
        source = f"median estimate over {len(sample)} sampled inputs"
    if diameter is None:
        log.warning("no white-cell stain in the %d sampled inputs: the cell diameter is estimated "
                    "per field; pass --cell-diameter PX if cells are missed", len(sample))
        source = "per field (nothing to measure in the sample)"
    else:
        log.info("cell diameter %.1f px, %s", diameter, source)
    summary.cell_diameter_px, summary.cell_diameter_source = diameter, source
    return CellFinderConfig(cell_diameter_px=diameter)


def _list_todo(config: ScoringConfig, done: Ledger, summary: RunSummary) -> tuple[list, list[str], bool]:
    """Object refs of Arrow tables of the inputs to score, a random sample of their camera
    fields' uris (``DIAMETER_SAMPLE``, for the run's cell diameter; slides have theirs from their
    pixel size), and whether any name may be a slide; counts listed and skipped."""
    sample, seen, rng = [], 0, random.Random(0)
    may_hold_slides = False

    def todo_chunks() -> Iterator[list[FileInfo]]:
        nonlocal seen, may_hold_slides
        for listed, todo in new_inputs(iter_inputs(config), done, config.commit_every):
            summary.listed += listed
            summary.skipped += listed - len(todo)
            for info in todo:  # reservoir sampling: a uniform sample of a list streamed once
                if slides.is_slide_name(info.uri):
                    may_hold_slides = True
                    continue
                seen += 1
                if len(sample) < DIAMETER_SAMPLE:
                    sample.append(info.uri)
                elif (slot := rng.randrange(seen)) < DIAMETER_SAMPLE:
                    sample[slot] = info.uri
            yield todo

    refs = []
    for block in todo_blocks(config, todo_chunks()):
        init_ray(verbose=config.verbose)  # only once there is work: a rerun with nothing new costs just the listing
        refs.append(ray.put(pa.table({"source_uri": [i.uri for i in block],
                                      "source_size": [i.size for i in block],
                                      "source_mtime": [i.mtime_or_etag for i in block],
                                      "listing_error": [i.listing_error for i in block],
                                      "error_kind": [i.error_kind for i in block]})))
    return refs, sample, may_hold_slides


def todo_blocks(config: ScoringConfig, todo_chunks: Iterable[list]) -> Iterator[list]:
    """The to-do list, arriving in listing chunks, cut into blocks of ``todo_block_inputs``; the
    last inputs (fewer than a large block) in batch-sized blocks again, so the actors finish
    together. ``--per-cell``: blocks by file bytes (``per_cell_blocks``)."""
    if config.per_cell:
        yield from per_cell_blocks(info for todo in todo_chunks for info in todo)
        return
    pending: list = []
    blocks = 0
    for todo in todo_chunks:
        pending.extend(todo)
        while len(pending) >= (size := todo_block_inputs(config, blocks)):
            yield pending[:size]
            del pending[:size]
            blocks += 1
    yield from chunked(pending, config.batch_size)


def per_cell_blocks(todo: Iterable[FileInfo]) -> Iterator[list[FileInfo]]:
    """``--per-cell`` blocks: consecutive inputs up to ``PER_CELL_BLOCK_BYTES`` of files, at
    most ``PER_CELL_BLOCK_INPUTS``, at least one. A field's cost grows with its pixels, which its
    file size follows, so large fields spread over every actor and small ones do not pay the
    per-block overhead one by one."""
    block: list[FileInfo] = []
    size = 0
    for info in todo:
        if block and (size + info.size > PER_CELL_BLOCK_BYTES or len(block) == PER_CELL_BLOCK_INPUTS):
            yield block
            block, size = [], 0
        block.append(info)
        size += max(info.size, 0)
    if block:
        yield block


def todo_block_inputs(config: ScoringConfig, blocks_so_far: int) -> int:
    """Inputs in the next block of a field run's to-do list: one model batch each for the first
    ``SMALL_BLOCKS_PER_ACTOR`` blocks per actor, so every actor starts at once and a small run
    spreads evenly, then ``LARGE_BLOCK_INPUTS`` (``todo_blocks`` cuts the tail batch-sized
    again): each block is one ``ray.put``, and one a batch made a first run of millions of
    inputs wait minutes before scoring started (docs/SCORING.md, "The ledger at scale")."""
    if blocks_so_far < SMALL_BLOCKS_PER_ACTOR * config.actors[1]:
        return config.batch_size
    return max(config.batch_size, LARGE_BLOCK_INPUTS)


def _scored_batches(config: ScoringConfig, card, cell_card, finder: CellFinderConfig | None,
                    blocks: list, summary: RunSummary, may_hold_slides: bool):
    """[slides into tiles,] prepare (a CPU function) then predict (``Predictor`` actors),
    streamed back to the driver block by block as they finish. Each model's inference path is
    decided here, once, and recorded in the run summary."""
    num_gpus = 1 if config.gpu or ray.cluster_resources().get("GPU", 0) > 0 else 0
    log.info("inference on %s", "GPU actors" if num_gpus else "CPU actors")
    cards = {"model": (config.model, card), "cell_model": (config.cell_model, cell_card)}
    paths = {role: artifact_inference_path(uri, c, mode=config.inference, cuda=num_gpus > 0)
             for role, (uri, c) in cards.items() if c is not None}
    for role, path in paths.items():
        log.info("%s %s scores with %s: %s", role, cards[role][1].model_name, path.name, path.reason)
        summary.inference[role] = {"path": path.name, "reason": path.reason}
    # --per-cell: both stages take each block whole (``per_cell_blocks`` sized it; the model gets
    # its fields' cells). A row count for the model would make Ray bundle that many *inputs* per
    # task once prepare is fused into the actors (the larger of the two batch sizes wins), and
    # pile large fields into one task on one actor (docs/PERFORMANCE.md, "Per-cell scoring")
    batch_size = None if finder else config.batch_size
    dataset = ray.data.from_arrow_refs(blocks)
    if may_hold_slides:
        working_mpp = run_working_mpp(finder, cell_card)
        summary.slide_working_mpp = working_mpp
        log.info("slides are tiled at %.3f um/px (a %g um white cell %.0f px wide)", working_mpp,
                 slides.WHITE_CELL_DIAMETER_UM, slides.WHITE_CELL_DIAMETER_UM / working_mpp)
        dataset = _without_cpus(dataset.flat_map(expand_input, num_cpus=0, fn_kwargs={
            "working_mpp": working_mpp, "mpp": config.mpp, "max_pixels": config.max_pixels})
            .repartition(target_num_rows_per_block=TILES_PER_BLOCK))
    return (
        dataset
        .map_batches(prepare_batch, batch_size=batch_size,
                     fn_kwargs=prepare_kwargs(card, max_pixels=config.max_pixels,
                                              cell_finder=finder, cell_card=cell_card, mpp=config.mpp))
        .map_batches(Predictor, batch_size=batch_size, num_gpus=num_gpus,
                     compute=ray.data.ActorPoolStrategy(min_size=config.actors[0],
                                                        max_size=config.actors[1]),
                     fn_constructor_kwargs={"artifact_uri": config.model,
                                            "device": "cuda" if num_gpus else "cpu",
                                            "expected_sha256": card.weights_sha256,
                                            "fast": paths["model"].fast,
                                            "cell_artifact_uri": config.cell_model,
                                            "cell_fast": "cell_model" in paths and paths["cell_model"].fast,
                                            "cell_expected_sha256": (None if cell_card is None
                                                                     else cell_card.weights_sha256)})
        .iter_batches(batch_size=None, batch_format="pyarrow")
    )


def _without_cpus(dataset):
    """``dataset`` whose last operator (the slides' re-blocking) asks for no CPU, like the
    expansion before it: the actor pool may hold every CPU of a node (``--actors 2,2`` on two
    cores), and a task waiting for one would never feed it (the whole run hung). Both are light:
    a slide's header, thumbnail and hash, then slicing tile rows. ``repartition`` takes no
    resource arguments, so they are set on its logical operator (Ray 2.60's
    ``StreamingRepartition.ray_remote_args``; tests/test_slides.py runs with every CPU held)."""
    dataset._logical_plan.dag.ray_remote_args["num_cpus"] = 0  # the operator is frozen, its dict not
    return dataset


def _quiet_ray(verbose: bool) -> None:
    """Ray Data's progress bars count blocks, not images (a whole per-cell run shows 0/1), and
    its INFO logs are for Ray developers: off unless asked for; ``RunSummary.progress`` replaces
    them."""
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = verbose
    context.enable_operator_progress_bars = verbose
    context.enable_auto_log_stats = verbose
    quiet_logs(verbose)
