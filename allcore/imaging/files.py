"""Opening local or ``s3://`` paths, listing image files, and decoding them to RGB.

Every byte allcore reads goes through here, so the same code serves a laptop folder and an
object store, and every unreadable image fails with the same ``ImageDecodeError`` that scoring
turns into an error row instead of a crashed job.
"""

from __future__ import annotations

import hashlib
import io
import os
import posixpath
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import fsspec
from fsspec.implementations.local import LocalFileSystem
import numpy as np
from PIL import Image, UnidentifiedImageError

from allcore.errors import AllcoreError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp")
# Whole-slide formats only OpenSlide reads (allcore.imaging.slides); pyramidal .tif(f) is listed above.
OPENSLIDE_EXTENSIONS = (".svs", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide")
LISTED_EXTENSIONS = IMAGE_EXTENSIONS + OPENSLIDE_EXTENSIONS  # what a scoring listing picks up
# DICOM-WSI: a slide is a folder of .dcm instances (one per level, label, overview). A listing
# yields each folder holding .dcm files once, its uri ending in "/" (``is_folder_slide``): the
# only listed input that is a folder. Its other files and its subfolders are listed as usual.
DICOM_EXTENSION = ".dcm"
# Decompression-bomb guard: the largest image decode_rgb accepts. 40 MP holds a whole-slide
# field tile of a 100x objective; anything larger is refused with an error row, not an OOM.
MAX_PIXELS = 40_000_000

# Why an input could not be scored (the ``error_kind`` of its error row). Transient kinds may
# succeed on a later run without any change to the file (a share that was down, a permission
# fixed), so the next run retries them; the others need a new file, which has a new ledger key.
EMPTY, NOT_AN_IMAGE, CORRUPT, TOO_LARGE = "empty", "not an image", "corrupt", "too large"
BAD_NAME, UNREADABLE, UNLISTABLE = "bad name", "unreadable", "unlistable"
NO_PIXEL_SIZE = "no pixel size"  # a slide whose file does not say its um/px: a run with --mpp can
TRANSIENT_ERROR_KINDS = frozenset({UNREADABLE, UNLISTABLE, NO_PIXEL_SIZE})
FRAMES_INFO_KEY = "allcore.frames"  # decode_rgb's image info: frames in the file (first scored)


def _s3_options() -> dict:
    """s3fs options from the environment, so jobs and Ray workers need no credential flags."""
    # No listing cache: long-lived workers must see objects written after their first listing.
    options: dict = {"use_listings_cache": False}
    if os.environ.get("AWS_ACCESS_KEY_ID"):
        options["key"] = os.environ["AWS_ACCESS_KEY_ID"]
        options["secret"] = os.environ.get("AWS_SECRET_ACCESS_KEY", "")
    endpoint = os.environ.get("ALLCORE_S3_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        options["client_kwargs"] = {"endpoint_url": endpoint}
    return options


def storage_options(uri: str) -> dict:
    """The fsspec options of ``uri``'s filesystem, for a library that opens paths itself
    (wsidicom): s3's from the environment, none locally."""
    return _s3_options() if str(uri).startswith("s3://") else {}


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for ``uri`` and the path within it (local paths made absolute)."""
    uri = str(uri)
    if uri.startswith("s3://"):
        return fsspec.filesystem("s3", **_s3_options()), uri[len("s3://"):].rstrip("/")
    if "://" in uri and not uri.startswith("file://"):
        raise ValueError(f"unsupported location {uri!r}: use a local path, file:// or s3://")
    return fsspec.filesystem("file"), os.path.abspath(uri.removeprefix("file://"))


def absolute_location(text: str) -> str:
    """A path argument as every job passes it on: local paths made absolute against the driver's
    working directory (Ray workers and Ray Train's storage resolve relative paths inside their
    own session folders), ``s3://`` uris unchanged."""
    return text if "://" in text else os.path.abspath(text)


def normalise_location(uri: str) -> str:
    """``good/../good/x.jpg`` and ``good//x.jpg`` as ``good/x.jpg``, so one file has one uri
    (and one ledger key) however a list spells it."""
    if uri.startswith("s3://"):
        return "s3://" + posixpath.normpath(uri[len("s3://"):])
    return os.path.normpath(absolute_location(uri))


def join(base: str, relative: str) -> str:
    """Join a relative path onto a local directory or an ``s3://`` prefix."""
    if base.startswith("s3://"):
        return f"{base.rstrip('/')}/{relative.lstrip('/')}"
    return os.path.join(base, relative)


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    return fs.cat_file(path)


def write_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the whole file or nothing: an object-store
    PUT is atomic; a local file is written under a temporary name, then renamed."""
    fs.makedirs(posixpath.dirname(path), exist_ok=True)
    if isinstance(fs, LocalFileSystem):
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        fs.pipe_file(tmp, data)
        os.replace(tmp, path)
    else:
        fs.pipe_file(path, data)


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.exists(path)


def write_bytes(uri: str, data: bytes) -> None:
    """Write a whole file, creating parent folders (no-op for object stores)."""
    fs, path = filesystem(uri)
    fs.makedirs(os.path.dirname(path), exist_ok=True)
    fs.pipe_file(path, data)


def list_subdirs(uri: str) -> list[str]:
    """Names of the folders directly under ``uri``, sorted, hidden ones left out."""
    fs, path = filesystem(uri)
    if not fs.isdir(path):
        raise FileNotFoundError(f"{uri} is not a folder; check the path (and credentials for s3://)")
    names = (os.path.basename(entry["name"].rstrip("/"))
             for entry in fs.ls(path, detail=True) if entry["type"] == "directory")
    return sorted(name for name in names if not name.startswith("."))


@dataclass(frozen=True)
class FileInfo:
    uri: str
    size: int
    mtime_or_etag: str  # changes when the content does: lets callers cache per file
    listing_error: str = ""  # why this entry could not be listed as a file (scoring: an error row)
    error_kind: str = ""  # UNLISTABLE or BAD_NAME with listing_error


def printable_name(path: str) -> str:
    """``path`` as valid UTF-8 text: bytes that are not UTF-8 (surrogate-escaped by Python's
    file-system decoding) appear as ``\\xNN``, so the raw name stays recoverable from the row."""
    return os.fsencode(path).decode("utf-8", errors="backslashreplace")




def _s3_file_info(uri: str, info: dict) -> FileInfo:
    """S3's change detector is the ETag (LastModified when a store omits it)."""
    return FileInfo(uri, int(info.get("size") or 0), str(info.get("ETag") or info.get("LastModified") or ""))


def _local_file_info(path: str, stat: os.stat_result) -> FileInfo:
    """Locally the mtime in ns: a rewrite of the file changes it."""
    return FileInfo(path, stat.st_size, str(stat.st_mtime_ns))


def stat_file(uri: str) -> FileInfo:
    """FileInfo of one path, with the same change detector ``iter_image_files`` uses (a folder
    holding .dcm files: its DICOM-WSI entry, as a listing makes it)."""
    if uri.startswith("s3://"):
        fs, path = filesystem(uri)
        info = fs.info(path)
        if info.get("type") == "directory":
            files = {posixpath.basename(e["name"].rstrip("/")): e for e in fs.ls(path, detail=True)
                     if e["type"] == "file"}
            if slide := _s3_folder_slide(path, files):
                return slide
        return _s3_file_info(uri, info)
    if os.path.isdir(uri):
        with os.scandir(uri) as it:
            if slide := _local_folder_slide(uri.rstrip("/"), sorted(it, key=lambda e: e.name)):
                return slide
    return _local_file_info(uri, os.stat(uri))


def _is_image(name: str) -> bool:
    return name.lower().endswith(LISTED_EXTENSIONS) and not name.startswith(".")


def _is_dicom(name: str) -> bool:
    return name.lower().endswith(DICOM_EXTENSION) and not name.startswith(".")


def is_folder_slide(uri: str) -> bool:
    """Whether a listed ``uri`` is a DICOM-WSI folder (listings spell those with a final "/")."""
    return str(uri).endswith("/")


def _folder_slide_info(folder: str, members: list[tuple[str, int, str]]) -> FileInfo:
    """The listing entry of a DICOM-WSI folder from its .dcm files' (name, size, mtime or
    ETag): size their total; change detector a digest over every file's three, so it changes
    when any instance is rewritten, added or removed, and the ledger scores the slide again."""
    digest = hashlib.blake2b(digest_size=16)
    for name, size, tag in sorted(members):
        digest.update(f"{name}\x00{size}\x00{tag}\x00".encode("utf-8", "surrogateescape"))
    return FileInfo(folder.rstrip("/") + "/", sum(size for _, size, _ in members),
                    f"dicom:{len(members)}:{digest.hexdigest()}")


def _local_folder_slide(path: str, entries: list[os.DirEntry]) -> FileInfo | None:
    """The folder ``path`` as a DICOM-WSI slide when ``entries`` (its listing) hold .dcm
    files; its listing error when one of them cannot be stat'ed; None when it holds none."""
    members = []
    for entry in entries:
        if not _is_dicom(entry.name):
            continue
        try:
            if not entry.is_file():
                continue
            stat = entry.stat()
        except OSError as exc:
            return _listing_error(path + "/", f"unlistable DICOM instance {printable_name(entry.name)}", exc)
        members.append((entry.name, stat.st_size, str(stat.st_mtime_ns)))
    if not members:
        return None
    return bad_name_entry(path + "/") or _folder_slide_info(path, members)


def _s3_folder_slide(directory: str, files: dict[str, dict]) -> FileInfo | None:
    members = [(name, int(info.get("size") or 0), str(info.get("ETag") or info.get("LastModified") or ""))
               for name, info in files.items() if _is_dicom(name)]
    return _folder_slide_info(f"s3://{directory}", members) if members else None


def folder_slide_files(uri: str) -> list[str]:
    """The .dcm files of the DICOM-WSI folder ``uri`` (local or s3://), sorted: the instances
    its listing entry was made of."""
    fs, path = filesystem(uri)
    names = sorted(posixpath.basename(entry["name"].rstrip("/")) for entry in fs.ls(path, detail=True)
                   if entry["type"] == "file")
    return [join(uri.rstrip("/"), name) if uri.startswith("s3://") else os.path.join(path, name)
            for name in names if _is_dicom(name)]


def _listing_error(path: str, what: str, exc: OSError | None = None, *,
                   kind: str = UNLISTABLE) -> FileInfo:
    detail = f" ({type(exc).__name__}: {exc.strerror or exc})" if exc else ""
    return FileInfo(printable_name(path), -1, "", f"{what}{detail}", kind)


def bad_name_entry(path: str) -> FileInfo | None:
    """The error entry of a path whose name is not valid UTF-8 (None for a good name): such a
    name cannot be a text column or a ledger key, and is most often a copy from an old system."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return _listing_error(path, "file name is not valid UTF-8 (the raw bytes are shown as "
                              "\\xNN): rename the file with a UTF-8 name", kind=BAD_NAME)
    return None


def _walk_local(path: str, visited: set[tuple[int, int]]) -> Iterator[FileInfo]:
    """Files under ``path``. A directory symlink is followed only to a real directory not listed
    yet in this walk (``visited``: device and inode), so a loop such as ``loop/up -> ..`` is
    walked once; an entry that cannot be listed becomes a ``FileInfo`` with ``listing_error``."""
    try:
        with os.scandir(path) as it:
            entries = sorted(it, key=lambda e: e.name)
    except OSError as exc:
        yield _listing_error(path, "unlistable folder: check its permissions", exc)
        return
    if slide := _local_folder_slide(path, entries):
        yield slide
    for entry in entries:
        if entry.name.startswith("."):
            continue
        try:
            is_dir, is_file = entry.is_dir(), entry.is_file()
            stat = entry.stat() if is_dir or is_file else None
        except OSError as exc:  # a symlink loop pointing at itself, a vanished entry, ...
            if _is_image(entry.name):
                yield _listing_error(entry.path, "unlistable entry", exc)
            continue
        if is_dir:
            real = (stat.st_dev, stat.st_ino)
            if real not in visited:  # else a symlink back into the walk: already listed
                visited.add(real)
                yield from _walk_local(entry.path, visited)
        elif is_file and _is_image(entry.name):
            yield bad_name_entry(entry.path) or _local_file_info(entry.path, stat)


def iter_image_files(root: str) -> Iterator[FileInfo]:
    """Image files under ``root``, recursively, in sorted (deterministic) order, and each folder
    holding .dcm files once, as one DICOM-WSI slide (``is_folder_slide``), before its files.

    Streams: a bucket with millions of objects is never held in one list locally; on s3 one
    directory level at a time. Locally, symlinks to directories are followed once per real
    directory (loops are cut), and entries that cannot be listed or whose names are not UTF-8
    are yielded with ``listing_error`` set rather than raising: one bad entry never stops a run.
    """
    fs, path = filesystem(root)
    if not fs.isdir(path):
        raise FileNotFoundError(f"{root} is not a folder; check the path (and credentials for s3://)")
    if isinstance(fs, LocalFileSystem):
        yield from _walk_local(path, {(os.stat(path).st_dev, os.stat(path).st_ino)})
        return
    for directory, dirs, files in fs.walk(path, detail=True):
        visible = sorted((name, info) for name, info in dirs.items() if not name.startswith("."))
        dirs.clear()  # walk is top-down: this sets which folders it descends into, and in what order
        dirs.update(visible)
        if slide := _s3_folder_slide(directory, files):
            yield slide
        for name in sorted(files):
            if _is_image(name):
                yield _s3_file_info(f"s3://{directory}/{name}", files[name])


class ImageDecodeError(AllcoreError, ValueError):
    """Bytes that are not a usable image. The message names the problem and what to do; ``kind``
    is one of EMPTY, NOT_AN_IMAGE, CORRUPT, TOO_LARGE."""

    def __init__(self, message: str, kind: str = CORRUPT):
        super().__init__(message)
        self.kind = kind


def _rescale_to_uint8(array: np.ndarray, full_scale: float | None) -> np.ndarray:
    """Map grey values to 0..255: by the container's full scale when known, else by range."""
    array = array.astype(np.float64)
    if full_scale is None:
        low, high = float(np.nanmin(array)), float(np.nanmax(array))
        array, full_scale = array - low, (high - low) or 1.0
    return np.clip(np.nan_to_num(array) / full_scale * 255.0 + 0.5, 0, 255).astype(np.uint8)


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any sensible mode to RGB: transparency onto white, high bit depth scaled down."""
    if img.mode == "RGB":
        return img
    if img.mode in ("LA", "P", "PA", "RGBA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if img.mode.startswith("I;16") or img.mode == "I":
        values = np.asarray(img)
        # A 32-bit "I" image inside 0..65535 is a 16-bit scan stored wide; otherwise use its range.
        fits_16_bit = img.mode != "I" or (values.min() >= 0 and values.max() <= 65535)
        grey = _rescale_to_uint8(values, 65535.0 if fits_16_bit else None)
        return Image.fromarray(grey, "L").convert("RGB")
    if img.mode == "F":
        values = np.asarray(img)
        in_unit_range = np.nanmin(values) >= 0 and np.nanmax(values) <= 1
        grey = _rescale_to_uint8(values, 1.0 if in_unit_range else None)
        return Image.fromarray(grey, "L").convert("RGB")
    return img.convert("RGB")  # L, 1, CMYK, YCbCr, ...


def decode_rgb(data: bytes, *, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Decode image bytes to a fully loaded RGB image, or raise ``ImageDecodeError``.

    The whole image is decoded here (not lazily), so a truncated file fails now, inside the
    scoring stage that can record it, rather than later inside a transform. Only the first frame
    of an animated GIF or multi-page TIFF is decoded; ``info[FRAMES_INFO_KEY]`` says how many
    the file holds, so callers can note it.
    """
    if not data:
        raise ImageDecodeError("zero-byte file: the file is empty; re-copy or re-export it", EMPTY)
    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ImageDecodeError(
            f"not an image: {len(data)} bytes in no format Pillow reads (starts {data[:8]!r}); "
            f"expected one of {', '.join(IMAGE_EXTENSIONS)}", NOT_AN_IMAGE) from None
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError(f"decompression bomb refused: {exc}; downscale the image",
                               TOO_LARGE) from None
    except Exception as exc:  # Pillow raises assorted types for mangled headers
        raise ImageDecodeError(f"corrupt image header ({type(exc).__name__}: {exc}); "
                               "re-export the file") from None
    width, height = img.size
    if width * height > max_pixels:
        raise ImageDecodeError(
            f"image is {width}x{height} = {width * height:,} pixels, over the {max_pixels:,} limit "
            "(decompression-bomb guard); downscale or tile it, or raise --max-pixels", TOO_LARGE)
    try:
        img.load()
        rgb = _to_rgb(img)
    except Exception as exc:
        raise ImageDecodeError(
            f"truncated or corrupt {img.format or 'image'} data ({type(exc).__name__}: {exc}); "
            "the file was probably cut off in transfer: re-copy it") from None
    rgb.info[FRAMES_INFO_KEY] = getattr(img, "n_frames", 1)
    return rgb
