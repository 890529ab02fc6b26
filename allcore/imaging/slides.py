"""Whole-slide images: open them with the field's libraries, know their pixel size, and cut them
into overlapping tiles at one physical scale, so that a slide is scored like many fields and every
cell is counted once.

Readers. ``open_slide`` picks one of three ``SlideReader`` implementations: ``TiffSlideReader``
(tifffile + zarr) for pyramidal / OME-TIFF, which reads only the tiles a region touches, also
from ``s3://`` through fsspec range reads; ``OpenSlideReader`` for the vendor formats
(Aperio .svs, Hamamatsu .ndpi, 3DHistech .mrxs, Leica .scn, Ventana .bif, ...),
which OpenSlide must open from a local path: an ``s3://`` slide is copied once into a bounded
local cache (``SlideCache``); ``DicomSlideReader`` (wsidicom) for DICOM-WSI, a folder of .dcm
instances listed as one input (``allcore.imaging.files.is_folder_slide``), which reads only the frames a
region touches, on ``s3://`` too through fsspec. Nothing here decodes a whole level 0.

Scale. Cells are found and classified at one physical scale (``working_mpp``), whatever the
scanner: a slide at 0.25 um/px and one at 0.5 um/px are both resampled so a white cell of
``WHITE_CELL_DIAMETER_UM`` spans the same number of pixels, and give the same cells. The pixel
size comes from the slide's metadata (OpenSlide's ``openslide.mpp-x/y``, TIFF resolution tags,
OME ``PhysicalSizeX/Y``), else from ``--mpp``, else the slide is an error row that says so.

Tiles and the once-only rule. A slide is cut into a grid of square *cores* of
``TILE_CORE_CELL_DIAMETERS`` cell diameters at the working scale; each tile is its core plus a
margin of ``TILE_MARGIN_CELL_DIAMETERS`` on every side (clipped at the slide's edge), so
neighbouring tiles overlap by two margins, more than a large blast is wide, and a cell whose
centre lies in a core is whole in that core's tile. A tile keeps the cells whose centroid lies in
its core grown by ``OWNERSHIP_SLACK_CELL_DIAMETERS`` (so a cell on a core border, whose centroid
two tiles measure a pixel apart, is kept by at least one); when the slide's tiles are all scored,
``duplicate_cells`` drops the copy of any cell kept twice (boxes of different tiles overlapping
by ``DUPLICATE_IOU`` or more), keeping the one whose centroid lies deeper inside its own core.
Tiles whose core shows no smear on a low-resolution thumbnail (glass, dark pen or label) are
not read at all.
"""

from __future__ import annotations

import hashlib
import math
import os
import posixpath
import re
import shutil
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image

from allcore.errors import AllcoreError
from allcore.imaging.files import (OPENSLIDE_EXTENSIONS, filesystem, folder_slide_files,
                                   is_folder_slide, storage_options)

TIFF_EXTENSIONS = (".tif", ".tiff")  # .ome.tif(f) included; a small flat TIFF stays a field
SLIDE_EXTENSIONS = OPENSLIDE_EXTENSIONS + TIFF_EXTENSIONS
WHITE_CELL_DIAMETER_UM = 12.0
# A typical white cell (lymphocytes 7-10 um, neutrophils and blasts 10-20 um): sets the working
# scale, so it only has to be the same for every slide, not exact for each.
TILE_CORE_CELL_DIAMETERS = 16.0  # core side: about an ALL-IDB field's worth of cells per tile
TILE_MARGIN_CELL_DIAMETERS = 1.0
# Margin on each side of a core. A large blast (~20 um) is < 1.7 typical diameters wide, so its
# half width fits in one margin: a cell centred in a core is never cut by its tile's edge.
OWNERSHIP_SLACK_CELL_DIAMETERS = 0.25
DUPLICATE_IOU = 0.3  # boxes from two tiles overlapping this much are one cell counted twice
THUMBNAIL_SIDE = 1024  # longer side of the thumbnail the tissue mask is drawn on
MIN_TISSUE_FRACTION = 0.02  # a core with less smear than this on the thumbnail is skipped
DENSE_TISSUE_FRACTION = 0.97  # a core this covered is the smear's thick part: noted
GLASS_OPTICAL_DENSITY = 0.15  # summed RGB optical density below which a pixel is bare glass
PEN_OPTICAL_DENSITY = 2.4  # ... above which it is ink, a label or debris, not smear
DICOM_S3_BLOCK_BYTES = 2 ** 20  # read-ahead of a DICOM-WSI instance on s3: a few frames
DICOM_FRAME_CACHE_BYTES = 32 * 2 ** 20  # per open DICOM-WSI slide, decoded and encoded each
# (wsidicom's default is 100 MB each): a tile touches at most ~40 frames of 256 px, ~8 MB, and
# the frames its neighbours share with it are read just before or after
SLIDE_CACHE_BYTES = int(os.environ.get("ALLCORE_SLIDE_CACHE_BYTES", 20 * 2 ** 30))
DENSE_NOTE = "thick part of the smear: cells overlap, outside the readable monolayer"
NO_MPP_ERROR = ("slide has no pixel size (um/px) in its metadata (openslide.mpp-x/y, TIFF "
                "resolution tags, OME PhysicalSizeX/Y or DICOM PixelSpacing); pass --mpp UM_PER_PX "
                "for this archive")


