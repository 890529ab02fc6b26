"""Preprocessing and seeded augmentation: each operation does what the recipes mean by it."""

from __future__ import annotations

import io
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from allcore.imaging.data_config import (
                                         SCALE_BAR_FRACTION,
                                         DataConfig,
                                         mask_scale_bar,
                                         prepare_pil,
                                         preprocess_array,
                                         )
from allcore.imaging.transforms import (
                                        VALID_AUGMENT_KEYS,
                                        add_gaussian_noise,
                                        desaturate_hsv,
                                        eval_transform,
                                        jitter_hed,
                                        train_transform,
                                        )

UNIT = DataConfig(input_size=32, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))  # output == pixels/255
UNIT64 = DataConfig(input_size=64, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))


def random_image(size: int = 32, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def flat_image(value: int | tuple[int, int, int], size: int = 32) -> Image.Image:
    return Image.new("RGB", (size, size), value if isinstance(value, tuple) else (value,) * 3)


def square_image(size: int = 64, side: int = 16, offset: tuple[int, int] = (0, 0)) -> Image.Image:
    """Grey field with one white square, centred unless offset: geometry is easy to measure."""
    pixels = np.full((size, size, 3), 100, dtype=np.uint8)
    top, left = (size - side) // 2 + offset[0], (size - side) // 2 + offset[1]
    pixels[top : top + side, left : left + side] = 255
    return Image.fromarray(pixels)


def augmented(augment: dict, img: Image.Image, seed: int = 0, cfg: DataConfig = UNIT) -> torch.Tensor:
    return train_transform(cfg, augment)(img, torch.Generator().manual_seed(seed))


def bright_mask(x: torch.Tensor) -> torch.Tensor:
    return x.mean(0) > 0.7


# --- eval / preprocessing ---------------------------------------------------------------------


def test_eval_normalises_constant_image_to_expected_value():
    cfg = DataConfig(input_size=24, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    out = eval_transform(cfg)(flat_image((200, 100, 50), size=40))
    assert out.shape == (3, 24, 24) and out.dtype == torch.float32
    expected = (torch.tensor([200, 100, 50]) / 255 - torch.tensor(cfg.mean)) / torch.tensor(cfg.std)
    torch.testing.assert_close(out.mean((1, 2)), expected.float(), atol=1e-5, rtol=0)


def test_eval_resizes_shorter_side_by_crop_pct_then_centre_crops():
    # 64x32 image with left half black and right half white; crop_pct 0.5 resizes to 32 high
    # (64 wide) and the 16 px centre crop straddles the boundary: half black, half white.
    pixels = np.zeros((32, 64, 3), dtype=np.uint8)
    pixels[:, 32:] = 255
    cfg = DataConfig(input_size=16, mean=(0, 0, 0), std=(1, 1, 1), crop_pct=0.5, interpolation="nearest")
    out = eval_transform(cfg)(Image.fromarray(pixels))
    assert out.shape == (3, 16, 16)
    assert torch.all(out[:, :, :8] == 0) and torch.all(out[:, :, 8:] == 1)


def test_eval_transform_wraps_preprocess_array_and_converts_modes():
    img = random_image(48).convert("L")
    cfg = DataConfig(input_size=32)
    array = preprocess_array(img, cfg)
    assert array.dtype == np.float32 and array.shape == (3, 32, 32)
    np.testing.assert_array_equal(eval_transform(cfg)(img).numpy(), array)


def test_invalid_data_config_is_rejected_with_choices():
    with pytest.raises(ValueError, match="bicubic"):
        eval_transform(DataConfig(input_size=32, interpolation="cubic"))
    with pytest.raises(ValueError, match="crop_pct"):
        eval_transform(DataConfig(input_size=32, crop_pct=1.5))


def test_prepare_pil_drafts_only_large_unloaded_jpegs_and_stays_close_to_full_decode():
    ramp = np.linspace(0, 255, 512, dtype=np.uint8)
    grey = np.full((512, 512), 128, np.uint8)
    pixels = np.stack([np.tile(ramp, (512, 1)), np.tile(ramp[:, None], (1, 512)), grey], -1)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=95)
    cfg = DataConfig(input_size=64, mean=(0, 0, 0), std=(1, 1, 1))

    drafted = prepare_pil(Image.open(io.BytesIO(buffer.getvalue())), cfg)
    assert 64 <= min(drafted.size) < 512  # decoded at 1/4 or 1/8 scale, never below the target
    loaded = Image.open(io.BytesIO(buffer.getvalue()))
    loaded.load()
    assert prepare_pil(loaded, cfg).size == (512, 512)  # draft is a no-op once loaded

    fast = preprocess_array(Image.open(io.BytesIO(buffer.getvalue())), cfg)
    full = preprocess_array(loaded, cfg)
    assert np.abs(fast - full).max() < 0.05


# --- scale-bar mask ---------------------------------------------------------------------------


def test_mask_scale_bar_fills_only_the_corner_with_the_median_of_the_rest():
    pixels = np.full((50, 100, 3), (200, 150, 220), dtype=np.uint8)
    pixels[:10, :10] = 0  # a minority of dark pixels must not move the median
    pixels[-6:, -20:] = (255, 0, 0)  # a red "scale bar"
    out = np.asarray(mask_scale_bar(Image.fromarray(pixels), fraction=(0.2, 0.1)))
    corner = np.zeros((50, 100), dtype=bool)
    corner[-5:, -20:] = True
    assert np.all(out[corner] == (200, 150, 220))
    np.testing.assert_array_equal(out[~corner], pixels[~corner])  # row -6 of the bar is outside the box


def test_mask_corner_option_changes_only_the_corner_in_eval_and_train():
    img = random_image(32)
    box_w, box_h = round(32 * SCALE_BAR_FRACTION[0]), round(32 * SCALE_BAR_FRACTION[1])
    for masked, plain in [
        (eval_transform(replace(UNIT, mask_corner=True))(img), eval_transform(UNIT)(img)),
        (augmented({}, img, cfg=replace(UNIT, mask_corner=True)), augmented({}, img)),
    ]:
        differs = (masked != plain).any(0)
        assert differs[-box_h:, -box_w:].float().mean() > 0.9
        differs[-box_h:, -box_w:] = False
        assert not differs.any()


# --- deterministic colour operations ----------------------------------------------------------


def test_desaturate_gives_grey_that_keeps_hsv_value():
    img = random_image(32, seed=3)
    grey = np.asarray(desaturate_hsv(img)).astype(int)
    assert np.abs(grey[..., 0] - grey[..., 1]).max() <= 1 and np.abs(grey[..., 1] - grey[..., 2]).max() <= 1
    np.testing.assert_allclose(grey.mean(-1), np.asarray(img).max(-1), atol=1)


def test_gaussian_noise_std_matches_sigma_in_pixel_units():
    grey = torch.full((3, 64, 64), 0.5)
    noisy = add_gaussian_noise(grey, 9, torch.Generator().manual_seed(0))
    assert abs((noisy - grey).std().item() - 9 / 255) < 0.1 * 9 / 255
    assert abs((noisy - grey).mean().item()) < 0.002
    assert add_gaussian_noise(grey, 0, torch.Generator()) is grey
    clipped = add_gaussian_noise(torch.ones(3, 8, 8), 50, torch.Generator().manual_seed(0))
    assert clipped.max() <= 1 and clipped.min() < 1


# --- augmentations ----------------------------------------------------------------------------


def test_no_augmentation_equals_eval_transform():
    img = random_image(48)
    cfg = DataConfig(input_size=32)
    torch.testing.assert_close(augmented({}, img, cfg=cfg), eval_transform(cfg)(img), atol=0, rtol=0)


def test_flips_with_probability_one_mirror_exactly():
    img = random_image()
    base = eval_transform(UNIT)(img)
    assert torch.equal(augmented({"hflip": 1.0}, img), base.flip(-1))
    assert torch.equal(augmented({"vflip": 1.0}, img), base.flip(-2))
    assert torch.equal(augmented({"hflip": 0.0, "vflip": 0.0}, img), base)


def test_rotate90_gives_a_multiple_of_90_degrees_and_all_four_occur():
    img = random_image()
    base = eval_transform(UNIT)(img)
    seen = set()
    for seed in range(20):
        out = augmented({"rotate90": True}, img, seed)
        matches = [k for k in range(4) if torch.equal(out, torch.rot90(base, k, dims=(-2, -1)))]
        assert len(matches) == 1
        seen.add(matches[0])
    assert seen == {0, 1, 2, 3}


def test_rotation_moves_an_off_centre_square_around_the_centre_within_the_max_angle():
    img = square_image(offset=(0, 16))  # square centred 16 px right of the image centre
    for seed in range(5):
        mask = bright_mask(augmented({"rotation": 30}, img, seed, cfg=UNIT64))
        ys, xs = torch.nonzero(mask, as_tuple=True)
        angle = torch.rad2deg(torch.atan2(ys.float().mean() - 31.5, xs.float().mean() - 31.5)).abs().item()
        assert angle <= 30 + 3
        assert 200 < mask.sum() < 330  # rotation preserves area (16 x 16 = 256)


def test_zoom_follows_keras_semantics():
    zoomed_in = bright_mask(augmented({"zoom": [0.5, 0.5]}, square_image(), cfg=UNIT64)).sum().item()
    zoomed_out = bright_mask(augmented({"zoom": [2.0, 2.0]}, square_image(), cfg=UNIT64)).sum().item()
    assert zoomed_in == pytest.approx(4 * 256, rel=0.1)  # Keras z=0.5 shows half the field
    assert zoomed_out == pytest.approx(256 / 4, rel=0.2)


def test_shift_translates_within_the_fraction_and_varies_with_seed():
    shifts = []
    for seed in range(8):
        mask = bright_mask(augmented({"shift": 0.1}, square_image(), seed, cfg=UNIT64))
        ys, xs = torch.nonzero(mask, as_tuple=True)
        shifts.append((ys.float().mean().item() - 31.5, xs.float().mean().item() - 31.5))
    assert all(abs(dy) <= 6.4 + 0.5 and abs(dx) <= 6.4 + 0.5 for dy, dx in shifts)
    assert len({(round(dy), round(dx)) for dy, dx in shifts}) > 3


def test_shear_slants_a_vertical_bar_by_at_most_the_max_angle():
    pixels = np.full((64, 64, 3), 100, dtype=np.uint8)
    pixels[8:56, 30:34] = 255
    slopes = []
    for seed in range(6):
        mask = bright_mask(augmented({"shear": 20}, Image.fromarray(pixels), seed, cfg=UNIT64)).float()
        rows = torch.arange(16, 48)
        centres = (mask[rows] * torch.arange(64)).sum(1) / mask[rows].sum(1)
        slopes.append(np.polyfit(rows.numpy(), centres.numpy(), 1)[0])
    assert all(abs(s) <= np.tan(np.deg2rad(20)) + 0.02 for s in slopes)
    assert max(abs(s) for s in slopes) > 0.05


def test_brightness_range_scales_the_mean_within_the_range():
    def mean_ratios(brightness):
        return [augmented({"brightness": brightness}, flat_image(128), seed).mean().item() * 255 / 128 for seed in range(10)]

    ratios = mean_ratios([0.4, 0.8])
    assert all(0.4 - 1e-4 <= r <= 0.8 + 1e-4 for r in ratios)
    assert max(ratios) - min(ratios) > 0.1
    deltas = mean_ratios(0.2)
    assert all(0.8 - 1e-4 <= r <= 1.2 + 1e-4 for r in deltas) and min(deltas) < 1 < max(deltas)


def test_contrast_scales_spread_around_the_mean_within_the_delta():
    pixels = np.full((32, 32, 3), 100, dtype=np.uint8)
    pixels[:, 16:] = 160
    base_std = eval_transform(UNIT)(Image.fromarray(pixels)).std().item()
    ratios = [augmented({"contrast": 0.3}, Image.fromarray(pixels), s).std().item() / base_std for s in range(10)]
    assert all(0.7 - 1e-3 <= r <= 1.3 + 1e-3 for r in ratios) and min(ratios) < 1 < max(ratios)


def test_noise_augmentation_draws_one_of_the_listed_sigmas_per_image():
    noisy = [augmented({"gaussian_noise_sigma": [3, 9]}, flat_image(128, 64), seed, cfg=UNIT64) for seed in range(12)]
    stds = {round(x.std().item() * 255) for x in noisy}
    assert stds == {3, 9}


def test_random_resized_crop_outputs_input_size_and_varies():
    outs = [augmented({"random_resized_crop": True}, random_image(64), seed) for seed in range(3)]
    assert all(out.shape == (3, 32, 32) for out in outs)
    assert not torch.equal(outs[0], outs[1])


ALL_RANDOM = {
    "hflip": 0.5, "vflip": 0.5, "rotation": 45, "rotate90": True, "shear": 3, "zoom": [0.8, 1.0],
    "shift": 0.1, "brightness": [0.4, 0.8], "contrast": 0.2, "gaussian_noise_sigma": [3, 9],
    "random_resized_crop": True, "hed": 0.2, "gamma": [0.8, 1.25], "blur": 1.0,
    "resolution": [0.4, 1.0], "jpeg": [40, 95],
}


def _smear_crop(size: int = 64) -> Image.Image:
    """A purple disc (a stained nucleus) on a pink background, with fine stripes as detail."""
    pixels = np.full((size, size, 3), (226, 196, 206), dtype=np.uint8)
    yy, xx = np.mgrid[:size, :size]
    disc = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size / 4) ** 2
    pixels[disc] = (110, 60, 150)
    pixels[disc & (xx % 2 == 0)] = (70, 30, 120)
    return Image.fromarray(pixels)


