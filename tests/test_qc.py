"""Image QC statistics move the right way on blurred, badly exposed and wrongly stained fields."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageFilter

from allcore.imaging.qc import QC_COLUMNS, image_qc
from allcore.data.synthetic import make_field


@pytest.fixture(scope="module")
def field() -> Image.Image:
    return make_field(np.random.default_rng(3), label_index=3, size=224)[0]


@pytest.fixture(scope="module")
def clean(field) -> dict[str, float]:
    return image_qc(field)


def test_every_documented_column_is_returned_for_pil_and_arrays(field, clean):
    assert list(clean) == list(QC_COLUMNS)
    assert image_qc(np.asarray(field)) == clean
    with pytest.raises(ValueError, match="uint8"):
        image_qc(np.asarray(field, dtype=np.float32))


def test_blur_raises_only_the_blur_statistic_much(field, clean):
    blurred = image_qc(field.filter(ImageFilter.GaussianBlur(4)))
    assert blurred["qc_blur"] > clean["qc_blur"] + 0.2
    assert abs(blurred["qc_lightness_mean"] - clean["qc_lightness_mean"]) < 3


def test_overexposure_clips_white_and_underexposure_darkens(field, clean):
    over = image_qc(ImageEnhance.Brightness(field).enhance(2.0))
    assert over["qc_bright_fraction"] > clean["qc_bright_fraction"] + 0.5
    assert over["qc_lightness_mean"] > clean["qc_lightness_mean"]
    under = image_qc(ImageEnhance.Brightness(field).enhance(0.03))
    assert under["qc_dark_fraction"] > 0.5 and under["qc_lightness_mean"] < 20


def test_swapped_channels_move_the_stain_hue(field, clean):
    swapped = image_qc(Image.fromarray(np.asarray(field)[..., ::-1].copy()))
    # pink-purple (a* > 0) becomes blue-green: a* falls, b* changes sign
    assert swapped["qc_a_mean"] < clean["qc_a_mean"] - 5
    assert abs(swapped["qc_b_mean"] - clean["qc_b_mean"]) > 5
    assert swapped["qc_blur"] == pytest.approx(clean["qc_blur"], abs=0.05)


def test_cell_size_in_pixels_follows_resolution_and_its_fraction_does_not(field, clean):
    assert clean["qc_cell_count"] >= 1
    double = image_qc(field.resize((448, 448), Image.Resampling.BILINEAR))
    assert double["qc_cell_diameter_px"] == pytest.approx(2 * clean["qc_cell_diameter_px"], rel=0.15)
    assert double["qc_cell_diameter_fraction"] == pytest.approx(clean["qc_cell_diameter_fraction"], rel=0.15)
    # focus and colour are measured at one working resolution, so they barely move either
    assert double["qc_blur"] == pytest.approx(clean["qc_blur"], abs=0.05)


def test_a_blank_image_has_no_cells_and_no_cell_size():
    blank = image_qc(Image.new("RGB", (300, 200), (235, 225, 230)))
    assert blank["qc_cell_count"] == 0
    assert math.isnan(blank["qc_cell_diameter_px"]) and math.isnan(blank["qc_cell_diameter_fraction"])


def test_heavy_jpeg_compression_raises_blockiness(field, clean):
    buffer = io.BytesIO()
    field.save(buffer, format="JPEG", quality=5)
    compressed = image_qc(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))
    assert clean["qc_blockiness"] < 1.3 < 2.0 < compressed["qc_blockiness"]
