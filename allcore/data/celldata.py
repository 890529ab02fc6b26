"""Single-cell training data cut from annotated smear fields, and the crop geometry a cell model
is trained and scored with.

A cell model sees one white cell at a time. The crop around a cell is a fixed number of *cell
diameters* wide (``CellCropGeometry``), not a fraction of the field or of the found box: a blast
then looks large and a small lymphocyte small, in every archive whatever its magnification, and
scoring reproduces the training crops exactly from the model card (``ModelCard.cell_crop``).

Data preparation is its own step (run once per training run, cached under the run's output):
:func:`prepare_all_idb` reads an ALL-IDB root and writes PNG crops plus a manifest
(``path,label,group,...``) that ``allcore.data.samples.discover_samples`` reads like any other manifest;
:func:`prepare_cell_crops` does so for one or several laboratories' roots (ALL-IDB, BCCD,
Taleqani layouts) into one manifest with a ``lab`` column (what ``jobs/train.py --data`` runs).
Crops are written once rather than cut on demand because the sources are 2592 x 1944 JPEGs: the
hot loop would otherwise decode a whole field for every 240 px crop in every epoch.

Every crop's ``group`` is its source field's *content* group: fields in the same contiguous
number block, fields that look alike (perceptual hash) and fields that an ALL_IDB2 crop matches
equally well (overlapping fields showing the same cells, e.g. Im078 / Im089) share a group, so a
grouped split never tests on a cell whose field, or an overlapping field, was trained on.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from collections import defaultdict
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
from PIL import Image
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from allcore.errors import ModelKindError
from allcore.imaging import files
from allcore.imaging.cells import Box, CellFinderConfig, find_cells, median_cell_diameter, padded_square
from allcore.data.splits import SplitManifest


ALL_IDB_CELL_DIAMETER_PX = 120.0
# ALL-IDB white cells are ~100-140 px across in both field resolutions (data README); one value
# for the archive keeps every crop at the same magnification. A per-field estimate (the finder's
# cell_diameter_px) replaces it where available.
CROP_MATCH_THRESHOLD = 0.95
# Normalised cross-correlation at which an ALL_IDB2 crop is taken to come from an ALL_IDB1 field
# (true sources score 0.98-0.995 at 1/6 scale, the best wrong field <= 0.91 unless it overlaps).
MATCH_SCALE = 6  # template matching runs at 1/6 resolution: ~0.3 s per crop against 52 fields
FIELD_BLOCK = 5  # contiguous field numbers grouped together (acquisition sessions, patients)
DUPLICATE_RADIUS = 0.5  # cells closer than this many diameters to a kept crop's centre are the same cell
BLAST_EXCLUSION_RADIUS = 0.75  # found cells this close to a blast centroid are not "not blast"
MANIFEST_FILE = "cells.csv"
MANIFEST_COLUMNS = ("path", "label", "group", "source_fields", "field_label", "origin", "x", "y", "lab")
# The laboratories whose cells a model can be trained and tested on (docs/CELLS.md, "Transfer").
ALL_IDB, BCCD, TALEQANI = "ALL-IDB", "BCCD", "Taleqani"
TALEQANI_CLASSES = {"Benign": "not_blast", "Early": "blast", "Pre": "blast", "Pro": "blast"}
# Taleqani labels belong to fields: Benign fields show hematogones (benign B-lymphoid
# precursors), the others ALL blasts, so a found cell inherits its field's label (a weak label:
# an ALL field's odd lymphocyte or neutrophil is called a blast too).
TALEQANI_EVERY = 16  # every 16th field of each class: ~175 fields, ~1,800 cells (weak labels: enough)
BCCD_BLOCK = 10  # BCCD image numbers grouped in blocks of 10 (neighbours come from one smear)
DIAMETER_SAMPLE = 48  # fields per archive whose median white-cell diameter sets its crop scale
_NAME = re.compile(r"Im(\d+)_([01])", re.IGNORECASE)


@dataclass(frozen=True)
class CellCropGeometry:
    """How a cell crop is cut and seen: a square ``side_cell_diameters`` cell diameters wide,
    centred on the cell, resampled to the model's ``input_size``. Recorded in the model card."""

    side_cell_diameters: float = 2.0
    input_size: int = 128

    def __post_init__(self) -> None:
        if not self.side_cell_diameters > 0 or self.input_size < 1:
            raise ValueError(f"side_cell_diameters must be > 0 and input_size >= 1, got "
                             f"{self.side_cell_diameters}, {self.input_size}")

    @property
    def pixels_per_cell_diameter(self) -> float:
        """The working resolution: how many model-input pixels one cell diameter spans."""
        return self.input_size / self.side_cell_diameters

    def side_px(self, cell_diameter_px: float) -> int:
        """Crop side in source pixels for a field whose white cells are ``cell_diameter_px`` wide."""
        if not cell_diameter_px > 0:
            raise ValueError(f"cell_diameter_px must be > 0, got {cell_diameter_px}; estimate it "
                             "from the field or give it per archive")
        return max(1, round(self.side_cell_diameters * cell_diameter_px))

    def to_card(self) -> dict:
        return {**asdict(self), "pixels_per_cell_diameter": self.pixels_per_cell_diameter}

    @classmethod
    def from_card(cls, card) -> CellCropGeometry:
        """The geometry a cell model was trained with; refuses a field model's card."""
        if not card.cell_crop:
            raise ModelKindError(f"model {card.model_version} is not a cell model (its card has no "
                             "cell_crop geometry); pass a model trained on cell crops, e.g. the "
                             "cell_blast recipe")
        return cls(side_cell_diameters=float(card.cell_crop["side_cell_diameters"]),
                   input_size=int(card.cell_crop["input_size"]))