def test_stain_jitter_changes_the_stain_not_the_shapes():
    img = _smear_crop()
    base = augmented({}, img, cfg=UNIT64)
    disc = torch.from_numpy(np.asarray(img)[..., 0] < 150)
    jittered = [augmented({"hed": 0.3}, img, seed, cfg=UNIT64) for seed in range(6)]
    assert all(not torch.allclose(x, base, atol=0.02) for x in jittered)
    for x in jittered:  # the nucleus stays darker than the background in every draw
        assert x.mean(0)[disc].mean() < x.mean(0)[~disc].mean() - 0.1
    # a zero jitter is no jitter (skimage's round trip alone is exact to a grey level)
    torch.testing.assert_close(augmented({"hed": 0.0}, img, cfg=UNIT64), base, atol=0, rtol=0)
    assert jitter_hed(np.asarray(img) / 255.0, np.ones(3), np.zeros(3)) == pytest.approx(np.asarray(img) / 255.0, abs=2e-3)


def test_optics_augmentations_remove_detail_as_a_weaker_lens_would():
    img = _smear_crop()
    detail = lambda x: (x[:, :, 1:] - x[:, :, :-1]).abs().mean().item()  # noqa: E731
    base = detail(augmented({}, img, cfg=UNIT64))
    assert detail(augmented({"resolution": [0.3, 0.3]}, img, cfg=UNIT64)) < 0.6 * base
    assert detail(augmented({"blur": 2.0}, img, seed=1, cfg=UNIT64)) < base
    assert torch.equal(augmented({"resolution": [1.0, 1.0]}, img, cfg=UNIT64), augmented({}, img, cfg=UNIT64))
    jpeg = augmented({"jpeg": [10, 10]}, img, cfg=UNIT64)
    assert 0 < (jpeg - augmented({}, img, cfg=UNIT64)).abs().mean() < 0.1
    brighter = augmented({"gamma": [0.5, 0.5]}, img, cfg=UNIT64)
    assert brighter.mean() > augmented({}, img, cfg=UNIT64).mean()


