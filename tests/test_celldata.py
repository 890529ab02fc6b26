"""Cell crops from an ALL-IDB-like tree: builder, source-field leakage guard, card geometry."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from allcore.data import celldata
from allcore.models.artifact import ModelCard, load_artifact, save_artifact
from allcore.data.samples import discover_samples
from allcore.data.labels import get_label_set
from allcore.models.registry import create_model
from allcore.data.splits import SplitManifest, SplitRow, split_samples
from allcore.data.synthetic import make_field
from cell_trees import DIAMETER, LEUKAEMIC, OVERLAPPING, write_all_idb, write_bccd, write_taleqani

GEOMETRY = celldata.CellCropGeometry(side_cell_diameters=2.0, input_size=64)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("all-idb")
    boxes = write_all_idb(root)
    cells = celldata.prepare_all_idb(str(root), str(root.parent / "crops"), geometry=GEOMETRY,
                                     cell_diameter_px=DIAMETER)
    return root, boxes, cells, celldata.read_cell_manifest(cells.manifest)


def test_all_idb_root_is_recognised(prepared, tmp_path):
    root = prepared[0]
    assert celldata.is_all_idb_root(str(root))
    (tmp_path / "Benign").mkdir()
    assert not celldata.is_all_idb_root(str(tmp_path))


def test_crop_builder_labels_every_cell_once(prepared):
    root, boxes, cells, table = prepared
    centroids = sum(len(boxes[f"Im{n:03d}_1"]) for n in LEUKAEMIC)
    idb2 = table[table.origin == "ALL_IDB2"]
    assert sorted(idb2.label) == ["blast", "not_blast"]
    # the ALL_IDB2 blast crop shows a centroid of Im001_1: that cell is not cut a second time
    assert (table.origin == "ALL_IDB1-blast").sum() == centroids - 1
    found = table[table.origin == "ALL_IDB1-found"]
    assert len(found) > 0 and set(found.label) == {"not_blast"}
    assert set(found.field_label) == {0}  # every leukaemic cell is a marked blast here
    side = GEOMETRY.side_px(DIAMETER)
    assert all(Image.open(p).size == (side, side) for p in table.path)
    samples = discover_samples(cells.manifest, get_label_set("blast"))
    assert {s.label for s in samples} == {"blast", "not_blast"} and len(samples) == len(table)


def test_crops_are_traced_to_their_fields_and_overlaps_share_a_group(prepared):
    table = prepared[3]
    sources = dict(zip(table.path.map(lambda p: Path(p).stem), table.source_fields))
    assert sources["Im001_1"] == "Im001_1"
    assert set(sources["Im020_0"].split("|")) == {"Im007_0", f"Im{OVERLAPPING:03d}_0"}
    group = {field: g for fields, g in zip(table.source_fields, table.group)
             for field in fields.split("|")}
    assert group["Im007_0"] == group[f"Im{OVERLAPPING:03d}_0"] == group["Im006_0"]
    assert group["Im001_1"] == group["Im004_1"] != group["Im006_0"]


def test_crop_sources_csv_is_read_instead_of_matching(prepared, tmp_path):
    root = tmp_path / "all-idb"
    shutil.copytree(prepared[0], root)
    (root / "ALL_IDB2/crop_sources.csv").write_text(
        "crop_image,source_field,x,y\nIm001_1.tif,Im001_1.jpg,10,20\nIm020_0.tif,Im007_0.jpg,30,40\n")
    cells = celldata.prepare_all_idb(str(root), str(tmp_path / "crops"), geometry=GEOMETRY,
                                     cell_diameter_px=DIAMETER)
    table = celldata.read_cell_manifest(cells.manifest)
    sources = dict(zip(table.path.map(lambda p: Path(p).stem), table.source_fields))
    assert sources["Im020_0"] == "Im007_0"  # the file's word, not the match to the overlap too
    assert sources["Im001_1"] == "Im001_1"


def test_grouped_split_never_tests_on_a_trained_field(prepared):
    cells = prepared[2]
    samples = discover_samples(cells.manifest, get_label_set("blast"))
    split = split_samples(samples, fractions=(0.5, 0.0, 0.5), seed=1)
    assert celldata.field_leaks(split, cells.manifest) == []
    celldata.check_no_field_leaks(split, cells.manifest)


def test_leakage_guard_catches_a_crop_moved_across_splits(prepared):
    cells, table = prepared[2], prepared[3]
    counts = table.source_fields.value_counts()
    field = counts.index[0]
    assert counts.iloc[0] >= 2, "the synthetic tree needs a field with two crops"
    tested = table.group[table.source_fields == field].iloc[0]
    rows = [SplitRow(p, label, g, "test" if g == tested else "train")
            for p, label, g in zip(table.path, table.label, table.group)]
    moved = int(np.flatnonzero(table.source_fields.to_numpy() == field)[0])
    leaky = rows[:moved] + [dataclasses.replace(rows[moved], split="train")] + rows[moved + 1:]
    assert celldata.field_leaks(SplitManifest(rows), cells.manifest) == []
    assert celldata.field_leaks(SplitManifest(leaky), cells.manifest) == [field]
    with pytest.raises(ValueError, match="leaks source fields"):
        celldata.check_no_field_leaks(SplitManifest(leaky), cells.manifest)


def test_prepared_crops_are_reused(prepared):
    root, _, cells, _ = prepared
    manifest = Path(cells.manifest)
    stamp = manifest.stat().st_mtime_ns
    celldata.prepare_all_idb(str(root), str(manifest.parent), geometry=GEOMETRY,
                             cell_diameter_px=DIAMETER)
    assert manifest.stat().st_mtime_ns == stamp


def test_crop_is_the_same_at_any_magnification():
    """Crop geometry is in cell diameters: a field and its 2x enlargement give the same crop."""
    field, boxes = make_field(np.random.default_rng(3), 2, 224, scale_bar=False)
    big = field.resize((448, 448), Image.Resampling.BICUBIC)
    centre = celldata.box_centre(tuple(boxes[0]))
    small_crop = celldata.cut_cell_crop(field, centre, cell_diameter_px=40, geometry=GEOMETRY)
    big_crop = celldata.cut_cell_crop(big, (centre[0] * 2, centre[1] * 2), cell_diameter_px=80,
                                      geometry=GEOMETRY)
    assert small_crop.size == big_crop.size == (64, 64)
    difference = np.abs(np.asarray(small_crop, float) - np.asarray(big_crop, float)).mean()
    assert difference < 6


def test_crop_beyond_the_edge_is_filled_with_background():
    field = Image.new("RGB", (100, 100), (200, 180, 190))
    field.paste((90, 40, 120), (0, 0, 20, 20))
    crop = np.asarray(celldata.cut_cell_crop(field, (0, 0), cell_diameter_px=20,
                                             geometry=celldata.CellCropGeometry(2.0, 40)))
    assert tuple(crop[2, 2]) == (200, 180, 190)  # outside the field: background, not black
    assert tuple(crop[30, 30]) == (90, 40, 120)  # inside: the field's own pixels


def test_cell_model_card_records_crop_geometry(tmp_path):
    model = create_model("mobilenet_v2", num_classes=2, input_size=GEOMETRY.input_size)
    crops = celldata.CellCrops("cells.csv", GEOMETRY, DIAMETER)
    card = ModelCard(classes=["not_blast", "blast"], label_set="blast", cell_crop=crops.card_entry())
    save_artifact(str(tmp_path / "cell"), model, card)
    loaded_model, loaded = load_artifact(str(tmp_path / "cell"))
    geometry = celldata.CellCropGeometry.from_card(loaded)
    assert geometry == GEOMETRY
    assert loaded.cell_crop["pixels_per_cell_diameter"] == 32.0
    assert loaded.cell_crop["source_cell_diameter_px"] == DIAMETER
    assert loaded_model.data_config.input_size == geometry.input_size
    save_artifact(str(tmp_path / "field"), model, ModelCard(classes=["a", "b"], label_set="binary"))
    with pytest.raises(ValueError, match="not a cell model"):
        celldata.CellCropGeometry.from_card(load_artifact(str(tmp_path / "field"))[1])
    torch.testing.assert_close(loaded_model.head[1].weight, model.head[1].weight)


def test_blast_label_set_marks_its_blast_class():
    blast = get_label_set("blast")
    assert blast.blast_classes == ("blast",) and blast.to_class("1") == "blast"
    assert blast.to_class("0") == "not_blast"


def test_bccd_and_taleqani_crops_join_all_idb_in_one_manifest(prepared, tmp_path):
    wbc = write_bccd(tmp_path / "bccd")
    write_taleqani(tmp_path / "taleqani")
    assert celldata.lab_of_root(str(tmp_path / "bccd")) == celldata.BCCD
    assert celldata.lab_of_root(str(tmp_path / "taleqani")) == celldata.TALEQANI
    assert celldata.lab_of_root(str(prepared[0])) == celldata.ALL_IDB
    cells = celldata.prepare_cell_crops(
        [str(prepared[0]), str(tmp_path / "bccd"), str(tmp_path / "taleqani")], str(tmp_path / "crops"),
        geometry=GEOMETRY)
    table = celldata.read_cell_manifest(cells.manifest)
    by_lab = table.groupby("lab")
    assert set(by_lab.groups) == {celldata.ALL_IDB, celldata.BCCD, celldata.TALEQANI}
    bccd = table[table.lab == celldata.BCCD]
    assert len(bccd) == wbc and set(bccd.label) == {"not_blast"}  # every drawn WBC box, no RBC
    taleqani = table[table.lab == celldata.TALEQANI]
    assert set(taleqani[taleqani.origin == "Taleqani-Benign"].label) == {"not_blast"}
    assert set(taleqani[taleqani.origin != "Taleqani-Benign"].label) == {"blast"}
    assert (table.groupby("group")["lab"].nunique() == 1).all()  # groups never join two laboratories
    # each laboratory is cut at its own archive's diameter: 2 diameters wide, whatever the field size
    diameters = cells.cell_diameter_px
    assert 50 < diameters[celldata.BCCD] < 120 and 20 < diameters[celldata.TALEQANI] < 70  # 448 vs 224 px fields
    for lab, rows in by_lab:
        side = {Image.open(p).size for p in rows.path}
        expected = GEOMETRY.side_px(diameters[lab])  # ALL-IDB: its archive value, 120 px
        assert side == {(expected, expected)}, lab
    samples = discover_samples(cells.manifest, get_label_set("blast"))
    assert len(samples) == len(table)
    assert celldata.crop_counts(cells.manifest)[celldata.BCCD] == {"not_blast": wbc}
    # the leakage guard reads the joined manifest: a grouped split passes, a BCCD crop moved
    # away from its field's other crops is caught and named with its laboratory
    celldata.check_no_field_leaks(split_samples(samples, fractions=(0.5, 0.0, 0.5), seed=1),
                                  cells.manifest)
    counts = bccd.source_fields.value_counts()
    field = counts.index[0]
    assert counts.iloc[0] >= 2, "the synthetic BCCD tree needs a field with two white cells"
    rows = [SplitRow(p, label, g, "test" if f == field else "train")
            for p, label, g, f in zip(table.path, table.label, table.group, table.source_fields)]
    moved = int(np.flatnonzero(table.source_fields.to_numpy() == field)[0])
    leaky = rows[:moved] + [dataclasses.replace(rows[moved], split="train")] + rows[moved + 1:]
    assert celldata.field_leaks(SplitManifest(rows), cells.manifest) == []
    assert celldata.field_leaks(SplitManifest(leaky), cells.manifest) == [f"{celldata.BCCD}:{field}"]
    with pytest.raises(ValueError, match="not laid out like"):
        celldata.prepare_cell_crops([str(tmp_path)], str(tmp_path / "other"), geometry=GEOMETRY)
    with pytest.raises(ValueError, match="same laboratory"):
        celldata.labs_of_roots([str(tmp_path / "bccd"), str(tmp_path / "bccd")])


def test_one_root_is_prepared_into_the_joined_layout(prepared, tmp_path):
    """One laboratory gives the same manifest place and card entry as several: ``cells.csv`` in
    ``out_dir`` over ``out_dir/<lab>/``, its one diameter a number."""
    cells = celldata.prepare_cell_crops([str(prepared[0])], str(tmp_path / "crops"), geometry=GEOMETRY)
    assert cells.manifest == str(tmp_path / "crops" / celldata.MANIFEST_FILE)
    assert cells.card_entry()["source_cell_diameter_px"] == celldata.ALL_IDB_CELL_DIAMETER_PX
    assert cells.card_entry()["source"] == celldata.ALL_IDB
    table = celldata.read_cell_manifest(cells.manifest)
    assert set(table.lab) == {celldata.ALL_IDB} and all(Path(p).exists() for p in table.path)
    assert all(Path(p).is_relative_to(tmp_path / "crops" / celldata.ALL_IDB) for p in table.path)