class SlideError(AllcoreError, ValueError):
    """A slide that cannot be tiled (unreadable, not a slide format, no pixel size). The message
    says what to do; scoring turns it into the slide's error row."""


def is_slide_name(uri: str) -> bool:
    """Whether ``uri`` may be a slide by its name alone (a .tif may still be a plain field); a
    listed DICOM-WSI folder (its uri ends in "/") is one."""
    return str(uri).lower().endswith(SLIDE_EXTENSIONS) or is_folder_slide(uri)


def slide_id(uri: str) -> str:
    """The specimen a slide is: its file name without the extension(s) (``case7.ome.tif`` ->
    ``case7``); a DICOM-WSI folder's name (``.../case7/`` -> ``case7``)."""
    name = posixpath.basename(str(uri).replace(os.sep, "/").rstrip("/"))
    if is_folder_slide(uri):
        return name
    return re.sub(r"(\.ome)?\.[^.]+$", "", name, flags=re.IGNORECASE)


class SlideReader:
    """What scoring needs of a slide, whatever the library behind it. Coordinates are (x, y);
    ``read_region`` takes the top-left in level-0 pixels and the size in the level's pixels, like
    OpenSlide, and returns uint8 RGB (H, W, 3)."""

    level_dimensions: tuple[tuple[int, int], ...]  # (width, height) per level, level 0 first
    mpp: tuple[float, float] | None  # um per level-0 pixel (x, y), None when the file says nothing

    @property
    def dimensions(self) -> tuple[int, int]:
        return self.level_dimensions[0]

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        width = self.level_dimensions[0][0]
        return tuple(width / w for w, _ in self.level_dimensions)

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        raise NotImplementedError

    def associated_images(self) -> dict[str, Image.Image]:
        """Label, macro and thumbnail images stored beside the pyramid (empty when none)."""
        return {}

    def close(self) -> None:
        pass

    def thumbnail(self, max_side: int = THUMBNAIL_SIDE) -> Image.Image:
        """The whole slide with its longer side ``max_side`` px (or less), from the coarsest level
        at least that large, read in strips so that not even that level is decoded at once."""
        level = _coarsest_level_at_least(self.level_dimensions, max_side)
        width, height = self.level_dimensions[level]
        downsample = self.level_downsamples[level]
        scale = min(1.0, max_side / max(width, height))
        out = Image.new("RGB", (max(1, round(width * scale)), max(1, round(height * scale))))
        strip = max(1, int(2 ** 24 // max(width * 3, 1)))  # ~16 MB of the level at a time
        for top in range(0, height, strip):
            rows = min(strip, height - top)
            part = Image.fromarray(self.read_region((0, round(top * downsample)), level, (width, rows)))
            y0, y1 = round(top * scale), round((top + rows) * scale)
            if y1 > y0:
                out.paste(part.resize((out.width, y1 - y0), Image.Resampling.BOX), (0, y0))
        return out


def _coarsest_level_at_least(dimensions, side: int) -> int:
    fitting = [i for i, (w, h) in enumerate(dimensions) if max(w, h) >= side]
    return max(fitting) if fitting else 0


def _tiff_mpp(page, ome_xml: str | None) -> tuple[float, float] | None:
    """um/px of a TIFF's level 0: OME PhysicalSizeX/Y (in um unless the unit says otherwise),
    else the XResolution/YResolution tags in pixels per centimetre or inch."""
    if ome_xml:
        sizes = {axis: re.search(rf'PhysicalSize{axis}="([0-9.eE+-]+)"', ome_xml) for axis in "XY"}
        units = {axis: re.search(rf'PhysicalSize{axis}Unit="([^"]+)"', ome_xml) for axis in "XY"}
        factor = {"µm": 1.0, "um": 1.0, "nm": 1e-3, "mm": 1e3, "cm": 1e4}
        if sizes["X"]:
            values = []
            for axis in "XY":
                match = sizes[axis] or sizes["X"]
                unit = (units[axis] or units["X"])
                values.append(float(match.group(1)) * factor.get(unit.group(1) if unit else "µm", 1.0))
            if all(v > 0 for v in values):
                return values[0], values[1]
    tags = page.tags
    unit = tags.get("ResolutionUnit")
    per_um = {2: 1 / 25400.0, 3: 1 / 10000.0}.get(int(unit.value) if unit else 2)
    if "XResolution" not in tags or per_um is None:
        return None
    values = []
    for name in ("XResolution", "YResolution"):
        tag = tags.get(name) or tags["XResolution"]
        numerator, denominator = tag.value
        pixels_per_unit = numerator / denominator if denominator else 0.0
        values.append(1.0 / (pixels_per_unit * per_um) if pixels_per_unit > 1 else 0.0)
    # a resolution of 1 (or 72/96 dpi, a desktop default) is no statement about a microscope
    if any(v <= 0 or v > 50 for v in values):
        return None
    return values[0], values[1]


class TiffSlideReader(SlideReader):
    """Pyramidal or OME-TIFF through tifffile: each level is a zarr array over the file's tiles,
    so a region reads (and, on s3, range-requests) only the tiles it touches."""

    def __init__(self, uri: str):
        import tifffile
        import zarr

        fs, path = filesystem(uri)
        self._file = fs.open(path, "rb")
        try:
            self._tiff = tifffile.TiffFile(self._file)
            series = self._tiff.series[0]
            levels = series.levels
            if len(levels[0].shape) != 3 or levels[0].shape[-1] not in (3, 4):
                raise SlideError(f"TIFF series of shape {levels[0].shape} is not an RGB slide "
                                 "(expected height x width x 3)")
            self._levels = [zarr.open_array(series.aszarr(level=k), mode="r") for k in range(len(levels))]
            self.level_dimensions = tuple((int(a.shape[1]), int(a.shape[0])) for a in self._levels)
            self.mpp = _tiff_mpp(levels[0].pages[0] if levels[0].pages else self._tiff.pages[0],
                                 self._tiff.ome_metadata)
        except Exception:
            self._file.close()
            raise

    def read_region(self, location, level, size):
        x0, y0 = (round(v / self.level_downsamples[level]) for v in location)
        width, height = size
        array = self._levels[level]
        out = np.full((height, width, 3), 255, np.uint8)  # beyond the slide: white glass
        sx0, sy0 = max(x0, 0), max(y0, 0)
        sx1, sy1 = min(x0 + width, array.shape[1]), min(y0 + height, array.shape[0])
        if sx1 > sx0 and sy1 > sy0:
            out[sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0] = np.asarray(array[sy0:sy1, sx0:sx1])[..., :3]
        return out

    def close(self):
        self._tiff.close()
        self._file.close()


class OpenSlideReader(SlideReader):
    """Vendor formats through OpenSlide (from a local path: see ``SlideCache`` for s3)."""

    def __init__(self, local_path: str):
        import openslide

        self._slide = openslide.OpenSlide(local_path)
        self.level_dimensions = tuple(self._slide.level_dimensions)
        props = self._slide.properties
        try:
            mpp = (float(props[openslide.PROPERTY_NAME_MPP_X]), float(props[openslide.PROPERTY_NAME_MPP_Y]))
        except (KeyError, ValueError):
            mpp = None
        self.mpp = mpp if mpp and all(v > 0 for v in mpp) else None

    @property
    def level_downsamples(self):
        return tuple(self._slide.level_downsamples)

    def read_region(self, location, level, size):
        rgba = self._slide.read_region(tuple(int(v) for v in location), level, tuple(int(v) for v in size))
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))  # transparent = no scan: glass
        return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"))

    def associated_images(self):
        return {name: img.convert("RGB") for name, img in self._slide.associated_images.items()}

    def close(self):
        self._slide.close()