def test_same_seed_same_tensor_different_seed_different_tensor():
    img = random_image(48)
    assert set(ALL_RANDOM) == set(VALID_AUGMENT_KEYS)
    torch.manual_seed(123)  # global RNG state must not matter
    first = augmented(ALL_RANDOM, img, seed=7)
    torch.manual_seed(456)
    assert torch.equal(first, augmented(ALL_RANDOM, img, seed=7))
    assert not torch.equal(first, augmented(ALL_RANDOM, img, seed=8))


def test_unknown_augment_key_lists_valid_keys():
    with pytest.raises(ValueError) as error:
        train_transform(UNIT, {"hflip": 0.5, "colour_jitter": 0.1})
    assert "colour_jitter" in str(error.value)
    assert all(key in str(error.value) for key in VALID_AUGMENT_KEYS)


@pytest.mark.parametrize(
    "augment",
    [
        {"hflip": 1.5},
        {"rotation": -10},
        {"zoom": [1.2, 0.8]},
        {"rotate90": 1},
        {"gaussian_noise_sigma": [-1]},
        {"brightness": 1.0},
        {"hed": 1.5},
        {"resolution": [0.5, 1.5]},
        {"jpeg": [90, 20]},
        {"blur": -1},
    ],
)
def test_invalid_augment_values_raise_with_the_key(augment):
    with pytest.raises(ValueError, match=next(iter(augment))):
        train_transform(UNIT, augment)


