"""Train and eval transforms for smear images, side by side.

Evaluation and scoring share one deterministic path (``allcore.imaging.data_config.preprocess_array``);
training adds augmentations that draw every random number from a caller-given
``torch.Generator``, so results do not depend on global RNG state, worker count or process.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageFilter

from allcore.imaging.data_config import (REDUCING_GAP, DataConfig, mask_scale_bar, normalise_array,
                                         normalise_stain, prepare_pil, preprocess_array,
                                         resample_filter, resize_centre_crop, to_unit_chw,
                                         validate)

# random_resized_crop keeps at least a quarter of the field: a field holds a handful of white
# cells, and torchvision's 8% lower bound often crops to red cells only.
RANDOM_CROP_SCALE = (0.25, 1.0)
RANDOM_CROP_RATIO = (3 / 4, 4 / 3)
# HED stain jitter shifts each density by U(-d, d) times this: skimage's densities of stained
# smear pixels lie at ~0.01-0.15 (ALL-IDB, BCCD, Taleqani), a tenth of the optical-density units
# the scale factors were published in.
HED_SHIFT_FRACTION = 0.1


# --- pixel operations shared by augmentation and robustness tests ------------------------------


def add_gaussian_noise(
    tensor01: torch.Tensor, sigma_pixels: float, generator: torch.Generator
) -> torch.Tensor:
    """Add N(0, sigma) noise, independent per pixel and channel, to an image in [0, 1], with sigma
    in 0-255 pixel units as the papers state it; clip to [0, 1]. Used by the noise augmentation
    and by the noise-robustness evaluation, so both mean the same sigma."""
    if sigma_pixels < 0:
        raise ValueError(f"sigma_pixels must be >= 0, got {sigma_pixels}")
    if sigma_pixels == 0:
        return tensor01
    noise = torch.randn(tensor01.shape, generator=generator, dtype=tensor01.dtype, device=tensor01.device)
    return (tensor01 + noise * (sigma_pixels / 255.0)).clamp_(0.0, 1.0)


def jitter_hed(rgb01: np.ndarray, scale: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """Stain jitter in haematoxylin-eosin-DAB space (Tellez et al. 2018, "Whole-slide mitosis
    detection in H&E breast histology using PHH3 as a reference"): each stain's optical density
    is multiplied by ``scale[c]`` and shifted by ``shift[c]``. Giemsa / May-Grunwald smears
    separate into the same purple and pink channels, so a lab whose stain is bluer or paler lies
    along these axes rather than along RGB brightness. ``rgb01`` is HxWx3 in [0, 1]."""
    from skimage.color import hed2rgb, rgb2hed

    hed = rgb2hed(rgb01)
    return np.clip(hed2rgb(hed * scale + shift), 0.0, 1.0)


def resample_down_up(img: Image.Image, factor: float) -> Image.Image:
    """Shrink by ``factor`` (0 < factor <= 1) and enlarge back: the detail a lower-magnification
    objective or camera leaves of a cell, at the same crop size."""
    if factor >= 1.0:
        return img
    small = (max(1, round(img.width * factor)), max(1, round(img.height * factor)))
    return img.resize(small, Image.Resampling.BILINEAR, reducing_gap=REDUCING_GAP).resize(
        img.size, Image.Resampling.BILINEAR)


def jpeg_round_trip(img: Image.Image, quality: int) -> Image.Image:
    """Encode and decode as JPEG at ``quality``: the block artefacts of camera archives."""
    buffer = io.BytesIO()
    img.save(buffer, format="JPEG", quality=int(quality))
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def desaturate_hsv(img: Image.Image) -> Image.Image:
    """Set HSV saturation to 0 and convert back to RGB: a grey image whose every pixel keeps its
    HSV value (max of R, G, B). MobileNet_M adds such a copy of every minority-class training
    image to rebalance classes without duplicating pixels; the dataset side adds the copies."""
    hue, _, value = img.convert("RGB").convert("HSV").split()
    return Image.merge("HSV", (hue, Image.new("L", img.size, 0), value)).convert("RGB")


# --- transforms --------------------------------------------------------------------------------


class EvalTransform:
    """PIL image -> normalised float tensor CHW (``preprocess_array``). Noise for robustness
    studies is added to unnormalised pixels by ``allcore.evaluation.metrics.noise_robustness_table``
    (``add_gaussian_noise``), not here."""

    def __init__(self, cfg: DataConfig):
        validate(cfg)
        self.cfg = cfg

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return torch.from_numpy(preprocess_array(img, self.cfg))


def eval_transform(cfg: DataConfig) -> EvalTransform:
    """Evaluation / scoring preprocessing for ``cfg`` (see ``EvalTransform``)."""
    return EvalTransform(cfg)


def _unit_interval(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise ValueError(f"augment {key!r} must be a number in [0, 1], got {value!r}")
    return float(value)


def _non_negative(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ValueError(f"augment {key!r} must be a number >= 0 (degrees), got {value!r}")
    return float(value)


def _flag(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"augment {key!r} must be true or false, got {value!r}")
    return value


def _factor_range(key: str, value: Any) -> tuple[float, float]:
    """A delta d means factors in [1 - d, 1 + d]; a pair is the range itself (Keras style)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < 1:
        return 1.0 - value, 1.0 + value
    if isinstance(value, (list, tuple)) and len(value) == 2 and 0 < value[0] <= value[1]:
        return float(value[0]), float(value[1])
    raise ValueError(
        f"augment {key!r} must be a delta in [0, 1) or a range [min, max] with 0 < min <= max, "
        f"got {value!r}"
    )


def _fraction_range(key: str, value: Any) -> tuple[float, float]:
    if isinstance(value, (list, tuple)) and len(value) == 2 and 0 < value[0] <= value[1] <= 1:
        return float(value[0]), float(value[1])
    raise ValueError(f"augment {key!r} must be a range [min, max] with 0 < min <= max <= 1, got {value!r}")


def _quality_range(key: str, value: Any) -> tuple[int, int]:
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(
            isinstance(v, int) and not isinstance(v, bool) for v in value) and 1 <= value[0] <= value[1] <= 100:
        return int(value[0]), int(value[1])
    raise ValueError(f"augment {key!r} must be a range [min, max] of JPEG qualities in 1..100, got {value!r}")


def _sigmas(key: str, value: Any) -> tuple[float, ...]:
    values = value if isinstance(value, (list, tuple)) else [value]
    if not values or any(isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 for v in values):
        raise ValueError(
            f"augment {key!r} must be a list of sigmas >= 0 in pixel units (0-255), got {value!r}"
        )
    return tuple(float(v) for v in values)


@dataclass(frozen=True)
class Augment:
    """Validated augmentation settings, parsed once from a recipe's ``augment`` dict. Defaults
    are "off". Geometry follows Keras ImageDataGenerator, since three recipes were Keras."""

    hflip: float = 0.0  # probability
    vflip: float = 0.0  # probability
    rotation: float = 0.0  # max degrees, uniform in [-rotation, rotation]
    rotate90: bool = False  # random multiple of 90 degrees
    shear: float = 0.0  # max degrees (x-shear), uniform in [-shear, shear]
    zoom: tuple[float, float] = (1.0, 1.0)  # Keras zoom factor z: shows 1/z of the field (z < 1 magnifies)
    shift: float = 0.0  # max translation as a fraction of width / height
    brightness: tuple[float, float] = (1.0, 1.0)  # multiplicative factor range
    contrast: tuple[float, float] = (1.0, 1.0)  # factor range, blending with the mean grey
    gaussian_noise_sigma: tuple[float, ...] = ()  # one sigma (pixel units) drawn per image
    random_resized_crop: bool = False  # instead of resize + centre crop
    # stain and optics, for images from other laboratories (docs/CELLS.md, "Transfer")
    hed: float = 0.0  # stain jitter d: each H, E, D density scaled by U(1 - d, 1 + d), shifted by U(-d, d) x HED_SHIFT_FRACTION
    gamma: tuple[float, float] = (1.0, 1.0)  # gamma factor range
    blur: float = 0.0  # max Gaussian blur sigma in model-input pixels, uniform in [0, blur]
    resolution: tuple[float, float] = (1.0, 1.0)  # shrink-and-enlarge factor range (optics, magnification)
    jpeg: tuple[int, int] | None = None  # JPEG quality range; None: no re-encoding

    @classmethod
    def from_dict(cls, augment: dict[str, Any]) -> "Augment":
        unknown = sorted(set(augment) - set(_AUGMENT_PARSERS))
        if unknown:
            raise ValueError(
                f"unknown augment key(s) {', '.join(map(repr, unknown))}; valid keys: "
                f"{', '.join(_AUGMENT_PARSERS)}. Fix the recipe's augment table."
            )
        return cls(**{key: _AUGMENT_PARSERS[key](key, value) for key, value in augment.items()})


_AUGMENT_PARSERS = {
    "hflip": _unit_interval,
    "vflip": _unit_interval,
    "rotation": _non_negative,
    "rotate90": _flag,
    "shear": _non_negative,
    "zoom": _factor_range,
    "shift": _unit_interval,
    "brightness": _factor_range,
    "contrast": _factor_range,
    "gaussian_noise_sigma": _sigmas,
    "random_resized_crop": _flag,
    "hed": _unit_interval,
    "gamma": _factor_range,
    "blur": _non_negative,
    "resolution": _fraction_range,
    "jpeg": _quality_range,
}
VALID_AUGMENT_KEYS = tuple(_AUGMENT_PARSERS)


def _uniform(generator: torch.Generator, low: float = 0.0, high: float = 1.0) -> float:
    return low + (high - low) * torch.rand((), generator=generator).item()


def _randint(generator: torch.Generator, high: int) -> int:
    return int(torch.randint(high, (), generator=generator))


class TrainTransform:
    """PIL image + generator -> augmented, normalised float tensor CHW. Every random draw comes
    from the generator, so a (seed, image) pair always gives the same tensor, in any worker.
    Order: scale-bar mask, crop/resize, optics (resolution, blur, JPEG), affine, rot90, flips,
    stain (HED), brightness, contrast, gamma, noise, stain normalisation (data config), normalise.
    With no augmentation it equals
    ``eval_transform(cfg)`` exactly."""

    def __init__(self, cfg: DataConfig, augment: dict[str, Any]):
        validate(cfg)
        self.cfg, self.augment = cfg, Augment.from_dict(augment)

    def __call__(self, img: Image.Image, generator: torch.Generator) -> torch.Tensor:
        aug = self.augment
        img = prepare_pil(img, self.cfg)
        if self.cfg.mask_corner:
            img = mask_scale_bar(img)
        if aug.random_resized_crop:
            img = self._random_resized_crop(img, generator)
        else:
            img = resize_centre_crop(img, self.cfg)
        img = self._optics(img, generator)
        TF = _torchvision_functional()
        x = self._affine(torch.from_numpy(to_unit_chw(img)), generator)
        if aug.rotate90:
            x = torch.rot90(x, _randint(generator, 4), dims=(-2, -1))
        if aug.hflip and _uniform(generator) < aug.hflip:
            x = x.flip(-1)
        if aug.vflip and _uniform(generator) < aug.vflip:
            x = x.flip(-2)
        if aug.hed:
            scale = np.array([_uniform(generator, 1 - aug.hed, 1 + aug.hed) for _ in range(3)])
            shift = np.array([_uniform(generator, -aug.hed, aug.hed) for _ in range(3)]) * HED_SHIFT_FRACTION
            x = torch.from_numpy(jitter_hed(x.permute(1, 2, 0).numpy().astype(np.float64), scale, shift)
                                 ).permute(2, 0, 1).to(torch.float32)
        if aug.brightness != (1.0, 1.0):
            x = TF.adjust_brightness(x, _uniform(generator, *aug.brightness))
        if aug.contrast != (1.0, 1.0):
            x = TF.adjust_contrast(x, _uniform(generator, *aug.contrast))
        if aug.gamma != (1.0, 1.0):
            x = x.clamp(0.0, 1.0) ** _uniform(generator, *aug.gamma)
        if aug.gaussian_noise_sigma:
            sigma = aug.gaussian_noise_sigma[_randint(generator, len(aug.gaussian_noise_sigma))]
            x = add_gaussian_noise(x, sigma, generator)
        # last, as at evaluation: the model learns normalised colours of augmented stains
        x = normalise_stain(x.contiguous().numpy(), self.cfg)
        return torch.from_numpy(normalise_array(x, self.cfg))

    def _optics(self, img: Image.Image, generator: torch.Generator) -> Image.Image:
        """What another microscope and camera do to the same cell: less resolution, defocus,
        compression. Applied at the model's input size, where scoring sees the cell too."""
        aug = self.augment
        if aug.resolution != (1.0, 1.0):
            img = resample_down_up(img, _uniform(generator, *aug.resolution))
        if aug.blur:
            img = img.filter(ImageFilter.GaussianBlur(_uniform(generator, 0.0, aug.blur)))
        if aug.jpeg:
            img = jpeg_round_trip(img, round(_uniform(generator, aug.jpeg[0], aug.jpeg[1])))
        return img

    def _random_resized_crop(self, img: Image.Image, generator: torch.Generator) -> Image.Image:
        width, height = img.size
        box = None
        for _ in range(10):  # as torchvision: retry, then fall back to the central square
            area = width * height * _uniform(generator, *RANDOM_CROP_SCALE)
            ratio = math.exp(_uniform(generator, *map(math.log, RANDOM_CROP_RATIO)))
            crop_w, crop_h = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
            if 0 < crop_w <= width and 0 < crop_h <= height:
                left, top = _randint(generator, width - crop_w + 1), _randint(generator, height - crop_h + 1)
                box = (left, top, left + crop_w, top + crop_h)
                break
        if box is None:
            side = min(width, height)
            left, top = (width - side) // 2, (height - side) // 2
            box = (left, top, left + side, top + side)
        size = (self.cfg.input_size, self.cfg.input_size)
        return img.resize(size, resample_filter(self.cfg), box=box, reducing_gap=REDUCING_GAP)

    def _affine(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        aug = self.augment
        if not (aug.rotation or aug.shear or aug.shift or aug.zoom != (1.0, 1.0)):
            return x
        height, width = x.shape[-2:]
        TF = _torchvision_functional()
        return TF.affine(
            x,
            angle=_uniform(generator, -aug.rotation, aug.rotation),
            translate=[
                _uniform(generator, -aug.shift, aug.shift) * width,
                _uniform(generator, -aug.shift, aug.shift) * height,
            ],
            scale=1.0 / _uniform(generator, *aug.zoom),
            shear=[_uniform(generator, -aug.shear, aug.shear), 0.0],
            interpolation=TF.InterpolationMode.BILINEAR,
            # uncovered corners take the background colour rather than black, which is no stain
            fill=x.flatten(1).median(dim=1).values.tolist(),
        )


def _torchvision_functional():
    """torchvision's tensor ops, imported at the first augmentation: scoring and evaluation never
    need them, and the import costs about a second of every nightly run's start-up."""
    import torchvision.transforms.v2.functional as TF

    return TF


def train_transform(cfg: DataConfig, augment: dict[str, Any]) -> TrainTransform:
    """Training preprocessing + seeded augmentation for ``cfg`` (see ``TrainTransform``).
    Unknown augment keys raise ValueError listing ``VALID_AUGMENT_KEYS``."""
    return TrainTransform(cfg, augment)