class DicomSlideReader(SlideReader):
    """DICOM-WSI through wsidicom: the VL Whole Slide Microscopy instances of one folder (its
    .dcm files; on ``s3://`` opened through fsspec), the first pyramid's levels, label and
    overview. A region reads only the frames it touches; the pixel size is the base level's
    PixelSpacing."""

    def __init__(self, uri: str):
        from wsidicom import Settings, WsiDicom

        files = folder_slide_files(uri)
        if not files:
            raise SlideError("no .dcm files in the DICOM-WSI folder; copy the slide's instances "
                             "into it")
        options = storage_options(uri)
        if options:  # s3: a frame is tens of kB; s3fs's default read-ahead block is 50 MB
            options = {**options, "default_block_size": DICOM_S3_BLOCK_BYTES}
        try:
            self._wsi = WsiDicom.open(files, file_options=options or None, settings=Settings(
                decoded_frame_cache_size=DICOM_FRAME_CACHE_BYTES,
                encoded_frame_cache_size=DICOM_FRAME_CACHE_BYTES))
        except Exception as exc:  # wsidicom's own types, pydicom's, OSError
            raise SlideError(f"no readable DICOM-WSI slide in the folder ({type(exc).__name__}: "
                             f"{exc}); check that it holds every VL Whole Slide Microscopy "
                             "instance (.dcm) of one slide, completely copied") from None
        try:
            self._levels = list(self._wsi.levels)
            self.level_dimensions = tuple((int(lv.size.width), int(lv.size.height)) for lv in self._levels)
            try:
                spacing = self._wsi.mpp  # um/px despite the type's name
                mpp = (float(spacing.width), float(spacing.height))
            except Exception:  # no PixelSpacing: wsidicom raises instead of saying None
                mpp = None
            self.mpp = mpp if mpp and all(0 < v < 50 for v in mpp) else None
        except Exception:
            self._wsi.close()
            raise

    def read_region(self, location, level, size):
        x0, y0 = (round(v / self.level_downsamples[level]) for v in location)
        width, height = (int(v) for v in size)
        level_width, level_height = self.level_dimensions[level]
        out = np.full((height, width, 3), 255, np.uint8)  # beyond the slide: white glass
        sx0, sy0 = max(x0, 0), max(y0, 0)
        sx1, sy1 = min(x0 + width, level_width), min(y0 + height, level_height)
        if sx1 > sx0 and sy1 > sy0:  # wsidicom refuses a region past the level's edge
            try:
                region = self._wsi.read_region((sx0, sy0), self._levels[level].level,
                                               (sx1 - sx0, sy1 - sy0), as_array=True)
            except OSError:  # the share or the store: may work next time
                raise
            except Exception as exc:  # a cut-off file (EOFError), a bad frame, ...
                raise SlideError(f"unreadable DICOM-WSI frames at level {level} ({type(exc).__name__}: "
                                 f"{exc}); an instance (.dcm) of the folder is damaged or was cut "
                                 "off in transfer: re-copy the folder") from None
            out[sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0] = np.asarray(region)[..., :3]
        return out

    def associated_images(self):
        """The label and the overview (as OpenSlide's 'macro'), when the folder holds them."""
        images = {}
        for name, series, read in (("label", self._wsi.labels, self._wsi.read_label),
                                   ("macro", self._wsi.overviews, self._wsi.read_overview)):
            if series is not None and len(series):
                images[name] = read().convert("RGB")
        return images

    def close(self):
        self._wsi.close()


