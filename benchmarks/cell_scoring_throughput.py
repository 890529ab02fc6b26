"""Throughput of ``--per-cell --cell-model`` scoring (fields/s, cells/s) at two field sizes.

    python benchmarks/cell_scoring_throughput.py --model FIELD_MODEL --cell-model CELL_MODEL \
        --data ../shared/data [--fields 32] [--actors 2]

Scores the first ``--fields`` (sorted by path) 224 px Taleqani fields (``all-taleqani/Original``)
and 2592 x 1944 ALL-IDB fields (``all-idb/ALL_IDB1/im``, the 1712 px ones left out) through
``pipelines.score.run_scoring`` exactly as ``jobs/score.py`` does (run cell diameter estimated
from a sample, 4 fields per block, ``--actors N,N``), into a fresh output each time. Wall time is
listing to the last commit, Ray start excluded (Ray is started once before the first run); on a
shared machine it moves with the load, so the load average is printed beside it.

``--stages`` adds where the time goes, in this process without Ray, one thread: the prepare
stage (``prepare_batch``, split into the finder, image QC and the cell crops by profiling) and
the predict stage (``Predictor``: field model, cell model, OOD scores) on the eager and on the
fast path, per field. ``--fast`` runs the Ray Data jobs with ``--fast``.
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
                               inference="fast" if args.fast else "exact")
        load = os.getloadavg()[0]
        started = time.perf_counter()
        summary = run_scoring(config)
        seconds = time.perf_counter() - started
    return (f"| {name} | {summary.ok} | {summary.cells} | {summary.cell_diameter_px:.1f} | "
            f"{seconds:.1f} | {summary.ok / seconds:.2f} | {summary.cells / seconds:.1f} | {load:.1f} |")


# prepare-stage functions whose cumulative time is reported (``--stages``)
PREPARE_PARTS = {"cell finder": "find_cells", "diameter estimate": "estimate_cell_diameter",
                 "image QC": "image_qc", "cell crops": "cell_input"}


def stage_times(name: str, paths: list[str], args: argparse.Namespace) -> list[str]:
    """Table rows: milliseconds per field of each stage, in this process on one thread."""
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
    profile = cProfile.Profile()
    started = time.perf_counter()
    profile.runcall(prepare_batch, batch, **kwargs)
    prepare_s = time.perf_counter() - started
    prepared = prepare_batch(batch, **kwargs)
    cumulative = {func[2]: row[3] for func, row in pstats.Stats(profile).stats.items()}
    rows = [f"| {name} | prepare (all) | {1000 * prepare_s / n:.1f} |"]
    rows += [f"| {name} | prepare: {part} | {1000 * cumulative.get(function, 0.0) / n:.1f} |"
             for part, function in PREPARE_PARTS.items()]
    for path_name, fast in (("eager", False), ("fast", True)):
        predictor = Predictor(args.model, cell_artifact_uri=args.cell_model, fast=fast,
                              cell_fast=fast)
        predictor(prepared)  # warm-up (export, first-call allocation)
        started = time.perf_counter()
        predictor(prepared)
        rows.append(f"| {name} | predict, {path_name} path | "
                    f"{1000 * (time.perf_counter() - started) / n:.1f} |")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="field model artifact")
    parser.add_argument("--cell-model", required=True, help="cell model artifact")
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    parser.add_argument("--fields", type=int, default=32, help="fields per size")
    parser.add_argument("--actors", type=int, default=2, help="actor pool size")
    parser.add_argument("--fast", action="store_true", help="score with the fast path (--fast)")
    parser.add_argument("--stages", action="store_true", help="also time each stage in-process")
    args = parser.parse_args(argv)
    args.model, args.cell_model = os.path.abspath(args.model), os.path.abspath(args.cell_model)

    from pipelines import init_ray

    init_ray()
    sets = {"Taleqani 224 px": fields_of(args.data / "all-taleqani" / "Original", args.fields),
            "ALL-IDB 2592 x 1944": fields_of(args.data / "all-idb" / "ALL_IDB1" / "im", args.fields, 2592)}
    lines = ["| fields | scored | cells | run diameter (px) | wall s | fields/s | cells/s | load avg |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [measure(name, paths, args) for name, paths in sets.items()]
    if args.stages:
        lines += ["", "| fields | stage (one thread, no Ray) | ms per field |", "|---|---|---|"]
        lines += [row for name, paths in sets.items() for row in stage_times(name, paths, args)]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
