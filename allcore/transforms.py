"""Preprocessing and seeded augmentations for smear images.

One path prepares pixels for evaluation and scoring (``preprocess_array``); training adds
augmentations that draw every random number from a caller-given ``torch.Generator``, so results
do not depend on global RNG state, worker count or process.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class DataConfig:
    """How pixels must be prepared for one model. Stored in the model card; scoring rebuilds
    its preprocessing from it, so training and scoring can never disagree.

    mean/std are applied after scaling pixels to [0, 1]. ``mean=(0,0,0), std=(1,1,1)`` is the
    plain "rescale 1/255" of the Keras recipes.
    """

    input_size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bilinear"
    crop_pct: float = 1.0  # resize to input_size / crop_pct, then centre-crop input_size
    # Paint out the bottom-right scale-bar label first (``mask_scale_bar``): a class shortcut in
    # Taleqani images. Part of the data config so that training, evaluation and scoring of a
    # model all read it from the one place its card keeps it (set by the recipe's mask_corner).
    mask_corner: bool = False

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DataConfig":
        return cls(
            input_size=int(d["input_size"]),
            mean=tuple(float(x) for x in d["mean"]),
            std=tuple(float(x) for x in d["std"]),
            interpolation=str(d.get("interpolation", "bilinear")),
            crop_pct=float(d.get("crop_pct", 1.0)),
            mask_corner=bool(d.get("mask_corner", False)),
        )


# --- resizing and layout -----------------------------------------------------------------------

_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}
# Big downscales first reduce by an integer factor (box filter), then resample the last <3x with
# the configured filter: Pillow documents the result as near-identical to a full filter, and it is
# several times faster on multi-megapixel fields, which is what scoring throughput depends on.
REDUCING_GAP = 3.0
# Bottom-right scale-bar label of the Taleqani images (width, height fractions). The large
# "200 pix" variant reaches ~30 px up a 224 px image, so 0.15 (34 px) rather than 0.12 (27 px).
SCALE_BAR_FRACTION = (0.22, 0.15)
# random_resized_crop keeps at least a quarter of the field: a field holds a handful of white
# cells, and torchvision's 8% lower bound often crops to red cells only.
RANDOM_CROP_SCALE = (0.25, 1.0)
RANDOM_CROP_RATIO = (3 / 4, 4 / 3)


def _resample(cfg: DataConfig) -> Image.Resampling:
    if cfg.interpolation not in _RESAMPLE:
        raise ValueError(
            f"unknown interpolation {cfg.interpolation!r}; valid: {', '.join(_RESAMPLE)}. "
            "Fix the model's data config."
        )
    return _RESAMPLE[cfg.interpolation]


def _validate(cfg: DataConfig) -> None:
    _resample(cfg)
    if not 0 < cfg.crop_pct <= 1:
        raise ValueError(f"crop_pct must be in (0, 1], got {cfg.crop_pct}")
    if cfg.input_size < 1:
        raise ValueError(f"input_size must be positive, got {cfg.input_size}")


def _shorter_side_to(size: tuple[int, int], target: int) -> tuple[int, int]:
    width, height = size
    if width <= height:
        return target, max(1, round(height * target / width))
    return max(1, round(width * target / height)), target


def prepare_pil(img: Image.Image, cfg: DataConfig) -> Image.Image:
    """Return ``img`` as RGB, asking the JPEG decoder for a cheaper reduced decode when the image
    is at least twice the resize target (libjpeg scales by 1/2, 1/4 or 1/8 inside the DCT, never
    below the target, so the final resize still does the real filtering).

    Caveat: ``Image.draft`` mutates ``img`` and only acts on a JPEG that is not yet loaded (fresh
    from ``Image.open``); on a loaded or non-JPEG image it does nothing. A drafted decode differs
    slightly from a full decode of the same file, so callers that want the fast path must hand
    over the lazily opened image. Images below twice the target (e.g. 224 px Taleqani fields)
    are never drafted, so training and scoring see identical pixels there.
    """
    target = _shorter_side_to(img.size, round(cfg.input_size / cfg.crop_pct))
    if img.format in ("JPEG", "MPO") and min(img.size) >= 2 * min(target):
        img.draft("RGB", target)
    return img if img.mode == "RGB" else img.convert("RGB")


def _resize_centre_crop(img: Image.Image, cfg: DataConfig) -> Image.Image:
    width, height = _shorter_side_to(img.size, round(cfg.input_size / cfg.crop_pct))
    img = img.resize((width, height), _resample(cfg), reducing_gap=REDUCING_GAP)
    left = int(round((width - cfg.input_size) / 2))
    top = int(round((height - cfg.input_size) / 2))
    return img.crop((left, top, left + cfg.input_size, top + cfg.input_size))


def median_colour(img: Image.Image, exclude: tuple[int, int, int, int] | None = None) -> np.ndarray:
    """Per-channel median of an RGB image, leaving out the ``exclude`` box (x0, y0, x1, y1)
    unless it is everything: ``np.median`` of the pixels exactly (the two middle values are read
    off PIL's 256-bin histograms), without the partition of every pixel, which took ~0.2 s on a
    5-megapixel ALL-IDB field, twice per field in scoring."""
    counts = np.array(img.histogram(), dtype=np.int64).reshape(3, 256)
    if exclude is not None:
        left = counts - np.array(img.crop(exclude).histogram(), dtype=np.int64).reshape(3, 256)
        counts = left if left[0].sum() else counts
    n = int(counts[0].sum())
    middle = [np.searchsorted(c, ((n - 1) // 2, n // 2), side="right") for c in counts.cumsum(axis=1)]
    return np.array([(low + high) / 2 for low, high in middle])


def mask_scale_bar(img: Image.Image, fraction: tuple[float, float] = SCALE_BAR_FRACTION) -> Image.Image:
    """Fill the bottom-right box (``fraction`` of width, height) with the median colour of the
    rest of the image. The Taleqani scale-bar label there is coloured by class (a shortcut a
    model learns instead of morphology); masking it in train and eval removes that cue."""
    if not all(0 < f <= 1 for f in fraction):
        raise ValueError(f"fraction must be two numbers in (0, 1], got {fraction}")
    masked = img.convert("RGB")  # a copy
    width, height = masked.size
    box = (width - max(1, round(width * fraction[0])), height - max(1, round(height * fraction[1])),
           width, height)
    masked.paste(tuple(int(v) for v in np.round(median_colour(masked, exclude=box))), box)
    return masked


def _unit_array(img: Image.Image) -> np.ndarray:
    """RGB PIL image -> float32 CHW array in [0, 1]."""
    return np.ascontiguousarray(np.asarray(img, dtype=np.float32).transpose(2, 0, 1)) / 255.0


def normalise_array(unit: np.ndarray, cfg: DataConfig) -> np.ndarray:
    """(x - mean) / std per channel on a CHW (or NCHW) float32 array in [0, 1]."""
    mean = np.asarray(cfg.mean, dtype=np.float32)[:, None, None]
    std = np.asarray(cfg.std, dtype=np.float32)[:, None, None]
    return (unit - mean) / std


def unit_array(img: Image.Image, cfg: DataConfig) -> np.ndarray:
    """Decode-side preprocessing before normalisation: RGB, scale-bar mask if ``cfg.mask_corner``, resize the
    shorter side to ``round(input_size / crop_pct)``, centre-crop ``input_size``; float32 CHW
    in [0, 1]. Noise for robustness tests is added at this stage, in pixel space."""
    img = prepare_pil(img, cfg)
    if cfg.mask_corner:
        img = mask_scale_bar(img)
    return _unit_array(_resize_centre_crop(img, cfg))


def preprocess_array(img: Image.Image, cfg: DataConfig) -> np.ndarray:
    """The model's input for one image as float32 CHW: the scoring batch function stacks these,
    and ``eval_transform`` wraps it, so evaluation and scoring share one code path."""
    return normalise_array(unit_array(img, cfg), cfg)


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


def desaturate_hsv(img: Image.Image) -> Image.Image:
    """Set HSV saturation to 0 and convert back to RGB: a grey image whose every pixel keeps its
    HSV value (max of R, G, B). MobileNet_M adds such a copy of every minority-class training
    image to rebalance classes without duplicating pixels; the dataset side adds the copies."""
    hue, _, value = img.convert("RGB").convert("HSV").split()
    return Image.merge("HSV", (hue, Image.new("L", img.size, 0), value)).convert("RGB")


# --- transforms --------------------------------------------------------------------------------


class EvalTransform:
    """PIL image -> normalised float tensor CHW (``preprocess_array``). With ``noise_sigma`` > 0
    it adds Gaussian noise before normalisation and then needs a generator per call."""

    def __init__(self, cfg: DataConfig, *, noise_sigma: float = 0.0):
        _validate(cfg)
        if noise_sigma < 0:
            raise ValueError(f"noise_sigma must be >= 0, got {noise_sigma}")
        self.cfg, self.noise_sigma = cfg, noise_sigma

    def __call__(self, img: Image.Image, generator: torch.Generator | None = None) -> torch.Tensor:
        if not self.noise_sigma:
            return torch.from_numpy(preprocess_array(img, self.cfg))
        if generator is None:
            raise ValueError("noise_sigma > 0 needs a torch.Generator per image, for reproducible noise")
        unit = torch.from_numpy(unit_array(img, self.cfg))
        noisy = add_gaussian_noise(unit, self.noise_sigma, generator)
        return torch.from_numpy(normalise_array(noisy.numpy(), self.cfg))


def eval_transform(cfg: DataConfig, *, noise_sigma: float = 0.0) -> EvalTransform:
    """Evaluation / scoring preprocessing for ``cfg`` (see ``EvalTransform``)."""
    return EvalTransform(cfg, noise_sigma=noise_sigma)


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
}
VALID_AUGMENT_KEYS = tuple(_AUGMENT_PARSERS)


def _uniform(generator: torch.Generator, low: float = 0.0, high: float = 1.0) -> float:
    return low + (high - low) * torch.rand((), generator=generator).item()


def _randint(generator: torch.Generator, high: int) -> int:
    return int(torch.randint(high, (), generator=generator))


class TrainTransform:
    """PIL image + generator -> augmented, normalised float tensor CHW. Every random draw comes
    from the generator, so a (seed, image) pair always gives the same tensor, in any worker.
    Order: scale-bar mask, crop/resize, affine, rot90, flips, brightness, contrast, noise,
    normalise. With no augmentation it equals ``eval_transform(cfg)`` exactly."""

    def __init__(self, cfg: DataConfig, augment: dict[str, Any]):
        _validate(cfg)
        self.cfg, self.augment = cfg, Augment.from_dict(augment)

    def __call__(self, img: Image.Image, generator: torch.Generator) -> torch.Tensor:
        aug = self.augment
        img = prepare_pil(img, self.cfg)
        if self.cfg.mask_corner:
            img = mask_scale_bar(img)
        if aug.random_resized_crop:
            img = self._random_resized_crop(img, generator)
        else:
            img = _resize_centre_crop(img, self.cfg)
        TF = _torchvision_functional()
        x = self._affine(torch.from_numpy(_unit_array(img)), generator)
        if aug.rotate90:
            x = torch.rot90(x, _randint(generator, 4), dims=(-2, -1))
        if aug.hflip and _uniform(generator) < aug.hflip:
            x = x.flip(-1)
        if aug.vflip and _uniform(generator) < aug.vflip:
            x = x.flip(-2)
        if aug.brightness != (1.0, 1.0):
            x = TF.adjust_brightness(x, _uniform(generator, *aug.brightness))
        if aug.contrast != (1.0, 1.0):
            x = TF.adjust_contrast(x, _uniform(generator, *aug.contrast))
        if aug.gaussian_noise_sigma:
            sigma = aug.gaussian_noise_sigma[_randint(generator, len(aug.gaussian_noise_sigma))]
            x = add_gaussian_noise(x, sigma, generator)
        return torch.from_numpy(normalise_array(x.contiguous().numpy(), self.cfg))

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
        return img.resize(size, _resample(self.cfg), box=box, reducing_gap=REDUCING_GAP)

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