class SlideCache:
    """Local copies of ``s3://`` slides for OpenSlide, which reads only from disk: one copy per
    (uri, size, ETag) in ``root``, the least recently used removed once the copies pass
    ``max_bytes``. Shared by the threads of one process; separate processes on one node may each
    copy a slide once (a copy is written to a temporary name and renamed, so none reads a partial
    file)."""

    def __init__(self, root: str | None = None, max_bytes: int = SLIDE_CACHE_BYTES):
        self.root = root or os.environ.get("ALLCORE_SLIDE_CACHE") or os.path.join(
            tempfile.gettempdir(), "allcore-slide-cache")
        self.max_bytes = max_bytes
        self._lock = threading.Lock()

    def local_path(self, uri: str) -> str:
        fs, path = filesystem(uri)
        info = fs.info(path)
        key = hashlib.blake2b(f"{uri}\x00{info.get('size')}\x00{info.get('ETag', '')}".encode(),
                              digest_size=8).hexdigest()
        target = os.path.join(self.root, key, posixpath.basename(path))
        with self._lock:
            if not os.path.exists(target):
                if info.get("size", 0) > self.max_bytes:
                    raise SlideError(f"slide is {info['size']:,} bytes, over the local slide cache "
                                     f"({self.max_bytes:,}); raise ALLCORE_SLIDE_CACHE_BYTES or "
                                     "copy the slide to a local disk")
                self._evict(int(info.get("size", 0)))
                os.makedirs(os.path.dirname(target), exist_ok=True)
                partial = f"{target}.partial-{os.getpid()}"
                fs.get(path, partial)
                os.replace(partial, target)
            os.utime(target)  # most recently used
        return target

    def _evict(self, incoming: int) -> None:
        entries = []
        for key in os.listdir(self.root) if os.path.isdir(self.root) else []:
            folder = os.path.join(self.root, key)
            files = [os.path.join(folder, f) for f in os.listdir(folder)]
            entries.append((max((os.path.getmtime(f) for f in files), default=0), folder,
                            sum(os.path.getsize(f) for f in files)))
        total = sum(size for _, _, size in entries) + incoming
        for _, folder, size in sorted(entries):
            if total <= self.max_bytes:
                break
            shutil.rmtree(folder, ignore_errors=True)
            total -= size


