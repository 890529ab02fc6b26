"""The review app: queue order, corrections written exactly once, GeoJSON, training manifests,
and the app itself in headless Chromium against Ray Serve on loopback."""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import socket
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from PIL import Image

from allcore.models.artifact import read_card
from allcore.imaging.cells import CellFinderConfig
from allcore.data.samples import discover_samples
from allcore.data.labels import get_label_set
from allcore.data.celldata import CellCropGeometry, box_centre, cut_cell_crop
from allcore.imaging.data_config import preprocess_array
from allcore.imaging.files import decode_rgb, read_bytes
from allcore.review.corrections import (Correction, CorrectionError, CorrectionStore,
                                        export_manifest, scored_crop_diameters)
from allcore.review.geojson import feature_collections, write_feature_collections
from allcore.review.queue import ReviewQueue, latest, most_suspicious_first
from allcore.scoring.predict import Predictor
from allcore.scoring.prepare import prepare_batch, prepare_kwargs
from allcore.scoring.store import OutputStore
from allcore.scoring.table import build_output_table, card_summary
from allcore.scoring.tiles import ScoredSlide, write_slide_outputs
from allcore.data.synthetic import make_field, write_slide
from allcore.training.build import ImageDataset
from conftest import score_slide

OOD_THRESHOLD = 1.0
TRUST = {"temperature": 1.0, "ood": {"method": "mahalanobis", "threshold": OOD_THRESHOLD}, "qc_reference": {}}
SCORED_AT = dt.datetime(2025, 5, 6, tzinfo=dt.timezone.utc)


def scored_output(root: Path, field_model: str, cell_model: str) -> Path:
    """A committed --per-cell --cell-model output over two specimens' synthetic fields, with a
    trust section and known OOD scores (uniform 0..3 against threshold 1), so about two thirds
    of the rows need review."""
    paths = []
    for specimen, seed in (("S1", 1), ("S2", 2)):
        (root / "fields" / specimen).mkdir(parents=True)
        for index in range(2):
            img, _ = make_field(np.random.default_rng(seed * 10 + index), index + 1, scale_bar=False)
            img.save(root / "fields" / specimen / f"field-{index}.png")
            paths.append(str(root / "fields" / specimen / f"field-{index}.png"))
    card, cell_card = read_card(field_model), read_card(cell_model)
    batch = {"source_uri": np.array(paths, dtype=object),
             "source_size": np.array([Path(p).stat().st_size for p in paths], np.int64),
             "source_mtime": np.array(["1"] * len(paths), dtype=object)}
    prepared = prepare_batch(batch, **prepare_kwargs(card, cell_finder=CellFinderConfig(), cell_card=cell_card))
    scored = Predictor(field_model, cell_artifact_uri=cell_model)(prepared)
    scored["ood_score"] = np.random.default_rng(0).uniform(0, 3, len(scored["ood_score"])).astype(np.float32)
    summary = card_summary(card, cell_card)
    summary["trust"] = summary["cell_model"]["trust"] = TRUST
    table = build_output_table(pa.table(scored), run_id="r1", scored_at=SCORED_AT, model_summary=summary,
                               specimen_pattern=None, blast_classes=get_label_set("all4").blast_classes,
                               cell_blast_classes=get_label_set("blast").blast_classes)
    out = root / "out"
    OutputStore(str(out)).commit(table, run_id="r1", chunk=0, model_sha256=card.weights_sha256,
                                 scored_at=SCORED_AT)
    return out


def add_scored_slide(out: Path, field_model: str, cell_model: str) -> ScoredSlide:
    """A small synthetic slide scored into ``out`` the way a run scores one (``score_slide``),
    committed as its own chunk, and its GeoJSON and overview written."""
    path = out.parent / "slides" / "case-9.tif"
    path.parent.mkdir()
    write_slide(path, columns=2, rows=1, seed=4)
    scored, table = score_slide(path, field_model, cell_model, run_id="r2")
    store = OutputStore(str(out))
    store.commit(table, run_id="r2", chunk=0, model_sha256=read_card(field_model).weights_sha256,
                 scored_at=SCORED_AT)
    [slide] = write_slide_outputs(store, scored, table)
    return slide


