"""One uploaded field, analysed exactly as a scoring run would score it, plus why.

The rows come from the scoring stages themselves (``prepare_batch``, ``Predictor``,
``build_output_table``), so the call, calibrated probability and trust flags a reviewer sees are
the ones the nightly table would hold for the same bytes. Saliency is Grad-CAM
(``pytorch-grad-cam``) on the last spatial feature map of the model that made each call, shown
on the pixels that model saw (after its resize and crop), not on the full-resolution field.
"""

from __future__ import annotations

import datetime as dt
import posixpath
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from PIL import Image
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from allcore.errors import AllcoreError
from allcore.imaging.cells import CellFinderConfig
from allcore.imaging.files import IMAGE_EXTENSIONS, MAX_PIXELS, ImageDecodeError, decode_rgb
from allcore.imaging.overlay import heat_overlay, png_bytes, render
from allcore.scoring.predict import Predictor, ScoringModel
from allcore.scoring.prepare import prepare_batch, prepare_kwargs
from allcore.scoring.rows import CELL, FIELD
from allcore.scoring.table import blast_classes, build_output_table, card_summary
from allcore.imaging.data_config import DataConfig

MAX_UPLOAD_BYTES = 64 * 2**20  # a 40-megapixel TIFF (MAX_PIXELS) compresses well below this
DISPLAY_SIDE = 512  # longer side of the field pictures sent to the browser
CELL_DISPLAY_SIDE = 160  # side of a cell's saliency picture
UPLOAD_RUN_ID = "review-upload"  # run_id of the rows an upload gets (never committed anywhere)