_CACHE = SlideCache()
_OPEN: OrderedDict[str, SlideReader] = OrderedDict()
_OPEN_LOCK = threading.Lock()
OPEN_READERS = 4  # readers kept open per process: the tiles of one slide arrive together


def open_slide(uri: str) -> SlideReader:
    """A reader for the slide at ``uri`` (local or s3://); raises ``SlideError`` with what to do
    when it is no slide the readers know."""
    lower = str(uri).lower()
    try:
        if is_folder_slide(uri):
            return DicomSlideReader(uri)
        if lower.endswith(TIFF_EXTENSIONS):
            return TiffSlideReader(uri)
        if lower.endswith(OPENSLIDE_EXTENSIONS):
            if lower.startswith("s3://") and lower.endswith(".mrxs"):
                raise SlideError(".mrxs slides keep their pixels in a folder beside the file, "
                                 "which cannot be fetched from s3 one object at a time; copy the "
                                 "slide and its folder to a local disk")
            return OpenSlideReader(_CACHE.local_path(uri) if lower.startswith("s3://") else uri)
    except SlideError:
        raise
    except Exception as exc:  # tifffile, zarr and OpenSlide raise their own types for bad files
        raise SlideError(f"unreadable slide ({type(exc).__name__}: {exc}); check that the file is "
                         "a complete copy of a supported slide format") from None
    raise SlideError(f"not a slide format: expected one of {', '.join(SLIDE_EXTENSIONS)} or a "
                     "DICOM-WSI folder of .dcm files")


def cached_slide(uri: str) -> SlideReader:
    """``open_slide`` with the last ``OPEN_READERS`` readers of this process kept open, so the
    tiles of one slide do not reopen (and re-parse) the file each."""
    with _OPEN_LOCK:
        if uri in _OPEN:
            _OPEN.move_to_end(uri)
            return _OPEN[uri]
    reader = open_slide(uri)
    with _OPEN_LOCK:
        _OPEN[uri] = reader
        while len(_OPEN) > OPEN_READERS:
            _OPEN.popitem(last=False)[1].close()
    return reader


def is_pyramid_tiff(uri: str, max_pixels: int) -> bool:
    """Whether a .tif is a slide rather than a camera field: several resolution levels, or one
    level too large to decode whole (``max_pixels``). Reads the header only."""
    import tifffile

    fs, path = filesystem(uri)
    try:
        with fs.open(path, "rb") as handle, tifffile.TiffFile(handle) as tiff:
            levels = tiff.series[0].levels
            height, width = levels[0].shape[:2]
            return len(levels) > 1 or width * height > max_pixels
    except Exception:  # not a TIFF tifffile reads: decoding it as a field gives the error row
        return False


@dataclass(frozen=True)
class SlideScale:
    """How a slide maps onto the working scale: level-0 um/px, the working um/px, the level
    read (the coarsest still at least as fine as the working scale) and its downsample."""

    mpp: float
    working_mpp: float
    level: int
    level_downsample: float

    @property
    def level0_per_working(self) -> float:
        """Level-0 pixels per working pixel."""
        return self.working_mpp / self.mpp

    @property
    def cell_diameter_px(self) -> float:
        """A typical white cell's diameter in working pixels."""
        return WHITE_CELL_DIAMETER_UM / self.working_mpp


