"""allcore.imaging.files and allcore.data.samples: listing, decoding every odd image, discovering samples, Dataset."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from allcore.data.samples import Sample, discover_samples
from allcore.training.build import ImageDataset
from allcore.imaging.files import (ImageDecodeError, decode_rgb, filesystem, iter_image_files,
                                   read_bytes)
from allcore.data.labels import get_label_set
from allcore.data.splits import SplitManifest, SplitRow
from conftest import serving_s3

ALL4 = get_label_set("all4")


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format=fmt, **kw)
    return buffer.getvalue()


def write_image(path: Path, colour=(200, 100, 150), size=(8, 8)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def make_tree(root: Path, folders=("Benign", "Pro"), per_folder=3) -> None:
    for folder in folders:
        for n in range(per_folder):
            write_image(root / folder / f"WBC-{folder}-{n:03d}.jpg", colour=(n * 40, 90, 120))


# --- io: listing -------------------------------------------------------------------------------

def test_iter_image_files_is_recursive_sorted_and_filters_extensions(tmp_path):
    for rel in ["b/z.PNG", "b/a.jpeg", "a.TIF", "b/deeper/x.bmp", "notes.txt", ".hidden/y.jpg",
                "b/.dot.jpg", "c.tiff", "d.JPG"]:
        write_image(tmp_path / rel) if not rel.endswith(".txt") else (tmp_path / rel).write_text("x")
    found = list(iter_image_files(str(tmp_path)))
    assert [Path(f.uri).relative_to(tmp_path).as_posix() for f in found] == [
        "a.TIF", "b/a.jpeg", "b/deeper/x.bmp", "b/z.PNG", "c.tiff", "d.JPG"]
    assert all(f.size == Path(f.uri).stat().st_size and f.mtime_or_etag for f in found)


def test_iter_image_files_missing_folder_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a folder"):
        list(iter_image_files(str(tmp_path / "nope")))


def test_filesystem_routes_schemes(monkeypatch, tmp_path):
    fs, path = filesystem(f"file://{tmp_path}")
    assert path == str(tmp_path) and "file" in fs.protocol
    monkeypatch.setenv("ALLCORE_S3_ENDPOINT_URL", "http://127.0.0.1:9")
    fs, path = filesystem("s3://bucket/some/prefix/")
    assert path == "bucket/some/prefix" and "s3" in fs.protocol
    assert fs.client_kwargs["endpoint_url"] == "http://127.0.0.1:9"
    with pytest.raises(ValueError, match="unsupported location"):
        filesystem("gs://bucket/x")


# --- io: decoding ------------------------------------------------------------------------------

def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims a huge size: what a decompression bomb looks like on open."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\0" * 10)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_decode_rgb_passes_through_rgb():
    img = decode_rgb(encode(Image.new("RGB", (5, 4), (10, 200, 30)), "PNG"))
    assert img.mode == "RGB" and img.size == (5, 4) and img.getpixel((0, 0)) == (10, 200, 30)


@pytest.mark.parametrize("data, message", [
    (b"", "zero-byte"),
    (b"hello, this is a text file\n" * 10, "not an image"),
    (b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4, "corrupt|truncated|not an image"),
])
def test_decode_rgb_rejects_bad_bytes(data, message):
    with pytest.raises(ImageDecodeError, match=message):
        decode_rgb(data)


def test_decode_rgb_rejects_truncated_jpeg():
    rng = np.random.default_rng(0)
    full = encode(Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)), "JPEG")
    assert decode_rgb(full).size == (64, 64)
    with pytest.raises(ImageDecodeError, match="truncated"):
        decode_rgb(full[: len(full) // 2])


def test_decode_rgb_refuses_decompression_bombs():
    with pytest.raises(ImageDecodeError, match="40,000 limit"):
        decode_rgb(encode(Image.new("RGB", (400, 101)), "PNG"), max_pixels=40_000)
    with pytest.raises(ImageDecodeError, match="decompression"):  # header claims 900M pixels
        decode_rgb(png_header_only(30_000, 30_000))


def rgba_half_transparent() -> Image.Image:
    img = Image.new("RGBA", (2, 1), (255, 0, 0, 255))
    img.putpixel((1, 0), (0, 0, 0, 0))
    return img


def palette_with_transparency() -> Image.Image:
    img = Image.new("P", (2, 1))
    img.putpalette([0, 0, 255, 0, 0, 0])
    img.putpixel((0, 0), 0)
    img.putpixel((1, 0), 1)
    img.info["transparency"] = 1
    return img


@pytest.mark.parametrize("make, fmt, expected_mode, expected", [
    (lambda: Image.new("L", (2, 1), 77), "PNG", "L", [(77, 77, 77)] * 2),
    (lambda: Image.new("LA", (2, 1), (0, 0)), "PNG", "LA", [(255, 255, 255)] * 2),
    (rgba_half_transparent, "PNG", "RGBA", [(255, 0, 0), (255, 255, 255)]),
    (palette_with_transparency, "PNG", "P", [(0, 0, 255), (255, 255, 255)]),
    (lambda: Image.new("1", (2, 1), 1), "PNG", "1", [(255, 255, 255)] * 2),
    (lambda: Image.new("CMYK", (2, 1), (0, 255, 255, 0)), "TIFF", "CMYK", [(255, 0, 0)] * 2),
    # 16-bit: scaled by the full 16-bit range, not clipped at 255.
    (lambda: Image.fromarray(np.array([[65535, 32896]], dtype=np.uint16)), "PNG", "I;16",
     [(255, 255, 255), (128, 128, 128)]),
    (lambda: Image.fromarray(np.array([[65535, 257]], dtype=np.int32)), "TIFF", "I",
     [(255, 255, 255), (1, 1, 1)]),
    (lambda: Image.fromarray(np.array([[1.0, 0.5]], dtype=np.float32)), "TIFF", "F",
     [(255, 255, 255), (128, 128, 128)]),
])
def test_decode_rgb_converts_modes(make, fmt, expected_mode, expected):
    data = encode(make(), fmt)
    assert Image.open(io.BytesIO(data)).mode == expected_mode  # the file really has that mode
    img = decode_rgb(data)
    assert img.mode == "RGB"
    assert [img.getpixel((x, 0)) for x in range(2)] == expected


def test_decode_rgb_cmyk_jpeg():
    img = decode_rgb(encode(Image.new("CMYK", (8, 8), (0, 0, 0, 0)), "JPEG"))
    assert img.mode == "RGB" and min(img.getpixel((4, 4))) > 245  # no ink = white


# --- data: discovery ---------------------------------------------------------------------------

def test_discover_folder_tree(tmp_path):
    make_tree(tmp_path)
    (tmp_path / "boxes.json").write_text("{}")  # stray files beside the class folders are fine
    samples = discover_samples(str(tmp_path), ALL4)
    assert [(Path(s.path).name, s.label) for s in samples] == [
        (f"WBC-{c}-{n:03d}.jpg", c) for c in ("Benign", "Pro") for n in range(3)]
    assert samples == sorted(samples, key=lambda s: s.path)


def test_discover_maps_folders_through_label_set(tmp_path):
    make_tree(tmp_path, folders=("Benign", "Early", "Pre", "Pro"), per_folder=1)
    labels = [s.label for s in discover_samples(str(tmp_path), get_label_set("binary"))]
    assert labels == ["benign", "malignant", "malignant", "malignant"]


def test_discover_unknown_folder_lists_known_labels(tmp_path):
    make_tree(tmp_path, folders=("Benign", "Lymphoma"))
    with pytest.raises(ValueError, match=r"'Lymphoma'.*known labels: .*benign.*pro"):
        discover_samples(str(tmp_path), ALL4)


def test_discover_cnmc_fold_layout(tmp_path):
    for fold in ("fold_0", "fold_1"):
        make_tree(tmp_path / fold, folders=("all", "hem"), per_folder=2)
    samples = discover_samples(str(tmp_path), get_label_set("all_hem"))
    assert len(samples) == 8
    assert {(Path(s.path).parent.name, s.label) for s in samples} == {("all", "ALL"), ("hem", "HEM")}


def test_discover_empty_tree_is_an_error(tmp_path):
    (tmp_path / "Benign").mkdir()
    with pytest.raises(ValueError, match="no images found"):
        discover_samples(str(tmp_path), ALL4)


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_discover_from_manifest(tmp_path, suffix):
    make_tree(tmp_path / "images")
    table = pd.DataFrame({
        "path": ["images/Pro/WBC-Pro-001.jpg", str(tmp_path / "images/Benign/WBC-Benign-000.jpg")],
        "label": ["pro_b", "Benign"],
        "group": ["patient-7", None],
    })
    manifest = tmp_path / f"manifest{suffix}"
    table.to_csv(manifest, index=False) if suffix == ".csv" else table.to_parquet(manifest)
    expected = [Sample(str(tmp_path / "images/Benign/WBC-Benign-000.jpg"), "Benign", None),
                Sample(str(tmp_path / "images/Pro/WBC-Pro-001.jpg"), "Pro", "patient-7")]
    assert discover_samples(str(manifest), ALL4) == expected
    assert discover_samples("ignored-when-manifest-given", ALL4, manifest=str(manifest)) == expected


def test_manifest_errors(tmp_path):
    bad_columns = tmp_path / "cols.csv"
    pd.DataFrame({"file": ["a.jpg"], "label": ["Pro"]}).to_csv(bad_columns, index=False)
    with pytest.raises(ValueError, match="lacks column.*path.*Expected path,label"):
        discover_samples(str(bad_columns), ALL4)
    bad_label = tmp_path / "label.csv"
    pd.DataFrame({"path": ["a.jpg"], "label": ["mystery"]}).to_csv(bad_label, index=False)
    with pytest.raises(ValueError, match="'mystery'.*known labels"):
        discover_samples(str(bad_label), ALL4)
    repeated = tmp_path / "repeated.csv"
    pd.DataFrame({"path": ["a.jpg", "a.jpg"], "label": ["Pro", "Pro"]}).to_csv(repeated, index=False)
    with pytest.raises(ValueError, match="more than once"):
        discover_samples(str(repeated), ALL4)


# --- data: Dataset -----------------------------------------------------------------------------

def noisy_transform(img: Image.Image, generator: torch.Generator | None = None) -> torch.Tensor:
    tensor = torch.from_numpy(np.asarray(img, dtype=np.float32)).permute(2, 0, 1) / 255
    return tensor if generator is None else tensor + torch.rand(tensor.shape, generator=generator)


def test_image_dataset_eval_and_seeded_training(tmp_path):
    make_tree(tmp_path)
    samples = discover_samples(str(tmp_path), ALL4)
    plain = ImageDataset(samples, ALL4, noisy_transform)
    x, y = plain[4]
    assert x.shape == (3, 8, 8) and y == ALL4.index("Pro") and len(plain) == 6
    assert torch.equal(plain[4][0], x)

    seeded = ImageDataset(samples, ALL4, noisy_transform, seed=3)
    first = seeded[4][0]
    assert torch.equal(ImageDataset(samples, ALL4, noisy_transform, seed=3)[4][0], first)
    assert not torch.equal(seeded[5][0] - plain[5][0], first - x)  # each index draws its own noise
    seeded.set_epoch(1)
    assert not torch.equal(seeded[4][0], first)
    assert not torch.equal(ImageDataset(samples, ALL4, noisy_transform, seed=4)[4][0], first)


def test_image_dataset_same_batches_with_any_worker_count(tmp_path):
    make_tree(tmp_path)
    dataset = ImageDataset(discover_samples(str(tmp_path), ALL4), ALL4, noisy_transform, seed=0)
    batches = [torch.cat([x for x, _ in torch.utils.data.DataLoader(dataset, batch_size=2,
                                                                    num_workers=workers)])
               for workers in (0, 2)]
    assert torch.equal(*batches)


# --- s3, against a local rclone S3 server ------------------------------------------------------

@pytest.fixture(scope="module")
def s3_tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("s3")
    make_tree(root / "bucket" / "tree")
    with serving_s3(root, uncached_listings=True) as env:
        yield env, root


@pytest.fixture
def s3_env(s3_tree, monkeypatch):
    env, root = s3_tree
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return root


def test_s3_listing_discovery_and_manifest(s3_env):
    files = list(iter_image_files("s3://bucket/tree"))
    assert [f.uri for f in files] == [f"s3://bucket/tree/{c}/WBC-{c}-{n:03d}.jpg"
                                      for c in ("Benign", "Pro") for n in range(3)]
    assert all(f.size > 0 and f.mtime_or_etag for f in files)
    samples = discover_samples("s3://bucket/tree", ALL4)
    assert [s.path for s in samples] == [f.uri for f in files]
    assert decode_rgb(read_bytes(samples[0].path)).size == (8, 8)

    pd.DataFrame({"path": ["tree/Pro/WBC-Pro-002.jpg"], "label": ["Pro"]}).to_csv(
        s3_env / "bucket" / "m.csv", index=False)
    assert discover_samples("s3://bucket/m.csv", ALL4) == [
        Sample("s3://bucket/tree/Pro/WBC-Pro-002.jpg", "Pro")]


def test_s3_split_manifest_round_trip(s3_env):
    manifest = SplitManifest([SplitRow("s3://bucket/tree/Pro/WBC-Pro-000.jpg", "Pro", "g1", "test")])
    assert manifest.write("s3://bucket/runs/split.csv") == manifest.sha256
    assert SplitManifest.read("s3://bucket/runs/split.csv").rows == manifest.rows