def box_centre(box: Box) -> tuple[float, float]:
    x0, y0, x1, y1 = box
    return (x0 + x1) / 2, (y0 + y1) / 2


def cut_cell_crop(img: Image.Image | np.ndarray, centre: tuple[float, float], *,
                  cell_diameter_px: float, geometry: CellCropGeometry,
                  fill: np.ndarray | None = None) -> Image.Image:
    """The square crop a cell model sees for the cell at ``centre`` (x, y in ``img`` pixels),
    resampled to ``geometry.input_size`` (beyond the image edge: ``cells.padded_square``'s
    ``fill``, the field's median colour unless given). Training and scoring both cut
    here, so the crops cannot drift apart; for a found cell pass ``box_centre(cell.box)``."""
    side = geometry.side_px(cell_diameter_px)
    crop = padded_square(img, round(centre[0] - side / 2), round(centre[1] - side / 2), side, fill)
    return crop.resize((geometry.input_size,) * 2, Image.Resampling.BILINEAR, reducing_gap=3.0)


# ------------------------------------------------------------------------------ ALL-IDB layout

@dataclass(frozen=True)
class _Field:
    uri: str
    name: str  # ImXXX_Y without extension
    number: int
    label: int  # Y: 1 ALL patient, 0 healthy donor


def _parse_name(uri: str) -> tuple[str, int, int] | None:
    stem = os.path.splitext(os.path.basename(uri))[0]
    match = _NAME.fullmatch(stem)
    return (stem, int(match[1]), int(match[2])) if match else None


def is_all_idb_root(root: str) -> bool:
    """True for a folder laid out like ALL-IDB (``ALL_IDB1/im`` fields and/or ``ALL_IDB2/img``
    crops): training then prepares cell crops from it instead of reading class folders."""
    return any(files.exists(files.join(root, part)) for part in ("ALL_IDB1/im", "ALL_IDB2/img"))


def _listed(root: str, folder: str) -> list[_Field]:
    where = files.join(root, folder)
    if not files.exists(where):
        return []
    fields = []
    for info in files.iter_image_files(where):
        parsed = _parse_name(info.uri)
        if parsed is None:
            raise ValueError(f"{info.uri}: ALL-IDB file names look like ImXXX_Y (Y = 1 blast / ALL "
                             "patient, 0 not); rename it or move it out of the folder")
        fields.append(_Field(info.uri, *parsed))
    return fields