def slide_scale(reader: SlideReader, *, working_mpp: float, mpp_override: float | None = None) -> SlideScale:
    """The slide's scale, from its metadata or ``mpp_override`` (``--mpp``); ``SlideError`` when
    neither gives one."""
    mpp = reader.mpp
    if mpp is None and mpp_override is None:
        raise SlideError(NO_MPP_ERROR)
    um_per_px = float(mpp_override) if mpp is None else (mpp[0] + mpp[1]) / 2
    finer = [i for i, d in enumerate(reader.level_downsamples) if um_per_px * d <= working_mpp * 1.001]
    level = max(finer) if finer else 0
    return SlideScale(um_per_px, working_mpp, level, float(reader.level_downsamples[level]))


def working_mpp(pixels_per_cell_diameter: float) -> float:
    """The working um/px at which a typical white cell spans ``pixels_per_cell_diameter`` px:
    the finer of the cell finder's and the cell model's working resolutions."""
    return WHITE_CELL_DIAMETER_UM / pixels_per_cell_diameter


@dataclass(frozen=True)
class Tile:
    """One tile of a slide, in working pixels: ``read`` (core plus margin, clipped to the slide)
    and ``core`` as (x0, y0, x1, y1), x1/y1 exclusive."""

    index: int
    read: tuple[int, int, int, int]
    core: tuple[int, int, int, int]
    tissue_fraction: float


def tissue_mask(thumbnail: Image.Image) -> np.ndarray:
    """Smear on a thumbnail, as bool (H, W): summed RGB optical density above bare glass and
    below ink. Pen marks, labels and dust are dark; glass is near white."""
    rgb = np.asarray(thumbnail.convert("RGB"), np.float32)
    density = -np.log10(np.clip(rgb, 1, 255) / 255.0).sum(axis=2)
    return (density > GLASS_OPTICAL_DENSITY) & (density < PEN_OPTICAL_DENSITY)


def plan_tiles(reader: SlideReader, scale: SlideScale, *, thumbnail: Image.Image | None = None) -> list[Tile]:
    """The tiles of a slide worth reading (their core shows smear on the thumbnail), row by row."""
    width0, height0 = reader.dimensions
    width, height = (math.ceil(v / scale.level0_per_working) for v in (width0, height0))
    core = max(1, round(TILE_CORE_CELL_DIAMETERS * scale.cell_diameter_px))
    margin = round(TILE_MARGIN_CELL_DIAMETERS * scale.cell_diameter_px)
    mask = tissue_mask(thumbnail if thumbnail is not None else reader.thumbnail())
    mh, mw = mask.shape
    tiles: list[Tile] = []
    for y0 in range(0, height, core):
        for x0 in range(0, width, core):
            x1, y1 = min(x0 + core, width), min(y0 + core, height)
            region = mask[int(y0 / height * mh):max(int(y0 / height * mh) + 1, math.ceil(y1 / height * mh)),
                          int(x0 / width * mw):max(int(x0 / width * mw) + 1, math.ceil(x1 / width * mw))]
            fraction = float(region.mean()) if region.size else 0.0
            if fraction < MIN_TISSUE_FRACTION:
                continue
            tiles.append(Tile(len(tiles), (max(0, x0 - margin), max(0, y0 - margin),
                                           min(width, x1 + margin), min(height, y1 + margin)),
                              (x0, y0, x1, y1), fraction))
    return tiles


def read_tile(reader: SlideReader, scale: SlideScale, read_box: tuple[int, int, int, int]) -> Image.Image:
    """A tile's pixels at the working scale: its box read from ``scale.level`` and resampled."""
    x0, y0, x1, y1 = read_box
    f, d = scale.level0_per_working, scale.level_downsample
    level_size = (max(1, round((x1 - x0) * f / d)), max(1, round((y1 - y0) * f / d)))
    pixels = reader.read_region((round(x0 * f), round(y0 * f)), scale.level, level_size)
    img = Image.fromarray(pixels)
    if img.size != (x1 - x0, y1 - y0):  # resampled as the cell model's training crops were
        img = img.resize((x1 - x0, y1 - y0), Image.Resampling.BILINEAR, reducing_gap=3.0)
    return img


def owns(core: tuple[int, int, int, int], centroid: tuple[float, float], cell_diameter_px: float) -> bool:
    """Whether the tile of ``core`` keeps a cell centred at ``centroid`` (working pixels): the
    core grown by ``OWNERSHIP_SLACK_CELL_DIAMETERS``."""
    slack = OWNERSHIP_SLACK_CELL_DIAMETERS * cell_diameter_px
    x, y = centroid
    return core[0] - slack <= x < core[2] + slack and core[1] - slack <= y < core[3] + slack