# --- real data (skipped when absent) ----------------------------------------------------------

SHARED_DATA = Path(
    os.environ.get("ALLCORE_SHARED_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data")
)
TALEQANI = SHARED_DATA / "all-taleqani" / "Original"


@pytest.mark.shared_data
@pytest.mark.skipif(not TALEQANI.is_dir(), reason="shared Taleqani data not present")
def test_real_fields_preprocess_and_scale_bar_mask_leaves_no_label_edge():
    """The large "200 pix" label box is ~30 px tall: a shorter mask leaves its white top edge
    (3 pure-white rows above the box) in ~40% of Early images, a class-linked cue."""
    paths = sorted((TALEQANI / "Early").glob("*.jpg"))[::4]
    box_h = round(224 * SCALE_BAR_FRACTION[1])
    with_edge = 0
    for path in paths:
        with Image.open(path) as img:
            masked = np.asarray(mask_scale_bar(img)).astype(int)
        strip = masked[224 - box_h - 6 : 224 - box_h, 196:223].min(-1) >= 245
        with_edge += int(strip.all(1).sum() >= 3)
    assert with_edge / len(paths) < 0.05
    with Image.open(paths[0]) as img:
        out = eval_transform(DataConfig(input_size=224, mask_corner=True))(img)
    assert out.shape == (3, 224, 224) and torch.isfinite(out).all()