def _centroids(root: str, field: _Field) -> np.ndarray:
    """Blast centroids (x, y) of an ALL_IDB1 field; none for healthy fields or a missing file."""
    uri = files.join(root, f"ALL_IDB1/xyc/{field.name}.xyc")
    if not files.exists(uri):
        if field.label:
            raise ValueError(f"{uri} is missing: every Y = 1 field needs its blast centroids")
        return np.zeros((0, 2))
    values = [line.split() for line in files.read_bytes(uri).decode().splitlines() if line.strip()]
    return np.asarray(values, dtype=float).reshape(-1, 2)


def _grey(img: Image.Image) -> np.ndarray:
    small = img.convert("L").resize((max(1, img.width // MATCH_SCALE), max(1, img.height // MATCH_SCALE)),
                                    Image.Resampling.BILINEAR)
    return np.asarray(small, dtype=np.float32)


def _crop_sources_from_csv(root: str, fields: dict[str, _Field]) -> dict[str, list[tuple[str, float, float]]] | None:
    """crop name -> [(field name, x, y)] from ``ALL_IDB2/crop_sources.csv`` when it exists. Crop
    and field names look alike (ImXXX_Y), so the crop column is the one whose header says crop /
    image (else the first name column), the field column the one saying field / source (else the
    next); the first two numeric columns are the centre x, y."""
    uri = files.join(root, "ALL_IDB2/crop_sources.csv")
    if not files.exists(uri):
        return None
    table = pd.read_csv(io.BytesIO(files.read_bytes(uri)))
    names = {c: table[c].astype(str).map(lambda v: (_parse_name(v) or ("",))[0]) for c in table.columns}
    name_cols = [c for c in table.columns if names[c].ne("").all()]

    def pick(hints: tuple[str, ...], rest: list) -> str:
        hinted = [c for c in rest if any(h in str(c).lower() for h in hints)]
        if not (hinted or rest):
            raise ValueError(f"{uri}: expected a crop-name and a field-name column (ImXXX_Y); got "
                             f"columns {list(table.columns)}")
        return (hinted or rest)[0]

    crop_col = pick(("crop", "image", "img"), name_cols)
    field_col = pick(("field", "source"), [c for c in name_cols if c != crop_col])
    numeric = [c for c in table.columns if pd.api.types.is_numeric_dtype(table[c])]
    if len(numeric) < 2:
        raise ValueError(f"{uri}: expected a crop name, a field name and the crop centre x, y; "
                         f"got columns {list(table.columns)}")
    sources: dict[str, list[tuple[str, float, float]]] = defaultdict(list)
    for crop, field, x, y in zip(names[crop_col], names[field_col], table[numeric[0]], table[numeric[1]]):
        if crop and field in fields:  # a source field held out of this copy counts as unknown
            sources[crop].append((field, float(x), float(y)))
    return sources


def _crop_sources_by_matching(crops: list[_Field], fields: dict[str, _Field],
                              field_images: dict[str, Image.Image]) -> dict[str, list[tuple[str, float, float]]]:
    """crop name -> [(field name, x, y)] for every field the crop matches (normalised
    cross-correlation >= CROP_MATCH_THRESHOLD). Several fields match where fields overlap."""
    from skimage.feature import match_template

    greys = {name: _grey(img) for name, img in field_images.items()}
    sources: dict[str, list[tuple[str, float, float]]] = {}
    for crop in crops:
        template = _grey(files.decode_rgb(files.read_bytes(crop.uri)))
        found = []
        for name, grey in greys.items():
            if grey.shape[0] < template.shape[0] or grey.shape[1] < template.shape[1]:
                continue
            score = match_template(grey, template)
            y, x = np.unravel_index(int(score.argmax()), score.shape)
            if score[y, x] >= CROP_MATCH_THRESHOLD:
                found.append((name, (x + template.shape[1] / 2) * MATCH_SCALE,
                              (y + template.shape[0] / 2) * MATCH_SCALE))
        sources[crop.name] = found
    return sources


def _field_groups(fields: list[_Field], linked: list[list[str]]) -> dict[str, str]:
    """field name -> content group: contiguous number blocks (within a class, as
    ``splits.assign_groups`` blocks), joined with the fields one crop matches together
    (overlapping fields). Perceptual hashes are not used here: whole smear fields all look alike
    at 32 x 32 (at the split's 6-bit distance they merge the 52 ALL_IDB1 fields into 2 groups);
    crop matching is direct evidence of shared cells instead."""
    names = [f.name for f in fields]
    index = {name: i for i, name in enumerate(names)}
    first: dict[str, int] = {}
    edges = [(first.setdefault(f"{f.label}/{f.number // FIELD_BLOCK}", i), i)
             for i, f in enumerate(fields)]
    edges += [(index[a], index[b]) for group in linked for a in group for b in group if a != b]
    rows, cols = zip(*edges) if edges else ((), ())
    graph = coo_matrix((np.ones(len(rows)), (rows, cols)), shape=(len(names), len(names)))
    _, component = connected_components(graph, directed=False)
    members: dict[int, list[str]] = defaultdict(list)
    for name, c in zip(names, component):
        members[c].append(name)
    return {name: "fields:" + min(members[c]) for name, c in zip(names, component)}


def _near(point: tuple[float, float], others: list[tuple[float, float]], radius: float) -> bool:
    return any(np.hypot(point[0] - x, point[1] - y) < radius for x, y in others)


@dataclass(frozen=True)
class CellCrops:
    """A prepared cell data set: its manifest (for ``discover_samples``) and its crop geometry."""

    manifest: str
    geometry: CellCropGeometry
    cell_diameter_px: float | dict[str, float]  # one archive's, or each laboratory's by name
    source: str = ALL_IDB

    def card_entry(self) -> dict:
        """What the model card records: geometry, working resolution and the source scale."""
        return {**self.geometry.to_card(), "source_cell_diameter_px": self.cell_diameter_px,
                "source": self.source}


def prepare_all_idb(root: str, out_dir: str, *, geometry: CellCropGeometry,
                    cell_diameter_px: float = ALL_IDB_CELL_DIAMETER_PX) -> CellCrops:
    """Cut blast / not-blast cell crops from an ALL-IDB root into ``out_dir`` (cached: a second
    call with the same settings reuses them) and return the manifest.

    Sources: every ALL_IDB2 crop (its label from Y); a crop around every ALL_IDB1 blast centroid;
    every cell the finder finds in a healthy (Y = 0) field, and in a Y = 1 field every found cell
    with no blast centroid within 0.75 diameters (only blasts are annotated there). A field cell
    that an ALL_IDB2 crop already shows is kept once.
    """
    settings = {"side_cell_diameters": geometry.side_cell_diameters, "cell_diameter_px": cell_diameter_px,
                "match_threshold": CROP_MATCH_THRESHOLD, "field_block": FIELD_BLOCK,
                "finder": asdict(CellFinderConfig(cell_diameter_px=cell_diameter_px)), "root": os.path.abspath(root),
                "crop_sources_csv": files.exists(files.join(root, "ALL_IDB2/crop_sources.csv"))}
    result = CellCrops(files.join(out_dir, MANIFEST_FILE), geometry, cell_diameter_px)
    if _cached(out_dir, settings):
        return result
    field_list = _listed(root, "ALL_IDB1/im")
    crops = _listed(root, "ALL_IDB2/img")
    if not field_list and not crops:
        raise ValueError(f"{root} has no ALL_IDB1/im fields and no ALL_IDB2/img crops")
    fields = {f.name: f for f in field_list}
    images = {f.name: files.decode_rgb(files.read_bytes(f.uri)) for f in field_list}
    sources = (_crop_sources_from_csv(root, fields)
               or _crop_sources_by_matching(crops, fields, images))
    groups = _field_groups(field_list, [[f for f, _, _ in found] for found in sources.values()])

    writer = _CropWriter(out_dir, geometry, cell_diameter_px, lab=ALL_IDB)
    add = writer.add
    kept: dict[str, list[tuple[float, float]]] = defaultdict(list)  # field -> centres already cut

    for crop in crops:
        found = sources.get(crop.name, [])
        img = files.decode_rgb(files.read_bytes(crop.uri))
        if found:
            group = groups[found[0][0]]
            for field, x, y in found:
                kept[field].append((x, y))
        else:  # its field is not in this copy: the crop's own number block stands in for it
            group = f"ALL_IDB2:block-{crop.number // (2 * FIELD_BLOCK):03d}"
        add(img, (img.width / 2, img.height / 2), _cell_label(crop.label), name=crop.name,
            group=group, source_fields=[f for f, _, _ in found],
            field_label=min((fields[f].label for f, _, _ in found), default=-1),
            origin="ALL_IDB2")

    radius = DUPLICATE_RADIUS * cell_diameter_px
    for field in field_list:
        img, blasts = images.pop(field.name), _centroids(root, field)
        common = {"group": groups[field.name], "source_fields": [field.name],
                  "field_label": field.label}
        for i, (x, y) in enumerate(blasts):
            if not _near((x, y), kept[field.name], radius):
                add(img, (x, y), "blast", name=f"{field.name}-blast{i:03d}", origin="ALL_IDB1-blast",
                    **common)
        centres = [box_centre(cell.box) for cell in
                   find_cells(img, CellFinderConfig(cell_diameter_px=cell_diameter_px))]
        for i, centre in enumerate(centres):
            if _near(centre, [tuple(c) for c in blasts], BLAST_EXCLUSION_RADIUS * cell_diameter_px) \
                    or _near(centre, kept[field.name], radius):
                continue
            add(img, centre, "not_blast", name=f"{field.name}-cell{i:03d}", origin="ALL_IDB1-found",
                **common)

    writer.finish(settings)
    return result


class _CropWriter:
    """Writes one laboratory's crops (PNG, at source resolution: the crop side is
    ``side_cell_diameters`` of that archive's cell diameter, so one prepared set serves any model
    input size) and their manifest rows."""

    def __init__(self, out_dir: str, geometry: CellCropGeometry, cell_diameter_px: float, *, lab: str):
        self.out_dir, self.lab, self.rows = out_dir, lab, []
        self.cell_diameter_px = cell_diameter_px
        self.native = CellCropGeometry(geometry.side_cell_diameters, geometry.side_px(cell_diameter_px))

    def add(self, img: Image.Image, centre, label: str, *, name: str, group: str,
            source_fields: list[str], field_label: int, origin: str) -> None:
        relative = f"{origin}/{name}.png"
        buffer = io.BytesIO()
        cut_cell_crop(img, centre, cell_diameter_px=self.cell_diameter_px, geometry=self.native
                      ).save(buffer, format="PNG")
        files.write_bytes(files.join(self.out_dir, relative), buffer.getvalue())
        self.rows.append({"path": relative, "label": label, "group": group,
                          "source_fields": "|".join(source_fields), "field_label": field_label,
                          "origin": origin, "x": round(centre[0], 1), "y": round(centre[1], 1),
                          "lab": self.lab})

    def finish(self, settings: dict) -> None:
        """The manifest, then the settings that make a later call reuse it."""
        _write_manifest(files.join(self.out_dir, MANIFEST_FILE), self.rows)
        files.write_bytes(files.join(self.out_dir, "settings.json"), json.dumps(settings, indent=2).encode())


def _write_manifest(uri: str, rows: list[dict]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=MANIFEST_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    files.write_bytes(uri, buffer.getvalue().encode())


def _cached(out_dir: str, settings: dict) -> bool:
    """True when ``out_dir`` holds crops prepared with exactly these settings."""
    settings_uri = files.join(out_dir, "settings.json")
    return files.exists(files.join(out_dir, MANIFEST_FILE)) and files.exists(settings_uri) and \
        json.loads(files.read_bytes(settings_uri)) == settings


def _archive_diameter(images: list[Image.Image], where: str) -> float:
    """The archive's one white-cell diameter, as a scoring run measures its own (the median of
    ``DIAMETER_SAMPLE`` fields' estimates, evenly spaced), so training and scoring crops match."""
    step = max(1, len(images) // DIAMETER_SAMPLE)
    diameter = median_cell_diameter(images[::step])
    if diameter is None:
        raise ValueError(f"no white-cell stain in the fields of {where}: cannot set the crop scale")
    return diameter


# ------------------------------------------------------------------------------ BCCD layout

def voc_boxes(xml: bytes, name: str = "WBC") -> list[Box]:
    """Pascal VOC boxes of class ``name`` as (x0, y0, x1, y1), x1/y1 exclusive like the finder's."""
    import xml.etree.ElementTree as ET

    boxes = []
    for obj in ET.fromstring(xml).findall("object"):
        if obj.findtext("name") == name:
            x0, y0, x1, y1 = (int(float(obj.findtext(f"bndbox/{k}"))) for k in ("xmin", "ymin", "xmax", "ymax"))
            boxes.append((x0, y0, x1 + 1, y1 + 1))
    return boxes


def is_bccd_root(root: str) -> bool:
    return files.exists(files.join(root, "JPEGImages")) and files.exists(files.join(root, "Annotations"))


def prepare_bccd(root: str, out_dir: str, *, geometry: CellCropGeometry) -> CellCrops:
    """Not-blast crops around every white-cell box people drew in BCCD (blood without
    leukaemia: each of its white cells is a healthy cell, and one called blast is a false blast).
    Crops are centred on the box and cut at the archive's one cell diameter (its fields' median
    estimate), as scoring cuts them, not at each box's own size."""
    images = sorted(files.iter_image_files(files.join(root, "JPEGImages")), key=lambda i: i.uri)
    settings = {"lab": BCCD, "side_cell_diameters": geometry.side_cell_diameters,
                "root": os.path.abspath(root), "fields": len(images), "block": BCCD_BLOCK}
    if _cached(out_dir, settings):
        return _reused(out_dir, geometry)
    fields = [(info, files.decode_rgb(files.read_bytes(info.uri))) for info in images]
    diameter = _archive_diameter([img for _, img in fields], root)
    writer = _CropWriter(out_dir, geometry, diameter, lab=BCCD)
    for info, img in fields:
        stem = os.path.splitext(os.path.basename(info.uri))[0]
        xml = files.join(root, f"Annotations/{stem}.xml")
        if not files.exists(xml):
            continue
        number = int(re.findall(r"\d+", stem)[-1])
        for i, box in enumerate(voc_boxes(files.read_bytes(xml))):
            writer.add(img, box_centre(box), "not_blast", name=f"{stem}-wbc{i}", origin="BCCD-WBC",
                       group=f"BCCD:block-{number // BCCD_BLOCK:03d}", source_fields=[stem],
                       field_label=0)
    writer.finish({**settings, "cell_diameter_px": diameter})
    return CellCrops(files.join(out_dir, MANIFEST_FILE), geometry, diameter, BCCD)


# ------------------------------------------------------------------------------ Taleqani layout

def _taleqani_class_root(root: str) -> str | None:
    """The folder holding Benign/Early/Pre/Pro (``root`` itself or its ``Original``)."""
    for candidate in (root, files.join(root, "Original")):
        if all(files.exists(files.join(candidate, c)) for c in TALEQANI_CLASSES):
            return candidate
    return None


def is_taleqani_root(root: str) -> bool:
    return _taleqani_class_root(root) is not None


def prepare_taleqani(root: str, out_dir: str, *, geometry: CellCropGeometry,
                     every: int = TALEQANI_EVERY) -> CellCrops:
    """Crops of every white cell the finder finds in every ``every``-th Taleqani field of each
    class, labelled with the field's class (``TALEQANI_CLASSES``: weak labels). Groups are
    blocks of 20 field numbers within a class, as the field splits use (neighbours are
    near-duplicates)."""
    classes = _taleqani_class_root(root)
    if classes is None:
        raise ValueError(f"{root} has no {'/'.join(TALEQANI_CLASSES)} class folders (nor an Original/ "
                         "folder holding them)")
    listed = {c: sorted(files.iter_image_files(files.join(classes, c)), key=lambda i: i.uri)[::every]
              for c in TALEQANI_CLASSES}
    settings = {"lab": TALEQANI, "side_cell_diameters": geometry.side_cell_diameters,
                "root": os.path.abspath(root), "every": every,
                "fields": {c: len(v) for c, v in listed.items()}}
    if _cached(out_dir, settings):
        return _reused(out_dir, geometry)
    fields = [(c, info, files.decode_rgb(files.read_bytes(info.uri))) for c, infos in listed.items()
              for info in infos]
    diameter = _archive_diameter([img for _, _, img in fields], root)
    writer = _CropWriter(out_dir, geometry, diameter, lab=TALEQANI)
    finder = CellFinderConfig(cell_diameter_px=diameter)
    for class_name, info, img in fields:
        stem = os.path.splitext(os.path.basename(info.uri))[0]
        number = int(re.findall(r"\d+", stem)[-1])
        for i, cell in enumerate(find_cells(img, finder)):
            writer.add(img, box_centre(cell.box), TALEQANI_CLASSES[class_name], name=f"{stem}-cell{i:02d}",
                       origin=f"Taleqani-{class_name}", group=f"Taleqani:{class_name}/block-{number // 20:04d}",
                       source_fields=[f"{class_name}/{stem}"],
                       field_label=int(TALEQANI_CLASSES[class_name] == "blast"))
    writer.finish({**settings, "cell_diameter_px": diameter})
    return CellCrops(files.join(out_dir, MANIFEST_FILE), geometry, diameter, TALEQANI)


def _reused(out_dir: str, geometry: CellCropGeometry) -> CellCrops:
    settings = json.loads(files.read_bytes(files.join(out_dir, "settings.json")))
    return CellCrops(files.join(out_dir, MANIFEST_FILE), geometry, float(settings["cell_diameter_px"]),
                     settings["lab"])


def lab_of_root(root: str) -> str | None:
    """Which laboratory's layout ``root`` has (None: a plain class-folder tree or manifest)."""
    for lab, recognised in ((ALL_IDB, is_all_idb_root), (BCCD, is_bccd_root), (TALEQANI, is_taleqani_root)):
        if recognised(root):
            return lab
    return None


def labs_of_roots(roots: list[str]) -> list[str]:
    """Each root's laboratory; refuses a root of no known layout and a laboratory given twice
    (checked before any preparation, so a training command fails at once)."""
    labs = []
    for root in roots:
        lab = lab_of_root(root)
        if lab is None:
            raise ValueError(f"{root} is not laid out like ALL-IDB (ALL_IDB1/im, ALL_IDB2/img), "
                             f"BCCD (JPEGImages + Annotations) or Taleqani ({'/'.join(TALEQANI_CLASSES)} "
                             "class folders, or an Original/ folder holding them): cell crops are "
                             "cut from those layouts only (a crop manifest of your own trains "
                             "alone: --data MANIFEST)")
        labs.append(lab)
    if len(set(labs)) < len(labs):
        raise ValueError(f"two roots of the same laboratory in {list(roots)} ({', '.join(labs)}): "
                         "pass each laboratory once")
    return labs


def prepare_cell_crops(roots: list[str], out_dir: str, *, geometry: CellCropGeometry) -> CellCrops:
    """Cell crops from one or more laboratories' roots (ALL-IDB, BCCD, Taleqani layouts), each
    prepared into ``out_dir/<lab>/`` at its own archive's cell diameter, and one manifest over all
    of them, ``out_dir/cells.csv`` (``lab`` column; paths relative to it): a model trained on
    several laboratories sees several stains, cameras and magnifications (docs/CELLS.md,
    "Transfer"). ``cell_diameter_px`` is the one laboratory's diameter, or a dict by laboratory
    when there are several."""
    prepare = {ALL_IDB: prepare_all_idb, BCCD: prepare_bccd, TALEQANI: prepare_taleqani}
    parts = [prepare[lab](root, files.join(out_dir, lab), geometry=geometry)
             for root, lab in zip(roots, labs_of_roots(roots))]
    rows = []
    for part in parts:
        table = pd.read_csv(io.BytesIO(files.read_bytes(part.manifest)), keep_default_na=False)
        table["path"] = [f"{part.source}/{path}" for path in table["path"]]
        rows += table.to_dict("records")
    _write_manifest(files.join(out_dir, MANIFEST_FILE), rows)
    diameter = parts[0].cell_diameter_px if len(parts) == 1 else {p.source: p.cell_diameter_px for p in parts}
    return CellCrops(files.join(out_dir, MANIFEST_FILE), geometry, diameter, "+".join(p.source for p in parts))


def crop_counts(cells_manifest: str) -> dict[str, dict[str, int]]:
    """Crops per laboratory and label of a prepared manifest: {lab: {label: n}}."""
    table = pd.read_csv(io.BytesIO(files.read_bytes(cells_manifest)), keep_default_na=False)
    return {lab: {label: int(n) for label, n in rows["label"].value_counts().sort_index().items()}
            for lab, rows in table.groupby("lab", sort=True)}


def _cell_label(y: int) -> str:
    return "blast" if y else "not_blast"


def read_cell_manifest(uri: str) -> pd.DataFrame:
    """The crop manifest with absolute paths (as ``discover_samples`` resolves them)."""
    table = pd.read_csv(io.BytesIO(files.read_bytes(uri)), keep_default_na=False)
    base = os.path.dirname(uri) if "://" not in uri else uri.rsplit("/", 1)[0]
    table["path"] = [p if os.path.isabs(p) or "://" in p else files.join(base, p) for p in table["path"]]
    return table


def field_leaks(split: SplitManifest, cells_manifest: str, *, held_out: str = "test") -> list[str]:
    """Source fields that have a crop in ``held_out`` and another in any other split: a leak.

    Independent of how the split was made: it reads which fields each crop came from (a crop of
    overlapping fields names all of them), so it catches a split that ignored the groups. In a
    manifest of several laboratories a field is named ``lab:field`` (two archives may use the
    same file names for different fields)."""
    table = read_cell_manifest(cells_manifest)
    several = "lab" in table.columns and table["lab"].nunique() > 1
    labs = table["lab"] if several else [""] * len(table)
    fields_of = {p: [f"{lab}:{f}" if lab else f for f in s.split("|") if f]
                 for p, s, lab in zip(table["path"], table["source_fields"], labs)}
    seen: dict[bool, set[str]] = {True: set(), False: set()}
    for row in split.rows:
        seen[row.split == held_out].update(fields_of.get(row.path, []))
    return sorted(seen[True] & seen[False])


def check_no_field_leaks(split: SplitManifest, cells_manifest: str) -> None:
    """Refuse a split that tests or validates on a field it trains on."""
    for held_out in ("test", "val"):
        if held_out in split.names and (leaks := field_leaks(split, cells_manifest, held_out=held_out)):
            raise ValueError(f"split leaks source fields between {held_out} and the other splits: "
                             f"{leaks[:5]}; split by the manifest's group column "
                             "(split_strategy 'duplicates' or 'blocks' keeps groups whole)")
