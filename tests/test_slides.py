"""Whole-slide scoring: readers, pixel size, tiling at one physical scale, cells counted once,
slide rows through the pipeline (exactly once per slide, error rows), GeoJSON, s3."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import tracemalloc
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from allcore.imaging import slides
from allcore.imaging.cells import CellFinderConfig
from allcore.scoring.prepare import prepare_batch
from allcore.scoring.rows import CELL, SLIDE, TILE
from allcore.scoring.tiles import expand_input, finish_slides
from allcore.data.synthetic import make_field, mosaic_region, write_slide

DATA_CONFIG = {"input_size": 64, "mean": [0.5] * 3, "std": [0.25] * 3}
WORKING_MPP = slides.working_mpp(CellFinderConfig().working_diameter_px)


def listed(path) -> dict:
    stat = os.stat(path)
    return {"source_uri": str(path), "source_size": stat.st_size, "source_mtime": str(stat.st_mtime_ns),
            "listing_error": "", "error_kind": ""}


def slide_cells(path, *, mpp=None) -> pa.Table:
    """A slide's rows as the pipeline makes them, without Ray: expand, prepare every tile, then
    the driver's once-only step."""
    rows = expand_input(listed(path), working_mpp=WORKING_MPP, mpp=mpp, max_pixels=40_000_000)
    batch = {k: np.array([r[k] for r in rows], dtype=object if isinstance(rows[0][k], str) else None)
             for k in rows[0]}
    prepared = prepare_batch(batch, data_config=DATA_CONFIG, cell_finder=CellFinderConfig())
    prepared.pop("pixels")
    return finish_slides(pa.table(prepared))


def centre_inside(box, x, y) -> bool:
    return box[0] <= x < box[2] and box[1] <= y < box[3]


@pytest.fixture(scope="module")
def synthetic_slide(tmp_path_factory):
    path = tmp_path_factory.mktemp("slides") / "case-1.tif"
    return path, write_slide(path, seed=3)


def test_both_readers_open_the_written_pyramid_with_its_pixel_size(synthetic_slide):
    path, _ = synthetic_slide
    tiff, openslide_reader = slides.TiffSlideReader(str(path)), slides.OpenSlideReader(str(path))
    assert tiff.level_dimensions == openslide_reader.level_dimensions
    assert len(tiff.level_dimensions) == 4 and tiff.level_downsamples[:2] == (1.0, 2.0)
    assert tiff.mpp == pytest.approx((0.15, 0.15)) and openslide_reader.mpp == pytest.approx((0.15, 0.15))
    for level in (0, 2):
        a = tiff.read_region((700, 500), level, (300, 200)).astype(int)
        b = openslide_reader.read_region((700, 500), level, (300, 200)).astype(int)
        assert a.shape == b.shape == (200, 300, 3)
        assert np.abs(a - b).mean() < 2  # the same JPEG tiles, two decoders
    beyond = tiff.read_region((tiff.dimensions[0] - 10, 0), 0, (40, 8))
    assert (beyond[:, 10:] == 255).all()  # past the slide's edge: white glass