@pytest.fixture(scope="module")
def scored_slide(tmp_path_factory, tiny_artifact, tiny_cell_artifact) -> tuple[Path, ScoredSlide]:
    """(output root, its slide): the review output with one scored slide beside the fields."""
    out = scored_output(tmp_path_factory.mktemp("review"), tiny_artifact, tiny_cell_artifact)
    return out, add_scored_slide(out, tiny_artifact, tiny_cell_artifact)


@pytest.fixture(scope="module")
def output_root(scored_slide) -> Path:
    return scored_slide[0]


def decision(queue: ReviewQueue, cell_id: str, label: str, correction_id: str) -> Correction:
    return Correction(correction_id, queue.row(cell_id), label, "AB", dt.datetime.now(dt.timezone.utc))


# ------------------------------------------------------------------ domain

def test_queue_lists_flagged_rows_most_suspicious_first_per_specimen(output_root):
    queue = ReviewQueue(str(output_root))
    rows = queue.rows()
    pending = queue.pending(set())
    flagged = rows[rows["ood_score"] > OOD_THRESHOLD]
    assert set(pending["cell_id"]) == set(flagged["cell_id"]) and len(pending) > 2
    assert set(pending["row_kind"]) == {"field", "cell"}
    assert list(pending["ood_score"]) == sorted(pending["ood_score"], reverse=True)
    specimens = queue.specimens(set())
    assert {s["specimen_id"] for s in specimens} == {"S1", "S2"}
    assert sum(s["fields"] + s["cells"] for s in specimens) == len(pending)
    s1 = queue.pending(set(), "S1")
    assert set(s1["specimen_id"]) == {"S1"}
    assert set(queue.pending({s1["cell_id"].iloc[0]}, "S1")["cell_id"]) == set(s1["cell_id"].iloc[1:])


def test_the_queue_keeps_each_input_s_newest_scoring_as_the_sql_view_does():
    def row(uri, run, at, kind, cell, status="ok"):
        return {"source_uri": uri, "run_id": run, "scored_at": at, "row_kind": kind,
                "cell_id": cell, "status": status}
    rows = pd.DataFrame([
        row("a.jpg", "r1", 1, "field", "a"), row("a.jpg", "r1", 1, "cell", "a#1"),
        row("a.jpg", "r2", 2, "field", "a"),  # rescored without --per-cell: a#1 is superseded
        row("b.jpg", "r1", 1, "field", "b"), row("b.jpg", "r1", 1, "cell", "b#1"),
        row("b.jpg", "r2", 2, "field", "b", status="error"),  # unreadable now: nothing left to review
        row("c.jpg", "r1", 1, "field", "c"), row("c.jpg", "r1", 1, "cell", "c#1")])
    assert sorted(latest(rows)["cell_id"]) == ["a", "c", "c#1"]


def test_ties_in_ood_go_to_the_most_undecided_row():
    rows = pd.DataFrame({"cell_id": ["a", "b", "c", "d"], "ood_score": [2.0, 2.0, 4.0, None],
                         "ood_threshold": [1.0, 1.0, 4.0, 1.0], "blast_probability": [0.9, 0.55, 0.1, 0.5]})
    assert list(most_suspicious_first(rows)["cell_id"]) == ["b", "a", "c", "d"]


