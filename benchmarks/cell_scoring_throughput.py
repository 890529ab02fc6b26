"""Throughput of ``--per-cell --cell-model`` scoring (fields/s, cells/s) at two field sizes.

    python benchmarks/cell_scoring_throughput.py --model FIELD_MODEL --cell-model CELL_MODEL \
        --data ../shared/data [--fields 32] [--actors 2] [--exact] [--stages | --stages-only]

Scores the first ``--fields`` (sorted by path) 224 px Taleqani fields (``all-taleqani/Original``)
and 2592 x 1944 ALL-IDB fields (``all-idb/ALL_IDB1/im``, the 1712 px ones left out) through
``pipelines.score.run_scoring`` exactly as ``jobs/score.py`` does (run cell diameter estimated
from a sample, blocks of ``per_cell_blocks``, ``--actors N,N``), into a fresh output each time. Wall time is
listing to the last commit, Ray start excluded (Ray is started once before the first run); on a
shared machine it moves with the load, so the load average is printed beside it. The jobs
score with the default path (the fastest verified for each model); ``--exact`` with eager fp32.

``--stages`` adds where the time goes, in this process without Ray, one thread: the prepare
stage (``prepare_batch``, split into the finder, image QC and the cell crops by profiling) and
the predict stage (``Predictor``: field model, cell model, OOD scores) on the eager and on the
fast path, in CPU milliseconds per field (process time: what a field costs the machine, much
less moved by other processes' load than wall time), and the bound that puts on fields/s with
every core busy. ``--stages-only`` skips the Ray jobs.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from allcore.io import IMAGE_EXTENSIONS  # noqa: E402
from allcore.scoring.config import ScoringConfig  # noqa: E402


def fields_of(folder: Path, count: int, width: int | None = None) -> list[str]:
    """The first ``count`` images under ``folder`` (sorted), only those ``width`` px wide if given."""
    chosen = []
    for path in sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS):
        if width is None or Image.open(path).width == width:
            chosen.append(str(path))
        if len(chosen) == count:
            break
    return chosen


def measure(name: str, paths: list[str], args: argparse.Namespace) -> str:
    from pipelines.score import run_scoring

    with tempfile.TemporaryDirectory() as tmp:
        listing = Path(tmp) / "inputs.txt"
        listing.write_text("\n".join(paths) + "\n")
        config = ScoringConfig(model=args.model, input=tmp, output=str(Path(tmp) / "out"),
                               input_list=str(listing), per_cell=True, cell_model=args.cell_model,
                               actors=(args.actors, args.actors),
                               inference="exact" if args.exact else "auto")
        load = os.getloadavg()[0]
        started = time.perf_counter()
        summary = run_scoring(config)
        seconds = time.perf_counter() - started
    return (f"| {name} | {summary.ok} | {summary.cells} | {summary.cell_diameter_px:.1f} | "
            f"{seconds:.1f} | {summary.ok / seconds:.2f} | {summary.cells / seconds:.1f} | {load:.1f} |")


# prepare-stage functions whose cumulative time is reported (``--stages``)
PREPARE_PARTS = {"cell finder": "find_cells", "diameter estimate": "estimate_cell_diameter",
                 "image QC": "image_qc", "cell crops": "cell_input",
                 "scale-bar mask": "mask_scale_bar", "decode": "decode_rgb"}


def stage_times(name: str, paths: list[str], args: argparse.Namespace) -> list[str]:
    """Table rows: CPU milliseconds per field of each stage, in this process on one thread, and
    the fields/s that prepare plus the fast predict allow on ``os.cpu_count()`` busy cores."""
    import numpy as np
    import torch

    from allcore.artifact import read_card
    from allcore.cells import CellFinderConfig, median_cell_diameter
    from allcore.io import decode_rgb, read_bytes
    from allcore.scoring.predict import Predictor
    from allcore.scoring.prepare import prepare_batch, prepare_kwargs

    torch.set_num_threads(1)
    diameter = median_cell_diameter(decode_rgb(read_bytes(p)) for p in paths)
    kwargs = prepare_kwargs(read_card(args.model), cell_finder=CellFinderConfig(cell_diameter_px=diameter),
                            cell_card=read_card(args.cell_model))
    n = len(paths)
    batch = {"source_uri": np.array(paths, object), "source_size": np.zeros(n, np.int64),
             "source_mtime": np.array(["0"] * n, object), "listing_error": np.array([""] * n, object),
             "error_kind": np.array([""] * n, object)}
    profile = cProfile.Profile(time.process_time)
    started = time.process_time()
    profile.runcall(prepare_batch, batch, **kwargs)
    profiled_s = time.process_time() - started
    started = time.process_time()
    prepared = prepare_batch(batch, **kwargs)
    prepare_s = time.process_time() - started
    # the profiler slows call-heavy code most: each part is its share of the profiled run
    # applied to the time without the profiler
    cumulative = {func[2]: row[3] * prepare_s / profiled_s
                  for func, row in pstats.Stats(profile).stats.items()}
    rows = [f"| {name} | prepare (all) | {1000 * prepare_s / n:.1f} |"]
    predict_s = {}
    rows += [f"| {name} | prepare: {part} | {1000 * cumulative.get(function, 0.0) / n:.1f} |"
             for part, function in PREPARE_PARTS.items()]
    for path_name, fast in (("eager", False), ("fast", True)):
        predictor = Predictor(args.model, cell_artifact_uri=args.cell_model, fast=fast,
                              cell_fast=fast)
        predictor(prepared)  # warm-up (export, first-call allocation)
        started = time.process_time()
        predictor(prepared)
        predict_s[path_name] = time.process_time() - started
        rows.append(f"| {name} | predict, {path_name} path | {1000 * predict_s[path_name] / n:.1f} |")
    cores = os.cpu_count() or 1
    rows.append(f"| {name} | bound on {cores} cores: fields/s (prepare + fast predict) | "
                f"{cores * n / (prepare_s + predict_s['fast']):.1f} |")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="field model artifact")
    parser.add_argument("--cell-model", required=True, help="cell model artifact")
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    parser.add_argument("--fields", type=int, default=32, help="fields per size")
    parser.add_argument("--actors", type=int, default=2, help="actor pool size")
    parser.add_argument("--exact", action="store_true", help="score the jobs with eager fp32 (--exact)")
    parser.add_argument("--stages", action="store_true", help="also time each stage in-process")
    parser.add_argument("--stages-only", action="store_true", help="only the stages, no Ray jobs")
    args = parser.parse_args(argv)
    # absolute: the input list's relative entries are read against the job's --input folder
    args.model, args.cell_model = os.path.abspath(args.model), os.path.abspath(args.cell_model)
    args.data = args.data.resolve()

    sets = {"Taleqani 224 px": fields_of(args.data / "all-taleqani" / "Original", args.fields),
            "ALL-IDB 2592 x 1944": fields_of(args.data / "all-idb" / "ALL_IDB1" / "im", args.fields, 2592)}
    lines = []
    if not args.stages_only:
        from pipelines import init_ray

        init_ray()
        lines += ["| fields | scored | cells | run diameter (px) | wall s | fields/s | cells/s | load avg |",
                  "|---|---|---|---|---|---|---|---|"]
        lines += [measure(name, paths, args) for name, paths in sets.items()]
    if args.stages or args.stages_only:
        lines += ["", "| fields | stage (one thread, no Ray) | CPU ms per field |", "|---|---|---|"]
        lines += [row for name, paths in sets.items() for row in stage_times(name, paths, args)]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
