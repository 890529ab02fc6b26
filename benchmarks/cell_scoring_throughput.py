"""Throughput of ``--per-cell --cell-model`` scoring (fields/s, cells/s) at two field sizes.

    python benchmarks/cell_scoring_throughput.py --model FIELD_MODEL --cell-model CELL_MODEL \
        --data ../shared/data [--fields 32] [--actors 2]

Scores the first ``--fields`` (sorted by path) 224 px Taleqani fields (``all-taleqani/Original``)
and 2592 x 1944 ALL-IDB fields (``all-idb/ALL_IDB1/im``, the 1712 px ones left out) through
``pipelines.score.run_scoring`` exactly as ``jobs/score.py`` does (run cell diameter estimated
from a sample, 4 fields per block, ``--actors N,N``), into a fresh output each time. Wall time is
listing to the last commit, Ray start excluded (Ray is started once before the first run); on a
shared machine it moves with the load, so the load average is printed beside it.
"""

from __future__ import annotations

import argparse
import os
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
                               actors=(args.actors, args.actors))
        load = os.getloadavg()[0]
        started = time.perf_counter()
        summary = run_scoring(config)
        seconds = time.perf_counter() - started
    return (f"| {name} | {summary.ok} | {summary.cells} | {summary.cell_diameter_px:.1f} | "
            f"{seconds:.1f} | {summary.ok / seconds:.2f} | {summary.cells / seconds:.1f} | {load:.1f} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="field model artifact")
    parser.add_argument("--cell-model", required=True, help="cell model artifact")
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    parser.add_argument("--fields", type=int, default=32, help="fields per size")
    parser.add_argument("--actors", type=int, default=2, help="actor pool size")
    args = parser.parse_args(argv)
    args.model, args.cell_model = os.path.abspath(args.model), os.path.abspath(args.cell_model)

    from pipelines import init_ray

    init_ray()
    sets = {"Taleqani 224 px": fields_of(args.data / "all-taleqani" / "Original", args.fields),
            "ALL-IDB 2592 x 1944": fields_of(args.data / "all-idb" / "ALL_IDB1" / "im", args.fields, 2592)}
    lines = ["| fields | scored | cells | run diameter (px) | wall s | fields/s | cells/s | load avg |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [measure(name, paths, args) for name, paths in sets.items()]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