def test_a_retried_decision_is_recorded_exactly_once(output_root, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(output_root, out)
    queue, store = ReviewQueue(str(out)), CorrectionStore(str(out))
    cell = queue.pending(set()).query("row_kind == 'cell'").iloc[0]
    other = next(c for c in cell["classes"] if c != cell["pred_label"])
    # a crash after publishing, before the commit record: the file must not count
    store.store.publish(decision(queue, cell["cell_id"], other, "crashed-0001").table(),
                        "corrections/part-crashed-0001.parquet", run_id="crashed-0001")
    assert store.read().num_rows == 0
    correction = decision(queue, cell["cell_id"], other, "0123456789abcdef")
    assert store.append(correction) is True
    assert store.append(correction) is False  # the browser retried the same POST
    table = store.read().to_pylist()
    assert len(table) == 1 and table[0]["label"] == other and table[0]["decision"] == "correct"
    assert table[0]["model_sha256"] == cell["cell_model_sha256"]
    assert (table[0]["box_x0"], table[0]["source_uri"]) == (cell["box_x0"], cell["source_uri"])
    assert cell["cell_id"] not in set(queue.pending(set(store.newest()["cell_id"]))["cell_id"])
    with pytest.raises(CorrectionError, match="not a class"):
        decision(queue, cell["cell_id"], "Pro", "0123456789abcdef")


def test_geojson_is_one_feature_collection_per_image_with_closed_box_polygons(output_root, tmp_path):
    queue = ReviewQueue(str(output_root))
    rows = queue.rows()
    cell = rows[rows["row_kind"] == "cell"].iloc[0]
    corrections = pd.DataFrame([decision(queue, cell["cell_id"], "not_blast", "geojson-0001").table().to_pylist()[0]])
    collections = feature_collections(rows, corrections)
    assert sorted(collections) == sorted(rows["source_uri"].unique())
    for uri, collection in collections.items():
        assert collection["type"] == "FeatureCollection"
        features = collection["features"]
        assert len(features) == (rows["source_uri"] == uri).sum()
        assert [f["properties"]["objectType"] for f in features].count("annotation") == 1
        for f in features:
            ring = f["geometry"]["coordinates"][0]
            assert f["geometry"]["type"] == "Polygon" and len(ring) == 5 and ring[0] == ring[-1]
            x0, y0 = ring[0]
            x1, y1 = ring[2]
            assert x1 > x0 and y1 > y0
            assert {"name", "color"} <= set(f["properties"]["classification"])
    corrected = next(f for c in collections.values() for f in c["features"] if f["id"] == cell["cell_id"])
    assert corrected["properties"]["classification"]["name"] == "not_blast"
    assert corrected["properties"]["reviewer"] == "AB"
    written = write_feature_collections(collections, str(tmp_path / "geojson"))
    assert len(written) == len(collections) == len(set(written))


def test_corrections_become_a_training_manifest(output_root, tmp_path):
    queue = ReviewQueue(str(output_root))
    pending = queue.pending(set())
    chosen = [pending.query("row_kind == 'cell'").iloc[0], pending.query("row_kind == 'field'").iloc[0]]
    corrections = pd.DataFrame([decision(queue, r["cell_id"], r["classes"][0], f"manifest-{i:04d}").table().to_pylist()[0]
                                for i, r in enumerate(chosen)])
    written = export_manifest(corrections, str(tmp_path / "reviewed"))
    cells = discover_samples(written["cell"], get_label_set("blast"))
    fields = discover_samples(written["field"], get_label_set("all4"))
    assert [s.label for s in cells] == [chosen[0]["classes"][0]]
    assert [s.path for s in fields] == [chosen[1]["source_uri"]]
    assert cells[0].group == chosen[0]["cell_id"].split(":")[0]
    pixels, label = ImageDataset(cells, get_label_set("blast"), lambda img: np.asarray(img))[0]
    assert pixels.shape == (128, 128, 3) and label == get_label_set("blast").classes.index(cells[0].label)


def test_exported_cell_crops_have_the_scale_scoring_cut_them_at(output_root, tmp_path, tiny_artifact,
                                                                  tiny_cell_artifact):
    queue = ReviewQueue(str(output_root))
    cell = queue.pending(set()).query("row_kind == 'cell'").iloc[0]
    corrections = pd.DataFrame([decision(queue, cell["cell_id"], cell["classes"][0], "scale-0001").table().to_pylist()[0]])
    cell_card = read_card(tiny_cell_artifact)
    geometry = CellCropGeometry.from_card(cell_card)
    box = tuple(int(cell[f"box_{k}"]) for k in ("x0", "y0", "x1", "y1"))

    def exported_crop(output: Path, folder: str) -> np.ndarray:
        written = export_manifest(corrections, str(tmp_path / folder), geometry=geometry,
                                  crop_diameters=scored_crop_diameters(str(output)))
        path = discover_samples(written["cell"], get_label_set("blast"))[0].path
        return np.asarray(decode_rgb(read_bytes(path)))

    # the fixture's run estimated the diameter field by field: the crop is the pixels it scored
    prepared = prepare_batch({"source_uri": np.array([cell["source_uri"]], dtype=object)},
                             **prepare_kwargs(read_card(tiny_artifact), cell_finder=CellFinderConfig(),
                                              cell_card=cell_card))
    boxes = list(zip(*(prepared[f"box_{k}"].tolist() for k in ("x0", "y0", "x1", "y1"))))
    assert scored_crop_diameters(str(output_root)) == {}
    np.testing.assert_array_equal(
        preprocess_array(Image.fromarray(exported_crop(output_root, "estimated")), cell_card.data_config_obj()),
        prepared["cell_pixels"][boxes.index(box)])
    # a run with one diameter for every field: the crop is cut at that diameter
    copy = shutil.copytree(output_root, tmp_path / "out")
    OutputStore(str(copy)).finish("r1", {"cell_diameter_px": 40.0}, passed=True)
    assert set(scored_crop_diameters(str(copy)).values()) == {40.0}
    field = decode_rgb(read_bytes(cell["source_uri"]))
    np.testing.assert_array_equal(exported_crop(copy, "run-diameter"), np.asarray(
        cut_cell_crop(field, box_centre(box), cell_diameter_px=40.0, geometry=geometry)))


def test_serve_refuses_a_public_host_without_a_token(capsys, monkeypatch):
    from jobs import review

    monkeypatch.delenv("ALLCORE_REVIEW_TOKEN", raising=False)
    assert review.main(["serve", "--output", "/tmp/x", "--model", "/tmp/m", "--host", "0.0.0.0"]) == 2
    assert "--token" in capsys.readouterr().err
    assert review.is_loopback("127.0.0.1") and review.is_loopback("::1") and not review.is_loopback("10.0.0.2")


# ------------------------------------------------------------------ the app in a browser

@pytest.fixture(scope="module")
def app_url(ray_session, output_root, tiny_artifact, tiny_cell_artifact):
    from ray import serve

    from pipelines.review import ReviewApp

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(ReviewApp.options(ray_actor_options={"num_cpus": 0}).bind(
        str(output_root), tiny_artifact, tiny_cell_artifact), blocking=False)
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


@pytest.fixture(scope="module")
def browser():
    if not shutil.which("chromedriver") or not (shutil.which("chromium") or shutil.which("chromium-browser")):
        pytest.skip("chromium + chromium-driver are not installed (apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    yield driver
    driver.quit()


def screenshot(driver, tmp_path: Path, name: str) -> None:
    """Into the test's folder, and into $ALLCORE_REVIEW_SCREENSHOTS when set (the README's)."""
    driver.save_screenshot(str(tmp_path / name))
    if os.environ.get("ALLCORE_REVIEW_SCREENSHOTS"):
        driver.save_screenshot(str(Path(os.environ["ALLCORE_REVIEW_SCREENSHOTS"]) / name))


@pytest.mark.slow
def test_upload_shows_the_call_boxes_and_saliency_and_bad_uploads_say_why(app_url, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as seen
    from selenium.webdriver.support.ui import WebDriverWait

    img, _ = make_field(np.random.default_rng(7), 2, scale_bar=False)
    img.save(tmp_path / "field.png")
    browser.get(app_url + "/")
    wait = WebDriverWait(browser, 60)
    browser.find_element(By.ID, "upload").send_keys(str(tmp_path / "field.png"))
    browser.find_element(By.ID, "analyse-button").click()
    wait.until(seen.visibility_of_element_located((By.ID, "result")))
    assert browser.find_element(By.ID, "call").text in ("blast", "not blast", "abstain")
    assert browser.find_element(By.ID, "probability").text.endswith("%")
    assert browser.execute_script("return document.getElementById('boxes').naturalWidth") > 0
    rows = browser.find_elements(By.CSS_SELECTOR, "#cells tbody tr")
    assert rows, "the synthetic field has white cells"
    rows[0].click()
    wait.until(lambda d: (d.find_element(By.ID, "cell-saliency").get_attribute("src") or "").startswith("data:image/png"))
    screenshot(browser, tmp_path, "review_analyse.png")

    (tmp_path / "notes.txt").write_text("sample,count\n")
    (tmp_path / "broken.png").write_bytes(b"<html>403</html>")
    for name, expected in (("notes.txt", "is not a field image"), ("broken.png", "not an image")):
        browser.find_element(By.ID, "upload").send_keys(str(tmp_path / name))
        browser.find_element(By.ID, "analyse-button").click()
        wait.until(seen.text_to_be_present_in_element((By.ID, "message"), expected))
        assert not browser.find_element(By.ID, "result").is_displayed()


@pytest.mark.slow
def test_a_correction_made_in_the_queue_lands_in_the_corrections_table(app_url, browser, output_root, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as seen
    from selenium.webdriver.support.ui import Select, WebDriverWait

    browser.get(app_url + "/")
    wait = WebDriverWait(browser, 60)
    browser.find_element(By.ID, "tab-queue").click()
    browser.find_element(By.ID, "reviewer").send_keys("Reviewer One")
    wait.until(seen.element_to_be_clickable((By.CSS_SELECTOR, "#specimens li"))).click()
    item = wait.until(seen.visibility_of_element_located((By.CSS_SELECTOR, ".item")))
    cell_id = item.get_attribute("data-cell-id")
    wait.until(lambda d: d.execute_script("return document.querySelector('.item img').naturalWidth") > 0)
    screenshot(browser, tmp_path, "review_queue.png")
    choice = Select(item.find_element(By.TAG_NAME, "select"))
    label = next(o.text for o in choice.options if not o.is_selected())
    choice.select_by_visible_text(label)
    item.find_element(By.CSS_SELECTOR, "button.correct").click()
    wait.until(seen.text_to_be_present_in_element((By.ID, "queue-message"), "Recorded"))
    rows = [r for r in CorrectionStore(str(output_root)).read().to_pylist() if r["cell_id"] == cell_id]
    assert len(rows) == 1
    assert (rows[0]["label"], rows[0]["reviewer"], rows[0]["decision"]) == (label, "Reviewer One", "correct")
    # read the ids in one script: the queue re-renders, so element handles found first go stale
    wait.until(lambda d: cell_id not in d.execute_script(
        "return [...document.querySelectorAll('.item')].map(e => e.dataset.cellId)"))


@pytest.mark.slow
def test_the_slides_tab_shows_each_slide_s_overview_and_links_its_geojson(app_url, browser, scored_slide, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as seen
    from selenium.webdriver.support.ui import WebDriverWait

    out, slide = scored_slide
    browser.get(app_url + "/")
    wait = WebDriverWait(browser, 60)
    browser.find_element(By.ID, "tab-slides").click()
    figure = wait.until(seen.visibility_of_element_located((By.CSS_SELECTOR, ".slide")))
    assert figure.get_attribute("data-slide") == slide.name
    assert len(browser.find_elements(By.CSS_SELECTOR, ".slide")) == 1
    wait.until(lambda d: d.execute_script("return document.querySelector('.slide img').naturalWidth") > 0)
    shown = browser.execute_script("const i = document.querySelector('.slide img'); return [i.naturalWidth, i.naturalHeight]")
    assert tuple(shown) == Image.open(out / slide.overview).size
    screenshot(browser, tmp_path, "review_slides.png")
    href = browser.find_element(By.CSS_SELECTOR, ".slide a.geojson").get_attribute("href")
    served = browser.execute_async_script(
        "fetch(arguments[0]).then(r => r.json()).then(arguments[arguments.length - 1])", href)
    assert served == json.loads((out / slide.geojson).read_text())
    assert served["type"] == "FeatureCollection" and len(served["features"]) == slide.cells > 0
    unlisted = browser.execute_async_script(
        "fetch(arguments[0]).then(r => arguments[arguments.length - 1](r.status))",
        app_url + "/api/slides/..%2F_commits/cells.geojson")
    assert unlisted == 404
