"""Throughput of ``--per-cell --cell-model`` scoring (fields/s, cells/s) at two field sizes.

    python -m benchmarks.cell_scoring_throughput --model FIELD_MODEL --cell-model CELL_MODEL \
        --data ../shared/data [--fields 32] [--actors 2] [--exact] [--stages | --stages-only]

Scores ``--fields`` (evenly spaced over the sorted paths) 224 px Taleqani fields (``all-taleqani/Original``)
and 2592 x 1944 ALL-IDB fields (``all-idb/ALL_IDB1/im``, the 1712 px ones left out) end to end:
``jobs/score.py --per-cell`` as a new process each time (in-process Ray started and shut down,
run cell diameter estimated from a sample, ``--actors N,N``), into a fresh output, timed from
start to exit. The Taleqani fields are scored twice: first with an empty ONNX export cache (a
first run on a node: every actor exports its models), then again with the exports kept (every
later run: the actors load no torch; ``allcore.scoring.onnx``); the ALL-IDB run comes after, with
the exports kept. The jobs score with the default path (the fastest verified for each model);
``--exact`` with eager fp32. On a shared machine wall time moves with the load, so the load
average is printed beside it.

``--stages`` adds where the time goes, in this process without Ray, on one thread as in a 1-CPU
actor (torch, ONNX Runtime and BLAS): the prepare
stage (``prepare_batch``, its parts timed call by call: the finder, image QC, the cell crops, the
scale-bar mask, reading and decoding) and the predict stage (``Predictor``: field model, cell
model, OOD scores) on the eager and on the fast path, in CPU milliseconds per field (process
time: what a field costs the machine, much less moved by other processes' load than wall time),
and the bound that puts on fields/s with every core busy. ``--stages-only`` skips the jobs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# The stages run as in a scoring worker of pipelines.init_ray: numpy without transparent huge
# pages (pipelines.NUMPY_HUGE_PAGES), which numpy reads once, when it is first imported.
os.environ.setdefault("NUMPY_MADVISE_HUGEPAGE", "0")

from PIL import Image  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

from allcore.imaging.files import IMAGE_EXTENSIONS


def fields_of(folder: Path, count: int, width: int | None = None) -> list[str]:
    """``count`` images under ``folder``, evenly spaced over its sorted paths (so over every class
    folder: Taleqani's classes differ in cells per field, Benign 9 to Pre 19, and with them in
    cost), only those ``width`` px wide if given."""
    paths = [p for p in sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
             if width is None or Image.open(p).width == width]
    step = max(1, len(paths) // count)
    return [str(p) for p in paths[::step][:count]]


def measure(name: str, folder: Path, paths: list[str], args: argparse.Namespace, cache: str) -> str:
    """One table row: ``jobs/score.py`` on ``paths`` as a process of its own, ``cache`` its ONNX
    export cache folder."""
    from allcore.scoring.onnx import CACHE_ENV

    with tempfile.TemporaryDirectory() as tmp:
        listing = Path(tmp) / "inputs.txt"
        listing.write_text("\n".join(os.path.relpath(p, folder) for p in paths) + "\n")
        command = [sys.executable, str(REPO / "jobs" / "score.py"), "--model", args.model,
                   "--cell-model", args.cell_model, "--per-cell", "--input", str(folder),
                   "--manifest", str(listing), "--output", str(Path(tmp) / "out"),
                   "--actors", f"{args.actors},{args.actors}", *(["--exact"] if args.exact else [])]
        load = os.getloadavg()[0]
        started = time.perf_counter()
        # exit 3: the fields were scored and committed, but many were flagged (ALL-IDB fields
        # under a Taleqani field model)
        job = subprocess.run(command, env={**os.environ, CACHE_ENV: cache}, capture_output=True, text=True)
        seconds = time.perf_counter() - started
        if job.returncode not in (0, 3):
            raise SystemExit(f"{name}: jobs/score.py exited {job.returncode}:\n{job.stderr[-3000:]}")
        summary = json.loads(next((Path(tmp) / "out" / "_runs").glob("*/summary.json")).read_text())
    return (f"| {name} | {summary['ok']} | {summary['cells']} | {summary['cell_diameter_px']:.1f} | "
            f"{seconds:.1f} | {summary['ok'] / seconds:.2f} | {summary['cells'] / seconds:.1f} | {load:.1f} |")


# the parts of prepare_batch timed call by call (functions it calls by these names; none of
# them calls another of them)
PREPARE_PARTS = {"cell finder": "find_cells", "image QC": "image_qc", "cell crops": "cell_input",
                 "scale-bar mask": "mask_scale_bar", "read and decode": "load_image"}


@contextlib.contextmanager
def timed_calls(module, names: list[str]):
    """Accumulate the process time of every call to ``module``'s functions ``names`` (seconds
    in the yielded dict); a profiler would slow call-heavy parts (the finder) more than others."""
    spent = dict.fromkeys(names, 0.0)
    originals = {name: getattr(module, name) for name in names}

    def timed(name, function):
        def call(*args, **kwargs):
            started = time.process_time()
            try:
                return function(*args, **kwargs)
            finally:
                spent[name] += time.process_time() - started
        return call

    for name in names:
        setattr(module, name, timed(name, originals[name]))
    try:
        yield spent
    finally:
        for name, function in originals.items():
            setattr(module, name, function)


def stage_times(name: str, paths: list[str], args: argparse.Namespace) -> list[str]:
    """Table rows: CPU milliseconds per field of each stage, in this process on one thread, and
    the fields/s that prepare plus the fast predict allow on ``os.cpu_count()`` busy cores."""
    import numpy as np
    import threadpoolctl
    import torch

    from allcore.models.artifact import read_card
    from allcore.imaging.cells import CellFinderConfig, median_cell_diameter
    from allcore.imaging.files import decode_rgb, read_bytes
    from allcore.scoring import prepare
    from allcore.scoring.predict import Predictor

    # one thread for everything, as in a 1-CPU actor (Ray sets OMP_NUM_THREADS=1 there): torch,
    # ONNX Runtime (which follows torch) and BLAS, whose second thread spin-waiting after the OOD
    # scores' matrix products added ~3.5 ms a field of process time
    torch.set_num_threads(1)
    threadpoolctl.threadpool_limits(1)
    diameter = median_cell_diameter(decode_rgb(read_bytes(p)) for p in paths)
    kwargs = prepare.prepare_kwargs(read_card(args.model), cell_card=read_card(args.cell_model),
                                    cell_finder=CellFinderConfig(cell_diameter_px=diameter))
    n = len(paths)
    batch = {"source_uri": np.array(paths, object), "source_size": np.zeros(n, np.int64),
             "source_mtime": np.array(["0"] * n, object), "listing_error": np.array([""] * n, object),
             "error_kind": np.array([""] * n, object)}
    prepare.prepare_batch(batch, **kwargs)  # warm-up (lazy imports, first-call allocation)
    with timed_calls(prepare, list(PREPARE_PARTS.values())) as spent:
        started = time.process_time()
        prepared = prepare.prepare_batch(batch, **kwargs)
        prepare_s = time.process_time() - started
    rows = [f"| {name} | prepare (all) | {1000 * prepare_s / n:.1f} |"]
    rows += [f"| {name} | prepare: {part} | {1000 * spent[function] / n:.1f} |"
             for part, function in PREPARE_PARTS.items()]
    predict_s = {}
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
    parser.add_argument("--stages-only", action="store_true", help="only the stages, no jobs")
    args = parser.parse_args(argv)
    # absolute: the jobs are processes of their own
    args.model, args.cell_model = os.path.abspath(args.model), os.path.abspath(args.cell_model)
    args.data = args.data.resolve()

    sets = {"Taleqani 224 px": args.data / "all-taleqani" / "Original",
            "ALL-IDB 2592 x 1944": args.data / "all-idb" / "ALL_IDB1" / "im"}
    chosen = {name: fields_of(folder, args.fields, 2592 if name.startswith("ALL-IDB") else None)
              for name, folder in sets.items()}
    for name, paths in chosen.items():
        if not paths:
            parser.error(f"no {name} fields under {sets[name]}: --data is the folder holding "
                         "all-taleqani/ and all-idb/ (../shared/data)")
    lines = []
    if not args.stages_only:
        lines += ["| fields | scored | cells | run diameter (px) | wall s | fields/s | cells/s | load avg |",
                  "|---|---|---|---|---|---|---|---|"]
        with tempfile.TemporaryDirectory() as cache:
            taleqani = "Taleqani 224 px"
            lines.append(measure(f"{taleqani}, export cache empty", sets[taleqani],
                                 chosen[taleqani], args, cache))
            lines += [measure(f"{name}, exports kept", sets[name], chosen[name], args, cache)
                      for name in sets]
    if args.stages or args.stages_only:
        lines += ["", "| fields | stage (one thread, no Ray) | CPU ms per field |", "|---|---|---|"]
        lines += [row for name, paths in chosen.items() for row in stage_times(name, paths, args)]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