def depth_in_core(core: tuple[int, int, int, int], centroid: tuple[float, float]) -> float:
    """Distance from ``centroid`` to its core's nearest edge (negative outside the core)."""
    x, y = centroid
    return min(x - core[0], core[2] - x, y - core[1], core[3] - y)


def duplicate_cells(boxes: np.ndarray, tiles: np.ndarray, depths: np.ndarray) -> np.ndarray:
    """Bool mask of the cells to drop: of any two cells from different tiles whose boxes
    (N x 4, x0 y0 x1 y1) overlap by ``DUPLICATE_IOU`` or more, the one less deep in its core.
    Only cells near a core border can have a copy, so the pairs are few; checked with a sort on
    x so a slide of 10^5 cells needs no N x N matrix."""
    order = np.argsort(boxes[:, 0], kind="stable")
    drop = np.zeros(len(boxes), bool)
    areas = np.maximum(boxes[:, 2] - boxes[:, 0], 0) * np.maximum(boxes[:, 3] - boxes[:, 1], 0)
    for position, i in enumerate(order):
        for j in order[position + 1:]:
            if boxes[j, 0] >= boxes[i, 2]:
                break
            if tiles[i] == tiles[j] or drop[i] or drop[j]:
                continue
            w = min(boxes[i, 2], boxes[j, 2]) - max(boxes[i, 0], boxes[j, 0])
            h = min(boxes[i, 3], boxes[j, 3]) - max(boxes[i, 1], boxes[j, 1])
            inter = max(w, 0) * max(h, 0)
            if inter and inter / (areas[i] + areas[j] - inter) >= DUPLICATE_IOU:
                drop[j if depths[i] >= depths[j] else i] = True
    return drop


def sha256_of(uri: str, chunk: int = 8 * 2 ** 20) -> str:
    """sha256 of a file's bytes, streamed (a slide is gigabytes); of a DICOM-WSI folder, of
    each .dcm file's name and bytes in turn, sorted by name."""
    fs, path = filesystem(uri)
    digest = hashlib.sha256()
    for member in folder_slide_files(uri) if is_folder_slide(uri) else [uri]:
        _, member_path = filesystem(member)
        if member != uri:
            digest.update(posixpath.basename(member_path).encode("utf-8", "surrogateescape") + b"\x00")
        with fs.open(member_path, "rb") as handle:
            while block := handle.read(chunk):
                digest.update(block)
    return digest.hexdigest()