def test_reinhard_normalisation_matches_the_published_formula_and_removes_a_colour_cast():
    from skimage.color import rgb2lab

    from allcore.imaging.data_config import REINHARD_TARGET, normalise_stain

    cfg = replace(UNIT64, stain_normalise="reinhard")
    img = np.asarray(_smear_crop()).astype(np.float32) / 255
    out = normalise_stain(np.moveaxis(img, -1, 0), cfg)
    lab = rgb2lab(np.moveaxis(out, 0, -1).astype(np.float64))
    # each CIELAB channel takes the target's mean and spread (to the rounding of the gamut clip)
    assert lab.mean((0, 1)) == pytest.approx(REINHARD_TARGET["mean"], abs=1.5)
    assert lab.std((0, 1)) == pytest.approx(REINHARD_TARGET["std"], rel=0.1)
    # another laboratory's cast (bluer, darker) is taken out: both give nearly the same input
    cast = np.clip(img * np.array([0.8, 0.85, 1.0], np.float32) + np.array([0, 0, 0.05], np.float32), 0, 1)
    assert np.abs(normalise_stain(np.moveaxis(cast, -1, 0), cfg) - out).mean() < 0.02
    assert np.abs(np.moveaxis(cast, -1, 0) - np.moveaxis(img, -1, 0)).mean() > 0.05
    grey = normalise_stain(np.moveaxis(img, -1, 0), replace(UNIT64, stain_normalise="grey"))
    assert np.array_equal(grey[0], grey[1]) and np.array_equal(grey[1], grey[2])
    # training without augmentation still sees exactly what evaluation sees
    torch.testing.assert_close(augmented({}, _smear_crop(), cfg=cfg), eval_transform(cfg)(_smear_crop()),
                               atol=0, rtol=0)
    with pytest.raises(ValueError, match="stain_normalise"):
        eval_transform(replace(UNIT64, stain_normalise="macenko"))