class UploadError(AllcoreError, ValueError):
    """An upload the app cannot analyse; the message says why and what to send instead.
    ``status`` is the HTTP status the app answers with (413 too large, 415 wrong type, 422 not
    a usable image)."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


def check_upload(filename: str, data: bytes, *, max_bytes: int = MAX_UPLOAD_BYTES,
                 max_pixels: int = MAX_PIXELS) -> Image.Image:
    """The decoded field of an upload, or ``UploadError`` with a message for the reviewer."""
    suffix = posixpath.splitext(filename.lower())[1]
    if suffix not in IMAGE_EXTENSIONS:
        raise UploadError(f"{filename!r} is not a field image: expected a file ending in "
                          f"{', '.join(IMAGE_EXTENSIONS)} (JPEG, PNG or TIFF from the microscope)", 415)
    if len(data) > max_bytes:
        raise UploadError(f"{filename!r} is {len(data) / 2**20:.1f} MB, over the "
                          f"{max_bytes / 2**20:.0f} MB limit of this app; send one field, not a "
                          "slide scan, or score large images with jobs/score.py", 413)
    try:
        return decode_rgb(data, max_pixels=max_pixels)
    except ImageDecodeError as exc:
        raise UploadError(f"{filename!r} cannot be analysed: {exc}", 413 if exc.kind == "too large" else 422) from None


def feature_map_layer(model: torch.nn.Module, input_size: int) -> torch.nn.Module:
    """The module producing the model's last spatial feature map (N x C x H x W with H, W > 1):
    where Grad-CAM looks. Found by running the model once, so every registered architecture
    answers without a per-model table (pooling layers give 1 x 1 maps and are skipped)."""
    produced: list[torch.nn.Module] = []

    def record(module, _inputs, output):
        if isinstance(output, torch.Tensor) and output.ndim == 4 and min(output.shape[-2:]) > 1:
            produced.append(module)

    hooks = [m.register_forward_hook(record) for m in model.modules() if m is not model]
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, 3, input_size, input_size))
    finally:
        for hook in hooks:
            hook.remove()
    if not produced:
        raise ValueError(f"{type(model).__name__} has no spatial feature map at {input_size} px; "
                         "saliency needs a convolutional model")
    return produced[-1]


class Saliency:
    """Grad-CAM maps of one scoring model (the very model that made the calls, loaded and
    verified once by ``ScoringModel``), for its predicted class of each input."""

    def __init__(self, scoring_model: ScoringModel):
        self.model = scoring_model.model
        self.data_config = scoring_model.card.data_config_obj()
        self.cam = GradCAM(model=self.model.eval(),
                           target_layers=[feature_map_layer(self.model, self.data_config.input_size)])

    def maps(self, pixels: np.ndarray, classes: list[int]) -> np.ndarray:
        """N x S x S maps in 0..1 for preprocessed ``pixels`` (N x 3 x S x S)."""
        if not len(pixels):
            return np.zeros((0, self.data_config.input_size, self.data_config.input_size), np.float32)
        return self.cam(input_tensor=torch.from_numpy(np.ascontiguousarray(pixels)),
                        targets=[ClassifierOutputTarget(c) for c in classes])

    def picture(self, pixels: np.ndarray, heat: np.ndarray, side: int) -> bytes:
        """PNG of ``heat`` over what the model saw (``pixels`` without normalisation)."""
        return png_bytes(heat_overlay(model_view(pixels, self.data_config), heat, side=side))


def model_view(pixels: np.ndarray, cfg: DataConfig) -> Image.Image:
    """The RGB picture of one preprocessed input (3 x S x S): normalisation undone."""
    mean, std = (np.asarray(v, np.float32)[:, None, None] for v in (cfg.mean, cfg.std))
    unit = np.clip(pixels * std + mean, 0, 1)
    return Image.fromarray(np.uint8(unit.transpose(1, 2, 0) * 255 + 0.5))


@dataclass(frozen=True)
class Analysis:
    """An uploaded field's rows as the output table would hold them (``field``: the field row,
    ``cells``: its cell rows, top to bottom) and its pictures (PNG bytes): the field with numbered
    cell boxes coloured by cell call, Grad-CAM for the field, and Grad-CAM for each cell."""

    field: dict
    cells: list[dict]
    boxes_png: bytes
    field_saliency_png: bytes
    cell_saliency_pngs: list[bytes]


class FieldAnalyser:
    """Loads the models once (a Serve replica holds one) and analyses uploads one at a time:
    Grad-CAM hooks on a shared model must not interleave."""

    def __init__(self, model_uri: str, cell_model_uri: str | None = None,
                 cell_finder: CellFinderConfig = CellFinderConfig()):
        self.predictor = Predictor(model_uri, cell_artifact_uri=cell_model_uri)
        card = self.predictor.field_model.card
        cell_card = None if self.predictor.cell_model is None else self.predictor.cell_model.card
        self.prepare = prepare_kwargs(card, cell_finder=cell_finder, cell_card=cell_card)
        self.summary = card_summary(card, cell_card)
        self.blast_classes, self.cell_blast_classes = blast_classes(card, cell_card)
        self.field_saliency = Saliency(self.predictor.field_model)
        self.cell_saliency = (self.field_saliency if self.predictor.cell_model is None
                              else Saliency(self.predictor.cell_model))
        self.cell_classes = list((cell_card or card).classes)
        self._lock = threading.Lock()

    def analyse(self, filename: str, data: bytes) -> Analysis:
        image = check_upload(filename, data, max_pixels=self.prepare["max_pixels"])
        with self._lock, tempfile.TemporaryDirectory(prefix="allcore-review-") as folder:
            path = Path(folder) / f"upload{posixpath.splitext(filename.lower())[1]}"
            path.write_bytes(data)
            prepared = prepare_batch({"source_uri": np.array([str(path)], dtype=object),
                                      "source_size": np.array([len(data)], np.int64),
                                      "source_mtime": np.array(["upload"], dtype=object)},
                                     **self.prepare)
            scored = self.predictor(prepared)
            return self._analysis(image, filename, prepared, scored)

    def _analysis(self, image: Image.Image, filename: str, prepared: dict, scored: dict) -> Analysis:
        table = build_output_table(pa.table(scored), run_id=UPLOAD_RUN_ID,
                                   scored_at=dt.datetime.now(dt.timezone.utc),
                                   model_summary=self.summary, specimen_pattern=None,
                                   blast_classes=self.blast_classes,
                                   cell_blast_classes=self.cell_blast_classes)
        rows = [{**row, "source_uri": filename} for row in table.to_pylist()]
        field = next(r for r in rows if r["row_kind"] == FIELD)
        if field["status"] != "ok":
            raise UploadError(f"{filename!r} cannot be analysed: {field['error']}", 422)
        cells = [r for r in rows if r["row_kind"] == CELL]
        boxes = [tuple(r[f"box_{k}"] for k in ("x0", "y0", "x1", "y1")) for r in cells]
        calls = [(r["pred_label"], r["blast_probability"] if r["blast_probability"] is not None
                  else r["confidence"], r["call"] == "blast") for r in cells]
        kinds = np.asarray(prepared["row_kind"])
        field_pixels = prepared["pixels"][kinds == FIELD]
        field_class = self.summary["classes"].index(field["pred_label"])
        field_heat = self.field_saliency.maps(field_pixels, [field_class])[0]
        cell_pixels = self._cell_pixels(prepared, boxes)
        cell_heat = self.cell_saliency.maps(cell_pixels, [self.cell_classes.index(r["pred_label"])
                                                          for r in cells])
        return Analysis(
            field=field, cells=cells,
            boxes_png=png_bytes(render(image, boxes, calls, side=min(DISPLAY_SIDE, max(image.size)))),
            field_saliency_png=self.field_saliency.picture(field_pixels[0], field_heat, DISPLAY_SIDE),
            cell_saliency_pngs=[self.cell_saliency.picture(p, h, CELL_DISPLAY_SIDE)
                                for p, h in zip(cell_pixels, cell_heat)])

    def _cell_pixels(self, prepared: dict, boxes: list[tuple]) -> np.ndarray:
        """The pixels each cell was classified from, in the order of ``boxes`` (the table sorts
        rows, the finder lists them in its own order)."""
        key = "cell_pixels" if self.predictor.cell_model is not None else "pixels"
        prepared_boxes = list(zip(*(prepared[f"box_{k}"].tolist() for k in ("x0", "y0", "x1", "y1"))))
        cell_rows = np.flatnonzero(np.asarray(prepared["row_kind"]) == CELL)
        at = {prepared_boxes[i]: i for i in cell_rows}
        size = self.cell_saliency.data_config.input_size
        if not boxes:
            return np.zeros((0, 3, size, size), np.float32)
        return np.stack([prepared[key][at[box]] for box in boxes])
