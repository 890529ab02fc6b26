"""How pixels are prepared for one model: its data config and the deterministic preprocessing
that evaluation and scoring share (decode-side resize, scale-bar mask, normalisation).

As timm keeps every preprocessing fact in a model's data config, this module owns them; it needs
NumPy and Pillow only, so the scoring driver, which reads model cards and samples fields, never
imports torch. Training's seeded augmentations build on it in ``allcore.imaging.transforms``.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass

import numpy as np
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
    # Colour normalisation of every image, last before the model (``normalise_stain``): "none",
    # "reinhard" (CIELAB mean and spread matched to REINHARD_TARGET) or "grey" (lightness only).
    stain_normalise: str = "none"

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
            stain_normalise=str(d.get("stain_normalise", "none")),
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
def resample_filter(cfg: DataConfig) -> Image.Resampling:
    if cfg.interpolation not in _RESAMPLE:
        raise ValueError(
            f"unknown interpolation {cfg.interpolation!r}; valid: {', '.join(_RESAMPLE)}. "
            "Fix the model's data config."
        )
    return _RESAMPLE[cfg.interpolation]


STAIN_NORMALISATIONS = ("none", "reinhard", "grey")
# Reinhard et al. 2001 ("Color transfer between images"), as most stain-normalisation code applies
# it: in CIELAB (not the paper's l-alpha-beta), each channel moved to a target mean and standard
# deviation. The target is the median over the cell crops of ALL-IDB, BCCD and Taleqani here
# (docs/CELLS.md, "Transfer"): a smear between the three, not any one laboratory's.
REINHARD_TARGET = {"mean": (72.0, 9.0, -8.0), "std": (13.0, 14.0, 17.0)}


def normalise_stain(unit_chw: np.ndarray, cfg: DataConfig) -> np.ndarray:
    """The data config's colour normalisation of a float CHW image in [0, 1] (same layout out).
    Per image: a laboratory's stain, camera white balance and exposure shift every pixel alike,
    so matching each image's colour statistics to one target removes them while the shapes and
    the contrast between nucleus and cytoplasm remain."""
    if cfg.stain_normalise == "none":
        return unit_chw
    from skimage.color import lab2rgb, rgb2lab

    rgb = np.moveaxis(unit_chw, 0, -1).astype(np.float64)
    if cfg.stain_normalise == "grey":
        grey = rgb2lab(rgb)[..., :1] / 100.0
        return np.ascontiguousarray(np.repeat(np.moveaxis(grey, -1, 0), 3, 0), dtype=np.float32)
    lab = rgb2lab(rgb)
    mean, std = lab.mean((0, 1)), lab.std((0, 1)) + 1e-6
    lab = (lab - mean) / std * np.asarray(REINHARD_TARGET["std"]) + np.asarray(REINHARD_TARGET["mean"])
    with warnings.catch_warnings():  # colours outside sRGB are clipped, as intended
        warnings.simplefilter("ignore", UserWarning)
        out = np.clip(lab2rgb(np.clip(lab, [0, -128, -128], [100, 127, 127])), 0.0, 1.0)
    return np.ascontiguousarray(np.moveaxis(out, -1, 0), dtype=np.float32)


def validate(cfg: DataConfig) -> None:
    resample_filter(cfg)
    if cfg.stain_normalise not in STAIN_NORMALISATIONS:
        raise ValueError(f"unknown stain_normalise {cfg.stain_normalise!r}; valid: "
                         f"{', '.join(STAIN_NORMALISATIONS)}. Fix the recipe or the model's data config.")
    if not 0 < cfg.crop_pct <= 1:
        raise ValueError(f"crop_pct must be in (0, 1], got {cfg.crop_pct}")
    if cfg.input_size < 1:
        raise ValueError(f"input_size must be positive, got {cfg.input_size}")


def shorter_side_to(size: tuple[int, int], target: int) -> tuple[int, int]:
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
    target = shorter_side_to(img.size, round(cfg.input_size / cfg.crop_pct))
    if img.format in ("JPEG", "MPO") and min(img.size) >= 2 * min(target):
        img.draft("RGB", target)
    return img if img.mode == "RGB" else img.convert("RGB")


def resize_centre_crop(img: Image.Image, cfg: DataConfig) -> Image.Image:
    width, height = shorter_side_to(img.size, round(cfg.input_size / cfg.crop_pct))
    img = img.resize((width, height), resample_filter(cfg), reducing_gap=REDUCING_GAP)
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


def to_unit_chw(img: Image.Image) -> np.ndarray:
    """RGB PIL image -> float32 CHW array in [0, 1]."""
    return np.ascontiguousarray(np.asarray(img, dtype=np.float32).transpose(2, 0, 1)) / 255.0


def normalise_array(unit: np.ndarray, cfg: DataConfig) -> np.ndarray:
    """(x - mean) / std per channel on a CHW (or NCHW) float32 array in [0, 1]."""
    mean = np.asarray(cfg.mean, dtype=np.float32)[:, None, None]
    std = np.asarray(cfg.std, dtype=np.float32)[:, None, None]
    return (unit - mean) / std


def unit_array(img: Image.Image, cfg: DataConfig) -> np.ndarray:
    """Decode-side preprocessing before normalisation: RGB, scale-bar mask if ``cfg.mask_corner``, resize the
    shorter side to ``round(input_size / crop_pct)``, centre-crop ``input_size``, colour
    normalisation if ``cfg.stain_normalise``; float32 CHW in [0, 1]. Noise for robustness tests is added at this stage, in pixel space."""
    img = prepare_pil(img, cfg)
    if cfg.mask_corner:
        img = mask_scale_bar(img)
    return normalise_stain(to_unit_chw(resize_centre_crop(img, cfg)), cfg)


def preprocess_array(img: Image.Image, cfg: DataConfig) -> np.ndarray:
    """The model's input for one image as float32 CHW: the scoring batch function stacks these,
    and ``eval_transform`` wraps it, so evaluation and scoring share one code path."""
    return normalise_array(unit_array(img, cfg), cfg)
