"""Whole-slide scoring: speed and memory against fields, and slide calls against field calls.

    python -m benchmarks.slides perf [--model FIELD_MODEL --cell-model CELL_MODEL] [--sides 10000,20000,40000]
    python -m benchmarks.slides all-idb --model FIELD_MODEL --cell-model CELL_MODEL --data ../shared/data

``perf`` generates synthetic slides (``allcore.data.synthetic``: 448 px fields on glass, 0.15 um/px,
a few dozen distinct fields repeated) of each side and scores each with ``jobs/score.py
--per-cell`` as a new process, sampling every 0.2 s the RSS of the driver (that process), of each
Ray worker (the actors and tasks; the largest one and their sum) and of the whole tree (with
Ray's daemons); at 20,000 px it also scores the same fields as separate JPEG images
(``--cell-diameter`` at the slide's cell size, so both find cells at one scale). Printed per run:
wall time, tiles or fields per second, cells per second, peak RSS, the load average; the targets
are ratios: cells/s of the slide over the fields, and peak RSS at the largest side over the
smallest. Without ``--model``/``--cell-model`` it scores with random models of the shipped
recipes' shapes (MobileNetV2: the field model at 256 px as s000, the cell model at 128 px crops
two cell diameters wide as cell_blast): speed does not depend on what the weights learnt.

``all-idb`` lays the 2592 x 1944 ALL_IDB1 development fields of ``--data`` into one slide (0.1
um/px: a 120 px ALL-IDB white cell is 12 um) and scores it, and the same fields as images with
``--mpp`` 0.1 (so both find and crop cells at that one scale), with the same models; per run: annotated blasts inside a found cell and inside a cell called blast
(the field's ``.xyc`` centroids, shifted to slide coordinates for the slide), and the share of
cells on healthy fields (``_0``) called blast. The field model does not make cell calls in
``--cell-model`` runs, so any field model will do. Results go to ``--out`` as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

REPO = Path(__file__).resolve().parents[1]

from allcore.imaging.slides import write_pyramid_tiff
from allcore.data.synthetic import MORPHOLOGIES, make_field, mosaic_offset, mosaic_region
from benchmarks.run import RSS_SAMPLE_SECONDS, _tree_rss

FIELD = 448  # synthetic field side (px)
MPP = 0.15  # synthetic slides: a 448 px field's white cells are ~9-15 um
ALL_IDB_MPP = 0.1  # 120 px ALL-IDB white cells are 12 um
DISTINCT_FIELDS = 36


RAY_AGENTS = ("ray::DashboardAgent", "ray::RuntimeEnvAgent")  # named like workers, but daemons


def rss_by_role(root) -> dict[str, int]:
    """Bytes resident now: the driver (``root``), its Ray workers (processes named ``ray::...``
    by Ray, less its agents: the largest one and their sum) and the whole tree."""
    import psutil

    try:
        driver, children = root.memory_info().rss, root.children(recursive=True)
    except psutil.NoSuchProcess:
        return {}
    workers = []
    for process in children:
        try:
            if process.name().startswith("ray::") and process.name() not in RAY_AGENTS:
                workers.append(process.memory_info().rss)
        except psutil.NoSuchProcess:  # a worker that exited between listing and reading
            pass
    return {"driver": driver, "largest_worker": max(workers, default=0), "workers": sum(workers),
            "tree": _tree_rss(root)}


def score(models: argparse.Namespace, inputs: Path, out: Path, *extra: str) -> dict:
    """``jobs/score.py --per-cell`` in its own process: wall seconds, peak RSS (MB) of the
    driver, the largest worker, all workers and the tree (each its own peak), the load average
    at the end, rows."""
    import psutil

    command = [sys.executable, str(REPO / "jobs" / "score.py"), "--model", models.model,
               "--cell-model", models.cell_model, "--per-cell", "--input", str(inputs),
               "--output", str(out), "--actors", f"{models.actors},{models.actors}",
               "--max-review-rate", "1", "--max-error-rate", "1", *extra]
    started, peaks = time.perf_counter(), {}
    with open(out.with_suffix(".log"), "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=log)
        root = psutil.Process(process.pid)
        while process.poll() is None:
            for role, rss in rss_by_role(root).items():
                peaks[role] = max(peaks.get(role, 0), rss)
            time.sleep(RSS_SAMPLE_SECONDS)
    seconds = time.perf_counter() - started
    if process.returncode not in (0, 3):
        raise RuntimeError(f"{' '.join(command)} exited {process.returncode}; see {out.with_suffix('.log')}")
    rows = pq.ParquetDataset(sorted((out / "predictions").rglob("*.parquet"))).read().to_pandas()
    return {"seconds": seconds, **{f"peak_rss_{role}_mb": v / 2 ** 20 for role, v in peaks.items()},
            "load_average_1min": os.getloadavg()[0], "rows": rows}


def random_artifacts(work: Path) -> tuple[str, str]:
    """(field model, cell model) artifacts with random weights, shaped as ``perf``'s docstring
    says."""
    import torch

    from allcore.models.artifact import ModelCard, save_artifact
    from allcore.data.celldata import CellCropGeometry
    from allcore.data.labels import get_label_set
    from allcore.models.registry import create_model

    torch.manual_seed(0)
    made = []
    for name, label_set, input_size, cell_crop in (
            ("field", "all4", 256, {}),
            ("cell", "blast", 128, CellCropGeometry(side_cell_diameters=2.0, input_size=128).to_card())):
        classes = list(get_label_set(label_set).classes)
        model = create_model("mobilenet_v2", num_classes=len(classes), input_size=input_size).eval()
        card = ModelCard(classes=classes, label_set=label_set, model_version="benchmark-random",
                         cell_crop=cell_crop)
        made.append(save_artifact(str(work / f"{name}-model"), model, card))
    return made[0], made[1]


def synthetic_fields(seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [np.asarray(make_field(rng, i % len(MORPHOLOGIES), FIELD, scale_bar=False)[0])
            for i in range(DISTINCT_FIELDS)]


def perf(args: argparse.Namespace, work: Path) -> dict:
    if args.model is None or args.cell_model is None:
        args.model, args.cell_model = random_artifacts(work)
    distinct = synthetic_fields()
    results = {}
    for side in (int(s) for s in args.sides.split(",")):
        columns = side // FIELD
        fields = [distinct[i % DISTINCT_FIELDS] for i in range(columns * columns)]
        width, height, region = mosaic_region(fields, columns=columns, margin=(side - columns * FIELD) // 2)
        folder = work / f"slide-{side}"
        folder.mkdir()
        started = time.perf_counter()
        write_pyramid_tiff(str(folder / f"synthetic-{side}.tif"), width, height, region, mpp=MPP)
        print(f"[bench] wrote a {width} x {height} slide in {time.perf_counter() - started:.0f} s", flush=True)
        run = score(args, folder, work / f"out-{side}")
        rows = run.pop("rows")
        results[f"slide {side}"] = {**run, "tiles": int((rows["row_kind"] == "tile").sum()),
                                    "cells": int((rows["row_kind"] == "cell").sum())}
        if side == 20000:  # the same fields as separate images
            images = work / "fields-20000"
            images.mkdir()
            for i, field in enumerate(fields):
                Image.fromarray(field).save(images / f"field-{i:05d}.jpg", quality=90)
            diameter = 12.0 / MPP
            run = score(args, images, work / "out-fields-20000", "--cell-diameter", f"{diameter:g}")
            rows = run.pop("rows")
            results["fields 20000"] = {**run, "fields": int((rows["row_kind"] == "field").sum()),
                                       "cells": int((rows["row_kind"] == "cell").sum())}
    for name, r in results.items():
        units = r.get("tiles", r.get("fields"))
        r.update(units_per_s=units / r["seconds"], cells_per_s=r["cells"] / r["seconds"])
        print(f"{name:>14}: {r['seconds']:7.1f} s, {units:6d} {'tiles' if 'tiles' in r else 'fields'} "
              f"({r['units_per_s']:.2f}/s), {r['cells']:6d} cells ({r['cells_per_s']:.1f}/s); peak RSS "
              f"driver {r['peak_rss_driver_mb']:,.0f} MB, largest worker {r['peak_rss_largest_worker_mb']:,.0f} MB, "
              f"workers {r['peak_rss_workers_mb']:,.0f} MB, tree {r['peak_rss_tree_mb']:,.0f} MB; "
              f"load average {r['load_average_1min']:.1f}", flush=True)
    if "slide 20000" in results and "fields 20000" in results:
        results["cells_per_s_slide_over_fields"] = (results["slide 20000"]["cells_per_s"]
                                                    / results["fields 20000"]["cells_per_s"])
    slide_runs = [v for k, v in results.items() if k.startswith("slide")]
    if len(slide_runs) > 1:
        results["peak_rss_largest_over_smallest"] = {
            role: slide_runs[-1][f"peak_rss_{role}_mb"] / slide_runs[0][f"peak_rss_{role}_mb"]
            for role in ("driver", "largest_worker", "workers", "tree")}
    return results


def blast_checks(cells, centroids: list[tuple[float, float]]) -> tuple[int, int]:
    """(annotated blasts inside a found cell, inside a cell called blast)."""
    boxes = cells[["box_x0", "box_y0", "box_x1", "box_y1"]].to_numpy()
    blast = (cells["call"] == "blast").to_numpy()
    found = called = 0
    for x, y in centroids:
        inside = (boxes[:, 0] <= x) & (x < boxes[:, 2]) & (boxes[:, 1] <= y) & (y < boxes[:, 3])
        found += bool(inside.any())
        called += bool((inside & blast).any())
    return found, called


def all_idb(args: argparse.Namespace, work: Path) -> dict:
    from allcore.data.celldata import _centroids, _listed

    root = Path(args.data) / "all-idb"
    listed = [f for f in _listed(str(root), "ALL_IDB1/im")]
    fields, kept = [], []
    for field in listed:
        img = Image.open(field.uri).convert("RGB")
        if img.size == (2592, 1944):
            fields.append(np.asarray(img))
            kept.append(field)
    columns = int(np.ceil(np.sqrt(len(fields))))
    margin = 500
    width, height, region = mosaic_region(fields, columns=columns, margin=margin)
    (work / "slide").mkdir()
    write_pyramid_tiff(str(work / "slide" / "all-idb1-mosaic.tif"), width, height, region, mpp=ALL_IDB_MPP,
                       quality=95)  # the fields are JPEGs already: little second loss
    (work / "fields").mkdir()
    for field in kept:
        Path(work / "fields" / Path(field.uri).name).symlink_to(field.uri)
    runs = {"slide": score(args, work / "slide", work / "out-slide"),
            "fields": score(args, work / "fields", work / "out-fields", "--mpp", f"{ALL_IDB_MPP:g}")}
    results = {"field_count": len(kept), "slide_side": [width, height]}
    for name, run in runs.items():
        rows = run.pop("rows")
        cells = rows[rows["row_kind"] == "cell"]
        found = called = blasts = healthy_cells = healthy_blasts = 0
        abstained = float((cells["call"] == "abstain").mean()) if len(cells) else 0.0
        for i, field in enumerate(kept):
            fx, fy = mosaic_offset(i, columns=columns, margin=margin, field_size=(2592, 1944))
            if name == "slide":
                inside = ((cells["centroid_x"] >= fx) & (cells["centroid_x"] < fx + 2592)
                          & (cells["centroid_y"] >= fy) & (cells["centroid_y"] < fy + 1944))
                own, shift = cells[inside], (fx, fy)
            else:
                own, shift = cells[cells["source_uri"].str.endswith(Path(field.uri).name)], (0, 0)
            if field.label == 1:
                centroids = [(x + shift[0], y + shift[1]) for x, y in _centroids(str(root), field)]
                f, c = blast_checks(own, centroids)
                found, called, blasts = found + f, called + c, blasts + len(centroids)
            else:
                healthy_cells += len(own)
                healthy_blasts += int((own["call"] == "blast").sum())
        results[name] = {**run, "cells": len(cells), "blasts": blasts, "cells_abstained": abstained,
                         "blasts_in_a_cell": found / max(blasts, 1),
                         "blasts_in_a_cell_called_blast": called / max(blasts, 1),
                         "healthy_cells": healthy_cells,
                         "healthy_cells_called_blast": healthy_blasts / max(healthy_cells, 1)}
        r = results[name]
        print(f"{name:>7}: {r['cells']} cells, blasts in a cell {r['blasts_in_a_cell']:.3f}, "
              f"in a cell called blast {r['blasts_in_a_cell_called_blast']:.3f} (n={blasts}); "
              f"healthy cells called blast {r['healthy_cells_called_blast']:.3f} (n={healthy_cells}); "
              f"cells abstained {abstained:.3f}; "
              f"{r['seconds']:.0f} s, peak RSS {r['peak_rss_mb']:,.0f} MB")
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("perf", "all-idb"))
    parser.add_argument("--model", help="field model artifact (perf: random when left out)")
    parser.add_argument("--cell-model", help="cell model artifact (perf: random when left out)")
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--sides", default="10000,20000,40000", help="perf: slide sides in px")
    parser.add_argument("--actors", type=int, default=2)
    parser.add_argument("--out", help="results as JSON")
    args = parser.parse_args(argv)
    if args.what == "all-idb" and (args.model is None or args.cell_model is None):
        parser.error("all-idb compares calls: give the --model and --cell-model to judge")
    with tempfile.TemporaryDirectory(prefix="allcore-slides-") as tmp:
        results = (perf if args.what == "perf" else all_idb)(args, Path(tmp))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