def write_pyramid_tiff(path: str, width: int, height: int,
                       region: Callable[[int, int, int, int], np.ndarray], *,
                       mpp: float | None, tile: int = 256, levels: int = 4,
                       quality: int = 90) -> None:
    """Write a tiled, JPEG-compressed pyramidal TIFF of ``width`` x ``height`` px that OpenSlide
    and tifffile both read (each level a tiled page, the reduced ones marked as such, halving
    each time, at most ``levels``), with resolution tags for ``mpp`` um/px (none when None).
    ``region(x, y, w, h)`` gives uint8 RGB level-0 pixels. Memory stays at one level-0 region
    per tile of the coarsest level (``tile * 2**(levels-1)`` px a side)."""
    import tifffile

    levels = max(1, min(levels, math.ceil(math.log2(max(width, height) / tile)) + 1))
    options = dict(tile=(tile, tile), compression="jpeg", compressionargs={"level": quality},
                   photometric="rgb", metadata=None)

    def level_tiles(factor: int) -> Iterator[np.ndarray]:
        w, h = max(1, width // factor), max(1, height // factor)
        for y in range(0, h, tile):
            for x in range(0, w, tile):
                tw, th = min(tile, w - x), min(tile, h - y)
                pixels = region(x * factor, y * factor, min(tw * factor, width - x * factor),
                                min(th * factor, height - y * factor))
                img = Image.fromarray(np.ascontiguousarray(pixels))
                if factor > 1:
                    img = img.resize((tw, th), Image.Resampling.BOX)
                yield np.asarray(img)

    with tifffile.TiffWriter(path, bigtiff=True) as writer:
        for k in range(levels):
            factor = 2 ** k
            extra = {"resolution": (1e4 / (mpp * factor),) * 2, "resolutionunit": "CENTIMETER"} if mpp else {}
            writer.write(level_tiles(factor), shape=(max(1, height // factor), max(1, width // factor), 3),
                         dtype=np.uint8, subfiletype=1 if k else 0, **extra, **options)


def write_dicom_slide(folder: str, reader: SlideReader, *, slide_name: str = "slide", tile: int = 256,
                      quality: int = 90, label: Image.Image | None = None,
                      overview: Image.Image | None = None) -> list[str]:
    """Write the pyramid of ``reader`` as a DICOM-WSI slide into ``folder`` (wsidicom: one VL
    Whole Slide Microscopy instance per level, TILED_FULL, JPEG baseline frames of ``tile`` px
    re-encoded from the reader's pixels at ``quality``), with ``label`` and ``overview``
    instances when given, and the reader's pixel size as PixelSpacing. Returns the files
    written. Memory stays at a few tiles: frames are read from ``reader`` one at a time. Through
    wsidicom's extension points for other formats (``Source``, ``ImageData``), as wsidicomizer
    converts; it makes the DICOM-WSI slides the tests read back."""
    import copy

    from pydicom.uid import JPEGBaseline8Bit, generate_uid
    from wsidicom import WsiDicom
    from wsidicom.codec import Encoder, JpegSettings
    from wsidicom.geometry import Size, SizeMm
    from wsidicom.instance import ImageData, NumpyImageData, WsiDataset, WsiInstance
    from wsidicom.metadata import (Equipment, Image as ImageMetadata, ImageType, Label, Patient,
                                   Pyramid, Series, Slide, SlideSample, Study, WsiMetadata)
    from wsidicom.metadata.schema.dicom.wsi import WsiMetadataDicomSchema
    from wsidicom.source import Source

    encoder = Encoder.create_for_settings(JpegSettings(quality=quality))

    class LevelImageData(ImageData):
        def __init__(self, level: int):
            super().__init__(encoder)
            self._level, self._downsample = level, reader.level_downsamples[level]

        transfer_syntax = property(lambda self: JPEGBaseline8Bit)
        image_size = property(lambda self: Size(*reader.level_dimensions[self._level]))
        tile_size = property(lambda self: Size(tile, tile))
        pixel_spacing = property(lambda self: None if reader.mpp is None else SizeMm(
            reader.mpp[0] * self._downsample / 1000, reader.mpp[1] * self._downsample / 1000))
        imaged_size = property(lambda self: None)
        samples_per_pixel = property(lambda self: 3)
        photometric_interpretation = property(lambda self: "YBR_FULL_422")
        bits = property(lambda self: 8)
        image_coordinate_system = property(lambda self: None)
        thread_safe = property(lambda self: False)
        lossy_compression = property(lambda self: None)
        transcoder = property(lambda self: None)

        def get_decoded_tile(self, tile_point, z, path, cache=True):
            return reader.read_region((round(tile_point.x * tile * self._downsample),
                                       round(tile_point.y * tile * self._downsample)),
                                      self._level, (tile, tile))

        def get_encoded_tile(self, tile_point, z, path):
            return self.encoder.encode(self.get_decoded_tile(tile_point, z, path))

    metadata = WsiMetadata(
        study=Study(uid=generate_uid()), series=Series(uid=generate_uid()), patient=Patient(),
        equipment=Equipment(manufacturer="allcore", model_name="write_dicom_slide"),
        slide=Slide(identifier=slide_name, samples=[SlideSample(identifier=slide_name, uid=generate_uid())]),
        pyramid=Pyramid(image=ImageMetadata(), optical_paths=[], uid=generate_uid()), label=Label(),
        frame_of_reference_uid=generate_uid(), dimension_organization_uids=[generate_uid()])
    base = WsiMetadataDicomSchema().dump(metadata, ImageType.VOLUME)

    def instance_base():
        dataset = copy.deepcopy(base)
        dataset.SOPInstanceUID = generate_uid()
        return dataset

    levels = [WsiInstance.create_instance(LevelImageData(k), instance_base(), ImageType.VOLUME, 0)
              for k in range(len(reader.level_dimensions))]
    labels = [] if label is None else [WsiInstance.create_label(label.convert("RGB"), instance_base())]
    overviews = [] if overview is None else [WsiInstance.create_instance(
        NumpyImageData.from_image(overview), instance_base(), ImageType.OVERVIEW)]

    class ReaderSource(Source):
        level_instances, label_instances, overview_instances = levels, labels, overviews
        thumbnail_instances: list = []
        annotation_instances: list = []
        base_dataset = WsiDataset(base)

        def close(self):
            pass

    os.makedirs(folder, exist_ok=True)
    with WsiDicom(ReaderSource()) as wsi:
        return [str(path) for path in wsi.save(folder, workers=1)]
