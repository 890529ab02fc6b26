"""DICOM-WSI slides: a folder of .dcm instances read with wsidicom, listed as one input whose
fingerprint follows its files, scored like the same slide as a pyramidal TIFF, locally and on s3,
and an unreadable folder an error row."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from allcore.imaging.files import FileInfo, iter_image_files, stat_file

from allcore.imaging import slides
from allcore.imaging.cells import CellFinderConfig
from allcore.scoring.inputs import iter_input_list
from allcore.scoring.prepare import prepare_batch
from allcore.scoring.rows import CELL, SLIDE, TILE
from allcore.scoring.tiles import expand_input, finish_slides
from allcore.data.synthetic import write_slide
from test_slides import DATA_CONFIG, WORKING_MPP

LABEL_SIZE, OVERVIEW_SIZE = (120, 60), (300, 100)


def write_dicom(folder: Path, tiff: Path) -> list[str]:
    """The pyramid of ``tiff`` as a DICOM-WSI folder, with a label and an overview."""
    reader = slides.TiffSlideReader(str(tiff))
    try:
        return slides.write_dicom_slide(str(folder), reader, slide_name=folder.name,
                                        label=Image.new("RGB", LABEL_SIZE, (30, 30, 200)),
                                        overview=Image.new("RGB", OVERVIEW_SIZE, (200, 60, 60)))
    finally:
        reader.close()


@pytest.fixture(scope="module")
def dicom_slide(tmp_path_factory):
    """(the TIFF, the same slide as a DICOM-WSI folder): 1944 x 1496 px at 0.15 um/px, 4 levels."""
    root = tmp_path_factory.mktemp("dicom")
    tiff = root / "case-9.tif"
    write_slide(tiff, columns=3, rows=2, seed=3)
    write_dicom(root / "archive" / "case-9", tiff)
    return tiff, root / "archive" / "case-9"


def listed_entry(info: FileInfo) -> dict:
    return {"source_uri": info.uri, "source_size": info.size, "source_mtime": info.mtime_or_etag,
            "listing_error": info.listing_error, "error_kind": info.error_kind}


def slide_rows(info: FileInfo):
    """A listed slide's rows as the pipeline makes them, without Ray (``test_slides.slide_cells``
    from a listing entry, which may be on s3)."""
    rows = expand_input(listed_entry(info), working_mpp=WORKING_MPP, max_pixels=40_000_000)
    batch = {k: np.array([r[k] for r in rows], dtype=object if isinstance(rows[0][k], str) else None)
             for k in rows[0]}
    prepared = prepare_batch(batch, data_config=DATA_CONFIG, cell_finder=CellFinderConfig())
    prepared.pop("pixels")
    return finish_slides(pa.table(prepared)).to_pandas()


def test_dicom_reader_reads_back_the_pyramid_its_pixel_size_and_associated_images(dicom_slide):
    tiff_path, folder = dicom_slide
    tiff = slides.TiffSlideReader(str(tiff_path))
    reader = slides.open_slide(str(folder) + "/")
    assert isinstance(reader, slides.DicomSlideReader)
    assert reader.level_dimensions == tiff.level_dimensions and len(reader.level_dimensions) == 4
    assert reader.level_downsamples == (1.0, 2.0, 4.0, 8.0)
    assert reader.mpp == pytest.approx((0.15, 0.15))
    for level in (0, 2):
        a = reader.read_region((700, 500), level, (300, 200)).astype(int)
        b = tiff.read_region((700, 500), level, (300, 200)).astype(int)
        assert a.shape == b.shape == (200, 300, 3)
        assert np.abs(a - b).mean() < 2 and np.percentile(np.abs(a - b), 99) < 12  # re-encoded JPEG
    beyond = reader.read_region((reader.dimensions[0] - 10, -4), 0, (40, 12))
    assert (beyond[:, 10:] == 255).all() and (beyond[:4] == 255).all()  # past the edge: white glass
    assert reader.thumbnail().size == tiff.thumbnail().size
    images = reader.associated_images()
    assert {name: img.size for name, img in images.items()} == {"label": LABEL_SIZE, "macro": OVERVIEW_SIZE}
    assert slides.slide_id(str(folder) + "/") == "case-9" and slides.is_slide_name(str(folder) + "/")
    reader.close()


def test_a_dicom_folder_is_listed_once_with_a_fingerprint_of_its_files(tmp_path, dicom_slide):
    _, folder = dicom_slide
    archive = tmp_path / "in"
    shutil.copytree(folder, archive / "case-9")
    Image.new("RGB", (64, 48), (220, 200, 210)).save(archive / "case-9" / "note.png")  # stays a field
    (archive / "case-9" / "README.txt").write_text("scanned 2024")  # neither image nor instance
    dcm = sorted((archive / "case-9").glob("*.dcm"))

    def entries() -> dict[str, FileInfo]:
        return {Path(i.uri).name + ("/" if i.uri.endswith("/") else ""): i
                for i in iter_image_files(str(archive))}

    first = entries()
    assert list(first) == ["case-9/", "note.png"]
    slide = first["case-9/"]
    assert slide.uri == f"{archive / 'case-9'}/" and slide.size == sum(p.stat().st_size for p in dcm)
    assert entries()["case-9/"] == slide  # unchanged: the same ledger key
    manifest = tmp_path / "list.txt"
    manifest.write_text("case-9\n")
    assert list(iter_input_list(str(manifest), str(archive))) == [slide]  # named in a manifest
    os.utime(dcm[1], ns=(dcm[1].stat().st_atime_ns, dcm[1].stat().st_mtime_ns + 10**9))
    touched = entries()["case-9/"]
    assert touched.mtime_or_etag != slide.mtime_or_etag  # one instance rewritten: a new key
    dcm[0].unlink()
    assert entries()["case-9/"].mtime_or_etag not in (slide.mtime_or_etag, touched.mtime_or_etag)


def test_unreadable_dicom_folders_are_error_rows(tmp_path, dicom_slide):
    _, folder = dicom_slide
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "a.dcm").write_bytes(b"not a dicom file")
    shutil.copytree(folder, tmp_path / "cut")
    level0 = max((tmp_path / "cut").glob("*.dcm"), key=lambda p: p.stat().st_size)
    level0.write_bytes(level0.read_bytes()[:20_000])  # cut off in transfer
    errors = {}
    for info in iter_image_files(str(tmp_path)):
        [row] = expand_input(listed_entry(info), working_mpp=WORKING_MPP, max_pixels=10**8)
        spec = json.loads(row["tile_spec"])
        errors[row["slide_id"]] = spec["error"]
        assert spec["error_kind"] == "corrupt"
    assert "no readable DICOM-WSI slide" in errors["junk"]
    assert "damaged or was cut off" in errors["cut"] and "EOFError" in errors["cut"]


def test_a_dicom_slide_on_s3_reads_like_the_local_one(tmp_path, dicom_slide, s3_server, monkeypatch):
    """Listed from s3 as one input with the fingerprint stat_file gives it, read through fsspec
    frame by frame: the same tiles and cells as the folder on disk."""
    import s3fs

    _, folder = dicom_slide
    for key, value in s3_server.items():
        monkeypatch.setenv(key, value)
    fs = s3fs.S3FileSystem(key=s3_server["AWS_ACCESS_KEY_ID"], secret=s3_server["AWS_SECRET_ACCESS_KEY"],
                           client_kwargs={"endpoint_url": s3_server["AWS_ENDPOINT_URL"]})
    for path in sorted(folder.glob("*.dcm")):
        fs.put(str(path), f"lab/slides/case-9/{path.name}")
    [info] = iter_image_files("s3://lab/slides")
    assert info.uri == "s3://lab/slides/case-9/" and info.mtime_or_etag.startswith("dicom:6:")
    assert stat_file("s3://lab/slides/case-9") == info
    remote = slide_rows(info)
    local = slide_rows(stat_file(str(folder)))
    for kind in (CELL, TILE, SLIDE):
        assert (remote["row_kind"] == kind).sum() == (local["row_kind"] == kind).sum() > 0
    assert (remote["status"] == "ok").all() and set(remote["slide_id"]) == {"case-9"}
    cells = [frame.query("row_kind == 'cell'")[["box_x0", "box_y0", "box_x1", "box_y1"]].sort_values(
        ["box_x0", "box_y0"]).to_numpy() for frame in (remote, local)]
    assert np.array_equal(*cells)
    assert remote["content_sha256"].iloc[0] == local["content_sha256"].iloc[0]


@pytest.mark.slow
def test_a_dicom_slide_scores_once_with_the_cells_of_the_same_slide_as_tiff(tmp_path, dicom_slide,
                                                                           ray_session, tiny_artifact):
    """An archive of the slide as DICOM-WSI and an unreadable DICOM folder, scored with
    --per-cell: the DICOM slide gives the cells the same slide as TIFF gives, the broken folder
    an error row; an unchanged rerun scores nothing; a rewritten instance gives the slide a new
    ledger key, so the next run scores it again."""
    from allcore.models.artifact import read_card
    from allcore.scoring.config import ScoringConfig
    from allcore.scoring.inputs import input_digest
    from allcore.scoring.store import OutputStore
    from pipelines.score import run_scoring

    tiff, folder = dicom_slide
    archive = tmp_path / "in"
    shutil.copytree(folder, archive / "case-9")
    (archive / "broken").mkdir()
    (archive / "broken" / "level0.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\xff" * 64)
    config = ScoringConfig(model=tiny_artifact, input=str(archive), output=str(tmp_path / "out"),
                           per_cell=True, actors=(2, 2), max_error_rate=1.0, max_review_rate=1.0)
    first = run_scoring(config)
    assert (first.listed, first.ok, first.errors, first.skipped) == (2, 1, 1, 0)
    again = run_scoring(config)  # the nightly rerun, nothing changed
    assert (again.listed, again.ok, again.errors, again.skipped) == (2, 0, 0, 2)
    ledger = OutputStore(config.output).ledger(read_card(tiny_artifact).weights_sha256)
    instance = sorted((archive / "case-9").glob("*.dcm"))[0]
    instance.write_bytes(instance.read_bytes())  # rewritten: a new mtime
    assert {Path(i.uri).name for i in iter_image_files(str(archive))
            if input_digest(i.uri, i.size, i.mtime_or_etag) not in ledger} == {"case-9"}

    files = sorted((tmp_path / "out" / "predictions").rglob("*.parquet"))
    table = pa.concat_tables([pq.read_table(f) for f in files], promote_options="default").to_pandas()
    slide_table = table[table["row_kind"] == SLIDE].set_index("slide_id")
    assert sorted(slide_table.index) == ["broken", "case-9"]
    assert slide_table.loc["broken", "status"] == "error"
    assert "no readable DICOM-WSI slide" in slide_table.loc["broken", "error"]
    assert slide_table.loc["case-9", "source_uri"] == f"{archive / 'case-9'}/"
    as_tiff = slide_rows(stat_file(str(tiff)))  # the same slide as TIFF, the same working scale
    for kind in (CELL, TILE):
        assert (table["row_kind"] == kind).sum() == (as_tiff["row_kind"] == kind).sum() > 0
    boxes = [frame.query("row_kind == 'cell'")[["box_x0", "box_y0", "box_x1", "box_y1"]].sort_values(
        ["box_x0", "box_y0"]).to_numpy() for frame in (table, as_tiff)]
    assert np.abs(boxes[0] - boxes[1]).max() * 0.15 <= 0.5  # um: the same cells, through re-encoded JPEG
    cells = table[table["row_kind"] == CELL]
    assert (cells["specimen_id"] == "case-9").all() and np.allclose(cells["mpp"], 0.15, rtol=1e-5)
    assert len(list((tmp_path / "out" / "slides").glob("case-9-*.geojson"))) == 1