def test_ome_tiff_pixel_size_and_no_pixel_size(tmp_path):
    import tifffile

    pixels = np.full((600, 800, 3), 200, np.uint8)
    tifffile.imwrite(tmp_path / "ome.ome.tif", pixels, tile=(256, 256), photometric="rgb",
                     metadata={"axes": "YXS", "PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5})
    assert slides.TiffSlideReader(str(tmp_path / "ome.ome.tif")).mpp == pytest.approx((0.5, 0.5))
    slides.write_pyramid_tiff(str(tmp_path / "bare.tif"), 800, 600, lambda x, y, w, h: pixels[:h, :w], mpp=None)
    reader = slides.TiffSlideReader(str(tmp_path / "bare.tif"))
    assert reader.mpp is None
    with pytest.raises(slides.SlideError, match="--mpp"):
        slides.slide_scale(reader, working_mpp=0.4)
    assert slides.slide_scale(reader, working_mpp=0.4, mpp_override=0.1).level == 2  # 0.4 um/px


def test_aperio_svs_through_openslide_with_its_mpp(tmp_path):
    """A TIFF whose description is Aperio's is an .svs to OpenSlide (vendor 'aperio')."""
    import openslide

    pixels = np.full((512, 768, 3), 210, np.uint8)
    path = tmp_path / "scan.svs"
    import tifffile
    with tifffile.TiffWriter(path) as writer:
        writer.write(pixels, tile=(256, 256), photometric="rgb", compression="jpeg", metadata=None,
                     description="Aperio Image Library v12.0.0\n768x512 (256x256) JPEG/RGB Q=90|AppMag = 40|MPP = 0.2520")
    reader = slides.open_slide(str(path))
    assert isinstance(reader, slides.OpenSlideReader)
    assert openslide.OpenSlide(str(path)).properties["openslide.vendor"] == "aperio"
    assert reader.mpp == pytest.approx((0.252, 0.252))


def test_reading_a_region_never_decodes_the_whole_level(tmp_path):
    side = 8192  # 192 MiB of level 0
    rng = np.random.default_rng(0)
    block = rng.integers(150, 250, (256, 256, 3), dtype=np.uint8)
    slides.write_pyramid_tiff(str(tmp_path / "big.tif"), side, side,
                              lambda x, y, w, h: block[:h, :w], mpp=0.25, levels=2)
    reader = slides.TiffSlideReader(str(tmp_path / "big.tif"))
    tracemalloc.start()
    region = reader.read_region((4000, 4000), 0, (512, 512))
    thumbnail = reader.thumbnail(512)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert region.shape == (512, 512, 3) and thumbnail.size == (512, 512)
    assert peak < 40 * 2 ** 20, f"peak {peak / 2 ** 20:.0f} MiB while a level is 192 MiB or 48 MiB"


def test_every_cell_once_at_its_slide_coordinates_even_across_tile_borders(synthetic_slide):
    path, truth = synthetic_slide
    table = slide_cells(path)
    kinds = table["row_kind"].to_pylist()
    assert kinds.count(SLIDE) == 1
    cells = table.filter(pa.array([k == CELL for k in kinds]))
    cx, cy = cells["centroid_x"].to_pylist(), cells["centroid_y"].to_pylist()
    # the test means something only if tile borders cross cells
    spec = json.loads(table.filter(pa.array([k == TILE for k in kinds]))["tile_spec"][0].as_py())
    border = (spec["core"][2] - spec["core"][0]) * spec["working_mpp"] / spec["mpp"]
    straddling = [b for b in truth if any(b[0] < k * border < b[2] or b[1] < k * border < b[3]
                                          for k in (1, 2))]
    assert len(straddling) >= 3
    hits = Counter(i for x, y in zip(cx, cy) for i, box in enumerate(truth) if centre_inside(box, x, y))
    assert max(hits.values()) == 1, "a cell was counted twice"
    assert len(hits) >= 0.95 * len(truth)  # found, at the right place in level-0 pixels
    assert all(i in hits for i, b in enumerate(truth) if b in straddling)
    assert len(cells) <= len(truth) + 2  # few found cells that are no cell
    slide_row = table.filter(pa.array([k == SLIDE for k in kinds]))
    assert slide_row["cell_count"][0].as_py() == len(cells)
    tile_counts = [c for c, k in zip(table["cell_count"].to_pylist(), kinds) if k == TILE]
    assert sum(tile_counts) == len(cells)


def test_the_same_cells_at_two_pixel_sizes(tmp_path, synthetic_slide):
    """A slide scanned at 0.15 um/px and the same slide at 0.30 um/px give the same cells, in um."""
    path, _ = synthetic_slide
    fine = slides.TiffSlideReader(str(path))
    width, height = (v // 2 for v in fine.dimensions)
    coarse_path = tmp_path / "case-1-coarse.tif"
    slides.write_pyramid_tiff(str(coarse_path), width, height,
                              lambda x, y, w, h: fine.read_region((2 * x, 2 * y), 1, (w, h)), mpp=0.30)

    def micrometres(p):
        cells = slide_cells(p).to_pandas().query("row_kind == 'cell'")
        return np.stack([cells["centroid_x"] * cells["mpp"], cells["centroid_y"] * cells["mpp"]], 1)

    a, b = micrometres(path), micrometres(coarse_path)
    assert abs(len(a) - len(b)) <= 1
    nearest = np.sqrt(((a[:, None] - b[None]) ** 2).sum(-1)).min(1)
    assert np.median(nearest) < 0.5 and (nearest < 2.0).mean() >= 0.95  # um; a cell is ~12 um


def test_glass_is_not_tiled_and_a_missing_pixel_size_is_an_error_row(tmp_path):
    rng = np.random.default_rng(1)
    field = np.asarray(make_field(rng, 1, 448, scale_bar=False)[0])
    width, height, region = mosaic_region([field], columns=1, margin=3000)  # one field on glass
    slides.write_pyramid_tiff(str(tmp_path / "sparse.tif"), width, height, region, mpp=0.15)
    reader = slides.TiffSlideReader(str(tmp_path / "sparse.tif"))
    scale = slides.slide_scale(reader, working_mpp=WORKING_MPP)
    tiles = slides.plan_tiles(reader, scale)
    core = slides.TILE_CORE_CELL_DIAMETERS * scale.cell_diameter_px * scale.level0_per_working
    assert 1 <= len(tiles) <= 4 < (width / core) * (height / core)  # the field's tiles only

    slides.write_pyramid_tiff(str(tmp_path / "no-mpp.tif"), width, height, region, mpp=None)
    [row] = expand_input(listed(tmp_path / "no-mpp.tif"), working_mpp=WORKING_MPP, max_pixels=10**8)
    assert "--mpp" in json.loads(row["tile_spec"])["error"]
    rows = expand_input(listed(tmp_path / "no-mpp.tif"), working_mpp=WORKING_MPP, mpp=0.15,
                        max_pixels=10**8)
    assert len(rows) == 1 + len(tiles)  # with --mpp it tiles like the slide that says its size


def test_a_small_flat_tif_stays_a_field(tmp_path):
    Image.new("RGB", (300, 200), (230, 200, 210)).save(tmp_path / "field.tif")
    [row] = expand_input(listed(tmp_path / "field.tif"), working_mpp=WORKING_MPP, max_pixels=10**8)
    assert row["slide_id"] == "" and row["tile_index"] == -1


def test_duplicate_cells_keeps_the_deeper_copy():
    boxes = np.array([[0, 0, 10, 10], [1, 0, 11, 10], [30, 30, 40, 40], [100, 100, 110, 110]])
    drop = slides.duplicate_cells(boxes, tiles=np.array([0, 1, 1, 1]), depths=np.array([2.0, 5.0, 1, 1]))
    assert drop.tolist() == [True, False, False, False]
    same_tile = slides.duplicate_cells(boxes[:2], tiles=np.array([0, 0]), depths=np.array([1.0, 2.0]))
    assert not same_tile.any()  # the finder's own split of touching cells is kept


@pytest.mark.shared_data
def test_all_idb_fields_as_a_slide_give_their_blasts_at_slide_coordinates(tmp_path, shared_data):
    """Four ALL_IDB1 development fields laid into one slide: the annotated blast centroids, moved
    to slide coordinates, fall in found cells as often as in the fields scored as images."""
    from allcore.data.celldata import _centroids, _listed

    root = shared_data.parent / "all-idb"
    chosen = [f for f in _listed(str(root), "ALL_IDB1/im") if Image.open(f.uri).size == (2592, 1944)][:4]
    fields = [np.asarray(Image.open(f.uri).convert("RGB")) for f in chosen]
    width, height, region = mosaic_region(fields, columns=2, margin=400)
    slides.write_pyramid_tiff(str(tmp_path / "idb.tif"), width, height, region, mpp=0.1)
    cells = slide_cells(tmp_path / "idb.tif").to_pandas().query("row_kind == 'cell'")
    boxes = cells[["box_x0", "box_y0", "box_x1", "box_y1"]].to_numpy()

    def found(points, candidate_boxes) -> int:
        return sum(any(centre_inside(b, x, y) for b in candidate_boxes) for x, y in points)

    in_slide = in_fields = total = field_cells = 0
    for i, field in enumerate(chosen):
        fx, fy = 400 + (i % 2) * 2592, 400 + (i // 2) * 1944
        centroids = _centroids(str(root), field)
        batch = {k: np.array([v], dtype=object) for k, v in listed(field.uri).items()}
        rows = prepare_batch(batch, data_config=DATA_CONFIG, mpp=0.1,
                             cell_finder=CellFinderConfig(cell_diameter_px=120.0))
        field_boxes = [b for b, k in zip(zip(*(rows[f"box_{c}"] for c in ("x0", "y0", "x1", "y1"))),
                                         rows["row_kind"]) if k == CELL]
        field_cells += len(field_boxes)
        in_fields += found(centroids, field_boxes)
        in_slide += found([(x + fx, y + fy) for x, y in centroids], boxes)
        total += len(centroids)
    assert total >= 4 and in_slide >= in_fields - 1 and in_slide >= 0.9 * total
    assert abs(len(cells) - field_cells) <= 0.1 * field_cells


def test_slide_geojson_is_qupath_detections_in_level0_pixels_with_probabilities_and_review_flag(
        tmp_path, tiny_artifact, tiny_cell_artifact):
    """The issue's shape: a FeatureCollection of 'detection' objects, classification {name,
    color}, measurements a map of numbers holding the call's probabilities and the review flag,
    each cell's box as a closed polygon in level-0 slide pixels."""
    import jsonschema

    from allcore.review.geojson import slide_feature_collection
    from conftest import score_slide

    path = tmp_path / "case-4.tif"
    write_slide(path, columns=2, rows=2, seed=8)
    width, height = slides.TiffSlideReader(str(path)).dimensions
    trust = {"temperature": 1.0, "ood": {"method": "mahalanobis", "threshold": 1.0}, "qc_reference": {}}
    _, table = score_slide(path, tiny_artifact, tiny_cell_artifact, trust=trust)
    cells = table.to_pandas().query("row_kind == 'cell'").set_index("cell_id")
    collection = slide_feature_collection(cells.reset_index())
    jsonschema.validate(collection, QUPATH_DETECTIONS)
    assert len(collection["features"]) == len(cells) > 0
    for feature in collection["features"]:
        cell = cells.loc[feature["id"]]
        x0, y0, x1, y1 = (int(cell[f"box_{k}"]) for k in ("x0", "y0", "x1", "y1"))
        assert feature["geometry"]["coordinates"] == [[[x0, y0], [x0, y1], [x1, y1], [x1, y0], [x0, y0]]]
        assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height  # level 0, not the working scale
        measurements = feature["properties"]["measurements"]
        assert measurements["blast_probability"] == pytest.approx(cell["blast_probability"])
        assert measurements["confidence"] == pytest.approx(cell["confidence"])
        assert measurements["needs_review"] == float(cell["needs_review"])  # the flag, as 0/1
        assert feature["properties"]["classification"]["name"] == cell["pred_label"]


# ------------------------------------------------------------------ through the pipeline (Ray)

@pytest.mark.slow
def test_slides_score_exactly_once_with_error_rows_and_outputs(tmp_path, ray_session, tiny_artifact,
                                                               tiny_cell_artifact):
    import jsonschema

    from allcore.scoring.config import ScoringConfig
    from pipelines.score import run_scoring

    archive = tmp_path / "in"
    archive.mkdir()
    truth = write_slide(archive / "case-1.tif", columns=4, rows=3, seed=5)
    write_slide(archive / "case-2.tif", columns=2, rows=2, mpp=None, seed=6)
    (archive / "broken.svs").write_bytes(b"not a slide")
    Image.fromarray(np.asarray(make_field(np.random.default_rng(2), 0, 224)[0])).save(archive / "field.jpg")
    config = ScoringConfig(model=tiny_artifact, input=str(archive), output=str(tmp_path / "out"),
                           per_cell=True, cell_model=tiny_cell_artifact, actors=(2, 2),  # every CPU
                           commit_every=1, max_error_rate=1.0, max_review_rate=1.0)

    def crash(record: dict) -> None:
        raise KeyboardInterrupt("simulated kill after the first input")

    with pytest.raises(KeyboardInterrupt):
        run_scoring(config, on_commit=crash)
    resumed = run_scoring(config)
    assert resumed.listed == 4 and resumed.balanced and resumed.skipped <= 1
    again = run_scoring(config)  # the nightly rerun: only the slide without a pixel size is retried
    assert (again.skipped, again.errors, again.ok) == (3, 1, 0)
    with_mpp = run_scoring(dataclasses.replace(config, mpp=0.15))
    assert (with_mpp.skipped, with_mpp.ok, with_mpp.errors) == (3, 1, 0)

    files = sorted((tmp_path / "out" / "predictions").rglob("*.parquet"))
    table = pa.concat_tables([pq.read_table(f) for f in files], promote_options="default").to_pandas()
    inputs = table[table["row_kind"].isin(["field", "slide"])]
    counts = Counter(Path(u).name for u in inputs["source_uri"])
    assert counts.pop("case-2.tif") in (3, 4)  # an error row per run that tried it (the killed one may have)
    assert counts == {"case-1.tif": 1, "broken.svs": 1, "field.jpg": 1}  # each exactly once
    errors = inputs[inputs["status"] == "error"].groupby("slide_id")["error"].first()
    assert "--mpp" in errors["case-2"] and "unreadable slide" in errors["broken"]
    assert (inputs.query("slide_id == 'case-2'")["status"] == "ok").sum() == 1  # with --mpp
    cells = table[(table["row_kind"] == "cell") & (table["slide_id"] == "case-1")]
    assert cells["cell_id"].is_unique and len(cells) >= 0.9 * len(truth)
    assert len(cells) == int(inputs.query("slide_id == 'case-1'")["cell_count"].iloc[0])
    assert cells["centroid_x_um"].notna().all() and np.allclose(cells["mpp"], 0.15, rtol=1e-5)
    assert (cells["specimen_id"] == "case-1").all()
    summaries = [pq.read_table(f).to_pandas() for f in (tmp_path / "out" / "specimen_summary").rglob("*.parquet")]
    case_1 = [s.set_index("specimen_id").loc["case-1"] for s in summaries if "case-1" in set(s["specimen_id"])]
    assert case_1 and all(int(row["cells_total"]) == len(cells) for row in case_1)

    geojson = json.loads(next((tmp_path / "out" / "slides").glob("case-1-*.geojson")).read_text())
    jsonschema.validate(geojson, QUPATH_DETECTIONS)
    assert len(geojson["features"]) == len(cells)
    first = geojson["features"][0]["properties"]
    assert {"blast_probability", "confidence"} <= set(first["measurements"])  # needs_review: none
    assert first["call"] in ("blast", "not blast") and first["needs_review"] is None  # (no trust)
    overview = Image.open(next((tmp_path / "out" / "slides").glob("case-1-*.png")))
    assert max(overview.size) == slides.THUMBNAIL_SIDE
    # a run's report shows the slides it scored (the --mpp run: case-2 alone; the run before it
    # none), each overview linked to its GeoJSON, by paths relative to the page
    runs = tmp_path / "out" / "_runs"
    links = re.findall(r"(?:src|href)='([^']+)'", (runs / with_mpp.run_id / "report.html").read_text())
    assert sorted(Path(h).suffix for h in links) == [".geojson", ".geojson", ".png"]
    assert all(Path(h).name.startswith("case-2-") and (runs / with_mpp.run_id / h).resolve().is_file()
               for h in links)
    assert "<img" not in (runs / again.run_id / "report.html").read_text()


QUPATH_DETECTIONS = {  # what QuPath's GeoJSON import reads for a detection object
    "type": "object", "required": ["type", "features"],
    "properties": {"type": {"const": "FeatureCollection"}, "features": {"type": "array", "items": {
        "type": "object", "required": ["type", "geometry", "properties"],
        "properties": {
            "type": {"const": "Feature"},
            "geometry": {"type": "object", "required": ["type", "coordinates"], "properties": {
                "type": {"const": "Polygon"},
                "coordinates": {"type": "array", "minItems": 1, "items": {
                    "type": "array", "minItems": 4, "items": {
                        "type": "array", "minItems": 2, "maxItems": 2, "items": {"type": "number"}}}}}},
            "properties": {"type": "object", "required": ["objectType", "classification", "measurements"],
                           "properties": {
                               "objectType": {"const": "detection"},
                               "classification": {"type": "object", "required": ["name", "color"],
                                                  "properties": {"name": {"type": "string"},
                                                                 "color": {"type": "array", "minItems": 3,
                                                                           "maxItems": 3}}},
                               "measurements": {"type": "object",
                                                "additionalProperties": {"type": "number"}}}}}}}}}


@pytest.mark.slow
def test_a_slide_on_s3_scores_through_range_reads(tmp_path, tiny_artifact, s3_server):
    """`jobs/score.py` in its own process reads a slide from s3 tile by tile and finds what it
    finds in the same slide on disk."""
    import subprocess
    import sys

    import s3fs

    repo = Path(__file__).resolve().parents[1]
    (tmp_path / "in").mkdir()
    write_slide(tmp_path / "in" / "case-3.tif", columns=3, rows=2, seed=7)
    fs = s3fs.S3FileSystem(key=s3_server["AWS_ACCESS_KEY_ID"], secret=s3_server["AWS_SECRET_ACCESS_KEY"],
                           client_kwargs={"endpoint_url": s3_server["AWS_ENDPOINT_URL"]})
    fs.put(str(tmp_path / "in" / "case-3.tif"), "lab/slides/case-3.tif")
    local = slide_cells(tmp_path / "in" / "case-3.tif").to_pandas()
    env = {**os.environ, **s3_server, "PYTHONPATH": str(repo)}
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run([sys.executable, str(repo / "jobs" / "score.py"), "--model", tiny_artifact,
                           "--input", "s3://lab/slides", "--output", str(tmp_path / "out"),
                           "--per-cell", "--actors", "1,1", "--max-review-rate", "1"],
                          env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "1 inputs = 1 ok + 0 errors + 0 skipped (balanced)" in done.stdout
    table = pa.concat_tables([pq.read_table(f) for f in (tmp_path / "out" / "predictions").rglob("*.parquet")])
    scored = table.to_pandas()
    for kind in (CELL, TILE):
        assert (scored["row_kind"] == kind).sum() == (local["row_kind"] == kind).sum() > 0
    assert sorted(scored.query("row_kind == 'cell'")["box_x0"]) == sorted(local.query("row_kind == 'cell'")["box_x0"])
